//! `set_config('<tenant setting>', …)`: the function form of `SET`, which
//! applications use to set the tenant for row-level security. The proxy
//! must follow every change of the tenant setting (it seals writes under
//! the session tenant), so the one form it can follow is recognized and
//! every other call that names the setting is refused.

use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, SelectItem, SetExpr,
    Statement, Value,
};

use super::analyze::{StatementPlan, TenantChange};
use super::names::ident_name;
use super::{Rejection, KM003};
use crate::config::Policy;

/// The plan of `SELECT set_config('<setting>', '<tenant>' | $n,
/// true|false)` (literal name and flag, nothing else in the statement);
/// `Ok(None)` when the statement does not name the setting in a
/// `set_config` call; `Err` (KM003) for any other call that does.
pub(super) fn set_config_plan(
    policy: &Policy,
    statement: &Statement,
) -> Result<Option<StatementPlan>, Rejection> {
    let setting = policy.tenant.session_setting.to_lowercase();
    let mut calls = 0usize;
    let mut seen = 0usize;
    let mut unknown_name = false;
    let _ = visit_expressions(statement, |expr| {
        if let Some(args) = set_config_args(expr) {
            seen += 1;
            match literal_text(args.first()) {
                Some(name) if name.to_lowercase() == setting => calls += 1,
                Some(_) => {}
                // E'..', a cast, a parameter, an expression: any setting.
                None => unknown_name = true,
            }
        }
        ControlFlow::<()>::Continue(())
    });
    // set_config as a table function (`SELECT * FROM set_config(…)`) is
    // not an expression: a call the walk above did not see is refused.
    let written = statement
        .to_string()
        .to_lowercase()
        .matches("set_config(")
        .count();
    if written > seen {
        unknown_name = true;
    }
    if unknown_name && names_one_other_setting(statement, &setting) {
        unknown_name = false;
    }
    if unknown_name {
        return Err(Rejection {
            sqlstate: KM003,
            table: None,
            column: None,
            message: "cmk-proxy: set_config whose setting name is not a plain string literal \
                      is not supported (it may be the tenant setting, which the proxy must follow)"
                .to_owned(),
        });
    }
    if calls == 0 {
        return Ok(None);
    }
    match only_call(statement).and_then(|args| change_of(args, &setting)) {
        Some(plan) if calls == 1 => Ok(Some(plan)),
        _ => Err(Rejection {
            sqlstate: KM003,
            table: None,
            column: None,
            message: format!(
                "cmk-proxy: set_config of {setting} is supported only as SELECT set_config('{setting}', '<tenant>' or $1, false|true) and nothing else in the statement (the proxy must know the tenant): use that form or SET {setting}"
            ),
        }),
    }
}

/// `SELECT set_config(name, '…', false|true) FROM [pg_catalog.]pg_settings
/// WHERE name = '<setting>'` for a setting other than the tenant's: how
/// pg_dump sets `restrict_nonsystem_relation_kind`. Its name column can
/// only be the one setting the WHERE names.
fn names_one_other_setting(statement: &Statement, tenant_setting: &str) -> bool {
    let Statement::Query(query) = statement else {
        return false;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    if query.with.is_some() || select.from.len() != 1 || !select.from[0].joins.is_empty() {
        return false;
    }
    let sqlparser::ast::TableFactor::Table {
        name, args: None, ..
    } = &select.from[0].relation
    else {
        return false;
    };
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(ident_name))
        .collect();
    if !matches!(parts.as_slice(), [t] | [_, t] if t == "pg_settings")
        || parts.len() == 2 && parts[0] != "pg_catalog"
    {
        return false;
    }
    let args = match select.projection.as_slice() {
        [SelectItem::UnnamedExpr(expr)] | [SelectItem::ExprWithAlias { expr, .. }] => {
            set_config_args(expr)
        }
        _ => None,
    };
    let name_column = |e: &Expr| matches!(e, Expr::Identifier(i) if ident_name(i) == "name");
    let Some([first, _, _]) = args else {
        return false;
    };
    if !argument(first).is_some_and(name_column) {
        return false;
    }
    match &select.selection {
        Some(Expr::BinaryOp {
            left,
            op: sqlparser::ast::BinaryOperator::Eq,
            right,
        }) if name_column(left) => match right.as_ref() {
            Expr::Value(v) => matches!(
                &v.value,
                Value::SingleQuotedString(other) if other.to_lowercase() != tenant_setting
            ),
            _ => false,
        },
        _ => false,
    }
}

