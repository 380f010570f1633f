//! Statements that set, reset or read the tenant setting behind the
//! proxy's back, and what the proxy makes of them.

use super::*;

/// What SQL that did not parse does to the tenant setting.
pub(super) enum TenantReset {
    /// Nothing.
    No,
    /// `RESET <tenant setting>` or `RESET ALL`, alone in its query string.
    Reset,
    /// A reset among other statements, or SQL that cannot be tokenized and
    /// says RESET: the proxy cannot tell what the server ends with.
    Unsure,
    /// Statements of which some are `ABORT [WORK | TRANSACTION] [AND [NO]
    /// CHAIN]` (`true`), which sqlparser does not know: ROLLBACKs, whose
    /// tags the tenant tracking must match, in order.
    Aborts(Vec<bool>),
    /// `PREPARE TRANSACTION`: ends the transaction in a way the tenant
    /// tracking does not follow.
    PrepareTransaction,
}

/// Finds `RESET <tenant setting>` / `RESET ALL` in SQL that did not parse
/// (and names no protected data), with sqlparser's tokenizer: comments and
/// string literals are read as PostgreSQL reads them, quoted names too.
pub(super) fn reset_of_tenant(policy: &Policy, sql: &str) -> TenantReset {
    use sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return if sql.to_lowercase().contains("reset") || names_tenant_setting(policy, sql) {
            TenantReset::Unsure
        } else {
            TenantReset::No
        };
    };
    // Dotted names joined (`cmk . tenant_id` is one name), whitespace and
    // comments dropped; statements split at `;`.
    let mut statements: Vec<Vec<String>> = vec![Vec::new()];
    let mut joining = false;
    for token in tokens {
        match token {
            Token::Whitespace(_) => {}
            Token::SemiColon => {
                statements.push(Vec::new());
                joining = false;
            }
            Token::Period => joining = true,
            other => {
                let word = match &other {
                    Token::Word(w) => w.value.to_lowercase(),
                    _ => other.to_string(),
                };
                let Some(current) = statements.last_mut() else {
                    continue;
                };
                match current.last_mut() {
                    Some(last) if joining => {
                        last.push('.');
                        last.push_str(&word);
                    }
                    _ => current.push(word),
                }
                joining = false;
            }
        }
    }
    statements.retain(|s| !s.is_empty());
    let setting = policy.tenant.session_setting.to_lowercase();
    let resets = |words: &Vec<String>| {
        words
            .windows(2)
            .any(|w| w[0] == "reset" && (w[1] == "all" || w[1] == setting))
    };
    // Another statement that may touch the setting: which one wins?
    let touches = |words: &Vec<String>| {
        words.iter().any(|w| {
            *w == setting
                || w.ends_with(&format!("'{setting}'"))
                || w == "set_config"
                || w == "pg_settings"
        })
    };
    let resetting = statements.iter().filter(|s| resets(s)).count();
    let others = statements.iter().filter(|s| !resets(s));
    let aborts: Vec<bool> = statements.iter().map(|s| is_abort(s)).collect();
    match resetting {
        // SQL the parser cannot read that names the setting may set it
        // (a DO block's body too).
        0 if names_tenant_setting(policy, sql) => TenantReset::Unsure,
        0 if statements
            .iter()
            .any(|s| s.len() >= 2 && s[0] == "prepare" && s[1] == "transaction") =>
        {
            TenantReset::PrepareTransaction
        }
        0 if aborts.contains(&true) => TenantReset::Aborts(aborts),
        0 => TenantReset::No,
        1 if !others.clone().any(touches) => TenantReset::Reset,
        _ => TenantReset::Unsure,
    }
}

/// True when `text` names the tenant setting, `set_config` or
/// `pg_settings` anywhere (inside strings and dollar-quoted bodies too).
pub(in crate::rewrite) fn names_tenant_setting(policy: &Policy, text: &str) -> bool {
    let lower = text.to_lowercase();
    [
        policy.tenant.session_setting.to_lowercase().as_str(),
        "set_config",
        "pg_settings",
    ]
    .iter()
    .any(|word| lower.contains(word))
}

