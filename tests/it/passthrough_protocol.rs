//! Passthrough of the wire protocol (issue 3): simple and extended query,
//! portals, pipelining, text and binary formats, COPY both ways, NOTICE and
//! LISTEN/NOTIFY — each through the real proxy binary to a real PostgreSQL.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{future, SinkExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

/// A bound on waiting for an asynchronous message, so a lost message fails
/// the test instead of hanging it.
const MESSAGE_WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn simple_query_with_several_statements_in_one_string() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    let messages = client
        .simple_query(
            "CREATE TABLE s (id int, name text);\
             INSERT INTO s VALUES (1, 'one'), (2, 'two');\
             SELECT id, name FROM s ORDER BY id;\
             SELECT count(*) FROM s",
        )
        .await
        .unwrap();
    let rows: Vec<Vec<Option<String>>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            vec![Some("1".into()), Some("one".into())],
            vec![Some("2".into()), Some("two".into())],
            vec![Some("2".into())],
        ]
    );
    let completions: Vec<u64> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(completions, vec![0, 2, 2, 1]);

    // An error in the middle of a multi-statement string aborts the rest and
    // leaves the session usable.
    let err = client
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn extended_protocol_named_and_unnamed_statements_and_portals() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (mut client, _h) = connect(&proxy.url("md5_user", "md5_pw", "app")).await;
    client
        .batch_execute("CREATE TABLE e (id int primary key, label text)")
        .await
        .unwrap();

    // Named statements: prepared once, executed many times.
    let insert = client
        .prepare_typed("INSERT INTO e VALUES ($1, $2)", &[Type::INT4, Type::TEXT])
        .await
        .unwrap();
    for i in 0..1000i32 {
        let n = client
            .execute(&insert, &[&i, &format!("label-{i}")])
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    let select = client
        .prepare("SELECT label FROM e WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(select.params(), &[Type::INT4]);
    let label: String = client.query_one(&select, &[&7i32]).await.unwrap().get(0);
    assert_eq!(label, "label-7");

    // Unnamed statement (query with a string) and query_raw streaming.
    let labels: Vec<String> = client
        .query_raw("SELECT label FROM e WHERE id < $1 ORDER BY id", [5i32])
        .await
        .unwrap()
        .map_ok(|r| r.get::<_, String>(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        labels,
        ["label-0", "label-1", "label-2", "label-3", "label-4"]
    );

    // Portals: bind once, fetch in chunks of 300 until exhausted.
    let tx = client.transaction().await.unwrap();
    let all = tx.prepare("SELECT id FROM e ORDER BY id").await.unwrap();
    let portal = tx.bind(&all, &[]).await.unwrap();
    let mut seen = Vec::new();
    let mut chunks = 0;
    loop {
        let rows = tx.query_portal(&portal, 300).await.unwrap();
        if rows.is_empty() {
            break;
        }
        assert!(rows.len() <= 300);
        chunks += 1;
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(chunks, 4);
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    // Two portals open at once on the same transaction interleave correctly.
    let p1 = tx.bind(&all, &[]).await.unwrap();
    let p2 = tx.bind(&select, &[&999i32]).await.unwrap();
    let first = tx.query_portal(&p1, 2).await.unwrap();
    let other = tx.query_portal(&p2, 10).await.unwrap();
    let second = tx.query_portal(&p1, 2).await.unwrap();
    assert_eq!(
        first
            .iter()
            .chain(&second)
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(other[0].get::<_, String>(0), "label-999");
    tx.commit().await.unwrap();

    // A statement error in the extended protocol leaves the session usable.
    let err = client
        .execute(&insert, &[&1i32, &"duplicate"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"));
    let count: i64 = client
        .query_one("SELECT count(*) FROM e", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1000);
}

#[tokio::test]
async fn pipelined_queries_on_one_connection_complete_in_order() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    let stmt = client
        .prepare("SELECT $1::int * 2, repeat('p', $1::int)")
        .await
        .unwrap();
    // tokio-postgres sends every query before reading any response when the
    // futures are polled together: one pipeline of 500 Parse/Bind/Execute/Sync.
    let futures = (0..500i32).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move { client.query_one(stmt, &[&i]).await }
    });
    let results = future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        let row = r.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2 * i as i32);
        assert_eq!(row.get::<_, String>(1).len(), i);
    }
    // Mixed with an error in the middle of the pipeline.
    let (a, b, c) = tokio::join!(
        client.query_one("SELECT 1::int", &[]),
        client.query_one("SELECT 1/0", &[]),
        client.query_one("SELECT 3::int", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&b.unwrap_err()).as_deref(), Some("22012"));
    assert_eq!(c.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test]
async fn binary_and_text_result_formats_agree() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("plain_user", "plain_pw", "app")).await;
    let sql = "SELECT 42::int4, 9000000000::int8, 1.5::float8, true, 'héllo'::text, \
               '2024-02-29'::date, '\\x00ff'::bytea, NULL::text";
    // tokio-postgres' extended protocol asks for binary results ...
    let row = client.query_one(sql, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, i64>(1), 9_000_000_000);
    assert_eq!(row.get::<_, f64>(2), 1.5);
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, String>(4), "héllo");
    assert_eq!(
        row.get::<_, chrono::NaiveDate>(5),
        chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()
    );
    assert_eq!(row.get::<_, Vec<u8>>(6), vec![0, 255]);
    assert_eq!(row.get::<_, Option<String>>(7), None);
    // ... the simple protocol returns text.
    let messages = client.simple_query(sql).await.unwrap();
    let text = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    let values: Vec<Option<&str>> = (0..text.len()).map(|i| text.get(i)).collect();
    assert_eq!(
        values,
        [
            Some("42"),
            Some("9000000000"),
            Some("1.5"),
            Some("t"),
            Some("héllo"),
            Some("2024-02-29"),
            Some("\\x00ff"),
            None
        ]
    );
    // Binary parameters go through unchanged as well.
    let echoed: Vec<u8> = client
        .query_one("SELECT $1::bytea", &[&vec![0u8, 1, 2, 255]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(echoed, vec![0, 1, 2, 255]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_copy_out_of_100k_rows_round_trip_byte_for_byte() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client
        .batch_execute("CREATE TABLE c (id int, payload text)")
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..100_000u32 {
        sent.extend_from_slice(
            format!("{i}\tpayload-{i}-{}\n", i.wrapping_mul(2_654_435_761)).as_bytes(),
        );
    }
    let sink = client
        .copy_in("COPY c (id, payload) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for chunk in sent.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 100_000);

    let row = client
        .query_one("SELECT count(*), sum(id) FROM c", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100_000);
    assert_eq!(row.get::<_, i64>(1), (0..100_000i64).sum::<i64>());

    let stream = client
        .copy_out("COPY (SELECT id, payload FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let received: Vec<u8> = stream
        .try_fold(Vec::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .unwrap();
    assert_eq!(received.len(), sent.len());
    assert_eq!(Sha256::digest(&received), Sha256::digest(&sent));

    // A COPY that fails half-way (bad data) reports the error and the
    // session stays usable.
    let sink = client
        .copy_in("COPY c (id, payload) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22P02"));
    let count: i64 = client
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 100_000);
}

#[tokio::test]
async fn notice_from_a_do_block_reaches_the_client() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h, mut messages) =
        connect_with_messages(&proxy.url("scram_user", "scram_pw", "app")).await;
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        .await
        .unwrap();
    let mut notices = Vec::new();
    while notices.len() < 2 {
        match tokio::time::timeout(MESSAGE_WAIT, messages.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => {
                notices.push((n.severity().to_owned(), n.message().to_owned()))
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("notices never arrived; got {notices:?}"),
        }
    }
    assert_eq!(
        notices,
        [
            ("NOTICE".to_owned(), "hello 42".to_owned()),
            ("WARNING".to_owned(), "careful".to_owned())
        ]
    );
}

#[tokio::test]
async fn listen_notify_between_two_proxied_connections() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (listener, _h1, mut messages) =
        connect_with_messages(&proxy.url("scram_user", "scram_pw", "app")).await;
    let (notifier, _h2) = connect(&proxy.url("md5_user", "md5_pw", "app")).await;
    listener.batch_execute("LISTEN cmk_events").await.unwrap();
    notifier
        .batch_execute("NOTIFY cmk_events, 'first'; SELECT pg_notify('cmk_events', 'second')")
        .await
        .unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        match tokio::time::timeout(MESSAGE_WAIT, messages.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => {
                assert_eq!(n.channel(), "cmk_events");
                payloads.push(n.payload().to_owned());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("notifications never arrived; got {payloads:?}"),
        }
    }
    assert_eq!(payloads, ["first", "second"]);
    // The idle listener received them unprompted; it still answers queries.
    let one: i32 = listener.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn session_parameters_and_startup_options_reach_postgres() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let url = format!(
        "{}?application_name=cmk-test-app&options=-c%20search_path%3Dpg_catalog",
        proxy.url("scram_user", "scram_pw", "app")
    );
    let (client, _h) = connect(&url).await;
    let row = client
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cmk-test-app");
    assert_eq!(row.get::<_, String>(1), "pg_catalog");
    // ParameterStatus changes (SET) are relayed: the client's view of
    // client_encoding-independent settings stays consistent.
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let tz: String = client
        .query_one("SELECT current_setting('TimeZone')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tz, "UTC");
}

/// Frontend message bodies for the raw extended-protocol tests.
mod msg {
    use super::raw;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// Parse: statement name, SQL, no declared parameter types.
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0u16.to_be_bytes());
        raw::message(b'P', &b)
    }

    /// Bind: portal, statement, text parameters, text results.
    pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, stmt);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        raw::message(b'B', &b)
    }

    /// Describe a statement (`S`) or portal (`P`).
    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        cstr(&mut b, name);
        raw::message(b'D', &b)
    }

    /// Execute a portal with a row limit (0 = all).
    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
        raw::message(b'E', &b)
    }

    /// Close a statement (`S`) or portal (`P`).
    pub fn close(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        cstr(&mut b, name);
        raw::message(b'C', &b)
    }

    /// Flush.
    pub fn flush() -> Vec<u8> {
        raw::message(b'H', &[])
    }

    /// Sync.
    pub fn sync() -> Vec<u8> {
        raw::message(b'S', &[])
    }
}

