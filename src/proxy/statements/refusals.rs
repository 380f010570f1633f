//! Refused Parses and Binds, schema flux and the checks that refuse SQL
//! the proxy cannot run as written (SQL EXECUTE, unreadable text).

use super::*;

/// A rewritten write closed or replaced by the client (see
/// `ClientStatements::retired`).
#[derive(Debug)]
pub(super) struct Retired {
    /// Sequence number of the retiring Close or Parse.
    pub(super) seq: u64,
    /// Syncs the client had sent before it (or before a later Parse or
    /// Close of the name).
    pub(super) syncs: u64,
    pub(super) statement: Arc<PreparedStatement>,
}

/// A Parse the proxy refuses: the server gets one that fails (SQL that
/// does not parse) under the same name, the client the refusal.
pub(super) fn refuse_parse(
    name: &[u8],
    encryption: &Encryption,
    state: &SessionState,
    rejection: Rejection,
) -> ClientStep {
    let mut out = BytesMut::new();
    refused_parse(&mut out, name, encryption, state, rejection);
    ClientStep::Replace(out)
}

/// Appends a Parse under `name` that fails at the server and records the
/// refusal its error is replaced by.
pub(super) fn refused_parse(
    out: &mut BytesMut,
    name: &[u8],
    encryption: &Encryption,
    state: &SessionState,
    rejection: Rejection,
) {
    let tenant = state.tenant();
    let info = state.session_info(tenant.as_deref());
    state.pending.push(Expected::Parse {
        refusal: Some(audited(encryption, &info, rejection)),
        retires: None,
        own: None,
        swallow: false,
    });
    encode::parse_raw_name(name, REFUSED_SQL, out);
}

/// A Bind the proxy refuses: after `out` (messages already due), the
/// server gets one that fails (to a statement that cannot exist), the
/// client the refusal.
pub(super) fn refuse_bind_after(
    mut out: BytesMut,
    encryption: &Encryption,
    state: &SessionState,
    rejection: Rejection,
) -> ClientStep {
    let tenant = state.tenant();
    let info = state.session_info(tenant.as_deref());
    state.pending.push(Expected::Bind {
        refusal: Some(audited(encryption, &info, rejection)),
        own: None,
    });
    Bind {
        portal: "",
        statement: REFUSED_STATEMENT,
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    }
    .encode(&mut out);
    ClientStep::Replace(out)
}

/// The refusal of `sql` when it reads or writes a name in the session's
/// schema flux (see `follow_schema_flux`); nothing to do, and nothing
/// read, while no name is in flux.
pub(crate) fn refuse_in_flux(
    sql: &str,
    encryption: &Encryption,
    state: &SessionState,
) -> Result<(), Rejection> {
    let Some(in_flux) = state.flux_names() else {
        return Ok(());
    };
    let catalog = encryption.catalog();
    let policy = encryption.policy();
    let policy = catalog.analysis_policy(&policy);
    rewrite::schema_flux(policy, catalog.schema_facts(), sql, &in_flux).map(drop)
}

/// Follows the session's schema flux through `sql` (see
/// `rewrite::schema_flux`): refuses a statement on a relation the
/// session's uncommitted DDL changed, and puts the names of DDL on
/// protected data in flux (`cycle`: the request cycle that carries it).
/// Costs nothing unless the statement is DDL or names are in flux.
pub(super) fn follow_schema_flux(
    sql: &str,
    ddl: bool,
    cycle: u64,
    encryption: &Encryption,
    state: &SessionState,
) -> Result<(), Rejection> {
    let in_flux = state.flux_names();
    if in_flux.is_none() && !ddl {
        return Ok(());
    }
    let catalog = encryption.catalog();
    let changed = rewrite::schema_flux(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        sql,
        &in_flux.unwrap_or_default(),
    )?;
    if let Some(names) = changed {
        state.add_flux(names, cycle);
    }
    Ok(())
}

/// The refusal of a Bind of a statement whose plan the schema changed
/// under (see `ClientStatements::replan`).
pub(super) fn schema_changed(name: &str) -> Rejection {
    let shown = shown_name(name);
    Rejection {
        sqlstate: rewrite::KM003,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: the schema or policy changed since {shown} was prepared, and the change touches \
             protected data: prepare the statement again"
        ),
    }
}

/// A prepared statement's name as messages show it.
pub(super) fn shown_name(name: &str) -> String {
    if name.is_empty() {
        "the unnamed statement".to_owned()
    } else {
        format!("statement \"{name}\"")
    }
}

pub(super) fn own_name_rejection() -> Rejection {
    Rejection {
        sqlstate: rewrite::KM003,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: prepared statement names starting with {NAME_PREFIX} are reserved \
             for the proxy's own statements"
        ),
    }
}

