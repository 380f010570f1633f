//! Test support for the key tests: a throwaway PostgreSQL with a fresh
//! database, a local keyring, and a policy pointing at both.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cmk_proxy::config::{Policy, ProviderConfig, UpstreamTlsMode};
use cmk_proxy::kms::Keyring;
use cmk_proxy::localpg::{LocalPostgres, LocalPostgresOptions};

/// A running cluster, a temp dir with a keyring, and a policy for one database.
pub struct KeyEnv {
    /// The PostgreSQL (stopped on drop).
    pub pg: LocalPostgres,
    /// Temp dir holding the keyring and audit files.
    pub dir: tempfile::TempDir,
    /// Path of the local keyring.
    pub keyring: PathBuf,
    /// Policy with a `local` provider, registry = database `app`.
    pub policy: Policy,
}

/// Starts PostgreSQL (no TLS unless asked) and creates a keyring holding `keys`.
pub fn key_env(keys: &[&str], approval_ttl: Duration) -> KeyEnv {
    key_env_with(keys, approval_ttl, false)
}

/// Like [`key_env`], optionally with TLS on the server.
pub fn key_env_with(keys: &[&str], approval_ttl: Duration, tls: bool) -> KeyEnv {
    let pg = LocalPostgres::start(LocalPostgresOptions {
        tls,
        ..LocalPostgresOptions::default()
    })
    .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let mut ring = Keyring::load_or_empty(&keyring).unwrap();
    for k in keys {
        ring.create_key(k).unwrap();
    }
    ring.save().unwrap();
    let mut policy = Policy {
        upstream: pg.url("scram_user", "scram_pw", "app"),
        ..Policy::default()
    };
    policy.tls.upstream.mode = UpstreamTlsMode::Disable;
    policy.keys.approval_ttl = approval_ttl;
    policy.keys.providers.insert(
        "local".to_owned(),
        ProviderConfig::Local {
            path: keyring.clone(),
        },
    );
    policy.audit.sink = cmk_proxy::config::AuditSink::File {
        path: dir.path().join("audit.jsonl"),
    };
    KeyEnv {
        pg,
        dir,
        keyring,
        policy,
    }
}

/// Edits the keyring file the way the tenant would.
pub fn edit_keyring(path: &Path, edit: impl FnOnce(&mut Keyring)) {
    let mut ring = Keyring::load(path).unwrap();
    edit(&mut ring);
    ring.save().unwrap();
}

/// A connected admin client on `db` (connection driven in the background).
pub async fn admin(pg: &LocalPostgres, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.admin_url(db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Writes a policy as YAML for the CLI (only the parts the key commands read).
pub fn write_policy_yaml(env: &KeyEnv) -> PathBuf {
    let path = env.dir.path().join("policy.yaml");
    let ttl = humantime::format_duration(env.policy.keys.approval_ttl);
    let yaml = format!(
        "upstream: {}\ntls:\n  upstream: {{mode: disable}}\nkeys:\n  approval_ttl: {ttl}\n  providers:\n    local: {{kind: local, path: {}}}\naudit:\n  sink: {{kind: file, path: {}}}\n",
        env.policy.upstream,
        env.keyring.display(),
        env.dir.path().join("audit.jsonl").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}
