//! Column encryption through the extended query protocol, with
//! tokio-postgres (binary parameters and results, statements prepared once
//! and executed many times, pipelining, transactions) against a real
//! PostgreSQL and the local keyring; plus raw-protocol sequences that real
//! drivers send (Execute without any Describe, refused Parse/Bind inside a
//! pipeline).

use crate::common;

use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use uuid::Uuid;

use common::encryption::{count, keyring, poll_until, EncryptedSetup};

const SCHEMA: &str = "CREATE TABLE typed (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    c_text bytea, c_text_bidx bytea, c_varchar bytea, c_int2 bytea, c_int4 bytea, c_int8 bytea, \
    c_numeric bytea, c_float8 bytea, c_bool bytea, c_date bytea, c_ts bytea, c_tstz bytea, \
    c_uuid bytea, c_jsonb bytea, c_bytea bytea, plain_note text, cmk_edek jsonb)";

const COLUMNS: &[&str] = &[
    "c_text: {type: text, search: equality}",
    "c_varchar: {type: varchar}",
    "c_int2: {type: int2}",
    "c_int4: {type: int4}",
    "c_int8: {type: int8}",
    "c_numeric: {type: numeric}",
    "c_float8: {type: float8}",
    "c_bool: {type: bool}",
    "c_date: {type: date}",
    "c_ts: {type: timestamp}",
    "c_tstz: {type: timestamptz}",
    "c_uuid: {type: uuid}",
    "c_jsonb: {type: jsonb}",
    "c_bytea: {type: bytea}",
];

async fn setup() -> EncryptedSetup {
    EncryptedSetup::start(SCHEMA, "public.typed", COLUMNS).await
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    common::sqlstate(e).unwrap_or_default()
}

/// One row of every binary-capable declared type (numeric goes as text).
struct Values {
    text: String,
    varchar: String,
    int2: i16,
    int4: i32,
    int8: i64,
    float8: f64,
    boolean: bool,
    date: NaiveDate,
    ts: NaiveDateTime,
    tstz: DateTime<Utc>,
    uuid: Uuid,
    jsonb: serde_json::Value,
    bytea: Vec<u8>,
}

fn sample(i: i64) -> Values {
    Values {
        text: format!("ssn-{i} ünïcødé ✓ {}", "x".repeat(1024)),
        varchar: format!("v{i}"),
        int2: -7 * i as i16,
        int4: -123_456 - i as i32,
        int8: 9_007_199_254_740_993 + i,
        float8: -1.5e-7 * i as f64,
        boolean: i % 2 == 0,
        date: NaiveDate::from_ymd_opt(1980 + i as i32, 2, 29 - (i as u32 % 2)).unwrap_or_default(),
        ts: NaiveDate::from_ymd_opt(2024, 1, 2)
            .and_then(|d| d.and_hms_micro_opt(3, 4, 5, 123_456))
            .unwrap_or_default(),
        tstz: DateTime::parse_from_rfc3339("2024-06-30T23:59:59.5+05:30")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default(),
        uuid: Uuid::new_v4(),
        jsonb: serde_json::json!({"allergies": ["penicillin"], "n": i}),
        bytea: vec![0, 1, 2, 0xff, b'C', b'M', b'K'],
    }
}

const INSERT: &str = "INSERT INTO typed (tenant_id, c_text, c_varchar, c_int2, c_int4, c_int8, \
    c_numeric, c_float8, c_bool, c_date, c_ts, c_tstz, c_uuid, c_jsonb, c_bytea, plain_note) \
    VALUES ($1, $2, $3, $4, $5, $6, '12345.678900', $7, $8, $9, $10, $11, $12, $13, $14, $15) \
    RETURNING id, c_text, c_int4";

const SELECT: &str = "SELECT id, tenant_id, c_text, c_varchar, c_int2, c_int4, c_int8, \
    c_float8, c_bool, c_date, c_ts, c_tstz, c_uuid, c_jsonb, c_bytea, \
    plain_note FROM typed WHERE id = $1";

/// A protected text and int4 for a tenant, returning the new row's id.
const INSERT_TEXT_INT4: &str =
    "INSERT INTO typed (tenant_id, c_text, c_int4) VALUES ($1, $2, $3) RETURNING id";

