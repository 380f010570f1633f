//! SQL written to be read one way by the proxy and another by PostgreSQL
//! (issue 14): every payload runs through the proxy in the simple and the
//! extended protocol; afterwards a direct scan of the table finds no cell
//! that is not an envelope, and the client received no envelope bytes.

use crate::common;

use common::encryption::{count, rows, EncryptedSetup};
use tokio_postgres::{Client, SimpleQueryMessage};

pub(crate) const SCHEMA: &str =
    "CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, notes bytea, cmk_edek jsonb)";

pub(crate) const COLUMNS: &[&str] = &["ssn: {type: text, search: equality}", "notes: {type: text}"];

/// Payloads that PostgreSQL reads otherwise than a lexer that does not
/// follow it exactly: dollar quotes with non-ASCII tags, nested comments,
/// escape strings, Unicode escapes, and their combinations.
const CORPUS: &[&str] = &[
    // The issue's payload: a write hidden behind a dollar quote whose tag
    // is not ASCII.
    "WITH w AS (SELECT $§$, '$§$ AS a), c AS (INSERT INTO patients (tenant_id, ssn, notes) \
     VALUES ($$acme$$, $$PLAINTEXT$$, $$PLAINTEXT$$) RETURNING id) SELECT id FROM c --') SELECT 1",
    "WITH w AS (SELECT $é$, '$é$ AS a), c AS (UPDATE patients SET ssn = $$PLAINTEXT$$ \
     WHERE true RETURNING id) SELECT id FROM c --') SELECT 1",
    "WITH w AS (SELECT $日本$, '$日本$ AS a) SELECT encode(ssn, 'hex'), encode(notes, 'base64') \
     FROM patients --') SELECT 1",
    "WITH w AS (SELECT $§$, '$§$ AS a) SELECT id FROM patients WHERE ssn = '\\x00'::bytea \
     --') SELECT 1",
    "WITH w AS (SELECT $§$, '$§$ AS a) SELECT set_config('cmk.tenant_id', 'globex', false) \
     --') SELECT 1",
    "SELECT $§$ $$ $§$; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'PLAINTEXT'); \
     SELECT $$ $$",
    // Nested comments.
    "SELECT 1 /* /* */ ; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'PLAINTEXT') \
     -- */",
    "SELECT 1 /* a /* b */ c */ ; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', \
     'PLAINTEXT')",
    "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', /* /* */ 'x' */ 'PLAINTEXT')",
    // Escape strings.
    "SELECT E'\\'', 'x'; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'PLAINTEXT') \
     --'",
    "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', E'PLAIN\\'TEXT')",
    "SELECT e'\\\\' AS a, encode(ssn, 'hex') FROM patients",
    // Unicode-escaped names and strings.
    "INSERT INTO U&\"p\\0061tients\" (tenant_id, ssn) VALUES ('acme', 'PLAINTEXT')",
    "INSERT INTO patients (tenant_id, U&\"\\0073sn\") VALUES ('acme', 'PLAINTEXT')",
    "SELECT encode(U&\"\\0073sn\", 'hex') FROM patients",
    "UPDATE patients SET U&\"n!006ftes\" UESCAPE '!' = 'PLAINTEXT'",
    "SELECT U&'\\0041' AS a, encode(notes, 'escape') FROM U&\"p\\0061tients\"",
    // Strings continued on the next line, adjacent to names.
    "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'PLAIN'\n'TEXT')",
    "SELECT 'a'\n'b' AS x, encode(ssn, 'hex') FROM patients",
    // Numbers PostgreSQL 16+ reads otherwise than 15.
    "SELECT 0x1F, encode(ssn, 'hex') FROM patients",
    "SELECT 1_000 AS a, encode(ssn, 'hex') FROM patients",
    // A DO block naming the table.
    "DO $$BEGIN INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'PLAINTEXT'); END$$",
];

