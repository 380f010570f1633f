//! State shared by the two directions of one session.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use super::encryption::SessionInfo;
use super::own_statements::OwnStatements;
use super::pending::PendingQueue;
use crate::rewrite::{SavepointOp, TenantChange};

/// The tenant before the first change in the current transaction, and
/// whether a change was `SET LOCAL`.
#[derive(Debug, Default)]
pub(crate) struct TenantUndo {
    before: Option<Option<String>>,
    local: bool,
    /// The transaction's savepoints, oldest first: name, and the tenant
    /// and LOCAL flag when it was made.
    savepoints: Vec<(String, Option<String>, bool)>,
    /// The request cycle (Query or Sync, numbered from 1) of the last
    /// change: a cycle's end decides only about its own changes (a
    /// pipelined later SET is not undone by an earlier cycle's error).
    last_cycle: u64,
    /// Tenant changes applied so far (numbers them for the ends below).
    changes: u64,
    /// Transaction ends and ROLLBACK TOs sent, oldest first, each waiting
    /// for its CommandComplete tag (COMMIT or ROLLBACK), which arrive in
    /// the same order.
    ends: std::collections::VecDeque<EndMark>,
}

/// A COMMIT, ROLLBACK or ROLLBACK TO on its way: what the session looked
/// like when it was sent.
#[derive(Debug)]
struct EndMark {
    /// Its request cycle (a skipped end is dropped when that cycle ends).
    cycle: u64,
    /// ROLLBACK TO (handled when sent; only its tag is to be matched).
    savepoint_only: bool,
    /// The tenant, the pending undo and the LOCAL flag before it.
    tenant: Option<String>,
    before: Option<Option<String>>,
    local: bool,
    /// Changes applied before it, and savepoints recorded before it.
    changes: u64,
    savepoints: usize,
}

/// What a COMMIT or ROLLBACK tag settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndSettled {
    /// A ROLLBACK TO's tag.
    Savepoint,
    /// A transaction end: the changes before it are final or undone.
    Transaction,
}

/// The failure a poisoned session's server transaction must be made to
/// fail with (SQLSTATE, message). The flag is read for every client
/// message; the lock is taken only to set or take the failure.
#[derive(Debug, Default)]
pub(crate) struct Poison {
    set: AtomicBool,
    failure: Mutex<Option<(&'static str, String)>>,
}

impl Poison {
    /// Poisons the session with this failure.
    pub(crate) fn set(&self, code: &'static str, message: String) {
        if let Ok(mut failure) = self.failure.lock() {
            *failure = Some((code, message));
            self.set.store(true, Ordering::Release);
        }
    }

    /// Takes the failure (the session is no longer poisoned).
    pub(crate) fn take(&self) -> Option<(&'static str, String)> {
        let mut failure = self.failure.lock().ok()?;
        self.set.store(false, Ordering::Release);
        failure.take()
    }

