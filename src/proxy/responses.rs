//! The server direction of a session with a policy: every response is
//! matched with the request it answers (the [`PendingQueue`] the client
//! direction fills), so that
//! - ParameterDescription and RowDescription show the declared plaintext
//!   types, and the result columns of a statement are remembered for its
//!   later executions;
//! - the rows of a simple query or of an Execute are decrypted with the plan
//!   of their columns and formats;
//! - the answers to the proxy's own injected messages are never shown, and
//!   server errors that carry out a refusal of the proxy are replaced by it;
//! - after a cell failed, the rest of the request cycle is dropped up to its
//!   ReadyForQuery (the client has its error), and a transaction that the
//!   client was told failed is made to fail on the server too.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::copy::{copy_context_without_line, copy_in_response, CopyOut, CopyResponse};
use super::encryption::Encryption;
use super::pending::{Expected, Portal, PreparedStatement, Shape, StatementKind};
use super::relay::Interest;
use super::results::{plan_rows, with_statement_origins, PlannedRows, ResultPlan};
use super::state::{EndSettled, SessionState};
use crate::protocol::messages::{decode_parameter_description, encode_parameter_description};
use crate::protocol::{backend, edit_error_field, error_code, ErrorResponse, HEADER_LEN};

/// Backend tags not tied to a request: they may come at any time.
const NOTICE: u8 = b'N';
const NOTIFICATION: u8 = b'A';
const PARSE_COMPLETE: u8 = b'1';
const BIND_COMPLETE: u8 = b'2';
const CLOSE_COMPLETE: u8 = b'3';
const NO_DATA: u8 = b'n';
const PARAMETER_DESCRIPTION: u8 = b't';
const EMPTY_QUERY: u8 = b'I';
const PORTAL_SUSPENDED: u8 = b's';

/// What to do with one server message.
#[derive(Debug)]
pub enum Step {
    /// Send it unchanged.
    Forward,
    /// Send these bytes instead.
    Replace(BytesMut),
    /// Send nothing.
    Drop,
    /// A DataRow to decrypt (async: [`ResponseTracker::decrypt`]).
    Decrypt,
    /// A ReadyForQuery that waits for a catalog refresh
    /// (async: [`ResponseTracker::ready`]).
    Ready,
}

/// The server direction's view of the request cycle being answered.
#[derive(Default)]
pub struct ResponseTracker {
    /// Expected responses taken from the shared queue; the front one is
    /// being answered.
    queue: VecDeque<Expected>,
    /// Plan of the result set being relayed.
    plan: Option<ResultPlan>,
    /// The plan of the front Execute has been looked up.
    resolved: bool,
    /// A cell failed in this cycle: at ReadyForQuery inside a transaction,
    /// the transaction is poisoned (SQLSTATE, message).
    failure: Option<(&'static str, String)>,
    /// Drop every response up to the ReadyForQuery that ends the cycle.
    skipping: bool,
    /// The server skips to the client's Sync after an error in its
    /// extended-protocol batch, and that Sync is not queued yet: entries
    /// queued before it are ignored by the server.
    skip_to_sync: bool,
    /// A ReadyForQuery held for a catalog refresh.
    ready_out: Option<BytesMut>,
    /// The cycle that ReadyForQuery answers, when the session's DDL on
    /// protected data is settled by the refresh (see `SchemaFlux`).
    flux_cycle: Option<u64>,
    /// The last transaction end of this cycle was a ROLLBACK (undoes tenant
    /// changes).
    rolled_back: bool,
    /// The SELECT being answered stands for a client's COPY TO.
    copy_out: Option<CopyOut>,
}

/// Records the outcome of a Parse or Close that retires a rewritten write;
/// for a simple query run as the proxy's statement, a Parse of it that did
/// not complete (failed or skipped) left no statement.
fn settle(entry: &Expected, state: &SessionState, done: bool) {
    if let Some(number) = entry.run_as() {
        state.own_statements(|own| own.failed(number, None));
    }
    if let Expected::Parse {
        own: Some(number), ..
    } = entry
    {
        if done {
            state.own_statements(|own| own.parsed(*number));
        } else {
            state.own_statements(|own| own.failed(*number, None));
        }
    }
    if let Expected::Parse {
        retires: Some(seq), ..
    }
    | Expected::Close {
        retires: Some(seq), ..
    } = entry
    {
        state.settle_retirement(*seq, done);
    }
}

impl ResponseTracker {
    /// The entry being answered, taking queued entries from the shared
    /// queue when the local one has run out.
    fn front(&mut self, state: &SessionState) -> Option<&Expected> {
        if self.queue.is_empty() {
            state.pending.drain_into(&mut self.queue);
        }
        if self.skip_to_sync {
            self.skip_to_the_sync(state, true);
        }
        self.queue.front()
    }

