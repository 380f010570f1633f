//! cmk-proxy in front of a Citus coordinator with two workers (issue 20):
//! `patients` distributed by `tenant_id`, `settings` a reference table,
//! both with protected columns. The nodes serve TLS with the self-signed
//! X.509 v1 certificate Citus makes, and the proxy uses its default upstream
//! mode. Ciphertext at rest is proven on the workers' shards directly.
//!
//! Citus answers router (single-shard) queries with a RowDescription whose
//! columns carry no table OID; the proxy can only decrypt what it can trace,
//! so the cluster runs with `citus.enable_router_execution = off` for the
//! `app` database (docs/scaling-out.md), and a test shows that a router
//! result is refused, never shown as ciphertext, without it.

use crate::common;

use std::path::Path;
use std::time::Duration;

use cmk_proxy::localpg::citus::{self, LocalCitus};
use cmk_proxy::localpg::LocalPostgres;
use common::encryption::{keyring, poll_until, refused, rows, EncryptedSetup};
use common::{connect, run_cmk_proxy, server_sees_tls, sqlstate};
use tokio_postgres::Client;

const COLUMNS: &[&str] = &["ssn: {type: text}", "notes: {type: text}"];

const SCHEMA: &str = "\
    CREATE TABLE patients (id bigserial, tenant_id text NOT NULL, ssn bytea, notes bytea, \
        cmk_edek jsonb, PRIMARY KEY (tenant_id, id)); \
    SELECT create_distributed_table('patients', 'tenant_id'); \
    CREATE TABLE settings (id int PRIMARY KEY, tenant_id text NOT NULL, secret bytea, cmk_edek jsonb); \
    SELECT create_reference_table('settings');";

/// The settings docs/SCALING-OUT.md asks for: router results carry no
/// column origins, and Citus 13.2 crashes a backend running a generic plan
/// with router execution off (the sixth execution of a prepared statement).
const ROUTER_OFF: &str = "ALTER DATABASE app SET citus.enable_router_execution = off; \
    ALTER DATABASE app SET plan_cache_mode = force_custom_plan";

/// The reference table's policy, appended to the `tables:` map.
const SETTINGS: &str =
    "  public.settings:\n    tenant_column: tenant_id\n    columns:\n      secret: {type: text}\n";

/// A Citus cluster, or `None` (with the reason printed) when Citus is not
/// built and its vendored source is absent too; with the source present a
/// missing build is a failure (scripts/install-deps.sh builds it).
fn cluster() -> Option<LocalCitus> {
    if let Err(why) = citus::installed() {
        let vendor = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/vendor/citus/citus-13.2.2.tar.gz");
        assert!(
            !vendor.is_file(),
            "Citus source is vendored ({}) but not built: {why}",
            vendor.display()
        );
        eprintln!("skipped: {why}; no vendored source at {}", vendor.display());
        return None;
    }
    Some(LocalCitus::start(2).unwrap_or_else(|e| panic!("cannot start Citus: {e}")))
}

struct CitusSetup {
    s: EncryptedSetup,
    workers: Vec<LocalPostgres>,
}

async fn setup(router_execution: bool) -> Option<CitusSetup> {
    setup_with(router_execution, false).await
}

/// With `coordinator_shards`, the coordinator holds shards too.
async fn setup_with(router_execution: bool, coordinator_shards: bool) -> Option<CitusSetup> {
    let LocalCitus {
        coordinator,
        workers,
    } = cluster()?;
    let mut schema = String::new();
    if coordinator_shards {
        schema.push_str(&format!(
            "SELECT citus_set_node_property('127.0.0.1', {}, 'shouldhaveshards', true); ",
            coordinator.port()
        ));
    }
    schema.push_str(SCHEMA);
    if !router_execution {
        schema.push_str(&format!(" {ROUTER_OFF};"));
    }
    let s = EncryptedSetup::start_on(
        coordinator,
        &schema,
        "public.patients",
        COLUMNS,
        "",
        "",
        SETTINGS,
    )
    .await;
    Some(CitusSetup { s, workers })
}

