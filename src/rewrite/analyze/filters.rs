//! Conditions and expressions on protected columns: refused, except bare
//! columns in SELECT lists (decrypted in the results).

use super::*;

/// Any expression that mentions a protected column is refused, except bare
/// column references in SELECT lists (their results are decrypted).
pub(super) fn check_query(
    scope: &Scope<'_>,
    tables: &BTreeSet<String>,
    query: &Query,
) -> Result<(), Rejection> {
    let mut stripped = query.clone();
    strip_bare_projections(&mut stripped.body);
    if let Some(with) = &mut stripped.with {
        for cte in &mut with.cte_tables {
            strip_bare_projections(&mut cte.query.body);
        }
    }
    find_protected_use(scope, tables, &Statement::Query(Box::new(stripped)))
}

pub(super) fn check_filters(
    scope: &Scope<'_>,
    tables: &BTreeSet<String>,
    statement: &Statement,
) -> Result<(), Rejection> {
    let mut stripped = statement.clone();
    match &mut stripped {
        Statement::Update {
            assignments,
            returning,
            ..
        } => {
            // SET values of protected columns are planned by the write
            // planner; other columns' values must not read protected ones
            // (they would copy ciphertext where nothing decrypts it).
            // RETURNING lists are read like SELECT lists.
            let protected: Vec<&str> = protected_columns(scope, tables)
                .into_iter()
                .map(|(_, column)| column)
                .collect();
            assignments.retain(|a| match &a.target {
                sqlparser::ast::AssignmentTarget::ColumnName(name) => {
                    last_name(name).is_none_or(|n| !protected.contains(&n.as_str()))
                }
                sqlparser::ast::AssignmentTarget::Tuple(_) => true,
            });
            strip_items(returning.as_mut());
        }
        Statement::Delete(delete) => strip_items(delete.returning.as_mut()),
        _ => {}
    }
    find_protected_use(scope, tables, &stripped)
}

pub(super) fn strip_items(items: Option<&mut Vec<SelectItem>>) {
    if let Some(items) = items {
        items.retain(|item| !is_bare_column(item));
    }
}

pub(super) fn is_bare_column(item: &SelectItem) -> bool {
    match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
            matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
        }
        _ => false,
    }
}

pub(super) fn strip_bare_projections(body: &mut SetExpr) {
    match body {
        SetExpr::Select(select) => strip_select(select),
        SetExpr::Query(query) => strip_bare_projections(&mut query.body),
        SetExpr::SetOperation { left, right, .. } => {
            strip_bare_projections(left);
            strip_bare_projections(right);
        }
        _ => {}
    }
}

pub(super) fn strip_select(select: &mut Select) {
    select.projection.retain(|item| !is_bare_column(item));
    if select.projection.is_empty() {
        select
            .projection
            .push(SelectItem::UnnamedExpr(Expr::value(Value::Null)));
    }
}

pub(super) fn find_protected_use(
    scope: &Scope<'_>,
    tables: &BTreeSet<String>,
    statement: &Statement,
) -> Result<(), Rejection> {
    let columns = protected_columns(scope, tables);
    let mut hit: Option<(String, String)> = None;
    // `col IS [NOT] NULL` reveals null-ness, visible anyway.
    let mut null_tested: Vec<*const Expr> = Vec::new();
    let _ = visit_expressions(statement, |expr| {
        if let Expr::IsNull(inner) | Expr::IsNotNull(inner) = expr {
            if column_name(inner).is_some() {
                null_tested.push(&**inner);
            }
        }
        if null_tested.contains(&(expr as *const Expr)) {
            return ControlFlow::Continue(());
        }
        if let Some(name) = column_name(expr) {
            if let Some((table, column)) = columns.iter().find(|(_, c)| *c == name) {
                hit = Some((table.to_string(), column.to_string()));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    match hit {
        Some((table, column)) => Err(Rejection::unsupported(
            &table,
            Some(&column),
            "a condition, ordering, grouping, function or expression",
        )),
        None => Ok(()),
    }
}
