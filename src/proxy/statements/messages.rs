//! The messages the proxy sends in place of a client's: a bound query run
//! as its own statement, the frames of refused requests, result formats.

use super::*;

/// The extended-protocol messages that run `bound` as a simple query would,
/// as the proxy's statement `run`: closing the statements it forgot and
/// parsing it when new, then binding the unnamed portal (results in text),
/// describing its rows if it returns any, executing it, and one Sync.
/// The rows are described by the statement, not the portal: the
/// statement's description names the columns' origins even where the
/// execution's does not (Citus router queries), and with text results the
/// two are otherwise the same.
pub(super) fn bound_query_messages(bound: &BoundQuery, run: &StatementUse) -> BytesMut {
    let name = statement_name(run.number);
    let values: usize = bound.values.iter().flatten().map(|v| v.len() + 4).sum();
    let parse_len = if run.parse { bound.sql.len() } else { 0 };
    let mut out = BytesMut::with_capacity(parse_len + values + 8 * bound.values.len() + 96);
    for old in &run.close {
        close_statement(&mut out, &statement_name(*old));
    }
    if run.parse {
        Parse {
            name: &name,
            query: &bound.sql,
            param_types: bound.types.clone(),
        }
        .encode(&mut out);
    }
    Bind {
        portal: "",
        statement: &name,
        param_formats: bound.formats.clone(),
        params: bound.values.iter().map(Option::as_deref).collect(),
        result_formats: Vec::new(),
    }
    .encode(&mut out);
    if bound.returns_rows {
        describe_statement(&mut out, &name);
    }
    encode::execute("", 0, &mut out);
    encode::sync(&mut out);
    out
}

/// The extended-protocol messages that run `sql` as a simple query would,
/// as the unnamed statement described before it runs (see
/// `QueryRewrite::one_statement`): Parse, Describe of the statement, Bind
/// (no parameters, results in text), Execute and Sync.
pub(super) fn described_query_messages(sql: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(sql.len() + 64);
    Parse {
        name: "",
        query: sql,
        param_types: Vec::new(),
    }
    .encode(&mut out);
    describe_statement(&mut out, "");
    Bind {
        portal: "",
        statement: "",
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    }
    .encode(&mut out);
    encode::execute("", 0, &mut out);
    encode::sync(&mut out);
    out
}

/// Builds a Query message.
pub(super) fn query_message(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    encode::query(sql, &mut out);
    out
}

pub(super) fn cstr(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&body[..end]).ok()
}

/// Describe and Close bodies: a kind byte (`S` or `P`) and a name.
pub(super) fn target(body: &[u8]) -> Option<(u8, &str)> {
    let (kind, rest) = body.split_first()?;
    Some((*kind, cstr(rest)?))
}

/// If a read failed inside the client's transaction, the query that makes
/// the server transaction fail too; its response is swallowed, so the
/// client's next statement meets an aborted transaction (and COMMIT rolls
/// back) exactly as if the server had raised the error itself.
pub fn poison_query(state: &SessionState) -> Option<BytesMut> {
    let (code, message) = state.poison.take()?;
    let rejection = Rejection {
        sqlstate: code,
        table: None,
        column: None,
        message,
    };
    state.cycle_sent();
    state.pending.push(Expected::Query {
        swallow: true,
        fingerprint: Arc::from(""),
        refresh: false,
        run_as: None,
        extended: false,
        copy: None,
    });
    Some(query_message(&rejection_query(&rejection)))
}

/// The result formats to ask the server for when the client wants protected
/// columns as text: binary for those (the server does not hex-encode the
/// ciphertext, half the bytes travel, the proxy still answers in text).
/// `None`: the client's own, or the statement's columns are not known yet.
pub(super) fn wire_formats(
    statement: &PreparedStatement,
    client: &[i16],
    encryption: &Encryption,
) -> Option<Vec<i16>> {
    // A format per column: the columns the proxy added (row tenants) are
    // read as text.
    let padded = (statement.hidden_results > 0 && client.len() > 1).then(|| {
        let mut formats = client.to_vec();
        formats.resize(client.len() + statement.hidden_results, 0);
        formats
    });
    let client = padded.as_deref().unwrap_or(client);
    let (count, protected) = match statement.protected_results.get() {
        Some(known) => known,
        None => {
            let Some(Some(Shape::Rows(frame))) =
                statement.shape.lock().ok().map(|shape| shape.clone())
            else {
                return padded;
            };
            let Ok(known) = protected_result_columns(&frame, &encryption.catalog()) else {
                return padded;
            };
            statement.protected_results.get_or_init(|| known)
        }
    };
    if protected.iter().all(|i| format_of(client, *i) == 1) {
        return padded;
    }
    let mut formats: Vec<i16> = (0..*count).map(|i| format_of(client, i)).collect();
    for index in protected {
        if let Some(format) = formats.get_mut(*index) {
            *format = 1;
        }
    }
    Some(formats)
}

/// Where executions do not name their columns' origins (see
/// `CatalogMap::traces_by_statement`), a statement on protected tables
/// that nobody described yet is described before a Bind of it (`name`: the
/// statement as the server knows it), so that its rows can be traced; the
/// answer is kept, never shown. Returns whether the Describe went into `out`.
pub(super) fn describe_for_origins(
    statement: &Arc<PreparedStatement>,
    name: &str,
    encryption: &Encryption,
    state: &SessionState,
    out: &mut BytesMut,
) -> bool {
    if statement.fingerprint.is_empty()
        || statement.described.load(Ordering::Acquire)
        || !encryption.catalog().traces_by_statement()
    {
        return false;
    }
    statement.described.store(true, Ordering::Release);
    state
        .pending
        .push(Expected::StatementOrigins(statement.clone()));
    describe_statement(out, name);
    true
}