    /// After an error: drops the entries the server skips, up to the
    /// client's Sync (`in_batch`: the error was in an extended-protocol
    /// batch) or to the end of the simple query. Returns with
    /// `skip_to_sync` set when the Sync is not queued yet.
    fn skip_to_the_sync(&mut self, state: &SessionState, in_batch: bool) {
        loop {
            if self.queue.is_empty() {
                state.pending.drain_into(&mut self.queue);
            }
            let Some(entry) = self.queue.front() else {
                self.skip_to_sync = in_batch;
                return;
            };
            let ends_here = match entry {
                Expected::Sync { .. } => true,
                other => other.ends_with_ready() && !in_batch,
            };
            if ends_here {
                self.skip_to_sync = false;
                return;
            }
            if let Some(entry) = self.queue.pop_front() {
                if entry.ends_with_ready() {
                    // A simple query or function call the server ignores:
                    // its cycle is over without a ReadyForQuery.
                    let cycle = state.cycle_ignored();
                    state.cycle_answered(cycle);
                }
                // Failed, or skipped to the Sync: not done.
                settle(&entry, state, false);
            }
        }
    }

    /// Ends the entry being answered (see `front`).
    fn pop(&mut self, state: &SessionState) -> Option<Expected> {
        self.front(state);
        self.queue.pop_front()
    }

    /// The proxy's statement the simple query being answered runs as.
    fn answering_own_statement(&mut self, state: &SessionState) -> Option<u64> {
        self.front(state).and_then(Expected::run_as)
    }

    /// The simple query being answered was sent as extended-protocol
    /// messages (see `Expected::Query::extended`).
    fn answering_extended(&mut self, state: &SessionState) -> bool {
        self.front(state).is_some_and(Expected::extended)
    }

    fn dropping(&mut self, state: &SessionState) -> bool {
        self.skipping || self.front(state).is_some_and(Expected::swallowed)
    }

    /// How much of a message with `tag` must be seen. No side effects other
    /// than taking queued entries and looking up the plan of an Execute.
    pub fn interest(&mut self, tag: u8, state: &SessionState, encryption: &Encryption) -> Interest {
        match tag {
            NOTICE | NOTIFICATION | backend::PARAMETER_STATUS => Interest::Header,
            backend::READY_FOR_QUERY
            | backend::ERROR_RESPONSE
            | backend::ROW_DESCRIPTION
            | PARAMETER_DESCRIPTION => Interest::Rewrite,
            _ if self.dropping(state) => Interest::Rewrite,
            PARSE_COMPLETE | BIND_COMPLETE | NO_DATA | CLOSE_COMPLETE
                if self.answering_extended(state) =>
            {
                Interest::Rewrite
            }
            // The tag tells whether a tenant change was rolled back.
            backend::COMMAND_COMPLETE if state.tenant_change_pending() => Interest::Rewrite,
            backend::COMMAND_COMPLETE if self.copy_out.is_some() => Interest::Rewrite,
            backend::COPY_IN_RESPONSE => Interest::Rewrite,
            backend::DATA_ROW => {
                self.resolve(encryption);
                if self.plan.is_some() || self.copy_out.is_some() {
                    Interest::Rewrite
                } else {
                    Interest::Header
                }
            }
            _ => Interest::Header,
        }
    }

    /// Finds the plan of the front Execute's rows, once.
    fn resolve(&mut self, encryption: &Encryption) {
        if self.resolved {
            return;
        }
        let Some(Expected::Execute(portal)) = self.queue.front() else {
            return;
        };
        self.resolved = true;
        self.plan = execution_plan(portal, encryption);
    }