fn tags(msgs: &[raw::BackendMessage]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Reads exactly `n` backend messages.
fn read_n(s: &mut std::net::TcpStream, n: usize) -> Vec<raw::BackendMessage> {
    (0..n)
        .map(|_| raw::read_message(s).expect("connection closed"))
        .collect()
}

#[tokio::test]
async fn flush_without_sync_gets_responses_and_portals_suspend() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let mut s = raw::session(proxy.port(), "app");

    // Parse + Describe + Flush, no Sync: the answers must arrive anyway
    // (drivers such as pgJDBC and psycopg rely on this).
    let mut out = msg::parse("s1", "SELECT g, $1::text FROM generate_series(1, 5) g");
    out.extend(msg::describe(b'S', "s1"));
    out.extend(msg::flush());
    raw::send(&mut s, &out);
    let got = read_n(&mut s, 3);
    assert_eq!(
        tags(&got),
        "1tT",
        "ParseComplete, ParameterDescription, RowDescription"
    );

    // Bind + Execute 2 rows + Flush: PortalSuspended after two rows.
    let mut out = msg::bind("p1", "s1", &["x"]);
    out.extend(msg::execute("p1", 2));
    out.extend(msg::flush());
    raw::send(&mut s, &out);
    let got = read_n(&mut s, 4);
    assert_eq!(tags(&got), "2DDs");

    // Resume the portal, then close it and the statement, then Sync.
    let mut out = msg::execute("p1", 0);
    out.extend(msg::close(b'P', "p1"));
    out.extend(msg::close(b'S', "s1"));
    out.extend(msg::sync());
    raw::send(&mut s, &out);
    let got = raw::read_until_ready(&mut s);
    assert_eq!(tags(&got), "DDDC33Z");

    // The statement is gone upstream: binding it again fails with 26000,
    // and the error is followed by ReadyForQuery after Sync.
    let mut out = msg::bind("", "s1", &["x"]);
    out.extend(msg::execute("", 0));
    out.extend(msg::sync());
    raw::send(&mut s, &out);
    let got = raw::read_until_ready(&mut s);
    assert_eq!(tags(&got), "EZ");
    assert_eq!(got[0].field(b'C').as_deref(), Some("26000"));
}