/// The arguments of a `set_config(…)` call.
fn set_config_args(expr: &Expr) -> Option<&[FunctionArg]> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let name = function.name.0.last()?.as_ident().map(ident_name)?;
    if name != "set_config" {
        return None;
    }
    match &function.args {
        FunctionArguments::List(list) => Some(&list.args),
        _ => None,
    }
}

/// The arguments of the call when the statement is exactly
/// `SELECT set_config(…) [AS alias]`.
fn only_call(statement: &Statement) -> Option<&[FunctionArg]> {
    let Statement::Query(query) = statement else {
        return None;
    };
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    if !select.from.is_empty() || select.selection.is_some() || select.having.is_some() {
        return None;
    }
    match select.projection.as_slice() {
        [SelectItem::UnnamedExpr(expr)] | [SelectItem::ExprWithAlias { expr, .. }] => {
            set_config_args(expr)
        }
        _ => None,
    }
}

/// The plan of `set_config('<setting>', '<tenant>' | $n, <is_local>)`.
fn change_of(args: &[FunctionArg], setting: &str) -> Option<StatementPlan> {
    let [name, value, local] = args else {
        return None;
    };
    if literal_text(Some(name))?.to_lowercase() != setting {
        return None;
    }
    let local = match argument(local)? {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => *b,
            _ => return None,
        },
        _ => return None,
    };
    if let Some(Expr::Value(v)) = argument(value) {
        if let Value::Placeholder(p) = &v.value {
            let param = p.strip_prefix('$')?.parse().ok().filter(|n| *n > 0)?;
            return Some(StatementPlan::SetTenantParam { param, local });
        }
    }
    if let Some(Expr::Value(v)) = argument(value) {
        if matches!(v.value, Value::Null) {
            // NULL resets the setting to the session's default.
            return Some(StatementPlan::SetTenant(TenantChange::reset(local)));
        }
    }
    let tenant = literal_text(Some(value))?;
    // An empty value clears the setting: no tenant.
    Some(StatementPlan::SetTenant(TenantChange::to(
        (!tenant.is_empty()).then(|| tenant.to_owned()),
        local,
    )))
}

fn argument(arg: &FunctionArg) -> Option<&Expr> {
    match arg {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Some(expr),
        _ => None,
    }
}

/// The text of a single-quoted string literal argument.
fn literal_text(arg: Option<&FunctionArg>) -> Option<&str> {
    match argument(arg?)? {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse_policy;
    use crate::rewrite::{analyze, StatementPlan, KM003};

    #[test]
    fn pg_dumps_set_config_of_one_named_setting_passes_and_the_tenants_does_not() {
        let policy = parse_policy("tenant:\n  session_setting: cmk.tenant_id\n", "test").unwrap();
        let dump = "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
                    WHERE name = 'restrict_nonsystem_relation_kind'";
        let analysis = analyze(&policy, dump, 0).unwrap();
        assert!(matches!(
            analysis.statements[..],
            [StatementPlan::Untouched]
        ));
        for sql in [
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'cmk.tenant_id'",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name LIKE 'cmk%'",
            "SELECT set_config(name, 'x', false) FROM pg_settings",
        ] {
            assert_eq!(
                analyze(&policy, sql, 0).unwrap_err().sqlstate,
                KM003,
                "{sql}"
            );
        }
    }
}