/// Cells of the raw table that are neither NULL nor an envelope.
const PLAINTEXT_AT_REST: &str = "SELECT count(*) FROM patients WHERE \
    (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) OR \
    (notes IS NOT NULL AND substr(notes, 1, 4) <> '\\x434d4b01'::bytea)";

/// True when a value the client received holds envelope bytes: raw, hex
/// (`encode(…, 'hex')`, bytea output) or base64.
pub(crate) fn carries_an_envelope(text: &str) -> bool {
    text.contains("CMK\u{1}") || text.to_lowercase().contains("434d4b01") || text.contains("Q01LAQ")
}

/// Runs `sql` through the simple protocol; returns every value received.
pub(crate) async fn simple(app: &Client, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let messages = app.simple_query(sql).await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .filter_map(|i| row.get(i).map(str::to_owned))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect())
}

/// Runs `sql` through the extended protocol; returns every text or bytea
/// value received.
pub(crate) async fn extended(
    app: &Client,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = app.query(sql, &[]).await?;
    let mut values = Vec::new();
    for row in rows {
        for i in 0..row.len() {
            if let Ok(Some(text)) = row.try_get::<_, Option<String>>(i) {
                values.push(text);
            } else if let Ok(Some(bytes)) = row.try_get::<_, Option<Vec<u8>>>(i) {
                values.push(String::from_utf8_lossy(&bytes).into_owned());
                values.push(hex::encode(&bytes));
            }
        }
    }
    Ok(values)
}

#[tokio::test]
async fn sql_read_otherwise_than_postgresql_stores_no_plaintext_and_shows_no_ciphertext() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let seed = setup.app().await;
    rows(
        &seed,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '123-45-6789', 'n1'), \
         ('globex', '987-65-4321', 'n2')",
    )
    .await;
    let stored = count(&setup.direct, "SELECT count(*) FROM patients").await;
    assert_eq!(stored, 2);
    for payload in CORPUS {
        for protocol in ["simple", "extended"] {
            let app = setup.app().await;
            let outcome = match protocol {
                "simple" => simple(&app, payload).await,
                _ => extended(&app, payload).await,
            };
            let context = format!("{protocol}: {payload}");
            match &outcome {
                Ok(values) => {
                    for value in values {
                        assert!(!carries_an_envelope(value), "{context}: received {value}");
                    }
                }
                Err(e) => {
                    let code = common::sqlstate(e).unwrap_or_default();
                    // Refused by the proxy, or an error of PostgreSQL's own
                    // (a syntax error, the CHECK constraint): never served.
                    assert!(!code.is_empty(), "{context}: {e:?}");
                }
            }
            assert_eq!(
                count(&setup.direct, PLAINTEXT_AT_REST).await,
                0,
                "{context}: plaintext at rest after {outcome:?}"
            );
            // The hidden set_config did not move the server's tenant.
            let shown = rows(
                &app,
                "SELECT coalesce(current_setting('cmk.tenant_id', true), '')",
            )
            .await;
            assert_eq!(shown[0][0].as_deref(), Some(""), "{context}");
        }
    }
    // Payloads that PostgreSQL reads as plain writes (an E'…' value, a
    // string continued on the next line) were sealed like any write; every
    // row, old and new, reads back through the proxy.
    assert!(count(&setup.direct, "SELECT count(*) FROM patients").await >= stored);
    let read = rows(&seed, "SELECT ssn, notes FROM patients ORDER BY id").await;
    assert_eq!(read[0][0].as_deref(), Some("123-45-6789"));
    assert!(
        read.iter()
            .flatten()
            .flatten()
            .all(|value| !carries_an_envelope(value)),
        "{read:?}"
    );
}

#[tokio::test]
async fn the_issue_payload_is_refused_in_both_protocols_with_km003() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    let payload = CORPUS[0];
    let err = app.simple_query(payload).await.expect_err("simple");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err:?}");
    let err = app.query(payload, &[]).await.expect_err("extended");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err:?}");
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        0
    );
}

