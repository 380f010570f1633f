//! Encryption at rest, proven from the outside: after writes through the
//! proxy (simple query protocol: multi-row INSERT, UPDATE, upsert), neither
//! the tables read directly from PostgreSQL, nor the cluster's files (heap
//! with dead tuples, WAL, server log), nor the proxy's log and audit trail,
//! nor a `pg_dump` of the database contain any plaintext (or its hex); every
//! protected row carries the EDEK of its cells;
//! and `cmk-proxy decrypt-dump` recovers exactly the written values from the
//! dump and the tenants' keys alone (PostgreSQL stopped), refuses a tenant
//! whose key is disabled (crypto-shredding) while still recovering the others,
//! and reports tampered cells, missing EDEKs and unknown tenants.

use crate::common;

use crate::support::moto;
use common::encryption::{keyring, rows};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCHEMA: &str = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, \
    label text, ssn bytea, ssn_bidx bytea, birth_date bytea, visits bytea, balance bytea, \
    profile bytea, seen_at bytea, notes bytea, cmk_edek jsonb)";

/// Result columns, in table order (without the blind index and the EDEK).
const COLUMNS: [&str; 10] = [
    "id",
    "tenant_id",
    "label",
    "ssn",
    "birth_date",
    "visits",
    "balance",
    "profile",
    "seen_at",
    "notes",
];
const PROTECTED: [&str; 7] = [
    "ssn",
    "birth_date",
    "visits",
    "balance",
    "profile",
    "seen_at",
    "notes",
];

/// Plaintexts that must never be found at rest (every protected value ever
/// written, including the ones later overwritten).
const MARKERS: [&str; 20] = [
    "SSN-ACME-MARKER-0001",
    "SSN-GLOBEX-MARKER-0002",
    "SSN-GLOBEX-MARKER-UPSERTED",
    "SSN-ACME-MARKER-0003",
    "SSN-ACME-MARKER-0005",
    "1931-07-19",
    "1942-11-23",
    "1957-05-06",
    "7340023",
    "8812345",
    "4242421",
    "98765.4321",
    "0.000317",
    "PEANUT-MARKER-ACME",
    "GLOBEX-TAG-MARKER",
    "2031-02-03 04:05:06",
    "2032-08-09 10:11:12",
    "NOTE-ACME-MARKER-ORIGINAL",
    "NOTE-ACME-MARKER-UPDATED",
    "NOTE-GLOBEX-MARKER",
];

/// A protected note with characters that COPY escapes and JSON quotes.
const GLOBEX_NOTE_2: &str = "NOTE-GLOBEX-MARKER-2\ttab\nnewline \\ backslash ' quote \u{fc}";
/// An unprotected label with the same kind of characters (COPY unescaping).
const LABEL_1: &str = "label\tone\nline two \\ back";

const TABLES_YAML: &str =
    "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n\
     \x20     ssn: {type: text, search: equality}\n\
     \x20     birth_date: {type: date}\n\
     \x20     visits: {type: int4}\n\
     \x20     balance: {type: numeric}\n\
     \x20     profile: {type: jsonb}\n\
     \x20     seen_at: {type: timestamptz}\n\
     \x20     notes: {type: text}\n";

fn policy(keyring: &Path, audit: &Path) -> String {
    format!(
        "keys:\n  approval_ttl: 5s\n  providers:\n    local: {{kind: local, path: {}}}\n\
         audit: {{sink: {{kind: file, path: {}}}}}\n\
         tenants:\n  acme: {{provider: local, key: acme}}\n  globex: {{provider: local, key: globex}}\n\
         {TABLES_YAML}",
        keyring.display(),
        audit.display()
    )
}

fn cmk_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .output()
        .expect("run cmk-proxy")
}

/// Where pg_dump is: `pg_config --bindir`, the newest /usr/lib/postgresql/*/bin, PATH
/// (the same search as `localpg`).
pub(crate) fn pg_dump_bin() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("pg_dump").is_file() {
            return dir.join("pg_dump");
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin").join("pg_dump");
            bin.is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .unwrap_or_else(|| PathBuf::from("pg_dump"))
}

type Row = BTreeMap<String, Option<String>>;

fn row(values: [(&str, Option<&str>); 10]) -> Row {
    values
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
        .collect()
}

fn quote(v: Option<&str>) -> String {
    match v {
        Some(s) => format!("'{}'", s.replace('\'', "''")),
        None => "NULL".to_owned(),
    }
}

/// `(v1, v2, ...)` of a modelled row, in `COLUMNS` order.
fn values_sql(r: &Row) -> String {
    let vals: Vec<String> = COLUMNS.iter().map(|c| quote(r[*c].as_deref())).collect();
    format!("({})", vals.join(", "))
}

