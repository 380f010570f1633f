//! State shared by the two directions of one session.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::Mutex;

use super::pending::PendingQueue;

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
    /// With a policy: the responses the server owes, in order.
    pub(crate) pending: PendingQueue,
    /// A DDL statement went by: reload the catalog at the next ReadyForQuery.
    pub(crate) refresh_catalog: AtomicBool,
    /// A read failed inside a transaction: before the client's next message
    /// the server transaction is made to fail too (SQLSTATE, message).
    pub(crate) poison: Mutex<Option<(&'static str, String)>>,
    /// Database user and client address, for audit events.
    pub(crate) user: String,
    pub(crate) client_addr: String,
}

impl SessionState {
    pub(crate) fn tenant(&self) -> Option<String> {
        self.tenant.lock().ok().and_then(|t| t.clone())
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poison.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.open_cycles.load(Ordering::Acquire) <= 0
            && self.tx_status.load(Ordering::Acquire) == b'I'
    }
}
