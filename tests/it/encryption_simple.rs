//! Column encryption end to end through the simple query protocol, against
//! a real PostgreSQL and the local keyring: ciphertext at rest, plaintext
//! through the proxy, fail-closed refusals, cross-tenant guard, revocation.

use crate::common;

use std::time::Duration;

use common::encryption::{
    assert_refused, assert_sealed, count, keyring, poll_until, refused, rows, EncryptedSetup,
};
use tokio_postgres::Client;

const COLUMNS: &[&str] = &[
    "ssn: {type: text, search: equality}",
    "birth_date: {type: date}",
    "notes: {type: text}",
];

async fn setup() -> EncryptedSetup {
    EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await
}

async fn through_proxy(setup: &EncryptedSetup) -> Client {
    setup.app().await
}

const SCHEMA: &str = "CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, birth_date bytea, notes bytea, cmk_edek jsonb)";

/// Checks that the proxy's tenant is the server's (SHOW): that tenant's
/// rows decrypt, the other one's are refused with KM006. Returns it.
async fn proxy_agrees_with_server(app: &Client, context: &str) -> String {
    let shown = rows(app, "SHOW cmk.tenant_id").await[0][0]
        .clone()
        .unwrap_or_default();
    let other = if shown == "acme" { "globex" } else { "acme" };
    let read = |t: &str| format!("SELECT notes FROM patients WHERE tenant_id = '{t}'");
    if let Err(e) = app.simple_query(&read(&shown)).await {
        panic!("{context}: server on {shown}, the proxy refused its rows: {e:?}");
    }
    let (code, _) = refused(app, &read(other)).await;
    assert_eq!(code, "KM006", "{context}: server on {shown}");
    shown
}

/// Inserts an acme row whose notes are the SQL literal `literal` and reads
/// the notes back.
async fn round_trip(client: &Client, literal: &str) -> Option<String> {
    rows(
        client,
        &format!("INSERT INTO patients (tenant_id, notes) VALUES ('acme', {literal})"),
    )
    .await;
    rows(
        client,
        "SELECT notes FROM patients ORDER BY id DESC LIMIT 1",
    )
    .await[0][0]
        .take()
}