#[tokio::test]
async fn deeply_nested_calls_are_refused_at_once_and_stall_no_other_session() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let hostile = setup.app().await;
    let mut others = Vec::new();
    for _ in 0..50 {
        others.push(setup.app().await);
    }
    let nested = |depth: usize, open: &str, close: &str| {
        format!(
            "SELECT ssn FROM patients WHERE id = {}1{}",
            open.repeat(depth),
            close.repeat(depth)
        )
    };
    let attacks = [
        nested(20, "abs(", ")"),
        nested(45, "abs(", ")"),
        nested(60, "ARRAY[", "]"),
        nested(30, "coalesce(1, ", ")"),
        nested(25, "ROW(", ")"),
        nested(5000, "(", ")"),
    ];
    // The others run a steady read each while the hostile session sends
    // every attack in both protocols; each attack is refused and every
    // other session's queries complete (their latency is printed, not
    // asserted: no timed assertions in tests).
    let started = std::time::Instant::now();
    let load = others.iter().map(|client| async move {
        let mut slowest = std::time::Duration::ZERO;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            client
                .simple_query("SELECT 1")
                .await
                .expect("other session");
            slowest = slowest.max(t.elapsed());
        }
        slowest
    });
    let attack = async {
        for sql in &attacks {
            for protocol in ["simple", "extended"] {
                let err = match protocol {
                    "simple" => hostile.simple_query(sql).await.map(|_| ()),
                    _ => hostile.query(sql.as_str(), &[]).await.map(|_| ()),
                }
                .expect_err(protocol);
                let code = common::sqlstate(&err).unwrap_or_default();
                // KM003 from the proxy, or PostgreSQL's own "stack depth"
                // refusal (54001) of SQL nested beyond its parser.
                assert!(
                    code == "KM003" || code == "54001",
                    "{protocol}: {}: {err:?}",
                    &sql[..60]
                );
            }
        }
    };
    let (slowest, ()) = tokio::join!(futures_util::future::join_all(load), attack);
    let worst = slowest.iter().max().copied().unwrap_or_default();
    eprintln!(
        "50 sessions x 20 queries beside the attacks: {:?} in all, slowest query {worst:?}",
        started.elapsed()
    );
    // The hostile session is still usable.
    assert_eq!(rows(&hostile, "SELECT 1").await[0][0].as_deref(), Some("1"));
}

/// Runs `cmk-proxy <args>`; its exit code and output.
fn cmk_proxy(args: &[&str]) -> (Option<i32>, String) {
    common::run_cmk_proxy_code(args)
}

#[tokio::test]
async fn with_the_envelope_check_postgresql_refuses_plaintext_from_server_side_code() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let config = setup.proxy.dir().join("policy.yaml");
    let config = config.to_str().unwrap();
    let app = setup.app().await;
    rows(
        &app,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '123-45-6789', 'n1')",
    )
    .await;
    // serve warned at start; check-config --live names the missing CHECK.
    assert!(
        setup.proxy.log_text().contains("has no CHECK constraint"),
        "{}",
        setup.proxy.log_text()
    );
    let (code, out) = cmk_proxy(&["check-config", "--live", config]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("cmk_envelope_ssn"), "{out}");
    // migrate adds and validates it (the row written through the proxy is
    // an envelope), and running it again changes nothing.
    let (code, out) = cmk_proxy(&["migrate", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("cmk_envelope_notes validated"), "{out}");
    let (code, out) = cmk_proxy(&["check-config", "--live", config]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _) = cmk_proxy(&["migrate", "--config", config]);
    assert_eq!(code, Some(0));

    // Server-side code the proxy cannot see, created directly in
    // PostgreSQL: each tries to store plaintext and PostgreSQL refuses.
    setup
        .direct
        .batch_execute(
            "CREATE FUNCTION sneak(v text) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN \
               EXECUTE 'INSERT INTO pat' || 'ients (tenant_id, ssn) VALUES ($1, convert_to($2, ''UTF8''))' \
               USING 'acme', v; END $f$; \
             CREATE TABLE inbox (tenant_id text, note text); \
             CREATE RULE forward AS ON INSERT TO inbox DO ALSO \
               INSERT INTO patients (tenant_id, notes) VALUES (NEW.tenant_id, convert_to(NEW.note, 'UTF8'))",
        )
        .await
        .unwrap();
    for sql in [
        "SELECT sneak('PLAINTEXT')",
        "DO $$BEGIN EXECUTE 'UPDATE pat' || 'ients SET notes = convert_to(''PLAINTEXT'', ''UTF8'')'; END$$",
        "INSERT INTO inbox VALUES ('acme', 'PLAINTEXT')",
    ] {
        let err = setup.direct.batch_execute(sql).await.expect_err(sql);
        assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"), "{sql}: {err:?}");
    }
    // Through the proxy too: the DO block's dynamic SQL is invisible to it.
    let err = app
        .simple_query(
            "DO $$BEGIN EXECUTE 'UPDATE pat' || 'ients SET ssn = convert_to(''PLAINTEXT'', ''UTF8'')'; END$$",
        )
        .await
        .expect_err("DO through the proxy");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"), "{err:?}");
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    assert_eq!(
        rows(&app, "SELECT ssn, notes FROM patients").await,
        vec![vec![Some("123-45-6789".to_owned()), Some("n1".to_owned())]]
    );
}