#[tokio::test]
async fn one_sync_pipeline_of_many_executes_and_an_error_skips_to_sync() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let mut s = raw::session(proxy.port(), "app");
    let mut out = msg::parse("", "SELECT $1::int * 10");
    for i in 0..100 {
        out.extend(msg::bind("", "", &[&i.to_string()]));
        out.extend(msg::execute("", 0));
    }
    out.extend(msg::sync());
    raw::send(&mut s, &out);
    let got = raw::read_until_ready(&mut s);
    let rows: Vec<String> = got
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
        .collect();
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[7], "70");

    // An error in the middle: the rest up to Sync is skipped by PostgreSQL.
    // (generate_series keeps PostgreSQL from folding 10 / 0 at Bind time.)
    let mut out = msg::parse("", "SELECT 10 / g FROM generate_series($1::int, $1::int) g");
    for d in ["1", "0", "2"] {
        out.extend(msg::bind("", "", &[d]));
        out.extend(msg::execute("", 0));
    }
    out.extend(msg::sync());
    raw::send(&mut s, &out);
    let got = raw::read_until_ready(&mut s);
    assert_eq!(tags(&got), "12DC2EZ");
    assert_eq!(got[5].field(b'C').as_deref(), Some("22012"));
}

#[tokio::test]
async fn empty_query_and_copy_fail_are_relayed() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let mut s = raw::session(proxy.port(), "app");
    raw::send(&mut s, &raw::query(""));
    assert_eq!(tags(&raw::read_until_ready(&mut s)), "IZ");

    raw::send(&mut s, &raw::query("CREATE TEMP TABLE cf (v int)"));
    raw::read_until_ready(&mut s);
    raw::send(&mut s, &raw::query("COPY cf FROM STDIN"));
    let got = raw::read_message(&mut s).expect("CopyInResponse");
    assert_eq!(got.tag, b'G');
    let mut out = raw::message(b'd', b"1\n2\n");
    out.extend(raw::message(b'f', b"client gave up\0"));
    raw::send(&mut s, &out);
    let got = raw::read_until_ready(&mut s);
    assert_eq!(tags(&got), "EZ");
    assert_eq!(got[0].field(b'C').as_deref(), Some("57014"));
    assert!(got[0]
        .field(b'M')
        .unwrap_or_default()
        .contains("client gave up"));
    raw::send(&mut s, &raw::query("SELECT count(*) FROM cf"));
    let got = raw::read_until_ready(&mut s);
    let row = got.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(&row.body[6..], b"0");
}
