//! Equality lookups on `search: equality` columns, answered through the
//! blind index (docs/SEARCH.md). A condition `col = v`, `col <> v`,
//! `col [NOT] IN (v, …)` or `col = ANY($n | ARRAY[v, …])` in a WHERE, on a
//! column of a policy table named in that query's own FROM, becomes a
//! comparison of the column's blind index with values the session computes
//! (HMAC under the tenant's index key), pinned to that tenant's rows:
//! `(t.col_bidx = $i AND t.tenant = $t)`. The tenant is a
//! `tenant = literal|$n` conjunct of the same WHERE, else the session's.
//! Anything else on a protected column is left as written, for the
//! analysis to refuse. Knows SQL and the policy; nothing of keys.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Array, BinaryOperator, DataType, Expr, FromTable, Ident, Query, Select, SetExpr, Statement,
    TableFactor, TableWithJoins, UpdateTableFromKind, VisitMut, VisitorMut,
};

use super::analyze::{Analysis, SchemaFacts, Scope, StatementPlan};
use super::names::{ident_name, policy_table};
use super::write::{bytea_cast, operand, placeholder, Operand, TenantSource, WritePlan};
use super::write_unnest::array_cast;
use super::Rejection;
use crate::config::{DeclaredType, Policy, SearchMode, TableMode, TablePolicy};

/// Where a searched value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupValue {
    /// A literal in the statement (`None`: NULL).
    Literal(Option<String>),
    /// Client parameter `$n` (1-based), one value.
    Param(usize),
    /// Client parameter `$n`, an array of values (`= ANY($n)`).
    ArrayParam(usize),
}

/// One searched value and the placeholder that carries its blind index
/// (`bytea`, or `bytea[]` for an array parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupSlot {
    /// The plaintext searched for.
    pub value: LookupValue,
    /// Placeholder of its blind index.
    pub index_param: usize,
}

/// One comparison on a searchable column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// `schema.table`.
    pub table: String,
    /// The protected column.
    pub column: String,
    /// Its declared type (values are canonicalised as written cells are).
    pub ty: DeclaredType,
    /// The table's tenant column.
    pub tenant_column: String,
    /// Whose index key computes the values.
    pub tenant: TenantSource,
    /// Placeholder carrying that tenant, pinning the comparison to its rows.
    pub tenant_param: usize,
    /// The values compared with.
    pub values: Vec<LookupSlot>,
}

/// The lookups of one statement, after its rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookups {
    /// Each comparison rewritten.
    pub lookups: Vec<Lookup>,
    /// Client parameters that only carried searched values: no longer in
    /// the SQL, bound as NULL (the plaintext never reaches the server).
    pub cleared: Vec<usize>,
}

impl Lookups {
    /// True when nothing was rewritten.
    pub fn is_empty(&self) -> bool {
        self.lookups.is_empty()
    }
}

/// Declared types for which equality of PostgreSQL values is equality of
/// their canonical text, so equal blind indexes mean equal values. numeric
/// (`1.0 = 1.00`), float8 (`0 = -0`) and jsonb are not.
fn searchable_type(ty: DeclaredType) -> bool {
    use DeclaredType as T;
    !matches!(ty, T::Numeric | T::Float8 | T::Jsonb)
}

/// Rewrites the lookups of `statement` in place; added placeholders are
/// numbered from `next` on (advanced past them).
pub(super) fn rewrite_lookups(
    scope: &Scope<'_>,
    statement: &mut Statement,
    next: &mut usize,
) -> Result<Lookups, Rejection> {
    let mut rewriter = Rewriter {
        scope,
        next,
        lookups: Vec::new(),
        param_values: BTreeSet::new(),
        refusal: None,
    };
    let _ = statement.visit(&mut rewriter);
    let Rewriter {
        lookups,
        param_values,
        refusal,
        ..
    } = rewriter;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    if lookups.is_empty() {
        return Ok(Lookups::default());
    }
    // A client parameter that carried a searched value must carry nothing
    // else: it is bound as NULL, its plaintext kept from the server.
    let still_used: BTreeSet<usize> = super::analyze::placeholder_uses(statement)
        .into_iter()
        .collect();
    if let Some(n) = param_values.intersection(&still_used).next() {
        let lookup = &lookups[0];
        return Err(Rejection::unsupported(
            &lookup.table,
            Some(&lookup.column),
            &format!("parameter ${n} compared with a protected column and also used elsewhere in the statement (bind the value twice)"),
        ));
    }
    Ok(Lookups {
        lookups,
        cleared: param_values.into_iter().collect(),
    })
}

