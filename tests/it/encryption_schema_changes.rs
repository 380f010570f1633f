//! A plan must not outlive the schema it was made against (issue 14,
//! defect 2): DDL earlier in a pipeline or an open transaction, DDL in
//! another session, and DDL run directly against PostgreSQL. After each
//! attempt a direct scan of the table finds no cell that is not an
//! envelope.

use std::time::{Duration, Instant};

use crate::common;

use common::encryption::{count, rows, EncryptedSetup};
use common::raw;
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, notes bytea, cmk_edek jsonb); \
    CREATE TABLE plain_notes (tenant_id text, ssn bytea, notes bytea)";

const COLUMNS: &[&str] = &["ssn: {type: text, search: equality}", "notes: {type: text}"];

/// Cells of the raw table that are neither NULL nor an envelope.
const PLAINTEXT_AT_REST: &str = "SELECT count(*) FROM patients WHERE \
    (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) OR \
    (notes IS NOT NULL AND substr(notes, 1, 4) <> '\\x434d4b01'::bytea)";

/// A proxy that reloads its catalog every second (DDL run directly is seen
/// within that).
async fn setup() -> EncryptedSetup {
    EncryptedSetup::start_configured(
        SCHEMA,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1s\n",
    )
    .await
}

/// An unnamed Parse, Bind and Execute of `sql` (no parameters).
fn parse_bind_execute(sql: &str) -> Vec<u8> {
    let mut parse = vec![0];
    parse.extend_from_slice(sql.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut out = raw::message(b'P', &parse);
    out.extend(raw::message(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend(raw::message(b'E', b"\0\0\0\0\0"));
    out
}

/// The SQLSTATE of the first error among `answers`.
fn first_error(answers: &[raw::BackendMessage]) -> Option<String> {
    answers.iter().find(|m| m.tag == b'E')?.field(b'C')
}

/// The SQLSTATE of a failed statement.
fn code(e: &tokio_postgres::Error) -> String {
    common::sqlstate(e).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

async fn assert_nothing_at_rest(setup: &EncryptedSetup, what: &str) {
    let stored = count(&setup.direct, "SELECT count(*) FROM patients").await;
    assert_eq!(stored, 0, "{what}: a row was stored");
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0, "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_earlier_in_a_pipeline_or_open_transaction_opens_no_way_around_the_plan() {
    let setup = setup().await;
    let insert = |view: &str| {
        format!(
            "INSERT INTO {view} (tenant_id, ssn, notes) VALUES ('acme', 'PLAINTEXT', 'PLAINTEXT')"
        )
    };

    // The pipelined batch: both statements in one implicit
    // transaction, the INSERT parsed before the view exists anywhere the
    // proxy's catalog connection could see it.
    let mut s = raw::session(setup.proxy.port(), "app");
    let mut batch = parse_bind_execute("CREATE VIEW v1 AS SELECT * FROM patients");
    batch.extend(parse_bind_execute(&insert("v1")));
    batch.extend(raw::message(b'S', b""));
    raw::send(&mut s, &batch);
    let answers = raw::read_until_ready(&mut s);
    assert_eq!(
        first_error(&answers).as_deref(),
        Some("KM003"),
        "{answers:?}"
    );
    assert_nothing_at_rest(&setup, "pipelined batch").await;

    // The same with a Sync between them, sent at once: the view commits
    // at the first Sync, the INSERT may be read before the proxy's catalog
    // shows it.
    let mut batch = parse_bind_execute("CREATE VIEW v2 AS SELECT * FROM patients");
    batch.extend(raw::message(b'S', b""));
    batch.extend(parse_bind_execute(&insert("v2")));
    batch.extend(raw::message(b'S', b""));
    raw::send(&mut s, &batch);
    let first = raw::read_until_ready(&mut s);
    assert_eq!(first_error(&first), None, "the view is created: {first:?}");
    let second = raw::read_until_ready(&mut s);
    assert_eq!(first_error(&second).as_deref(), Some("KM003"), "{second:?}");
    assert_nothing_at_rest(&setup, "pipelined batch with two Syncs").await;

    // An explicit transaction, simple protocol.
    let app = setup.app().await;
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("CREATE VIEW v3 AS SELECT * FROM patients")
        .await
        .unwrap();
    let err = app.batch_execute(&insert("v3")).await.unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    assert!(
        common::error_message(&err).contains("commit the DDL first"),
        "{err}"
    );
    app.batch_execute("ROLLBACK").await.unwrap();
    assert_nothing_at_rest(&setup, "simple protocol in a transaction").await;

    // An explicit transaction, extended protocol, a view over a view.
    let mut app = setup.app().await;
    let tx = app.transaction().await.unwrap();
    tx.batch_execute(
        "CREATE VIEW v4 AS SELECT * FROM patients; CREATE VIEW v5 AS SELECT * FROM v4",
    )
    .await
    .unwrap();
    let err = tx
        .execute(
            "INSERT INTO v5 (tenant_id, ssn, notes) VALUES ($1, $2, $3)",
            &[&"acme", &"PLAINTEXT", &"PLAINTEXT"],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    drop(tx);
    assert_nothing_at_rest(&setup, "extended protocol in a transaction").await;

    // A statement prepared before the DDL of the same transaction.
    let app = setup.app().await;
    app.batch_execute("CREATE VIEW v6 AS SELECT tenant_id, ssn, notes FROM plain_notes")
        .await
        .unwrap();
    let prepared = app
        .prepare("INSERT INTO v6 (tenant_id, ssn, notes) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    app.batch_execute(
        "BEGIN; DROP VIEW v6; CREATE VIEW v6 AS SELECT tenant_id, ssn, notes FROM patients",
    )
    .await
    .unwrap();
    let err = app
        .execute(
            &prepared,
            &[&"acme", &&b"PLAINTEXT"[..], &&b"PLAINTEXT"[..]],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    app.batch_execute("ROLLBACK").await.unwrap();
    assert_nothing_at_rest(&setup, "statement prepared before the DDL").await;

    // Committed, the change is in the catalog at once: reads through the
    // new view decrypt, writes through it are refused as for any view.
    app.batch_execute("BEGIN; CREATE VIEW v7 AS SELECT id, tenant_id, ssn FROM patients; COMMIT")
        .await
        .unwrap();
    app.batch_execute("INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')")
        .await
        .unwrap();
    assert_eq!(
        rows(&app, "SELECT ssn FROM v7").await,
        vec![vec![Some("123-45-6789".to_owned())]]
    );
    let err = app.batch_execute(&insert("v7")).await.unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    // DDL on unprotected tables in a transaction refuses nothing.
    app.batch_execute(
        "BEGIN; CREATE TABLE t_new (x int); INSERT INTO t_new VALUES (1); \
         CREATE VIEW t_view AS SELECT x FROM t_new; COMMIT",
    )
    .await
    .unwrap();
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("CREATE TABLE t_other (x int)")
        .await
        .unwrap();
    app.batch_execute("INSERT INTO t_other SELECT x FROM t_view")
        .await
        .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
}

/// Executes `statement` until the proxy refuses it with KM003 after a
/// change of the schema made elsewhere (it reloads its catalog every
/// second); the first Execute must never reach PostgreSQL once refused.
async fn run_prepared(
    app: &Client,
    statement: &tokio_postgres::Statement,
) -> Result<u64, tokio_postgres::Error> {
    app.execute(
        statement,
        &[&"acme", &&b"PLAINTEXT"[..], &&b"PLAINTEXT"[..]],
    )
    .await
}

/// Waits until a read through the proxy of `sv.ssn` decrypts: the proxy's
/// catalog maps the view.
async fn wait_until_mapped(app: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match app.simple_query("SELECT ssn FROM sv").await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "the view was not mapped: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_statement_is_planned_again_when_the_view_it_writes_changes() {
    let setup = setup().await;
    let (app, other) = (setup.app().await, setup.app().await);
    setup
        .direct
        .batch_execute("CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM plain_notes")
        .await
        .unwrap();
    let insert = "INSERT INTO sv (tenant_id, ssn, notes) VALUES ($1, $2, $3)";
    let prepared = app.prepare(insert).await.unwrap();
    assert_eq!(run_prepared(&app, &prepared).await.unwrap(), 1);

    // Another session of the proxy replaces the view with one over the
    // protected table: PostgreSQL plans the statement again onto patients,
    // and so must the proxy.
    other
        .batch_execute("DROP VIEW sv; CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM patients")
        .await
        .unwrap();
    let err = run_prepared(&app, &prepared).await.unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    assert!(
        common::error_message(&err).contains("schema changed"),
        "{err}"
    );
    assert_nothing_at_rest(&setup, "view replaced through the proxy").await;
    // Prepared again, it is planned against the new view: refused as a
    // write through a view of protected columns.
    let err = app.prepare(insert).await.unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");

    // The same when the view is replaced directly against PostgreSQL, once
    // the proxy has reloaded its catalog.
    setup
        .direct
        .batch_execute(
            "DROP VIEW sv; CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM plain_notes",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let prepared = loop {
        match app.prepare(insert).await {
            Ok(statement) => break statement,
            Err(e) => {
                assert!(Instant::now() < deadline, "sv stays protected: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(run_prepared(&app, &prepared).await.unwrap(), 1);
    other
        .batch_execute("INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')")
        .await
        .unwrap();
    setup
        .direct
        .batch_execute("DROP VIEW sv; CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM patients")
        .await
        .unwrap();
    wait_until_mapped(&other).await;
    let err = run_prepared(&app, &prepared).await.unwrap_err();
    assert_eq!(code(&err), "KM003", "{err}");
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        1
    );
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    // Statements the change does not touch keep running.
    let unrelated = app
        .prepare("INSERT INTO plain_notes (tenant_id) VALUES ($1)")
        .await
        .unwrap();
    app.execute(&unrelated, &[&"acme"]).await.unwrap();
    other
        .batch_execute("CREATE TABLE unrelated_change (x int)")
        .await
        .unwrap();
    app.execute(&unrelated, &[&"acme"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sql_prepared_statement_is_read_again_at_every_execute() {
    let setup = setup().await;
    let (app, other) = (setup.app().await, setup.app().await);
    setup
        .direct
        .batch_execute("CREATE VIEW sv2 AS SELECT tenant_id, ssn, notes FROM plain_notes")
        .await
        .unwrap();
    app.batch_execute(
        "PREPARE ins(text, bytea, bytea) AS INSERT INTO sv2 VALUES ($1, $2, $3); \
         EXECUTE ins('acme', 'PLAINTEXT', 'PLAINTEXT')",
    )
    .await
    .unwrap();
    // PostgreSQL plans `ins` again onto patients at its next EXECUTE.
    other
        .batch_execute(
            "DROP VIEW sv2; CREATE VIEW sv2 AS SELECT tenant_id, ssn, notes FROM patients",
        )
        .await
        .unwrap();
    for sql in [
        "EXECUTE ins('acme', 'PLAINTEXT', 'PLAINTEXT')",
        "explain analyze execute INS('acme', 'PLAINTEXT', 'PLAINTEXT')",
        "CREATE TABLE copied AS EXECUTE ins('acme', 'PLAINTEXT', 'PLAINTEXT')",
    ] {
        let err = app.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&err), "KM003", "{sql}: {err}");
        let err = app.execute(sql, &[]).await.unwrap_err();
        assert_eq!(code(&err), "KM003", "{sql} (extended): {err}");
    }
    assert_nothing_at_rest(&setup, "EXECUTE after the view changed").await;
    // Prepared again under the same name, it runs what it says now.
    app.batch_execute("DEALLOCATE ins; PREPARE ins AS SELECT 1; EXECUTE ins")
        .await
        .unwrap();
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM plain_notes").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_run_directly_reaches_the_proxy_through_the_event_trigger_of_migrate() {
    // The periodic reload is an hour away: only the NOTIFY of the event
    // trigger can tell the proxy of the change in time.
    let setup = EncryptedSetup::start_configured(
        SCHEMA,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1h\n",
    )
    .await;
    let config = setup.proxy.config_path();
    let (code, out) = common::run_cmk_proxy_code(["migrate", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("event trigger cmk_schema_change installed"),
        "{out}"
    );
    let (app, other) = (setup.app().await, setup.app().await);
    setup
        .direct
        .batch_execute("CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM plain_notes")
        .await
        .unwrap();
    let insert = "INSERT INTO sv (tenant_id, ssn, notes) VALUES ($1, $2, $3)";
    let prepared = app.prepare(insert).await.unwrap();
    assert_eq!(run_prepared(&app, &prepared).await.unwrap(), 1);
    other
        .batch_execute("INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')")
        .await
        .unwrap();
    setup
        .direct
        .batch_execute(
            "BEGIN; DROP VIEW sv; CREATE VIEW sv AS SELECT tenant_id, ssn, notes FROM patients; \
             COMMIT",
        )
        .await
        .unwrap();
    wait_until_mapped(&other).await;
    assert_eq!(
        rows(&other, "SELECT ssn FROM sv").await,
        vec![vec![Some("123-45-6789".to_owned())]]
    );
    let err = run_prepared(&app, &prepared).await.unwrap_err();
    assert_eq!(self::code(&err), "KM003", "{err}");
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
}
