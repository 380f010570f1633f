//! `cmk-proxy tenants add|list|disable|enable`: manage `cmk.tenants`, the
//! registry of tenants and their customer-managed keys.

use std::path::Path;

use anyhow::Context;

use crate::audit::Audit;
use crate::config::{AuditSink, Policy};
use crate::keys::{KeyService, TenantStatus};

/// Manage tenants and their customer-managed keys in `cmk.tenants`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: TenantsCommand,
}

/// Tenant subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TenantsCommand {
    /// Add a tenant with its key (the key must exist and be enabled).
    Add {
        /// Tenant id, as stored in the rows' tenant column.
        tenant: String,
        /// Provider name from `keys.providers` in the policy.
        #[arg(long)]
        provider: String,
        /// Key reference within the provider (AWS key ARN/alias, keyring entry,
        /// PKCS#11 key label or `id:HEX`, KMIP Unique Identifier, Transit key name).
        #[arg(long)]
        key: String,
        /// Per-tenant audit sink: JSON such as `{"kind":"http","url":"..."}`,
        /// or a file path that receives the tenant's JSON-lines stream.
        #[arg(long)]
        audit_sink: Option<String>,
    },
    /// List tenants with their key, status and data-key epochs.
    List,
    /// Disable a tenant: proxies refuse its keys within `approval_ttl`.
    Disable {
        /// Tenant id.
        tenant: String,
    },
    /// Re-enable a disabled tenant (its KMS key must be enabled too).
    Enable {
        /// Tenant id.
        tenant: String,
    },
}

/// Loads the policy and connects a key service (migrating the schema if
/// needed); `Err(code)` after printing a configuration problem.
pub(crate) async fn connect(
    source: &super::PolicyArgs,
    audit: bool,
) -> anyhow::Result<Result<(Policy, KeyService), i32>> {
    let policy = match super::serve::load_with_overrides(
        source.config.as_ref(),
        None,
        source.upstream.as_ref(),
    ) {
        Ok(p) => p,
        Err(code) => return Ok(Err(code)),
    };
    let audit = if audit {
        Audit::start(&policy.audit).context("starting the audit writer")?
    } else {
        Audit::disabled()
    };
    let service = KeyService::connect(&policy, audit).await?;
    Ok(Ok((policy, service)))
}

fn parse_sink(text: &str) -> anyhow::Result<serde_json::Value> {
    let value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).context("--audit-sink is not valid JSON")?
    } else {
        let path = std::path::absolute(Path::new(text)).context("--audit-sink path")?;
        serde_json::json!({"kind": "file", "path": path})
    };
    serde_json::from_value::<AuditSink>(value.clone()).context(
        "--audit-sink is not a valid sink (kinds: none, stdout, file, tenant-files, http)",
    )?;
    Ok(value)
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let audit = matches!(args.command, TenantsCommand::Add { .. });
    let (policy, service) = match connect(&args.policy, audit).await? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let registry = service.registry();
    let code = match args.command {
        TenantsCommand::Add {
            tenant,
            provider,
            key,
            audit_sink,
        } => {
            let sink = audit_sink.as_deref().map(parse_sink).transpose()?;
            if !policy.keys.providers.contains_key(&provider) {
                eprintln!(
                    "cmk-proxy: provider '{provider}' is not in keys.providers of the policy"
                );
                return Ok(super::serve::EXIT_CONFIG);
            }
            if let Err(e) = service.check_key(&provider, &key, &tenant).await {
                eprintln!("cmk-proxy: key '{key}' cannot be used: {e}");
                return Ok(1);
            }
            if registry
                .add_tenant(&tenant, &provider, &key, sink.as_ref())
                .await?
            {
                println!("tenant {tenant} added (provider {provider}, key {key})");
                0
            } else {
                eprintln!("cmk-proxy: tenant {tenant} already exists (unchanged)");
                1
            }
        }
        TenantsCommand::List => {
            println!(
                "{:<24} {:<10} {:<40} {:<9} {:>5} {:>6}  AUDIT_SINK",
                "TENANT", "PROVIDER", "KEY_REF", "STATUS", "DEKS", "EPOCH"
            );
            for t in registry.list_tenants().await? {
                let keys = registry.data_keys(&t.tenant_id).await?;
                let epoch = keys
                    .iter()
                    .filter(|k| k.retired_at.is_none())
                    .map(|k| k.epoch)
                    .max()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into());
                let sink = t
                    .audit_sink
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<24} {:<10} {:<40} {:<9} {:>5} {:>6}  {sink}",
                    t.tenant_id,
                    t.provider,
                    t.key_ref,
                    t.status.as_str(),
                    keys.len(),
                    epoch
                );
            }
            0
        }
        TenantsCommand::Disable { tenant } => {
            set_status(&service, &policy, &tenant, TenantStatus::Disabled).await?
        }
        TenantsCommand::Enable { tenant } => {
            set_status(&service, &policy, &tenant, TenantStatus::Active).await?
        }
    };
    service.audit().flush().await;
    Ok(code)
}

async fn set_status(
    service: &KeyService,
    policy: &Policy,
    tenant: &str,
    status: TenantStatus,
) -> anyhow::Result<i32> {
    if !service.registry().set_tenant_status(tenant, status).await? {
        eprintln!("cmk-proxy: no tenant {tenant}");
        return Ok(1);
    }
    let ttl = humantime::format_duration(policy.keys.approval_ttl);
    match status {
        TenantStatus::Disabled => {
            println!("tenant {tenant} disabled; running proxies refuse its keys within approval_ttl ({ttl})")
        }
        TenantStatus::Active => {
            println!("tenant {tenant} enabled; proxies accept it again within approval_ttl ({ttl})")
        }
    }
    Ok(0)
}