/// The plaintext model of the table after all writes, keyed by id.
fn written_rows() -> (Vec<Row>, BTreeMap<String, Row>) {
    let inserted = vec![
        row([
            ("id", Some("1")),
            ("tenant_id", Some("acme")),
            ("label", Some(LABEL_1)),
            ("ssn", Some("SSN-ACME-MARKER-0001")),
            ("birth_date", Some("1931-07-19")),
            ("visits", Some("7340023")),
            ("balance", Some("98765.4321")),
            ("profile", Some(r#"{"allergy": "PEANUT-MARKER-ACME"}"#)),
            ("seen_at", Some("2031-02-03 04:05:06+00")),
            ("notes", Some("NOTE-ACME-MARKER-ORIGINAL")),
        ]),
        row([
            ("id", Some("2")),
            ("tenant_id", Some("globex")),
            ("label", Some("plain two")),
            ("ssn", Some("SSN-GLOBEX-MARKER-0002")),
            ("birth_date", Some("1942-11-23")),
            ("visits", Some("-8812345")),
            ("balance", Some("-0.000317")),
            ("profile", Some(r#"{"tag": "GLOBEX-TAG-MARKER"}"#)),
            ("seen_at", Some("2032-08-09 10:11:12+00")),
            ("notes", Some(GLOBEX_NOTE_2)),
        ]),
        row([
            ("id", Some("3")),
            ("tenant_id", Some("acme")),
            ("label", None),
            ("ssn", Some("SSN-ACME-MARKER-0003")),
            ("birth_date", None),
            ("visits", None),
            ("balance", None),
            ("profile", None),
            ("seen_at", None),
            ("notes", None),
        ]),
        row([
            ("id", Some("4")),
            ("tenant_id", Some("globex")),
            ("label", Some("no protected value")),
            ("ssn", None),
            ("birth_date", None),
            ("visits", None),
            ("balance", None),
            ("profile", None),
            ("seen_at", None),
            ("notes", None),
        ]),
    ];
    let mut model: BTreeMap<String, Row> = inserted
        .iter()
        .map(|r| (r["id"].clone().expect("id"), r.clone()))
        .collect();
    // UPDATE of row 1.
    let r1 = model.get_mut("1").expect("row 1");
    r1.insert("notes".into(), Some("NOTE-ACME-MARKER-UPDATED".into()));
    r1.insert("visits".into(), Some("4242421".into()));
    // Upsert hitting row 2.
    let r2 = model.get_mut("2").expect("row 2");
    r2.insert("ssn".into(), Some("SSN-GLOBEX-MARKER-UPSERTED".into()));
    r2.insert("notes".into(), Some("NOTE-GLOBEX-MARKER-UPSERTED".into()));
    // Upsert inserting row 5.
    model.insert(
        "5".into(),
        row([
            ("id", Some("5")),
            ("tenant_id", Some("acme")),
            ("label", Some("upserted")),
            ("ssn", Some("SSN-ACME-MARKER-0005")),
            ("birth_date", Some("1957-05-06")),
            ("visits", Some("0")),
            ("balance", Some("12.50")),
            ("profile", Some("[]")),
            ("seen_at", Some("2031-02-03 04:05:06+00")),
            ("notes", Some("NOTE-ACME-MARKER-5")),
        ]),
    );
    (inserted, model)
}

/// Every marker, as text and as the lowercase hex a bytea would show.
fn needles() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for m in MARKERS.iter().copied().chain(["NOTE-GLOBEX-MARKER-2"]) {
        out.push((m.to_owned(), m.as_bytes().to_vec()));
        let hex: String = m.bytes().map(|b| format!("{b:02x}")).collect();
        out.push((format!("hex of {m}"), hex.into_bytes()));
    }
    out
}

fn assert_no_marker(what: &str, haystack: &[u8]) {
    // Markers are ASCII: a lossy UTF-8 view keeps them intact and lets the
    // (optimised) std substring search scan large binary files quickly.
    let text = String::from_utf8_lossy(haystack);
    for (name, needle) in needles() {
        let needle = std::str::from_utf8(&needle).expect("ASCII marker");
        assert!(
            !text.contains(needle),
            "plaintext marker {name:?} found in {what}"
        );
    }
}

/// Every file under `dir` (the cluster: heap files with their dead tuples, WAL, server log).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// Runs decrypt-dump; returns (exit code, rows by id, stderr).
fn decrypt_dump(
    policy: &Path,
    dump: &Path,
    extra: &[&str],
) -> (i32, BTreeMap<String, Row>, String) {
    let mut args = vec!["decrypt-dump", "--config", policy.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    args.push(dump.to_str().expect("utf-8"));
    let out = cmk_proxy(&args);
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut by_id = BTreeMap::new();
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["table"], "public.patients", "{line}");
        let obj = v["row"].as_object().expect("row object");
        let names: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut sorted_cols: Vec<&str> = COLUMNS.to_vec();
        sorted_cols.sort();
        assert_eq!(
            names, sorted_cols,
            "the EDEK and blind-index columns are left out: {line}"
        );
        assert_eq!(v["tenant"], obj["tenant_id"], "{line}");
        let r: Row = obj
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
            .collect();
        by_id.insert(r["id"].clone().expect("id"), r);
    }
    (out.status.code().unwrap_or(-1), by_id, stderr)
}

fn of_tenant(model: &BTreeMap<String, Row>, tenant: &str) -> BTreeMap<String, Row> {
    model
        .iter()
        .filter(|(_, r)| r["tenant_id"].as_deref() == Some(tenant))
        .map(|(k, r)| (k.clone(), r.clone()))
        .collect()
}

/// Rewrites the data line of row `id` in the patients COPY block of `dump`.
fn edit_row(dump: &str, id: &str, edit: impl Fn(&[&str], &mut Vec<String>)) -> String {
    let mut out = Vec::new();
    let mut header: Option<Vec<String>> = None;
    let mut done = false;
    for line in dump.split('\n') {
        if let Some(cols) = &header {
            if line == "\\." {
                header = None;
            } else if line.split('\t').next() == Some(id) {
                let names: Vec<&str> = cols.iter().map(String::as_str).collect();
                let mut fields: Vec<String> = line.split('\t').map(str::to_owned).collect();
                edit(&names, &mut fields);
                out.push(fields.join("\t"));
                done = true;
                continue;
            }
        } else if let Some(rest) = line.strip_prefix("COPY public.patients (") {
            let cols = rest.split(')').next().expect("column list");
            header = Some(cols.split(", ").map(str::to_owned).collect());
        }
        out.push(line.to_owned());
    }
    assert!(done, "row {id} not found in the dump");
    out.join("\n")
}

/// Writes `dump` with row `id` edited (see `edit_row`) to `dir/name`.
fn write_edited_dump(
    dir: &Path,
    name: &str,
    dump: &str,
    id: &str,
    edit: impl Fn(&[&str], &mut Vec<String>),
) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, edit_row(dump, id, edit))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn field_index(names: &[&str], name: &str) -> usize {
    names
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no column {name} in {names:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_plaintext_at_rest_or_in_a_dump_and_the_dump_decrypts_with_the_tenant_keys_alone() {
    let pg = common::pg();
    let (direct, conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let ring = dir.path().join("keyring.json");
    keyring(&ring, "create", "acme");
    keyring(&ring, "create", "globex");
    let policy_text = policy(&ring, &dir.path().join("audit.jsonl"));
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, &policy_text).expect("write policy");
    let proxy = common::start_proxy(&pg, &policy_text);
    let (app, app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;

    // ---- writes through the proxy (simple query protocol) --------------------
    let (inserted, model) = written_rows();
    let values: Vec<String> = inserted.iter().map(values_sql).collect();
    rows(
        &app,
        &format!(
            "INSERT INTO patients ({}) VALUES {}",
            COLUMNS.join(", "),
            values.join(", ")
        ),
    )
    .await;
    rows(
        &app,
        "UPDATE patients SET notes = 'NOTE-ACME-MARKER-UPDATED', visits = 4242421 \
         WHERE id = 1 AND tenant_id = 'acme'",
    )
    .await;
    for upsert in [
        "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES \
         (2, 'globex', 'SSN-GLOBEX-MARKER-UPSERTED', 'NOTE-GLOBEX-MARKER-UPSERTED') \
         ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn, notes = EXCLUDED.notes",
        "INSERT INTO patients (id, tenant_id, label, ssn, birth_date, visits, balance, profile, seen_at, notes) \
         VALUES (5, 'acme', 'upserted', 'SSN-ACME-MARKER-0005', '1957-05-06', '0', '12.50', '[]', \
         '2031-02-03 04:05:06+00', 'NOTE-ACME-MARKER-5') \
         ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes",
    ] {
        rows(&app, upsert).await;
    }

    // The proxy reads back exactly the model (so the model holds the canonical forms).
    let through_proxy = rows(
        &app,
        &format!("SELECT {} FROM patients ORDER BY id", COLUMNS.join(", ")),
    )
    .await;
    let read: BTreeMap<String, Row> = through_proxy
        .into_iter()
        .map(|vals| {
            let r: Row = COLUMNS.iter().map(|c| c.to_string()).zip(vals).collect();
            (r["id"].clone().expect("id"), r)
        })
        .collect();
    assert_eq!(read, model, "plaintext through the proxy");
    drop(app);
    app_conn.abort();

    // ---- (1) direct reads: no plaintext in any table, an EDEK per row --------
    // Every table of the database (patients, the cmk registry, anything else).
    let tables: Vec<(String, String)> = direct
        .query(
            "SELECT table_schema::text, table_name::text FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
             AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for want in [
        ("public", "patients"),
        ("cmk", "tenants"),
        ("cmk", "data_keys"),
    ] {
        assert!(
            tables.iter().any(|(s, t)| (s.as_str(), t.as_str()) == want),
            "{want:?} in {tables:?}"
        );
    }
    for (schema, table) in &tables {
        let read = direct
            .query(
                &format!("SELECT t::text FROM \"{schema}\".\"{table}\" t"),
                &[],
            )
            .await
            .expect("read table");
        if (schema.as_str(), table.as_str()) == ("public", "patients") {
            assert_eq!(read.len(), model.len());
        }
        for r in read {
            let whole: String = r.get(0);
            assert_no_marker(
                &format!("a row of {schema}.{table} read directly"),
                whole.as_bytes(),
            );
        }
    }
    let registry: BTreeMap<String, String> = direct
        .query("SELECT dek_id::text, tenant_id FROM cmk.data_keys", &[])
        .await
        .expect("data keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let raw = direct
        .query(
            &format!(
                "SELECT id, tenant_id, {}, cmk_edek FROM patients ORDER BY id",
                PROTECTED.join(", ")
            ),
            &[],
        )
        .await
        .expect("raw rows");
    assert_eq!(raw.len(), model.len());
    let mut cells = 0;
    for r in &raw {
        let id: i32 = r.get(0);
        let tenant: String = r.get(1);
        let edek: Option<serde_json::Value> = r.get(PROTECTED.len() + 2);
        for (i, column) in PROTECTED.iter().enumerate() {
            let cell: Option<Vec<u8>> = r.get(i + 2);
            let expected = &model[&id.to_string()][*column];
            assert_eq!(
                cell.is_none(),
                expected.is_none(),
                "row {id} {column}: NULL stays NULL, values are never NULL"
            );
            let Some(cell) = cell else { continue };
            cells += 1;
            assert_eq!(&cell[..4], b"CMK\x01", "row {id} {column} is an envelope");
            let dek_id = uuid::Uuid::from_slice(&cell[4..20])
                .expect("dek id")
                .to_string();
            let edek = edek
                .as_ref()
                .unwrap_or_else(|| panic!("row {id} has cells but no EDEK"));
            let wrapped = edek[&dek_id].as_str().unwrap_or_default();
            assert!(
                wrapped.len() > 20,
                "row {id} {column}: cmk_edek {edek} has no EDEK for the cell's data key {dek_id}"
            );
            assert_eq!(
                registry.get(&dek_id),
                Some(&tenant),
                "row {id}: the data key {dek_id} is registered to the row's tenant"
            );
        }
    }
    assert_eq!(
        cells,
        7 + 7 + 1 + 7,
        "every non-NULL protected value was checked"
    );

    // The cluster's own files: table and index files (with the dead tuples left
    // by UPDATE and upsert), the WAL and the server log.
    direct
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    let mut files = Vec::new();
    files_under(pg.data_dir(), &mut files);
    assert!(files.iter().any(|f| f.to_string_lossy().contains("pg_wal")));
    let mut scanned = 0;
    let mut control_seen = false;
    for file in &files {
        if let Ok(bytes) = std::fs::read(file) {
            scanned += bytes.len();
            assert_no_marker(&format!("the cluster file {}", file.display()), &bytes);
            control_seen |= String::from_utf8_lossy(&bytes).contains("no protected value");
        }
    }
    assert!(
        scanned > 1 << 20,
        "scanned only {scanned} bytes of the cluster"
    );
    assert!(
        control_seen,
        "control: the unprotected label of row 4 is in the cluster files, so the scan sees table data"
    );
    // Neither the proxy's log nor its audit trail carries values.
    assert_no_marker("the proxy log", proxy.log_text().as_bytes());
    let audit = std::fs::read(dir.path().join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.is_empty(), "the audit log was written");
    assert_no_marker("the audit log", &audit);

    // ---- (2) pg_dump of the whole database: no plaintext ------------------------
    let dump = dir.path().join("dump.sql");
    let out = Command::new(pg_dump_bin())
        .arg("--dbname")
        .arg(pg.admin_url("app"))
        .arg("--file")
        .arg(&dump)
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump_bytes = std::fs::read(&dump).expect("read dump");
    let dump_text = String::from_utf8(dump_bytes.clone()).expect("dump is UTF-8");
    assert!(
        dump_text.contains("COPY public.patients (") && dump_text.contains("COPY cmk.data_keys ("),
        "the dump has the table data"
    );
    assert_no_marker("the pg_dump", &dump_bytes);
    assert!(
        !dump_text.contains(LABEL_1),
        "sanity: COPY escapes the tab and newline of the (unprotected) label"
    );
    assert!(
        dump_text.contains("label\\tone\\nline two \\\\ back"),
        "sanity: the unprotected label is in the dump in COPY form"
    );

    // The dump is a usable backup: restored into a new database, a fresh proxy
    // in front of it reads the same plaintext (registry and EDEKs came along).
    pg.create_database("restored")
        .expect("create database restored");
    let psql = pg_dump_bin().with_file_name("psql");
    let out = Command::new(if psql.is_file() {
        psql
    } else {
        PathBuf::from("psql")
    })
    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "--dbname"])
    .arg(pg.admin_url("restored"))
    .arg("--file")
    .arg(&dump)
    .output()
    .expect("run psql");
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored_proxy = common::Proxy::start(
        &format!(
            "upstream: {}\ntls:\n  upstream: {{mode: require}}\n{policy_text}",
            pg.admin_url("restored")
        ),
        &[],
    );
    let (restored_app, restored_conn) =
        common::connect(&restored_proxy.url("postgres", "", "restored")).await;
    let restored: BTreeMap<String, Row> = rows(
        &restored_app,
        &format!("SELECT {} FROM patients ORDER BY id", COLUMNS.join(", ")),
    )
    .await
    .into_iter()
    .map(|vals| {
        let r: Row = COLUMNS.iter().map(|c| c.to_string()).zip(vals).collect();
        (r["id"].clone().expect("id"), r)
    })
    .collect();
    assert_eq!(
        restored, model,
        "the restored backup reads the same through a proxy"
    );
    drop(restored_app);
    restored_conn.abort();
    drop(restored_proxy);

    // From here on PostgreSQL is gone: decrypt-dump needs only the dump and the keys.
    drop(proxy);
    drop(direct);
    conn.abort();
    pg.stop().expect("stop PostgreSQL");

    // ---- (3) decrypt-dump reproduces exactly the written plaintext -------------
    let material: Vec<String> = {
        let ring_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ring).expect("keyring")).expect("keyring JSON");
        let mut m = Vec::new();
        for entry in ring_json["keys"].as_object().expect("keys").values() {
            for v in entry["versions"].as_array().expect("versions") {
                m.push(v["material"].as_str().expect("material").to_owned());
            }
        }
        m
    };
    assert_eq!(material.len(), 2);
    for extra in [&[][..], &["--no-registry"][..]] {
        let (code, got, stderr) = decrypt_dump(&policy_file, &dump, extra);
        assert_eq!(code, 0, "decrypt-dump {extra:?}: {stderr}");
        assert_eq!(got, model, "decrypt-dump {extra:?} recovers the plaintext");
        assert!(
            stderr.contains("public.patients: 5 rows decrypted, 0 failed"),
            "{stderr}"
        );
        assert!(
            stderr.contains("4 KMS calls (2 key checks, 2 unwraps)"),
            "one key check per tenant and one unwrap per data key, not per row: {stderr}"
        );
        for m in &material {
            assert!(!stderr.contains(m.as_str()), "key material on stderr");
        }
    }
    let raw_out = cmk_proxy(&[
        "decrypt-dump",
        "--config",
        policy_file.to_str().expect("utf-8"),
        dump.to_str().expect("utf-8"),
    ]);
    for m in &material {
        let needle = m.as_bytes();
        assert!(
            !raw_out.stdout.windows(needle.len()).any(|w| w == needle),
            "key material on stdout"
        );
    }

    // ---- (4) crypto-shredding: a disabled key refuses that tenant's rows -----
    keyring(&ring, "disable", "globex");
    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &[]);
    assert_eq!(
        code, 1,
        "rows that cannot be decrypted fail the run: {stderr}"
    );
    assert_eq!(
        got,
        of_tenant(&model, "acme")
            .into_iter()
            .chain(
                // Row 4 has no protected value: nothing to decrypt, still recovered.
                of_tenant(&model, "globex")
                    .into_iter()
                    .filter(|(id, _)| id == "4")
            )
            .collect(),
        "the other tenant's rows are still recovered"
    );
    assert!(
        stderr.contains("public.patients row ")
            && stderr.contains("(id=2, dump line")
            && stderr.contains("tenant 'globex': key refused")
            && stderr.contains("disabled"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tenant 'globex': 1 rows not decrypted (key refused)"),
        "{stderr}"
    );
    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &["--tenant", "acme"]);
    assert_eq!(code, 0, "only the readable tenant asked for: {stderr}");
    assert_eq!(got, of_tenant(&model, "acme"));
    let (code, got, _) = decrypt_dump(&policy_file, &dump, &["--tenant", "globex", "--fail-fast"]);
    assert_eq!(code, 1);
    assert!(got.keys().all(|id| id == "4"), "{got:?}");
    keyring(&ring, "enable", "globex");

    // ---- (5) a tampered cell is an integrity failure naming table and column --
    let tampered = write_edited_dump(
        dir.path(),
        "tampered.sql",
        &dump_text,
        "1",
        |names, fields| {
            let f = &mut fields[field_index(names, "ssn")];
            let last = f.pop().expect("hex digit");
            f.push(if last == '0' { '1' } else { '0' });
        },
    );
    let (code, got, stderr) = decrypt_dump(&policy_file, &tampered, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("public.patients row ")
            && stderr.contains("(id=1, dump line")
            && stderr.contains("column ssn")
            && stderr.contains("integrity"),
        "{stderr}"
    );
    let mut others = model.clone();
    others.remove("1");
    assert_eq!(got, others, "every other row still decrypts");

    // A cell moved to another column fails too (the AAD names the column).
    let moved = write_edited_dump(dir.path(), "moved.sql", &dump_text, "5", |names, fields| {
        fields[field_index(names, "notes")] = fields[field_index(names, "ssn")].clone();
    });
    let (code, _, stderr) = decrypt_dump(&policy_file, &moved, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("(id=5, dump line")
            && stderr.contains("column notes")
            && stderr.contains("integrity"),
        "{stderr}"
    );

    // A row whose EDEK is gone: the registry copy in the dump still opens it,
    // --no-registry says exactly what is missing.
    let no_edek = write_edited_dump(
        dir.path(),
        "no-edek.sql",
        &dump_text,
        "3",
        |names, fields| {
            fields[field_index(names, "cmk_edek")] = "{}".to_owned();
        },
    );
    let (code, got, stderr) = decrypt_dump(&policy_file, &no_edek, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got, model);
    assert!(
        stderr.contains("used the copy in the dump's cmk.data_keys"),
        "{stderr}"
    );
    let (code, got, stderr) = decrypt_dump(&policy_file, &no_edek, &["--no-registry"]);
    assert_eq!(code, 1);
    assert!(!got.contains_key("3"));
    assert!(
        stderr.contains("(id=3, dump line")
            && stderr.contains("column ssn")
            && stderr.contains("missing EDEK"),
        "{stderr}"
    );

    // A row of a tenant nobody knows.
    let stranger = write_edited_dump(
        dir.path(),
        "stranger.sql",
        &dump_text,
        "5",
        |names, fields| {
            fields[field_index(names, "tenant_id")] = "initech".to_owned();
        },
    );
    let (code, _, stderr) = decrypt_dump(&policy_file, &stranger, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("tenant 'initech': unknown tenant") && stderr.contains("(id=5, dump line"),
        "{stderr}"
    );

    // A custom-format archive is refused with a hint, not misread.
    let archive = dir.path().join("custom.dump");
    std::fs::write(&archive, b"PGDMP\x01\x0e\x00").expect("write archive");
    let (code, _, stderr) = decrypt_dump(&policy_file, &archive, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pg_restore -f"), "{stderr}");
}

/// The blind index stored at rest follows every write path: a value written
/// by INSERT, UPDATE or upsert (`EXCLUDED`) has the same `<col>_bidx` as the
/// same value freshly inserted for the same tenant, and differs across tenants.
#[tokio::test(flavor = "multi_thread")]
async fn the_blind_index_at_rest_follows_update_and_upsert() {
    let pg = common::pg();
    let (direct, _conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let ring = dir.path().join("keyring.json");
    keyring(&ring, "create", "acme");
    keyring(&ring, "create", "globex");
    let proxy = common::start_proxy(&pg, &policy(&ring, &dir.path().join("audit.jsonl")));
    let (app, _app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;
    for sql in [
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (1, 'acme', 'old-1'), (2, 'acme', 'old-2'), (3, 'acme', 'old-3')",
        "UPDATE patients SET ssn = 'by-update' WHERE id = 1 AND tenant_id = 'acme'",
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (2, 'acme', 'by-upsert') \
         ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn",
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (11, 'acme', 'by-update'), (12, 'acme', 'by-upsert'), \
         (13, 'acme', 'old-3'), (21, 'globex', 'by-update')",
    ] {
        rows(&app, sql).await;
    }
    let bidx: BTreeMap<i32, Vec<u8>> = direct
        .query("SELECT id, ssn_bidx FROM patients", &[])
        .await
        .expect("read blind index")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(bidx[&13], bidx[&3], "INSERT: same value, same index");
    assert_eq!(bidx[&11], bidx[&1], "UPDATE recomputes the index");
    assert_eq!(
        bidx[&12], bidx[&2],
        "upsert (EXCLUDED) recomputes the index"
    );
    assert_ne!(bidx[&21], bidx[&11], "another tenant's index differs");
    assert_ne!(bidx[&1], bidx[&2]);
}

/// decrypt-dump goes through the `KeyProvider` trait, so it works with AWS
/// KMS as with the local keyring (here a real moto server): the dump of rows
/// written through a proxy on AWS keys decrypts, and a disabled AWS key
/// refuses that tenant (moto's Decrypt ignores key state; the key check,
/// DescribeKey, does not).
#[tokio::test(flavor = "multi_thread")]
async fn decrypt_dump_works_with_aws_kms_keys() {
    let kms = moto::Moto::start();
    // Credentials for the proxy and decrypt-dump processes (standard chain).
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let admin = cmk_proxy::kms::AwsKmsProvider::with_static_credentials(
        Some("us-east-1"),
        Some(&kms.endpoint()),
        "test",
        "test",
    )
    .await
    .expect("aws client");
    let mut keys = Vec::new();
    for _ in 0..2 {
        let out = admin
            .client()
            .create_key()
            .send()
            .await
            .expect("create key");
        keys.push(out.key_metadata().expect("metadata").key_id().to_owned());
    }
    let pg = common::pg();
    let (direct, _conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_text = format!(
        "keys:\n  approval_ttl: 5s\n  providers:\n    aws: {{kind: aws-kms, region: us-east-1, endpoint: '{}'}}\n\
         audit: {{sink: {{kind: file, path: {}}}}}\n\
         tenants:\n  acme: {{provider: aws, key: '{}'}}\n  globex: {{provider: aws, key: '{}'}}\n\
         {TABLES_YAML}",
        kms.endpoint(),
        dir.path().join("audit.jsonl").display(),
        keys[0],
        keys[1]
    );
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, &policy_text).expect("write policy");
    let proxy = common::start_proxy(&pg, &policy_text);
    let (app, _app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, ssn, birth_date, notes) VALUES \
         (1, 'acme', 'SSN-ACME-MARKER-0001', '1931-07-19', 'NOTE-ACME-MARKER-ORIGINAL'), \
         (2, 'globex', 'SSN-GLOBEX-MARKER-0002', '1942-11-23', NULL)",
    )
    .await;
    let dump = dir.path().join("dump.sql");
    let out = Command::new(pg_dump_bin())
        .arg("--dbname")
        .arg(pg.admin_url("app"))
        .arg("--file")
        .arg(&dump)
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_marker("the pg_dump", &std::fs::read(&dump).expect("read dump"));
    drop(proxy);
    pg.stop().expect("stop PostgreSQL");

    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &[]);
    assert_eq!(code, 0, "{stderr}");
    let ssn = |id: &str| got.get(id).and_then(|r| r["ssn"].clone());
    assert_eq!(ssn("1").as_deref(), Some("SSN-ACME-MARKER-0001"));
    assert_eq!(ssn("2").as_deref(), Some("SSN-GLOBEX-MARKER-0002"));
    assert_eq!(got["1"]["birth_date"].as_deref(), Some("1931-07-19"));
    assert_eq!(got["2"]["notes"], None);

    admin
        .client()
        .disable_key()
        .key_id(&keys[1])
        .send()
        .await
        .expect("disable globex's key");
    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["1"],
        "acme is still recovered"
    );
    assert!(
        stderr.contains("(id=2, dump line") && stderr.contains("tenant 'globex': key refused"),
        "{stderr}"
    );
}

/// Values defined by DDL would reach a protected column without the proxy —
/// a column DEFAULT, a SQL function whose body inserts into the protected
/// table: such statements are refused (KM003), and a table whose schema has
/// such a DEFAULT is not written to. Never plaintext at rest.
#[tokio::test(flavor = "multi_thread")]
async fn values_defined_by_ddl_never_reach_a_protected_column_as_plaintext() {
    let pg = common::pg();
    let (direct, _conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let ring = dir.path().join("keyring.json");
    keyring(&ring, "create", "acme");
    keyring(&ring, "create", "globex");
    let proxy = common::start_proxy(&pg, &policy(&ring, &dir.path().join("audit.jsonl")));
    let (app, _app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;
    for sql in [
        "ALTER TABLE patients ALTER COLUMN notes SET DEFAULT 'NOTE-ACME-MARKER-ORIGINAL'",
        "INSERT INTO patients (id, tenant_id) VALUES (1, 'acme')",
        "INSERT INTO patients (id, tenant_id, notes) VALUES (2, 'acme', DEFAULT)",
        "CREATE FUNCTION add_patient() RETURNS void LANGUAGE sql AS \
         $$ INSERT INTO patients (id, tenant_id, ssn) VALUES (3, 'acme', 'SSN-ACME-MARKER-0003') $$",
        "SELECT add_patient()",
    ] {
        // A refusal is fine; what must never happen is plaintext at rest.
        let _ = app.simple_query(sql).await;
    }
    for r in direct
        .query("SELECT t::text FROM patients t", &[])
        .await
        .expect("read patients")
    {
        let whole: String = r.get(0);
        assert_no_marker("a row of patients read directly", whole.as_bytes());
    }
}

/// A whole-row reference would return the ciphertext (and the hidden EDEK
/// column) inside a record: it is refused like any other expression over a
/// protected column.
#[tokio::test(flavor = "multi_thread")]
async fn whole_row_references_to_a_protected_table_are_refused() {
    let pg = common::pg();
    let (direct, _conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let ring = dir.path().join("keyring.json");
    keyring(&ring, "create", "acme");
    keyring(&ring, "create", "globex");
    let proxy = common::start_proxy(&pg, &policy(&ring, &dir.path().join("audit.jsonl")));
    let (app, _app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'n')",
    )
    .await;
    for sql in [
        "SELECT t FROM patients t",
        "SELECT t::text FROM patients t",
        "SELECT row_to_json(t) FROM patients t",
    ] {
        let err = app.simple_query(sql).await.expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM003"),
            "{sql}: {err}"
        );
    }
}

/// After `cmk-proxy rewrap` to another master key, the registry holds EDEKs
/// under the new key while the rows still carry EDEKs under the old one:
/// decrypt-dump falls back to the dump's registry copy (saying so), and does
/// so even once the old key is destroyed; with --no-registry it reports the
/// row EDEKs that no longer unwrap.
#[tokio::test(flavor = "multi_thread")]
async fn decrypt_dump_after_rewrap_uses_the_registry_copy() {
    let pg = common::pg();
    let (direct, _conn) = common::connect(&pg.admin_url("app")).await;
    direct.batch_execute(SCHEMA).await.expect("schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let ring = dir.path().join("keyring.json");
    for key in ["acme", "globex", "acme-2027"] {
        keyring(&ring, "create", key);
    }
    let policy_text = policy(&ring, &dir.path().join("audit.jsonl"));
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, &policy_text).expect("write policy");
    let proxy = common::start_proxy(&pg, &policy_text);
    let (app, _app_conn) = common::connect(&proxy.url("postgres", "", "app")).await;
    rows(
        &app,
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (1, 'acme', 'SSN-ACME-MARKER-0001'), \
         (2, 'globex', 'SSN-GLOBEX-MARKER-0002')",
    )
    .await;
    let out = cmk_proxy(&[
        "rewrap",
        "--config",
        policy_file.to_str().expect("utf-8"),
        "--upstream",
        &pg.admin_url("app"),
        "--tenant",
        "acme",
        "--to-key",
        "acme-2027",
    ]);
    assert!(
        out.status.success(),
        "rewrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = dir.path().join("dump.sql");
    let out = Command::new(pg_dump_bin())
        .arg("--dbname")
        .arg(pg.admin_url("app"))
        .arg("--file")
        .arg(&dump)
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(proxy);
    pg.stop().expect("stop PostgreSQL");

    keyring(&ring, "destroy", "acme");
    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(got["1"]["ssn"].as_deref(), Some("SSN-ACME-MARKER-0001"));
    assert_eq!(got["2"]["ssn"].as_deref(), Some("SSN-GLOBEX-MARKER-0002"));
    assert!(
        stderr
            .contains("(tenant 'acme') does not unwrap; used the copy in the dump's cmk.data_keys"),
        "{stderr}"
    );
    let (code, got, stderr) = decrypt_dump(&policy_file, &dump, &["--no-registry"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(got.contains_key("2") && !got.contains_key("1"));
    assert!(
        stderr.contains("(id=1, dump line") && stderr.contains("EDEK does not unwrap"),
        "{stderr}"
    );
}
