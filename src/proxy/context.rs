//! What every session shares: the policy in force, the upstream, client
//! TLS, shutdown signals, SCRAM verifiers and column encryption; and why
//! the server could not start. The listener (`server`) builds it, sessions
//! (`session`) read it; neither imports the other for it.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::sync::CancellationToken;

use super::encryption::{Encryption, EncryptionError};
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
    /// The policy in force (replaced by a reload).
    policy: ArcSwap<Policy>,
    /// Where and how to connect upstream.
    pub upstream: Upstream,
    /// TLS acceptor when client TLS is configured (replaced by a reload).
    acceptor: ArcSwapOption<tokio_rustls::TlsAcceptor>,
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
            policy: ArcSwap::new(policy),
            acceptor: ArcSwapOption::new(acceptor.map(Arc::new)),
            shutdown,
            hard_stop: CancellationToken::new(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The client TLS acceptor in force, if client TLS is configured.
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.acceptor.load().as_deref().cloned()
    }

    /// Installs a reloaded policy and client TLS acceptor for new sessions
    /// (the encryption engine is reloaded separately, before this).
    pub fn install(&self, policy: Arc<Policy>, acceptor: Option<tokio_rustls::TlsAcceptor>) {
        self.acceptor.store(acceptor.map(Arc::new));
        self.policy.store(policy);
    }

    /// `Some(reason)` once new sessions must be refused.
    pub fn refuse_new_sessions(&self) -> Option<&'static str> {
        self.shutdown
            .is_cancelled()
            .then_some("cmk-proxy is shutting down and accepts no new sessions")
    }
}
