//! Statements refused whatever their plan: whole rows of protected tables,
//! writes through views or to unwritable tables, escapes PostgreSQL reads
//! differently, writes nested where the proxy cannot plan them.

use super::*;

/// The names under which protected tables appear as rows in a statement
/// (their alias, else their name), with the table.
pub(super) struct RowNames<'s, 'p> {
    scope: &'s Scope<'p>,
    names: Vec<(String, String)>,
}

impl Visitor for RowNames<'_, '_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, alias, .. } = factor {
            let table = policy_table(self.scope.policy, name)
                .map(|(key, _)| key.to_owned())
                .or_else(|| protected_view(self.scope, name));
            if let Some(table) = table {
                let row = match alias {
                    Some(alias) => ident_name(&alias.name),
                    None => last_name(name).unwrap_or_default(),
                };
                self.names.push((row, table));
            }
        }
        ControlFlow::Continue(())
    }
}

/// A whole-row reference to a protected table (`SELECT t FROM patients t`,
/// `row_to_json(t)`, `t::text`) would carry its ciphertext and EDEK out as
/// one composite value the proxy cannot open: refused.
pub(super) fn whole_row_refusal(scope: &Scope<'_>, statement: &Statement) -> Result<(), Rejection> {
    let mut rows = RowNames {
        scope,
        names: Vec::new(),
    };
    let _ = statement.visit(&mut rows);
    if rows.names.is_empty() {
        return Ok(());
    }
    let mut hit = None;
    let _ = visit_expressions(statement, |expr| {
        // `p` alone, or `p.*` anywhere but the SELECT list
        // (`row_to_json(p.*)`, `ROW(p.*)`): the row as one value.
        let mut names = Vec::new();
        match expr {
            Expr::Identifier(ident) => names.push(ident_name(ident)),
            Expr::QualifiedWildcard(prefix, _) => names.extend(last_name(prefix)),
            Expr::Function(function) => {
                if let sqlparser::ast::FunctionArguments::List(list) = &function.args {
                    for arg in &list.args {
                        let (sqlparser::ast::FunctionArg::Unnamed(arg)
                        | sqlparser::ast::FunctionArg::Named { arg, .. }
                        | sqlparser::ast::FunctionArg::ExprNamed { arg, .. }) = arg;
                        if let sqlparser::ast::FunctionArgExpr::QualifiedWildcard(prefix) = arg {
                            names.extend(last_name(prefix));
                        }
                    }
                }
            }
            _ => {}
        }
        for name in names {
            if let Some((_, table)) = rows.names.iter().find(|(row, _)| *row == name) {
                hit = Some(table.clone());
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    match hit {
        Some(table) => Err(Rejection::unsupported(
            &table,
            None,
            "a whole-row reference (the row as one value)",
        )),
        None => Ok(()),
    }
}

/// A write to a table whose live schema does not match the policy (a
/// protected column not bytea, or with a DEFAULT, a missing EDEK column …).
pub(super) fn unwritable_refusal(scope: &Scope<'_>, table: &str) -> Result<(), Rejection> {
    match scope.unwritable.get(table) {
        Some(problem) => Err(Rejection {
            sqlstate: super::KM003,
            table: Some(table.to_owned()),
            column: None,
            message: format!(
                "cmk-proxy: writing to protected table {table} is refused while its schema does not match the policy: {problem} (see cmk-proxy check-config --live)"
            ),
        }),
        None => Ok(()),
    }
}

/// A write whose target is a view over protected columns: the proxy plans
/// writes to the tables themselves only.
pub(super) fn view_write_refusal(scope: &Scope<'_>, name: &ObjectName) -> Result<(), Rejection> {
    match protected_view(scope, name) {
        Some(view) => Err(Rejection::unsupported(
            &view,
            scope
                .views
                .get(&view)
                .and_then(|c| c.first())
                .map(String::as_str),
            "writing through a view of protected columns (write to its table)",
        )),
        None => Ok(()),
    }
}

/// The policy table or protected view whose name `sql` contains anywhere
/// (for SQL that did not parse, and text the parser does not look into).
pub(in crate::rewrite) fn mentions_protected(scope: &Scope<'_>, sql: &str) -> Option<String> {
    mentions_policy_table(scope.policy, sql).or_else(|| mentioned_key(scope.views.keys(), sql))
}

/// With `standard_conforming_strings = off` a backslash in a string literal
/// escapes, and the parser (which reads strings the standard way) may see
/// other statement boundaries than PostgreSQL: SQL with a backslash that
/// names a protected table or view, the tenant setting, `set_config` or
/// `pg_settings` is refused.
pub fn nonstandard_strings_refusal(
    policy: &Policy,
    facts: &SchemaFacts,
    sql: &str,
) -> Option<Rejection> {
    if !sql.contains('\\') || policy.tables.is_empty() {
        return None;
    }
    let scope = Scope::new(policy, facts);
    // `U&"…"` can spell a protected name the text search does not find.
    let named = mentions_protected(&scope, sql).or_else(|| {
        (names_tenant_setting(policy, sql) || has_unicode_escape(sql)).then(String::new)
    })?;
    let mut rejection = Rejection::unsupported(
        &named,
        None,
        "a backslash in SQL while standard_conforming_strings is off",
    );
    if named.is_empty() {
        rejection.table = None;
        rejection.message = "cmk-proxy: a backslash in SQL that names the tenant setting, \
                             set_config or pg_settings, or holds a Unicode escape (U&), \
                             is not supported while standard_conforming_strings is off"
            .to_owned();
    }
    Some(rejection)
}

/// `U&"..."`: a quoted name written with Unicode escapes.
pub(super) fn has_unicode_escaped_name(sql: &str) -> bool {
    sql.as_bytes()
        .windows(3)
        .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&' && w[2] == b'"')
}

/// An INSERT, UPDATE, DELETE or MERGE inside a query (`WITH c AS (INSERT
/// ...) SELECT ...`, `WITH c AS (...) UPDATE ...` parsed as a query).
pub(super) fn has_nested_write(statement: &Statement) -> bool {
    struct NestedWrites(bool);
    impl Visitor for NestedWrites {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if writes(&query.body) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    fn writes(body: &SetExpr) -> bool {
        match body {
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                true
            }
            SetExpr::SetOperation { left, right, .. } => writes(left) || writes(right),
            SetExpr::Query(query) => writes(&query.body),
            _ => false,
        }
    }
    let mut found = NestedWrites(false);
    let _ = statement.visit(&mut found);
    found.0
}