    /// Handles one server message (`frame` is `None` for messages relayed
    /// with header interest: bookkeeping only).
    pub fn on_message(
        &mut self,
        tag: u8,
        frame: Option<&[u8]>,
        state: &SessionState,
        encryption: &Encryption,
    ) -> Step {
        if matches!(tag, NOTICE | NOTIFICATION | backend::PARAMETER_STATUS) {
            return Step::Forward;
        }
        if matches!(
            tag,
            PARSE_COMPLETE | BIND_COMPLETE | NO_DATA | CLOSE_COMPLETE
        ) && self.answering_extended(state)
        {
            // Answers to the messages a simple query was run as.
            if let Some(number) = self.answering_own_statement(state) {
                if tag == PARSE_COMPLETE {
                    state.own_statements(|own| own.parsed(number));
                }
            }
            return Step::Drop;
        }
        // The server's error to a Describe the proxy slipped in before the
        // client's Execute is the error of that Execute (skipped with it);
        // to a Parse of the proxy's statement, that of the client's Bind or
        // Describe it was sent for.
        let injected_failed = tag == backend::ERROR_RESPONSE
            && !self.skipping
            && matches!(
                self.front(state),
                Some(Expected::DescribePortal { swallow: true, .. })
                    | Some(Expected::Parse { swallow: true, .. })
                    | Some(Expected::StatementOrigins(_))
            );
        let dropping = self.dropping(state) && !injected_failed;
        let step = match (tag, frame) {
            (backend::READY_FOR_QUERY, Some(frame)) => return self.on_ready(frame, state),
            (backend::COPY_IN_RESPONSE, Some(_)) => {
                match self.front(state).and_then(Expected::copy) {
                    Some(copy) => match &**copy {
                        CopyResponse::In { fields, .. } => Step::Replace(copy_in_response(*fields)),
                        CopyResponse::Out(_) => Step::Forward,
                    },
                    None => Step::Forward,
                }
            }
            (backend::ERROR_RESPONSE, Some(frame)) => {
                self.copy_out = None;
                // The answer to the proxy's CopyFail: the row's error.
                let copy_failure = match self.front(state).and_then(Expected::copy).map(|c| &**c) {
                    Some(CopyResponse::In { failure, .. }) => {
                        failure.lock().ok().and_then(|mut f| f.take())
                    }
                    _ => None,
                };
                let binding_own = match self.front(state) {
                    Some(Expected::Bind { own, .. }) => *own,
                    _ => None,
                };
                if let Some(number) = self.answering_own_statement(state).or(binding_own) {
                    // A statement the server lost (26000) or cannot run as
                    // parsed (0A000) is parsed anew next time.
                    let sqlstate = frame.get(HEADER_LEN..).and_then(error_code);
                    state.own_statements(|own| own.failed(number, sqlstate));
                }
                // Unless a COMMIT follows in this cycle (it cannot: the
                // server skips to the end of the query or the Sync), the
                // transaction the error happened in is rolled back, an
                // implicit one included: `SET …; SELECT 1/0` keeps the old
                // tenant on the server.
                self.rolled_back = true;
                let copy_in = matches!(
                    self.front(state).and_then(Expected::copy).map(|c| &**c),
                    Some(CopyResponse::In { .. })
                );
                match (self.on_error(state), copy_failure) {
                    (_, Some(failure)) => Step::Replace(failure.to_bytes()),
                    // PostgreSQL quotes the line it received: the proxy's,
                    // with the cells' ciphertext.
                    (Step::Forward, None) if copy_in => {
                        match edit_error_field(frame, b'W', copy_context_without_line) {
                            Some(edited) => Step::Replace(edited),
                            None => Step::Forward,
                        }
                    }
                    (step, None) => step,
                }
            }
            (backend::ROW_DESCRIPTION, Some(frame)) => self.on_row_description(frame, encryption),
            (PARAMETER_DESCRIPTION, Some(frame)) => self.on_parameter_description(frame),
            (backend::DATA_ROW, _) => {
                self.resolve(encryption);
                match &self.plan {
                    Some(plan) if plan.failed => Step::Drop,
                    Some(_) if !dropping => Step::Decrypt,
                    None if self.copy_out.is_some() && !dropping => Step::Decrypt,
                    _ => Step::Forward,
                }
            }
            (backend::COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED, frame) => {
                // Each COMMIT or ROLLBACK tag settles the transaction end
                // (or ROLLBACK TO) the client sent, in order: what comes
                // after it in the cycle (an error, another transaction,
                // AND CHAIN's) is another transaction's. Ends the proxy did
                // not see: a ROLLBACK leaves the cycle's end to decide, a
                // COMMIT ends the transaction at once.
                // The cycle being answered (its ReadyForQuery is still to
                // come).
                let cycle = || {
                    state
                        .cycles_answered
                        .load(std::sync::atomic::Ordering::Acquire)
                        + 1
                };
                match frame.and_then(|f| f.get(HEADER_LEN..)) {
                    Some(b"ROLLBACK\0") => match state.settle_transaction_end(false, cycle()) {
                        Some(EndSettled::Transaction) => self.rolled_back = false,
                        Some(EndSettled::Savepoint) => {}
                        None => self.rolled_back = true,
                    },
                    Some(b"COMMIT\0") => {
                        self.rolled_back = false;
                        if state.settle_transaction_end(true, cycle()).is_none() {
                            state.end_tenant_transaction(false, cycle());
                        }
                    }
                    _ => {}
                }
                match (self.end_result(state, encryption), self.copy_out.take()) {
                    (Step::Forward, Some(copy)) => Step::Replace(copy.end()),
                    (step, _) => step,
                }
            }
            (PARSE_COMPLETE | BIND_COMPLETE | CLOSE_COMPLETE, _) => {
                if let Some(entry) = self.pop(state) {
                    settle(&entry, state, true);
                }
                Step::Forward
            }
            (NO_DATA, _) => {
                if let Some(Expected::DescribePortal { portal, .. }) = self.queue.front() {
                    if let Ok(mut slot) = portal.planned.lock() {
                        *slot = Some(Arc::new(PlannedRows::nothing()));
                    }
                }
                self.remember_shape(None);
                Step::Forward
            }
            _ => Step::Forward,
        };
        match step {
            Step::Forward | Step::Replace(_) if dropping => Step::Drop,
            other => other,
        }
    }

