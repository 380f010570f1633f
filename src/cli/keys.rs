//! `cmk-proxy keys rotate`: start a new data-key epoch for a tenant;
//! `cmk-proxy keys list`: each DEK of a tenant, its state and its cells.

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
    /// List the tenant's data keys: epoch, state (current or retired) and
    /// how many cells of the policy's tables each still seals (one scan of
    /// every protected column), so an operator knows when a retired DEK is
    /// unused.
    List {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
    },
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let (policy, service) = match super::tenants::connect(&args.policy, true).await? {
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
        KeysCommand::List { tenant } => list(&policy, &service, &tenant).await?,
    };
    service.audit().flush().await;
    Ok(code)
}

/// Prints the tenant's DEKs with their state and cell counts.
async fn list(
    policy: &crate::config::Policy,
    service: &crate::keys::KeyService,
    tenant: &str,
) -> anyhow::Result<i32> {
    let keys = service.registry().data_keys(tenant).await?;
    if keys.is_empty() {
        eprintln!(
            "cmk-proxy: tenant {tenant} has no data keys (unknown tenant, or nothing written yet)"
        );
        return Ok(1);
    }
    let client = service.registry().connect_dedicated().await?;
    let counts = crate::adopt::usage::cells_per_dek(&client, policy).await?;
    println!(
        "{:<36}  {:>5}  {:<8}  {:>10}  created",
        "dek_id", "epoch", "state", "cells"
    );
    for key in &keys {
        let state = if key.retired_at.is_some() {
            "retired"
        } else {
            "current"
        };
        println!(
            "{:<36}  {:>5}  {:<8}  {:>10}  {}",
            key.dek_id,
            key.epoch,
            state,
            counts.get(&key.dek_id).copied().unwrap_or(0),
            key.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(0)
}
