//! Classifies every statement of a query string: untouched, a read of
//! protected tables, a planned write, or a rejection.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, visit_relations, Expr, ObjectName, Query, Select, SelectItem, SetExpr,
    Statement, TableFactor, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;

use super::gate::{
    disagreement, has_unicode_escape, needs_the_proxy, parse_bounded, with_plain_comparisons,
    MAX_CALL_NESTING,
};
use super::names::{
    ambiguous_table, ident_name, keys_named, last_name, mentioned_key, mentions_policy_table,
    policy_table, relation_key, unqualified,
};
use super::pg_reading::{PgReading, StatementClass, MAX_DEPTH};
use super::write::{plan_insert, plan_update, WritePlan};
use super::{Rejection, KM003};
use crate::config::Policy;
use pg_query::NodeEnum;

mod filters;
mod refusals;
mod tenant_setting;

use filters::*;
use refusals::*;
use tenant_setting::*;

pub(super) use refusals::mentions_protected;
pub use refusals::nonstandard_strings_refusal;
pub(super) use tenant_setting::names_tenant_setting;

/// What the proxy does with one statement.
#[derive(Debug, Clone)]
pub enum StatementPlan {
    /// Touches no protected table.
    Untouched,
    /// Reads protected tables: results are decrypted from RowDescription.
    Read,
    /// A read whose protected columns are checked against their rows'
    /// tenant: sent with the tenant columns added to its result, hidden
    /// from the client.
    ReadRowTenants(Box<super::row_tenant::RowTenantRead>),
    /// Schema change: the catalog map must be refreshed afterwards.
    Ddl,
    /// A write with protected values to encrypt.
    Write(Box<WritePlan>),
    /// `SET [SESSION|LOCAL] <tenant setting> = 'x'`, `RESET`, `DISCARD ALL`,
    /// `SELECT set_config('<tenant setting>', 'x', false|true)`.
    SetTenant(TenantChange),
    /// COPY of a policy table or of a query over protected data
    /// (docs/COPY.md).
    Copy(Box<super::copy::CopyPlan>),
    /// `SELECT set_config('<tenant setting>', $n, false|true)`: the tenant
    /// is the value bound to parameter `param` (1-based).
    SetTenantParam {
        /// The parameter that carries the tenant.
        param: usize,
        /// `true`: undone when the transaction ends.
        local: bool,
    },
}

/// A change of the session tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantChange {
    /// The new tenant (`None`: no tenant, or the session's default when
    /// `to_default`).
    pub tenant: Option<String>,
    /// `SET LOCAL`: undone when the transaction ends.
    pub local: bool,
    /// RESET, `= DEFAULT`, DISCARD ALL, `set_config(…, NULL, …)`: the
    /// server goes back to the session's default (the startup options),
    /// and the proxy to the tenant the session started with.
    pub to_default: bool,
    /// SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT, ROLLBACK: not a new tenant,
    /// but a point that decides about the changes before it (settings are
    /// transactional: PostgreSQL undoes a SET made after the savepoint, or
    /// in a transaction that rolls back).
    pub savepoint: Option<SavepointOp>,
}

/// A savepoint or transaction-end statement (names normalized like
/// identifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointOp {
    /// `SAVEPOINT name`
    Define(String),
    /// `RELEASE [SAVEPOINT] name`
    Release(String),
    /// `ROLLBACK TO [SAVEPOINT] name`
    RollbackTo(String),
    /// `COMMIT`, `END` (`AND CHAIN` too): the changes before it are final
    /// once its tag says COMMIT (a failed transaction's says ROLLBACK).
    Commit,
    /// `ROLLBACK` (`AND CHAIN` too): the changes before it are undone. A
    /// query string or a chain can go on with another transaction, so
    /// this, not the idle ReadyForQuery at the end, decides about them.
    Rollback,
}

impl TenantChange {
    /// A new tenant, or none (an empty value).
    pub fn to(tenant: Option<String>, local: bool) -> Self {
        Self {
            tenant,
            local,
            to_default: false,
            savepoint: None,
        }
    }

    /// A savepoint statement.
    pub fn savepoint(op: SavepointOp) -> Self {
        Self {
            savepoint: Some(op),
            ..Self::to(None, false)
        }
    }

    /// Back to the session's default (RESET, DEFAULT, DISCARD ALL).
    pub fn reset(local: bool) -> Self {
        Self {
            to_default: true,
            ..Self::to(None, local)
        }
    }

