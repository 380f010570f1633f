//! `cmk-proxy serve`: load the policy, listen, relay until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, LogFormat, Policy};

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: i32 = 2;

/// Run the proxy.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML). Without it the proxy is a pure passthrough.
    #[arg(long, short = 'c', env = "CMK_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Upstream PostgreSQL URL (overrides `upstream`).
    #[arg(long)]
    pub upstream: Option<String>,
    /// Log line format (overrides `server.log_format`).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Loads the policy named by `config` (or the defaults) and applies the
/// command-line overrides; prints every problem and returns `Err(2)`.
pub fn load_with_overrides(
    config: Option<&PathBuf>,
    listen: Option<SocketAddr>,
    upstream: Option<&String>,
) -> Result<Policy, i32> {
    let mut policy = match config {
        Some(path) => config::load_policy(path).map_err(|e| {
            eprintln!("cmk-proxy: {e}");
            EXIT_CONFIG
        })?,
        None => Policy::default(),
    };
    if let Some(listen) = listen {
        policy.listen = listen;
    }
    if let Some(upstream) = upstream {
        if let Err(e) = config::UpstreamAddr::parse(upstream) {
            eprintln!("cmk-proxy: invalid --upstream: {e}");
            return Err(EXIT_CONFIG);
        }
        policy.upstream = upstream.clone();
    }
    Ok(policy)
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let policy =
        match load_with_overrides(args.config.as_ref(), args.listen, args.upstream.as_ref()) {
            Ok(policy) => policy,
            Err(code) => return Ok(code),
        };
    super::logging::init(args.log_format.unwrap_or(policy.server.log_format));
    match super::hardening::harden() {
        Ok(done) => {
            if !done.memory_locked {
                tracing::warn!(
                    "memory not locked (RLIMIT_MEMLOCK is not unlimited): pages holding keys may be swapped out"
                );
            }
            tracing::info!(
                core_dumps = false,
                memory_locked = done.memory_locked,
                "process hardened"
            );
        }
        Err(e) => {
            eprintln!("cmk-proxy: {e}");
            return Ok(1);
        }
    }
    let listener = match tokio::net::TcpListener::bind(policy.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cmk-proxy: cannot listen on {}: {e}", policy.listen);
            return Ok(1);
        }
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    crate::proxy::run_server(Arc::new(policy), listener, shutdown).await?;
    Ok(0)
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}
