//! `cmk-proxy encrypt`: convert a legacy plaintext table to the policy's
//! format online (docs/ADOPTING.md).

use std::time::Duration;

use crate::adopt::{self, EncryptOptions, EncryptOutcome};

/// Exit code when rows were skipped and the table stays in transition.
pub const EXIT_INCOMPLETE: i32 = 3;

/// Encrypt a legacy table in place while the application keeps running.
///
/// The table keeps serving reads and writes through the proxy; the run may
/// be killed at any moment and started again (it resumes). Rows of tenants
/// without a registered key, or with a revoked one, are skipped and listed;
/// the table then stays in transition until a later run seals them.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// The policy table, `schema.table`.
    #[arg(long)]
    pub table: String,
    /// Rows per batch (the memory of a run is bounded by it).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Print the plan (DDL, rows, estimate) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long running proxies get to load the transition view before it
    /// takes the table's name (default: the policy's server.catalog_refresh
    /// plus 2 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub swap_after: Option<Duration>,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let (policy, service) = match super::tenants::connect(&args.policy, true).await? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    super::logging::init(
        policy.server.log_format,
        super::logging::filter(policy.server.log_level.as_deref()).unwrap_or_default(),
    );
    let mut client = service.registry().connect_dedicated().await?;
    let options = EncryptOptions {
        table: args.table.clone(),
        batch: args.batch_size.max(1),
        dry_run: args.dry_run,
        swap_after: args
            .swap_after
            .unwrap_or(policy.server.catalog_refresh + Duration::from_secs(2)),
    };
    let result = adopt::encrypt(&policy, &service, &mut client, &options).await;
    service.audit().flush().await;
    let code = match result {
        Ok(EncryptOutcome::Planned) => 0,
        Ok(EncryptOutcome::Finished { rows, secs }) => {
            let rate = if secs > 0.0 { rows as f64 / secs } else { 0.0 };
            println!(
                "encrypt {}: done: {rows} rows sealed in {secs:.1}s ({rate:.0} rows/s); every protected cell is an envelope or NULL, the table is out of transition",
                args.table
            );
            0
        }
        Ok(EncryptOutcome::Incomplete {
            rows,
            remaining,
            skips,
        }) => {
            println!(
                "encrypt {}: {rows} rows sealed; the table stays in transition (legacy values are served until they are sealed):",
                args.table
            );
            for ((tenant, reason), n) in &skips {
                let tenant = if tenant.is_empty() { "(none)" } else { tenant };
                println!("  skipped {n} rows of tenant {tenant}: {reason}");
            }
            for (tenant, n) in &remaining {
                println!(
                    "  left with legacy values: {n} rows of tenant {}",
                    tenant.as_deref().unwrap_or("(none)")
                );
            }
            println!("register or enable the tenants' keys, then run encrypt again to finish");
            EXIT_INCOMPLETE
        }
        Err(adopt::AdoptError::Refused(why)) => {
            eprintln!("cmk-proxy encrypt: refused: {why}");
            super::serve::EXIT_CONFIG
        }
        Err(e) => {
            eprintln!("cmk-proxy encrypt: {e}");
            1
        }
    };
    Ok(code)
}
