//! Bad input on the encrypting path, against a real PostgreSQL: malformed
//! and inconsistent extended-protocol messages for a protected write, a
//! client that vanishes in the middle of a pipeline, and PostgreSQL
//! restarting under the proxy. Each shows the error, that nothing was lost
//! or written in plaintext, and that the proxy keeps serving.

use crate::common;

use std::time::Duration;

use common::encryption::EncryptedSetup;
use common::raw::{message, read_until_ready, send, session, BackendMessage};

const SCHEMA: &str = "CREATE TABLE vault (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    secret bytea, cmk_edek jsonb)";

async fn setup() -> EncryptedSetup {
    EncryptedSetup::start(SCHEMA, "public.vault", &["secret: {type: text}"]).await
}

fn parse(sql: &str) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    message(b'P', &body)
}

fn bind(params: &[&[u8]]) -> Vec<u8> {
    named_bind("", params)
}

fn execute_sync() -> Vec<u8> {
    let mut out = message(b'E', b"\0\0\0\0\0");
    out.extend(message(b'S', b""));
    out
}

const INSERT: &str = "INSERT INTO vault (tenant_id, secret) VALUES ($1, $2)";

/// Sends `bytes` in a fresh raw session and reads one request cycle.
async fn cycle(port: u16, bytes: Vec<u8>) -> Vec<BackendMessage> {
    tokio::task::spawn_blocking(move || {
        let mut s = session(port, "app");
        send(&mut s, &bytes);
        let first = read_until_ready(&mut s);
        // The connection is still usable afterwards.
        send(&mut s, &common::raw::query("SELECT 1"));
        let mut all = first;
        all.extend(read_until_ready(&mut s));
        all
    })
    .await
    .expect("raw session")
}