    /// ReadyForQuery: the entries up to the one it ends are done.
    fn on_ready(&mut self, frame: &[u8], state: &SessionState) -> Step {
        let mut swallowed = false;
        let mut refresh = false;
        while let Some(entry) = self.pop(state) {
            settle(&entry, state, false);
            refresh |= entry.refreshes();
            if entry.ends_with_ready() {
                swallowed = entry.swallowed();
                break;
            }
        }
        self.plan = None;
        self.resolved = false;
        self.skipping = false;
        self.copy_out = None;
        // Out of any transaction: tenant changes are final (or undone).
        let rolled_back = std::mem::take(&mut self.rolled_back);
        let cycle = state
            .cycles_answered
            .load(std::sync::atomic::Ordering::Acquire);
        state.cycle_answered(cycle);
        if frame.last() == Some(&b'I') {
            state.end_tenant_transaction(rolled_back, cycle);
            // The session's DDL is committed (or rolled back): the proxy's
            // catalog connection sees it now.
            if state.flux_due(cycle) {
                refresh = true;
                self.flux_cycle = Some(cycle);
            }
        }
        if swallowed {
            return Step::Drop;
        }
        let mut out = None;
        if let Some((code, message)) = self.failure.take() {
            if frame.last() == Some(&b'T') {
                // The client was told its statement failed: from its point
                // of view the transaction is aborted, and the server's will
                // be before anything else runs.
                state.poison.set(code, message);
                let mut bytes = BytesMut::from(frame);
                if let Some(status) = bytes.last_mut() {
                    *status = b'E';
                }
                out = Some(bytes);
            }
        }
        if refresh {
            self.ready_out = Some(out.unwrap_or_else(|| BytesMut::from(frame)));
            return Step::Ready;
        }
        match out {
            Some(bytes) => Step::Replace(bytes),
            None => Step::Forward,
        }
    }

    /// ErrorResponse: ends the current statement of a simple query, or the
    /// current extended-protocol message, after which the server skips to Sync.
    fn on_error(&mut self, state: &SessionState) -> Step {
        self.plan = None;
        self.resolved = false;
        let refusal = match self.front(state) {
            Some(Expected::Parse { refusal, .. }) | Some(Expected::Bind { refusal, .. }) => {
                refusal.clone()
            }
            _ => None,
        };
        // An error in an extended-protocol batch: the server skips every
        // message up to the client's Sync, simple queries and function
        // calls included (they get no answer at all, not even their
        // ReadyForQuery). An error of a simple query ends at its own.
        let in_batch = self.front(state).is_some_and(|e| !e.ends_with_ready());
        self.skip_to_the_sync(state, in_batch);
        match refusal {
            Some(refusal) => {
                Step::Replace(ErrorResponse::error(refusal.sqlstate, &refusal.message).to_bytes())
            }
            None => Step::Forward,
        }
    }