/// The KM003 refusal of SQL whose change of the tenant setting the proxy
/// cannot follow.
pub(super) fn tenant_setting_unseen(policy: &Policy, what: &str) -> Rejection {
    Rejection {
        sqlstate: KM003,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: {what} names the tenant setting {} where the proxy cannot follow it (set the tenant with SET or set_config in SQL the proxy reads)",
            policy.tenant.session_setting
        ),
    }
}

/// `ABORT [WORK | TRANSACTION] [AND [NO] CHAIN]`, as lowercase words.
pub(super) fn is_abort(words: &[String]) -> bool {
    matches!(words.first().map(String::as_str), Some("abort"))
        && words[1..]
            .iter()
            .all(|w| matches!(w.as_str(), "work" | "transaction" | "and" | "no" | "chain"))
}

/// `UPDATE pg_settings ...`: PostgreSQL's other way to change a setting.
pub(super) fn updates_pg_settings(statement: &Statement) -> bool {
    let Statement::Update { table, .. } = statement else {
        return false;
    };
    let TableFactor::Table { name, .. } = &table.relation else {
        return false;
    };
    last_name(name).is_some_and(|n| n == "pg_settings")
}

/// Recognizes `SET [LOCAL] <tenant setting> = value` and `DISCARD ALL`;
/// `Err` (KM003) for a value the proxy cannot read as the server will.
pub(super) fn tenant_setting(
    policy: &Policy,
    statement: &Statement,
) -> Option<Result<TenantChange, Rejection>> {
    let savepoint = match statement {
        Statement::Discard {
            object_type: sqlparser::ast::DiscardObject::ALL,
        } => return Some(Ok(TenantChange::reset(false))),
        Statement::Savepoint { name } => Some(SavepointOp::Define(ident_name(name))),
        Statement::ReleaseSavepoint { name } => Some(SavepointOp::Release(ident_name(name))),
        Statement::Rollback {
            savepoint: Some(name),
            ..
        } => Some(SavepointOp::RollbackTo(ident_name(name))),
        Statement::Rollback {
            savepoint: None, ..
        } => Some(SavepointOp::Rollback),
        Statement::Commit { .. } => Some(SavepointOp::Commit),
        _ => None,
    };
    if let Some(op) = savepoint {
        return Some(Ok(TenantChange::savepoint(op)));
    }
    let Statement::Set(sqlparser::ast::Set::SingleAssignment {
        variable,
        values,
        scope,
        ..
    }) = statement
    else {
        return None;
    };
    let name: Vec<String> = variable
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(ident_name))
        .collect();
    // Setting names are case-insensitive, quoted or not.
    if name.join(".").to_lowercase() != policy.tenant.session_setting.to_lowercase() {
        return None;
    }
    let local = matches!(scope, Some(sqlparser::ast::ContextModifier::Local));
    if let [Expr::Identifier(i)] = values.as_slice() {
        if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default") {
            return Some(Ok(TenantChange::reset(local)));
        }
    }
    // The value as the server stores it: unquoted names fold to lower
    // case, integers lose leading zeros, an empty string is no tenant.
    let tenant = match values.as_slice() {
        [Expr::Value(v)] => match &v.value {
            Value::SingleQuotedString(s) => Some((!s.is_empty()).then(|| s.clone())),
            Value::Number(n, _) => Some(Some(
                n.parse::<i64>()
                    .map_or_else(|_| n.clone(), |i| i.to_string()),
            )),
            _ => None,
        },
        [Expr::Identifier(i)] => Some(Some(ident_name(i))),
        _ => None,
    };
    // Anything else (E'…', $$…$$, +5, a list) the proxy could misread:
    // clearing its tenant while the server has one would lift the guard.
    Some(tenant.map(|t| TenantChange::to(t, local)).ok_or_else(|| {
        let setting = &policy.tenant.session_setting;
        Rejection {
            sqlstate: KM003,
            table: None,
            column: None,
            message: format!(
                "cmk-proxy: this form of SET {setting} is not supported (the proxy must know the tenant): \
                 use SET {setting} = '<tenant>'"
            ),
        }
    }))
}
