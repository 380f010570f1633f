//! Audit events and sinks (DESIGN section 8): a cheap `Audit` handle that
//! never blocks the data path, a bounded queue, and one writer thread that
//! writes JSON lines (each with an event id) to stdout, files and per-tenant
//! files, and queues them for HTTP endpoints, which `http` delivers from a
//! bounded spool (`spool`) with retries.

mod http;
mod sink;
pub mod spool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::{AuditConfig, AuditOnFailure, AuditSink};
use crate::ops::metrics::{metrics, SinkLabel};

/// At most one "events dropped" warning per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// One audit event. Serialized as a JSON object tagged `"event"`; the writer
/// adds `"ts"`. Holds names and counts only, never key or value bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A call to a tenant's KMS.
    KmsCall {
        /// Tenant whose key was used.
        tenant: String,
        /// Provider name from the policy.
        provider: String,
        /// Master key reference.
        key_ref: String,
        /// `wrap`, `unwrap` or `check`.
        operation: &'static str,
        /// `ok`, `denied:<reason>`, `transient`, …
        outcome: String,
        /// Round-trip time in milliseconds.
        latency_ms: f64,
    },
    /// Cells of one result were decrypted.
    DecryptBatch {
        /// Tenant whose cells were decrypted.
        tenant: String,
        /// `schema.table`.
        table: String,
        /// Decrypted columns.
        columns: Vec<String>,
        /// Number of rows.
        rows: u64,
        /// Statement fingerprint (no literals).
        fingerprint: String,
        /// Client address.
        client_addr: String,
        /// Database user.
        user: String,
    },
    /// A statement was refused.
    Rejection {
        /// SQLSTATE sent to the client (KM001..KM006).
        sqlstate: &'static str,
        /// Why.
        reason: String,
        /// Tenant, when known.
        tenant: Option<String>,
        /// Table, when known.
        table: Option<String>,
        /// Column, when known.
        column: Option<String>,
        /// Client address.
        client_addr: String,
        /// Database user.
        user: String,
    },
    /// A DEK was created, rotated, rewrapped or purged.
    KeyLifecycle {
        /// Tenant.
        tenant: String,
        /// `created`, `rotated`, `rewrapped`, `purged`.
        operation: &'static str,
        /// DEK concerned, if one.
        dek_id: Option<uuid::Uuid>,
        /// Free text (no key material).
        detail: String,
    },
}

impl AuditEvent {
    /// Tenant the event belongs to, if any (routes per-tenant sinks).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::KmsCall { tenant, .. }
            | Self::DecryptBatch { tenant, .. }
            | Self::KeyLifecycle { tenant, .. } => Some(tenant),
            Self::Rejection { tenant, .. } => tenant.as_deref(),
        }
    }
}

/// Errors starting the audit writer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// `Audit::start` was called outside a tokio runtime.
    #[error("audit needs a tokio runtime")]
    NoRuntime,
    /// Invalid settings (queue size, URL).
    #[error("audit configuration: {0}")]
    Config(String),
    /// A sink could not be opened.
    #[error("audit sink: {0}")]
    Io(String),
}

enum Msg {
    Event(DateTime<Utc>, AuditEvent),
    Flush(oneshot::Sender<()>),
    /// Flush and close every file, then write to this main sink (files are
    /// opened again at their next event, so a rotated file is followed).
    Reopen(AuditSink, AuditOnFailure),
}

/// State shared by the handles and the writer.
struct Shared {
    dropped: AtomicU64,
    failed: AtomicU64,
    /// Milliseconds since `epoch` of the last drop warning, plus one (0 = never).
    last_warn: AtomicU64,
    epoch: Instant,
    tenant_sinks: RwLock<HashMap<String, AuditSink>>,
    /// HTTP deliveries by `http::delivery_key`.
    deliveries: RwLock<HashMap<String, Arc<http::Delivery>>>,
    /// Delivery key of the main sink, if it is an HTTP sink.
    main_key: RwLock<Option<String>>,
    /// Deliveries pausing decrypts now (`on_failure: deny`, spool full).
    blocked: AtomicUsize,
}

impl Shared {
    /// Counts a dropped event and warns at most once per interval.
    fn count_drop(&self, sink: &'static str, why: &'static str) {
        metrics()
            .audit_dropped
            .get_or_create(&SinkLabel { sink })
            .inc();
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if self.may_warn() {
            tracing::warn!(dropped = total, why, "audit events dropped");
        }
    }

    /// Counts a failed sink write and warns at most once per interval.
    fn count_failure(&self, sink: &str, error: &str) {
        let total = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if self.may_warn() {
            tracing::warn!(failed = total, sink, error, "audit sink write failed");
        }
    }

