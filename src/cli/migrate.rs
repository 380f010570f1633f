//! `cmk-proxy migrate`: create or upgrade the `cmk` registry schema, or print
//! its DDL for a DBA to review. Safe to run from several replicas at once.

use tokio_postgres::error::SqlState;

use crate::catalog::envelope::{envelope_checks, CheckKind, CheckState, EnvelopeCheck};
use crate::catalog::schema_notify;
use crate::keys::{ddl_script, migrate, Registry, MIGRATIONS};

/// Create or upgrade the `cmk` schema (tenants, data keys, schema versions),
/// and put the envelope CHECK constraint on every protected column.
///
/// Applies the embedded migrations that are missing, inside one transaction
/// holding an advisory lock, and records them in `cmk.schema_version`. Then,
/// with a policy, adds to each protected column of each existing policy
/// table a CHECK that only NULL or a cell envelope passes (NOT VALID, then
/// VALIDATE: no long lock).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// Print the DDL instead of applying it (with a policy: also what the
    /// live policy tables need).
    #[arg(long)]
    pub print: bool,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    if args.print && args.policy.config.is_none() && args.policy.upstream.is_none() {
        print!("{}", ddl_script());
        return Ok(0);
    }
    let policy = match super::serve::load_with_overrides(
        args.policy.config.as_ref(),
        None,
        args.policy.upstream.as_ref(),
    ) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    if args.print {
        // The cmk schema, then what the policy tables of the live database
        // need (the fixes `check-config --live` reports).
        print!("{}", ddl_script());
        let client = crate::proxy::admin::connect(&policy).await?;
        let problems = crate::catalog::check_schema(&client, &policy).await?;
        println!("\n-- policy tables: {} change(s) needed", problems.len());
        for problem in problems {
            println!("-- {}: {}", problem.location, problem.message);
            match problem.fix {
                Some(fix) => println!("{fix}"),
                None => println!("-- (no automatic fix: create or rename it by hand)"),
            }
        }
        if !schema_notify::installed(&client).await? {
            println!(
                "\n-- event trigger {}: proxies reload their catalog at each DDL (superuser)\n{}",
                schema_notify::TRIGGER,
                schema_notify::INSTALL_SQL
            );
        }
        let checks = envelope_checks(&client, &policy).await?;
        println!(
            "\n-- envelope and blind-index CHECK constraints: {} to add or validate",
            checks.len()
        );
        for check in checks {
            println!("-- {check}\n{}", check.fix());
        }
        return Ok(0);
    }
    let registry = Registry::new(&policy)?;
    let client = registry.connect_dedicated().await?;
    let applied = migrate(&client).await?;
    let latest = MIGRATIONS.last().map(|m| m.version).unwrap_or_default();
    if applied.is_empty() {
        println!("cmk schema is up to date (version {latest})");
    } else {
        let list: Vec<String> = applied.iter().map(u32::to_string).collect();
        println!(
            "applied cmk schema versions {} (now at version {latest})",
            list.join(", ")
        );
    }
    if policy.tables.is_empty() {
        return Ok(0);
    }
    let client = crate::proxy::admin::connect(&policy).await?;
    install_schema_notify(&client).await;
    let mut failed = 0;
    for check in envelope_checks(&client, &policy).await? {
        match apply_check(&client, &check).await {
            Ok(()) => println!(
                "{}.{}: CHECK constraint {} validated",
                check.table,
                check.column,
                check.name()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{}.{}: {e}", check.table, check.column);
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// Installs the event trigger that tells every proxy of DDL at once (see
/// `catalog::schema_notify`); a role that may not create event triggers
/// (only superusers may) is told what that costs, and `migrate` goes on.
async fn install_schema_notify(client: &tokio_postgres::Client) {
    match client.batch_execute(schema_notify::INSTALL_SQL).await {
        Ok(()) => println!(
            "event trigger {} installed: proxies reload their catalog at each DDL",
            schema_notify::TRIGGER
        ),
        Err(e) => eprintln!(
            "note: event trigger {} not installed ({}): DDL run directly against PostgreSQL \
             is seen by the proxies within server.catalog_refresh; a superuser can run \
             `cmk-proxy migrate --print` and install it",
            schema_notify::TRIGGER,
            crate::pg_error::text(&e)
        ),
    }
}

/// How long `migrate` waits for the brief lock of `ADD CONSTRAINT … NOT
/// VALID` before trying again: never queue the application's statements
/// behind it for longer.
const LOCK_TIMEOUT: &str = "1s";

/// Lock waits tried before giving up.
const LOCK_ATTEMPTS: u32 = 5;

/// Adds the constraint NOT VALID (a brief ACCESS EXCLUSIVE lock, no scan,
/// bounded by `lock_timeout`), then validates it under SHARE UPDATE
/// EXCLUSIVE, which lets reads and writes go on.
async fn apply_check(client: &tokio_postgres::Client, check: &EnvelopeCheck) -> anyhow::Result<()> {
    if check.state == CheckState::Missing {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Two statements, not one string: Citus refuses a multi-statement
            // string that it would have to send on to the shards.
            client
                .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
                .await?;
            match client.batch_execute(&check.add_sql()).await {
                Ok(()) => break,
                Err(e)
                    if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                        && attempt < LOCK_ATTEMPTS =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!(
                    "cannot add the CHECK constraint {}: {}",
                    check.name(),
                    crate::pg_error::text(&e)
                ),
            }
        }
    }
    client.batch_execute("RESET lock_timeout").await?;
    client
        .batch_execute(&check.validate_sql())
        .await
        .map_err(|e| match e.code() {
            Some(&SqlState::CHECK_VIOLATION) if check.kind == CheckKind::BlindIndex => anyhow::anyhow!(
                "holds values without a blind index (written before the column was declared search: equality?): the constraint {} stays NOT VALID, so new writes are checked, and equality lookups on the column stay refused until every value has its index (seal the values again through the proxy), then run migrate again",
                check.name()
            ),
            Some(&SqlState::CHECK_VIOLATION) => anyhow::anyhow!(
                "holds cells that are not envelopes (legacy plaintext?): the constraint {} stays NOT VALID, so new writes are checked; seal the old rows, then run migrate again",
                check.name()
            ),
            _ => anyhow::anyhow!(
                "cannot validate the CHECK constraint {}: {}",
                check.name(),
                crate::pg_error::text(&e)
            ),
        })
}