/// The non-NULL cells of `column` in every shard of `table` on every worker,
/// read directly from the workers.
async fn shard_cells(workers: &[LocalPostgres], table: &str, column: &str) -> Vec<Vec<u8>> {
    let mut cells = Vec::new();
    for worker in workers {
        let (client, _h) = connect(&worker.admin_url("app")).await;
        client
            .batch_execute("SET citus.override_table_visibility = off")
            .await
            .unwrap();
        let shards: Vec<String> = client
            .query(
                "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname ~ $1",
                &[&format!("^{table}_[0-9]+$")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!shards.is_empty(), "no shard of {table} on a worker");
        for shard in shards {
            let sql = format!("SELECT {column} FROM {shard} WHERE {column} IS NOT NULL");
            for row in client.query(&sql, &[]).await.unwrap() {
                cells.push(row.get(0));
            }
        }
    }
    cells
}

fn all_sealed(cells: &[Vec<u8>], context: &str) {
    for cell in cells {
        assert_eq!(cell.get(..4), Some(&b"CMK\x01"[..]), "{context}: {cell:?}");
    }
}

async fn notes_of(app: &Client, tenant: &str) -> Vec<Option<String>> {
    rows(
        app,
        &format!("SELECT notes FROM patients WHERE tenant_id = '{tenant}' ORDER BY id"),
    )
    .await
    .into_iter()
    .map(|mut r| r.remove(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_and_reads_on_a_table_distributed_by_tenant() {
    let Some(CitusSetup { s, workers }) = setup(false).await else {
        return;
    };
    let app = s.app().await;
    // The proxy's upstream session is encrypted although the coordinator's
    // certificate is the self-signed X.509 v1 one Citus made.
    assert!(server_sees_tls(&app).await);
    // Simple protocol: one row, then several rows across tenants.
    rows(
        &app,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '111-11-1111', 'a1')",
    )
    .await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES \
         ('acme', '222-22-2222', 'a2'), ('globex', '333-33-3333', 'g1')",
    )
    .await;
    // Extended protocol, prepared once and executed for both tenants.
    let insert = app
        .prepare("INSERT INTO patients (tenant_id, ssn, notes) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    for (tenant, ssn, notes) in [
        ("globex", "444-44-4444", "g2"),
        ("acme", "555-55-5555", "a3"),
    ] {
        app.execute(&insert, &[&tenant, &ssn, &notes])
            .await
            .unwrap();
    }

    // Router reads (one shard), text protocol.
    assert_eq!(
        notes_of(&app, "acme").await,
        [Some("a1".into()), Some("a2".into()), Some("a3".into())]
    );
    assert_eq!(
        notes_of(&app, "globex").await,
        [Some("g1".into()), Some("g2".into())]
    );
    // Router read, extended protocol with binary results, prepared once and
    // executed past PostgreSQL's switch to a generic plan (sixth execution).
    let read = app
        .prepare("SELECT ssn FROM patients WHERE tenant_id = $1 ORDER BY id LIMIT 1")
        .await
        .unwrap();
    for _ in 0..8 {
        let ssn: String = app.query_one(&read, &[&"globex"]).await.unwrap().get(0);
        assert_eq!(ssn, "333-33-3333");
    }
    // Multi-shard reads, text and binary.
    let mut all = rows(&app, "SELECT tenant_id, ssn FROM patients").await;
    all.sort();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0][1].as_deref(), Some("111-11-1111"));
    assert_eq!(all[4][1].as_deref(), Some("444-44-4444"));
    let mut binary: Vec<String> = app
        .query("SELECT notes FROM patients", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    binary.sort();
    assert_eq!(binary, ["a1", "a2", "a3", "g1", "g2"]);

    // At rest, on the workers' shards: envelopes only, no plaintext.
    let cells = shard_cells(&workers, "patients", "notes").await;
    assert_eq!(cells.len(), 5, "every row is on a worker shard");
    all_sealed(&cells, "patients.notes on the workers");
    let ssns = shard_cells(&workers, "patients", "ssn").await;
    all_sealed(&ssns, "patients.ssn on the workers");
}

#[tokio::test(flavor = "multi_thread")]
async fn update_is_pinned_and_revocation_and_the_tenant_guard_hold() {
    let Some(CitusSetup { s, workers }) = setup(false).await else {
        return;
    };
    let app = s.app().await;
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'a'), (2, 'globex', 'g')",
    )
    .await;
    // A legacy UPDATE without the tenant in sight: pinned to the session
    // tenant, so globex's row (another shard) is not touched.
    rows(&app, "SET cmk.tenant_id = 'acme'").await;
    rows(
        &app,
        "UPDATE patients SET notes = 'changed' WHERE id IN (1, 2)",
    )
    .await;
    assert_eq!(notes_of(&app, "acme").await, [Some("changed".into())]);
    // Cross-tenant guard: globex's cells are refused in acme's session.
    let (code, message) = refused(
        &app,
        "SELECT notes FROM patients WHERE tenant_id = 'globex'",
    )
    .await;
    assert_eq!(code, "KM006", "{message}");
    let other = s.app().await;
    assert_eq!(notes_of(&other, "globex").await, [Some("g".into())]);
    all_sealed(
        &shard_cells(&workers, "patients", "notes").await,
        "after UPDATE",
    );

    // Revocation: the tenant's KMS key is disabled.
    keyring(&s.ring(), "disable", "acme");
    let read = "SELECT notes FROM patients WHERE tenant_id = 'acme'";
    let err = poll_until(true, || other.simple_query(read))
        .await
        .expect("acme's read is refused once its key is revoked");
    assert_eq!(sqlstate(&err).as_deref(), Some("KM001"), "{err}");
    let (code, _) = refused(
        &other,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x')",
    )
    .await;
    assert_eq!(code, "KM001");
    // Nothing was lost: globex still reads and writes.
    rows(
        &other,
        "INSERT INTO patients (tenant_id, notes) VALUES ('globex', 'g2')",
    )
    .await;
    let mut globex = notes_of(&other, "globex").await;
    globex.sort();
    assert_eq!(globex, [Some("g".into()), Some("g2".into())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_table_with_a_protected_column_is_sealed_on_every_worker() {
    let Some(CitusSetup { s, workers }) = setup(false).await else {
        return;
    };
    let app = s.app().await;
    rows(
        &app,
        "INSERT INTO settings (id, tenant_id, secret) VALUES (1, 'acme', 'api-key-1'), (2, 'globex', 'api-key-2')",
    )
    .await;
    let read = rows(&app, "SELECT tenant_id, secret FROM settings ORDER BY id").await;
    assert_eq!(read[0][1].as_deref(), Some("api-key-1"));
    assert_eq!(read[1][1].as_deref(), Some("api-key-2"));
    let one = rows(&app, "SELECT secret FROM settings WHERE id = 2").await;
    assert_eq!(one[0][0].as_deref(), Some("api-key-2"));
    // A reference table is replicated: each worker holds both sealed cells.
    let cells = shard_cells(&workers, "settings", "secret").await;
    assert_eq!(cells.len(), 2 * workers.len());
    all_sealed(&cells, "settings.secret on the workers");
}

/// Without the setting, Citus answers a router query with columns that
/// carry no table OID: the proxy cannot trace them and refuses the
/// envelope (KM003) rather than show ciphertext or guess.
#[tokio::test(flavor = "multi_thread")]
async fn an_untraceable_router_result_is_refused_not_shown() {
    let Some(CitusSetup { s, workers }) = setup(true).await else {
        return;
    };
    let app = s.app().await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a'), ('globex', 'g')",
    )
    .await;
    // Multi-shard reads carry the distributed table's OID: decrypted.
    assert_eq!(rows(&app, "SELECT notes FROM patients").await.len(), 2);
    let (code, message) =
        refused(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(code, "KM003", "{message}");
    // RETURNING of a protected column is untraceable on Citus in any mode.
    let (code, message) = refused(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'r') RETURNING notes",
    )
    .await;
    assert_eq!(code, "KM003", "{message}");
    let stored: i64 = s
        .direct
        .query_one(
            "SELECT count(*) FROM patients WHERE tenant_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The refusal is of the result: the (sealed) row was written in
    // autocommit before it (a known limit, docs/SCALING-OUT.md).
    assert_eq!(stored, 2);
    all_sealed(
        &shard_cells(&workers, "patients", "notes").await,
        "after the refused RETURNING",
    );
    assert!(
        s.proxy.log_text().contains("citus.enable_router_execution"),
        "{}",
        s.proxy.log_text()
    );
}

fn cli(args: &[&str], config: &Path) -> String {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.extend([std::ffi::OsStr::new("--config"), config.as_os_str()]);
    let (ok, text) = run_cmk_proxy(all);
    assert!(ok, "{args:?}: {text}");
    text
}

/// The registry stays a set of plain tables local to the coordinator (not
/// distributed, not on the workers); `keys rotate` and `tenants disable`
/// take effect on the serving proxy.
#[tokio::test(flavor = "multi_thread")]
async fn the_registry_lives_on_the_coordinator_and_rotation_and_disable_work_while_serving() {
    let Some(CitusSetup { s, workers }) = setup(false).await else {
        return;
    };
    let app = s.app().await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'before')",
    )
    .await;
    let distributed: i64 = s
        .direct
        .query_one(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::regclass::text LIKE 'cmk.%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distributed, 0, "the registry must stay coordinator-local");
    for worker in &workers {
        let (client, _h) = connect(&worker.admin_url("app")).await;
        let present: bool = client
            .query_one("SELECT to_regclass('cmk.data_keys') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!present, "no registry table on a worker");
    }

    let config = s.proxy.config_path();
    let out = cli(&["keys", "rotate", "--tenant", "acme"], &config);
    assert!(out.contains("new data key"), "{out}");
    // The serving proxy seals new rows with the new key; old rows still open.
    let dek_of = |cell: &[u8]| cell.get(4..20).map(<[u8]>::to_vec);
    let before = shard_cells(&workers, "patients", "notes").await;
    let mut new_key = None;
    for attempt in 0..100 {
        rows(
            &app,
            &format!("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'after{attempt}')"),
        )
        .await;
        let cells = shard_cells(&workers, "patients", "notes").await;
        let fresh: Vec<_> = cells
            .iter()
            .filter_map(|c| dek_of(c))
            .filter(|d| Some(d) != dek_of(&before[0]).as_ref())
            .collect();
        if let Some(d) = fresh.first() {
            new_key = Some(d.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(new_key.is_some(), "no row sealed under the rotated key");
    let notes = notes_of(&app, "acme").await;
    assert_eq!(notes[0].as_deref(), Some("before"));

    let out = cli(&["tenants", "disable", "acme"], &config);
    assert!(out.contains("disabled"), "{out}");
    let err = poll_until(true, || {
        app.simple_query("SELECT notes FROM patients WHERE tenant_id = 'acme'")
    })
    .await
    .expect("a disabled tenant is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("KM001"), "{err}");
}

/// A statement naming a shard is refused like one naming a partition: on a
/// coordinator that holds shards it would otherwise write plaintext into a
/// protected column, or read cells, unseen by the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_named_directly_is_refused() {
    let Some(CitusSetup { s, workers: _w }) = setup_with(false, true).await else {
        return;
    };
    s.direct
        .batch_execute("SET citus.override_table_visibility = off")
        .await
        .unwrap();
    let shard: String = s
        .direct
        .query_one(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname ~ '^patients_[0-9]+$' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let app = s.app().await;
    for sql in [
        format!("INSERT INTO {shard} (tenant_id, notes) VALUES ('acme', 'plain')"),
        format!("INSERT INTO public.{shard} (tenant_id, notes) VALUES ('acme', 'plain')"),
        format!("SELECT notes FROM {shard}"),
        format!("UPDATE {shard} SET notes = 'plain'"),
    ] {
        let (code, message) = refused(&app, &sql).await;
        assert_eq!(code, "KM003", "{sql}: {message}");
        assert!(message.contains("public.patients"), "{sql}: {message}");
    }
    let stored: i64 = s
        .direct
        .query_one(&format!("SELECT count(*) FROM {shard}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "nothing reached the shard");
    // The distributed table itself still works through the proxy.
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'ok')",
    )
    .await;
    assert_eq!(notes_of(&app, "acme").await, [Some("ok".into())]);
}
