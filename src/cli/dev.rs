//! `cmk-proxy dev`: a throwaway local PostgreSQL with the proxy in front of it,
//! so cmk-proxy can be tried with one command. Owns only the wiring; the
//! cluster is `localpg`, the relay is `proxy::run_server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Policy, UpstreamTls, UpstreamTlsMode};
use crate::localpg::{LocalPostgres, LocalPostgresOptions};

/// Start a local PostgreSQL and the proxy in front of it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address the proxy listens on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: SocketAddr,
    /// Keep the cluster in this directory (reused on the next run) instead of
    /// a temp dir removed on exit.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run a short demo through the proxy (create, insert, select) and exit.
    #[arg(long)]
    pub exit_after_demo: bool,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    super::logging::init(LogFormat::Human);
    // Ctrl-C is handled from the start, so it always stops both cleanly
    // (a signal during start-up makes the proxy stop at once).
    let shutdown = CancellationToken::new();
    super::serve::spawn_signal_handler(shutdown.clone())?;
    let opts = LocalPostgresOptions {
        data_dir: args.data_dir.clone(),
        ..LocalPostgresOptions::default()
    };
    let pg = tokio::task::spawn_blocking(move || LocalPostgres::start(opts))
        .await
        .context("PostgreSQL start-up task failed")?
        .context("cannot start a local PostgreSQL")?;
    let result = serve(&pg, &args, shutdown).await;
    // Stopping the cluster blocks on pg_ctl; keep it off the runtime threads.
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .context("PostgreSQL shutdown task failed")?;
    result.map(|()| 0)
}

async fn serve(pg: &LocalPostgres, args: &Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let policy = Policy {
        listen: addr,
        upstream: pg.admin_url("app"),
        tls: crate::config::TlsConfig {
            client: None,
            upstream: UpstreamTls {
                mode: UpstreamTlsMode::VerifyFull,
                ca: pg.ca_cert_path().map(ToOwned::to_owned),
                server_name: None,
            },
        },
        ..Policy::default()
    };
    let url = format!("postgres://scram_user:scram_pw@{addr}/app");
    println!(
        "PostgreSQL on 127.0.0.1:{} (data {}, log {})",
        pg.port(),
        pg.data_dir().display(),
        pg.log_path().display()
    );
    println!("cmk-proxy on {addr} (upstream TLS verify-full)");
    println!("DATABASE_URL={url}");

    let server = tokio::spawn(crate::proxy::run_server(
        Arc::new(policy),
        listener,
        shutdown.clone(),
    ));
    if args.exit_after_demo {
        let demo_result = demo(&url).await;
        shutdown.cancel();
        server.await.context("proxy task failed")??;
        return demo_result;
    }
    println!("try: psql {url}    (Ctrl-C to stop)");
    server.await.context("proxy task failed")??;
    Ok(())
}

/// A short session through the proxy: create a table, insert, read back.
async fn demo(url: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("demo: cannot connect through the proxy")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS demo_notes (id serial PRIMARY KEY, body text NOT NULL);\
             TRUNCATE demo_notes RESTART IDENTITY",
        )
        .await
        .context("demo: create table")?;
    let insert = client
        .prepare("INSERT INTO demo_notes (body) VALUES ($1)")
        .await
        .context("demo: prepare insert")?;
    for body in ["first note", "second note", "third note"] {
        client
            .execute(&insert, &[&body])
            .await
            .context("demo: insert")?;
    }
    let rows = client
        .query("SELECT id, body FROM demo_notes ORDER BY id", &[])
        .await
        .context("demo: select")?;
    println!("demo: {} rows through the proxy", rows.len());
    for row in &rows {
        let id: i32 = row.get(0);
        let body: &str = row.get(1);
        println!("  {id} | {body}");
    }
    drop(client);
    // The connection task ends when the client is gone; its error is not the demo's.
    let _ = connection.await;
    Ok(())
}
