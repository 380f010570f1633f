//! Simple queries planned by their shape. Applications that put values into
//! the SQL text send the same statement again and again with other literals;
//! parsing and planning each one in full cost a third of the proxy's CPU.
//! The shape (the SQL with its literals as placeholders `$n`) is planned
//! once, like a Parse of that SQL, and each query reuses the plan: a read
//! passes as written, a write gets its literals sealed and runs as the
//! proxy's own prepared statement of the rewritten SQL, every literal and
//! cell a parameter (see `own_statements`). A write whose literals would
//! change meaning as parameters (`RETURNING 'x'`) gets them spliced into
//! the rewritten SQL instead.
//!
//! Only what the shape decides alone takes this path: one SELECT, INSERT,
//! UPDATE, DELETE, WITH or VALUES statement that does not mention
//! `set_config`, whose template parses, planned to pass, to be decrypted,
//! or to be encrypted.
//! Everything else — a refused shape, a refused value, a tenant change, DDL,
//! several statements, SQL the scanner cannot read with certainty — is
//! planned from the original SQL, so refusals and their messages are the
//! full planner's.

use std::sync::Arc;

use sqlparser::ast::Statement;

use super::plan_cache::PlanCache;
use super::sealing::{ClientParams, Slot, Slots};
use super::{BoundQuery, Encryption, QueryRewrite, SessionInfo};
use crate::catalog::CatalogMap;
use crate::config::DeclaredType;
use crate::rewrite::{
    self, Parameterized, Rejection, SchemaFacts, SqlTemplate, StatementPlan, WritePlan,
};

/// Statements whose plan depends on their shape alone: none of them can
/// change the session tenant (set_config aside; UPDATE pg_settings is
/// refused, and a refused shape is planned in full) or the schema.
const SHAPED_STATEMENTS: [&str; 6] = ["select", "insert", "update", "delete", "with", "values"];

/// Shape SQL → its plan, made against one catalog map.
pub(super) struct ShapeCache {
    shapes: PlanCache<Arc<Shape>>,
}

impl ShapeCache {
    /// A cache of about `capacity` shapes (`server.plan_cache_size`).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            shapes: PlanCache::new(capacity),
        }
    }

    /// Forgets every shape (the catalog changed).
    pub(super) fn clear(&self) {
        self.shapes.clear();
    }
}

struct Shape {
    /// The catalog map the plan was made against.
    catalog: Arc<CatalogMap>,
    plan: ShapePlan,
}

enum ShapePlan {
    /// Planned from the original SQL every time.
    Unshared,
    /// Sent as written (a read's rows are decrypted on the way back).
    AsWritten { fingerprint: Option<Arc<str>> },
    /// A read sent with its rows' tenant columns added: the query's
    /// literals go back into `sql` as written.
    Read {
        sql: SqlTemplate,
        fingerprint: Arc<str>,
    },
    /// A write: its literals are sealed and bound to `bound`, or spliced
    /// into `sql`.
    Write {
        plan: Box<WritePlan>,
        sql: SqlTemplate,
        bound: Option<BoundShape>,
        fingerprint: Arc<str>,
    },
}

/// A write's shape as a prepared statement: its SQL, and where the value
/// of each parameter comes from.
struct BoundShape {
    sql: Arc<str>,
    /// It has RETURNING: its rows need a RowDescription (Describe).
    returns_rows: bool,
    /// `params[n - 1]` is the source of `$n`.
    params: Vec<BoundParam>,
}

enum BoundParam {
    /// The client's literal `$n`, as text (typed as written), and whether
    /// the statement negates it.
    Literal { negated: bool },
    /// A literal the statement no longer holds: never sent (NULL, text).
    Absent,
    /// The proxy's value (ciphertext, blind index, EDEK, tenant) of this
    /// declared type.
    Proxy(u32),
}

impl BoundShape {
    /// The plan of `write`'s statement (`sql`) with the shape's `literals`
    /// as parameters; `None` when a literal would read otherwise as one
    /// (where its context does not type it, or in a table with a column
    /// that reads literals by its type modifier or domain).
    fn new(
        write: &WritePlan,
        sql: &SqlTemplate,
        literals: usize,
        facts: &SchemaFacts,
    ) -> Option<Self> {
        if facts.literal_sensitive.contains(&write.table) {
            return None;
        }
        let typed = rewrite::typed_placeholders(&write.statement);
        let total = literals + write.extra_params;
        let mut proxy_types = vec![u32::MAX; total];
        write.declare_proxy_params(&mut proxy_types);
        let mut present = vec![false; total];
        for n in sql.placeholders() {
            *present.get_mut(n.checked_sub(1)?)? = true;
        }
        let tenant_pin = write.tenant_pin_param;
        let params = (1..=total)
            .map(|n| match (proxy_types[n - 1], present[n - 1]) {
                (u32::MAX, _) if tenant_pin == Some(n) => Some(BoundParam::Proxy(0)),
                // A literal where its context does not type it (or one the
                // parser did not take for an expression: `DATE $1`).
                (u32::MAX, true) if n <= literals => typed
                    .get(&n)
                    .map(|&negated| BoundParam::Literal { negated }),
                (u32::MAX, false) if n <= literals => Some(BoundParam::Absent),
                (u32::MAX, _) => Some(BoundParam::Proxy(0)),
                (oid, _) => Some(BoundParam::Proxy(oid)),
            })
            .collect::<Option<Vec<_>>>()?;
        let returns_rows = match &write.statement {
            Statement::Insert(insert) => insert.returning.is_some(),
            Statement::Update { returning, .. } => returning.is_some(),
            _ => true,
        };
        Some(Self {
            sql: Arc::from(write.statement.to_string()),
            returns_rows,
            params,
        })
    }

