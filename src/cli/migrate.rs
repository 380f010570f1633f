//! `cmk-proxy migrate`: create or upgrade the `cmk` registry schema, or print
//! its DDL for a DBA to review. Safe to run from several replicas at once.

use crate::keys::{ddl_script, migrate, Registry, MIGRATIONS};

/// Create or upgrade the `cmk` schema (tenants, data keys, schema versions).
///
/// Applies the embedded migrations that are missing, inside one transaction
/// holding an advisory lock, and records them in `cmk.schema_version`.
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
    Ok(0)
}
