//! COPY on a protected table through the proxy (issue 16, points 2 and 4),
//! against a real PostgreSQL: COPY FROM in text and CSV seals every row,
//! COPY TO prints what PostgreSQL prints for the same plaintext table, a bad
//! row fails the whole COPY with its line number and stores nothing, psql
//! `\copy` both ways, and dump/restore with pg_dump and psql.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;
use common::encryption::{count, keyring, rows, EncryptedSetup};
use common::raw::{self, BackendMessage};

const COLUMNS: &[&str] = &[
    "ssn: {type: text, search: equality}",
    "birth_date: {type: date}",
    "notes: {type: text}",
];

/// The protected table, and a plaintext twin PostgreSQL answers directly.
const SCHEMA: &str = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, birth_date bytea, notes bytea, cmk_edek jsonb); \
    CREATE TABLE plain (id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, \
    birth_date date, notes text)";

const FIELDS: &str = "id, tenant_id, ssn, birth_date, notes";

/// Text-format rows with everything that needs escaping: tabs, newlines
/// and backslashes in values, NULL next to the empty string, octal and hex
/// escapes, unicode.
const TEXT_ROWS: &[u8] = b"1\tacme\t123-45-6789\t1980-01-02\ttab\\there\n\
2\tglobex\t\\N\t\\N\t\n\
3\tacme\t\\x41\\102C\t2000-02-29\tline\\nbreak and back\\\\slash\n\
4\tglobex\t987-65-4321\t1999-12-31\t\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91\n";

/// The same kind of rows in CSV, with a header and quoted newlines.
const CSV_ROWS: &[u8] = b"id,tenant_id,ssn,birth_date,notes\n\
5,acme,\"111-22-3333\",1970-01-01,\"quoted, \"\"comma\"\"\"\n\
6,globex,,,\"\"\n\
7,acme,\\N,2020-05-06,\"multi\nline\r\nvalue\"\n";

async fn setup() -> EncryptedSetup {
    EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await
}

/// A raw session on `port` (trust, user postgres, database app), with the
/// session tenant `tenant`.
fn session(port: u16, tenant: Option<&str>) -> std::net::TcpStream {
    let mut s = raw::connect(port);
    let options = tenant.map(|t| format!("-c cmk.tenant_id={t}"));
    let mut params = vec![("user", "postgres"), ("database", "app")];
    if let Some(options) = &options {
        params.push(("options", options.as_str()));
    }
    raw::send(&mut s, &raw::startup_with(196_608, &params));
    let msgs = raw::read_until_ready(&mut s);
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
    s
}

/// `COPY … FROM STDIN` of `data` cut into messages of `chunk` bytes:
/// every message the server side sent back, up to ReadyForQuery.
fn copy_in(
    port: u16,
    tenant: Option<&str>,
    sql: &str,
    data: &[u8],
    chunk: usize,
) -> Vec<BackendMessage> {
    let mut s = session(port, tenant);
    raw::send(&mut s, &raw::query(sql));
    let mut out = Vec::new();
    loop {
        let m = raw::read_message(&mut s).expect("answer to COPY");
        let tag = m.tag;
        out.push(m);
        match tag {
            b'G' => break,
            b'Z' => return out,
            _ => {}
        }
    }
    for piece in data.chunks(chunk.max(1)) {
        raw::send(&mut s, &raw::message(b'd', piece));
    }
    raw::send(&mut s, &raw::message(b'c', &[]));
    out.extend(raw::read_until_ready(&mut s));
    out
}

/// `COPY … TO STDOUT`: the data, and every message that was not CopyData.
fn copy_out(port: u16, tenant: Option<&str>, sql: &str) -> (Vec<u8>, Vec<BackendMessage>) {
    let mut s = session(port, tenant);
    raw::send(&mut s, &raw::query(sql));
    let mut data = Vec::new();
    let mut others = Vec::new();
    for m in raw::read_until_ready(&mut s) {
        if m.tag == b'd' {
            data.extend_from_slice(&m.body);
        } else {
            others.push(m);
        }
    }
    (data, others)
}

fn error_of(messages: &[BackendMessage]) -> Option<&BackendMessage> {
    messages.iter().find(|m| m.tag == b'E')
}

