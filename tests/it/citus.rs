//! cmk-proxy in front of a Citus coordinator with two workers (issue 20):
//! `patients` distributed by `tenant_id`, `settings` a reference table,
//! both with protected columns. The nodes serve TLS with the self-signed
//! X.509 v1 certificate Citus makes, and the proxy uses its default upstream
//! mode. Ciphertext at rest is proven on the workers' shards directly.
//!
//! Citus runs with its defaults: router (single-shard) queries are answered
//! with a RowDescription whose columns carry no table OID, and the proxy
//! traces them through a Describe of their statement (docs/SCALING-OUT.md);
//! what it cannot trace is refused, never shown as ciphertext.

use crate::common;

use std::path::Path;
use std::time::Duration;

use cmk_proxy::localpg::citus::{self, LocalCitus};
use cmk_proxy::localpg::LocalPostgres;
use common::encryption::{keyring, poll_until, refused, rows, EncryptedSetup};
use common::{connect, run_cmk_proxy, server_sees_tls, sqlstate};
use tokio_postgres::Client;

const COLUMNS: &[&str] = &["ssn: {type: text, search: equality}", "notes: {type: text}"];

const SCHEMA: &str = "\
    CREATE TABLE patients (id bigserial, tenant_id text NOT NULL, ssn bytea, ssn_bidx bytea, notes bytea, \
        cmk_edek jsonb, PRIMARY KEY (tenant_id, id)); \
    SELECT create_distributed_table('patients', 'tenant_id'); \
    CREATE TABLE settings (id int PRIMARY KEY, tenant_id text NOT NULL, secret bytea, cmk_edek jsonb); \
    SELECT create_reference_table('settings');";

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

async fn setup() -> Option<CitusSetup> {
    setup_with(false).await
}