    /// The tenant after this change in a session that started with
    /// `default`.
    pub fn resolve(&self, default: Option<&str>) -> Option<String> {
        if self.to_default {
            default.map(str::to_owned)
        } else {
            self.tenant.clone()
        }
    }
}

/// The plan of a whole query string.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// One plan per statement, in order.
    pub statements: Vec<StatementPlan>,
    /// Parameters the client binds: declared or used, whichever is more.
    pub client_params: usize,
}

impl Analysis {
    /// True if the SQL text must be replaced (some statement is a write).
    pub fn needs_rewrite(&self) -> bool {
        self.statements.iter().any(|s| {
            matches!(
                s,
                StatementPlan::Write(_) | StatementPlan::ReadRowTenants(_)
            )
        })
    }
}

/// What the analysis must know of the live schema besides the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaFacts {
    /// Views over protected columns: `schema.view` → its protected column names.
    pub views: HashMap<String, Vec<String>>,
    /// Views over protected columns that show a tenant column: `schema.view`
    /// → the name of that column in the view.
    pub view_tenants: HashMap<String, String>,
    /// Policy tables whose schema does not match the policy → the problem:
    /// writes to them are refused.
    pub unwritable: HashMap<String, String>,
    /// Partitions and inheritance children of policy tables → their policy
    /// table: statements that name them are refused.
    pub children: HashMap<String, String>,
    /// Policy tables with a column whose type reads a literal otherwise
    /// than a parameter (an interval with fields or precision, a domain):
    /// their simple-query writes keep their literals in the SQL text.
    pub literal_sensitive: std::collections::HashSet<String>,
    /// Policy tables whose rows may lack a blind index (in transition from
    /// legacy plaintext): equality lookups on them are not answered.
    pub unindexed: std::collections::HashSet<String>,
    /// Searchable columns (`schema.table.column`) whose every value has its
    /// blind index, as a validated CHECK constraint proves: the only ones
    /// equality lookups are answered on.
    pub indexed_columns: std::collections::HashSet<String>,
}

/// What the analysis protects: the policy tables and the views over them.
pub(super) struct Scope<'a> {
    pub(super) policy: &'a Policy,
    pub(super) views: &'a HashMap<String, Vec<String>>,
    pub(super) view_tenants: &'a HashMap<String, String>,
    pub(super) children: &'a HashMap<String, String>,
    pub(super) unindexed: &'a std::collections::HashSet<String>,
    pub(super) indexed_columns: &'a std::collections::HashSet<String>,
    unwritable: &'a HashMap<String, String>,
}

impl<'a> Scope<'a> {
    pub(super) fn new(policy: &'a Policy, facts: &'a SchemaFacts) -> Self {
        Self {
            policy,
            views: &facts.views,
            view_tenants: &facts.view_tenants,
            children: &facts.children,
            unindexed: &facts.unindexed,
            indexed_columns: &facts.indexed_columns,
            unwritable: &facts.unwritable,
        }
    }
}

/// Analyzes `sql` against the policy alone (schema facts unknown).
pub fn analyze(policy: &Policy, sql: &str, client_params: usize) -> Result<Analysis, Rejection> {
    analyze_in(policy, &SchemaFacts::default(), sql, client_params)
}

/// Analyzes `sql`. `client_params` is the number of parameters the client
/// declared or uses (added placeholders are numbered after them); `views`
/// are treated like their protected tables for reads and refused for writes.
pub fn analyze_in(
    policy: &Policy,
    facts: &SchemaFacts,
    sql: &str,
    client_params: usize,
) -> Result<Analysis, Rejection> {
    analyze_with(policy, facts, sql, client_params, true)
}

