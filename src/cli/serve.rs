//! `cmk-proxy serve`: load the policy, listen, relay until SIGTERM/SIGINT;
//! reload the policy on SIGHUP; serve the admin endpoint when configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, LogFormat, Policy};
use crate::ops::admin_http;
use crate::ops::metrics::metrics;
use crate::ops::reload::{ApplyLogLevel, PolicySource, Reloader};
use crate::proxy::ServerContext;

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
    /// Write the process id here (for `cmk-proxy reload --pid-file`);
    /// removed at exit.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
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
    let filter = match super::logging::filter(policy.server.log_level.as_deref()) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("cmk-proxy: {e}");
            return Ok(EXIT_CONFIG);
        }
    };
    super::logging::init(args.log_format.unwrap_or(policy.server.log_format), filter);
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
    let admin_listener = match policy.admin.listen {
        Some(address) => match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("cmk-proxy: cannot listen on admin.listen {address}: {e}");
                return Ok(1);
            }
        },
        None => None,
    };
    let _pid_file = match args.pid_file.as_deref().map(PidFile::write).transpose() {
        Ok(pid_file) => pid_file,
        Err(e) => {
            eprintln!("cmk-proxy: {e}");
            return Ok(1);
        }
    };
    metrics().set_tenant_labels(policy.metrics.tenant_labels);
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    // Listened to from here on: SIGHUP's default action would end the
    // process while it starts.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let ctx = Arc::new(ServerContext::new(Arc::new(policy), shutdown.clone()).await?);
    let source = PolicySource {
        config: args.config.clone(),
        listen: args.listen,
        upstream: args.upstream.clone(),
    };
    let reloader = Arc::new(Reloader::new(
        ctx.clone(),
        source,
        Box::new(prepare_log_level),
    ));
    spawn_reload_on_sighup(hangups, reloader.clone(), shutdown.clone());
    if let Some(admin_listener) = admin_listener {
        if let Ok(address) = admin_listener.local_addr() {
            tracing::info!(%address, "admin endpoint listening (/metrics, /healthz, /readyz, POST /reload)");
        }
        tokio::spawn(admin_http::serve(admin_listener, reloader, shutdown));
    }
    crate::proxy::serve_context(ctx, listener).await?;
    Ok(0)
}

/// Checks a log filter and returns what installs it.
fn prepare_log_level(level: Option<&str>) -> Result<ApplyLogLevel, String> {
    let filter = super::logging::filter(level)?;
    Ok(Box::new(move || super::logging::set_filter(filter)))
}

/// Reloads the configuration on every SIGHUP until shutdown.
fn spawn_reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                received = hup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP received: reloading the configuration");
                    // Errors are logged and counted by the reloader.
                    let _ = reloader.reload().await;
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// The pid file of `--pid-file`, removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> Result<PidFile, String> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
