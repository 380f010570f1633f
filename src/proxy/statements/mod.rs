//! Client messages on their way to PostgreSQL when a policy is active.
//! Simple queries are planned and their protected values encrypted; in the
//! extended protocol, Parse is planned once (protected parameters become
//! bytea, the proxy's own parameters are added), every Bind of a write is
//! encrypted, and every request is recorded in the session's
//! [`PendingQueue`](super::pending::PendingQueue) so the server direction
//! knows what each response answers. A refused statement is replaced by one
//! that makes the server fail too, so client and server agree on the
//! transaction state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use super::copy::{CopyIn, CopyResponse, CopyRewrite};
use super::encryption::plans::ParsePlan;
use super::encryption::{rejection_query, BoundQuery, Encryption, SessionInfo};
use super::own_statements::{
    is_own_name, statement_name, OwnStatements, StatementUse, StatementWords, NAME_PREFIX,
};
use super::pending::{
    Expected, PlanOrigin, Portal, PreparedStatement, Refusal, RunsAs, ServerSql, Shape,
    StatementKind,
};
use super::recent_parses::{RecentParses, Remembered};
use super::results::protected_result_columns;
use super::sql_prepared::SqlPrepared;
use super::state::SessionState;
use crate::protocol::encode::{self, Target};
use crate::protocol::messages::{format_of, Bind, Parse};
use crate::protocol::{frontend, HEADER_LEN};
use crate::rewrite::{self, Rejection, StatementPlan, TenantChange, ValueSource};

/// A statement name no client uses: a Bind to it fails at the server.
const REFUSED_STATEMENT: &str = "cmk-proxy: refused";
/// Portal records kept per session before the oldest are forgotten.
const MAX_PORTALS: usize = 256;
/// SQL that fails to parse at the server, for a refused Parse.
const REFUSED_SQL: &str = "cmk-proxy refused this statement";

/// The extended-protocol messages that run `bound` as a simple query would,
/// as the proxy's statement `run`: closing the statements it forgot and
/// parsing it when new, then binding the unnamed portal (results in text),
/// describing its rows if it returns any, executing it, and one Sync.
fn bound_query_messages(bound: &BoundQuery, run: &StatementUse) -> BytesMut {
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
        describe_portal(&mut out, "");
    }
    encode::execute("", 0, &mut out);
    encode::sync(&mut out);
    out
}

/// Builds a Query message.
fn query_message(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    encode::query(sql, &mut out);
    out
}

fn cstr(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&body[..end]).ok()
}

/// Describe and Close bodies: a kind byte (`S` or `P`) and a name.
fn target(body: &[u8]) -> Option<(u8, &str)> {
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
        copy: None,
    });
    Some(query_message(&rejection_query(&rejection)))
}