    fn on_row_description(&mut self, frame: &[u8], encryption: &Encryption) -> Step {
        let catalog = encryption.catalog();
        let guard = encryption.policy();
        let policy: &crate::config::Policy = &guard;
        let planned = match self.queue.front() {
            Some(Expected::Query {
                fingerprint, copy, ..
            }) => {
                let planned = plan_rows(frame, None, None, &catalog, policy);
                self.plan = planned.as_ref().ok().and_then(|p| {
                    let layout = p.layout.clone()?;
                    Some(ResultPlan::new(layout, fingerprint))
                });
                if let (Some(CopyResponse::Out(options)), Ok(planned)) = (copy.as_deref(), &planned)
                {
                    // The client asked for a COPY: its rows follow as such.
                    let shown = planned.shown.as_deref().unwrap_or(frame);
                    let (copy_out, start) = CopyOut::start(options.clone(), shown);
                    self.copy_out = Some(copy_out);
                    return Step::Replace(start);
                }
                planned.map(Arc::new)
            }
            Some(Expected::DescribeStatement(_)) => {
                self.remember_shape(Some(frame));
                plan_rows(frame, None, None, &catalog, policy).map(Arc::new)
            }
            Some(Expected::StatementOrigins(_)) => {
                self.remember_shape(Some(frame));
                return Step::Drop;
            }
            Some(Expected::DescribePortal { portal, .. }) => {
                // A portal's columns are shown in the formats its client
                // asked for, with the origins its statement's description
                // names where the portal's names none.
                let traced = traced_by_statement(frame, &portal.statement);
                let planned = portal.statement.row_plans.plan(
                    traced.as_deref().unwrap_or(frame),
                    None,
                    Some(&portal.client_formats),
                    &catalog,
                    policy,
                );
                if let Ok(planned) = &planned {
                    if let Ok(mut slot) = portal.planned.lock() {
                        *slot = Some(planned.clone());
                    }
                }
                self.remember_shape(Some(frame));
                planned
            }
            _ => return Step::Forward,
        };
        match planned {
            Ok(planned) => match &planned.shown {
                Some(shown) => Step::Replace(BytesMut::from(&shown[..])),
                None => Step::Forward,
            },
            Err(e) => Step::Replace(
                ErrorResponse::error("08P01", &format!("cmk-proxy: {e} from the server"))
                    .to_bytes(),
            ),
        }
    }

    /// Stores the answer to a Describe (`rows`: its RowDescription frame,
    /// `None` for NoData) and ends that entry. A portal's statement learns
    /// its columns from the first answer (later Binds of it can ask for
    /// protected cells in binary); the frame is copied only when stored.
    fn remember_shape(&mut self, rows: Option<&[u8]>) {
        let shape = || rows.map_or(Shape::NoData, |f| Shape::Rows(Bytes::copy_from_slice(f)));
        match self.queue.front() {
            Some(
                Expected::DescribeStatement(statement) | Expected::StatementOrigins(statement),
            ) => {
                if let Ok(mut slot) = statement.shape.lock() {
                    *slot = Some(shape());
                }
            }
            Some(Expected::DescribePortal { portal, .. }) => {
                if let Ok(mut statement) = portal.statement.shape.lock() {
                    if statement.is_none() {
                        *statement = Some(shape());
                    }
                }
            }
            _ => return,
        }
        self.queue.pop_front();
    }

