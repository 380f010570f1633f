//! The responses a session waits for, in order. With a policy active, the
//! client direction pushes one entry for every request message it sends to
//! PostgreSQL (its own or one the proxy injects), and the server direction
//! takes them as the responses arrive. That is how the result side knows
//! which prepared statement the rows of an Execute belong to (drivers
//! execute cached statements without a new Describe), which responses answer
//! the proxy's own messages (never shown to the client), and which server
//! errors stand for a refusal of the proxy.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::copy::CopyResponse;
use super::encryption::plans::ParsePlan;
pub(crate) use super::encryption::plans::StatementKind;
use super::results::{PlannedRows, RowPlanMemo};
use crate::rewrite::TenantChange;

/// A prepared statement as the proxy knows it.
#[derive(Debug)]
pub(crate) struct PreparedStatement {
    /// How executions are handled.
    pub kind: StatementKind,
    /// Parameters the client binds (the proxy's own come after them).
    pub client_params: usize,
    /// Parameter type OIDs the client declared in Parse (0 = unspecified).
    pub declared: Vec<u32>,
    /// Client parameters shown with their declared plaintext type in
    /// ParameterDescription: (index from 0, type OID).
    pub presented: Vec<(usize, u32)>,
    /// Audit fingerprint of the statement (empty for untouched statements).
    pub fingerprint: Arc<str>,
    /// The result columns, from the server's answer to a Describe.
    pub shape: Mutex<Option<Shape>>,
    /// A Describe of this statement was sent (by the client or the proxy).
    pub described: AtomicBool,
    /// Number of result columns and those from protected columns, once the
    /// shape is known.
    pub protected_results: std::sync::OnceLock<(usize, Vec<usize>)>,
    /// The last plan of its result rows (shared with every Parse of the same SQL).
    pub row_plans: Arc<RowPlanMemo>,
    /// Its SQL may drop prepared statements (DEALLOCATE, DISCARD) or change
    /// what they return (DDL): each execution makes the proxy forget its own.
    pub drops_statements: bool,
    /// Result columns the proxy added after the client's (row tenants).
    pub hidden_results: usize,
    /// The client's unnamed statement runs as one of the proxy's own (see
    /// `own_statements`): its Binds and Describes name that one.
    pub runs_as: Option<RunsAs>,
    /// The SQL and plan it was prepared with, and the catalog epoch of that
    /// plan: a Bind after the catalog changed plans it again (see
    /// [`PlanOrigin`]). `None` for statements the proxy did not plan.
    pub origin: Option<PlanOrigin>,
}

/// Where a prepared statement's plan came from. PostgreSQL plans a
/// prepared statement again when the schema it depends on changes (a view
/// replaced, a table renamed); the proxy must too, or it would run an
/// INSERT it planned for an unprotected view on a view that now shows a
/// protected table.
#[derive(Debug)]
pub(crate) struct PlanOrigin {
    /// The plan the statement runs with (it holds the client's SQL).
    pub plan: Arc<ParsePlan>,
    /// The plan-cache epoch `plan` was valid in; moves forward when a
    /// later epoch's plan is found to run alike.
    pub epoch: std::sync::atomic::AtomicU64,
}

/// The SQL and parameter types PostgreSQL runs for a statement: the
/// proxy's rewrite, or the client's own.
#[derive(Debug)]
pub(crate) struct ServerSql {
    /// SQL text.
    pub sql: Arc<str>,
    /// Parameter type OIDs (0 = inferred by the server).
    pub types: Vec<u32>,
}

/// A repeated unnamed Parse run as the proxy's statement `number`.
#[derive(Debug)]
pub(crate) struct RunsAs {
    /// What that statement runs: a Bind in a later cycle, when the proxy
    /// has forgotten the statement, parses it again under a new number.
    pub server: Arc<ServerSql>,
    /// The statement the Parse defined (or found parsed).
    pub number: u64,
    /// When the Parse parsed `number` on the server: the client Syncs sent
    /// before it. A Bind before the next Sync binds `number` while its
    /// ParseComplete is still on its way (should the Parse fail, the server
    /// skips the Bind too); any other looks the statement up again.
    pub parsed_after_syncs: Option<u64>,
}