    /// The parameters of one query: the client's literals as text, the
    /// proxy's values from `slots`; `None` if a proxy value is missing.
    fn bind(
        &self,
        literals: &[rewrite::Literal<'_>],
        mut slots: Slots,
        catalog: &Arc<CatalogMap>,
    ) -> Option<BoundQuery> {
        let mut query = BoundQuery {
            sql: self.sql.clone(),
            catalog: catalog.clone(),
            returns_rows: self.returns_rows,
            types: Vec::with_capacity(self.params.len()),
            values: Vec::with_capacity(self.params.len()),
            formats: Vec::with_capacity(self.params.len()),
        };
        for (i, param) in self.params.iter().enumerate() {
            let (ty, value, format) = match param {
                BoundParam::Literal { negated } => {
                    let literal = literals.get(i)?;
                    if *negated && rewrite::negation_types_otherwise(literal) {
                        return None;
                    }
                    let value = literal.value.as_bytes().to_vec();
                    (rewrite::literal_param_type(literal), Some(value), 0)
                }
                BoundParam::Absent => (DeclaredType::Text.oid(), None, 0),
                BoundParam::Proxy(ty) => match slots.take(i + 1)? {
                    Slot::Bytes(bytes) => (*ty, Some(bytes), 1),
                    Slot::Text(text) => (*ty, Some(text.as_bytes().to_vec()), 0),
                    Slot::Null => (*ty, None, 0),
                },
            };
            query.types.push(ty);
            query.values.push(value);
            query.formats.push(format);
        }
        Some(query)
    }
}

impl Encryption {
    /// The rewrite of a simple query from the plan of its shape; `None`:
    /// plan the original SQL in full.
    pub(super) async fn rewrite_by_shape(
        &self,
        sql: &str,
        session: &SessionInfo<'_>,
        catalog: &Arc<CatalogMap>,
    ) -> Option<Result<QueryRewrite, Rejection>> {
        let shaped = rewrite::parameterize(sql)?;
        if !is_shaped_statement(&shaped.template) || mentions_set_config(&shaped.template) {
            return None;
        }
        let shape = self.shape(&shaped, sql, catalog);
        match &shape.plan {
            ShapePlan::Unshared => None,
            ShapePlan::AsWritten { fingerprint } => Some(Ok(QueryRewrite {
                fingerprint: fingerprint.clone(),
                one_statement: fingerprint.is_some(),
                ..QueryRewrite::default()
            })),
            ShapePlan::Read {
                sql: template,
                fingerprint,
            } => {
                let rewritten = template.fill(0, |n, out| {
                    out.push_str(shaped.literals.get(n.checked_sub(1)?)?.source);
                    Some(())
                })?;
                Some(Ok(QueryRewrite {
                    sql: Some(rewritten),
                    fingerprint: Some(fingerprint.clone()),
                    one_statement: true,
                    ..QueryRewrite::default()
                }))
            }
            ShapePlan::Write {
                plan,
                sql: template,
                bound,
                fingerprint,
            } => {
                let params = ClientParams::Literals(&shaped.literals);
                let slots = match self.seal_write(plan, session, &params).await {
                    Ok(slots) => slots,
                    // The tenant and the values are the query's own: the
                    // full planner words their refusal.
                    Err(r) if matches!(r.sqlstate, rewrite::KM004 | "22P02") => return None,
                    // A key refusal reads the same either way; planning
                    // again would only ask the KMS again.
                    Err(r) => return Some(Err(r)),
                };
                if let Some(bound) = bound.as_ref().filter(|_| session.prepare_writes) {
                    return Some(Ok(QueryRewrite {
                        bound: Some(bound.bind(&shaped.literals, slots, catalog)?),
                        fingerprint: Some(fingerprint.clone()),
                        ..QueryRewrite::default()
                    }));
                }
                let literals: Vec<Option<String>> = slots
                    .0
                    .iter()
                    .map(|s| s.as_ref().map(Slot::literal))
                    .collect();
                let sealed: usize = literals.iter().flatten().map(String::len).sum();
                let rewritten = template.fill(sealed, |n, out| {
                    match literals.get(n).and_then(Option::as_deref) {
                        Some(literal) => out.push_str(literal),
                        None => out.push_str(shaped.literals.get(n.checked_sub(1)?)?.source),
                    }
                    Some(())
                })?;
                Some(Ok(QueryRewrite {
                    sql: Some(rewritten),
                    fingerprint: Some(fingerprint.clone()),
                    one_statement: true,
                    ..QueryRewrite::default()
                }))
            }
        }
    }

