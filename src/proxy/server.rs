//! The accept loop and graceful shutdown: stop accepting, let sessions
//! finish (idle ones are closed at once), then stop the rest after
//! `server.shutdown_timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::encryption::{Encryption, EncryptionError};
use super::session::serve_client;
use super::tls::{self, TlsError};
use super::upstream::{Upstream, UpstreamError};
use super::verifiers::VerifierStore;
use crate::config::Policy;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Client TLS material is unusable.
    #[error("client TLS: {0}")]
    Tls(#[from] TlsError),
    /// Upstream settings are unusable.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Column encryption could not start (keys, catalog, audit).
    #[error("encryption: {0}")]
    Encryption(#[from] EncryptionError),
    /// The listening socket failed.
    #[error("listener: {0}")]
    Listen(std::io::Error),
}

/// Everything a session needs, shared by all sessions.
pub struct ServerContext {
    /// The loaded policy.
    pub policy: Arc<Policy>,
    /// Where and how to connect upstream.
    pub upstream: Upstream,
    /// TLS acceptor when client TLS is configured.
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Fired when shutdown starts: no new sessions, idle ones close.
    pub shutdown: CancellationToken,
    /// Fired when the shutdown timeout ran out: every session closes.
    pub hard_stop: CancellationToken,
    /// SCRAM verifiers for authentication pass-through.
    pub verifiers: VerifierStore,
    /// Column encryption, when the policy protects tables.
    pub encryption: Option<Arc<Encryption>>,
}

impl ServerContext {
    /// Builds the shared context from a policy; with protected tables it
    /// connects the key service and loads the catalog.
    pub async fn new(policy: Arc<Policy>, shutdown: CancellationToken) -> Result<Self, ProxyError> {
        let encryption = if policy.tables.is_empty() {
            None
        } else {
            Some(Encryption::start(policy.clone()).await?)
        };
        let acceptor = match &policy.tls.client {
            Some(client) => Some(tls::client_acceptor(client)?),
            None => None,
        };
        Ok(Self {
            upstream: Upstream::from_policy(&policy)?,
            verifiers: VerifierStore::new(policy.clone()),
            encryption,
            policy,
            acceptor,
            shutdown,
            hard_stop: CancellationToken::new(),
        })
    }

    /// `Some(reason)` once new sessions must be refused.
    pub fn refuse_new_sessions(&self) -> Option<&'static str> {
        self.shutdown
            .is_cancelled()
            .then_some("cmk-proxy is shutting down and accepts no new sessions")
    }
}

/// Serves clients from `listener` until `shutdown` fires, then drains.
pub async fn run_server(
    policy: Arc<Policy>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let ctx = Arc::new(ServerContext::new(policy, shutdown.clone()).await?);
    let local = listener.local_addr().map_err(ProxyError::Listen)?;
    info!(
        address = %local,
        upstream = ctx.upstream.authority(),
        tls_to_clients = ctx.acceptor.is_some(),
        "listening"
    );
    let sessions = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                sessions.spawn(serve_client(socket, peer, ctx.clone()));
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    sessions.close();
    let open = sessions.len();
    let timeout = ctx.policy.server.shutdown_timeout;
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