impl PreparedStatement {
    /// A statement the proxy does not change.
    pub(crate) fn plain(client_params: usize, fingerprint: Arc<str>) -> Self {
        Self {
            kind: StatementKind::Plain,
            client_params,
            declared: Vec::new(),
            presented: Vec::new(),
            fingerprint,
            shape: Mutex::new(None),
            described: AtomicBool::new(false),
            protected_results: std::sync::OnceLock::new(),
            row_plans: Arc::default(),
            origin: None,
            drops_statements: false,
            hidden_results: 0,
            runs_as: None,
        }
    }
}

/// A bound portal.
#[derive(Debug)]
pub(crate) struct Portal {
    /// The statement it executes.
    pub statement: Arc<PreparedStatement>,
    /// Result format codes sent to the server.
    pub result_formats: Vec<i16>,
    /// Result format codes the client asked for (differ when the proxy asks
    /// for protected cells in binary).
    pub client_formats: Vec<i16>,
    /// The plan of its rows, made when its Describe was answered.
    pub planned: Mutex<Option<Arc<PlannedRows>>>,
    /// The tenant change its execution makes (`set_config` with a parameter).
    pub tenant_change: Option<TenantChange>,
    /// A Describe of this portal was sent.
    pub described: AtomicBool,
}

/// The result columns of a statement or portal.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    /// No rows (NoData).
    NoData,
    /// A RowDescription frame, as the server sent it.
    Rows(Bytes),
}

/// A refusal of the proxy, carried out by making the server fail the
/// message, whose ErrorResponse is then replaced by this one.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// SQLSTATE.
    pub sqlstate: &'static str,
    /// Message for the client.
    pub message: String,
}

/// One expected response.
#[derive(Debug)]
pub(crate) enum Expected {
    /// The startup phase, up to the first ReadyForQuery.
    Startup,
    /// A simple query or function call, up to its ReadyForQuery. `swallow`:
    /// injected by the proxy, never shown.
    Query {
        swallow: bool,
        fingerprint: Arc<str>,
        /// It changes the schema: reload the catalog at its ReadyForQuery.
        refresh: bool,
        /// Run as the proxy's own statement with this number (see
        /// `own_statements`): the ParseComplete, BindComplete, NoData and
        /// CloseComplete the client did not ask for are dropped.
        run_as: Option<u64>,
        /// Sent as Parse, Describe of the statement, Bind, Execute and
        /// Sync (of the proxy's statement, or of the unnamed one): the
        /// ParseComplete, ParameterDescription, BindComplete, NoData and
        /// CloseComplete the client did not ask for are dropped.
        extended: bool,
        /// A COPY the proxy takes part in (see `copy`).
        copy: Option<Arc<CopyResponse>>,
    },
    /// ParseComplete, or the error that replaces it. `retires`: the Parse
    /// replaces a rewritten write (see `SessionState::retirements`).
    /// `own`: it parses the proxy's statement with this number (ready once
    /// complete); `swallow`: injected by the proxy, its ParseComplete never
    /// shown (its error is, in place of the Bind it was sent for).
    Parse {
        refusal: Option<Refusal>,
        retires: Option<u64>,
        own: Option<u64>,
        swallow: bool,
    },
    /// BindComplete, or the error that replaces it. `own`: it binds the
    /// proxy's statement with this number (forgotten if the server lost it).
    Bind {
        refusal: Option<Refusal>,
        own: Option<u64>,
    },
    /// ParameterDescription and RowDescription/NoData of a statement.
    DescribeStatement(Arc<PreparedStatement>),
    /// The same, for a Describe the proxy slipped in before a Bind to
    /// learn the statement's column origins (see
    /// `CatalogMap::traces_by_statement`): stored, never shown.
    StatementOrigins(Arc<PreparedStatement>),
    /// RowDescription/NoData of a portal; `swallow`: injected by the proxy.
    DescribePortal { portal: Arc<Portal>, swallow: bool },
    /// The rows of an Execute, up to CommandComplete, EmptyQueryResponse
    /// or PortalSuspended.
    Execute(Arc<Portal>),
    /// CloseComplete; `swallow`: injected by the proxy, never shown;
    /// `retires`: it closes a rewritten write.
    Close { swallow: bool, retires: Option<u64> },
    /// ReadyForQuery after Sync; `refresh`: the cycle changed the schema.
    Sync { refresh: bool },
}