/// Runs an INSERT … RETURNING id and returns the id.
async fn returned_id(
    app: &Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i32 {
    app.query_one(statement, params)
        .await
        .expect("insert")
        .get(0)
}

async fn insert(app: &Client, stmt: &tokio_postgres::Statement, tenant: &str, v: &Values) -> i32 {
    let row = app
        .query_one(
            stmt,
            &[
                &tenant, &v.text, &v.varchar, &v.int2, &v.int4, &v.int8, &v.float8, &v.boolean,
                &v.date, &v.ts, &v.tstz, &v.uuid, &v.jsonb, &v.bytea, &"note",
            ],
        )
        .await
        .expect("insert");
    let returned: String = row.get(1);
    assert_eq!(returned, v.text, "RETURNING decrypts");
    assert_eq!(row.get::<_, i32>(2), v.int4);
    row.get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_encrypt_every_type_and_read_back_in_binary() {
    let s = setup().await;
    let app = s.app().await;
    let insert_stmt = app.prepare(INSERT).await.expect("prepare insert");
    // The client sees its own parameters with the declared plaintext types.
    assert_eq!(
        insert_stmt.params(),
        &[
            Type::TEXT,
            Type::TEXT,
            Type::VARCHAR,
            Type::INT2,
            Type::INT4,
            Type::INT8,
            Type::FLOAT8,
            Type::BOOL,
            Type::DATE,
            Type::TIMESTAMP,
            Type::TIMESTAMPTZ,
            Type::UUID,
            Type::JSONB,
            Type::BYTEA,
            Type::TEXT,
        ]
    );
    let select_stmt = app.prepare(SELECT).await.expect("prepare select");
    let shown: Vec<Type> = select_stmt
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect();
    assert_eq!(shown[2], Type::TEXT);
    assert_eq!(shown[4], Type::INT2);
    assert_eq!(shown[9], Type::DATE);
    assert_eq!(shown[11], Type::TIMESTAMPTZ);
    assert_eq!(shown.len(), 16, "EDEK and blind index are not shown");

    // Prepared once, executed many times, for two tenants; no new Describe.
    let mut written = Vec::new();
    for i in 0..6 {
        let tenant = if i % 2 == 0 { "acme" } else { "globex" };
        let v = sample(i);
        let id = insert(&app, &insert_stmt, tenant, &v).await;
        written.push((id, tenant, v));
    }
    for (id, tenant, v) in &written {
        let row = app.query_one(&select_stmt, &[id]).await.expect("select");
        assert_eq!(row.get::<_, &str>(1), *tenant);
        assert_eq!(row.get::<_, String>(2), v.text);
        assert_eq!(row.get::<_, String>(3), v.varchar);
        assert_eq!(row.get::<_, i16>(4), v.int2);
        assert_eq!(row.get::<_, i32>(5), v.int4);
        assert_eq!(row.get::<_, i64>(6), v.int8);
        assert_eq!(row.get::<_, f64>(7), v.float8);
        assert_eq!(row.get::<_, bool>(8), v.boolean);
        assert_eq!(row.get::<_, NaiveDate>(9), v.date);
        assert_eq!(row.get::<_, NaiveDateTime>(10), v.ts);
        assert_eq!(row.get::<_, DateTime<Utc>>(11), v.tstz);
        assert_eq!(row.get::<_, Uuid>(12), v.uuid);
        assert_eq!(row.get::<_, serde_json::Value>(13), v.jsonb);
        assert_eq!(row.get::<_, Vec<u8>>(14), v.bytea);
        assert_eq!(row.get::<_, &str>(15), "note");
    }

    // Text results (simple protocol) show the same values.
    let text = app
        .simple_query(&format!(
            "SELECT c_int8, c_date, c_bool, c_numeric, c_tstz FROM typed WHERE id = {}",
            written[0].0
        ))
        .await
        .expect("simple select");
    let row = text.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    let row = row.expect("a row");
    assert_eq!(row.get(0), Some(written[0].2.int8.to_string().as_str()));
    assert_eq!(row.get(1), Some("1980-02-29"));
    assert_eq!(row.get(2), Some("t"));
    assert_eq!(row.get(3), Some("12345.678900"));
    assert_eq!(row.get(4), Some("2024-06-30 18:29:59.5+00"));

    // At rest: envelopes in every protected column, an EDEK, no plaintext.
    for raw in s
        .direct
        .query(
            "SELECT c_text, c_int4, c_date, c_jsonb, cmk_edek::text, typed::text FROM typed",
            &[],
        )
        .await
        .expect("direct read")
    {
        for col in 0..4 {
            let cell: Vec<u8> = raw.get(col);
            assert_eq!(&cell[..4], b"CMK\x01", "column {col} is an envelope");
        }
        let edek: String = raw.get(4);
        assert!(edek.starts_with("{\"") && edek.len() > 40, "{edek}");
        let whole: String = raw.get(5);
        for secret in ["ssn-", "penicillin", "-123456", "12345.6789", "1980-02-29"] {
            assert!(!whole.contains(secret), "plaintext {secret} at rest");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = s.audit();
    assert!(audit.contains("decrypt_batch"), "{audit}");
    assert!(!audit.contains("ssn-0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_upserts_pipelines_and_transactions() {
    let s = setup().await;
    let app = s.app().await;
    let ins = app.prepare(INSERT_TEXT_INT4).await.expect("prepare");
    let id = returned_id(&app, &ins, &[&"acme", &"first", &1i32]).await;

    // UPDATE with the tenant in WHERE, as a parameter.
    let n = app
        .execute(
            "UPDATE typed SET c_text = $1 WHERE id = $2 AND tenant_id = $3",
            &[&"second", &id, &"acme"],
        )
        .await
        .expect("update");
    assert_eq!(n, 1);
    // UPDATE without a tenant: refused with KM004 until the session has one.
    let err = app
        .execute("UPDATE typed SET c_int4 = $1 WHERE id = $2", &[&2i32, &id])
        .await
        .expect_err("no tenant");
    assert_eq!(sqlstate(&err), "KM004", "{err}");
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .expect("set tenant");
    let n = app
        .execute("UPDATE typed SET c_int4 = $1 WHERE id = $2", &[&2i32, &id])
        .await
        .expect("pinned update");
    assert_eq!(n, 1);
    let row = app
        .query_one("SELECT c_text, c_int4 FROM typed WHERE id = $1", &[&id])
        .await
        .expect("read");
    assert_eq!(row.get::<_, String>(0), "second");
    assert_eq!(row.get::<_, i32>(1), 2);
    // The EDEK column was merged, not replaced: both cells stay readable
    // after a new DEK epoch.
    let edek: String = s
        .direct
        .query_one("SELECT cmk_edek::text FROM typed WHERE id = $1", &[&id])
        .await
        .expect("edek")
        .get(0);
    assert!(edek.contains(':'), "{edek}");

    // A row for another tenant than the session's: KM004.
    let err = app
        .query_one(&ins, &[&"globex", &"x", &1i32])
        .await
        .expect_err("tenant mismatch");
    assert_eq!(sqlstate(&err), "KM004", "{err}");

    // Upsert with EXCLUDED.
    app.execute(
        "INSERT INTO typed (id, tenant_id, c_text) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET c_text = EXCLUDED.c_text",
        &[&id, &"acme", &"third"],
    )
    .await
    .expect("upsert");
    let row = app
        .query_one("SELECT c_text, c_int4 FROM typed WHERE id = $1", &[&id])
        .await
        .expect("read");
    assert_eq!(row.get::<_, String>(0), "third");
    assert_eq!(row.get::<_, i32>(1), 2);

    // Pipelined: many statements in flight on one connection.
    let futures = (0..20).map(|i| {
        let app = &app;
        let ins = &ins;
        async move {
            let text = format!("piped-{i}");
            let id: i32 = app
                .query_one(ins, &[&"acme", &text, &i])
                .await
                .expect("piped insert")
                .get(0);
            (id, text)
        }
    });
    let written = futures_util::future::join_all(futures).await;
    let reads = written.iter().map(|(id, _)| {
        let app = &app;
        async move {
            app.query_one("SELECT c_text FROM typed WHERE id = $1", &[id])
                .await
                .expect("piped read")
                .get::<_, String>(0)
        }
    });
    let read = futures_util::future::join_all(reads).await;
    for ((_, text), got) in written.iter().zip(read) {
        assert_eq!(*text, got);
    }

    // Inside a transaction, rolled back and committed.
    let mut app = app;
    let tx = app.transaction().await.expect("begin");
    tx.execute(&ins, &[&"acme", &"rolled back", &0i32])
        .await
        .expect("insert in tx");
    tx.rollback().await.expect("rollback");
    let tx = app.transaction().await.expect("begin");
    let id2: i32 = tx
        .query_one(&ins, &[&"acme", &"committed", &0i32])
        .await
        .expect("insert in tx")
        .get(0);
    let seen: String = tx
        .query_one("SELECT c_text FROM typed WHERE id = $1", &[&id2])
        .await
        .expect("read in tx")
        .get(0);
    assert_eq!(seen, "committed");
    tx.commit().await.expect("commit");
    let stored = count(
        &s.direct,
        "SELECT count(*) FROM typed WHERE plain_note IS NULL",
    )
    .await;
    assert_eq!(stored, 22, "1 + 20 piped + 1 committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_in_the_extended_protocol_keep_the_connection_usable() {
    let s = setup().await;
    let app = s.app().await;
    app.execute(
        "INSERT INTO typed (tenant_id, c_text) VALUES ($1, $2)",
        &[&"acme", &"secret"],
    )
    .await
    .expect("insert");
    for sql in [
        "SELECT id FROM typed WHERE c_text = $1",
        "SELECT id FROM typed ORDER BY c_varchar",
        "SELECT lower(c_text) FROM typed",
        "INSERT INTO typed (tenant_id, c_text) SELECT tenant_id, c_text FROM typed",
        "INSERT INTO typed (tenant_id, c_text, c_varchar) VALUES ($1, $2, $2)",
    ] {
        let err = app.prepare(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "KM003", "{sql}: {err}");
        assert!(common::error_message(&err).contains("typed"), "{err}");
        // Still usable, and statements that do not touch protected columns
        // are never refused.
        let one: i32 = app.query_one("SELECT 1", &[]).await.expect("usable").get(0);
        assert_eq!(one, 1);
        let n: i64 = app
            .query_one(
                "SELECT count(*) FROM typed WHERE tenant_id = $1",
                &[&"acme"],
            )
            .await
            .expect("untouched")
            .get(0);
        assert_eq!(n, 1);
    }
    // A value that is not valid for its declared type: refused at Bind.
    let typed = app
        .prepare_typed(
            "INSERT INTO typed (tenant_id, c_date) VALUES ($1, $2)",
            &[Type::TEXT, Type::TEXT],
        )
        .await
        .expect("prepare typed");
    assert_eq!(
        typed.params(),
        &[Type::TEXT, Type::TEXT],
        "declared types are shown as declared"
    );
    app.execute(&typed, &[&"acme", &"2001-02-03"])
        .await
        .expect("a date sent as text");
    let err = app
        .execute(&typed, &[&"acme", &"not a date"])
        .await
        .expect_err("bad date");
    assert_eq!(sqlstate(&err), "22P02", "{err}");
    // Refusals are audited.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.audit().contains("KM003"));
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_tenant_gets_km001_others_keep_working_and_transactions_fail_whole() {
    let s = setup().await;
    let mut app = s.app().await;
    let ins = app
        .prepare("INSERT INTO typed (tenant_id, c_text) VALUES ($1, $2) RETURNING id")
        .await
        .expect("prepare");
    let read = app
        .prepare("SELECT c_text FROM typed WHERE id = $1")
        .await
        .expect("prepare");
    let acme = returned_id(&app, &ins, &[&"acme", &"a"]).await;
    let acme_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&acme];
    let globex = returned_id(&app, &ins, &[&"globex", &"g"]).await;
    assert_eq!(
        app.query_one(&read, &[&acme])
            .await
            .expect("read")
            .get::<_, String>(0),
        "a"
    );

    keyring(&s.ring(), "disable", "acme");
    let err = poll_until(true, || app.query_one(&read, acme_params))
        .await
        .expect("an error");
    assert_eq!(sqlstate(&err), "KM001", "{err}");
    assert!(common::error_message(&err).contains("acme"), "{err}");
    // Writes for the revoked tenant fail too; the other tenant works on the
    // same connection.
    let err = app
        .query_one(&ins, &[&"acme", &"b"])
        .await
        .expect_err("write");
    assert_eq!(sqlstate(&err), "KM001", "{err}");
    let g: String = app
        .query_one(&read, &[&globex])
        .await
        .expect("globex")
        .get(0);
    assert_eq!(g, "g");
    app.query_one(&ins, &[&"globex", &"g2"])
        .await
        .expect("globex write");

    // Inside a transaction: the refused read fails the server transaction,
    // so COMMIT cannot keep the insert before it.
    let tx = app.transaction().await.expect("begin");
    tx.execute(&ins, &[&"globex", &"in failed tx"])
        .await
        .expect("insert");
    let err = tx
        .query_one(&read, &[&acme])
        .await
        .expect_err("revoked read");
    assert_eq!(sqlstate(&err), "KM001");
    let err = tx.query_one("SELECT 1", &[]).await.expect_err("aborted");
    assert_eq!(sqlstate(&err), "25P02", "{err}");
    let _ = tx.commit().await;
    let kept: i64 = s
        .direct
        .query_one("SELECT count(*) FROM typed WHERE tenant_id = 'globex'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 2, "the failed transaction left nothing behind");

    keyring(&s.ring(), "enable", "acme");
    assert!(poll_until(false, || app.query_one(&read, acme_params))
        .await
        .is_none());
    app.query_one(&ins, &[&"acme", &"c"])
        .await
        .expect("acme writes again");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_and_cross_tenant_cells_are_refused() {
    let s = setup().await;
    let app = s.app().await;
    let ins = app.prepare(INSERT_TEXT_INT4).await.expect("prepare");
    let a = returned_id(&app, &ins, &[&"acme", &"a", &1i32]).await;
    let g = returned_id(&app, &ins, &[&"globex", &"g", &2i32]).await;
    // Flip one ciphertext byte of row a; move row g's cell into row a's other column.
    s.direct
        .batch_execute(&format!(
            "UPDATE typed SET c_text = overlay(c_text placing '\\x00'::bytea from 40 for 1) WHERE id = {a}"
        ))
        .await
        .expect("tamper");
    let read = app
        .prepare("SELECT c_text FROM typed WHERE id = $1")
        .await
        .expect("prepare");
    let err = app.query_one(&read, &[&a]).await.expect_err("tampered");
    assert_eq!(sqlstate(&err), "KM005", "{err}");
    assert!(
        common::error_message(&err).contains("typed.c_text"),
        "{err}"
    );
    // Cross-tenant guard: a globex cell read in an acme session.
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .expect("set");
    let err = app.query_one(&read, &[&g]).await.expect_err("cross tenant");
    assert_eq!(sqlstate(&err), "KM006", "{err}");
    let ok: i32 = app
        .query_one("SELECT c_int4 FROM typed WHERE id = $1", &[&a])
        .await
        .expect("own row")
        .get(0);
    assert_eq!(ok, 1);
}

/// Raw extended-protocol messages, as some drivers send them.
mod raw {
    use super::common::raw::{message, read_until_ready, send, session};

    pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            body.extend_from_slice(&t.to_be_bytes());
        }
        message(b'P', &body)
    }

    pub fn bind(statement: &str, params: &[Option<&[u8]>], result_format: i16) -> Vec<u8> {
        let mut body = vec![0u8];
        body.extend_from_slice(statement.as_bytes());
        body.push(0);
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&result_format.to_be_bytes());
        message(b'B', &body)
    }

    pub fn execute() -> Vec<u8> {
        message(b'E', b"\0\0\0\0\0")
    }

    pub fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    pub use super::common::raw::BackendMessage;

    /// Sends `bytes` in a new session and reads `cycles` request cycles.
    pub fn run(port: u16, bytes: &[u8], cycles: usize) -> Vec<BackendMessage> {
        let mut s = session(port, "app");
        send(&mut s, bytes);
        (0..cycles).flat_map(|_| read_until_ready(&mut s)).collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn execute_without_any_describe_is_still_decrypted_and_refusals_drain_to_sync() {
    let s = setup().await;
    let app = s.app().await;
    let id: i32 = app
        .query_one(INSERT_TEXT_INT4, &[&"acme", &"undescribed", &42i32])
        .await
        .expect("insert")
        .get(0);
    let port = s.proxy.port();
    let sql = format!("SELECT c_text, c_int4 FROM typed WHERE id = {id}");
    // Parse / Bind / Execute / Sync with no Describe: the client gets only
    // the responses it asked for, with plaintext rows.
    let bytes = unnamed_run(&sql, &[]);
    let got = tokio::task::spawn_blocking(move || raw::run(port, &bytes, 1))
        .await
        .expect("raw session");
    let tags: Vec<u8> = got.iter().map(|m| m.tag).collect();
    assert_eq!(
        tags, b"12DCZ",
        "no injected Describe answer reaches the client"
    );
    let row = &got[2].body;
    assert!(
        row.windows(11).any(|w| w == b"undescribed"),
        "row is plaintext: {row:?}"
    );
    assert!(row.windows(2).any(|w| w == b"42"));

    // A refused Parse in a pipeline: its error, then nothing until Sync,
    // and the statements after it did not run.
    let mut bytes = unnamed_run("SELECT id FROM typed WHERE c_text = 'x'", &[]);
    bytes.extend(unnamed_run("SELECT 7", &[]));
    let got = tokio::task::spawn_blocking(move || raw::run(port, &bytes, 2))
        .await
        .expect("raw session");
    let tags: Vec<u8> = got.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"EZ12DCZ", "{tags:?}");
    assert_eq!(got[0].field(b'C').as_deref(), Some("KM003"));

    // A Bind refused (no tenant) in the middle of a pipeline.
    let mut bytes = raw::parse(
        "w",
        "INSERT INTO typed (tenant_id, c_text) VALUES ($1, $2)",
        &[],
    );
    bytes.extend(raw::bind("w", &[None, Some(b"v")], 0));
    bytes.extend(raw::execute());
    bytes.extend(raw::sync());
    let got = tokio::task::spawn_blocking(move || raw::run(port, &bytes, 1))
        .await
        .expect("raw session");
    let tags: Vec<u8> = got.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"1EZ", "{tags:?}");
    assert_eq!(got[1].field(b'C').as_deref(), Some("KM004"));
}

#[tokio::test(flavor = "multi_thread")]
async fn text_clients_of_a_prepared_statement_get_text_when_the_server_sends_binary() {
    // From the second execution on, the proxy asks the server for the
    // protected columns in binary; the client, which asked for text, must
    // still see format 0 and the plaintext as text.
    let s = setup().await;
    let app = s.app().await;
    let id: i32 = app
        .query_one(
            "INSERT INTO typed (tenant_id, c_text, c_int4, c_date) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&"acme", &"text please", &-42i32, &NaiveDate::from_ymd_opt(2000, 2, 29).unwrap_or_default()],
        )
        .await
        .expect("insert")
        .get(0);
    let port = s.proxy.port();
    let sql = format!("SELECT id, c_text, c_int4, c_date FROM typed WHERE id = {id}");
    let mut bytes = raw::parse("s", &sql, &[]);
    bytes.extend(raw::sync());
    for _ in 0..3 {
        bytes.extend(raw::bind("s", &[], 0));
        bytes.extend(common::raw::message(b'D', b"P\0"));
        bytes.extend(raw::execute());
        bytes.extend(raw::sync());
    }
    let got = tokio::task::spawn_blocking(move || raw::run(port, &bytes, 4))
        .await
        .expect("raw session");
    let descriptions: Vec<&raw::BackendMessage> = got.iter().filter(|m| m.tag == b'T').collect();
    let rows: Vec<&raw::BackendMessage> = got.iter().filter(|m| m.tag == b'D').collect();
    assert_eq!((descriptions.len(), rows.len()), (3, 3), "{got:?}");
    for (description, row) in descriptions.iter().zip(&rows) {
        // Every field's format code (the last two bytes of each field) is text.
        let body = &description.body;
        assert!(body.ends_with(&[0, 0]), "{body:?}");
        let text = String::from_utf8_lossy(&row.body);
        assert!(text.contains("text please"), "{text}");
        assert!(
            text.contains("-42") && text.contains("2000-02-29"),
            "{text}"
        );
    }
}

/// Sends `bytes` on `s` and reads one request cycle, blocking.
fn raw_cycle(s: &mut std::net::TcpStream, bytes: &[u8]) -> Vec<raw::BackendMessage> {
    common::raw::send(s, bytes);
    common::raw::read_until_ready(s)
}

/// An unnamed Parse, Bind of `params`, Execute and Sync.
fn unnamed_run(sql: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    statement_run("", sql, params)
}

/// Parse of statement `name`, Bind of `params`, Execute and Sync.
fn statement_run(name: &str, sql: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    let mut bytes = raw::parse(name, sql, &[]);
    bytes.extend(raw::bind(name, params, 0));
    bytes.extend(raw::execute());
    bytes.extend(raw::sync());
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_unnamed_parse_is_planned_again_after_ddl_and_after_strings_turn_nonstandard() {
    let s = setup().await;
    let port = s.proxy.port();
    let tags = |got: &[raw::BackendMessage]| got.iter().map(|m| m.tag).collect::<Vec<u8>>();
    let got = tokio::task::spawn_blocking(move || {
        let mut c = common::raw::session(port, "app");
        let mut got = Vec::new();
        got.push(raw_cycle(
            &mut c,
            &common::raw::query(
                "CREATE VIEW memo_v AS SELECT id, tenant_id, plain_note AS x FROM typed",
            ),
        ));
        // The proxy remembers this Parse: the view shows no protected column.
        let insert = "INSERT INTO memo_v (tenant_id, x) VALUES ('acme', $1)";
        got.push(raw_cycle(&mut c, &unnamed_run(insert, &[Some(b"first")])));
        got.push(raw_cycle(&mut c, &unnamed_run(insert, &[Some(b"again")])));
        // The same view name now shows a protected column: the same Parse
        // bytes must be planned anew (a write through it is refused), not
        // relayed as remembered, which would store plaintext in c_text.
        got.push(raw_cycle(
            &mut c,
            &common::raw::query(
                "DROP VIEW memo_v; \
                 CREATE VIEW memo_v AS SELECT id, tenant_id, c_text AS x FROM typed",
            ),
        ));
        got.push(raw_cycle(
            &mut c,
            &unnamed_run(insert, &[Some(b"plaintext secret")]),
        ));
        // A read remembered under standard strings is refused once they are
        // off: the proxy may then misread where its backslash ends a string.
        let read = "SELECT plain_note FROM typed WHERE 'a\\' = 'a\\'";
        got.push(raw_cycle(&mut c, &unnamed_run(read, &[])));
        got.push(raw_cycle(&mut c, &unnamed_run(read, &[])));
        got.push(raw_cycle(
            &mut c,
            &common::raw::query("SET standard_conforming_strings = off"),
        ));
        got.push(raw_cycle(&mut c, &unnamed_run(read, &[])));
        got.push(raw_cycle(&mut c, &unnamed_run("SELECT 7", &[])));
        got
    })
    .await
    .expect("raw session");
    assert_eq!(tags(&got[1]), b"12CZ", "{:?}", got[1]);
    assert_eq!(tags(&got[2]), b"12CZ", "{:?}", got[2]);
    assert_eq!(tags(&got[4]), b"EZ", "{:?}", got[4]);
    assert_eq!(got[4][0].field(b'C').as_deref(), Some("KM003"));
    // The two rows the plain view took, read twice.
    assert_eq!(tags(&got[5]), b"12DDCZ", "{:?}", got[5]);
    assert_eq!(tags(&got[6]), b"12DDCZ", "{:?}", got[6]);
    assert_eq!(tags(&got[8]), b"EZ", "{:?}", got[8]);
    assert_eq!(got[8][0].field(b'C').as_deref(), Some("KM003"));
    let message = got[8][0].field(b'M').unwrap_or_default();
    assert!(message.contains("standard_conforming_strings"), "{message}");
    assert_eq!(tags(&got[9]), b"12DCZ", "the session goes on: {:?}", got[9]);
    let stored = count(
        &s.direct,
        "SELECT count(*) FROM typed WHERE position('plaintext secret'::bytea in c_text) > 0",
    )
    .await;
    assert_eq!(stored, 0, "no plaintext in the protected column");
}

/// A Bind of the unnamed statement (no Parse), Execute and Sync.
fn unnamed_bind_run(params: &[Option<&[u8]>]) -> Vec<u8> {
    let mut bytes = raw::bind("", params, 0);
    bytes.extend(raw::execute());
    bytes.extend(raw::sync());
    bytes
}

/// The names of the server's prepared statements, read through `c`.
fn server_statements(c: &mut std::net::TcpStream) -> Vec<String> {
    let got = raw_cycle(
        c,
        &common::raw::query("SELECT name FROM pg_prepared_statements"),
    );
    got.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(m.body.get(6..).unwrap_or_default()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_unnamed_statement_runs_as_the_proxys_own_and_is_parsed_anew_when_lost() {
    let s = setup().await;
    // Drops every prepared statement where the proxy cannot see it.
    s.direct
        .batch_execute(
            "CREATE FUNCTION forget_plans() RETURNS void LANGUAGE plpgsql \
             AS $$BEGIN EXECUTE 'DEALL' || 'OCATE ALL'; END$$",
        )
        .await
        .expect("function");
    let port = s.proxy.port();
    let tags = |got: &[raw::BackendMessage]| got.iter().map(|m| m.tag).collect::<Vec<u8>>();
    let insert =
        "INSERT INTO typed (tenant_id, c_text, c_int4) VALUES ('acme', $1, $2) RETURNING id";
    let read = "SELECT c_text, c_int4 FROM typed WHERE id = $1";
    let (got, statements) = tokio::task::spawn_blocking(move || {
        let mut c = common::raw::session(port, "app");
        let mut got = Vec::new();
        let mut statements = Vec::new();
        for n in 0..3 {
            let note = format!("note {n}");
            got.push(raw_cycle(
                &mut c,
                &unnamed_run(insert, &[Some(note.as_bytes()), Some(b"7")]),
            ));
        }
        // The unnamed statement bound again without a Parse.
        got.push(raw_cycle(
            &mut c,
            &unnamed_bind_run(&[Some(b"note 3"), Some(b"8")]),
        ));
        // DEALLOCATE ALL (a named statement of the client's) drops the
        // proxy's statement, not the client's unnamed one: the next Bind
        // parses it anew, unseen. (A simple query would drop the unnamed
        // statement too, as PostgreSQL does.)
        got.push(raw_cycle(
            &mut c,
            &statement_run("d", "DEALLOCATE ALL", &[]),
        ));
        got.push(raw_cycle(
            &mut c,
            &unnamed_bind_run(&[Some(b"note 4"), Some(b"9")]),
        ));
        // Dropped where the proxy cannot see it: one execution fails with
        // 26000 and stores nothing, the next parses it anew.
        got.push(raw_cycle(
            &mut c,
            &common::raw::query("SELECT forget_plans()"),
        ));
        got.push(raw_cycle(
            &mut c,
            &unnamed_run(insert, &[Some(b"lost"), Some(b"1")]),
        ));
        got.push(raw_cycle(
            &mut c,
            &unnamed_run(insert, &[Some(b"note 5"), Some(b"10")]),
        ));
        // A repeated read, and a Describe of it: the client's parameter and
        // the declared plaintext types of the protected columns.
        let first_id = got[0]
            .iter()
            .find(|m| m.tag == b'D')
            .map(|m| String::from_utf8_lossy(m.body.get(6..).unwrap_or_default()).into_owned());
        let id = first_id.unwrap_or_default();
        for _ in 0..3 {
            got.push(raw_cycle(
                &mut c,
                &unnamed_run(read, &[Some(id.as_bytes())]),
            ));
        }
        let mut describe = raw::parse("", read, &[]);
        describe.extend(common::raw::message(b'D', b"S\0"));
        describe.extend(raw::sync());
        got.push(raw_cycle(&mut c, &describe));
        statements.push(server_statements(&mut c));
        (got, statements)
    })
    .await
    .expect("raw session");
    // Parse (when sent), Bind, the returned id, CommandComplete, Ready.
    for (i, expected) in [
        (0, "12DCZ"),
        (1, "12DCZ"),
        (2, "12DCZ"),
        (3, "2DCZ"),
        (5, "2DCZ"),
        (8, "12DCZ"),
    ] {
        assert_eq!(tags(&got[i]), expected.as_bytes(), "run {i}: {:?}", got[i]);
    }
    assert!(
        statements[0].iter().any(|n| n.starts_with("__cmk_proxy_")),
        "the repeat runs as the proxy's statement: {:?}",
        statements[0]
    );
    assert_eq!(tags(&got[4]), b"12CZ", "{:?}", got[4]);
    assert_eq!(tags(&got[7]), b"1EZ", "{:?}", got[7]);
    assert_eq!(got[7][1].field(b'C').as_deref(), Some("26000"));
    for run in &got[9..12] {
        assert_eq!(tags(run), b"12DCZ", "{run:?}");
        let row = String::from_utf8_lossy(&run[2].body);
        assert!(row.contains("note 0") && row.contains('7'), "{row}");
    }
    assert_eq!(tags(&got[12]), b"1tTZ", "{:?}", got[12]);
    // One parameter (the id, int4), and the columns as their declared
    // plaintext types: text (25) and int4 (23).
    assert_eq!(got[12][1].body, [0, 1, 0, 0, 0, 23]);
    let description = &got[12][2].body;
    let oid_after = |name: &str| {
        let at = description
            .windows(name.len() + 1)
            .position(|w| w[..name.len()] == *name.as_bytes() && w[name.len()] == 0)
            .map(|p| p + name.len() + 1 + 6)
            .unwrap_or_default();
        description
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    assert_eq!(oid_after("c_text"), Some(25));
    assert_eq!(oid_after("c_int4"), Some(23));
    // Every row through the proxy, and none with plaintext at rest.
    let app = s.app().await;
    let notes: Vec<String> = app
        .query("SELECT c_text FROM typed ORDER BY id", &[])
        .await
        .expect("read back")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        notes,
        ["note 0", "note 1", "note 2", "note 3", "note 4", "note 5"]
    );
    let plaintext = count(
        &s.direct,
        "SELECT count(*) FROM typed WHERE position('note'::bytea in c_text) > 0",
    )
    .await;
    assert_eq!(plaintext, 0, "no plaintext in the protected column");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_prepare_repeated_statements_off_every_unnamed_parse_reaches_the_server() {
    let s = EncryptedSetup::start_configured(
        SCHEMA,
        "public.typed",
        COLUMNS,
        "",
        "",
        "server:\n  prepare_repeated_statements: false\n",
    )
    .await;
    let port = s.proxy.port();
    let insert = "INSERT INTO typed (tenant_id, c_text) VALUES ('acme', $1)";
    let statements = tokio::task::spawn_blocking(move || {
        let mut c = common::raw::session(port, "app");
        for _ in 0..3 {
            raw_cycle(&mut c, &unnamed_run(insert, &[Some(b"off")]));
        }
        server_statements(&mut c)
    })
    .await
    .expect("raw session");
    assert!(statements.is_empty(), "{statements:?}");
    let app = s.app().await;
    let rows = app
        .query("SELECT c_text FROM typed", &[])
        .await
        .expect("read back");
    assert_eq!(rows.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_skipped_close_after_a_repeated_read_leaves_no_rewritten_write_to_bind_as_plain() {
    // The first repeat of an unnamed Parse runs as the proxy's statement.
    // The server's unnamed statement must still be replaced (by an empty
    // one): left as the rewritten write before it, a later Bind the proxy
    // relays as plain would store the client's plaintext in c_text.
    let s = setup().await;
    let port = s.proxy.port();
    let tags = |got: &[raw::BackendMessage]| got.iter().map(|m| m.tag).collect::<Vec<u8>>();
    let read = "SELECT c_text FROM typed WHERE id = $1";
    let write = "INSERT INTO typed (tenant_id, c_text) VALUES ('acme', $1)";
    let got = tokio::task::spawn_blocking(move || {
        let mut c = common::raw::session(port, "app");
        let mut got = Vec::new();
        // The read, remembered.
        got.push(raw_cycle(&mut c, &unnamed_run(read, &[Some(b"0")])));
        // The write: the server's unnamed statement is now its rewrite.
        got.push(raw_cycle(&mut c, &unnamed_run(write, &[Some(b"sealed")])));
        // The read again: runs as the proxy's statement, the server's
        // unnamed statement is still the write.
        got.push(raw_cycle(&mut c, &unnamed_run(read, &[Some(b"0")])));
        // An error, then a Close of the unnamed statement the server skips.
        let mut bytes = raw::parse("bad", "SELEC", &[]);
        bytes.extend(common::raw::message(b'C', b"S\0"));
        bytes.extend(raw::sync());
        got.push(raw_cycle(&mut c, &bytes));
        // The proxy no longer knows the unnamed statement and relays a Bind
        // of it unchanged; the server binds the rewritten write (its value,
        // the index and the envelope: three parameters).
        got.push(raw_cycle(
            &mut c,
            &unnamed_bind_run(&[Some(b"plaintext secret"), None, None]),
        ));
        got
    })
    .await
    .expect("raw session");
    assert_eq!(tags(&got[3]), b"EZ", "{:?}", got[3]);
    let stored = count(
        &s.direct,
        "SELECT count(*) FROM typed WHERE position('plaintext secret'::bytea in c_text) > 0",
    )
    .await;
    assert_eq!(stored, 0, "plaintext in the protected column: {:?}", got[4]);
}

/// The tags of each cycle of `cycles` sent on a new raw session to `port`.
fn cycle_tags(port: u16, cycles: &[Vec<u8>]) -> Vec<(Vec<u8>, Option<String>)> {
    let mut c = common::raw::session(port, "app");
    cycles
        .iter()
        .map(|bytes| {
            let got = raw_cycle(&mut c, bytes);
            let code = got
                .iter()
                .find(|m| m.tag == b'E')
                .and_then(|m| m.field(b'C'));
            (got.iter().map(|m| m.tag).collect(), code)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simple_query_drops_the_unnamed_statement_run_as_the_proxys() {
    // PostgreSQL drops the unnamed statement at every simple Query: a Bind
    // of it afterwards fails with 26000, through the proxy too.
    let s = setup().await;
    let write = "INSERT INTO typed (tenant_id, plain_note) VALUES ('acme', $1)";
    let cycles = vec![
        unnamed_run(write, &[Some(b"one")]),
        unnamed_run(write, &[Some(b"two")]),
        common::raw::query("SELECT 1"),
        unnamed_bind_run(&[Some(b"three")]),
    ];
    answers_as_postgresql(&s, cycles, 3, "26000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_unnamed_parse_in_an_aborted_transaction_fails_as_the_servers() {
    // A Parse in an aborted transaction fails with 25P02 (an empty unnamed
    // Parse would pass the check): the repeat is not run as the proxy's.
    let s = setup().await;
    let write = "INSERT INTO typed (tenant_id, plain_note) VALUES ('acme', $1)";
    let mut parse_only = raw::parse("", write, &[]);
    parse_only.extend(raw::sync());
    let cycles = vec![
        unnamed_run(write, &[Some(b"one")]),
        unnamed_run(write, &[Some(b"two")]),
        common::raw::query("BEGIN"),
        common::raw::query("SELECT 1/0"),
        parse_only,
        common::raw::query("ROLLBACK"),
    ];
    answers_as_postgresql(&s, cycles, 4, "25P02").await;
}

/// Sends `cycles` on a new raw session through the proxy and on another
/// straight to PostgreSQL: cycle `at` fails with `sqlstate` at PostgreSQL,
/// and the proxy answers it the same.
async fn answers_as_postgresql(
    s: &EncryptedSetup,
    cycles: Vec<Vec<u8>>,
    at: usize,
    sqlstate: &str,
) {
    let (proxy, direct) = (s.proxy.port(), s.pg.port());
    let (via_proxy, via_pg) = tokio::task::spawn_blocking(move || {
        (cycle_tags(proxy, &cycles), cycle_tags(direct, &cycles))
    })
    .await
    .expect("raw sessions");
    assert_eq!(via_pg[at], (b"EZ".to_vec(), Some(sqlstate.to_owned())));
    assert_eq!(via_proxy[at], via_pg[at], "proxy {via_proxy:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_statement_is_not_parsed_anew_once_strings_are_nonstandard() {
    // The proxy planned the SQL under standard-conforming strings; parsing
    // it again with them off could read its literals otherwise.
    let s = setup().await;
    let port = s.proxy.port();
    let tags = |got: &[raw::BackendMessage]| got.iter().map(|m| m.tag).collect::<Vec<u8>>();
    let read = "SELECT c_text FROM typed WHERE 'a\\' = 'a\\' AND id = $1";
    let got = tokio::task::spawn_blocking(move || {
        let mut c = common::raw::session(port, "app");
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(raw_cycle(&mut c, &unnamed_run(read, &[Some(b"1")])));
        }
        got.push(raw_cycle(
            &mut c,
            &statement_run("d", "DEALLOCATE ALL", &[]),
        ));
        got.push(raw_cycle(
            &mut c,
            &statement_run("s", "SET standard_conforming_strings = off", &[]),
        ));
        got.push(raw_cycle(&mut c, &unnamed_bind_run(&[Some(b"1")])));
        got.push(raw_cycle(&mut c, &unnamed_run("SELECT 7", &[])));
        got
    })
    .await
    .expect("raw session");
    assert_eq!(tags(&got[1]), b"12CZ", "{:?}", got[1]);
    assert_eq!(tags(&got[4]), b"EZ", "{:?}", got[4]);
    assert_eq!(got[4][0].field(b'C').as_deref(), Some("KM003"));
    assert_eq!(tags(&got[5]), b"12DCZ", "the session goes on: {:?}", got[5]);
}
