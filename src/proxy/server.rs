//! The accept loop and graceful shutdown: stop accepting, let sessions
//! finish (idle ones are closed at once), then stop the rest after
//! `server.shutdown_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::context::{ProxyError, ServerContext};
use super::session::serve_client;
use crate::config::Policy;

/// Threads that each run a single-threaded runtime with the sessions
/// handed to them. A session stays on its thread, and the threads never
/// wake each other to look for work as a work-stealing runtime's do: the
/// encrypted benchmark's proxy CPU per transaction went from 74 µs there to
/// 61 µs (docs/BENCHMARKS.md).
struct SessionWorkers {
    workers: Vec<Worker>,
}

struct Worker {
    queue: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>,
    /// Sessions running on the thread.
    load: Arc<AtomicUsize>,
}

/// Counts a session on its worker while it runs.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionWorkers {
    /// Starts `threads` workers (default: one per CPU). Each keeps running
    /// until every session of `sessions` has ended, so that tasks a session
    /// started on it (key refreshes, registry connections) serve the others
    /// to the end.
    fn start(
        threads: Option<std::num::NonZeroUsize>,
        sessions: &TaskTracker,
        ctx: &Arc<ServerContext>,
    ) -> std::io::Result<Self> {
        let count = threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, |n| n.get());
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut incoming) = tokio::sync::mpsc::unbounded_channel();
            let load = Arc::new(AtomicUsize::new(0));
            let (sessions, ctx, thread_load) = (sessions.clone(), ctx.clone(), load.clone());
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name(format!("cmk-session-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some((socket, peer)) = incoming.recv().await {
                            let guard = LoadGuard(thread_load.clone());
                            let socket = match tokio::net::TcpStream::from_std(socket) {
                                Ok(socket) => socket,
                                Err(e) => {
                                    warn!(error = %e, client = %peer, "cannot serve the connection");
                                    continue;
                                }
                            };
                            // `map`, not an `async move` wrapper: an async
                            // block that awaits a moved-in future keeps two
                            // copies of it in the task (20 KiB per session).
                            let session = serve_client(socket, peer, ctx.clone())
                                .map(move |()| drop(guard));
                            sessions.spawn(session.instrument(span.clone()));
                        }
                        sessions.wait().await;
                    })
                })?;
            workers.push(Worker { queue, load });
        }
        Ok(Self { workers })
    }

    /// Hands an accepted connection to the worker with the fewest sessions.
    fn hand_over(&self, socket: tokio::net::TcpStream, peer: SocketAddr) {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            return;
        };
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                warn!(error = %e, client = %peer, "cannot serve the connection");
                return;
            }
        };
        worker.load.fetch_add(1, Ordering::Relaxed);
        if worker.queue.send((socket, peer)).is_err() {
            worker.load.fetch_sub(1, Ordering::Relaxed);
            warn!(client = %peer, "session worker is gone; connection dropped");
        }
    }
}

/// Closes a task tracker when dropped.
struct CloseOnDrop(TaskTracker);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Serves clients from `listener` until `shutdown` fires, then drains.
pub async fn run_server(
    policy: Arc<Policy>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let ctx = Arc::new(ServerContext::new(policy, shutdown).await?);
    serve_context(ctx, listener).await
}

/// Serves clients of `ctx` from `listener` until its shutdown fires, then
/// drains.
pub async fn serve_context(
    ctx: Arc<ServerContext>,
    listener: TcpListener,
) -> Result<(), ProxyError> {
    let shutdown = ctx.shutdown.clone();
    let local = listener.local_addr().map_err(ProxyError::Listen)?;
    info!(
        address = %local,
        upstream = ctx.upstream.authority(),
        tls_to_clients = ctx.acceptor().is_some(),
        "listening"
    );
    let sessions = TaskTracker::new();
    // Closed however this function ends (also when its future is dropped),
    // so the session threads end once their sessions have.
    let _close = CloseOnDrop(sessions.clone());
    let workers = SessionWorkers::start(ctx.policy().server.worker_threads, &sessions, &ctx)
        .map_err(ProxyError::Listen)?;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((socket, peer)) => workers.hand_over(socket, peer),
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(workers);
    drop(listener);
    sessions.close();
    let open = sessions.len();
    let timeout = ctx.policy().server.shutdown_timeout;
    info!(open_sessions = open, timeout = ?timeout, "shutting down: no longer accepting");
    if tokio::time::timeout(timeout, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            open_sessions = sessions.len(),
            "shutdown timeout reached; closing remaining sessions"
        );
        ctx.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    }
    info!("shutdown complete");
    Ok(())
}
