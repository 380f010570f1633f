//! `cmk-proxy rewrap`: re-wrap a tenant's EDEKs under a new key (or the
//! newest version of its key) without touching cell ciphertext.

/// Re-wrap a tenant's data keys under a new master key without touching ciphertext.
///
/// Unwraps each of the tenant's EDEKs in `cmk.data_keys` with its provider,
/// wraps it again under `--to-key` (or the tenant's current key, i.e. its
/// newest version), and stores the new EDEKs and the tenant's key_ref in one
/// transaction. Cells are unchanged. The copies of the EDEK kept in each
/// protected row's EDEK column are not rewritten by this command.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file and upstream.
    #[command(flatten)]
    pub policy: super::PolicyArgs,
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// New key reference within the tenant's provider (default: its current key).
    #[arg(long)]
    pub to_key: Option<String>,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let (_policy, service) = match super::tenants::connect(&args.policy, true).await? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let code = match service.rewrap(&args.tenant, args.to_key.as_deref()).await {
        Ok(n) => {
            let key = match &args.to_key {
                Some(k) => k.clone(),
                None => "its current key".to_owned(),
            };
            println!(
                "re-wrapped {n} data keys of tenant {} under {key}",
                args.tenant
            );
            0
        }
        Err(e) => {
            eprintln!("cmk-proxy: rewrap failed: {e}");
            1
        }
    };
    service.audit().flush().await;
    Ok(code)
}