    /// The cached plan of this shape, made now if it is missing or was made
    /// against another catalog map.
    fn shape(
        &self,
        shaped: &Parameterized<'_>,
        sql: &str,
        catalog: &Arc<CatalogMap>,
    ) -> Arc<Shape> {
        if let Some(shape) = self.shapes.shapes.get(shaped.template.as_str()) {
            if Arc::ptr_eq(&shape.catalog, catalog) {
                return shape;
            }
        }
        let shape = Arc::new(Shape {
            catalog: catalog.clone(),
            plan: self.plan_shape(shaped, sql, catalog),
        });
        self.shapes
            .shapes
            .insert(shaped.template.clone(), shape.clone());
        shape
    }

    /// Plans a shape like the Parse of its SQL with untyped parameters.
    fn plan_shape(&self, shaped: &Parameterized<'_>, sql: &str, catalog: &CatalogMap) -> ShapePlan {
        // A template the parser cannot read is not planned from its words
        // (that fallback is for the original SQL): the full planner decides.
        if rewrite::parse_statements(&shaped.template).is_none() {
            return ShapePlan::Unshared;
        }
        let policy = self.policy();
        let Ok(analysis) = rewrite::analyze_in(
            catalog.analysis_policy(&policy),
            catalog.schema_facts(),
            &shaped.template,
            shaped.literals.len(),
        ) else {
            return ShapePlan::Unshared;
        };
        let mut statements = analysis.statements.into_iter();
        let (Some(statement), None) = (statements.next(), statements.next()) else {
            return ShapePlan::Unshared;
        };
        let fingerprint = || Arc::from(rewrite::fingerprint(sql));
        match statement {
            StatementPlan::Untouched => ShapePlan::AsWritten { fingerprint: None },
            StatementPlan::Read => ShapePlan::AsWritten {
                fingerprint: Some(fingerprint()),
            },
            StatementPlan::ReadRowTenants(read) => match SqlTemplate::new(&read.sql) {
                Some(sql) => ShapePlan::Read {
                    sql,
                    fingerprint: fingerprint(),
                },
                None => ShapePlan::Unshared,
            },
            StatementPlan::Write(plan) => match SqlTemplate::new(&plan.statement.to_string()) {
                Some(template) => ShapePlan::Write {
                    bound: if policy.server.prepare_simple_writes {
                        BoundShape::new(
                            &plan,
                            &template,
                            shaped.literals.len(),
                            catalog.schema_facts(),
                        )
                    } else {
                        None
                    },
                    plan,
                    sql: template,
                    fingerprint: fingerprint(),
                },
                None => ShapePlan::Unshared,
            },
            StatementPlan::Ddl
            | StatementPlan::Copy(_)
            | StatementPlan::SetTenant(_)
            | StatementPlan::SetTenantParam { .. } => ShapePlan::Unshared,
        }
    }
}

/// True when the statement's first word (after parentheses) is one whose
/// plan its shape decides alone.
fn is_shaped_statement(template: &str) -> bool {
    let start = template.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '(');
    let word_len = start.bytes().take_while(u8::is_ascii_alphabetic).count();
    let word = &start[..word_len];
    SHAPED_STATEMENTS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(word))
}

/// `set_config` changes settings from inside a SELECT, and which setting
/// it names is a literal: the full planner must see it. (The call itself is
/// never inside a literal, so the template, short, is what is searched.)
fn mentions_set_config(sql: &str) -> bool {
    sql.as_bytes()
        .windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"set_config"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_statements_whose_shape_decides_their_plan_are_shaped() {
        for sql in [
            "SELECT 1",
            " (select 1)",
            "INSERT INTO t VALUES (1)",
            "with x as (select 1) select 1",
        ] {
            assert!(is_shaped_statement(sql), "{sql}");
        }
        for sql in [
            "SET cmk.tenant_id = $1",
            "RESET ALL",
            "DISCARD ALL",
            "CREATE TABLE t (a int)",
            "selectx",
        ] {
            assert!(!is_shaped_statement(sql), "{sql}");
        }
        assert!(mentions_set_config(
            "SELECT pg_catalog.SET_CONFIG('a', 'b', false)"
        ));
        assert!(!mentions_set_config("SELECT setconfig"));
    }
}