struct Rewriter<'r, 's, 'p> {
    scope: &'r Scope<'p>,
    next: &'s mut usize,
    lookups: Vec<Lookup>,
    param_values: BTreeSet<usize>,
    /// Why a comparison on a searchable column cannot be answered.
    refusal: Option<Rejection>,
}

/// A policy table named in a FROM list, as the query refers to it.
struct Relation<'p> {
    /// Policy key `schema.table`.
    table: &'p str,
    policy: &'p TablePolicy,
    /// Name parts a qualified column reference uses: the alias, else the
    /// name as written.
    qualifier: Vec<Ident>,
}

impl VisitorMut for Rewriter<'_, '_, '_> {
    type Break = ();

    fn post_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        self.set_expr(&mut query.body);
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, statement: &mut Statement) -> ControlFlow<()> {
        match statement {
            Statement::Update {
                table,
                from,
                selection,
                ..
            } => {
                let mut from_items = vec![&*table];
                if let Some(
                    UpdateTableFromKind::AfterSet(items) | UpdateTableFromKind::BeforeSet(items),
                ) = from
                {
                    from_items.extend(items.iter());
                }
                let (relations, total) = self.relations(from_items);
                self.condition(selection, &relations, total);
            }
            Statement::Delete(delete) => {
                let (FromTable::WithFromKeyword(items) | FromTable::WithoutKeyword(items)) =
                    &delete.from;
                let mut from_items: Vec<&TableWithJoins> = items.iter().collect();
                if let Some(using) = &delete.using {
                    from_items.extend(using.iter());
                }
                let (relations, total) = self.relations(from_items);
                self.condition(&mut delete.selection, &relations, total);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl<'p> Rewriter<'_, '_, 'p> {
    /// The SELECTs of a query body; nested queries are visited on their own.
    fn set_expr(&mut self, body: &mut SetExpr) {
        match body {
            SetExpr::Select(select) => self.select(select),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            _ => {}
        }
    }

    fn select(&mut self, select: &mut Select) {
        let (relations, total) = self.relations(select.from.iter().collect());
        self.condition(&mut select.selection, &relations, total);
    }

    /// The searchable policy tables among `items`, and how many relations
    /// `items` name in all.
    fn relations(&self, items: Vec<&TableWithJoins>) -> (Vec<Relation<'p>>, usize) {
        let factors = items.into_iter().flat_map(|item| {
            std::iter::once(&item.relation).chain(item.joins.iter().map(|j| &j.relation))
        });
        let mut total = 0;
        let mut relations = Vec::new();
        for factor in factors {
            total += 1;
            let TableFactor::Table { name, alias, .. } = factor else {
                continue;
            };
            let Some((table, policy)) = policy_table(self.scope.policy, name) else {
                continue;
            };
            // Rows written before the blind index was complete (a legacy
            // table in transition or in migrating mode) would be missed.
            if policy.mode == TableMode::Migrating || self.scope.unindexed.contains(table) {
                continue;
            }
            let qualifier = match alias {
                Some(alias) => vec![alias.name.clone()],
                None => name
                    .0
                    .iter()
                    .filter_map(|p| p.as_ident().cloned())
                    .collect(),
            };
            relations.push(Relation {
                table,
                policy,
                qualifier,
            });
        }
        (relations, total)
    }

    fn condition(
        &mut self,
        selection: &mut Option<Expr>,
        relations: &[Relation<'p>],
        total: usize,
    ) {
        if relations.is_empty() {
            return;
        }
        let Some(expr) = selection.take() else {
            return;
        };
        let conjuncts = conjuncts(&expr);
        let tenants: Vec<Option<TenantSource>> = relations
            .iter()
            .map(|r| tenant_conjunct(&conjuncts, r, relations, total))
            .collect();
        *selection = Some(self.rewrite(expr, relations, total, &tenants));
    }

    /// Rewrites the comparisons reached through AND, OR and parentheses.
    fn rewrite(
        &mut self,
        expr: Expr,
        relations: &[Relation<'p>],
        total: usize,
        tenants: &[Option<TenantSource>],
    ) -> Expr {
        match expr {
            Expr::BinaryOp {
                left,
                op: op @ (BinaryOperator::And | BinaryOperator::Or),
                right,
            } => Expr::BinaryOp {
                left: Box::new(self.rewrite(*left, relations, total, tenants)),
                op,
                right: Box::new(self.rewrite(*right, relations, total, tenants)),
            },
            Expr::Nested(inner) => {
                Expr::Nested(Box::new(self.rewrite(*inner, relations, total, tenants)))
            }
            Expr::BinaryOp {
                left,
                op: op @ (BinaryOperator::Eq | BinaryOperator::NotEq),
                right,
            } => {
                let column = self
                    .searchable(&left, relations, total)
                    .map(|c| (c, &right))
                    .or_else(|| {
                        self.searchable(&right, relations, total)
                            .map(|c| (c, &left))
                    });
                let Some(((index, column), value)) = column else {
                    return Expr::BinaryOp { left, op, right };
                };
                let ty = relations[index].policy.columns[&column].ty;
                match lookup_value(value, ty) {
                    Some(value) => {
                        let lookup = self.lookup(
                            &relations[index],
                            &column,
                            tenants[index].clone(),
                            vec![value],
                        );
                        let compared = Expr::BinaryOp {
                            left: Box::new(index_column(&relations[index], &column)),
                            op,
                            right: Box::new(bytea_cast(placeholder(lookup.values[0].index_param))),
                        };
                        self.pinned(lookup, &relations[index], compared)
                    }
                    None => Expr::BinaryOp { left, op, right },
                }
            }
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let found = self
                    .searchable(&expr, relations, total)
                    .and_then(|(index, column)| {
                        let ty = relations[index].policy.columns[&column].ty;
                        let values = list
                            .iter()
                            .map(|v| lookup_value(v, ty))
                            .collect::<Option<Vec<_>>>()?;
                        Some((index, column, values))
                    });
                let Some((index, column, values)) = found else {
                    return Expr::InList {
                        expr,
                        list,
                        negated,
                    };
                };
                let lookup =
                    self.lookup(&relations[index], &column, tenants[index].clone(), values);
                let compared = Expr::InList {
                    expr: Box::new(index_column(&relations[index], &column)),
                    list: lookup
                        .values
                        .iter()
                        .map(|slot| bytea_cast(placeholder(slot.index_param)))
                        .collect(),
                    negated,
                };
                self.pinned(lookup, &relations[index], compared)
            }
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                is_some,
            } => {
                let found = self
                    .searchable(&left, relations, total)
                    .and_then(|(index, column)| {
                        let ty = relations[index].policy.columns[&column].ty;
                        Some((index, column, any_values(&right, ty)?))
                    });
                let Some((index, column, values)) = found else {
                    return Expr::AnyOp {
                        left,
                        compare_op: BinaryOperator::Eq,
                        right,
                        is_some,
                    };
                };
                let lookup =
                    self.lookup(&relations[index], &column, tenants[index].clone(), values);
                let array = match lookup.values.as_slice() {
                    [LookupSlot {
                        value: LookupValue::ArrayParam(_),
                        index_param,
                    }] => array_cast(placeholder(*index_param), DataType::Bytea),
                    slots => array_cast(
                        Expr::Array(Array {
                            elem: slots
                                .iter()
                                .map(|slot| bytea_cast(placeholder(slot.index_param)))
                                .collect(),
                            named: true,
                        }),
                        DataType::Bytea,
                    ),
                };
                let compared = Expr::AnyOp {
                    left: Box::new(index_column(&relations[index], &column)),
                    compare_op: BinaryOperator::Eq,
                    right: Box::new(array),
                    is_some,
                };
                self.pinned(lookup, &relations[index], compared)
            }
            other => other,
        }
    }

    /// A column declared `search: equality` of a relation the lookup can
    /// use. One whose lookups cannot be answered exactly (its type, or a
    /// blind index the database does not prove complete) is refused with
    /// the reason.
    fn searchable(
        &mut self,
        expr: &Expr,
        relations: &[Relation<'p>],
        total: usize,
    ) -> Option<(usize, String)> {
        let (index, column) = column_of(expr, relations, total)?;
        let relation = &relations[index];
        let policy = relation.policy.columns.get(&column)?;
        if policy.search != SearchMode::Equality {
            return None;
        }
        let why = if !searchable_type(policy.ty) {
            format!(
                "an equality lookup on a {} column (equal values of this type can have different texts, so their blind indexes differ)",
                policy.ty.sql_name()
            )
        } else if !self
            .scope
            .indexed_columns
            .contains(&format!("{}.{column}", relation.table))
        {
            format!(
                "an equality lookup before the database proves every value has its blind index (run cmk-proxy migrate: it adds and validates the CHECK constraint {})",
                crate::catalog::envelope::blind_index_constraint_name(&column)
            )
        } else {
            return Some((index, column));
        };
        if self.refusal.is_none() {
            self.refusal = Some(Rejection::unsupported(relation.table, Some(&column), &why));
        }
        None
    }

    /// Records a lookup, numbering its placeholders.
    fn lookup(
        &mut self,
        relation: &Relation<'p>,
        column: &str,
        tenant: Option<TenantSource>,
        values: Vec<LookupValue>,
    ) -> Lookup {
        let mut take = || {
            let n = *self.next;
            *self.next += 1;
            n
        };
        let tenant_param = take();
        let values = values
            .into_iter()
            .map(|value| {
                if let LookupValue::Param(n) | LookupValue::ArrayParam(n) = value {
                    self.param_values.insert(n);
                }
                LookupSlot {
                    value,
                    index_param: take(),
                }
            })
            .collect();
        Lookup {
            table: relation.table.to_owned(),
            column: column.to_owned(),
            ty: relation.policy.columns[column].ty,
            tenant_column: relation.policy.tenant_column.clone(),
            tenant: tenant.unwrap_or(TenantSource::Session),
            tenant_param,
            values,
        }
    }

    /// `(compared AND <relation>.<tenant> = $t)`: only the tenant's rows.
    fn pinned(&mut self, lookup: Lookup, relation: &Relation<'p>, compared: Expr) -> Expr {
        let pin = Expr::BinaryOp {
            left: Box::new(qualified(relation, &relation.policy.tenant_column)),
            op: BinaryOperator::Eq,
            right: Box::new(placeholder(lookup.tenant_param)),
        };
        self.lookups.push(lookup);
        Expr::Nested(Box::new(Expr::BinaryOp {
            left: Box::new(compared),
            op: BinaryOperator::And,
            right: Box::new(pin),
        }))
    }
}

/// The top-level AND conjuncts of a condition.
fn conjuncts(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut all = conjuncts(left);
            all.extend(conjuncts(right));
            all
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// The tenant a `<relation>.<tenant column> = 'x' | $n` conjunct names.
fn tenant_conjunct(
    conjuncts: &[&Expr],
    relation: &Relation<'_>,
    relations: &[Relation<'_>],
    total: usize,
) -> Option<TenantSource> {
    conjuncts.iter().find_map(|c| {
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = c
        else {
            return None;
        };
        let names_tenant = |e: &Expr| {
            column_of(e, relations, total).is_some_and(|(index, column)| {
                std::ptr::eq(&relations[index], relation) && column == relation.policy.tenant_column
            })
        };
        let value = if names_tenant(left) {
            right
        } else if names_tenant(right) {
            left
        } else {
            return None;
        };
        match operand(value) {
            Operand::Literal(text) => Some(TenantSource::Literal(text)),
            Operand::Param(n) => Some(TenantSource::Param(n)),
            _ => None,
        }
    })
}

/// The relation (index in `relations`) and column an expression names: a
/// qualified reference to a relation's qualifier, or a bare name when the
/// FROM list names that one relation alone (PostgreSQL would otherwise
/// look for it in every relation, which the proxy cannot see).
fn column_of(expr: &Expr, relations: &[Relation<'_>], total: usize) -> Option<(usize, String)> {
    match expr {
        Expr::Identifier(ident) if total == 1 && relations.len() == 1 => {
            Some((0, ident_name(ident)))
        }
        Expr::CompoundIdentifier(parts) => {
            let (column, qualifier) = parts.split_last()?;
            let qualifier: Vec<String> = qualifier.iter().map(ident_name).collect();
            let index = relations.iter().position(|r| {
                let names: Vec<String> = r.qualifier.iter().map(ident_name).collect();
                names == qualifier
                    || (names.len() > 1 && names.last() == qualifier.last() && qualifier.len() == 1)
            })?;
            Some((index, ident_name(column)))
        }
        _ => None,
    }
}

/// A value a lookup can compare with: a literal PostgreSQL would read as
/// the column's type, NULL, or a parameter.
fn lookup_value(expr: &Expr, ty: DeclaredType) -> Option<LookupValue> {
    use DeclaredType as T;
    if !casts_keep_the_value(expr, ty) {
        return None;
    }
    let number = matches!(expr_value(expr), Some(sqlparser::ast::Value::Number(..)));
    let boolean = matches!(expr_value(expr), Some(sqlparser::ast::Value::Boolean(_)));
    match operand(expr) {
        Operand::Null => Some(LookupValue::Literal(None)),
        Operand::Param(n) => Some(LookupValue::Param(n)),
        // `text_col = 5` is an error in PostgreSQL, not a match.
        Operand::Literal(_) if number && !matches!(ty, T::Int2 | T::Int4 | T::Int8) => None,
        Operand::Literal(_) if boolean && ty != T::Bool => None,
        Operand::Literal(text) => Some(LookupValue::Literal(Some(text))),
        _ => None,
    }
}

/// True when every cast on the value only restates a type that reads it
/// unchanged: text, an unbounded varchar, or the column's own type. A cast
/// with a modifier (`::char(2)`, `::varchar(3)`, `::timestamp(0)`) or to
/// another type could change the value PostgreSQL compares.
fn casts_keep_the_value(expr: &Expr, ty: DeclaredType) -> bool {
    match expr {
        Expr::Nested(inner) => casts_keep_the_value(inner, ty),
        Expr::Cast {
            expr, data_type, ..
        } => {
            let name = data_type.to_string().to_ascii_lowercase();
            let own = match ty {
                DeclaredType::Int2 => ["int2", "smallint"].contains(&name.as_str()),
                DeclaredType::Int4 => ["int4", "int", "integer"].contains(&name.as_str()),
                DeclaredType::Int8 => ["int8", "bigint"].contains(&name.as_str()),
                DeclaredType::Bool => ["bool", "boolean"].contains(&name.as_str()),
                DeclaredType::Timestamp => {
                    ["timestamp", "timestamp without time zone"].contains(&name.as_str())
                }
                DeclaredType::Timestamptz => {
                    ["timestamptz", "timestamp with time zone"].contains(&name.as_str())
                }
                other => name == other.sql_name(),
            };
            let textual = ["text", "varchar", "character varying"].contains(&name.as_str());
            (own || textual) && casts_keep_the_value(expr, ty)
        }
        _ => true,
    }
}

fn expr_value(expr: &Expr) -> Option<&sqlparser::ast::Value> {
    match expr {
        Expr::Value(v) => Some(&v.value),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => expr_value(expr),
        _ => None,
    }
}

/// The values of `= ANY(…)`: an array parameter, or `ARRAY[v, …]`.
fn any_values(expr: &Expr, ty: DeclaredType) -> Option<Vec<LookupValue>> {
    match expr {
        Expr::Cast { expr, .. } | Expr::Nested(expr) => any_values(expr, ty),
        Expr::Array(array) => array.elem.iter().map(|v| lookup_value(v, ty)).collect(),
        _ => match operand(expr) {
            Operand::Param(n) => Some(vec![LookupValue::ArrayParam(n)]),
            _ => None,
        },
    }
}

fn qualified(relation: &Relation<'_>, column: &str) -> Expr {
    let mut parts = relation.qualifier.clone();
    parts.push(Ident::with_quote('"', column));
    Expr::CompoundIdentifier(parts)
}

/// The blind-index column of `column`.
fn index_column(relation: &Relation<'_>, column: &str) -> Expr {
    qualified(relation, &format!("{column}_bidx"))
}

/// The analysis of `statements` with their equality lookups on searchable
/// columns rewritten to the blind index (`None`: there are none). The
/// rewritten SQL is analysed like any other; each statement with lookups
/// becomes a plan whose proxy placeholders the session fills.
pub(super) fn analyze_lookups(
    policy: &Policy,
    facts: &SchemaFacts,
    scope: &Scope<'_>,
    statements: &[Statement],
    params: usize,
) -> Result<Option<Analysis>, Rejection> {
    let mut next = params + 1;
    let mut rewritten = statements.to_vec();
    let mut found = Vec::with_capacity(statements.len());
    for statement in &mut rewritten {
        found.push(rewrite_lookups(scope, statement, &mut next)?);
    }
    if found.iter().all(Lookups::is_empty) {
        return Ok(None);
    }
    let total = next - 1;
    let sql: Vec<String> = rewritten.iter().map(ToString::to_string).collect();
    let inner = super::analyze::analyze_with(policy, facts, &sql.join("; "), total, false)?;
    if inner.statements.len() != found.len() {
        return Err(Rejection::unsupported(
            "",
            None,
            "an equality lookup cmk-proxy cannot plan",
        ));
    }
    let plans = inner
        .statements
        .into_iter()
        .zip(rewritten)
        .zip(found)
        .map(|((plan, statement), lookups)| with_lookups(plan, statement, lookups, total - params))
        .collect::<Result<_, _>>()?;
    Ok(Some(Analysis {
        statements: plans,
        client_params: params,
    }))
}

/// `plan` (of the rewritten `statement`) with its lookups: a read becomes a
/// plan with placeholders of the proxy's, like a write without rows.
fn with_lookups(
    plan: StatementPlan,
    statement: Statement,
    lookups: Lookups,
    added: usize,
) -> Result<StatementPlan, Rejection> {
    let Some(first) = lookups.lookups.first() else {
        return Ok(plan);
    };
    let read = |statement: Statement, hidden_results: usize| WritePlan {
        table: first.table.clone(),
        tenant_column: first.tenant_column.clone(),
        rows: Vec::new(),
        tenant_pin_param: None,
        extra_params: added,
        statement,
        lookups: lookups.lookups.clone(),
        cleared: lookups.cleared.clone(),
        hidden_results,
        unnest: None,
    };
    match plan {
        StatementPlan::Read => Ok(StatementPlan::Write(Box::new(read(statement, 0)))),
        StatementPlan::ReadRowTenants(rows) => Ok(StatementPlan::Write(Box::new(read(
            rows.statement,
            rows.hidden,
        )))),
        StatementPlan::Write(mut write) => {
            write.extra_params += added;
            write.lookups = lookups.lookups;
            write.cleared = lookups.cleared;
            Ok(StatementPlan::Write(write))
        }
        _ => Err(Rejection::unsupported(
            &first.table,
            Some(&first.column),
            "an equality lookup in this kind of statement",
        )),
    }
}

#[cfg(test)]
#[path = "lookup_tests.rs"]
mod tests;
