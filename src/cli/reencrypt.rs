//! `cmk-proxy reencrypt`: move a tenant's cells to its current DEK and
//! refresh the rows' EDEK copies (src/adopt/reencrypt.rs).

/// Move a tenant's cells from retired DEKs to its current one.
///
/// Run after `keys rotate` (cells move to the new DEK) or `rewrap` (the
/// rows' EDEK copies are rewritten from the registry). Online and
/// resumable: batches by primary key with a compare-and-set per cell; a run
/// started again finds only the rows left. `keys list --tenant T` then shows
/// zero cells on the retired DEKs.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Only this policy table (`schema.table`); default every policy table.
    #[arg(long)]
    pub table: Option<String>,
    /// Rows per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
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
    let tables: Vec<String> = match &args.table {
        Some(t) => vec![t.clone()],
        None => policy.tables.keys().cloned().collect(),
    };
    let mut code = 0;
    for table in tables {
        let mut progress =
            crate::adopt::progress::Progress::start(&format!("reencrypt {table}"), 0);
        let result = crate::adopt::reencrypt::reencrypt_table(
            &mut client,
            &service,
            &policy,
            &table,
            &args.tenant,
            args.batch_size,
            &mut |n| progress.advance(n),
        )
        .await;
        progress.finish();
        match result {
            Ok(outcome) => println!(
                "reencrypt {table}: tenant {}: {} rows rewritten, {} cells moved to the current data key",
                args.tenant, outcome.rows, outcome.cells
            ),
            Err(e) => {
                eprintln!("cmk-proxy reencrypt {table}: {e}");
                code = 1;
            }
        }
    }
    service.audit().flush().await;
    Ok(code)
}