fn tag_of(messages: &[BackendMessage]) -> Option<String> {
    messages.iter().find(|m| m.tag == b'C').map(|m| {
        String::from_utf8_lossy(m.body.strip_suffix(b"\0").unwrap_or(&m.body)).into_owned()
    })
}

fn ok(messages: &[BackendMessage], context: &str) {
    if let Some(e) = error_of(messages) {
        panic!(
            "{context}: {:?} {:?} {:?}",
            e.field(b'C'),
            e.field(b'M'),
            e.field(b'W')
        );
    }
}

/// Every stored cell of the protected columns is an envelope, every row
/// with one has its EDEK, every ssn its blind index.
async fn assert_only_envelopes(s: &EncryptedSetup) {
    let bad = count(
        &s.direct,
        "SELECT count(*) FROM patients WHERE \
         (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) \
         OR (birth_date IS NOT NULL AND substr(birth_date, 1, 4) <> '\\x434d4b01'::bytea) \
         OR (notes IS NOT NULL AND substr(notes, 1, 4) <> '\\x434d4b01'::bytea) \
         OR cmk_edek IS NULL OR (ssn IS NULL) <> (ssn_bidx IS NULL)",
    )
    .await;
    assert_eq!(
        bad, 0,
        "rows with plaintext, or without EDEK or blind index"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_text_and_csv_seals_every_row_and_copy_out_prints_what_postgresql_prints() {
    let s = setup().await;
    let proxy = s.proxy.port();
    let direct = s.pg.port();
    // Through the proxy the rows arrive cut anywhere: mid-row, mid-escape.
    for (sql, data, chunk) in [
        (format!("COPY patients ({FIELDS}) FROM STDIN"), TEXT_ROWS, 7),
        (
            format!("COPY patients ({FIELDS}) FROM STDIN WITH (FORMAT csv, HEADER)"),
            CSV_ROWS,
            5,
        ),
    ] {
        let answer = copy_in(proxy, None, &sql, data, chunk);
        ok(&answer, &sql);
        let plain_sql = sql.replace("patients", "plain");
        let plain = copy_in(direct, None, &plain_sql, data, 1 << 20);
        ok(&plain, &plain_sql);
        assert_eq!(tag_of(&answer), tag_of(&plain), "{sql}");
    }
    assert_eq!(count(&s.direct, "SELECT count(*) FROM patients").await, 7);
    assert_only_envelopes(&s).await;
    // The client's CopyInResponse shows its own five columns.
    let answer = copy_in(
        proxy,
        None,
        &format!("COPY patients ({FIELDS}) FROM STDIN"),
        b"",
        1,
    );
    let response = answer
        .iter()
        .find(|m| m.tag == b'G')
        .expect("CopyInResponse");
    assert_eq!(response.body, b"\0\0\x05\0\0\0\0\0\0\0\0\0\0");
    // COPY TO through the proxy prints what PostgreSQL prints for the
    // plaintext, byte for byte, in every format.
    for options in [
        "",
        " WITH (FORMAT csv, HEADER)",
        " WITH (FORMAT csv, FORCE_QUOTE *, NULL 'NULL', DELIMITER ';')",
        " WITH (DELIMITER '|', NULL '<null>', HEADER)",
    ] {
        let (ours, others) = copy_out(
            proxy,
            None,
            &format!("COPY (SELECT {FIELDS} FROM patients ORDER BY id) TO STDOUT{options}"),
        );
        ok(&others, options);
        let (theirs, plain) = copy_out(
            direct,
            None,
            &format!("COPY (SELECT {FIELDS} FROM plain ORDER BY id) TO STDOUT{options}"),
        );
        ok(&plain, options);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "COPY TO{options}"
        );
        assert_eq!(tag_of(&others).as_deref(), Some("COPY 7"));
        let response = others
            .iter()
            .find(|m| m.tag == b'H')
            .expect("CopyOutResponse");
        assert_eq!(&response.body[..3], b"\0\0\x05");
    }
    // COPY t (cols) TO: the table's rows, in the table's order.
    let (ours, others) = copy_out(
        proxy,
        None,
        &format!("COPY patients ({FIELDS}) TO STDOUT (FORMAT csv)"),
    );
    ok(&others, "COPY patients TO");
    let (theirs, _) = copy_out(
        direct,
        None,
        &format!("COPY plain ({FIELDS}) TO STDOUT (FORMAT csv)"),
    );
    let sorted = |data: &[u8]| {
        let text = String::from_utf8_lossy(data).into_owned();
        let mut lines: Vec<String> = text.split_inclusive("\n").map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(&ours), sorted(&theirs));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_value_has_the_blind_index_an_insert_gives_it() {
    let s = setup().await;
    let answer = copy_in(
        s.proxy.port(),
        Some("acme"),
        "COPY patients (id, ssn) FROM STDIN (FORMAT csv)",
        b"1,123-45-6789\n",
        3,
    );
    ok(&answer, "COPY with the session tenant");
    let app = s.app().await;
    rows(&app, "SET cmk.tenant_id = 'acme'").await;
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (2, 'acme', '123-45-6789')",
    )
    .await;
    let same = count(
        &s.direct,
        "SELECT count(DISTINCT ssn_bidx) FROM patients WHERE id IN (1, 2)",
    )
    .await;
    assert_eq!(same, 1, "COPY and INSERT wrote different blind indexes");
    let read = rows(&app, "SELECT ssn FROM patients WHERE id = 1").await;
    assert_eq!(read[0][0].as_deref(), Some("123-45-6789"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_row_fails_the_whole_copy_with_its_line_and_stores_nothing() {
    let s = setup().await;
    let proxy = s.proxy.port();
    let sql = format!("COPY patients ({FIELDS}) FROM STDIN");
    let cases: &[(&[u8], &str, &str)] = &[
        (
            b"1\tacme\t1\t2000-01-01\tx\n2\tacme\t2\t2000-01-02\tx\n3\tacme\t3\tnot a date\tx\n4\tacme\t4\t\\N\tx\n",
            "22P02",
            "COPY patients, line 3, column birth_date",
        ),
        (b"1\tacme\t1\t\\N\tx\n2\tacme\t2\n", "22P04", "COPY patients, line 2"),
        (b"1\tacme\t1\t\\N\tx\t9\n", "22P04", "COPY patients, line 1"),
        (
            b"1\tacme\t1\t\\N\tx\n2\t\\N\t2\t\\N\tx\n",
            "KM004",
            "COPY patients, line 2, column tenant_id",
        ),
        (b"1\tnobody\t1\t\\N\tx\n", "KM00", "COPY patients, line 1"),
        // An unprotected field is PostgreSQL's to read: its own error, its
        // CONTEXT without the quoted upstream line (ciphertext).
        (
            b"1\tacme\t1\t\\N\tx\nabc\tacme\t2\t\\N\tx\n",
            "22P02",
            "COPY patients, line 2, column id",
        ),
    ];
    for (data, code, context) in cases {
        let answer = copy_in(proxy, None, &sql, data, 4);
        let error = error_of(&answer).unwrap_or_else(|| panic!("{context}: no error: {answer:?}"));
        let got = error.field(b'C').unwrap_or_default();
        assert!(
            got.starts_with(code),
            "{context}: {got} {:?}",
            error.field(b'M')
        );
        assert_eq!(
            error.field(b'W').as_deref(),
            Some(*context),
            "{:?}",
            error.field(b'M')
        );
        assert_eq!(
            count(&s.direct, "SELECT count(*) FROM patients").await,
            0,
            "{context}"
        );
    }
    // A row of another tenant than the session's.
    let answer = copy_in(
        proxy,
        Some("acme"),
        &sql,
        b"1\tacme\t1\t\\N\tx\n2\tglobex\t2\t\\N\tx\n",
        64,
    );
    let error = error_of(&answer).expect("tenant disagreement");
    assert_eq!(error.field(b'C').as_deref(), Some("KM004"));
    assert_eq!(
        error.field(b'W').as_deref(),
        Some("COPY patients, line 2, column tenant_id")
    );
    // Refused before any data: no tenant at all, binary format.
    for (sql, code) in [
        ("COPY patients (id, ssn) FROM STDIN", "KM004"),
        (
            "COPY patients (id, tenant_id, ssn) FROM STDIN (FORMAT binary)",
            "KM003",
        ),
        ("COPY patients FROM STDIN", "KM003"),
    ] {
        let answer = copy_in(proxy, None, sql, b"1\tacme\t1\n", 64);
        assert!(
            answer.iter().all(|m| m.tag != b'G'),
            "{sql}: CopyInResponse sent"
        );
        assert_eq!(
            error_of(&answer).and_then(|e| e.field(b'C')).as_deref(),
            Some(code),
            "{sql}"
        );
    }
    // The client's CopyFail is relayed: PostgreSQL fails the COPY.
    let mut c = session(proxy, None);
    raw::send(&mut c, &raw::query(&sql));
    assert_eq!(raw::read_message(&mut c).map(|m| m.tag), Some(b'G'));
    raw::send(&mut c, &raw::message(b'd', b"1\tacme\t1\t\\N\tx\n"));
    raw::send(&mut c, &raw::message(b'f', b"client gave up\0"));
    let answer = raw::read_until_ready(&mut c);
    assert_eq!(
        error_of(&answer).and_then(|e| e.field(b'C')).as_deref(),
        Some("57014")
    );
    // The session goes on.
    raw::send(&mut c, &raw::query("SELECT 1"));
    ok(&raw::read_until_ready(&mut c), "after CopyFail");
    assert_eq!(count(&s.direct, "SELECT count(*) FROM patients").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_out_of_a_revoked_tenants_row_ends_with_km001() {
    let s = setup().await;
    let data = b"1\tacme\t1\t\\N\ta\n2\tglobex\t2\t\\N\tb\n";
    ok(
        &copy_in(
            s.proxy.port(),
            None,
            &format!("COPY patients ({FIELDS}) FROM STDIN"),
            data,
            64,
        ),
        "load",
    );
    keyring(&s.ring(), "disable", "globex");
    let sql = "COPY (SELECT id, notes FROM patients ORDER BY id) TO STDOUT";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, others) = copy_out(s.proxy.port(), None, sql);
        if let Some(error) = error_of(&others) {
            assert_eq!(error.field(b'C').as_deref(), Some("KM001"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "globex never refused");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // acme's rows alone are still served.
    let (data, others) = copy_out(
        s.proxy.port(),
        None,
        "COPY (SELECT id, notes FROM patients WHERE tenant_id = 'acme') TO STDOUT",
    );
    ok(&others, "acme");
    assert_eq!(data, b"1\ta\n");
}

fn pg_bin(name: &str) -> PathBuf {
    crate::encryption_at_rest::pg_dump_bin().with_file_name(name)
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn psql(port: u16, db: &str) -> Command {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args([
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        db,
    ])
    .arg("-p")
    .arg(port.to_string());
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_copy_both_ways_round_trips_through_the_proxy() {
    let s = setup().await;
    let dir = s.dir.path();
    let input = dir.join("in.csv");
    std::fs::write(
        &input,
        &CSV_ROWS[CSV_ROWS.iter().position(|b| *b == b'\n').unwrap_or(0) + 1..],
    )
    .unwrap();
    let copy_in = format!(
        "\\copy patients ({FIELDS}) from '{}' with (format csv)",
        input.display()
    );
    let (done, out, err) = run(psql(s.proxy.port(), "app").arg("-c").arg(&copy_in));
    assert!(done, "{out}{err}");
    assert!(out.contains("COPY 3"), "{out}");
    assert_only_envelopes(&s).await;
    let output = dir.join("out.csv");
    let copy_out = format!(
        "\\copy (SELECT {FIELDS} FROM patients ORDER BY id) to '{}' with (format csv)",
        output.display()
    );
    let (done, out, err) = run(psql(s.proxy.port(), "app").arg("-c").arg(&copy_out));
    assert!(done, "{out}{err}");
    // PostgreSQL's own \copy of the same file into the plaintext twin.
    let plain_output = dir.join("plain.csv");
    let plain_out = copy_out.replace("patients", "plain").replace(
        &output.display().to_string(),
        &plain_output.display().to_string(),
    );
    for command in [copy_in.replace("patients", "plain"), plain_out] {
        let (done, out, err) = run(psql(s.pg.port(), "app").arg("-c").arg(&command));
        assert!(done, "{out}{err}");
    }
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&output).unwrap()),
        String::from_utf8_lossy(&std::fs::read(&plain_output).unwrap())
    );
}

/// A plaintext database `legacy` with the patients of two tenants.
fn plaintext_database(s: &EncryptedSetup) {
    s.pg.create_database("legacy").expect("create legacy");
    s.pg.psql(
        "legacy",
        "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, \
         birth_date date, notes text); \
         INSERT INTO patients VALUES (1, 'acme', '123-45-6789', '1980-01-02', E'tab\\there'), \
         (2, 'globex', NULL, NULL, ''), (3, 'acme', '555', '2001-02-03', E'multi\\nline \\\\ é');",
    )
    .expect("legacy data");
}

/// `pg_dump --data-only` of `db`: of table patients (`table`: pg_dump finds
/// it with `relkind OPERATOR(pg_catalog.=) ANY (…) AND relname
/// OPERATOR(pg_catalog.~) '^(patients)$'`), else of schema public.
fn dump(port: u16, db: &str, file: &Path, table: bool) -> (bool, String, String) {
    let selection = if table {
        ["-t", "patients"]
    } else {
        ["-n", "public"]
    };
    run(Command::new(pg_bin("pg_dump"))
        .arg("--data-only")
        .args(selection)
        .args(["-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-f")
        .arg(file)
        .arg(db))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_dump_restored_through_the_proxy_is_encrypted_and_dumps_back_through_it() {
    let s = setup().await;
    plaintext_database(&s);
    let file = s.dir.path().join("legacy.sql");
    let (done, out, err) = dump(s.pg.port(), "legacy", &file, true);
    assert!(done, "{out}{err}");
    let (done, out, err) = run(psql(s.proxy.port(), "app").arg("-f").arg(&file));
    assert!(done, "restore through the proxy: {out}{err}");
    assert_eq!(count(&s.direct, "SELECT count(*) FROM patients").await, 3);
    assert_only_envelopes(&s).await;
    let app = s.app().await;
    let (legacy, conn) = common::connect(&s.pg.admin_url("legacy")).await;
    std::mem::forget(conn);
    let select = format!("SELECT {FIELDS} FROM patients ORDER BY id");
    assert_eq!(rows(&app, &select).await, rows(&legacy, &select).await);
    // pg_dump -t through the proxy: plaintext for approving tenants.
    let back = s.dir.path().join("back.sql");
    let (done, out, err) = dump(s.proxy.port(), "app", &back, true);
    assert!(done, "pg_dump through the proxy: {out}{err}");
    let text = std::fs::read_to_string(&back).unwrap();
    assert!(text.contains("123-45-6789"), "{text}");
    assert!(
        !text.contains("\\\\x434d4b01"),
        "ciphertext in the dump: {text}"
    );
    // That dump restores through the proxy: the EDEK and blind-index
    // columns it names come out NULL and are written anew.
    rows(&s.direct, "TRUNCATE patients").await;
    let (done, out, err) = run(psql(s.proxy.port(), "app").arg("-f").arg(&back));
    assert!(done, "restore of the proxy's dump: {out}{err}");
    assert_only_envelopes(&s).await;
    assert_eq!(rows(&app, &select).await, rows(&legacy, &select).await);
    // …and KM001 once a tenant is revoked.
    keyring(&s.ring(), "disable", "globex");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (done, out, err) = dump(s.proxy.port(), "app", &back, false);
        if !done {
            assert!(
                err.contains("KM001") || err.contains("revoked"),
                "{out}{err}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "globex never refused");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Streams `rows` rows of about 1 KiB (a protected ssn, an unprotected
/// payload) in 64 KiB CopyData messages whose cuts fall anywhere in a row.
fn stream_rows(port: u16, rows: usize) -> Vec<BackendMessage> {
    let mut s = session(port, Some("acme"));
    raw::send(
        &mut s,
        &raw::query("COPY big (id, ssn, payload) FROM STDIN"),
    );
    let first = raw::read_message(&mut s).expect("answer to COPY");
    assert_eq!(first.tag, b'G', "{:?}", first.field(b'M'));
    let payload = "x".repeat(1000);
    let mut buffer = Vec::with_capacity(1 << 17);
    for id in 0..rows {
        buffer.extend_from_slice(format!("{id}\t{:09}\t{payload}\n", id % 1000).as_bytes());
        if buffer.len() >= 1 << 16 {
            let cut = (1 << 16) - (id % 97);
            raw::send(&mut s, &raw::message(b'd', &buffer[..cut]));
            buffer.drain(..cut);
        }
    }
    raw::send(&mut s, &raw::message(b'd', &buffer));
    raw::send(&mut s, &raw::message(b'c', &[]));
    raw::read_until_ready(&mut s)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_mb_copy_streams_through_the_proxy_in_bounded_memory() {
    let s = EncryptedSetup::start(
        "CREATE TABLE big (id int, tenant_id text NOT NULL, ssn bytea, ssn_bidx bytea, \
         payload text, cmk_edek jsonb)",
        "public.big",
        &["ssn: {type: text, search: equality}"],
    )
    .await;
    // Warm up (keys approved, buffers at their working size) before the
    // baseline.
    ok(&stream_rows(s.proxy.port(), 1_000), "warm-up");
    let before = s.proxy.hwm_kib();
    let rows = 200_000;
    let answer = stream_rows(s.proxy.port(), rows);
    ok(&answer, "200 MB COPY");
    assert_eq!(tag_of(&answer), Some(format!("COPY {rows}")));
    let grown = s.proxy.hwm_kib().saturating_sub(before);
    println!("proxy peak RSS before {before} KiB, growth {grown} KiB for ~200 MB");
    assert!(
        grown <= 64 * 1024,
        "the proxy's peak RSS grew by {grown} KiB"
    );
    assert_eq!(
        count(
            &s.direct,
            "SELECT count(*) FROM big WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea"
        )
        .await,
        rows as i64 + 1_000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_cursor_copy_both_ways_through_the_proxy() {
    let python = common::clients::repo().join(".venv/bin/python");
    common::clients::require(&python, "Python venv (.venv with psycopg)");
    let script = common::clients::repo().join("integration/python/copy.py");
    let s = setup().await;
    let (done, out, err) = run(Command::new(&python)
        .arg(&script)
        .arg(s.proxy.url("postgres", "", "app"))
        .arg(s.pg.admin_url("app")));
    assert!(done, "{out}{err}");
    assert!(out.contains("psycopg copy ok"), "{out}{err}");
}

/// tokio-postgres's `copy_in`/`copy_out` run COPY through the extended
/// protocol: on a table without protected columns the encrypting proxy
/// passes them through and the session goes on; on the protected table
/// they are refused (KM003) before any row is sent, and nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_copy_passes_on_plain_tables_and_is_refused_on_protected_ones() {
    use futures_util::{SinkExt, TryStreamExt};
    let s = setup().await;
    let app = s.app().await;
    let sink = app
        .copy_in("COPY plain (id, tenant_id, ssn) FROM STDIN")
        .await
        .expect("extended COPY into an unprotected table");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tacme\t111\n2\tglobex\t222\n"))
        .await
        .expect("rows");
    assert_eq!(sink.finish().await.expect("copy done"), 2);
    let chunks: Vec<bytes::Bytes> = app
        .copy_out("COPY (SELECT id, ssn FROM plain ORDER BY id) TO STDOUT")
        .await
        .expect("extended COPY out")
        .try_collect()
        .await
        .expect("rows out");
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out, b"1\t111\n2\t222\n");
    // The session goes on, in both protocols.
    assert_eq!(count(&app, "SELECT count(*) FROM plain").await, 2);
    let n: i64 = app
        .query_one("SELECT count(*) FROM plain WHERE id = $1", &[&1i32])
        .await
        .expect("extended query after COPY")
        .get(0);
    assert_eq!(n, 1);

    let refused = app
        .copy_in::<_, bytes::Bytes>(&*format!("COPY patients ({FIELDS}) FROM STDIN"))
        .await
        .err()
        .expect("extended COPY into a protected table is refused");
    assert_eq!(refused.code().map(|c| c.code()), Some("KM003"), "{refused}");
    assert_eq!(count(&s.direct, "SELECT count(*) FROM patients").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM plain").await, 2);
}