/// The message of `sql`'s refusal, which must carry `code`.
async fn refused_with(client: &Client, sql: &str, code: &str) -> String {
    let (got, message) = refused(client, sql).await;
    assert_eq!(got, code, "{sql}: {message}");
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn inserts_are_ciphertext_at_rest_and_plaintext_through_the_proxy() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    let returned = rows(
        &app,
        "INSERT INTO patients (tenant_id, ssn, birth_date, notes) VALUES \
         ('acme', '123-45-6789', '1980-01-02', 'allergic to penicillin'), \
         ('globex', '987-65-4321', '1990-03-04', NULL) RETURNING id, ssn",
    )
    .await;
    assert_eq!(
        returned[0][1].as_deref(),
        Some("123-45-6789"),
        "RETURNING is decrypted"
    );

    // At rest: envelopes, an EDEK per row, a blind index, no plaintext.
    let raw = s
        .direct
        .query(
            "SELECT ssn, notes, cmk_edek::text, ssn_bidx, patients::text FROM patients ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    for row in &raw {
        let ssn: Vec<u8> = row.get(0);
        assert_eq!(&ssn[..4], b"CMK\x01");
        let edek: String = row.get(2);
        assert!(edek.starts_with('{') && edek.len() > 40, "{edek}");
        let bidx: Vec<u8> = row.get(3);
        assert_eq!(bidx.len(), 16);
        let whole: String = row.get(4);
        for secret in ["123-45-6789", "987-65-4321", "1980-01-02", "penicillin"] {
            assert!(
                !whole.contains(secret),
                "plaintext {secret} at rest: {whole}"
            );
        }
    }
    let notes: Option<Vec<u8>> = raw[1].get(1);
    assert!(notes.is_none(), "NULL stays NULL");

    // Through the proxy: plaintext with the declared types; EDEK and blind index hidden.
    let read = rows(&app, "SELECT * FROM patients ORDER BY id").await;
    assert_eq!(
        read[0],
        vec![
            Some("1".into()),
            Some("acme".into()),
            Some("123-45-6789".into()),
            Some("1980-01-02".into()),
            Some("allergic to penicillin".into())
        ]
    );
    assert_eq!(read[1][4], None);
    let typed = app.query("SELECT 1", &[]).await.unwrap();
    assert_eq!(typed.len(), 1, "the connection stays usable");

    // UPDATE with the tenant in the statement keeps the row readable.
    rows(
        &app,
        "UPDATE patients SET notes = 'updated' WHERE id = 2 AND tenant_id = 'globex'",
    )
    .await;
    let read = rows(&app, "SELECT notes FROM patients WHERE id = 2").await;
    assert_eq!(read[0][0].as_deref(), Some("updated"));

    // The audit log has decrypt batches and no values.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap_or_default();
    assert!(
        audit.contains("decrypt_batch") || audit.contains("DecryptBatch"),
        "{audit}"
    );
    assert!(!audit.contains("123-45-6789"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_statements_are_refused_with_km003_and_the_connection_stays_usable() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x')",
    )
    .await;
    let unsupported = [
        "SELECT id FROM patients WHERE notes LIKE 'x%'",
        "SELECT id FROM patients ORDER BY birth_date",
        "SELECT upper(notes) FROM patients",
        // COPY works (encryption_copy.rs); without a column list, COPY
        // FROM is refused before the client is asked for data.
        "COPY patients FROM STDIN",
        "INSERT INTO patients (tenant_id, notes) SELECT tenant_id, notes FROM patients",
    ];
    assert_refused(&app, &unsupported, "KM003", "public.patients").await;
    // Inside a transaction the server transaction fails too: COMMIT cannot
    // commit the earlier insert.
    app.simple_query("BEGIN").await.unwrap();
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'half')",
    )
    .await;
    let (code, _) = refused(&app, "SELECT id FROM patients WHERE notes = 'half'").await;
    assert_eq!(code, "KM003");
    app.simple_query("COMMIT").await.unwrap();
    let count = rows(&app, "SELECT count(*) FROM patients").await;
    assert_eq!(
        count[0][0].as_deref(),
        Some("1"),
        "the half transaction was rolled back"
    );
    // Views: columns PostgreSQL traces back to a protected column are
    // decrypted (nested views too, in both protocols); conditions on them
    // and writes through them are refused; a view that computes on them is
    // refused at CREATE VIEW, and one made behind the proxy's back has its
    // protected data refused, never shown as bytea.
    rows(
        &app,
        "CREATE VIEW patient_notes AS SELECT id, tenant_id, notes AS memo FROM patients; \
         CREATE VIEW patient_memos AS SELECT tenant_id, memo FROM patient_notes",
    )
    .await;
    let (code, message) = refused(
        &app,
        "CREATE VIEW patient_mixed AS SELECT id, coalesce(notes, notes) AS n FROM patients",
    )
    .await;
    assert_eq!(code, "KM003", "{message}");
    s.direct
        .batch_execute(
            "CREATE VIEW patient_mixed AS SELECT id, coalesce(notes, notes) AS n FROM patients",
        )
        .await
        .unwrap();
    let read = rows(&app, "SELECT memo FROM patient_notes").await;
    assert_eq!(read[0][0].as_deref(), Some("x"));
    let read = rows(&app, "SELECT memo FROM patient_memos").await;
    assert_eq!(read, vec![vec![Some("x".to_owned())]]);
    let read = app
        .query("SELECT memo FROM patient_memos", &[])
        .await
        .unwrap();
    assert_eq!(read[0].get::<_, Option<String>>(0).as_deref(), Some("x"));
    for sql in [
        "SELECT n FROM patient_mixed",
        "SELECT coalesce(notes, notes) AS n FROM patients",
        "SELECT id FROM patient_notes WHERE memo = 'x'",
        "INSERT INTO patient_notes (id, memo) VALUES (99, 'plain')",
        "UPDATE patient_notes SET memo = 'plain'",
    ] {
        let (code, message) = refused(&app, sql).await;
        assert!(code == "KM003", "{sql}: {code} {message}");
    }
    let count = rows(&app, "SELECT count(*) FROM patients").await;
    assert_eq!(
        count[0][0].as_deref(),
        Some("1"),
        "nothing written through the view"
    );
    // Statements on other tables are never refused.
    rows(
        &app,
        "CREATE TABLE doctors (name text); SELECT * FROM doctors WHERE name LIKE 'a%'",
    )
    .await;
    // The same read through the extended protocol is decrypted too.
    let read = app.query("SELECT notes FROM patients", &[]).await.unwrap();
    assert_eq!(read[0].get::<_, Option<String>>(0).as_deref(), Some("x"));
    assert_eq!(app.query("SELECT 2", &[]).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_a_tenant_and_sessions_see_only_their_tenant() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    let (code, message) = refused(&app, "INSERT INTO patients (notes) VALUES ('who?')").await;
    assert_eq!(code, "KM004", "{message}");
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a1'), ('globex', 'g1')",
    )
    .await;

    app.simple_query("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let (code, _) = refused(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('globex', 'x')",
    )
    .await;
    assert_eq!(
        code, "KM004",
        "a row tenant that disagrees with the session is refused"
    );
    // An UPDATE without the tenant is pinned to the session tenant: the
    // globex row is not touched, let alone encrypted under acme's key.
    rows(&app, "UPDATE patients SET notes = 'pinned'").await;
    let (code, message) = refused(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(code, "KM006", "{message}");
    let mine = rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(mine, vec![vec![Some("pinned".to_owned())]]);
    app.simple_query("SET cmk.tenant_id TO DEFAULT")
        .await
        .unwrap();
    let all = rows(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(all[1][0].as_deref(), Some("g1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_returns_to_the_startup_tenant_like_the_server_so_the_guard_stays() {
    let s = setup().await;
    let admin = through_proxy(&s).await;
    rows(
        &admin,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a1'), ('globex', 'g1')",
    )
    .await;
    // A session bound to acme by its startup options (how a tenant's
    // connection pool is configured). RESET, DEFAULT and DISCARD ALL (run by
    // poolers between clients) take the server back to acme, so they must
    // not lift the cross-tenant guard in the proxy.
    let url = format!(
        "{}?options=-c%20cmk.tenant_id%3Dacme",
        s.proxy.url("postgres", "", "app")
    );
    let (app, conn) = common::connect(&url).await;
    std::mem::forget(conn);
    for reset in [
        "RESET cmk.tenant_id",
        "SET cmk.tenant_id TO DEFAULT",
        "DISCARD ALL",
        "RESET ALL",
        "SELECT set_config('cmk.tenant_id', NULL, false)",
    ] {
        app.simple_query("SET cmk.tenant_id = 'globex'")
            .await
            .unwrap();
        app.simple_query(reset).await.unwrap();
        let shown = rows(&app, "SHOW cmk.tenant_id").await;
        assert_eq!(
            shown,
            vec![vec![Some("acme".to_owned())]],
            "server after {reset}"
        );
        let (code, message) = refused(&app, "SELECT notes FROM patients ORDER BY id").await;
        assert_eq!(code, "KM006", "after {reset}: {message}");
        let mine = rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
        assert_eq!(mine, vec![vec![Some("a1".to_owned())]], "after {reset}");
        // Writes too go back to acme.
        let (code, _) = refused(
            &app,
            "INSERT INTO patients (tenant_id, notes) VALUES ('globex', 'x')",
        )
        .await;
        assert_eq!(code, "KM004", "after {reset}");
    }
    // Within one query string too: the INSERT after the RESET is acme's.
    let (code, message) = refused(
        &app,
        "SET cmk.tenant_id = 'globex'; SET cmk.tenant_id TO DEFAULT; \
         INSERT INTO patients (tenant_id, notes) VALUES ('globex', 'x')",
    )
    .await;
    assert_eq!(code, "KM004", "{message}");
    // A SET in an implicit transaction that fails is rolled back by the
    // server: the proxy stays on acme too.
    let err = app
        .batch_execute("SET cmk.tenant_id = 'globex'; SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("22012"), "{err}");
    let shown = rows(&app, "SHOW cmk.tenant_id").await;
    assert_eq!(shown, vec![vec![Some("acme".to_owned())]]);
    let mine = rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(
        mine,
        vec![vec![Some("a1".to_owned())]],
        "still acme after the failed implicit transaction"
    );
    let (code, _) = refused(
        &app,
        "SELECT notes FROM patients WHERE tenant_id = 'globex'",
    )
    .await;
    assert_eq!(code, "KM006");
    // A COMMIT ends the transaction at once: an error after it in the same
    // query string does not undo what it committed.
    let err = app
        .batch_execute("BEGIN; SET cmk.tenant_id = 'globex'; COMMIT; SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("22012"), "{err}");
    let shown = rows(&app, "SHOW cmk.tenant_id").await;
    assert_eq!(shown, vec![vec![Some("globex".to_owned())]]);
    let theirs = rows(
        &app,
        "SELECT notes FROM patients WHERE tenant_id = 'globex'",
    )
    .await;
    assert_eq!(theirs, vec![vec![Some("g1".to_owned())]]);
    let (code, _) = refused(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(code, "KM006", "globex now, on both sides");
    app.simple_query("RESET cmk.tenant_id").await.unwrap();
    // Savepoints: a SET after one and rolled back to it is undone, in one
    // query string and message by message in the extended protocol; a
    // released savepoint keeps it.
    app.batch_execute(
        "BEGIN; SAVEPOINT s; SET cmk.tenant_id = 'globex'; ROLLBACK TO SAVEPOINT s; COMMIT",
    )
    .await
    .unwrap();
    for sql in [
        "BEGIN",
        "SAVEPOINT outer_sp",
        "SAVEPOINT inner_sp",
        "SET cmk.tenant_id = 'globex'",
        "ROLLBACK TO SAVEPOINT outer_sp",
        "COMMIT",
    ] {
        app.execute(sql, &[]).await.unwrap();
    }
    let shown = rows(&app, "SHOW cmk.tenant_id").await;
    assert_eq!(shown, vec![vec![Some("acme".to_owned())]]);
    let mine = rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(
        mine,
        vec![vec![Some("a1".to_owned())]],
        "acme after ROLLBACK TO"
    );
    app.batch_execute("BEGIN; SAVEPOINT a; SET cmk.tenant_id = 'globex'; RELEASE a; COMMIT")
        .await
        .unwrap();
    let theirs = rows(
        &app,
        "SELECT notes FROM patients WHERE tenant_id = 'globex'",
    )
    .await;
    assert_eq!(
        theirs,
        vec![vec![Some("g1".to_owned())]],
        "globex after RELEASE"
    );
    app.simple_query("RESET cmk.tenant_id").await.unwrap();
    // ROLLBACK AND CHAIN undoes the SET and starts the next transaction at
    // once (no idle ReadyForQuery in between): the proxy is back on acme
    // inside it, in one query string and statement by statement.
    for extended in [false, true] {
        if extended {
            for sql in [
                "BEGIN",
                "SET cmk.tenant_id = 'globex'",
                "ROLLBACK AND CHAIN",
            ] {
                app.execute(sql, &[]).await.unwrap();
            }
        } else {
            app.batch_execute("BEGIN; SET cmk.tenant_id = 'globex'; ROLLBACK AND CHAIN")
                .await
                .unwrap();
        }
        let context = format!("ROLLBACK AND CHAIN (extended: {extended})");
        assert_eq!(proxy_agrees_with_server(&app, &context).await, "acme");
        app.batch_execute("ROLLBACK").await.unwrap();
    }
    // Several transactions in one query string, and ROLLBACK TOs the server
    // skipped: each transaction end decides for the changes before it, in
    // order. The proxy must agree with the server (SHOW) whatever the
    // server did.
    let cases: [&[&str]; 6] = [
        &["SET cmk.tenant_id = 'globex'; ROLLBACK; RESET ALL"],
        &["BEGIN; SET cmk.tenant_id = 'acme'; ROLLBACK; SET cmk.tenant_id = 'acme'"],
        &["BEGIN; SET cmk.tenant_id = 'acme'; COMMIT; SET cmk.tenant_id = 'globex'; SELECT 1/0"],
        &["BEGIN; SET cmk.tenant_id = 'acme'; COMMIT; BEGIN; SET cmk.tenant_id = 'globex'"],
        &[
            "BEGIN; SAVEPOINT s; SET cmk.tenant_id = 'acme'; SAVEPOINT u",
            "SELECT 1/0; ROLLBACK TO s",
            "ROLLBACK TO u; COMMIT",
        ],
        &[
            "BEGIN; SET cmk.tenant_id = 'acme'; SAVEPOINT s; RELEASE s; SET cmk.tenant_id = 'globex'; SAVEPOINT u; ROLLBACK TO s",
            "ROLLBACK TO u; COMMIT",
        ],
    ];
    for steps in cases {
        app.batch_execute("SET cmk.tenant_id = 'globex'")
            .await
            .unwrap();
        for sql in steps {
            let _ = app.batch_execute(sql).await;
        }
        let _ = app.batch_execute("ROLLBACK").await;
        proxy_agrees_with_server(&app, &format!("{steps:?}")).await;
    }
    // After a COMMIT in the same string the tenant depends on how the
    // transaction went (a LOCAL one ends): a write there must name its own.
    let (code, message) = refused(
        &app,
        "BEGIN; SET LOCAL cmk.tenant_id = 'globex'; COMMIT; \
         INSERT INTO patients (notes) VALUES ('after commit')",
    )
    .await;
    assert_eq!(code, "KM004", "{message}");
    app.batch_execute("RESET cmk.tenant_id").await.unwrap();
    // An empty value is no tenant on the server too: the guard is off.
    app.simple_query("SET cmk.tenant_id = ''").await.unwrap();
    let all = rows(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(all.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn set_config_of_the_tenant_is_followed_and_forms_it_cannot_follow_are_refused() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    // The tenant column defaults to the setting, as with row-level security:
    // the proxy must seal under the tenant the server will store.
    s.direct
        .batch_execute(
            "ALTER TABLE patients ALTER COLUMN tenant_id SET DEFAULT current_setting('cmk.tenant_id')",
        )
        .await
        .unwrap();
    app.simple_query("SELECT set_config('cmk.tenant_id', 'acme', false)")
        .await
        .unwrap();
    rows(
        &app,
        "INSERT INTO patients (notes) VALUES ('via set_config')",
    )
    .await;
    let stored = s
        .direct
        .query_one("SELECT tenant_id FROM patients", &[])
        .await
        .unwrap();
    assert_eq!(stored.get::<_, String>(0), "acme");
    let read = rows(&app, "SELECT notes FROM patients").await;
    assert_eq!(read, vec![vec![Some("via set_config".to_owned())]]);

    // Local to a transaction: gone after COMMIT, as on the server.
    app.batch_execute("BEGIN; SELECT set_config('cmk.tenant_id', 'globex', true)")
        .await
        .unwrap();
    rows(&app, "INSERT INTO patients (notes) VALUES ('globex row')").await;
    app.batch_execute("COMMIT").await.unwrap();
    let (code, _) = refused(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(
        code, "KM006",
        "back to acme: globex's row is another tenant's"
    );

    // A value the proxy cannot know is refused (the connection stays usable),
    // also through a prepared statement.
    let (code, message) = refused(
        &app,
        "SELECT set_config('cmk.tenant_id', current_user, false)",
    )
    .await;
    assert_eq!(code, "KM003", "{message}");
    assert!(message.contains("set_config"), "{message}");
    let err = app
        .prepare("SELECT set_config('cmk.tenant_id', $1 || '', false)")
        .await
        .expect_err("an expression as the tenant");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
    let mine = rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(mine, vec![vec![Some("via set_config".to_owned())]]);

    // The usual form with a bound parameter (tokio-postgres sends it in
    // binary): the tenant is the bound value.
    let set = app
        .prepare("SELECT set_config('cmk.tenant_id', $1, false)")
        .await
        .unwrap();
    app.query(&set, &[&"globex"]).await.unwrap();
    rows(&app, "INSERT INTO patients (notes) VALUES ('bound globex')").await;
    let globex = rows(
        &app,
        "SELECT notes FROM patients WHERE tenant_id = 'globex' ORDER BY id",
    )
    .await;
    assert_eq!(
        globex,
        vec![
            vec![Some("globex row".to_owned())],
            vec![Some("bound globex".to_owned())]
        ]
    );
    app.query(&set, &[&"acme"]).await.unwrap();
    let (code, _) = refused(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(code, "KM006", "acme again");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_cells_fail_with_km005() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'n1'), ('acme', 'n2')",
    )
    .await;
    // Flip one byte of a cell; copy a cell into another row's column.
    s.direct
        .batch_execute(
            "UPDATE patients SET notes = overlay(notes placing '\\x00'::bytea from 40 for 1) WHERE id = 1; \
             UPDATE patients SET ssn = (SELECT notes FROM patients WHERE id = 2) WHERE id = 2",
        )
        .await
        .unwrap();
    let (code, message) = refused(&app, "SELECT notes FROM patients WHERE id = 1").await;
    assert_eq!(code, "KM005", "{message}");
    let (code, _) = refused(&app, "SELECT ssn FROM patients WHERE id = 2").await;
    assert_eq!(
        code, "KM005",
        "a cell moved to another column does not decrypt"
    );
    assert_eq!(
        rows(&app, "SELECT notes FROM patients WHERE id = 2").await[0][0].as_deref(),
        Some("n2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_tenant_is_refused_with_km001_while_others_keep_working() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a'), ('globex', 'g')",
    )
    .await;
    let ring = s.dir.path().join("keyring.json");
    keyring(&ring, "disable", "globex");
    let globex = "SELECT notes FROM patients WHERE tenant_id = 'globex'";
    let e = poll_until(true, || app.simple_query(globex))
        .await
        .expect("an error");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("KM001"), "{e}");
    assert!(common::error_message(&e).contains("globex"));
    let (code, _) = refused(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('globex', 'x')",
    )
    .await;
    assert_eq!(code, "KM001");
    assert_eq!(
        rows(&app, "SELECT notes FROM patients WHERE tenant_id = 'acme'").await[0][0].as_deref(),
        Some("a")
    );
    keyring(&ring, "enable", "globex");
    poll_until(false, || app.simple_query(globex)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_read_inside_a_transaction_fails_the_server_transaction_too() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a'), ('globex', 'g')",
    )
    .await;
    keyring(&s.dir.path().join("keyring.json"), "disable", "globex");
    poll_until(true, || {
        app.simple_query("SELECT notes FROM patients WHERE tenant_id = 'globex'")
    })
    .await;
    app.simple_query("BEGIN").await.unwrap();
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'half of the work')",
    )
    .await;
    let (code, _) = refused(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(code, "KM001");
    let (code, message) = refused(&app, "SELECT 1").await;
    assert_eq!(
        code, "25P02",
        "the transaction is aborted on the server too: {message}"
    );
    app.simple_query("COMMIT").await.unwrap();
    let stored = count(&s.direct, "SELECT count(*) FROM patients").await;
    assert_eq!(stored, 2, "COMMIT did not commit half of the work");
    assert_eq!(
        rows(&app, "SELECT count(*) FROM patients").await[0][0].as_deref(),
        Some("2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_of_one_shape_share_a_plan_and_each_keeps_its_own_values_tenant_and_catalog() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    // One shape, planned once: each query's values, tenant and quotes are its own.
    let values = [
        ("acme", "it''s", "it's", "1980-01-02"),
        (
            "globex",
            "costs $1; -- not a comment",
            "costs $1; -- not a comment",
            "1990-03-04",
        ),
        ("acme", "", "", "2000-12-31"),
    ];
    for (tenant, literal, _, date) in values {
        rows(
            &app,
            &format!(
                "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('{tenant}', '{literal}', '{date}'::date)"
            ),
        )
        .await;
    }
    let read = rows(
        &app,
        "SELECT tenant_id, notes, birth_date FROM patients ORDER BY id",
    )
    .await;
    let expected: Vec<Vec<Option<String>>> = values
        .iter()
        .map(|(tenant, _, plain, date)| {
            vec![
                Some(tenant.to_string()),
                Some(plain.to_string()),
                Some(date.to_string()),
            ]
        })
        .collect();
    assert_eq!(read, expected);
    // Each row sealed under its own tenant's DEK.
    let deks = s
        .direct
        .query(
            "SELECT p.tenant_id, k.tenant_id FROM patients p \
             JOIN cmk.data_keys k ON p.cmk_edek ? k.dek_id::text ORDER BY p.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(deks.len(), values.len());
    for row in &deks {
        assert_eq!(row.get::<_, String>(0), row.get::<_, String>(1));
    }
    // Forms the shape scanner leaves to the full planner still work.
    assert_eq!(
        round_trip(&app, "E'line\\nbreak'").await.as_deref(),
        Some("line\nbreak")
    );
    // A refusal of a shared shape's values is the full planner's.
    app.simple_query("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let message = refused_with(&app, "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('globex', 'x', '2001-01-01'::date)", "KM004").await;
    assert!(message.contains("'globex'"), "{message}");
    refused_with(&app, "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('acme', 'x', 'not a date'::date)", "22P02").await;
    // A catalog change re-plans the shape: a protected column stored as
    // text makes the table unwritable, and fixing it makes it writable again.
    // (The proxy refuses such DDL itself: it runs directly, and other DDL
    // through the proxy reloads the catalog at once.)
    s.direct
        .batch_execute("ALTER TABLE patients ALTER COLUMN notes TYPE text USING NULL")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE reload_1 (x int)")
        .await
        .unwrap();
    refused_with(&app, "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('acme', 'y', '2002-02-02'::date)", "KM003").await;
    s.direct
        .batch_execute("ALTER TABLE patients ALTER COLUMN notes TYPE bytea USING NULL")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE reload_2 (x int)")
        .await
        .unwrap();
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('acme', 'z', '2003-03-03'::date)",
    )
    .await;
    assert_sealed(
        &s.direct,
        "SELECT notes FROM patients ORDER BY id DESC LIMIT 1",
        "sealed after the catalog came back",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nonstandard_strings_and_non_utf8_sql_are_refused_near_protected_data_and_the_rest_works() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    app.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    // The proxy's own literals (ciphertext, EDEK) read the same either way.
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ('acme', 'plain words', '2001-02-03')",
    )
    .await;
    assert_eq!(
        rows(&app, "SELECT notes, birth_date FROM patients").await[0],
        vec![
            Some("plain words".to_owned()),
            Some("2001-02-03".to_owned())
        ]
    );
    assert_sealed(&s.direct, "SELECT notes FROM patients", "sealed").await;
    // A backslash may end a string elsewhere than the proxy reads it:
    // refused near protected data, passed elsewhere.
    let message = refused_with(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'it\\'s')",
        "KM003",
    )
    .await;
    assert!(message.contains("standard_conforming_strings"), "{message}");
    assert_eq!(
        rows(&app, "SELECT 'a\\\\b'").await[0][0].as_deref(),
        Some("a\\b")
    );
    app.batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    assert_eq!(
        round_trip(&app, "'back\\slash'").await.as_deref(),
        Some("back\\slash")
    );

    // SQL in another client encoding: the proxy cannot read or rewrite it,
    // so it refuses it near protected data and passes the rest.
    let script = s.dir.path().join("latin1.sql");
    let mut bytes = b"\\set VERBOSITY verbose\n".to_vec();
    bytes.extend_from_slice(
        b"INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'caf\xe9');\n",
    );
    bytes.extend_from_slice(b"SELECT 'caf\xe9' AS word;\n");
    std::fs::write(&script, bytes).unwrap();
    let out = std::process::Command::new("psql")
        .arg(s.proxy.url("postgres", "", "app"))
        .args(["-X", "-A", "-t", "-f"])
        .arg(&script)
        .env("PGCLIENTENCODING", "LATIN1")
        .output()
        .expect("psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KM003"), "{stderr}");
    assert!(
        out.stdout.windows(4).any(|w| w == b"caf\xe9"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stored = count(&s.direct, "SELECT count(*) FROM patients").await;
    assert_eq!(stored, 2, "the LATIN1 write was not stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_created_directly_in_postgresql_is_seen_within_catalog_refresh() {
    let s = EncryptedSetup::start_configured(
        SCHEMA,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1s\n",
    )
    .await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'seen through the view')",
    )
    .await;
    // A migration run directly, not through the proxy.
    s.direct
        .batch_execute(
            "CREATE VIEW direct_notes AS SELECT id, tenant_id, notes AS memo FROM patients",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match app.simple_query("SELECT memo FROM direct_notes").await {
            Ok(messages) => {
                let read: Vec<String> = messages
                    .into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .collect();
                assert_eq!(read, vec!["seen through the view".to_owned()]);
                break;
            }
            // Unmapped, the view's envelopes are refused, never shown.
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the view was not mapped within 10 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let (code, _) = refused(
        &app,
        "INSERT INTO direct_notes (id, memo) VALUES (99, 'plain')",
    )
    .await;
    assert_eq!(code, "KM003", "a write through the mapped view is refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_protected_table_is_used_through_its_parent_only() {
    let schema = "CREATE TABLE parts (id int NOT NULL, tenant_id text NOT NULL, notes bytea, \
                  cmk_edek jsonb) PARTITION BY RANGE (id); \
                  CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (1000)";
    let s = EncryptedSetup::start(schema, "public.parts", &["notes: {type: text}"]).await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO parts (id, tenant_id, notes) VALUES (1, 'acme', 'through the parent')",
    )
    .await;
    assert_eq!(
        rows(&app, "SELECT notes FROM parts").await,
        vec![vec![Some("through the parent".to_owned())]]
    );
    for sql in [
        "INSERT INTO parts_low (id, tenant_id, notes) VALUES (2, 'acme', 'plain')",
        "SELECT notes FROM parts_low",
    ] {
        let message = refused_with(&app, sql, "KM003").await;
        assert!(message.contains("parts_low"), "{message}");
    }
    let raw: Vec<Vec<u8>> = s
        .direct
        .query("SELECT notes FROM parts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(raw.len(), 1, "nothing was written through the partition");
    assert_eq!(&raw[0][..4], b"CMK\x01");

    // Views made directly in PostgreSQL over the partition, and a chain of
    // views deeper than the proxy maps: once the catalog is reloaded (any
    // DDL through the proxy), writes through them are refused, and the
    // partition's view decrypts like the parent's.
    let mut chain = String::from(
        "CREATE VIEW low_view AS SELECT id, tenant_id, notes FROM parts_low; \
         CREATE VIEW deep_0 AS SELECT id, tenant_id, notes FROM parts;",
    );
    for level in 1..=9 {
        chain.push_str(&format!(
            "CREATE VIEW deep_{level} AS SELECT id, tenant_id, notes FROM deep_{};",
            level - 1
        ));
    }
    s.direct.batch_execute(&chain).await.unwrap();
    app.batch_execute("CREATE TABLE reload_views (x int)")
        .await
        .unwrap();
    for view in ["low_view", "deep_9"] {
        let sql = format!("INSERT INTO {view} (id, tenant_id, notes) VALUES (3, 'acme', 'plain')");
        let message = refused_with(&app, &sql, "KM003").await;
        assert!(message.contains(view), "{message}");
    }
    assert_eq!(
        rows(&app, "SELECT notes FROM low_view").await,
        vec![vec![Some("through the parent".to_owned())]]
    );
    let stored = count(&s.direct, "SELECT count(*) FROM parts").await;
    assert_eq!(stored, 1, "nothing was written through the views");
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_that_would_strand_the_policy_is_refused_and_changes_nothing() {
    let s = setup().await;
    let app = through_proxy(&s).await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'kept')",
    )
    .await;
    for (sql, column) in [
        ("ALTER TABLE patients RENAME TO patients_old", None),
        (
            "CREATE TRIGGER retenant BEFORE INSERT ON patients FOR EACH ROW EXECUTE FUNCTION f()",
            None,
        ),
        ("ALTER SCHEMA public RENAME TO old_public", None),
        (
            "ALTER TABLE patients RENAME COLUMN notes TO notes_plain",
            Some("notes"),
        ),
        ("ALTER TABLE patients SET SCHEMA pg_temp", None),
        (
            "ALTER TABLE patients DROP COLUMN cmk_edek",
            Some("cmk_edek"),
        ),
        (
            "ALTER TABLE patients ALTER COLUMN notes TYPE text",
            Some("notes"),
        ),
    ] {
        let (code, message) = refused(&app, sql).await;
        assert_eq!(code, "KM003", "{sql}: {message}");
        assert!(message.contains("public.patients"), "{message}");
        if let Some(column) = column {
            assert!(message.contains(&format!("patients.{column}")), "{message}");
        }
    }
    // Nothing changed on the server; the connection goes on.
    let columns = s
        .direct
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'patients' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap();
    let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        columns.contains(&("notes".to_owned(), "bytea".to_owned())),
        "{columns:?}"
    );
    assert!(
        columns.contains(&("cmk_edek".to_owned(), "jsonb".to_owned())),
        "{columns:?}"
    );
    let read = rows(&app, "SELECT notes FROM patients").await;
    assert_eq!(read, vec![vec![Some("kept".to_owned())]]);
    // DDL that leaves the policy's names alone passes.
    app.batch_execute("ALTER TABLE patients ADD COLUMN visits int")
        .await
        .unwrap();
    rows(
        &app,
        "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'second', 2)",
    )
    .await;
    let read = rows(&app, "SELECT notes, visits FROM patients ORDER BY id").await;
    assert_eq!(
        read[1],
        vec![Some("second".to_owned()), Some("2".to_owned())]
    );
}