pub(super) fn ambiguous_statement(name: &str) -> Rejection {
    Rejection {
        sqlstate: crate::protocol::sqlstate::PROTOCOL_VIOLATION,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: the server has not yet answered the Close or Parse that replaced statement \"{name}\", which stored protected values; wait for it (Sync) before binding the name again"
        ),
    }
}

/// Appends a Describe of portal `name`.
pub(super) fn describe_portal(out: &mut BytesMut, name: &str) {
    encode::describe(Target::Portal, name, out);
}

/// Appends a Describe of statement `name`.
pub(super) fn describe_statement(out: &mut BytesMut, name: &str) {
    encode::describe(Target::Statement, name, out);
}

/// Appends a Close message for the prepared statement `name`.
pub(super) fn close_statement(out: &mut BytesMut, name: &str) {
    encode::close(Target::Statement, name, out);
}

/// SQL `EXECUTE name` of a statement prepared through the protocol: the
/// server holds it as the proxy rewrote it (ciphertext parameters), and SQL
/// would hand it the client's plaintext. Refused (use Bind/Execute). Found
/// in the parsed statements (inside EXPLAIN or CREATE TABLE AS too), else,
/// for SQL that does not parse, by its words.
pub(super) fn sql_execute_refusal(
    sql: &str,
    words: StatementWords,
    is_prepared: impl Fn(&str) -> bool,
) -> Option<Rejection> {
    // Most SQL has no EXECUTE: found without copying the text.
    if !words.executes {
        return None;
    }
    let lower = sql.to_ascii_lowercase();
    let names = match rewrite::parse_statements(sql) {
        Some(statements) => {
            let mut names = Vec::new();
            let _ = sqlparser::ast::visit_statements(&statements, |statement| {
                if let sqlparser::ast::Statement::Execute {
                    name: Some(name), ..
                } = statement
                {
                    if let Some(ident) = name.0.last().and_then(|p| p.as_ident()) {
                        names.push(rewrite::ident_name(ident));
                    }
                }
                std::ops::ControlFlow::<()>::Continue(())
            });
            names
        }
        None => executed_names(&lower, sql),
    };
    let name = names.into_iter().find(|n| is_prepared(n))?;
    Some(Rejection {
        sqlstate: rewrite::KM003,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: SQL EXECUTE of {name}, a statement prepared through the protocol, \
             is not supported (bind and execute it through the protocol)"
        ),
    })
}

/// The word after each `execute` (comments skipped), as the server would
/// look it up: quoted as written, unquoted in lower case.
pub(super) fn executed_names(lower: &str, sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find("execute") {
        let start = from + at;
        from = start + "execute".len();
        let glued = lower[..start]
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if glued {
            continue;
        }
        let mut rest = &sql[from..];
        loop {
            let trimmed = rest.trim_start();
            if let Some(comment) = trimmed.strip_prefix("/*") {
                rest = comment.split_once("*/").map_or("", |(_, after)| after);
            } else if let Some(comment) = trimmed.strip_prefix("--") {
                rest = comment.split_once('\n').map_or("", |(_, after)| after);
            } else {
                rest = trimmed;
                break;
            }
        }
        match rest.strip_prefix('"') {
            Some(quoted) => names.extend(quoted.split('"').next().map(str::to_owned)),
            None => {
                let len = rest
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$')
                    .count();
                if len > 0 {
                    names.push(rest[..len].to_ascii_lowercase());
                }
            }
        }
    }
    names
}

/// SQL that is not UTF-8 (a client_encoding other than UTF8): `None` when
/// its lossy reading touches no protected table, else the refusal (the
/// proxy cannot check or rewrite what it cannot read).
pub(super) fn unreadable_sql_refusal(sql: &[u8], encryption: &Encryption) -> Option<Rejection> {
    let end = sql.iter().position(|b| *b == 0).unwrap_or(sql.len());
    let lossy = String::from_utf8_lossy(&sql[..end]);
    let catalog = encryption.catalog();
    match rewrite::analyze_in(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        &lossy,
        0,
    ) {
        Ok(analysis)
            if analysis
                .statements
                .iter()
                .all(|s| matches!(s, StatementPlan::Untouched)) =>
        {
            None
        }
        Ok(_) => Some(Rejection {
            sqlstate: rewrite::KM003,
            table: None,
            column: None,
            message: "cmk-proxy: SQL that is not valid UTF-8 is not supported on protected \
                      tables or the tenant setting (set client_encoding to UTF8)"
                .to_owned(),
        }),
        Err(rejection) => Some(rejection),
    }
}