/// The bodies of the messages with `tag`, as text.
fn bodies(got: &[BackendMessage], tag: u8) -> Vec<String> {
    got.iter()
        .filter(|m| m.tag == tag)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

async fn stored(setup: &EncryptedSetup) -> Vec<Vec<u8>> {
    setup
        .direct
        .query("SELECT secret FROM vault WHERE secret IS NOT NULL", &[])
        .await
        .expect("direct read")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_inconsistent_binds_of_a_protected_write_fail_cleanly() {
    let s = setup().await;
    let port = s.proxy.port();

    // Too few parameters for the statement: refused by the proxy (08P01),
    // the server skips to Sync, the connection stays usable.
    let mut bytes = parse(INSERT);
    bytes.extend(bind(&[b"acme"]));
    bytes.extend(execute_sync());
    let got = cycle(port, bytes).await;
    let tags: Vec<u8> = got.iter().map(|m| m.tag).collect();
    assert_eq!(&tags[..3], b"1EZ", "{got:?}");
    assert_eq!(got[1].field(b'C').as_deref(), Some("08P01"));
    assert!(
        got[1]
            .field(b'M')
            .unwrap_or_default()
            .contains("supplies 1 parameters"),
        "{got:?}"
    );
    assert!(tags.ends_with(b"TDCZ"), "usable afterwards: {tags:?}");

    // A Bind whose body is cut short: the server refuses it; nothing reaches
    // the table, and the connection goes on.
    let mut bytes = parse(INSERT);
    bytes.extend(message(b'B', b"\0\0\0\0\0\x02\0\0\0\x04acm"));
    bytes.extend(execute_sync());
    let got = cycle(port, bytes).await;
    let error = got.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(error.field(b'C').as_deref(), Some("08P01"), "{got:?}");

    // A Bind whose portal name is not UTF-8 (another client encoding): the
    // proxy cannot read it, so it refuses it; the plaintext goes nowhere.
    let mut bytes = parse(INSERT);
    let mut body = b"\xe9\0\0\0\0\0\x02".to_vec();
    for value in [&b"acme"[..], b"not UTF-8 names"] {
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value);
    }
    body.extend_from_slice(&[0, 0]);
    bytes.extend(message(b'B', &body));
    bytes.extend(execute_sync());
    let got = cycle(port, bytes).await;
    let error = got.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(error.field(b'C').as_deref(), Some("08P01"), "{got:?}");
    assert!(
        error
            .field(b'M')
            .unwrap_or_default()
            .contains("cannot read"),
        "{got:?}"
    );
    assert!(stored(&s).await.is_empty(), "nothing stored");

    // A value that is not valid text (bad UTF-8) for a text column.
    let mut bytes = parse(INSERT);
    bytes.extend(bind(&[b"acme", b"\xff\xfe"]));
    bytes.extend(execute_sync());
    let got = cycle(port, bytes).await;
    let error = got.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(error.field(b'C').as_deref(), Some("22P02"), "{got:?}");

    // Garbage Describe and Close bodies.
    let mut bytes = message(b'D', b"");
    bytes.extend(message(b'C', b"X"));
    bytes.extend(message(b'S', b""));
    let got = cycle(port, bytes).await;
    assert!(got.iter().any(|m| m.tag == b'E'), "{got:?}");

    assert!(stored(&s).await.is_empty(), "nothing was written");
    // Other clients are served, and a valid write works.
    let app = s.app().await;
    app.execute(INSERT, &[&"acme", &"kept"])
        .await
        .expect("valid write");
    let cells = stored(&s).await;
    assert_eq!(cells.len(), 1);
    assert_eq!(&cells[0][..4], b"CMK\x01");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_vanishes_mid_pipeline_commits_nothing() {
    let s = setup().await;
    let port = s.proxy.port();
    tokio::task::spawn_blocking(move || {
        let mut sock = session(port, "app");
        let mut bytes = parse(INSERT);
        for i in 0..50 {
            bytes.extend(bind(&[b"acme", format!("lost-{i}").as_bytes()]));
            bytes.extend(message(b'E', b"\0\0\0\0\0"));
        }
        // No Sync: the implicit transaction is never committed.
        send(&mut sock, &bytes);
        std::thread::sleep(Duration::from_millis(200));
        drop(sock);
    })
    .await
    .expect("raw client");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        stored(&s).await.is_empty(),
        "the vanished pipeline left no rows"
    );
    let app = s.app().await;
    app.execute(INSERT, &[&"globex", &"after"])
        .await
        .expect("served");
    let read: String = app
        .query_one("SELECT secret FROM vault", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(read, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_under_an_encrypting_proxy_loses_nothing_committed() {
    let s = setup().await;
    let app = s.app().await;
    app.execute(INSERT, &[&"acme", &"before restart"])
        .await
        .expect("write");
    s.pg.stop().expect("stop PostgreSQL");
    let err = app
        .query_one("SELECT secret FROM vault", &[])
        .await
        .expect_err("server is down");
    let code = common::sqlstate(&err).unwrap_or_default();
    assert!(
        code.is_empty() || code.starts_with("08") || code.starts_with("57"),
        "{err}"
    );
    s.pg.start_again().expect("start PostgreSQL");
    // New sessions work: keys, registry and catalog survive the restart.
    let app = s.app().await;
    let read: String = app
        .query_one("SELECT secret FROM vault", &[])
        .await
        .expect("read after restart")
        .get(0);
    assert_eq!(read, "before restart");
    app.execute(INSERT, &[&"globex", &"after restart"])
        .await
        .expect("write after restart");
    let (direct, conn) = common::connect(&s.pg.admin_url("app")).await;
    std::mem::forget(conn);
    let count: i64 = direct
        .query_one(
            "SELECT count(*) FROM vault WHERE substring(secret from 1 for 4) = '\\x434d4b01'::bytea",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2, "both rows, encrypted");
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_pipelined_behind_a_refused_query_reloads_the_catalog_after_the_ddl() {
    // The refused write and the fix are sent together (tokio-postgres
    // pipelines concurrent queries): the catalog must be reloaded at the
    // fix's own ReadyForQuery, not at the refused query's, which arrives
    // before the fix has run.
    let schema = format!("{SCHEMA}; ALTER TABLE vault ALTER COLUMN secret SET DEFAULT 'plain'");
    let s = EncryptedSetup::start(&schema, "public.vault", &["secret: {type: text}"]).await;
    let app = s.app().await;
    // A lock held elsewhere keeps the fix waiting well past the refused
    // query's ReadyForQuery (and any reload it would start).
    s.direct
        .batch_execute("BEGIN; LOCK TABLE vault IN ACCESS SHARE MODE")
        .await
        .expect("lock");
    let (refused, fixed, _) = futures_util::join!(
        app.simple_query("INSERT INTO vault (tenant_id, secret) VALUES ('acme', 'x')"),
        app.simple_query("ALTER TABLE vault ALTER COLUMN secret DROP DEFAULT"),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.direct.batch_execute("COMMIT").await.expect("unlock");
        },
    );
    let err = refused.expect_err("written before the fix");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
    fixed.expect("fix");
    app.execute(INSERT, &[&"acme", &"after the pipelined fix"])
        .await
        .expect("write after the fix");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_whose_schema_breaks_the_policy_is_not_written_and_the_fix_is_logged() {
    // A DEFAULT on a protected column, set behind the proxy's back: the
    // server would store it unencrypted.
    let schema = format!("{SCHEMA}; ALTER TABLE vault ALTER COLUMN secret SET DEFAULT 'plain'");
    let s = EncryptedSetup::start(&schema, "public.vault", &["secret: {type: text}"]).await;
    let app = s.app().await;
    for sql in [
        "INSERT INTO vault (tenant_id) VALUES ('acme')",
        "INSERT INTO vault (tenant_id, secret) VALUES ('acme', 'x')",
    ] {
        let err = app.simple_query(sql).await.expect_err(sql);
        assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
        assert!(common::error_message(&err).contains("DEFAULT"), "{err}");
    }
    assert!(s
        .proxy
        .log_text()
        .contains("ALTER COLUMN secret DROP DEFAULT"));
    // Once fixed (and the proxy sees the DDL), writes work again.
    app.simple_query("ALTER TABLE vault ALTER COLUMN secret DROP DEFAULT")
        .await
        .expect("fix");
    app.execute(INSERT, &[&"acme", &"now encrypted"])
        .await
        .expect("write after the fix");
    let count: i64 = s
        .direct
        .query_one("SELECT count(*) FROM vault", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1);
    assert_eq!(&stored(&s).await[0][..4], b"CMK\x01");
}

fn named_parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    message(b'P', &body)
}

fn named_bind(statement: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(statement.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&[0, 0]);
    message(b'B', &body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_name_reused_after_deallocate_takes_its_new_definition() {
    // psycopg 3 evicts prepared statements with SQL DEALLOCATE; the name may
    // come back with another statement.
    let s = setup().await;
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut sock = session(port, "app");
        let mut bytes = named_parse("s1", "SELECT 1");
        bytes.extend(message(b'S', b""));
        bytes.extend(common::raw::query("DEALLOCATE s1"));
        bytes.extend(named_parse("s1", INSERT));
        bytes.extend(named_bind("s1", &[b"acme", b"reused name"]));
        bytes.extend(execute_sync());
        send(&mut sock, &bytes);
        (0..3)
            .flat_map(|_| read_until_ready(&mut sock))
            .collect::<Vec<_>>()
    })
    .await
    .expect("raw session");
    assert!(got.iter().all(|m| m.tag != b'E'), "{got:?}");
    let cells = stored(&s).await;
    assert_eq!(cells.len(), 1);
    assert_eq!(
        &cells[0][..4],
        b"CMK\x01",
        "encrypted under the new definition"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_changes_follow_the_transaction_outcome() {
    // The row's tenant comes from the server's setting, the key from the
    // proxy's: if the two disagreed, the cell would be sealed under another
    // tenant's key than its row names (and reads would fail with KM006).
    let schema = "CREATE TABLE vault (id serial PRIMARY KEY, \
        tenant_id text NOT NULL DEFAULT current_setting('cmk.tenant_id'), \
        secret bytea, cmk_edek jsonb)";
    let s = EncryptedSetup::start(schema, "public.vault", &["secret: {type: text}"]).await;
    let app = s.app().await;
    let write = "INSERT INTO vault (secret) VALUES ('s')";
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .expect("set");
    app.batch_execute(write).await.expect("acme write");
    // Rolled back (simple protocol, one string) and LOCAL (committed): both
    // end with acme again, on the server and in the proxy.
    app.batch_execute("BEGIN; SET cmk.tenant_id = 'globex'; ROLLBACK")
        .await
        .expect("rolled back");
    app.batch_execute(write)
        .await
        .expect("write after rollback");
    app.batch_execute("BEGIN").await.expect("begin");
    app.execute("SET LOCAL cmk.tenant_id = 'globex'", &[])
        .await
        .expect("set local (extended)");
    app.execute(write, &[]).await.expect("globex write inside");
    app.batch_execute("COMMIT").await.expect("commit");
    app.batch_execute(write).await.expect("write after local");
    // ROLLBACK TO SAVEPOINT has the tag ROLLBACK too: the COMMIT after it
    // keeps the SET made before the savepoint, on the server and in the proxy.
    app.batch_execute(
        "BEGIN; SET cmk.tenant_id = 'globex'; SAVEPOINT s; ROLLBACK TO SAVEPOINT s; COMMIT",
    )
    .await
    .expect("savepoint rolled back, transaction committed");
    app.batch_execute(write)
        .await
        .expect("write after the savepoint");
    let tenants: Vec<String> = s
        .direct
        .query("SELECT tenant_id FROM vault ORDER BY id", &[])
        .await
        .expect("tenants")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tenants, ["acme", "acme", "globex", "acme", "globex"]);
    // Each row's cell was sealed with a data key of the row's own tenant.
    let mismatched: i64 = s
        .direct
        .query_one(
            "SELECT count(*) FROM vault v, jsonb_object_keys(v.cmk_edek) AS k(dek_id) \
             JOIN cmk.data_keys d ON d.dek_id::text = k.dek_id WHERE d.tenant_id <> v.tenant_id",
            &[],
        )
        .await
        .expect("key tenants")
        .get(0);
    assert_eq!(mismatched, 0, "a cell sealed under another tenant's key");
    // Every row reads back: its cell was sealed under its own tenant's key.
    app.batch_execute("RESET cmk.tenant_id")
        .await
        .expect("reset");
    let read = app
        .query("SELECT secret FROM vault", &[])
        .await
        .expect("read all");
    assert_eq!(read.len(), 5);
    // RESET and DISCARD ALL go back to the startup tenant, here none: a
    // write without one is refused.
    for reset in ["RESET cmk.tenant_id", "DISCARD ALL"] {
        app.batch_execute("SET cmk.tenant_id = 'acme'")
            .await
            .expect("set");
        app.batch_execute(reset).await.expect(reset);
        let err = app.batch_execute(write).await.expect_err("no tenant");
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM004"),
            "{reset}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewritten_write_is_never_run_with_plaintext_by_sql_execute_or_a_failed_redefinition() {
    let s = setup().await;
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut sock = session(port, "app");
        // The server holds s1 rewritten: ($1, $2::bytea, $3::jsonb).
        let mut bytes = named_parse("s1", INSERT);
        bytes.extend(message(b'S', b""));
        // SQL EXECUTE would hand it the plaintext.
        bytes.extend(common::raw::query(
            "EXECUTE s1('acme', 'sql execute', '{}')",
        ));
        // ... also prepared itself, with a comment for a space.
        bytes.extend(parse("EXECUTE/**/s1('acme', 'parsed execute', '{}')"));
        bytes.extend(bind(&[]));
        bytes.extend(execute_sync());
        // A DEALLOCATE that fails (aborted transaction) leaves s1 there.
        for sql in ["BEGIN", "SELECT 1/0", "DEALLOCATE s1", "ROLLBACK"] {
            bytes.extend(common::raw::query(sql));
        }
        // The name redefined with as many parameters as the server's s1.
        bytes.extend(named_parse("s1", "SELECT $1::text, $2::text, $3::text"));
        bytes.extend(message(b'S', b""));
        // Pipelined before the answers, values that fit the old write
        // are refused: the proxy cannot yet tell which one the server has.
        let bind_and_run = || {
            let mut b = named_bind("s1", &[b"acme", b"plain secret", b"{}"]);
            b.extend(execute_sync());
            b
        };
        bytes.extend(bind_and_run());
        send(&mut sock, &bytes);
        let mut got: Vec<_> = (0..9).flat_map(|_| read_until_ready(&mut sock)).collect();
        // After the answers, the new definition runs.
        send(&mut sock, &bind_and_run());
        got.extend(read_until_ready(&mut sock));
        got
    })
    .await
    .expect("raw session");
    let errors = bodies(&got, b'E');
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(errors[4].contains("08P01"), "{errors:?}");
    for error in &errors[..2] {
        assert!(
            error.contains("KM003") && error.contains("EXECUTE"),
            "{errors:?}"
        );
    }
    let rows = bodies(&got, b'D');
    assert_eq!(rows.len(), 1, "{got:?}");
    assert!(rows[0].contains("plain secret"), "the new definition ran");
    assert!(stored(&s).await.is_empty(), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_without_the_tenant_column_names_the_tenant_it_is_sealed_under() {
    let schema = "CREATE TABLE vault (id serial PRIMARY KEY, \
        tenant_id text NOT NULL DEFAULT current_setting('cmk.tenant_id'), \
        secret bytea, cmk_edek jsonb)";
    let s = EncryptedSetup::start(schema, "public.vault", &["secret: {type: text}"]).await;
    let app = s.app().await;
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .expect("set");
    // The proxy follows the SET as it is sent; the server undoes it with
    // the implicit transaction the error rolls back.
    app.batch_execute("SET cmk.tenant_id = 'globex'; SELECT 1/0")
        .await
        .expect_err("division by zero");
    app.batch_execute("INSERT INTO vault (secret) VALUES ('s')")
        .await
        .expect("write");
    let pairs = s
        .direct
        .query(
            "SELECT v.tenant_id, k.tenant_id FROM vault v \
             JOIN cmk.data_keys k ON v.cmk_edek ? k.dek_id::text",
            &[],
        )
        .await
        .expect("direct read");
    assert_eq!(pairs.len(), 1);
    assert_eq!(
        pairs[0].get::<_, String>(0),
        pairs[0].get::<_, String>(1),
        "the row names the tenant whose key sealed it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_or_redefinition_the_server_skipped_after_an_error_keeps_the_write_sealed() {
    let s = setup().await;
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut sock = session(port, "app");
        // The server holds w rewritten: ($1, $2::bytea, $3::jsonb).
        let mut bytes = named_parse("w", INSERT);
        bytes.extend(message(b'S', b""));
        // An error, then a Close and a redefinition of w in the same cycle:
        // the server skips both to the Sync and keeps the write.
        bytes.extend(parse("SELECT 1/0"));
        bytes.extend(bind(&[]));
        bytes.extend(message(b'E', b"\0\0\0\0\0"));
        let mut close = vec![b'S'];
        close.extend_from_slice(b"w\0");
        bytes.extend(message(b'C', &close));
        bytes.extend(named_parse("w", "SELECT $1::text, $2::text, $3::text"));
        bytes.extend(message(b'S', b""));
        // Pipelined before the answers: values that would fit the write.
        bytes.extend(named_bind("w", &[b"acme", b"pipelined", b"{}"]));
        bytes.extend(execute_sync());
        send(&mut sock, &bytes);
        let mut got: Vec<_> = (0..3).flat_map(|_| read_until_ready(&mut sock)).collect();
        // After the answers: the proxy knows the server kept the write and
        // seals the values again.
        send(&mut sock, &{
            let mut b = named_bind("w", &[b"acme", b"after the answers"]);
            b.extend(execute_sync());
            b
        });
        got.extend(read_until_ready(&mut sock));
        got
    })
    .await
    .expect("raw session");
    let errors = bodies(&got, b'E');
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("22012"), "{errors:?}");
    assert!(
        errors[1].contains("08P01") && errors[1].contains("\"w\""),
        "{errors:?}"
    );
    let cells = stored(&s).await;
    assert_eq!(
        cells.len(),
        1,
        "only the write after the answers stored a row"
    );
    assert_eq!(&cells[0][..4], b"CMK\x01", "and it is sealed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_set_is_not_undone_by_an_earlier_requests_error() {
    let s = setup().await;
    let app = s.app().await;
    app.batch_execute(
        "INSERT INTO vault (tenant_id, secret) VALUES ('acme', 'a1'), ('globex', 'g1')",
    )
    .await
    .expect("rows");
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut sock = session(port, "app");
        send(&mut sock, &common::raw::query("SET cmk.tenant_id = 'acme'"));
        read_until_ready(&mut sock);
        // One write: a request that fails, then one that sets globex, each
        // with its own Sync. The server ends on globex.
        let mut bytes = named_parse("", "SELECT 1/0");
        bytes.extend(named_bind("", &[]));
        bytes.extend(execute_sync());
        bytes.extend(named_parse("", "SET cmk.tenant_id = 'globex'"));
        bytes.extend(named_bind("", &[]));
        bytes.extend(execute_sync());
        send(&mut sock, &bytes);
        let pipeline: Vec<BackendMessage> =
            (0..2).flat_map(|_| read_until_ready(&mut sock)).collect();
        send(
            &mut sock,
            &common::raw::query("SELECT secret FROM vault WHERE tenant_id = 'globex'"),
        );
        (pipeline, read_until_ready(&mut sock))
    })
    .await
    .expect("raw session");
    let (pipeline, read) = got;
    assert_eq!(
        pipeline.iter().filter(|m| m.tag == b'E').count(),
        1,
        "{pipeline:?}"
    );
    assert!(
        read.iter().all(|m| m.tag != b'E'),
        "the proxy must be on globex too: {:?}",
        read.iter()
            .find(|m| m.tag == b'E')
            .and_then(|m| m.field(b'M'))
    );
    assert!(read.iter().any(|m| m.tag == b'D'));
}
