//! Delivery of one HTTP audit sink: events go into the sink's bounded
//! spool (see `spool`) and one task POSTs them in order, in batches of JSON
//! lines, removing a batch only once the receiver answered 2xx. Failures
//! are retried for ever with exponential backoff and jitter; each event
//! carries an `id`, so a batch sent again after a lost answer or a restart
//! can be dropped by the receiver. With `audit.on_failure: allow` a full
//! spool drops new events (counted); with `deny` the decrypts of the
//! tenants whose events go here stop at 90 % (`Audit::delivery_blocked`)
//! until it drains below 50 %, and the events already emitted still go in
//! (the spool may pass `spool_max_bytes` by at most the audit queue).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use backon::BackoffBuilder;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};

use super::spool::Spool;
use super::{AuditError, Shared};
use crate::config::{defaults, AuditOnFailure, AuditSink};
use crate::ops::metrics::{metrics, SinkLabel};

/// Whole-request timeout of one POST.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff between failed POSTs: from this, doubling, with jitter …
const RETRY_MIN: Duration = Duration::from_millis(100);
/// … up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// With `deny`, decrypts pause once the spool is this full (per mille), so
/// events already on their way still fit.
const BLOCK_AT_PER_MILLE: u64 = 900;
/// … and resume once it drained below this.
const RESUME_AT_PER_MILLE: u64 = 500;

const SINK: SinkLabel = SinkLabel { sink: "http" };

/// What `Audit::flush` waits for: attempts finished so far and whether
/// the spool was empty after the last one.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    pub attempts: u64,
    pub empty: bool,
}

/// One HTTP sink's spool and delivery state.
pub(super) struct Delivery {
    url: String,
    spool: Mutex<Spool>,
    max_bytes: u64,
    batch_size: usize,
    on_failure: AuditOnFailure,
    /// The last POST failed (the receiver is down).
    failing: AtomicBool,
    /// Decrypts of this sink's tenants are paused (`deny`, spool full).
    blocked: AtomicBool,
    wake: Notify,
    progress: watch::Sender<Progress>,
    /// Weak: the audit state holds its deliveries, and a delivery whose
    /// audit is gone stops.
    shared: Weak<Shared>,
}

/// The key that names one delivery: its URL and its spool directory.
pub(super) fn delivery_key(sink: &AuditSink) -> Option<String> {
    match sink {
        AuditSink::Http { url, spool_dir, .. } => Some(format!(
            "{url} {}",
            spool_dir
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        )),
        _ => None,
    }
}

/// `<spool_dir>/<first 16 hex digits of SHA-256(url)>`: sinks with their own
/// URLs never share a spool.
fn spool_path(dir: &Path, url: &str) -> PathBuf {
    let digest = Sha256::digest(url.as_bytes());
    dir.join(faster_hex::hex_string(&digest[..8]))
}