    /// A delivery paused (`true`) or resumed decrypts.
    fn blocked_changed(&self, blocked: bool) {
        if blocked {
            self.blocked.fetch_add(1, Ordering::AcqRel);
        } else {
            self.blocked.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn delivery(&self, key: &str) -> Option<Arc<http::Delivery>> {
        self.deliveries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn may_warn(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        let interval = u64::try_from(WARN_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// Checks audit settings without starting anything (a reload checks
/// before it changes anything).
pub fn check_config(cfg: &AuditConfig) -> Result<(), AuditError> {
    sink::check(&cfg.sink)
}

/// Handle to the audit writer: cheap to clone, never blocks the data path.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("enabled", &self.inner.is_some())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// How long a busy audit writer lets events gather between two drains.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

impl Audit {
    /// Starts the writer (a dedicated thread, so file writes never stall
    /// the runtime; HTTP deliveries run as tasks on the current tokio runtime).
    pub fn start(cfg: &AuditConfig) -> Result<Audit, AuditError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| AuditError::NoRuntime)?;
        if cfg.queue_capacity == 0 {
            return Err(AuditError::Config(
                "audit.queue_capacity must be at least 1".to_owned(),
            ));
        }
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_warn: AtomicU64::new(0),
            epoch: Instant::now(),
            tenant_sinks: RwLock::new(HashMap::new()),
            deliveries: RwLock::new(HashMap::new()),
            main_key: RwLock::new(None),
            blocked: AtomicUsize::new(0),
        });
        let mut writer = sink::Writer::new(
            cfg.sink.clone(),
            cfg.on_failure,
            Arc::clone(&shared),
            handle,
        )?;
        let (tx, mut rx) = mpsc::channel(cfg.queue_capacity);
        std::thread::Builder::new()
            .name("cmk-audit".to_owned())
            .spawn(move || {
                // Idle: park until an event comes. Busy: collect events for
                // a short window between drains, so emitting never has to
                // wake this thread and files are written in large batches.
                while let Some(msg) = rx.blocking_recv() {
                    writer.handle(msg);
                    loop {
                        std::thread::sleep(BATCH_WINDOW);
                        let mut drained = 0usize;
                        while let Ok(msg) = rx.try_recv() {
                            writer.handle(msg);
                            drained += 1;
                        }
                        writer.flush_files();
                        if drained == 0 {
                            break;
                        }
                    }
                }
                writer.flush_files();
            })
            .map_err(|e| AuditError::Io(format!("spawning the audit writer: {e}")))?;
        Ok(Audit {
            inner: Some(Arc::new(Inner { tx, shared })),
        })
    }

    /// A handle that drops every event (tests, CLI).
    pub fn disabled() -> Audit {
        Audit { inner: None }
    }

    /// Queues `event` without waiting; if the queue is full the event is
    /// dropped, counted in [`dropped`](Self::dropped) and warned about.
    pub fn emit(&self, event: AuditEvent) {
        let Some(inner) = &self.inner else { return };
        if inner.tx.try_send(Msg::Event(Utc::now(), event)).is_err() {
            inner.shared.count_drop("queue", "queue full");
        }
    }

    /// Sends `tenant`'s events also to `sink` (replacing an earlier one);
    /// `AuditSink::None` removes the tenant's own stream.
    pub fn set_tenant_sink(&self, tenant: &str, sink: AuditSink) {
        let Some(inner) = &self.inner else { return };
        let mut sinks = match inner.shared.tenant_sinks.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match sink {
            AuditSink::None => sinks.remove(tenant),
            other => sinks.insert(tenant.to_owned(), other),
        };
    }

    /// Events lost: full queue, or a full HTTP spool with `on_failure: allow`.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.dropped.load(Ordering::Relaxed))
    }

    /// Sink writes that failed (I/O errors; HTTP errors and timeouts, each
    /// retried).
    pub fn failed(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.failed.load(Ordering::Relaxed))
    }

    /// Reopens the sinks after a configuration reload: files are closed
    /// and opened again by path (logrotate), and `cfg.sink` becomes the
    /// main sink. The queue capacity stays as started.
    pub fn reload(&self, cfg: &AuditConfig) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        sink::check(&cfg.sink)?;
        inner
            .tx
            .try_send(Msg::Reopen(cfg.sink.clone(), cfg.on_failure))
            .map_err(|_| AuditError::Io("the audit queue is full; reload again".to_owned()))
    }

    /// Whether decrypts of `tenant` are paused because an HTTP sink its
    /// events go to has a full spool (`audit.on_failure: deny`).
    pub fn delivery_blocked(&self, tenant: &str) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let shared = &inner.shared;
        if shared.blocked.load(Ordering::Acquire) == 0 {
            return false;
        }
        let main = shared
            .main_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let own = shared
            .tenant_sinks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .and_then(http::delivery_key);
        [main, own]
            .into_iter()
            .flatten()
            .any(|key| shared.delivery(&key).is_some_and(|d| d.blocked()))
    }

    /// Waits until every event queued before this call is written: files
    /// flushed, and each HTTP sink's spool delivered or one delivery
    /// attempt made after this call (a receiver that is down does not hold
    /// the caller for longer than one POST).
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (done_tx, done_rx) = oneshot::channel();
        if inner.tx.send(Msg::Flush(done_tx)).await.is_err() {
            return;
        }
        let _ = done_rx.await;
        let deliveries: Vec<Arc<http::Delivery>> = inner
            .shared
            .deliveries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for delivery in deliveries {
            let mut progress = delivery.progress();
            let start = progress.borrow().attempts;
            let _ = progress.wait_for(|p| p.empty || p.attempts > start).await;
        }
    }
}
