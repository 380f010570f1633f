//! Configuration reload (SIGHUP, `cmk-proxy reload`, `POST /reload`): the
//! policy file is read again and, only if all of it is valid, its tables
//! and columns, tenants, audit sinks (files reopened, so logrotate works),
//! client TLS certificate and key, metric labels and log level replace the
//! running ones. Sessions stay connected; their next statements use the
//! new policy. Settings that need a restart are named in a warning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::metrics::{metrics, OutcomeLabel};
use crate::config::{self, Policy};
use crate::proxy::encryption::EncryptionError;
use crate::proxy::tls::TlsError;
use crate::proxy::ServerContext;

/// Applies a prepared log filter.
pub type ApplyLogLevel = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Checks `server.log_level` and returns what installs it.
pub type PrepareLogLevel = Box<dyn Fn(Option<&str>) -> Result<ApplyLogLevel, String> + Send + Sync>;

/// Why a reload was refused (nothing of the new file was applied).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The proxy was started without a policy file.
    #[error("the proxy was started without --config: there is no policy file to read again")]
    NoConfig,
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Protected tables appeared in a passthrough proxy or all went away.
    #[error("switching between passthrough (no tables) and encryption needs a restart")]
    ModeChange,
    /// The new client certificate or key is unusable.
    #[error("client TLS: {0}")]
    Tls(#[from] TlsError),
    /// `server.log_level` is not a valid filter.
    #[error("{0}")]
    LogLevel(String),
    /// The catalog, registry or audit sinks refused the new policy.
    #[error("encryption: {0}")]
    Encryption(#[from] EncryptionError),
    /// Another reload is running.
    #[error("a reload is already running")]
    Busy,
}

/// Where the policy comes from: the file and the command-line overrides
/// given at start.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    /// The policy file.
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--upstream`.
    pub upstream: Option<String>,
}

/// Reloads the configuration of a running server.
pub struct Reloader {
    ctx: Arc<ServerContext>,
    source: PolicySource,
    log_level: PrepareLogLevel,
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<String>>,
}

impl Reloader {
    /// A reloader for `ctx`, reading `source`.
    pub fn new(ctx: Arc<ServerContext>, source: PolicySource, log_level: PrepareLogLevel) -> Self {
        Reloader {
            ctx,
            source,
            log_level,
            running: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
        }
    }

    /// The server this reloader reloads.
    pub fn context(&self) -> &Arc<ServerContext> {
        &self.ctx
    }

    /// `ok` or `error: …` of the last reload, if any.
    pub fn last_outcome(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the policy file again and applies it, or refuses all of it.
    /// Every error is logged and counted (`config_reloads{outcome="error"}`).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let Ok(_running) = self.running.try_lock() else {
            return Err(ReloadError::Busy);
        };
        let outcome = self.apply().await;
        let (label, text) = match &outcome {
            Ok(()) => ("ok", "ok".to_owned()),
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!(
                        error = line,
                        "configuration reload refused; the running configuration stays"
                    );
                }
                ("error", format!("error: {e}"))
            }
        };
        metrics()
            .config_reloads
            .get_or_create(&OutcomeLabel { outcome: label })
            .inc();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        outcome
    }

    async fn apply(&self) -> Result<(), ReloadError> {
        let path = self.source.config.as_ref().ok_or(ReloadError::NoConfig)?;
        let mut policy = config::load_policy(path)?;
        if let Some(listen) = self.source.listen {
            policy.listen = listen;
        }
        if let Some(upstream) = &self.source.upstream {
            policy.upstream.clone_from(upstream);
        }
        let current = self.ctx.policy();
        if policy.tables.is_empty() != self.ctx.encryption.is_none() {
            return Err(ReloadError::ModeChange);
        }
        let acceptor = match &policy.tls.client {
            Some(client) => Some(crate::proxy::tls::client_acceptor(client)?),
            None => None,
        };
        let apply_log_level =
            (self.log_level)(policy.server.log_level.as_deref()).map_err(ReloadError::LogLevel)?;
        for section in restart_only_changes(&current, &policy) {
            tracing::warn!(
                setting = section,
                "changed in the policy file; takes effect at the next restart"
            );
        }
        keep_restart_only(&current, &mut policy);
        let policy = Arc::new(policy);
        if let Some(encryption) = &self.ctx.encryption {
            encryption.reload(policy.clone()).await?;
        }
        metrics().set_tenant_labels(policy.metrics.tenant_labels);
        self.ctx.install(policy.clone(), acceptor);
        if let Err(e) = apply_log_level() {
            tracing::warn!(error = %e, "log level not changed");
        }
        tracing::info!(
            protected_tables = policy.tables.len(),
            tenants = policy.tenants.len(),
            client_tls = policy.tls.client.is_some(),
            "configuration reloaded"
        );
        Ok(())
    }
}

/// Keeps the running values of the settings a reload cannot apply, so the
/// policy in force says what the server does (the registry connection
/// goes on using the running upstream, say).
fn keep_restart_only(current: &Policy, new: &mut Policy) {
    new.listen = current.listen;
    new.upstream.clone_from(&current.upstream);
    new.tls.upstream = current.tls.upstream.clone();
    new.keys = current.keys.clone();
    new.auth = current.auth.clone();
    new.admin = current.admin.clone();
    new.audit.queue_capacity = current.audit.queue_capacity;
    new.server.worker_threads = current.server.worker_threads;
    new.server.connect_timeout = current.server.connect_timeout;
    new.server.log_format = current.server.log_format;
    new.server.catalog_refresh = current.server.catalog_refresh;
    new.server.plan_cache_size = current.server.plan_cache_size;
}

/// Settings a reload reads but cannot apply to a running server.
fn restart_only_changes(old: &Policy, new: &Policy) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut changed = Vec::new();
    let checks: [(&'static str, bool); 12] = [
        ("listen", old.listen != new.listen),
        ("upstream", old.upstream != new.upstream),
        (
            "tls.upstream",
            differs(&old.tls.upstream, &new.tls.upstream),
        ),
        ("keys", differs(&old.keys, &new.keys)),
        ("auth", differs(&old.auth, &new.auth)),
        ("admin", old.admin != new.admin),
        (
            "audit.queue_capacity",
            old.audit.queue_capacity != new.audit.queue_capacity,
        ),
        (
            "server.worker_threads",
            old.server.worker_threads != new.server.worker_threads,
        ),
        (
            "server.connect_timeout",
            old.server.connect_timeout != new.server.connect_timeout,
        ),
        (
            "server.log_format",
            old.server.log_format != new.server.log_format,
        ),
        (
            "server.catalog_refresh",
            old.server.catalog_refresh != new.server.catalog_refresh,
        ),
        (
            "server.plan_cache_size",
            old.server.plan_cache_size != new.server.plan_cache_size,
        ),
    ];
    for (name, differs) in checks {
        if differs {
            changed.push(name);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_policy;

    #[test]
    fn restart_only_settings_are_named_and_keep_their_running_values() {
        let running = parse_policy(
            "listen: 127.0.0.1:6432\nupstream: postgres://a@10.0.0.1:5432/app\nserver:\n  worker_threads: 2\n",
            "running",
        )
        .unwrap();
        let mut new = parse_policy(
            "listen: 127.0.0.1:7000\nupstream: postgres://a@10.0.0.2:5432/app\nserver:\n  worker_threads: 4\n  log_level: debug\n",
            "new",
        )
        .unwrap();
        assert_eq!(
            restart_only_changes(&running, &new),
            ["listen", "upstream", "server.worker_threads"]
        );
        keep_restart_only(&running, &mut new);
        assert!(restart_only_changes(&running, &new).is_empty());
        assert_eq!(new.upstream, "postgres://a@10.0.0.1:5432/app");
        assert_eq!(
            new.server.log_level.as_deref(),
            Some("debug"),
            "reloadable settings are taken"
        );
    }
}
