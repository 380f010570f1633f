//! The proxy's own prepared statements for repeated SQL: their names,
//! Parses and Closes on the session's connection.

use super::*;

/// The SQL the server runs for an unnamed Parse that is worth running as
/// the proxy's own statement when the session sends it again: one on
/// protected tables (a rewritten write, or a read the proxy decrypts), with
/// `server.prepare_repeated_statements` on.
pub(super) fn own_statement_sql(
    parse: &Parse<'_>,
    plan: &ParsePlan,
    encryption: &Encryption,
) -> Option<Arc<ServerSql>> {
    let protected = matches!(plan.kind, StatementKind::Plain | StatementKind::Write(_))
        && !plan.fingerprint.is_empty();
    if !parse.name.is_empty()
        || !protected
        || !encryption.policy().server.prepare_repeated_statements
    {
        return None;
    }
    let (sql, types) = match &plan.rewritten {
        Some((sql, types)) => (sql.as_str(), types.clone()),
        None => (parse.query, parse.param_types.clone()),
    };
    Some(Arc::new(ServerSql {
        sql: Arc::from(sql),
        types,
    }))
}

/// Closes the proxy's statements `numbers` (forgotten, or making room);
/// their CloseCompletes are not shown.
pub(super) fn close_own_statements(out: &mut BytesMut, numbers: &[u64], state: &SessionState) {
    for number in numbers {
        state.pending.push(Expected::Close {
            swallow: true,
            retires: None,
        });
        close_statement(out, &statement_name(*number));
    }
}

/// Sends a Parse of the proxy's statement `number` (its ParseComplete not
/// shown; its error shown in place of the message it was sent for).
pub(super) fn parse_own_statement(
    out: &mut BytesMut,
    number: u64,
    server: &ServerSql,
    state: &SessionState,
) {
    state.pending.push(Expected::Parse {
        refusal: None,
        retires: None,
        own: Some(number),
        swallow: true,
    });
    Parse {
        name: &statement_name(number),
        query: &server.sql,
        param_types: server.types.clone(),
    }
    .encode(out);
}

/// The proxy's statement a Bind or Describe of an unnamed statement that
/// `runs_as` one names: the one its Parse parsed while no Sync came
/// between, else the one the proxy holds parsed for its SQL now, parsed
/// first (into `out`) when the proxy forgot it (DEALLOCATE, DISCARD, DDL,
/// a lost statement) or its Parse is unanswered. Returns its number and
/// name, or the refusal of a new Parse of SQL planned under
/// standard-conforming strings once the session has turned them off.
pub(super) fn own_statement_of(
    runs_as: &RunsAs,
    encryption: &Encryption,
    state: &SessionState,
    out: &mut BytesMut,
) -> Result<(u64, String), Rejection> {
    if runs_as.parsed_after_syncs == Some(state.syncs.load(Ordering::Acquire)) {
        return Ok((runs_as.number, statement_name(runs_as.number)));
    }
    let run = own_statement_now(&runs_as.server, encryption, state, out)?;
    Ok((run.number, statement_name(run.number)))
}

/// The proxy's statement for `server` as it holds one now (see
/// `OwnStatements::statement_for`): the Closes of those it forgot and, when
/// it is new, its Parse go into `out`. A new Parse is refused once the
/// session's strings are not standard-conforming (the SQL was planned under
/// them, and could be read otherwise).
pub(super) fn own_statement_now(
    server: &ServerSql,
    encryption: &Encryption,
    state: &SessionState,
    out: &mut BytesMut,
) -> Result<StatementUse, Rejection> {
    let catalog = encryption.catalog();
    let run = state.own_statements(|own| own.statement_for(&server.sql, &server.types, &catalog));
    close_own_statements(out, &run.close, state);
    if run.parse {
        if let Some(rejection) = nonstandard_strings_refusal(&server.sql, encryption, state) {
            state.own_statements(|own| own.failed(run.number, None));
            return Err(rejection);
        }
        parse_own_statement(out, run.number, server, state);
    }
    Ok(run)
}

/// The statement as the proxy tracks it, from its plan and the parameter
/// types the client `declared`; `drops`: its SQL may drop statements.
pub(super) fn statement_of(
    plan: &Arc<ParsePlan>,
    epoch: u64,
    declared: Vec<u32>,
    drops: bool,
) -> PreparedStatement {
    let mut statement = PreparedStatement::plain(plan.client_params, plan.fingerprint.clone());
    statement.origin = Some(PlanOrigin {
        plan: Arc::clone(plan),
        epoch: AtomicU64::new(epoch),
    });
    statement.declared = declared;
    statement.presented = plan.presented.clone();
    statement.row_plans = plan.row_plans.clone();
    statement.kind = plan.kind.clone();
    statement.hidden_results = plan.hidden_results;
    // DDL may change what a statement of the proxy's returns (0A000).
    statement.drops_statements = plan.ddl || drops;
    statement
}