    /// ParameterDescription: the client sees its own parameters only, with
    /// the declared plaintext type for protected ones.
    fn on_parameter_description(&mut self, frame: &[u8]) -> Step {
        let statement = match self.queue.front() {
            Some(Expected::DescribeStatement(statement)) => statement,
            // The proxy's Describe, of its own or the unnamed statement.
            Some(Expected::StatementOrigins(_) | Expected::Query { extended: true, .. }) => {
                return Step::Drop
            }
            _ => return Step::Forward,
        };
        let Ok(mut oids) = decode_parameter_description(&frame[HEADER_LEN..]) else {
            return Step::Forward;
        };
        // Only a rewritten write has parameters of the proxy's to hide,
        // or parameters shown with their plaintext type.
        let rewritten = matches!(statement.kind, StatementKind::Write(_));
        if !rewritten && statement.presented.is_empty()
            || oids.len() == statement.client_params && statement.presented.is_empty()
        {
            return Step::Forward;
        }
        oids.truncate(statement.client_params);
        for (index, oid) in &statement.presented {
            if let Some(slot) = oids.get_mut(*index) {
                *slot = *oid;
            }
        }
        let mut out = BytesMut::with_capacity(frame.len());
        encode_parameter_description(&oids, &mut out);
        Step::Replace(out)
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended: the result
    /// set is done (audited), and an Execute is answered.
    fn end_result(&mut self, state: &SessionState, encryption: &Encryption) -> Step {
        let step = match self.plan.take() {
            Some(plan) if plan.failed => Step::Drop,
            Some(mut plan) => {
                encryption.audit_decrypt(plan.take_batch(), &state.session_info(None));
                Step::Forward
            }
            None => Step::Forward,
        };
        if matches!(self.queue.front(), Some(Expected::Execute(_))) {
            self.queue.pop_front();
        }
        self.resolved = false;
        step
    }

    /// Decrypts a held DataRow; returns what the client gets (the row, an
    /// ErrorResponse after which the cycle is dropped, or nothing).
    pub async fn decrypt(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        let Some(plan) = self.plan.as_mut() else {
            return match self.copy_out.as_mut() {
                Some(copy) => copy.row(BytesMut::from(frame)),
                None => BytesMut::from(frame),
            };
        };
        if plan.failed {
            return BytesMut::new();
        }
        let tenant = state.tenant();
        match plan.decrypt_row(frame, encryption, tenant.as_deref()).await {
            Ok(out) => match self.copy_out.as_mut() {
                Some(copy) => copy.row(out),
                None => out,
            },
            Err((code, message, out)) => {
                self.failure = Some((code, message));
                self.skipping = true;
                self.copy_out = None;
                out
            }
        }
    }

    /// Refreshes the catalog map after DDL, then returns the held
    /// ReadyForQuery.
    pub async fn ready(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        let reloaded = encryption.refresh_catalog().await;
        if let Some(cycle) = self.flux_cycle.take() {
            // A failed reload keeps the names in flux: statements on them
            // stay refused, and the next ReadyForQuery tries again.
            if reloaded {
                state.settle_flux(cycle);
            }
        }
        self.ready_out
            .take()
            .unwrap_or_else(|| BytesMut::from(frame))
    }
}

/// A portal's RowDescription with the origins its statement's description
/// names (see [`with_statement_origins`]), when it lacks some.
fn traced_by_statement(frame: &[u8], statement: &PreparedStatement) -> Option<Bytes> {
    let shape = statement.shape.lock().ok()?;
    match shape.as_ref()? {
        Shape::Rows(described) => with_statement_origins(frame, described),
        Shape::NoData => None,
    }
}

/// The plan of an Execute's rows: from a Describe of the portal (real
/// formats), else from a Describe of its statement and the Bind's formats.
fn execution_plan(portal: &Portal, encryption: &Encryption) -> Option<ResultPlan> {
    let fingerprint = &portal.statement.fingerprint;
    let described = portal.planned.lock().ok().and_then(|p| p.clone());
    if let Some(planned) = described {
        return Some(ResultPlan::new(planned.layout.clone()?, fingerprint));
    }
    let shape = portal.statement.shape.lock().ok().and_then(|s| s.clone());
    match shape {
        Some(Shape::NoData) => None,
        // The statement's RowDescription has text formats: those of the
        // Bind apply.
        Some(Shape::Rows(frame)) => {
            let planned = portal.statement.row_plans.plan(
                &frame,
                Some(&portal.result_formats),
                Some(&portal.client_formats),
                &encryption.catalog(),
                &encryption.policy(),
            );
            match planned {
                Ok(planned) => Some(ResultPlan::new(planned.layout.clone()?, fingerprint)),
                Err(_) => Some(ResultPlan::unknown_shape(fingerprint)),
            }
        }
        // Never described (the proxy describes such portals itself, so this
        // is a fallback): refuse any envelope that shows up.
        None => Some(ResultPlan::unknown_shape(fingerprint)),
    }
}
