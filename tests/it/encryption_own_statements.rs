//! Simple-query writes planned by their shape run as the proxy's own named
//! prepared statements (literals and cells as parameters). Against a real
//! PostgreSQL: the literals keep the meaning they have in SQL text, one
//! statement serves every query of a shape, statements the server lost are
//! parsed again, and clients cannot reach them.

use crate::common;

use common::encryption::{assert_refused, assert_sealed, count, refused, rows, EncryptedSetup};
use common::raw::{message, query, read_message, read_until_ready, send, session};
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, notes bytea, cmk_edek jsonb, \
    visits int, big int8, score numeric, born date, label text, ref oid)";

const COLUMNS: &[&str] = &["ssn: {type: text, search: equality}", "notes: {type: text}"];

async fn setup() -> EncryptedSetup {
    EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await
}

/// The proxy's statements on this session's server connection.
async fn own_statements(app: &Client) -> Vec<String> {
    rows(
        app,
        "SELECT statement FROM pg_prepared_statements WHERE name LIKE '\\_\\_cmk\\_proxy\\_%' ORDER BY prepare_time",
    )
    .await
    .into_iter()
    .map(|r| r[0].clone().unwrap_or_default())
    .collect()
}

/// The name of a statement of the proxy's in a raw session.
fn proxy_statement_name(session: &mut std::net::TcpStream) -> Vec<u8> {
    send(session, &query("SELECT name FROM pg_prepared_statements"));
    let names = read_until_ready(session);
    // DataRow: column count (2 bytes), length (4), the name.
    names
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| m.body[6..].to_vec())
        .expect("a statement of the proxy's")
}

