//! `cmk-proxy check-config FILE [--live]`: validate a policy and report every
//! problem with its location; with `--live`, also compare it with the
//! schema of the upstream database and print the DDL that fixes each
//! mismatch. Exit code 2 when anything is wrong.

use std::path::PathBuf;

use crate::config;

/// Validate a policy file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML).
    pub file: PathBuf,
    /// Also check the policy tables in the upstream database (connects with
    /// the credentials of the `upstream` URL).
    #[arg(long)]
    pub live: bool,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let policy = match config::load_policy(&args.file) {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("{e}");
            return Ok(super::serve::EXIT_CONFIG);
        }
    };
    if args.live {
        let client = crate::proxy::admin::connect(&policy).await?;
        let problems = crate::catalog::check_schema(&client, &policy).await?;
        let checks = crate::catalog::envelope::envelope_checks(&client, &policy).await?;
        let indexes = crate::catalog::search_index::search_indexes(&client, &policy).await?;
        if !problems.is_empty() || !checks.is_empty() {
            eprintln!(
                "{}: the live schema does not match the policy:",
                args.file.display()
            );
            for problem in &problems {
                eprintln!("  - {problem}");
            }
            // The database's own refusal of plaintext (cmk-proxy migrate
            // adds it).
            for check in &checks {
                eprintln!("  - {check}\n    fix: {}", check.fix());
            }
            print_search_indexes(&indexes);
            return Ok(super::serve::EXIT_CONFIG);
        }
        print_search_indexes(&indexes);
    }
    println!(
        "{}: valid ({} protected table(s), {} provider(s), upstream {}{})",
        args.file.display(),
        policy.tables.len(),
        policy.keys.providers.len(),
        config::UpstreamAddr::parse(&policy.upstream)
            .map(|a| a.authority())
            .unwrap_or_default(),
        if args.live { ", schema matches" } else { "" }
    );
    Ok(0)
}

/// The lookup index of every searchable column: which exist, and the DDL
/// of the missing ones (a lookup without one scans the table).
fn print_search_indexes(indexes: &[crate::catalog::search_index::SearchIndex]) {
    if indexes.is_empty() {
        return;
    }
    println!("Equality lookups (search: equality) use an index on (tenant column, <col>_bidx):");
    for index in indexes {
        match &index.existing {
            Some(name) => println!("  {}.{}: index {name}", index.table, index.column),
            None => {
                println!(
                    "  {}.{}: no index (lookups scan the table)",
                    index.table, index.column
                );
                println!("    {}", index.create_sql());
                println!(
                    "    -- or, to make {} unique within each tenant:",
                    index.column
                );
                println!("    -- {}", index.unique_sql());
            }
        }
    }
}