/// The result formats to ask the server for when the client wants protected
/// columns as text: binary for those (the server does not hex-encode the
/// ciphertext, half the bytes travel, the proxy still answers in text).
/// `None`: the client's own, or the statement's columns are not known yet.
fn wire_formats(
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

/// Audits a refusal and turns it into what the server direction will show
/// in place of the server's error.
fn audited(encryption: &Encryption, info: &SessionInfo<'_>, rejection: Rejection) -> Refusal {
    encryption.audit_rejection(&rejection, info);
    Refusal {
        sqlstate: rejection.sqlstate,
        message: rejection.message,
    }
}

/// What to do with a client message after its synchronous handling.
pub enum ClientStep {
    /// Send it unchanged.
    Forward,
    /// Send these bytes instead.
    Replace(BytesMut),
    /// It needs keys: hand it to [`ClientStatements::finish`].
    Async,
}

/// The prepared statements and portals of one session, as the proxy knows
/// them.
#[derive(Default)]
pub struct ClientStatements {
    statements: HashMap<String, Arc<PreparedStatement>>,
    portals: HashMap<String, Arc<Portal>>,
    /// Rewritten writes the client closed or replaced, by name, with the
    /// sequence number of that Close or Parse, until the server's answer
    /// to it is known: a Close or Parse skipped after an error leaves the
    /// write on the server under the name.
    retired: HashMap<String, Retired>,
    /// Sequence numbers for retiring messages.
    next_retirement: u64,
    /// The Parses sent last, recognised again by their bytes.
    recent: RecentParses<ParsePlan>,
    /// The session's SQL-level prepared statements.
    sql_prepared: SqlPrepared,
    /// A COPY FROM STDIN into a policy table in progress (boxed: every
    /// idle session carries this struct in its future).
    copy_in: Option<Box<CopyIn>>,
}

impl ClientStatements {
    /// Handles a complete client message that needs no keys; messages that
    /// do (simple queries, Binds of writes) are left to `finish`.
    pub fn on_frame(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> ClientStep {
        let body = frame.get(HEADER_LEN..).unwrap_or_default();
        match frame.first().copied() {
            Some(frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL)
                if self.copy_in.is_some() =>
            {
                return ClientStep::Async;
            }
            // Anything else ends the client's COPY mode (the server ended
            // it, or the client broke the protocol: the server says so).
            _ => self.copy_in = None,
        }
        match frame.first().copied() {
            Some(frontend::QUERY) => {
                // PostgreSQL drops the unnamed statement at every simple query.
                self.forget_unnamed_run_as_own();
                ClientStep::Async
            }
            Some(frontend::PARSE) => self.parse(frame, body, encryption, state),
            Some(frontend::BIND) => self.bind(frame, body, encryption, state),
            Some(frontend::DESCRIBE) => {
                // A malformed Describe fails at the server like any other.
                match target(body).unwrap_or((b'P', "")) {
                    (b'S', name) => {
                        let statement = self.statement(name);
                        statement.described.store(true, Ordering::Release);
                        if let Some(runs_as) = &statement.runs_as {
                            let mut out = BytesMut::new();
                            match own_statement_of(runs_as, encryption, state, &mut out) {
                                Ok((_, own)) => {
                                    state
                                        .pending
                                        .push(Expected::DescribeStatement(statement.clone()));
                                    describe_statement(&mut out, &own);
                                }
                                // A Parse that fails at the server carries
                                // the refusal in place of the Describe.
                                Err(rejection) => refused_parse(
                                    &mut out,
                                    REFUSED_STATEMENT.as_bytes(),
                                    encryption,
                                    state,
                                    rejection,
                                ),
                            }
                            return ClientStep::Replace(out);
                        }
                        state.pending.push(Expected::DescribeStatement(statement));
                    }
                    (_, name) => {
                        let portal = self.portal(name);
                        portal.described.store(true, Ordering::Release);
                        state.pending.push(Expected::DescribePortal {
                            portal,
                            swallow: false,
                        });
                    }
                }
                ClientStep::Forward
            }
            Some(frontend::EXECUTE) => self.execute(frame, body, state),
            Some(frontend::CLOSE) => {
                let mut retires = None;
                if target(body).is_some_and(|(kind, name)| kind == b'S' && is_own_name(name)) {
                    // The client closes one of the proxy's statements: all
                    // are parsed anew rather than one bound after it.
                    state.own_statements(OwnStatements::clear);
                }
                match target(body) {
                    Some((b'S', name)) => match self.statements.remove(name) {
                        Some(old) => retires = self.retire(name, old, state),
                        None => self.redefined(name, state),
                    },
                    Some((_, name)) => {
                        self.portals.remove(name);
                    }
                    None => {}
                }
                state.pending.push(Expected::Close {
                    swallow: false,
                    retires,
                });
                ClientStep::Forward
            }
            _ => ClientStep::Forward,
        }
    }

    /// A Bind that needs no keys is sent on (to the proxy's own statement
    /// when the client's runs as one); a Bind of a write is left to
    /// `finish`; one the proxy cannot tell the statement of is refused.
    fn bind(
        &mut self,
        frame: &[u8],
        body: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> ClientStep {
        let Ok(bind) = Bind::decode(body) else {
            // Malformed, or names in another client encoding: the proxy
            // cannot tell which statement it binds (a write would get
            // plaintext), so it refuses it.
            let rejection = Rejection {
                sqlstate: crate::protocol::sqlstate::PROTOCOL_VIOLATION,
                table: None,
                column: None,
                message: "cmk-proxy: a Bind message it cannot read (malformed, or \
                          names that are not UTF-8)"
                    .to_owned(),
            };
            return refuse_bind_after(BytesMut::new(), encryption, state, rejection);
        };
        if self.bind_is_ambiguous(&bind, state) {
            let rejection = ambiguous_statement(bind.statement);
            return refuse_bind_after(BytesMut::new(), encryption, state, rejection);
        }
        if is_own_name(bind.statement) {
            return refuse_bind_after(BytesMut::new(), encryption, state, own_name_rejection());
        }
        if let Err(rejection) = self.replan_if_stale(bind.statement, encryption, state) {
            return refuse_bind_after(BytesMut::new(), encryption, state, rejection);
        }
        let statement = self.statement(bind.statement);
        if matches!(statement.kind, StatementKind::Write(_)) {
            return ClientStep::Async;
        }
        let mut out = BytesMut::new();
        let own = match statement
            .runs_as
            .as_ref()
            .map(|runs_as| own_statement_of(runs_as, encryption, state, &mut out))
            .transpose()
        {
            Ok(own) => own,
            Err(rejection) => return refuse_bind_after(out, encryption, state, rejection),
        };
        let wire = wire_formats(&statement, &bind.result_formats, encryption);
        self.bind_portal(&bind, statement.clone(), wire.clone());
        state.pending.push(Expected::Bind {
            refusal: None,
            own: own.as_ref().map(|(number, _)| *number),
        });
        if own.is_none() && wire.is_none() {
            return ClientStep::Forward;
        }
        out.reserve(frame.len() + 64);
        Bind {
            statement: own.as_ref().map_or(bind.statement, |(_, name)| name),
            result_formats: wire.unwrap_or_else(|| bind.result_formats.clone()),
            ..bind
        }
        .encode(&mut out);
        ClientStep::Replace(out)
    }

    /// A COPY FROM into a policy table is in progress: its CopyData,
    /// CopyDone and CopyFail are the proxy's.
    pub fn in_copy(&self) -> bool {
        self.copy_in.is_some()
    }

    /// Handles a message `on_frame` left for async work; returns the bytes
    /// to send instead of it.
    pub async fn finish(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        let body = frame.get(HEADER_LEN..).unwrap_or_default();
        match frame.first().copied() {
            Some(frontend::QUERY) => {
                let executes = |name: &str| {
                    self.statements.contains_key(name) || self.retired.contains_key(name)
                };
                let sql_prepared = &mut self.sql_prepared;
                let copy_in = &mut self.copy_in;
                let query = SimpleQuery {
                    frame,
                    body,
                    encryption,
                    state,
                };
                simple_query(query, executes, sql_prepared, copy_in).await
            }
            Some(frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL) => {
                let Some(copy) = self.copy_in.as_mut() else {
                    return BytesMut::from(frame);
                };
                let (out, over) = copy.on_message(frame, encryption).await;
                if over {
                    self.copy_in = None;
                }
                out
            }
            Some(frontend::BIND) => self.encrypt_bind(frame, body, encryption, state).await,
            _ => BytesMut::from(frame),
        }
    }

    /// Keeps `old`, closed or replaced under `name`, while the server's
    /// answer is unknown, if it is a rewritten write; returns the sequence
    /// number its Close or Parse carries.
    fn retire(
        &mut self,
        name: &str,
        old: Arc<PreparedStatement>,
        state: &SessionState,
    ) -> Option<u64> {
        if !matches!(old.kind, StatementKind::Write(_)) {
            self.redefined(name, state);
            return None;
        }
        self.next_retirement += 1;
        let seq = self.next_retirement;
        let retired = Retired {
            seq,
            syncs: state.syncs.load(Ordering::Acquire),
            statement: old,
        };
        self.retired.insert(name.to_owned(), retired);
        Some(seq)
    }

    /// A newer definition (Parse or Close) of a name with a retired write:
    /// a Bind in its cycle binds it, or is skipped with it.
    fn redefined(&mut self, name: &str, state: &SessionState) {
        if let Some(retired) = self.retired.get_mut(name) {
            retired.syncs = state.syncs.load(Ordering::Acquire);
        }
    }

    /// Before a Bind: settles what the server holds under the name. A write
    /// the server still holds (its Close or Parse failed or was skipped) is
    /// the record again. `true` while the answer is unknown and the Bind's
    /// values would fit that write: the proxy cannot tell which statement
    /// it binds, and refuses it.
    fn bind_is_ambiguous(&mut self, bind: &Bind<'_>, state: &SessionState) -> bool {
        let Some(retired) = self.retired.get(bind.statement) else {
            return false;
        };
        // No Sync since the Close or Parse: had the server skipped it, it
        // skips this Bind too.
        if retired.syncs == state.syncs.load(Ordering::Acquire) {
            return false;
        }
        let (seq, old) = (retired.seq, retired.statement.clone());
        match state.take_retirement(seq) {
            Some(done) => {
                self.retired.remove(bind.statement);
                if !done {
                    self.statements.insert(bind.statement.to_owned(), old);
                }
                false
            }
            None => {
                let server_params = match &old.kind {
                    StatementKind::Write(plan) => old.client_params + plan.extra_params,
                    _ => old.client_params,
                };
                bind.params.len() == server_params
            }
        }
    }

    /// Plans statement `name` again when the catalog changed since it was
    /// planned, as PostgreSQL plans a prepared statement again after the
    /// schema it depends on changed. When the new plan runs exactly as the
    /// old one, the statement is current again; otherwise (a view it writes
    /// now shows a protected table, say) binding it is refused: the server
    /// would run it on the new schema, the proxy on the old plan.
    /// While names are in flux (see `follow_schema_flux`), a statement
    /// prepared before the DDL that names one is refused too.
    fn replan_if_stale(
        &self,
        name: &str,
        encryption: &Encryption,
        state: &SessionState,
    ) -> Result<(), Rejection> {
        let Some(statement) = self.statements.get(name) else {
            return Ok(());
        };
        let Some(origin) = statement.origin.as_ref() else {
            return Ok(());
        };
        refuse_in_flux(&origin.plan.sql, encryption, state)?;
        let epoch = encryption.plan_epoch();
        if origin.epoch.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        let old = &origin.plan;
        let new = encryption
            .parse_plan(&old.sql, &statement.declared, epoch, || {
                plan_sql(&old.sql, &statement.declared, encryption)
            })
            .map_err(|rejection| Rejection {
                message: format!(
                    "{} (the schema changed since {} was prepared)",
                    rejection.message,
                    shown_name(name)
                ),
                ..rejection
            })?;
        if !old.runs_as(&new) {
            return Err(schema_changed(name));
        }
        origin.epoch.store(epoch, Ordering::Release);
        Ok(())
    }

    fn statement(&self, name: &str) -> Arc<PreparedStatement> {
        self.statements.get(name).cloned().unwrap_or_else(|| {
            // Unknown to the proxy, so unknown to the server: it fails there.
            Arc::new(PreparedStatement::plain(0, Arc::from("")))
        })
    }

    /// The portal bound under `name`. One the proxy does not know (it
    /// failed, or its record was dropped) has no known columns, so its rows
    /// are described by the proxy itself before they are executed.
    fn portal(&self, name: &str) -> Arc<Portal> {
        self.portals.get(name).cloned().unwrap_or_else(|| {
            Arc::new(Portal {
                statement: Arc::new(PreparedStatement::plain(0, Arc::from(""))),
                result_formats: Vec::new(),
                client_formats: Vec::new(),
                planned: Mutex::new(None),
                tenant_change: None,
                described: Default::default(),
            })
        })
    }

    /// Records the portal of a Bind of `statement`; `wire_formats`: the
    /// result formats sent to the server instead of the client's.
    fn bind_portal(
        &mut self,
        bind: &Bind<'_>,
        statement: Arc<PreparedStatement>,
        wire_formats: Option<Vec<i16>>,
    ) {
        if self.portals.len() >= MAX_PORTALS && !self.portals.contains_key(bind.portal) {
            // Portals end with their transaction at the server, but the
            // proxy is not told; forgetting them is safe (see `portal`).
            self.portals.clear();
        }
        let portal = Portal {
            tenant_change: bound_tenant(&statement, bind),
            statement,
            result_formats: wire_formats.unwrap_or_else(|| bind.result_formats.clone()),
            client_formats: bind.result_formats.clone(),
            planned: Mutex::new(None),
            described: Default::default(),
        };
        match self.portals.get_mut(bind.portal) {
            Some(slot) => *slot = Arc::new(portal),
            None => {
                self.portals
                    .insert(bind.portal.to_owned(), Arc::new(portal));
            }
        }
    }

    fn parse(
        &mut self,
        frame: &[u8],
        body: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> ClientStep {
        if body.first() == Some(&0) {
            // PostgreSQL drops the unnamed statement when a Parse of it
            // starts, whether it succeeds, fails or is refused.
            self.forget_unnamed_run_as_own();
        }
        if let Some(step) = self.repeated_parse(frame, body, encryption, state) {
            return step;
        }
        let Ok(parse) = Parse::decode(body) else {
            let mut fields = body.splitn(3, |b| *b == 0);
            let (name, query) = (fields.next().unwrap_or_default(), fields.next());
            let refusal = query.and_then(|q| unreadable_sql_refusal(q, encryption));
            let Some(rejection) = refusal else {
                state.pending.push(Expected::parse());
                return ClientStep::Forward;
            };
            // The name as sent (it may not be UTF-8 either).
            return refuse_parse(name, encryption, state, rejection);
        };
        let words = StatementWords::of(parse.query);
        if words.drops {
            state.own_statements(OwnStatements::clear);
        }
        let own_name = is_own_name(parse.name) || words.names_own;
        let refusal = own_name
            .then(own_name_rejection)
            .or_else(|| {
                sql_execute_refusal(parse.query, words, |n| {
                    self.statements.contains_key(n) || self.retired.contains_key(n)
                })
            })
            .or_else(|| {
                self.sql_prepared
                    .refusal(parse.query, words, encryption, state)
            });
        let epoch = encryption.plan_epoch();
        let planned = match refusal {
            Some(rejection) => Err(rejection),
            None => plan_parse(&parse, epoch, encryption, state),
        };
        // The Parse is in the cycle its coming Sync ends.
        let cycle = state.cycles_sent.load(Ordering::Acquire) + 1;
        let planned = planned.and_then(|(plan, replacement)| {
            follow_schema_flux(parse.query, plan.ddl, cycle, encryption, state)?;
            Ok((plan, replacement))
        });
        let (plan, replacement) = match planned {
            Ok(planned) => planned,
            Err(rejection) => {
                return refuse_parse(parse.name.as_bytes(), encryption, state, rejection)
            }
        };
        let plain_words = !(words.drops || words.names_own || words.executes);
        if plain_words && !plan.ddl && !state.nonstandard_strings.load(Ordering::Acquire) {
            let entry = Remembered {
                name: parse.name,
                declared: &parse.param_types,
                plan: Arc::clone(&plan),
                replacement: replacement.as_ref(),
                server: own_statement_sql(&parse, &plan, encryption),
            };
            self.recent.remember(body, epoch, entry);
        }
        self.sql_prepared.follow(parse.query, words);
        let statement = statement_of(&plan, epoch, parse.param_types, words.drops);
        self.define(parse.name, statement, replacement, frame, state)
    }

    /// A Parse sent before by this session, taken from its record
    /// ([`RecentParses`]) without reading its SQL again.
    fn repeated_parse(
        &mut self,
        frame: &[u8],
        body: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> Option<ClientStep> {
        if state.nonstandard_strings.load(Ordering::Acquire) || state.flux_names().is_some() {
            return None;
        }
        let epoch = encryption.plan_epoch();
        let seen = self.recent.find(body, epoch)?;
        let statement = statement_of(&seen.plan, epoch, seen.declared.clone(), false);
        // In a failed transaction the client's Parse must fail as the
        // server's answer to it would (25P02); an empty Parse would not.
        let aborted = state.tx_status.load(Ordering::Acquire) == b'E';
        if let Some(server) = seen.server.clone().filter(|_| !aborted) {
            return Some(self.define_unnamed_as_own(statement, server, encryption, state));
        }
        let (name, replacement) = (seen.name.clone(), seen.replacement.clone());
        Some(self.define(&name, statement, replacement, frame, state))
    }

    /// Records a repeated unnamed Parse on protected tables as the proxy's
    /// own statement: the server parses that one first when it is new (its
    /// ParseComplete not shown, its error shown as the Parse's), then an
    /// empty unnamed statement answers the client, and the client's Binds
    /// and Describes of the unnamed statement name the proxy's. PostgreSQL
    /// then plans it once per connection instead of at every execution.
    /// The empty statement replaces the server's unnamed one as the
    /// client's Parse would have (the record it retires is settled by its
    /// answer), and binding it with parameters fails: a record of the
    /// client's that the proxy forgets never leaves an older write behind.
    fn define_unnamed_as_own(
        &mut self,
        mut statement: PreparedStatement,
        server: Arc<ServerSql>,
        encryption: &Encryption,
        state: &SessionState,
    ) -> ClientStep {
        let mut out = BytesMut::new();
        let run = match own_statement_now(&server, encryption, state, &mut out) {
            Ok(run) => run,
            // A repeat is taken only under standard-conforming strings, so
            // this is not reached; refusing is the safe answer if it were.
            Err(rejection) => {
                refused_parse(&mut out, b"", encryption, state, rejection);
                return ClientStep::Replace(out);
            }
        };
        Parse {
            name: "",
            query: "",
            param_types: Vec::new(),
        }
        .encode(&mut out);
        statement.runs_as = Some(RunsAs {
            server,
            number: run.number,
            parsed_after_syncs: run.parse.then(|| state.syncs.load(Ordering::Acquire)),
        });
        let (_, retires) = self.record("", statement, state);
        state.pending.push(Expected::Parse {
            refusal: None,
            retires,
            own: None,
            swallow: false,
        });
        ClientStep::Replace(out)
    }

    /// Forgets the client's unnamed statement if it runs as the proxy's
    /// (its server counterpart is an empty statement, so nothing older can
    /// be bound in its place): a later Bind of it fails at the server.
    fn forget_unnamed_run_as_own(&mut self) {
        if self
            .statements
            .get("")
            .is_some_and(|statement| statement.runs_as.is_some())
        {
            self.statements.remove("");
        }
    }

    /// Stores `statement` under `name`; returns whether it replaces a
    /// named statement the client defined before, and the retirement of
    /// the record it replaces (see [`retire`](Self::retire)).
    fn record(
        &mut self,
        name: &str,
        statement: PreparedStatement,
        state: &SessionState,
    ) -> (bool, Option<u64>) {
        let redefined = !name.is_empty() && self.statements.contains_key(name);
        let retires = match self.statements.insert(name.to_owned(), Arc::new(statement)) {
            Some(old) => self.retire(name, old, state),
            None => {
                self.redefined(name, state);
                None
            }
        };
        (redefined, retires)
    }

    /// Records `statement` under `name` and the Parse that defines it on
    /// the server: `replacement`, else the client's `frame`.
    fn define(
        &mut self,
        name: &str,
        statement: PreparedStatement,
        replacement: Option<BytesMut>,
        frame: &[u8],
        state: &SessionState,
    ) -> ClientStep {
        // The latest Parse of a name defines it: the client may have dropped
        // the old one with SQL (DEALLOCATE, DISCARD ALL), which the proxy
        // does not track. Should that DEALLOCATE have failed, the server
        // would refuse this Parse and keep the old statement while the proxy
        // took the new record: a rewritten write bound as a plain statement
        // would store plaintext. So a known name is closed first (closing a
        // statement that no longer exists is no error), and the server ends
        // with the statement the proxy recorded.
        let (redefined, retires) = self.record(name, statement, state);
        let mut out = BytesMut::new();
        if redefined {
            state.pending.push(Expected::Close {
                swallow: true,
                retires: None,
            });
            close_statement(&mut out, name);
        }
        state.pending.push(Expected::Parse {
            refusal: None,
            retires,
            own: None,
            swallow: false,
        });
        match (redefined, replacement) {
            (false, Some(bytes)) => ClientStep::Replace(bytes),
            (false, None) => ClientStep::Forward,
            (true, replacement) => {
                out.extend_from_slice(replacement.as_deref().unwrap_or(frame));
                ClientStep::Replace(out)
            }
        }
    }

    fn execute(&mut self, frame: &[u8], body: &[u8], state: &SessionState) -> ClientStep {
        let portal = cstr(body).map_or_else(|| self.portal(""), |name| self.portal(name));
        if portal.statement.drops_statements {
            state.own_statements(OwnStatements::clear);
        }
        if let StatementKind::SetTenant(change) = &portal.statement.kind {
            state.change_tenant(change.clone(), true);
        }
        if let Some(change) = &portal.tenant_change {
            state.change_tenant(change.clone(), true);
        }
        let describe = !portal.described.load(Ordering::Acquire)
            && !portal.statement.described.load(Ordering::Acquire);
        if !describe {
            state.pending.push(Expected::Execute(portal));
            return ClientStep::Forward;
        }
        // The client never asked for the result columns (it knows them from
        // elsewhere): the proxy asks, and keeps the answer to itself.
        portal.described.store(true, Ordering::Release);
        let name = cstr(body).unwrap_or_default();
        let mut out = BytesMut::with_capacity(name.len() + 7 + frame.len());
        describe_portal(&mut out, name);
        out.extend_from_slice(frame);
        state.pending.push(Expected::DescribePortal {
            portal: portal.clone(),
            swallow: true,
        });
        state.pending.push(Expected::Execute(portal));
        ClientStep::Replace(out)
    }

    async fn encrypt_bind(
        &mut self,
        frame: &[u8],
        body: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        let Ok(bind) = Bind::decode(body) else {
            state.pending.push(Expected::bind());
            return BytesMut::from(frame);
        };
        let statement = self.statement(bind.statement);
        self.bind_portal(&bind, statement.clone(), None);
        let StatementKind::Write(plan) = &statement.kind else {
            state.pending.push(Expected::bind());
            return BytesMut::from(frame);
        };
        let tenant = state.tenant();
        let info = state.session_info(tenant.as_deref());
        let mut out = BytesMut::new();
        let own = statement
            .runs_as
            .as_ref()
            .map(|runs_as| own_statement_of(runs_as, encryption, state, &mut out))
            .transpose();
        let encrypted = match own {
            Ok(own) => {
                let name = own
                    .as_ref()
                    .map_or(bind.statement, |(_, name)| name.as_str());
                let encrypted = encryption
                    .encrypt_bind(
                        &bind,
                        name,
                        plan,
                        statement.client_params,
                        &statement.declared,
                        &info,
                    )
                    .await;
                encrypted.map(|bound| (own.map(|(number, _)| number), bound))
            }
            Err(rejection) => Err(rejection),
        };
        match encrypted {
            Ok((own, bound)) => {
                state.pending.push(Expected::Bind { refusal: None, own });
                if out.is_empty() {
                    return bound;
                }
                out.extend_from_slice(&bound);
                out
            }
            Err(rejection) => {
                // The proxy's statement parsed above (if any) stays, unused.
                state.pending.push(Expected::Bind {
                    refusal: Some(audited(encryption, &info, rejection)),
                    own: None,
                });
                Bind {
                    portal: bind.portal,
                    statement: REFUSED_STATEMENT,
                    param_formats: Vec::new(),
                    params: Vec::new(),
                    result_formats: Vec::new(),
                }
                .encode(&mut out);
                out
            }
        }
    }
}

/// The tenant a Bind of `set_config('<tenant setting>', $n, local)` sets:
/// the parameter's text (text format, or binary of a text type, which is
/// the same bytes). NULL resets the setting to the session's default. A
/// value the proxy cannot read as text (another binary type, empty) clears
/// the session tenant, the safe direction: writes then need the tenant in
/// the statement.
fn bound_tenant(statement: &PreparedStatement, bind: &Bind<'_>) -> Option<TenantChange> {
    /// text, varchar, bpchar, name, or not declared (the server infers text).
    const TEXT_TYPES: [u32; 5] = [0, 25, 1043, 1042, 19];
    let StatementKind::SetTenantParam { param, local } = statement.kind else {
        return None;
    };
    let index = param.checked_sub(1)?;
    let declared = statement.declared.get(index).copied().unwrap_or(0);
    let readable = format_of(&bind.param_formats, index) == 0 || TEXT_TYPES.contains(&declared);
    let value = bind.params.get(index).copied()?;
    let Some(value) = value else {
        return Some(TenantChange::reset(local));
    };
    let tenant = Some(value)
        .filter(|_| readable)
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .filter(|text| !text.is_empty())
        .map(str::to_owned);
    Some(TenantChange::to(tenant, local))
}

/// Plans a Parse: the shared plan, and the Parse to send instead (`None`:
/// the original). `Err`: refused.
fn plan_parse(
    parse: &Parse<'_>,
    epoch: u64,
    encryption: &Encryption,
    state: &SessionState,
) -> Result<(Arc<ParsePlan>, Option<BytesMut>), Rejection> {
    if let Some(rejection) = nonstandard_strings_refusal(parse.query, encryption, state) {
        return Err(rejection);
    }
    let plan = encryption.parse_plan(parse.query, &parse.param_types, epoch, || {
        plan_sql(parse.query, &parse.param_types, encryption)
    })?;
    if plan.ddl {
        state.refresh_catalog.store(true, Ordering::Release);
    }
    let replacement = plan.rewritten.as_ref().map(|(sql, types)| {
        let mut out = BytesMut::with_capacity(sql.len() + parse.name.len() + 16 + 4 * types.len());
        Parse {
            name: parse.name,
            query: sql,
            param_types: types.clone(),
        }
        .encode(&mut out);
        out
    });
    Ok((plan, replacement))
}

/// The SQL the server runs for an unnamed Parse that is worth running as
/// the proxy's own statement when the session sends it again: one on
/// protected tables (a rewritten write, or a read the proxy decrypts), with
/// `server.prepare_repeated_statements` on.
fn own_statement_sql(
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
fn close_own_statements(out: &mut BytesMut, numbers: &[u64], state: &SessionState) {
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
fn parse_own_statement(out: &mut BytesMut, number: u64, server: &ServerSql, state: &SessionState) {
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
fn own_statement_of(
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
fn own_statement_now(
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
fn statement_of(
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

/// Plans the SQL of a Parse with its declared parameter types.
fn plan_sql(
    query: &str,
    param_types: &[u32],
    encryption: &Encryption,
) -> Result<ParsePlan, Rejection> {
    let catalog = encryption.catalog();
    let analysis = rewrite::analyze_in(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        query,
        param_types.len(),
    )?;
    let mut plan = ParsePlan {
        sql: Arc::from(query),
        kind: StatementKind::Plain,
        client_params: analysis.client_params,
        presented: Vec::new(),
        fingerprint: Arc::from(""),
        rewritten: None,
        ddl: analysis
            .statements
            .iter()
            .any(|s| matches!(s, StatementPlan::Ddl)),
        hidden_results: 0,
        row_plans: Arc::default(),
    };
    // The server refuses several statements in one Parse by itself.
    let [statement] = analysis.statements.as_slice() else {
        return Ok(plan);
    };
    match statement {
        StatementPlan::Copy(_) => {
            return Err(Rejection::unsupported(
                "",
                None,
                "COPY on a protected table through the extended protocol (use a simple query)",
            ))
        }
        StatementPlan::Untouched | StatementPlan::Ddl => {}
        StatementPlan::Read => plan.fingerprint = Arc::from(rewrite::fingerprint(query)),
        StatementPlan::ReadRowTenants(read) => {
            plan.fingerprint = Arc::from(rewrite::fingerprint(query));
            plan.rewritten = Some((read.sql.clone(), param_types.to_vec()));
            plan.hidden_results = read.hidden;
        }
        StatementPlan::SetTenant(change) => plan.kind = StatementKind::SetTenant(change.clone()),
        StatementPlan::SetTenantParam { param, local } => {
            plan.kind = StatementKind::SetTenantParam {
                param: *param,
                local: *local,
            }
        }
        StatementPlan::Write(write) => {
            let mut types: Vec<u32> = param_types.to_vec();
            types.resize(analysis.client_params + write.extra_params, 0);
            for cell in write.rows.iter().flat_map(|row| &row.cells) {
                if let ValueSource::Param(n) = cell.value {
                    // PostgreSQL reports a type the client declared as
                    // declared; otherwise the column's plaintext type.
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    let shown = if declared == 0 {
                        cell.ty.oid()
                    } else {
                        declared
                    };
                    plan.presented.push((n - 1, shown));
                }
            }
            for lookup in &write.lookups {
                for slot in &lookup.values {
                    let (n, oid) = match slot.value {
                        rewrite::LookupValue::Param(n) => (n, lookup.ty.oid()),
                        rewrite::LookupValue::ArrayParam(n) => (n, lookup.ty.array_oid()),
                        rewrite::LookupValue::Literal(_) => continue,
                    };
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    plan.presented
                        .push((n - 1, if declared == 0 { oid } else { declared }));
                }
            }
            for cells in write.unnest.iter().flat_map(|u| &u.cells) {
                if let rewrite::ArraySource::Param(n) = cells.source {
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    let shown = if declared == 0 {
                        cells.ty.array_oid()
                    } else {
                        declared
                    };
                    plan.presented.push((n - 1, shown));
                }
            }
            plan.hidden_results = write.hidden_results;
            write.declare_proxy_params(&mut types);
            plan.rewritten = Some((write.statement.to_string(), types));
            plan.fingerprint = Arc::from(rewrite::fingerprint(query));
            plan.kind = StatementKind::Write(Arc::new((**write).clone()));
        }
    }
    Ok(plan)
}

/// The refusal of SQL the proxy may misread because the session's strings
/// are not standard-conforming (see `rewrite::nonstandard_strings_refusal`).
fn nonstandard_strings_refusal(
    sql: &str,
    encryption: &Encryption,
    state: &SessionState,
) -> Option<Rejection> {
    if !state.nonstandard_strings.load(Ordering::Acquire) {
        return None;
    }
    let catalog = encryption.catalog();
    rewrite::nonstandard_strings_refusal(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        sql,
    )
}

/// A rewritten write closed or replaced by the client (see
/// `ClientStatements::retired`).
#[derive(Debug)]
struct Retired {
    /// Sequence number of the retiring Close or Parse.
    seq: u64,
    /// Syncs the client had sent before it (or before a later Parse or
    /// Close of the name).
    syncs: u64,
    statement: Arc<PreparedStatement>,
}

/// A Parse the proxy refuses: the server gets one that fails (SQL that
/// does not parse) under the same name, the client the refusal.
fn refuse_parse(
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
fn refused_parse(
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
fn refuse_bind_after(
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
pub(super) fn refuse_in_flux(
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
fn follow_schema_flux(
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
fn schema_changed(name: &str) -> Rejection {
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
fn shown_name(name: &str) -> String {
    if name.is_empty() {
        "the unnamed statement".to_owned()
    } else {
        format!("statement \"{name}\"")
    }
}

fn own_name_rejection() -> Rejection {
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

fn ambiguous_statement(name: &str) -> Rejection {
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
fn describe_portal(out: &mut BytesMut, name: &str) {
    encode::describe(Target::Portal, name, out);
}

/// Appends a Describe of statement `name`.
fn describe_statement(out: &mut BytesMut, name: &str) {
    encode::describe(Target::Statement, name, out);
}

/// Appends a Close message for the prepared statement `name`.
fn close_statement(out: &mut BytesMut, name: &str) {
    encode::close(Target::Statement, name, out);
}

/// SQL `EXECUTE name` of a statement prepared through the protocol: the
/// server holds it as the proxy rewrote it (ciphertext parameters), and SQL
/// would hand it the client's plaintext. Refused (use Bind/Execute). Found
/// in the parsed statements (inside EXPLAIN or CREATE TABLE AS too), else,
/// for SQL that does not parse, by its words.
fn sql_execute_refusal(
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
fn executed_names(lower: &str, sql: &str) -> Vec<String> {
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
fn unreadable_sql_refusal(sql: &[u8], encryption: &Encryption) -> Option<Rejection> {
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

/// A simple query as the client sent it.
struct SimpleQuery<'a> {
    frame: &'a [u8],
    body: &'a [u8],
    encryption: &'a Encryption,
    state: &'a SessionState,
}

/// A simple query: planned, its protected values encrypted, or replaced by
/// a query that raises the refusal at the server. A write planned by its
/// shape runs as the proxy's own prepared statement.
async fn simple_query(
    query: SimpleQuery<'_>,
    is_prepared: impl Fn(&str) -> bool,
    sql_prepared: &mut SqlPrepared,
    copy_in: &mut Option<Box<CopyIn>>,
) -> BytesMut {
    let SimpleQuery {
        frame,
        body,
        encryption,
        state,
    } = query;
    let tenant = state.tenant();
    let info = state.session_info(tenant.as_deref());
    let Some(sql) = cstr(body) else {
        state.pending.push(Expected::query());
        return match unreadable_sql_refusal(body, encryption) {
            Some(rejection) => {
                encryption.audit_rejection(&rejection, &info);
                query_message(&rejection_query(&rejection))
            }
            None => BytesMut::from(frame),
        };
    };
    let words = StatementWords::of(sql);
    if words.drops {
        state.own_statements(OwnStatements::clear);
    }
    let refusal = nonstandard_strings_refusal(sql, encryption, state)
        .or_else(|| words.names_own.then(own_name_rejection))
        .or_else(|| sql_execute_refusal(sql, words, &is_prepared))
        .or_else(|| sql_prepared.refusal(sql, words, encryption, state));
    if let Some(rejection) = refusal {
        encryption.audit_rejection(&rejection, &info);
        state.pending.push(Expected::query());
        return query_message(&rejection_query(&rejection));
    }
    let cycle = state.cycles_sent.load(Ordering::Acquire);
    let rewritten = encryption
        .rewrite_simple_query(sql, &info)
        .await
        .and_then(|rewrite| {
            follow_schema_flux(sql, rewrite.ddl, cycle, encryption, state)?;
            Ok(rewrite)
        });
    let rewritten = rewritten.and_then(|rewrite| {
        if rewrite.copy.is_some() && state.client_encoding_not_utf8() {
            return Err(Rejection::unsupported(
                "",
                None,
                "COPY with a client_encoding other than UTF8",
            ));
        }
        Ok(rewrite)
    });
    match rewritten {
        Ok(rewrite) => {
            sql_prepared.follow(sql, words);
            let copy = rewrite.copy.as_ref().map(|copy| match copy {
                CopyRewrite::In(plan) => {
                    let max_row = encryption.policy().server.max_message_size;
                    let (copy, response) = CopyIn::start(plan.clone(), tenant.clone(), max_row);
                    *copy_in = Some(Box::new(copy));
                    response
                }
                CopyRewrite::Out(options) => Arc::new(CopyResponse::Out(options.clone())),
            });
            for change in rewrite.tenant_changes {
                state.change_tenant(change, false);
            }
            if rewrite.ddl {
                // It may change what a statement of the proxy's returns.
                state.own_statements(OwnStatements::clear);
            }
            let run = rewrite.bound.as_ref().map(|b| {
                state.own_statements(|own| own.statement_for(&b.sql, &b.types, &b.catalog))
            });
            // The catalog is reloaded at this query's own ReadyForQuery,
            // not at one still on its way for an earlier query.
            state.pending.push(Expected::Query {
                swallow: false,
                fingerprint: rewrite.fingerprint.unwrap_or_else(|| Arc::from("")),
                refresh: rewrite.ddl,
                run_as: run.as_ref().map(|r| r.number),
                copy,
            });
            if let (Some(bound), Some(run)) = (&rewrite.bound, &run) {
                // Its Sync ends a skip-to-Sync at the server, as the
                // client's own do.
                state.syncs.fetch_add(1, Ordering::AcqRel);
                return bound_query_messages(bound, run);
            }
            rewrite
                .sql
                .map_or_else(|| BytesMut::from(frame), |sql| query_message(&sql))
        }
        Err(rejection) => {
            encryption.audit_rejection(&rejection, &info);
            state.pending.push(Expected::query());
            query_message(&rejection_query(&rejection))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sql_execute_refusal, StatementWords};

    #[test]
    fn sql_execute_of_a_protocol_statement_is_found_however_it_is_written() {
        let known = |name: &str| name == "w" || name == "Mixed";
        for sql in [
            "EXECUTE w('acme', 'x', '{}')",
            "EXECUTE/**/w('acme', 'x', '{}')",
            "explain analyze execute W('acme', 'x', '{}')",
            "CREATE TABLE t AS EXECUTE w('acme', 'x', '{}')",
            "EXECUTE \"Mixed\"('a') ; garbage that does not parse (",
            "execute -- comment\n w ('a') !!!",
        ] {
            assert!(
                sql_execute_refusal(sql, StatementWords::of(sql), known).is_some(),
                "{sql}"
            );
        }
        for sql in [
            "EXECUTE other('a')",
            "EXECUTE Mixed('a')",
            "SELECT 'execute w'",
            "DO $$BEGIN EXECUTE 'SELECT 1'; END$$",
        ] {
            assert!(
                sql_execute_refusal(sql, StatementWords::of(sql), known).is_none(),
                "{sql}"
            );
        }
    }
}