#[tokio::test(flavor = "multi_thread")]
async fn literals_mean_what_they_mean_in_sql_and_one_statement_serves_a_shape() {
    let s = setup().await;
    let app = s.app().await;
    let insert = |tenant: &str, notes: &str, visits: &str, big: &str, score: &str| {
        format!(
            "INSERT INTO patients (tenant_id, notes, ssn, visits, big, score, born) \
             VALUES ('{tenant}', '{notes}', '{notes}-ssn', {visits}, {big}, {score}, '2001-02-03')"
        )
    };
    // Numbers are typed as the constants are: 5.5 is numeric and rounds
    // into an int column, 3000000000 is int8, 1.50 keeps its scale.
    for sql in [
        insert("acme", "first", "5.5", "3000000000", "1.50"),
        insert("globex", "second", "7", "12", "2e3"),
        insert("acme", "third", "'8'", "'9'", "'0.25'"),
    ] {
        app.simple_query(&sql).await.expect(&sql);
    }
    let read = rows(
        &s.direct,
        "SELECT visits::text, big::text, score::text, born::text FROM patients ORDER BY id",
    )
    .await;
    let want = |v: [&str; 4]| v.map(|x| Some(x.to_owned())).to_vec();
    assert_eq!(
        read,
        vec![
            want(["6", "3000000000", "1.50", "2001-02-03"]),
            want(["7", "12", "2000", "2001-02-03"]),
            want(["8", "9", "0.25", "2001-02-03"]),
        ]
    );
    // Ciphertext at rest, plaintext through the proxy.
    assert_sealed(
        &s.direct,
        "SELECT notes FROM patients ORDER BY id LIMIT 1",
        "sealed",
    )
    .await;
    app.simple_query("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let notes = rows(
        &app,
        "SELECT notes, ssn FROM patients WHERE tenant_id = 'acme' ORDER BY id",
    )
    .await;
    assert_eq!(
        notes,
        vec![
            vec![Some("first".into()), Some("first-ssn".into())],
            vec![Some("third".into()), Some("third-ssn".into())],
        ]
    );
    // One statement per shape and literal types (the three differ in
    // their number types), none holding a value.
    let statements = own_statements(&app).await;
    assert_eq!(statements.len(), 3, "{statements:?}");
    for sql in &statements {
        assert!(sql.contains("$1") && !sql.contains("first") && !sql.contains("acme"));
    }
    app.simple_query(&insert("acme", "fourth", "5.5", "3000000000", "1.50"))
        .await
        .unwrap();
    assert_eq!(own_statements(&app).await.len(), 3, "reused");

    // A literal a parameter would change (left to default to text) keeps
    // the query as written.
    let labelled = rows(
        &app,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'r') RETURNING notes, 'label'",
    )
    .await;
    assert_eq!(labelled, vec![vec![Some("r".into()), Some("label".into())]]);
    assert_eq!(own_statements(&app).await.len(), 3);
    // UPDATE with literals in SET and WHERE, RETURNING decrypted.
    let updated = rows(
        &app,
        "UPDATE patients SET notes = 'changed', visits = 1 WHERE id = 1 RETURNING notes",
    )
    .await;
    assert_eq!(updated, vec![vec![Some("changed".into())]]);
    assert_eq!(own_statements(&app).await.len(), 4);
    // An error of an execution (here the first) keeps the statement.
    let dup = "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'dup')";
    let (code, _) = refused(&app, dup).await;
    assert_eq!(code, "23505");
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, notes) VALUES (100, 'acme', 'ok')",
    )
    .await;
    assert_eq!(own_statements(&app).await.len(), 5);
    assert_eq!(
        count(&s.direct, "SELECT count(*) FROM patients WHERE id = 100").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_the_server_lost_are_parsed_again() {
    let s = setup().await;
    let app = s.app().await;
    let write = |n: i32| format!("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'w{n}')");
    app.simple_query(&write(1)).await.unwrap();
    // DEALLOCATE ALL and DISCARD ALL through the proxy: seen, parsed anew.
    for drop in ["DEALLOCATE ALL", "DISCARD ALL"] {
        app.simple_query(drop).await.unwrap();
        app.simple_query(&write(2)).await.expect(drop);
    }
    // Dropped where the proxy cannot see it: that write fails with 26000,
    // stores nothing, and the next one works.
    s.direct
        .batch_execute(
            "CREATE FUNCTION forget_plans() RETURNS void LANGUAGE plpgsql \
             AS $$BEGIN EXECUTE 'DEALL' || 'OCATE ALL'; END$$",
        )
        .await
        .unwrap();
    app.simple_query("SELECT forget_plans()").await.unwrap();
    let (code, _) = refused(&app, &write(3)).await;
    assert_eq!(code, "26000");
    app.simple_query(&write(4)).await.unwrap();
    assert_eq!(
        count(&s.direct, "SELECT count(*) FROM patients").await,
        4,
        "w1, w2 twice, w4"
    );
    // In an aborted transaction the Parse fails as the query would; after
    // the rollback the same write works.
    app.batch_execute("BEGIN").await.unwrap();
    let _ = app.simple_query("SELECT 1/0").await.expect_err("1/0");
    let fresh = "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'f', 1)";
    let (code, _) = refused(&app, fresh).await;
    assert_eq!(code, "25P02");
    app.batch_execute("ROLLBACK").await.unwrap();
    app.simple_query(fresh).await.unwrap();
    // More shapes than a connection keeps (64): the oldest are closed, and
    // each still works when it comes back.
    let shape = |n: usize| {
        format!(
            "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'n{n}') RETURNING id AS c{n}"
        )
    };
    for n in 0..70 {
        app.simple_query(&shape(n)).await.unwrap();
    }
    assert_eq!(own_statements(&app).await.len(), 64);
    for n in [0, 69] {
        let got = rows(&app, &shape(n)).await;
        assert_eq!(got.len(), 1, "{n}");
    }
    // Literals in comparisons (negated too) bind; an UPDATE of no row is fine.
    let sql = "UPDATE patients SET notes = 'u', label = 'l' WHERE tenant_id = 'acme' AND (id = -5 OR (visits > 7 AND big <> 3))";
    app.simple_query(sql).await.unwrap();
    app.simple_query(&write(5)).await.unwrap();
    assert_eq!(
        count(&s.direct, "SELECT count(*) FROM patients WHERE notes IS NOT NULL AND substring(notes from 1 for 4) <> '\\x434d4b01'::bytea").await,
        0,
        "every cell sealed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_cannot_use_the_proxy_statement_names() {
    let s = setup().await;
    let app = s.app().await;
    let reserved = [
        "EXECUTE __cmk_proxy_1('acme', 'plain')",
        "PREPARE __CMK_PROXY_9 AS SELECT 1",
        "DEALLOCATE __cmk_proxy_1",
    ];
    assert_refused(&app, &reserved, "KM003", "__cmk_proxy_").await;
    app.simple_query("SELECT 1").await.expect("usable");

    // A raw session writes once (the proxy prepares its statement), then
    // binds a name of the proxy's with plaintext for the cell: refused,
    // nothing stored.
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut session = session(port, "app");
        send(
            &mut session,
            &query("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'sealed')"),
        );
        let first = read_until_ready(&mut session);
        let name = proxy_statement_name(&mut session);
        let mut bind = vec![0u8];
        bind.extend_from_slice(&name);
        bind.push(0);
        bind.extend_from_slice(&0u16.to_be_bytes());
        // The statement's own parameters: tenant, cell, EDEK.
        bind.extend_from_slice(&3u16.to_be_bytes());
        for value in [&b"acme"[..], b"PLAINTEXT", b"{}"] {
            bind.extend_from_slice(&(value.len() as i32).to_be_bytes());
            bind.extend_from_slice(value);
        }
        bind.extend_from_slice(&0u16.to_be_bytes());
        let mut bytes = message(b'B', &bind);
        bytes.extend(message(b'E', b"\0\0\0\0\0"));
        bytes.extend(message(b'S', b""));
        send(&mut session, &bytes);
        (first, read_until_ready(&mut session))
    })
    .await
    .expect("raw session");
    let tags = |m: &[common::raw::BackendMessage]| m.iter().map(|m| m.tag).collect::<Vec<u8>>();
    assert_eq!(tags(&got.0), b"CZ", "the write itself");
    assert_eq!(tags(&got.1), b"EZ");
    assert_eq!(got.1[0].field(b'C').as_deref(), Some("KM003"));
    assert_eq!(count(&s.direct, "SELECT count(*) FROM patients").await, 1);
    let plaintext = count(
        &s.direct,
        "SELECT count(*) FROM patients WHERE position('PLAINTEXT'::bytea in notes) > 0",
    )
    .await;
    assert_eq!(plaintext, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_prepare_simple_writes_off_writes_are_spliced_into_the_sql() {
    let s = EncryptedSetup::start_configured(
        SCHEMA,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  prepare_simple_writes: false\n",
    )
    .await;
    let app = s.app().await;
    for n in 0..3 {
        app.simple_query(&format!(
            "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'n{n}', 5.5)"
        ))
        .await
        .unwrap();
    }
    assert!(own_statements(&app).await.is_empty());
    let read = rows(&s.direct, "SELECT visits::text FROM patients").await;
    assert_eq!(read.len(), 3);
    assert!(read.iter().all(|r| r[0].as_deref() == Some("6")));
    app.simple_query("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let notes = rows(&app, "SELECT notes FROM patients ORDER BY id").await;
    assert_eq!(notes[2][0].as_deref(), Some("n2"));
}

/// Raw extended-protocol messages.
mod wire {
    use super::common::raw::message;

    pub fn parse(sql: &str) -> Vec<u8> {
        let mut body = vec![0u8];
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        message(b'P', &body)
    }

    /// Parse, Bind and Execute of `sql` in the unnamed statement and portal.
    pub fn run(sql: &str) -> Vec<u8> {
        let mut bytes = parse(sql);
        bytes.extend(message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        bytes.extend(message(b'E', b"\0\0\0\0\0"));
        bytes
    }

    pub fn close_statement(name: &[u8]) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend_from_slice(name);
        body.push(0);
        message(b'C', &body)
    }

    pub fn sync() -> Vec<u8> {
        message(b'S', b"")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn literals_a_parameter_would_read_otherwise_stay_in_the_sql() {
    let s = EncryptedSetup::start(
        "CREATE DOMAIN positive AS int CHECK (VALUE > 0); \
         CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
         ssn bytea, ssn_bidx bytea, notes bytea, cmk_edek jsonb, \
         wait interval minute, pi positive)",
        "public.patients",
        COLUMNS,
    )
    .await;
    let app = s.app().await;
    // interval minute reads '30' as 30 minutes; a parameter would be 30 s.
    app.simple_query(
        "INSERT INTO patients (tenant_id, notes, wait, pi) VALUES ('acme', 'a', '30', 1)",
    )
    .await
    .unwrap();
    app.simple_query(
        "UPDATE patients SET notes = 'b', wait = '45' WHERE tenant_id = 'acme' AND id = 1",
    )
    .await
    .unwrap();
    // A domain is checked per row: no row, no error.
    app.simple_query(
        "UPDATE patients SET notes = 'c', pi = '-1' WHERE tenant_id = 'acme' AND id = -5",
    )
    .await
    .unwrap();
    let read = rows(&s.direct, "SELECT wait::text FROM patients").await;
    assert_eq!(read, vec![vec![Some("00:45:00".into())]]);
    assert!(own_statements(&app).await.is_empty(), "spliced, not bound");
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_literals_casts_and_negated_boundaries_keep_their_sql_meaning() {
    let s = setup().await;
    let app = s.app().await;
    app.simple_query(
        "INSERT INTO patients (tenant_id, notes, born, label, big) \
         VALUES ('acme', 'd', DATE '2001-02-03', '30'::interval minute::text, -9223372036854775808)",
    )
    .await
    .expect("typed literal");
    app.simple_query(
        "INSERT INTO patients (tenant_id, notes, visits, ref) VALUES ('acme', 'e', -2147483648, -2147483648)",
    )
    .await
    .expect("int4 boundary");
    let read = rows(
        &s.direct,
        "SELECT born::text, label, big::text, visits::text FROM patients ORDER BY id",
    )
    .await;
    assert_eq!(read[0][0].as_deref(), Some("2001-02-03"));
    assert_eq!(read[0][1].as_deref(), Some("00:30:00"));
    assert_eq!(read[0][2].as_deref(), Some("-9223372036854775808"));
    assert_eq!(read[1][3].as_deref(), Some("-2147483648"));
    // As an int4 constant it is an oid (as int8 it would be out of range).
    let oid = rows(
        &s.direct,
        "SELECT ref::text FROM patients WHERE ref IS NOT NULL",
    )
    .await;
    assert_eq!(oid, vec![vec![Some("2147483648".into())]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn forgotten_statements_are_closed_and_ddl_makes_new_ones() {
    let s = setup().await;
    let app = s.app().await;
    let write =
        "INSERT INTO patients (tenant_id, notes, label) VALUES ('acme', 'x', 'l') RETURNING label";
    // A word like 'discarded' in a read forgets nothing; DEALLOCATE does,
    // and the forgotten statement is closed, not left on the server.
    for _ in 0..5 {
        rows(&app, write).await;
        rows(
            &app,
            "SELECT count(*) FROM patients WHERE label = 'discarded'",
        )
        .await;
    }
    assert_eq!(own_statements(&app).await.len(), 1);
    app.simple_query("DEALLOCATE ALL").await.unwrap();
    rows(&app, write).await;
    rows(&app, write).await;
    assert_eq!(own_statements(&app).await.len(), 1);
    // DDL through the proxy: the statement is made anew (no 0A000).
    app.simple_query("ALTER TABLE patients ALTER COLUMN label TYPE varchar(20)")
        .await
        .unwrap();
    assert_eq!(rows(&app, write).await, vec![vec![Some("l".into())]]);
    // DDL run directly: one 0A000, then the statement is made anew and
    // the old one closed.
    s.direct
        .batch_execute("ALTER TABLE patients ALTER COLUMN label TYPE text")
        .await
        .unwrap();
    let err = app.simple_query(write).await.expect_err("cached plan");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("0A000"));
    rows(&app, write).await;
    assert_eq!(own_statements(&app).await.len(), 1);
    // DEALLOCATE ALL through a prepared statement, executed later, and
    // through a portal bound before a write and executed after it.
    let deallocate = app.prepare("DEALLOCATE ALL").await.unwrap();
    rows(&app, write).await;
    app.execute(&deallocate, &[]).await.unwrap();
    rows(&app, write).await;
    assert_eq!(own_statements(&app).await.len(), 1);
    let mut app = app;
    let tx = app.transaction().await.unwrap();
    // (The DEALLOCATE ALL above dropped the client's statement too.)
    let deallocate = tx.prepare("DEALLOCATE ALL").await.unwrap();
    let portal = tx.bind(&deallocate, &[]).await.unwrap();
    tx.simple_query(write).await.unwrap();
    tx.query_portal(&portal, 0).await.unwrap();
    tx.simple_query(write).await.expect("parsed anew, no 26000");
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn client_pipelines_keep_their_protocol_meaning() {
    let s = setup().await;
    let app = s.app().await;
    app.simple_query("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'keep')")
        .await
        .unwrap();
    let port = s.proxy.port();
    let got = tokio::task::spawn_blocking(move || {
        let mut session = session(port, "app");
        // After an error in an open extended batch the server skips to the
        // client's Sync: a simple-query write in between must not end it.
        let mut bytes = wire::run("SELECT 1/0");
        bytes.extend(query(
            "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'mid')",
        ));
        bytes.extend(wire::run("DELETE FROM patients"));
        bytes.extend(wire::sync());
        send(&mut session, &bytes);
        // The server ignores the Query altogether: one ReadyForQuery.
        let skipped = read_until_ready(&mut session);
        // Pipelined simple queries: the second write does not bind a
        // statement whose Parse failed (aborted transaction) before it.
        let mut bytes = query("BEGIN");
        bytes.extend(query("SELECT 1/0"));
        bytes.extend(query(
            "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'p', 1)",
        ));
        bytes.extend(query("ROLLBACK"));
        bytes.extend(query(
            "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'p', 2)",
        ));
        send(&mut session, &bytes);
        let pipelined: Vec<_> = (0..5).map(|_| read_until_ready(&mut session)).collect();
        // A client Close of a proxy statement: the next write parses anew.
        let name = proxy_statement_name(&mut session);
        let mut bytes = wire::close_statement(&name);
        bytes.extend(wire::sync());
        bytes.extend(query(
            "INSERT INTO patients (tenant_id, notes, visits) VALUES ('acme', 'p', 3)",
        ));
        send(&mut session, &bytes);
        let closed = (
            read_until_ready(&mut session),
            read_until_ready(&mut session),
        );
        // The error reaches the proxy before the Query is sent (Flush, then
        // a separate write): the Query is still ignored, and the session
        // stays in step (the next read is decrypted).
        let mut bytes = wire::run("SELECT 1/0");
        bytes.extend(message(b'H', b""));
        send(&mut session, &bytes);
        let mut flushed = Vec::new();
        while flushed.last().map(|m: &common::raw::BackendMessage| m.tag) != Some(b'E') {
            flushed.extend(read_message(&mut session));
        }
        let mut bytes = query("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'late')");
        bytes.extend(wire::sync());
        send(&mut session, &bytes);
        flushed.extend(read_until_ready(&mut session));
        send(&mut session, &query("SET cmk.tenant_id = 'acme'"));
        read_until_ready(&mut session);
        send(
            &mut session,
            &query("SELECT notes FROM patients ORDER BY id LIMIT 1"),
        );
        let mut after = read_until_ready(&mut session);
        // In the extended protocol too (a record one step behind would
        // take these rows for another message's, and relay ciphertext).
        let mut bytes = wire::run("SELECT notes FROM patients ORDER BY id LIMIT 1");
        bytes.extend(wire::sync());
        send(&mut session, &bytes);
        after.extend(read_until_ready(&mut session));
        // An Execute of a portal that does not exist: the proxy asks for
        // its columns first, and the server's error reaches the client.
        let mut bytes = message(b'E', b"nope\0\0\0\0\0");
        bytes.extend(wire::sync());
        send(&mut session, &bytes);
        let missing = read_until_ready(&mut session);
        (skipped, pipelined, closed, (flushed, after, missing))
    })
    .await
    .expect("raw session");
    let (skipped, pipelined, closed, (flushed, after, missing)) = got;
    let tags = |m: &[common::raw::BackendMessage]| m.iter().map(|m| m.tag).collect::<Vec<u8>>();
    assert_eq!(
        tags(&skipped),
        b"1EZ",
        "SELECT 1/0 fails at Bind (constant folding)"
    );
    assert_eq!(
        count(
            &s.direct,
            "SELECT count(*) FROM patients WHERE notes IS NOT NULL"
        )
        .await,
        3,
        "the DELETE after the error was skipped, the writes in skipped batches ignored: 'keep', visits 2 and 3"
    );
    let codes: Vec<Option<String>> = pipelined
        .iter()
        .map(|cycle| {
            cycle
                .iter()
                .find(|m| m.tag == b'E')
                .and_then(|m| m.field(b'C'))
        })
        .collect();
    assert_eq!(
        codes,
        vec![None, Some("22012".into()), Some("25P02".into()), None, None]
    );
    assert_eq!(tags(&closed.0), b"3Z");
    assert_eq!(tags(&closed.1), b"CZ", "the write after the Close");
    assert_eq!(
        count(
            &s.direct,
            "SELECT count(*) FROM patients WHERE visits IN (2, 3)"
        )
        .await,
        2
    );
    assert_eq!(tags(&flushed), b"1EZ");
    assert_eq!(tags(&after), b"TDCZ12DCZ");
    for row in [&after[1], &after[6]] {
        assert!(
            row.body.windows(4).any(|w| w == b"keep"),
            "decrypted: {:?}",
            row.body
        );
    }
    assert_eq!(tags(&missing), b"EZ");
    assert_eq!(missing[0].field(b'C').as_deref(), Some("34000"));
}