    /// True while a failure waits to be taken.
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

/// State shared by the two directions of a session.
pub(crate) struct SessionState {
    /// Request cycles sent by the client and not yet answered by ReadyForQuery.
    /// Starts at 1: the startup cycle ends with the first ReadyForQuery.
    pub(crate) open_cycles: AtomicI64,
    /// Last transaction status from ReadyForQuery (`I`, `T`, `E`).
    pub(crate) tx_status: AtomicU8,
    /// CancelRequest for this session's backend (from BackendKeyData).
    pub(crate) cancel_packet: Mutex<Option<[u8; 16]>>,
    /// The client sent Terminate.
    pub(crate) terminated: AtomicBool,
    /// The session's tenant (startup options, user map, SET).
    pub(crate) tenant: Mutex<Option<String>>,
    /// The tenant the session started with (startup options, user map):
    /// where RESET, DEFAULT and DISCARD ALL go back to, as on the server.
    pub(crate) default_tenant: Option<String>,
    /// What undoes the tenant changes of the current transaction.
    pub(crate) tenant_undo: Mutex<TenantUndo>,
    /// With a policy: the responses the server owes, in order.
    pub(crate) pending: PendingQueue,
    /// Outcomes of Parse and Close messages that retire a rewritten write
    /// (by sequence number): `true` when the server did it, `false` when it
    /// skipped or refused it and still holds the write under its name.
    pub(crate) retirements: Mutex<HashMap<u64, bool>>,
    /// Sync messages the client has sent (after an error the server skips
    /// every message up to the next Sync).
    pub(crate) syncs: AtomicU64,
    /// Request cycles sent (Query, Sync, FunctionCall, injected queries)
    /// and answered (ReadyForQuery), counted from the first after startup.
    pub(crate) cycles_sent: AtomicU64,
    pub(crate) cycles_answered: AtomicU64,
    /// The server reported `standard_conforming_strings = off`: a backslash
    /// in a string literal then escapes, which the proxy's parser does not.
    pub(crate) nonstandard_strings: AtomicBool,
    /// The server reported a `client_encoding` other than UTF8: the proxy
    /// cannot read COPY data (docs/COPY.md).
    pub(crate) other_client_encoding: AtomicBool,
    /// A DDL statement was parsed (extended protocol): the next Sync's
    /// ReadyForQuery reloads the catalog.
    pub(crate) refresh_catalog: AtomicBool,
    /// Relation names changed by the session's DDL on protected data that
    /// the catalog may not show yet (see `rewrite::schema_flux`).
    pub(crate) schema_flux: Mutex<SchemaFlux>,
    /// A read failed inside a transaction: before the client's next message
    /// the server transaction is made to fail too.
    pub(crate) poison: Poison,
    /// The proxy's own prepared statements on the server connection.
    pub(crate) own_statements: Mutex<OwnStatements>,
    /// The client has sent extended-protocol messages since its last Sync:
    /// a Sync of the proxy's would end that batch (and a skip-to-Sync after
    /// its error), so simple queries are not run as statements meanwhile.
    pub(crate) extended_open: AtomicBool,
    /// Database user and client address, for audit events.
    pub(crate) user: String,
    pub(crate) client_addr: String,
}

/// DDL on protected data the session sent whose effect the catalog may not
/// show: its own connection sees the change at once, the proxy's catalog
/// connection only after the transaction commits.
#[derive(Debug, Default)]
pub(crate) struct SchemaFlux {
    /// Relation names the DDL created, replaced, altered or renamed.
    names: HashSet<String>,
    /// Such DDL was sent: the catalog is reloaded at the ReadyForQuery,
    /// outside a transaction, that answers `last_cycle` or a later cycle.
    pending: bool,
    last_cycle: u64,
}

impl SessionState {
    /// The names in flux, when there are any (else `None`, the usual case).
    pub(crate) fn flux_names(&self) -> Option<HashSet<String>> {
        let flux = self.schema_flux.lock().ok()?;
        (!flux.names.is_empty()).then(|| flux.names.clone())
    }

    /// DDL on protected data sent in request cycle `cycle`, changing `names`.
    pub(crate) fn add_flux(&self, names: Vec<String>, cycle: u64) {
        let mut flux = self
            .schema_flux
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        flux.names.extend(names);
        flux.pending = true;
        flux.last_cycle = flux.last_cycle.max(cycle);
    }

    /// True when a ReadyForQuery outside a transaction that answers cycle
    /// `answered` must reload the catalog for the session's DDL.
    pub(crate) fn flux_due(&self, answered: u64) -> bool {
        self.schema_flux
            .lock()
            .is_ok_and(|flux| flux.pending && flux.last_cycle <= answered)
    }

    /// The catalog was reloaded after the ReadyForQuery that answered cycle
    /// `answered`, outside a transaction: DDL sent up to it is in the
    /// catalog (or was rolled back), and its names are in flux no more.
    pub(crate) fn settle_flux(&self, answered: u64) {
        if let Ok(mut flux) = self.schema_flux.lock() {
            if flux.last_cycle <= answered {
                *flux = SchemaFlux::default();
            }
        }
    }