impl Expected {
    /// A query (or function call) shown to the client, with no audit
    /// fingerprint, that changes no schema.
    pub(crate) fn query() -> Self {
        Self::Query {
            swallow: false,
            fingerprint: Arc::from(""),
            refresh: false,
            run_as: None,
            extended: false,
            copy: None,
        }
    }

    /// True for the entries a ReadyForQuery ends.
    pub(crate) fn ends_with_ready(&self) -> bool {
        matches!(self, Self::Startup | Self::Query { .. } | Self::Sync { .. })
    }

    /// True when the catalog must be reloaded once this entry is answered.
    pub(crate) fn refreshes(&self) -> bool {
        matches!(
            self,
            Self::Query { refresh: true, .. } | Self::Sync { refresh: true }
        )
    }

    /// The proxy's statement a simple query was run as, if it was.
    pub(crate) fn run_as(&self) -> Option<u64> {
        match self {
            Self::Query { run_as, .. } => *run_as,
            _ => None,
        }
    }

    /// The simple query being answered was sent as extended-protocol
    /// messages whose extra answers the client must not see.
    pub(crate) fn extended(&self) -> bool {
        matches!(self, Self::Query { extended: true, .. })
    }

    /// The COPY of a simple query the proxy takes part in.
    pub(crate) fn copy(&self) -> Option<&Arc<CopyResponse>> {
        match self {
            Self::Query { copy, .. } => copy.as_ref(),
            _ => None,
        }
    }

    /// True for responses the client must never see.
    pub(crate) fn swallowed(&self) -> bool {
        matches!(
            self,
            Self::Query { swallow: true, .. }
                | Self::Parse { swallow: true, .. }
                | Self::DescribePortal { swallow: true, .. }
                | Self::StatementOrigins(_)
                | Self::Close { swallow: true, .. }
        )
    }

    /// A Parse of the client's (answered to it) with nothing else to it.
    pub(crate) fn parse() -> Self {
        Self::Parse {
            refusal: None,
            retires: None,
            own: None,
            swallow: false,
        }
    }

    /// A Bind of the client's with nothing else to it.
    pub(crate) fn bind() -> Self {
        Self::Bind {
            refusal: None,
            own: None,
        }
    }
}

/// The queue shared by the two directions of a session.
#[derive(Debug, Default)]
pub(crate) struct PendingQueue {
    entries: Mutex<std::collections::VecDeque<Expected>>,
}

impl PendingQueue {
    /// A queue waiting for the startup phase to end.
    pub(crate) fn new() -> Self {
        let queue = Self::default();
        queue.push(Expected::Startup);
        queue
    }

    /// Appends an expected response (before its request is sent).
    pub(crate) fn push(&self, entry: Expected) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.push_back(entry);
        }
    }

    /// Moves every queued entry to `into` (one lock for many responses).
    pub(crate) fn drain_into(&self, into: &mut std::collections::VecDeque<Expected>) {
        if let Ok(mut entries) = self.entries.lock() {
            into.extend(entries.drain(..));
        }
    }
}
