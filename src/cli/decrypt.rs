//! `cmk-proxy decrypt`: the way back, a table in the policy's format to
//! legacy plaintext online (docs/ADOPTING.md, "The way back").

use std::time::Duration;

use crate::adopt::decrypt::{self, DecryptOptions, DecryptOutcome};
use crate::adopt::AdoptError;

/// Exit code when rows stay encrypted (a revoked key …) and the table
/// stays in transition.
pub const EXIT_INCOMPLETE: i32 = super::encrypt::EXIT_INCOMPLETE;

/// Decrypt a table back to plaintext in its legacy column types, online.
///
/// The table keeps serving reads and writes through the proxy; the run may
/// be killed at any moment and started again (it resumes). Rows of a tenant
/// whose key is revoked stay encrypted (KM001) and are listed; the others
/// proceed. With --tenant only that tenant's rows are decrypted and the
/// table stays in transition, its columns mixed (plaintext for the tenant,
/// cells for the others), which the proxy serves.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// The policy table, `schema.table`.
    #[arg(long)]
    pub table: String,
    /// Only this tenant's rows (a customer that leaves).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Rows per batch (the memory of a run is bounded by it).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Print the plan (DDL, rows) and change nothing.
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
    let options = DecryptOptions {
        table: args.table.clone(),
        tenant: args.tenant.clone(),
        batch: args.batch_size.max(1),
        dry_run: args.dry_run,
        swap_after: args
            .swap_after
            .unwrap_or(policy.server.catalog_refresh + Duration::from_secs(2)),
    };
    let result = decrypt::decrypt(&policy, &service, &mut client, &options).await;
    service.audit().flush().await;
    let table = &args.table;
    let left = |remaining: &[(Option<String>, i64)]| {
        for (tenant, n) in remaining {
            println!(
                "  left encrypted: {n} rows of tenant {}",
                tenant.as_deref().unwrap_or("(none)")
            );
        }
    };
    let code = match result {
        Ok(DecryptOutcome::Planned) => 0,
        Ok(DecryptOutcome::Finished { rows, secs }) => {
            let rate = if secs > 0.0 { rows as f64 / secs } else { 0.0 };
            println!(
                "decrypt {table}: done: {rows} rows decrypted in {secs:.1}s ({rate:.0} rows/s); no cell is left, the table holds plaintext in its legacy column types and is served untouched"
            );
            0
        }
        Ok(DecryptOutcome::TenantDone { rows, remaining }) => {
            println!(
                "decrypt {table}: tenant {}: done: {rows} rows decrypted; the table stays in transition (its rows plaintext, the other tenants' cells):",
                args.tenant.as_deref().unwrap_or("")
            );
            left(&remaining);
            println!("run decrypt without --tenant to take the whole table out, or encrypt to seal it again");
            0
        }
        Ok(DecryptOutcome::Incomplete {
            rows,
            remaining,
            skips,
        }) => {
            println!(
                "decrypt {table}: {rows} rows decrypted; the table stays in transition (cells left are served as before):"
            );
            for ((tenant, reason), n) in &skips {
                let tenant = if tenant.is_empty() { "(none)" } else { tenant };
                println!("  skipped {n} rows of tenant {tenant}: {reason}");
            }
            left(&remaining);
            println!("enable the tenants' keys, then run decrypt again to finish");
            EXIT_INCOMPLETE
        }
        Err(AdoptError::Refused(why)) => {
            eprintln!("cmk-proxy decrypt: refused: {why}");
            super::serve::EXIT_CONFIG
        }
        Err(e) => {
            eprintln!("cmk-proxy decrypt: {e}");
            1
        }
    };
    Ok(code)
}