/// [`analyze_in`]; `lookups`: equality lookups on searchable columns are
/// rewritten to the blind index first (off for the rewritten SQL itself).
pub(super) fn analyze_with(
    policy: &Policy,
    facts: &SchemaFacts,
    sql: &str,
    client_params: usize,
    lookups: bool,
) -> Result<Analysis, Rejection> {
    // No early return for a policy without tables: while every policy
    // table is legacy (docs/ADOPTING.md) the analysis still counts the
    // parameters and follows the session's tenant.
    let scope = Scope::new(policy, facts);
    // PostgreSQL's reading first: it decides whether the statement needs
    // the proxy at all, and sqlparser's plan must agree with it.
    let reading = PgReading::of(sql);
    if let Some(reading) = &reading {
        if reading.depth() > MAX_DEPTH {
            return Err(Rejection::unsupported(
                mentions_protected(&scope, sql).as_deref().unwrap_or(""),
                None,
                &format!("SQL nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        if let Some(copy) = super::copy::copy_of(&scope, facts, reading) {
            return copy.map(|plan| Analysis {
                statements: vec![StatementPlan::Copy(Box::new(plan))],
                client_params,
            });
        }
        if !(0..reading.len()).any(|i| needs_the_proxy(&scope, reading, i, sql)) {
            return Ok(Analysis {
                statements: reading
                    .classes()
                    .iter()
                    .map(|class| match class {
                        StatementClass::Ddl => StatementPlan::Ddl,
                        _ => StatementPlan::Untouched,
                    })
                    .collect(),
                client_params: client_params.max(super::lexer::max_param(sql)),
            });
        }
    }
    if super::lexer::call_nesting(sql).is_some_and(|n| n > MAX_CALL_NESTING) {
        return Err(Rejection::unsupported(
            mentions_protected(&scope, sql).as_deref().unwrap_or(""),
            None,
            &format!("SQL with function calls nested deeper than {MAX_CALL_NESTING} levels"),
        ));
    }
    let parsed = match &reading {
        // SQL that PostgreSQL's grammar rejects is read by the fallback
        // below, which refuses whatever may touch protected data.
        Some(_) => parse_bounded(sql).or_else(|()| {
            with_plain_comparisons(sql).map_or(Err(()), |plain| parse_bounded(&plain))
        }),
        None => Err(()),
    };
    let statements = match parsed {
        Ok(statements) => statements,
        Err(()) => {
            if has_unicode_escaped_name(sql) {
                // U&"..." can spell any name, a protected table or
                // set_config included, without the text showing it.
                return Err(Rejection::unsupported(
                    "",
                    None,
                    "SQL with a Unicode-escaped name (U&\"...\") that cmk-proxy cannot parse",
                ));
            }
            return match mentions_protected(&scope, sql) {
                Some(table) => Err(Rejection::unsupported(
                    &table,
                    None,
                    "SQL that cmk-proxy cannot parse (it may touch protected data)",
                )),
                // sqlparser does not know RESET: the tenant goes back to the
                // session's default. Checked after the refusals, so a reset
                // word cannot wave SQL that names protected data through.
                None => match reset_of_tenant(policy, sql) {
                    TenantReset::Reset => Ok(Analysis {
                        statements: vec![StatementPlan::SetTenant(TenantChange::reset(false))],
                        client_params,
                    }),
                    TenantReset::Unsure => Err(Rejection {
                        sqlstate: KM003,
                        table: None,
                        column: None,
                        message: format!(
                            "cmk-proxy: SQL that cmk-proxy cannot parse names the tenant setting {} (a RESET of it is supported only alone in its query string); the proxy must know the tenant",
                            policy.tenant.session_setting
                        ),
                    }),
                    TenantReset::Aborts(aborts) => Ok(Analysis {
                        statements: aborts
                            .into_iter()
                            .map(|abort| match abort {
                                true => StatementPlan::SetTenant(TenantChange::savepoint(
                                    SavepointOp::Rollback,
                                )),
                                false => StatementPlan::Untouched,
                            })
                            .collect(),
                        client_params,
                    }),
                    TenantReset::PrepareTransaction => Err(Rejection::unsupported(
                        "",
                        None,
                        "PREPARE TRANSACTION (the proxy cannot follow the session's tenant through it)",
                    )),
                    TenantReset::No => Ok(Analysis {
                        statements: vec![StatementPlan::Untouched],
                        client_params,
                    }),
                },
            };
        }
    };
    let params = client_params.max(max_placeholder(&statements));
    if let Some(reading) = &reading {
        disagreement(&scope, reading, &statements, sql)?;
    }
    if lookups {
        if let Some(analysis) =
            super::lookup::analyze_lookups(policy, facts, &scope, &statements, params)?
        {
            return Ok(analysis);
        }
    }
    let mut plans: Vec<StatementPlan> = statements
        .iter()
        .map(|s| plan_statement(&scope, s.clone(), params))
        .collect::<Result<_, _>>()?;
    // A rename or move to another schema changes what names mean: the
    // catalog is reloaded after it, like after DDL.
    if let Some(reading) = &reading {
        for (index, plan) in plans.iter_mut().enumerate() {
            let renames = matches!(
                reading.statement(index),
                Some(NodeEnum::RenameStmt(_) | NodeEnum::AlterObjectSchemaStmt(_))
            );
            if renames && matches!(plan, StatementPlan::Untouched) {
                *plan = StatementPlan::Ddl;
            }
        }
    }
    // A protected value may reach the client only as a bare column,
    // whatever alias it travels under: its lineage is followed through
    // PostgreSQL's own tree of each statement that touches protected data.
    // A read of protected columns gets their rows' tenant columns added.
    if let Some(reading) = &reading {
        for (index, plan) in plans.iter_mut().enumerate() {
            if matches!(
                plan,
                StatementPlan::Read | StatementPlan::Write(_) | StatementPlan::Ddl
            ) {
                let Some(tree) = reading.statement_tree(index) else {
                    continue;
                };
                let attached = super::lineage::check(&scope, &tree)?;
                if attached.is_empty() || !matches!(plan, StatementPlan::Read) {
                    continue;
                }
                let statement = statements
                    .get(index)
                    .and_then(|s| super::row_tenant::with_row_tenants(s, &attached))
                    .ok_or_else(|| {
                        Rejection::unsupported(
                            mentions_protected(&scope, sql).as_deref().unwrap_or(""),
                            None,
                            "a read whose rows' tenant cmk-proxy cannot add to the result",
                        )
                    })?;
                *plan = StatementPlan::ReadRowTenants(Box::new(super::row_tenant::RowTenantRead {
                    sql: statement.to_string(),
                    statement,
                    hidden: attached.len(),
                }));
            }
        }
    }
    // The catalog (which views show protected columns, which tables are
    // writable) is reloaded after the query: statements after DDL on
    // protected data would be planned against the old one.
    if let Some(ddl) = plans.iter().position(|p| matches!(p, StatementPlan::Ddl)) {
        // COMMIT and the like may follow: they plan nothing.
        let plans_nothing = |index: usize| {
            reading
                .as_ref()
                .is_some_and(|r| matches!(r.statement(index), Some(NodeEnum::TransactionStmt(_))))
        };
        if plans
            .iter()
            .enumerate()
            .skip(ddl + 1)
            .any(|(index, p)| !matches!(p, StatementPlan::Ddl) && !plans_nothing(index))
        {
            if let Some(table) = mentions_protected(&scope, sql) {
                return Err(Rejection::unsupported(
                    &table,
                    None,
                    "a statement after DDL on protected data in the same query (send it on its own, after the DDL)",
                ));
            }
        }
    }
    // sqlparser reads U&"..." in an expression as `U & "..."`: the name it
    // spells (a protected column, say) goes unseen.
    if has_unicode_escaped_name(sql) && plans.iter().any(|p| !matches!(p, StatementPlan::Untouched))
    {
        return Err(Rejection::unsupported(
            "",
            None,
            "a Unicode-escaped name (U&\"...\") in a statement on protected data",
        ));
    }
    Ok(Analysis {
        statements: plans,
        client_params: params,
    })
}

fn max_placeholder(statements: &[Statement]) -> usize {
    statements
        .iter()
        .flat_map(placeholder_uses)
        .max()
        .unwrap_or(0)
}

/// Every use of a `$n` placeholder in the statement, in order.
pub(crate) fn placeholder_uses(statement: &Statement) -> Vec<usize> {
    let mut uses = Vec::new();
    let _ = visit_expressions(statement, |expr| {
        uses.extend(super::write::placeholder_number(expr));
        ControlFlow::<()>::Continue(())
    });
    uses
}

/// Protected tables (policy keys) and views over them that the statement
/// refers to anywhere.
fn protected_tables(scope: &Scope<'_>, statement: &Statement) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let _ = visit_relations(statement, |name: &ObjectName| {
        if let Some((key, _)) = policy_table(scope.policy, name) {
            found.insert(key.to_owned());
        } else if let Some(view) = protected_view(scope, name) {
            found.insert(view);
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// The protected view an object name refers to.
fn protected_view(scope: &Scope<'_>, name: &ObjectName) -> Option<String> {
    let key = relation_key(name)?;
    if scope.views.contains_key(&key) {
        return Some(key);
    }
    // Like tables: an unqualified name may find the view on search_path.
    let bare = unqualified(name)?;
    let found = keys_named(scope.views.keys(), &bare).next().cloned();
    found
}

fn plan_statement(
    scope: &Scope<'_>,
    statement: Statement,
    params: usize,
) -> Result<StatementPlan, Rejection> {
    let policy = scope.policy;
    if let Some(tenant) = tenant_setting(policy, &statement) {
        return tenant.map(StatementPlan::SetTenant);
    }
    if let Some(plan) = super::set_config::set_config_plan(policy, &statement)? {
        return Ok(plan);
    }
    if let Statement::Copy {
        source: sqlparser::ast::CopySource::Table { table_name, .. },
        ..
    } = &statement
    {
        if let Some((table, _)) = policy_table(policy, table_name) {
            // A COPY alone in its query string is planned from PostgreSQL's
            // reading (rewrite/copy.rs); one among others is refused.
            return Err(Rejection::unsupported(
                table,
                None,
                "COPY in a query string with other statements",
            ));
        }
    }
    if matches!(
        statement,
        Statement::CreateFunction(_) | Statement::CreateProcedure { .. }
    ) {
        // PostgreSQL runs the body where the proxy cannot see it: a body
        // that names a protected table could store plaintext there.
        let text = statement.to_string();
        if let Some(table) = mentions_policy_table(policy, &text) {
            return Err(Rejection::unsupported(
                &table,
                None,
                "a function or procedure whose body names a protected table",
            ));
        }
        // A body that sets the tenant would change it where the proxy
        // cannot follow (SELECT f() leaves the server on another tenant).
        if names_tenant_setting(policy, &text) {
            return Err(tenant_setting_unseen(
                policy,
                "a function or procedure whose body",
            ));
        }
    }
    if let Statement::AlterTable {
        name, operations, ..
    } = &statement
    {
        if let Some((table, table_policy)) = policy_table(policy, name) {
            for operation in operations {
                if let sqlparser::ast::AlterTableOperation::AlterColumn {
                    column_name,
                    op: sqlparser::ast::AlterColumnOperation::SetDefault { .. },
                } = operation
                {
                    let column = ident_name(column_name);
                    if table_policy.columns.contains_key(&column) {
                        return Err(Rejection::unsupported(
                            table,
                            Some(&column),
                            "a DEFAULT (the server would store it unencrypted)",
                        ));
                    }
                }
            }
        }
    }
    if updates_pg_settings(&statement) {
        // Any setting may change, the tenant's included, to a value the
        // proxy would have to evaluate: refused (SET does the same).
        return Err(tenant_setting_unseen(policy, "UPDATE pg_settings"));
    }
    let tables = protected_tables(scope, &statement);
    let mut ambiguous = None;
    let _ = visit_relations(&statement, |name: &ObjectName| {
        if ambiguous_table(policy, name) {
            ambiguous = Some(name.to_string());
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if let Some(name) = ambiguous {
        return Err(Rejection::unsupported(
            &name,
            None,
            "an unqualified name that matches policy tables in several schemas (qualify it)",
        ));
    }
    if has_nested_write(&statement) {
        if let Some(table) = tables
            .iter()
            .next()
            .cloned()
            .or_else(|| mentions_protected(scope, &statement.to_string()))
        {
            return Err(Rejection::unsupported(
                &table,
                None,
                "a data-modifying statement inside a query (WITH ... INSERT/UPDATE/DELETE)",
            ));
        }
    }
    if let Some(refusal) = super::ddl::ddl_refusal(policy, &statement) {
        return Err(refusal);
    }
    match &statement {
        Statement::CreateTable(_)
        | Statement::AlterTable { .. }
        | Statement::Drop { .. }
        | Statement::CreateView { .. }
        | Statement::CreateSchema { .. } => return Ok(StatementPlan::Ddl),
        _ => {}
    }
    // DDL on a partition is the DBA's; anything else naming one is refused.
    let mut child = None;
    let _ = visit_relations(&statement, |name: &ObjectName| {
        // An unqualified name may reach a child in any schema on the
        // search_path, like a policy table's.
        child = relation_key(name)
            .filter(|key| scope.children.contains_key(key))
            .or_else(|| {
                // A name that is a policy table is that table (schema-per-
                // tenant children may share its bare name).
                if policy_table(policy, name).is_some() {
                    return None;
                }
                let bare = unqualified(name)?;
                let key = keys_named(scope.children.keys(), &bare).next().cloned();
                key
            });
        match child {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    });
    if let Some(child) = child {
        let parent = scope.children.get(&child).cloned().unwrap_or_default();
        return Err(Rejection::unsupported(
            &parent,
            None,
            &format!("naming {child}, a partition or child table of it, directly (use {parent})"),
        ));
    }
    if tables.is_empty() {
        return Ok(StatementPlan::Untouched);
    }
    whole_row_refusal(scope, &statement)?;
    match &statement {
        Statement::Copy { .. } => {
            let table = tables.iter().next().cloned().unwrap_or_default();
            Err(Rejection::unsupported(
                &table,
                None,
                "COPY in a query string with other statements",
            ))
        }
        Statement::Insert(insert) => {
            let target = match &insert.table {
                sqlparser::ast::TableObject::TableName(name) => {
                    view_write_refusal(scope, name)?;
                    policy_table(policy, name)
                }
                _ => None,
            };
            if let Some(source) = &insert.source {
                check_query(scope, &tables, source)?;
            }
            // RETURNING is read like a SELECT list, and an ON CONFLICT
            // condition like a WHERE (its SET values are planned below).
            let mut rest = insert.clone();
            rest.source = None;
            strip_items(rest.returning.as_mut());
            if let Some(sqlparser::ast::OnInsert::OnConflict(conflict)) = &mut rest.on {
                if let sqlparser::ast::OnConflictAction::DoUpdate(update) = &mut conflict.action {
                    update.assignments.clear();
                }
            }
            find_protected_use(scope, &tables, &Statement::Insert(rest))?;
            match target {
                Some((table, table_policy)) => {
                    unwritable_refusal(scope, table)?;
                    match plan_insert(table, table_policy, statement.clone(), params)? {
                        Some(plan) => Ok(StatementPlan::Write(Box::new(plan))),
                        None => Ok(StatementPlan::Read),
                    }
                }
                None => Ok(StatementPlan::Read),
            }
        }
        Statement::Update { table, .. } => {
            check_filters(scope, &tables, &statement)?;
            let target = match &table.relation {
                sqlparser::ast::TableFactor::Table { name, .. } => {
                    view_write_refusal(scope, name)?;
                    policy_table(policy, name)
                }
                _ => None,
            };
            match target {
                Some((name, table_policy)) => {
                    unwritable_refusal(scope, name)?;
                    match plan_update(name, table_policy, statement.clone(), params)? {
                        Some(plan) => Ok(StatementPlan::Write(Box::new(plan))),
                        None => Ok(StatementPlan::Read),
                    }
                }
                None => Ok(StatementPlan::Read),
            }
        }
        Statement::Query(query) => {
            check_query(scope, &tables, query)?;
            Ok(StatementPlan::Read)
        }
        Statement::Delete(_) => {
            check_filters(scope, &tables, &statement)?;
            Ok(StatementPlan::Read)
        }
        // EXPLAIN ANALYZE runs its statement; even a plain EXPLAIN sends
        // the statement's values to the server (and its log).
        Statement::Explain { statement, .. } => {
            match plan_statement(scope, (**statement).clone(), params)? {
                StatementPlan::Untouched | StatementPlan::Read => Ok(StatementPlan::Read),
                _ => {
                    let table = tables.iter().next().cloned().unwrap_or_default();
                    Err(Rejection::unsupported(&table, None, "EXPLAIN of a write"))
                }
            }
        }
        Statement::Declare { stmts } => {
            for query in stmts.iter().filter_map(|d| d.for_query.as_deref()) {
                check_query(scope, &tables, query)?;
            }
            Ok(StatementPlan::Read)
        }
        _ => {
            let table = tables.iter().next().cloned().unwrap_or_default();
            Err(Rejection::unsupported(
                &table,
                None,
                "this kind of statement",
            ))
        }
    }
}

/// Protected column names of the given tables and views, with their relation.
fn protected_columns<'p>(scope: &Scope<'p>, tables: &BTreeSet<String>) -> Vec<(&'p str, &'p str)> {
    let of_tables = tables
        .iter()
        .filter_map(|t| scope.policy.tables.get_key_value(t))
        .flat_map(|(t, p)| p.columns.keys().map(move |c| (t.as_str(), c.as_str())));
    let of_views = tables
        .iter()
        .filter_map(|v| scope.views.get_key_value(v))
        .flat_map(|(v, cols)| cols.iter().map(move |c| (v.as_str(), c.as_str())));
    of_tables.chain(of_views).collect()
}

fn column_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(i) => Some(ident_name(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(ident_name),
        _ => None,
    }
}
