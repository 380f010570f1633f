//! Command-line interface: one file per subcommand, each with its clap
//! `Args` and a `run` that returns the process exit code.

pub mod check_config;
pub mod decrypt;
pub mod decrypt_dump;
#[cfg(feature = "dev")]
pub mod dev;
pub mod encrypt;
pub mod hardening;
pub mod health;
pub mod keyring;
pub mod keys;
pub mod logging;
pub mod migrate;
pub mod reencrypt;
pub mod reload;
pub mod rewrap;
pub mod serve;
pub mod tenants;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where an administrative command finds the policy and the upstream.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Policy file (YAML): upstream credentials, TLS and key providers.
    #[arg(long, short = 'c', env = "CMK_PROXY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Upstream PostgreSQL URL (overrides `upstream`).
    #[arg(long, global = true)]
    pub upstream: Option<String>,
}

/// Transparent per-tenant encryption proxy for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "cmk-proxy", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve(serve::Args),
    /// Start a throwaway local PostgreSQL and the proxy in front of it (demo).
    #[cfg(feature = "dev")]
    Dev(dev::Args),
    /// Validate a policy file (and, with --live, against the database).
    CheckConfig(check_config::Args),
    /// Create or upgrade the `cmk` schema (or print the DDL).
    Migrate(migrate::Args),
    /// Play the tenant with a local keyring: create, disable, enable, destroy keys.
    Keyring(keyring::Args),
    /// Manage tenants in `cmk.tenants`.
    Tenants(tenants::Args),
    /// Data-key operations (rotation).
    Keys(keys::Args),
    /// Encrypt a legacy plaintext table in place, online and resumable.
    Encrypt(encrypt::Args),
    /// Decrypt a table back to plaintext in its legacy types, online and resumable.
    Decrypt(decrypt::Args),
    /// Move a tenant's cells to its current data key (after keys rotate or rewrap).
    Reencrypt(reencrypt::Args),
    /// Re-wrap a tenant's EDEKs under a new key without touching ciphertext.
    Rewrap(rewrap::Args),
    /// Asks a running `serve` to reload its policy file (SIGHUP).
    Reload(reload::Args),
    /// Asks a running proxy's admin endpoint whether it is ready (exit 0) or not.
    Health(health::Args),
    /// Decrypt the protected columns of a plain pg_dump offline, with the tenants' keys only.
    #[command(long_about = decrypt_dump::LONG_ABOUT)]
    DecryptDump(decrypt_dump::Args),
}

/// Runs the parsed command and returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        #[cfg(feature = "dev")]
        Command::Dev(args) => dev::run(args).await,
        Command::CheckConfig(args) => check_config::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Keyring(args) => keyring::run(args).await,
        Command::Tenants(args) => tenants::run(args).await,
        Command::Keys(args) => keys::run(args).await,
        Command::Encrypt(args) => encrypt::run(args).await,
        Command::Decrypt(args) => decrypt::run(args).await,
        Command::Reencrypt(args) => reencrypt::run(args).await,
        Command::Rewrap(args) => rewrap::run(args).await,
        Command::Reload(args) => reload::run(args),
        Command::Health(args) => health::run(args).await,
        Command::DecryptDump(args) => decrypt_dump::run(args).await,
    }
}