/// With `coordinator_shards`, the coordinator holds shards too.
async fn setup_with(coordinator_shards: bool) -> Option<CitusSetup> {
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
    let Some(CitusSetup { s, workers }) = setup().await else {
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
    let Some(CitusSetup { s, workers }) = setup().await else {
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
    let Some(CitusSetup { s, workers }) = setup().await else {
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

/// Reads and RETURNING through psycopg 3 (libpq): a query with parameters
/// is sent as Parse, Bind, Describe of the portal and Execute, and from its
/// sixth run as a prepared statement that is never described: the proxy
/// describes the statement itself.
const PSYCOPG_SCRIPT: &str = r#"
import json, sys, psycopg
out = {}
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    read = "SELECT notes FROM patients WHERE tenant_id = %s ORDER BY id"
    out["text"] = [c.execute(read, ("acme",)).fetchall() for _ in range(8)]
    cur = c.cursor(binary=True)
    out["binary"] = [cur.execute(read, ("globex",)).fetchall() for _ in range(8)]
    out["returning"] = c.execute(
        "INSERT INTO patients (tenant_id, notes) VALUES (%s, %s) RETURNING notes",
        ("acme", "p1")).fetchone()
print(json.dumps(out))
"#;

/// Citus answers router (single-shard) queries — a tenant's rows, a
/// reference table, RETURNING — with columns that name no table. The
/// proxy traces them through a Describe of their statement, in both
/// protocols, whether the client describes the statement, the portal or
/// nothing; what cannot be traced that way stays refused.
#[tokio::test(flavor = "multi_thread")]
async fn router_results_are_traced_through_their_statement() {
    let Some(CitusSetup { s, workers }) = setup().await else {
        return;
    };
    let router: String = s
        .direct
        .query_one(
            "SELECT current_setting('citus.enable_router_execution')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(router, "on", "Citus's default");
    let app = s.app().await;
    // RETURNING, simple protocol (run as the proxy's statement) and extended.
    let returned = rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a1') RETURNING notes",
    )
    .await;
    assert_eq!(returned, [[Some("a1".to_owned())]]);
    let returned = app
        .query_one(
            "INSERT INTO patients (tenant_id, notes) VALUES ($1, $2) RETURNING notes, tenant_id",
            &[&"globex", &"g1"],
        )
        .await
        .unwrap();
    assert_eq!(returned.get::<_, String>(0), "g1");
    let updated = rows(
        &app,
        "UPDATE patients SET notes = 'a2' WHERE tenant_id = 'acme' RETURNING notes",
    )
    .await;
    assert_eq!(updated, [[Some("a2".to_owned())]]);
    // A router read without RETURNING of the rows' tenant in the result.
    assert_eq!(notes_of(&app, "acme").await, [Some("a2".to_owned())]);
    let explain = rows(
        &s.direct,
        "EXPLAIN SELECT notes FROM patients WHERE tenant_id = 'acme'",
    )
    .await;
    assert!(
        format!("{explain:?}").contains("Task Count: 1"),
        "a router query: {explain:?}"
    );

    // psycopg: portals described, then prepared statements never described.
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} (scripts/install-deps.sh)",
        python.display()
    );
    let output = std::process::Command::new(&python)
        .args(["-c", PSYCOPG_SCRIPT, &s.proxy.url("postgres", "", "app")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for run in out["text"].as_array().unwrap() {
        assert_eq!(run, &serde_json::json!([["a2"]]));
    }
    for run in out["binary"].as_array().unwrap() {
        assert_eq!(run, &serde_json::json!([["g1"]]));
    }
    assert_eq!(out["returning"], serde_json::json!(["p1"]));

    // Untraceable: a function (created directly) that returns the cells.
    s.direct
        .batch_execute(
            "CREATE FUNCTION acme_notes() RETURNS SETOF bytea LANGUAGE sql AS \
             $$SELECT notes FROM patients WHERE tenant_id = 'acme'$$",
        )
        .await
        .unwrap();
    let (code, message) = refused(&app, "SELECT acme_notes()").await;
    assert_eq!(code, "KM003", "{message}");
    all_sealed(
        &shard_cells(&workers, "patients", "notes").await,
        "after router writes",
    );
}

/// COPY in and out through psycopg 3 (simple protocol, as psql's `\copy`).
const COPY_SCRIPT: &str = r#"
import json, sys, psycopg
out = {}
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    with c.cursor().copy("COPY patients (tenant_id, ssn, notes) FROM STDIN") as copy:
        copy.write_row(("acme", "777-77-7777", "c1"))
        copy.write_row(("globex", "888-88-8888", "c2"))
    query = "COPY (SELECT ssn, notes FROM patients WHERE tenant_id = 'acme' ORDER BY id) TO STDOUT"
    with c.cursor().copy(query) as copy:
        out["acme"] = [list(row) for row in copy.rows()]
print(json.dumps(out))
"#;

/// `migrate` puts the envelope and blind-index CHECKs on the distributed
/// table and Citus puts them on every shard, so a worker itself refuses
/// plaintext written straight into a shard; equality lookups through the
/// blind index and COPY in and out work on the distributed table.
#[tokio::test(flavor = "multi_thread")]
async fn checks_on_every_shard_and_lookups_and_copy_work() {
    let Some(CitusSetup { s, workers }) = setup().await else {
        return;
    };
    cli(&["migrate"], &s.proxy.config_path());
    for worker in &workers {
        let (client, _h) = connect(&worker.admin_url("app")).await;
        client
            .batch_execute("SET citus.override_table_visibility = off")
            .await
            .unwrap();
        let shards = client
            .query(
                "SELECT c.relname::text, count(con.oid) FILTER (WHERE con.convalidated) \
                 FROM pg_class c LEFT JOIN pg_constraint con ON con.conrelid = c.oid \
                     AND con.contype = 'c' AND con.conname ~ '^cmk_(envelope|bidx)_' \
                 WHERE c.relkind = 'r' AND c.relname ~ '^patients_[0-9]+$' GROUP BY 1",
                &[],
            )
            .await
            .unwrap();
        assert!(!shards.is_empty(), "no shard on the worker");
        for shard in &shards {
            // ssn and notes envelopes, ssn's blind index.
            assert_eq!(shard.get::<_, i64>(1), 3, "{}", shard.get::<_, String>(0));
        }
        let shard: String = shards[0].get(0);
        let err = client
            .execute(
                &format!("INSERT INTO {shard} (id, tenant_id, notes) VALUES (-1, 'acme', 'plain')"),
                &[],
            )
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("23514"), "{err}");
    }

    let app = s.app().await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '111-11-1111', 'a1'), \
         ('globex', '111-11-1111', 'g1'), ('acme', '222-22-2222', 'a2')",
    )
    .await;
    // The proxy answers lookups once it has seen migrate's blind-index CHECK.
    let lookup = "SELECT notes FROM patients WHERE tenant_id = 'acme' AND ssn = '111-11-1111'";
    poll_until(false, || app.simple_query(lookup)).await;
    assert_eq!(rows(&app, lookup).await, [[Some("a1".to_owned())]]);
    let found = app
        .query(
            "SELECT notes FROM patients WHERE ssn = $1 AND tenant_id = $2",
            &[&"111-11-1111", &"globex"],
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].get::<_, String>(0), "g1");
    rows(&app, "SET cmk.tenant_id = 'acme'").await;
    let both = rows(
        &app,
        "SELECT notes FROM patients WHERE ssn IN ('111-11-1111', '222-22-2222') ORDER BY id",
    )
    .await;
    assert_eq!(both, [[Some("a1".to_owned())], [Some("a2".to_owned())]]);

    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let output = std::process::Command::new(&python)
        .args(["-c", COPY_SCRIPT, &s.proxy.url("postgres", "", "app")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        out["acme"],
        serde_json::json!([
            ["111-11-1111", "a1"],
            ["222-22-2222", "a2"],
            ["777-77-7777", "c1"]
        ])
    );
    all_sealed(
        &shard_cells(&workers, "patients", "ssn").await,
        "patients.ssn after COPY",
    );
    all_sealed(
        &shard_cells(&workers, "patients", "notes").await,
        "patients.notes after COPY",
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
    let Some(CitusSetup { s, workers }) = setup().await else {
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
    let Some(CitusSetup { s, workers: _w }) = setup_with(true).await else {
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

/// A legacy plaintext table, distributed by its tenant column.
const LEGACY: &str = "\
    CREATE TABLE patients (id bigserial, tenant_id text NOT NULL, ssn text, notes text, \
        PRIMARY KEY (tenant_id, id)); \
    SELECT create_distributed_table('patients', 'tenant_id'); \
    INSERT INTO patients (tenant_id, ssn, notes) \
    SELECT (ARRAY['acme', 'globex'])[1 + i % 2], 'ssn-' || i, 'note ' || i \
    FROM generate_series(1, 400) AS i;";

/// `cmk-proxy encrypt` converts a legacy distributed table while the
/// application writes through the proxy: every shard ends up sealed, every
/// row reads back as it was written, lookups work on the converted table;
/// `decrypt` takes it back to plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn encrypt_converts_a_legacy_distributed_table_online() {
    let Some(LocalCitus {
        coordinator,
        workers,
    }) = cluster()
    else {
        return;
    };
    let s = EncryptedSetup::start_on(
        coordinator,
        LEGACY,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1s\n",
    )
    .await;
    let app = s.app().await;
    assert_eq!(
        notes_of(&app, "acme").await.len(),
        200,
        "legacy rows served"
    );

    let writer = s.app().await;
    let writing = tokio::spawn(async move {
        let mut written = 0u32;
        for i in 0..60 {
            writer
                .simple_query(&format!(
                    "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', 'new-{i}', 'written {i}')"
                ))
                .await
                .expect("a write during encrypt");
            written += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        written
    });
    let config = s.proxy.config_path();
    let (ok, text) = run_cmk_proxy([
        "encrypt",
        "--config",
        config.to_str().unwrap_or_default(),
        "--table",
        "public.patients",
        "--batch-size",
        "50",
    ]);
    assert!(ok, "encrypt: {text}");
    let written = writing.await.expect("writer");

    all_sealed(
        &shard_cells(&workers, "patients", "ssn").await,
        "ssn after encrypt",
    );
    all_sealed(
        &shard_cells(&workers, "patients", "notes").await,
        "notes after encrypt",
    );
    let acme = notes_of(&app, "acme").await;
    assert_eq!(acme.len(), 200 + written as usize);
    assert_eq!(acme[0].as_deref(), Some("note 2"));
    assert!(acme.contains(&Some("written 0".to_owned())));
    let globex = notes_of(&app, "globex").await;
    assert_eq!(globex.len(), 200);
    assert_eq!(globex[0].as_deref(), Some("note 1"));

    let lookup = "SELECT notes FROM patients WHERE tenant_id = 'acme' AND ssn = 'new-3'";
    poll_until(false, || app.simple_query(lookup)).await;
    assert_eq!(rows(&app, lookup).await, [[Some("written 3".to_owned())]]);

    // And back out: decrypt restores the legacy text columns on every shard.
    let (ok, text) = run_cmk_proxy([
        "decrypt",
        "--config",
        config.to_str().unwrap_or_default(),
        "--table",
        "public.patients",
        "--batch-size",
        "50",
    ]);
    assert!(ok, "decrypt: {text}");
    let plain = rows(
        &s.direct,
        "SELECT count(*) FILTER (WHERE ssn LIKE 'ssn-%' OR ssn LIKE 'new-%'), count(*) FROM patients",
    )
    .await;
    let total = (400 + written).to_string();
    assert_eq!(
        plain,
        [[Some(total.clone()), Some(total)]],
        "plaintext back"
    );
    let types = rows(
        &s.direct,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'patients'::regclass AND attname IN ('ssn', 'notes') ORDER BY attname",
    )
    .await;
    assert_eq!(
        types,
        [[Some("text".to_owned())], [Some("text".to_owned())]]
    );
}
