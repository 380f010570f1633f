//! `cmk-proxy check-config FILE`: validate a policy and report every problem
//! with its location (exit code 2 when invalid).

use std::path::PathBuf;

use crate::config;

/// Validate a policy file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML).
    pub file: PathBuf,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    match config::load_policy(&args.file) {
        Ok(policy) => {
            println!(
                "{}: valid ({} protected table(s), {} provider(s), upstream {})",
                args.file.display(),
                policy.tables.len(),
                policy.keys.providers.len(),
                config::UpstreamAddr::parse(&policy.upstream)
                    .map(|a| a.authority())
                    .unwrap_or_default()
            );
            Ok(0)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(super::serve::EXIT_CONFIG)
        }
    }
}
