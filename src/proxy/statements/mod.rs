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

mod execute;
mod messages;
mod own;
mod planning;
mod refusals;
mod simple;

use messages::*;
use own::*;
use planning::*;
use refusals::*;
use simple::*;

pub use messages::poison_query;
pub(super) use refusals::refuse_in_flux;

/// A statement name no client uses: a Bind to it fails at the server.
const REFUSED_STATEMENT: &str = "cmk-proxy: refused";
/// Portal records kept per session before the oldest are forgotten.
const MAX_PORTALS: usize = 256;
/// SQL that fails to parse at the server, for a refused Parse.
const REFUSED_SQL: &str = "cmk-proxy refused this statement";

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
        let server_name = own
            .as_ref()
            .map_or(bind.statement, |(_, name)| name.as_str());
        let described = describe_for_origins(&statement, server_name, encryption, state, &mut out);
        let wire = wire_formats(&statement, &bind.result_formats, encryption);
        self.bind_portal(&bind, statement.clone(), wire.clone());
        state.pending.push(Expected::Bind {
            refusal: None,
            own: own.as_ref().map(|(number, _)| *number),
        });
        if own.is_none() && wire.is_none() && !described {
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