    /// A request cycle (Query, Sync, FunctionCall, injected query) is sent:
    /// one ReadyForQuery more is owed.
    pub(crate) fn cycle_sent(&self) {
        self.open_cycles.fetch_add(1, Ordering::AcqRel);
        self.cycles_sent.fetch_add(1, Ordering::AcqRel);
    }

    /// Works on the proxy's own statements.
    pub(crate) fn own_statements<T>(&self, work: impl FnOnce(&mut OwnStatements) -> T) -> T {
        // The record stays consistent whatever panicked while holding it:
        // each change is a single collection operation.
        let mut own = self
            .own_statements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        work(&mut own)
    }

    /// A request cycle the server ignored (a simple query or function call
    /// sent while it skipped to a Sync): it is over with no ReadyForQuery.
    /// Returns its number.
    pub(crate) fn cycle_ignored(&self) -> u64 {
        self.open_cycles.fetch_sub(1, Ordering::AcqRel);
        self.cycles_answered.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Records what the server did with retiring message `seq`.
    pub(crate) fn settle_retirement(&self, seq: u64, done: bool) {
        if let Ok(mut outcomes) = self.retirements.lock() {
            outcomes.insert(seq, done);
        }
    }

    /// What the server did with retiring message `seq`, once known.
    pub(crate) fn take_retirement(&self, seq: u64) -> Option<bool> {
        self.retirements.lock().ok()?.remove(&seq)
    }

    pub(crate) fn tenant(&self) -> Option<String> {
        self.tenant.lock().ok().and_then(|t| t.clone())
    }

    /// Applies a tenant change the client sent (SET, SET LOCAL, RESET,
    /// DISCARD ALL), remembering what undoes it, or a savepoint statement.
    /// `next_sync`: the change is in an extended-protocol cycle whose Sync
    /// is still to come (else in the Query just counted).
    pub(crate) fn change_tenant(&self, change: TenantChange, next_sync: bool) {
        let (Ok(mut undo), Ok(mut tenant)) = (self.tenant_undo.lock(), self.tenant.lock()) else {
            return;
        };
        let cycle = self.cycles_sent.load(Ordering::Acquire) + u64::from(next_sync);
        undo.last_cycle = cycle;
        let mark = |undo: &TenantUndo, savepoint_only: bool| EndMark {
            cycle,
            savepoint_only,
            tenant: tenant.clone(),
            before: undo.before.clone(),
            local: undo.local,
            changes: undo.changes,
            savepoints: undo.savepoints.len(),
        };
        let position = |undo: &TenantUndo, name: &str| {
            undo.savepoints
                .iter()
                .rposition(|(saved, _, _)| saved == name)
        };
        match change.savepoint {
            Some(SavepointOp::Define(name)) => {
                let local = undo.local;
                undo.savepoints.push((name, tenant.clone(), local));
                return;
            }
            // RELEASE keeps the tenant. The savepoint stays recorded: had
            // the server skipped the RELEASE (after an error), a later
            // ROLLBACK TO it works there and must here; had it done it, that
            // ROLLBACK TO fails and the transaction's end undoes the rest.
            Some(SavepointOp::Release(_)) => return,
            // Decided when its tag arrives; changes after it belong to the
            // next transaction (a LOCAL one too).
            Some(SavepointOp::Commit | SavepointOp::Rollback) => {
                let end = mark(&undo, false);
                undo.ends.push_back(end);
                undo.local = false;
                return;
            }
            Some(SavepointOp::RollbackTo(name)) => {
                let end = mark(&undo, true);
                undo.ends.push_back(end);
                // Later savepoints stay recorded too: had the server skipped
                // or refused this ROLLBACK TO (after an error), a later
                // ROLLBACK TO one of them recovers the transaction there and
                // must here; had it done it, a ROLLBACK TO one of them fails
                // there (the transaction stays aborted until a rollback this
                // tracking follows). An unknown name is the server's error.
                if let Some(at) = position(&undo, &name) {
                    let (_, saved, local) = undo.savepoints[at].clone();
                    if undo.before.is_none() {
                        undo.before = Some(tenant.clone());
                    }
                    *tenant = saved;
                    undo.local = local;
                }
                return;
            }
            None => {}
        }
        if undo.before.is_none() {
            undo.before = Some(tenant.clone());
        }
        undo.changes += 1;
        undo.local |= change.local;
        *tenant = change.resolve(self.default_tenant.as_deref());
    }

    /// A COMMIT (`committed`) or ROLLBACK tag arrived: settles the oldest
    /// end on its way. A commit makes the changes before it final (a LOCAL
    /// one excepted); a rollback, or a COMMIT of a failed transaction,
    /// undoes them. Changes after it now wait on what it left. `None`
    /// when no end of `cycle` (the one being answered) was on its way: a
    /// statement the proxy did not take for an end sent the tag, and the
    /// cycle's end decides.
    pub(crate) fn settle_transaction_end(&self, committed: bool, cycle: u64) -> Option<EndSettled> {
        let (Ok(mut undo), Ok(mut tenant)) = (self.tenant_undo.lock(), self.tenant.lock()) else {
            return None;
        };
        if undo.ends.front()?.cycle != cycle {
            return None;
        }
        let end = undo.ends.pop_front()?;
        if end.savepoint_only {
            return Some(EndSettled::Savepoint);
        }
        let left = match end.before {
            Some(before) if !committed || end.local => before,
            _ => end.tenant,
        };
        let recorded = end.savepoints.min(undo.savepoints.len());
        undo.savepoints.drain(..recorded);
        if undo.changes > end.changes {
            undo.before = Some(left);
        } else {
            undo.before = None;
            *tenant = left;
        }
        Some(EndSettled::Transaction)
    }

    /// True while a tenant change waits for the end of its transaction, or
    /// a transaction end for its tag.
    pub(crate) fn tenant_change_pending(&self) -> bool {
        self.tenant_undo
            .lock()
            .map(|u| u.before.is_some() || !u.ends.is_empty())
            .unwrap_or(false)
    }

    /// Request cycle `cycle` is answered: ends of it whose tags did not
    /// come were skipped (after an error) and are forgotten.
    pub(crate) fn cycle_answered(&self, cycle: u64) {
        if let Ok(mut undo) = self.tenant_undo.lock() {
            undo.ends.retain(|end| end.cycle > cycle);
        }
    }

    /// The transaction of request cycle `cycle` ended (idle again, or a
    /// COMMIT): a change that was rolled back, or was LOCAL, is undone; any
    /// other stays. Changes of later cycles (pipelined) wait for theirs;
    /// when this cycle's and later ones' are mixed, all wait for the later
    /// end (which then decides for all).
    pub(crate) fn end_tenant_transaction(&self, rolled_back: bool, cycle: u64) {
        let (Ok(mut undo), Ok(mut tenant)) = (self.tenant_undo.lock(), self.tenant.lock()) else {
            return;
        };
        let pending = undo.before.is_some() || !undo.savepoints.is_empty();
        if pending && undo.last_cycle > cycle {
            return;
        }
        // Ends of later (pipelined) cycles are still on their way.
        let later = std::mem::take(&mut undo.ends);
        let undo = std::mem::replace(
            &mut *undo,
            TenantUndo {
                ends: later.into_iter().filter(|end| end.cycle > cycle).collect(),
                ..TenantUndo::default()
            },
        );
        if let Some(before) = undo.before {
            if rolled_back || undo.local {
                *tenant = before;
            }
        }
    }

    /// What the encryption engine is told about this session.
    pub(crate) fn session_info<'a>(&'a self, tenant: Option<&'a str>) -> SessionInfo<'a> {
        SessionInfo {
            tenant,
            prepare_writes: !self.extended_open.load(Ordering::Acquire),
            default_tenant: self.default_tenant.as_deref(),
            user: &self.user,
            client_addr: &self.client_addr,
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poison.is_set()
    }

    /// The session's client_encoding is not UTF8.
    pub(crate) fn client_encoding_not_utf8(&self) -> bool {
        self.other_client_encoding
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.open_cycles.load(Ordering::Acquire) <= 0
            && self.tx_status.load(Ordering::Acquire) == b'I'
    }
}
