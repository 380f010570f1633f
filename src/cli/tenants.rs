//! Placeholder until this subcommand is built.

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