#[tokio::test]
async fn migrate_leaves_the_check_not_valid_where_legacy_plaintext_remains() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let config = setup.proxy.dir().join("policy.yaml");
    setup
        .direct
        .batch_execute("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'legacy')")
        .await
        .unwrap();
    let (code, out) = cmk_proxy(&["migrate", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("stays NOT VALID"), "{out}");
    // New plaintext is refused already; the legacy row is still there.
    let err = setup
        .direct
        .batch_execute("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'new')")
        .await
        .expect_err("plaintext insert");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"));
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 1);
}

/// A raw Bind of the unnamed statement: `formats` format codes, then the
/// parameters as (length, bytes).
fn raw_bind(formats: &[i16], params: &[(i32, &[u8])]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(formats.len() as u16).to_be_bytes());
    for f in formats {
        body.extend_from_slice(&f.to_be_bytes());
    }
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for (len, bytes) in params {
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(bytes);
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    common::raw::message(b'B', &body)
}

#[tokio::test]
async fn malformed_binds_are_refused_as_postgresql_refuses_them() {
    use common::raw;
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let mut parse =
        b"\0INSERT INTO patients (tenant_id, ssn, notes) VALUES ($1, $2, $3)\0".to_vec();
    parse.extend_from_slice(&0u16.to_be_bytes());
    let execute = raw::message(b'E', b"\0\0\0\0\0");
    let sync = raw::message(b'S', b"");
    for (what, bind) in [
        (
            "two format codes for three parameters",
            raw_bind(&[0, 0], &[(4, b"acme"), (5, b"PLAIN"), (5, b"PLAIN")]),
        ),
        (
            "a parameter length of -2",
            raw_bind(&[], &[(4, b"acme"), (-2, b""), (5, b"PLAIN")]),
        ),
        (
            "format code 7",
            raw_bind(&[7], &[(4, b"acme"), (5, b"PLAIN"), (5, b"PLAIN")]),
        ),
    ] {
        let mut s = raw::session(setup.proxy.port(), "app");
        let mut batch = raw::message(b'P', &parse);
        batch.extend(bind);
        batch.extend(&execute);
        batch.extend(&sync);
        raw::send(&mut s, &batch);
        let answers = raw::read_until_ready(&mut s);
        let error = answers
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("{what}: no error in {answers:?}"));
        assert_eq!(
            error.field(b'C').as_deref(),
            Some("08P01"),
            "{what}: {answers:?}"
        );
        // The session goes on.
        raw::send(&mut s, &raw::query("SELECT 1"));
        let answers = raw::read_until_ready(&mut s);
        assert!(answers.iter().any(|m| m.tag == b'D'), "{what}: {answers:?}");
    }
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        0
    );
}
