//! `cmk-proxy health`: asks a running proxy's admin endpoint whether it is
//! ready (`/readyz`, or alive with `--alive`), prints the answer and exits 0
//! only on 200. It is the container's HEALTHCHECK (the runtime image has no
//! shell or curl) and works as a Kubernetes exec probe.

use std::time::Duration;

/// Ask a running proxy's admin endpoint for its health.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin endpoint (`admin.listen`), e.g. `127.0.0.1:9187`.
    #[arg(long, default_value = "127.0.0.1:9187")]
    pub admin: String,
    /// Ask `/healthz` (alive) instead of `/readyz` (ready).
    #[arg(long)]
    pub alive: bool,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let path = if args.alive { "/healthz" } else { "/readyz" };
    let url = format!("http://{}{path}", args.admin);
    let client = reqwest::Client::builder().timeout(args.timeout).build()?;
    match client.get(&url).send().await {
        Ok(response) => {
            let ok = response.status().is_success();
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            println!("{status} {body}");
            Ok(if ok { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("cmk-proxy: {url}: {e}");
            Ok(1)
        }
    }
}
