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