impl Delivery {
    /// Opens the sink's spool and starts its delivery task on `runtime`.
    pub(super) fn start(
        sink: &AuditSink,
        on_failure: AuditOnFailure,
        shared: &Arc<Shared>,
        http: reqwest::Client,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Delivery>, AuditError> {
        let AuditSink::Http {
            url,
            batch_size,
            spool_dir,
            spool_max_bytes,
        } = sink
        else {
            return Err(AuditError::Config("not an HTTP sink".to_owned()));
        };
        let spool = match spool_dir {
            Some(dir) => {
                let path = spool_path(dir, url);
                Spool::open(&path)
                    .map_err(|e| AuditError::Io(format!("audit spool {}: {e}", path.display())))?
            }
            None => Spool::memory(),
        };
        let empty = spool.bytes() == 0;
        let delivery = Arc::new(Delivery {
            url: url.clone(),
            spool: Mutex::new(spool),
            max_bytes: spool_max_bytes.unwrap_or_else(defaults::audit_spool_max_bytes),
            batch_size: batch_size.unwrap_or_else(defaults::audit_batch_size).max(1),
            on_failure,
            failing: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            wake: Notify::new(),
            progress: watch::Sender::new(Progress { attempts: 0, empty }),
            shared: Arc::downgrade(shared),
        });
        delivery.update_blocked();
        runtime.spawn(Arc::clone(&delivery).run(http));
        Ok(delivery)
    }

    /// Whether decrypts of this sink's tenants are paused.
    pub(super) fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// Progress of the delivery task (for `Audit::flush`).
    pub(super) fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Queues one event line (called by the writer thread).
    pub(super) fn enqueue(&self, line: &[u8]) {
        let outcome = {
            let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
            // With `deny`, decrypts stop at 90 % and the events already on
            // their way (at most `audit.queue_capacity`) still go in.
            let over = spool.bytes().saturating_add(line.len() as u64 + 1) > self.max_bytes;
            if over && self.on_failure == AuditOnFailure::Allow {
                Err("spool full".to_owned())
            } else {
                let appended = spool.append(line).map_err(|e| e.to_string());
                // Under the spool lock, as the delivery task's `empty = true`.
                self.progress.send_modify(|p| p.empty = false);
                appended
            }
        };
        match outcome {
            Ok(()) => {
                if self.failing.load(Ordering::Acquire) {
                    metrics().audit_spooled.get_or_create(&SINK).inc();
                }
            }
            Err(why) => {
                if let Some(shared) = self.shared.upgrade() {
                    shared.count_drop("http", "HTTP sink spool full or unwritable");
                }
                tracing::debug!(url = %self.url, why, "audit event not spooled");
            }
        }
        self.update_blocked();
        self.wake.notify_one();
    }

    /// Pauses or resumes decrypts by the spool's fill (`deny` only).
    fn update_blocked(&self) {
        if self.on_failure != AuditOnFailure::Deny {
            return;
        }
        let used = self
            .spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes()
            .saturating_mul(1000);
        let limit = self.max_bytes.max(1);
        let was = self.blocked.load(Ordering::Acquire);
        let now = if was {
            used >= limit.saturating_mul(RESUME_AT_PER_MILLE)
        } else {
            used >= limit.saturating_mul(BLOCK_AT_PER_MILLE)
        };
        if now != was {
            self.blocked.store(now, Ordering::Release);
            if let Some(shared) = self.shared.upgrade() {
                shared.blocked_changed(now);
            }
            if now {
                tracing::error!(url = %self.url, "audit spool full: decrypts of its tenants are paused until delivery resumes (audit.on_failure: deny)");
            } else {
                tracing::info!(url = %self.url, "audit spool drained: decrypts resume");
            }
        }
    }

    fn retry_delays() -> impl Iterator<Item = Duration> {
        backon::ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN)
            .with_max_delay(RETRY_MAX)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn count_failure(&self, sink: &str, error: &str) {
        if let Some(shared) = self.shared.upgrade() {
            shared.count_failure(sink, error);
        }
    }

    async fn run(self: Arc<Self>, http: reqwest::Client) {
        let mut delays = Self::retry_delays();
        while self.shared.strong_count() > 0 {
            let batch = {
                let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
                let batch = spool.peek(self.batch_size);
                if batch.as_ref().is_ok_and(|b| b.lines.is_empty()) {
                    self.progress.send_modify(|p| p.empty = true);
                }
                batch
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    self.count_failure("audit spool", &e.to_string());
                    tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX)).await;
                    continue;
                }
            };
            if batch.lines.is_empty() {
                // A wake-up may have been stored while we read: notified()
                // returns at once then.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            let body = batch.lines.join(&b'\n');
            let content_type = if batch.lines.len() == 1 {
                "application/json"
            } else {
                "application/x-ndjson"
            };
            let sent = http
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            match sent {
                Ok(_) => {
                    let committed = {
                        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
                        spool.commit(&batch)
                    };
                    if let Err(e) = committed {
                        self.count_failure("audit spool", &e.to_string());
                    }
                    if self.failing.swap(false, Ordering::AcqRel) {
                        tracing::info!(url = %self.url, "audit delivery resumed");
                    }
                    delays = Self::retry_delays();
                    self.update_blocked();
                    self.progress.send_modify(|p| p.attempts += 1);
                }
                Err(e) => {
                    if !self.failing.swap(true, Ordering::AcqRel) {
                        tracing::warn!(url = %self.url, error = %e, "audit delivery failing; events are spooled and retried");
                    }
                    self.count_failure(&self.url, &e.to_string());
                    metrics()
                        .audit_retried
                        .get_or_create(&SINK)
                        .inc_by(batch.lines.len() as u64);
                    self.progress.send_modify(|p| p.attempts += 1);
                    tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX)).await;
                }
            }
        }
    }
}

/// The HTTP client of every delivery.
pub(super) fn client() -> Result<reqwest::Client, AuditError> {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(HTTP_CONNECT_TIMEOUT)
        .build()
        .map_err(|e| AuditError::Config(format!("HTTP client: {e}")))
}
