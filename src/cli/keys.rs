//! `cmk-proxy keys rotate`: start a new data-key epoch for a tenant.

/// Data-key operations.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// Data-key subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Retire the tenant's current DEK and create the next epoch: new writes
    /// use the new DEK, existing cells stay readable with their old DEK.
    /// Running proxies switch within `approval_ttl`.
    Rotate {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
    },
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let (_policy, service) = match super::tenants::connect(&args.policy, true).await? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let code = match args.command {
        KeysCommand::Rotate { tenant } => match service.rotate(&tenant).await {
            Ok(out) => {
                match out.retired {
                    Some(old) => println!(
                        "tenant {tenant}: retired data key {old}; new data key {} (epoch {})",
                        out.dek_id, out.epoch
                    ),
                    None => println!(
                        "tenant {tenant}: first data key {} (epoch {})",
                        out.dek_id, out.epoch
                    ),
                }
                0
            }
            Err(e) => {
                eprintln!("cmk-proxy: rotation failed: {e}");
                1
            }
        },
    };
    service.audit().flush().await;
    Ok(code)
}
