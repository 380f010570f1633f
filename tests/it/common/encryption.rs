//! Shared setup for column-encryption tests: a local keyring with two
//! tenants (`acme`, `globex`), a policy for one protected table, PostgreSQL
//! with the table created, the proxy, and a direct connection that sees the
//! stored bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use cmk_proxy::localpg::LocalPostgres;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::{connect, pg, start_proxy, Proxy};

/// Runs `cmk-proxy keyring <action> <tenant> --keyring <file>`.
pub fn keyring(file: &Path, action: &str, tenant: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["keyring", action, tenant, "--keyring"])
        .arg(file)
        .output()
        .expect("run cmk-proxy keyring");
    assert!(
        out.status.success(),
        "keyring {action} {tenant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PostgreSQL, keyring, audit file and the proxy with an encryption policy.
pub struct EncryptedSetup {
    /// The cluster (kept alive for the test).
    pub pg: LocalPostgres,
    /// The proxy.
    pub proxy: Proxy,
    /// A direct connection to PostgreSQL (database `app`).
    pub direct: Client,
    /// Keyring, audit log and policy live here.
    pub dir: tempfile::TempDir,
}

impl EncryptedSetup {
    /// Creates `schema` (SQL) and starts the proxy with `table` protected:
    /// `columns` is the YAML of its `columns:` map, one `name: {...}` per line.
    pub async fn start(schema: &str, table: &str, columns: &[&str]) -> Self {
        Self::start_with(schema, table, columns, "", "").await
    }

    /// Like `start`, with more providers (`name: {…}` lines under
    /// `keys.providers`) and more tenants (`name: {…}` lines under `tenants`).
    pub async fn start_with(
        schema: &str,
        table: &str,
        columns: &[&str],
        providers: &str,
        tenants: &str,
    ) -> Self {
        Self::start_configured(schema, table, columns, providers, tenants, "").await
    }

    /// Like `start_with`, with more top-level YAML (`server:` settings, say).
    pub async fn start_configured(
        schema: &str,
        table: &str,
        columns: &[&str],
        providers: &str,
        tenants: &str,
        extra: &str,
    ) -> Self {
        Self::start_on(pg(), schema, table, columns, providers, tenants, extra).await
    }

    /// Like `start_configured`, on a given cluster (a Citus coordinator, say).
    pub async fn start_on(
        pg: LocalPostgres,
        schema: &str,
        table: &str,
        columns: &[&str],
        providers: &str,
        tenants: &str,
        extra: &str,
    ) -> Self {
        let (direct, conn) = connect(&pg.admin_url("app")).await;
        std::mem::forget(conn);
        direct.batch_execute(schema).await.expect("schema");
        let dir = tempfile::tempdir().expect("temp dir");
        let ring = dir.path().join("keyring.json");
        keyring(&ring, "create", "acme");
        keyring(&ring, "create", "globex");
        let columns: String = columns.iter().map(|c| format!("      {c}\n")).collect();
        let indent = |lines: &str, by: &str| -> String {
            lines.lines().map(|l| format!("{by}{l}\n")).collect()
        };
        let tenants = if tenants.is_empty() {
            "acme: {provider: local, key: acme}"
        } else {
            tenants
        };
        let yaml = format!(
            "keys:\n  approval_ttl: 1s\n  providers:\n    local: {{kind: local, path: {}}}\n{}\
             audit: {{sink: {{kind: file, path: {}}}}}\n\
             tenants:\n{}  globex: {{provider: local, key: globex}}\n\
             tables:\n  {table}:\n    tenant_column: tenant_id\n    columns:\n{columns}{extra}",
            ring.display(),
            indent(providers, "    "),
            dir.path().join("audit.jsonl").display(),
            indent(tenants, "  "),
        );
        let proxy = start_proxy(&pg, &yaml);
        Self {
            pg,
            proxy,
            direct,
            dir,
        }
    }

    /// The keyring file.
    pub fn ring(&self) -> PathBuf {
        self.dir.path().join("keyring.json")
    }

    /// A client connected through the proxy.
    pub async fn app(&self) -> Client {
        let (client, conn) = connect(&self.proxy.url("postgres", "", "app")).await;
        std::mem::forget(conn);
        client
    }

    /// The audit log so far.
    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }
}

/// The single integer a `SELECT count(*) …` returns.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Asserts that the one bytea cell `sql` selects is a CMK envelope.
pub async fn assert_sealed(client: &Client, sql: &str, context: &str) {
    let cell: Vec<u8> = client.query_one(sql, &[]).await.unwrap().get(0);
    assert_eq!(cell.get(..4), Some(&b"CMK\x01"[..]), "{context}");
}

/// The SQLSTATE and message of a simple query that must fail.
pub async fn refused(client: &Client, sql: &str) -> (String, String) {
    let err = client.simple_query(sql).await.expect_err(sql);
    (
        super::sqlstate(&err).unwrap_or_default(),
        super::error_message(&err),
    )
}

/// Asserts that each of `sqls` is refused with `code`, its message naming
/// `named`.
pub async fn assert_refused(client: &Client, sqls: &[&str], code: &str, named: &str) {
    for sql in sqls {
        let (got, message) = refused(client, sql).await;
        assert_eq!(got, code, "{sql}: {message}");
        assert!(message.contains(named), "{sql}: {message}");
    }
}

/// The rows of a simple query, as text (NULL is `None`); panics on an error.
pub async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs `attempt` until it fails (`want_error`) or succeeds, every 200 ms;
/// returns the last error. The 15 s limit only guards against a hang:
/// revocation is bounded by approval_ttl (1 s here) plus one KMS call.
pub async fn poll_until<T, F, Fut>(
    want_error: bool,
    mut attempt: F,
) -> Option<tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    T: std::fmt::Debug,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match attempt().await {
            Err(e) if want_error => return Some(e),
            Ok(_) if !want_error => return None,
            other => {
                assert!(std::time::Instant::now() < deadline, "still {other:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

/// `pg_dump` of database `app`, then `cmk-proxy decrypt-dump` of it with the
/// proxy's own policy: (exit code, stdout, stderr).
pub fn decrypt_dump(setup: &EncryptedSetup) -> (i32, String, String) {
    let dump = setup.dir.path().join("dump.sql");
    let out = std::process::Command::new(crate::encryption_at_rest::pg_dump_bin())
        .arg("--dbname")
        .arg(setup.pg.admin_url("app"))
        .arg("--file")
        .arg(&dump)
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "pg_dump: {out:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .arg("decrypt-dump")
        .arg("--config")
        .arg(setup.proxy.dir().join("policy.yaml"))
        .arg(&dump)
        .output()
        .expect("run decrypt-dump");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
