//! `cmk-proxy keyring create|disable|enable|destroy|list`: play the tenant's
//! side with a local keyring file: create and rotate master keys, revoke
//! them, and crypto-shred them. Never prints key material.

use std::path::{Path, PathBuf};

use crate::kms::{Keyring, KmsError};

/// Play the tenant with a local keyring file (mode 0600).
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Play the tenant with a local keyring file (mode 0600).\n\n\
    The local key provider (`kind: local` in `keys.providers`) reads master keys \
    from this file and re-reads it whenever it changes, so `disable` or `destroy` \
    here takes effect in a running proxy within `approval_ttl`."
)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: KeyringCommand,
}

/// The keyring file argument shared by every subcommand.
#[derive(Debug, clap::Args)]
pub struct KeyringFile {
    /// Keyring file (JSON, mode 0600).
    #[arg(long, value_name = "FILE", env = "CMK_KEYRING")]
    pub keyring: PathBuf,
}

/// Keyring subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeyringCommand {
    /// Create a master key for TENANT (creating the file, mode 0600, if
    /// missing); on an existing enabled key, add a new version (rotation:
    /// EDEKs wrapped under older versions stay unwrappable).
    Create {
        /// Key name (conventionally the tenant id; the policy's `key`).
        tenant: String,
        #[command(flatten)]
        file: KeyringFile,
    },
    /// Disable TENANT's key: wrap and unwrap are refused until `enable`.
    Disable {
        /// Key name.
        tenant: String,
        #[command(flatten)]
        file: KeyringFile,
    },
    /// Re-enable a disabled key.
    Enable {
        /// Key name.
        tenant: String,
        #[command(flatten)]
        file: KeyringFile,
    },
    /// Destroy TENANT's key: its material is wiped from the file, every
    /// EDEK wrapped under it becomes undecryptable forever (crypto-shredding).
    Destroy {
        /// Key name.
        tenant: String,
        #[command(flatten)]
        file: KeyringFile,
    },
    /// List keys (or one key) with state and versions; no material.
    List {
        /// Only this key.
        tenant: Option<String>,
        #[command(flatten)]
        file: KeyringFile,
    },
}

/// Runs the subcommand: exit code 0 on success, 1 with a message on stderr.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    match execute(args.command) {
        Ok(message) => {
            println!("{message}");
            Ok(0)
        }
        Err(message) => {
            eprintln!("cmk-proxy keyring: {message}");
            Ok(1)
        }
    }
}

fn execute(command: KeyringCommand) -> Result<String, String> {
    match command {
        KeyringCommand::Create { tenant, file } => {
            let version = Keyring::update(&file.keyring, true, |ring| ring.create_key(&tenant))
                .map_err(plain)?;
            Ok(if version == 1 {
                format!(
                    "created key {tenant:?} (version 1) in {}",
                    show(&file.keyring)
                )
            } else {
                format!(
                    "rotated key {tenant:?}: new version {version} in {}; older versions stay for unwrapping",
                    show(&file.keyring)
                )
            })
        }
        KeyringCommand::Disable { tenant, file } => update(&file.keyring, |ring| {
            ring.set_enabled(&tenant, false)?;
            Ok(format!("disabled key {tenant:?}"))
        }),
        KeyringCommand::Enable { tenant, file } => update(&file.keyring, |ring| {
            ring.set_enabled(&tenant, true)?;
            Ok(format!("enabled key {tenant:?}"))
        }),
        KeyringCommand::Destroy { tenant, file } => update(&file.keyring, |ring| {
            ring.destroy(&tenant)?;
            Ok(format!(
                "destroyed key {tenant:?}: material wiped; data under it is unrecoverable"
            ))
        }),
        KeyringCommand::List { tenant, file } => {
            let ring = Keyring::load(&file.keyring).map_err(plain)?;
            let mut lines = Vec::new();
            for (name, entry) in ring.entries() {
                if tenant.as_deref().is_some_and(|t| t != name) {
                    continue;
                }
                let versions = entry.version_ids();
                let versions = if versions.is_empty() {
                    "-".to_owned()
                } else {
                    versions
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                lines.push(format!(
                    "{name}\t{}\tversions {versions}",
                    entry.state().as_str()
                ));
            }
            match (&tenant, lines.is_empty()) {
                (Some(t), true) => Err(format!(
                    "no key named {t:?} in keyring {}",
                    show(&file.keyring)
                )),
                (None, true) => Ok(format!("keyring {} is empty", show(&file.keyring))),
                _ => Ok(lines.join("\n")),
            }
        }
    }
}

fn update(
    path: &Path,
    change: impl FnOnce(&mut Keyring) -> Result<String, KmsError>,
) -> Result<String, String> {
    Keyring::update(path, false, change).map_err(plain)
}

/// The message of a keyring error without the provider-configuration prefix.
fn plain(e: KmsError) -> String {
    match e {
        KmsError::Config(message) => message,
        other => other.to_string(),
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}
