//! `cmk-proxy encrypt` end to end (docs/ADOPTING.md): a legacy table of
//! three tenants, one without a key, converted while an application writes
//! and reads through the proxy; killed with SIGKILL and resumed; finished
//! once the third tenant has a key; no plaintext left in the table or in a
//! pg_dump; the strict rule back at the end.

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::encryption::{keyring, rows, EncryptedSetup};
use crate::common::{self, run_cmk_proxy};

/// The legacy table: plaintext columns of their own types.
pub(crate) const LEGACY: &str = "CREATE TABLE patients (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn text,
    birth_date date,
    notes text,
    visits int NOT NULL DEFAULT 0);
INSERT INTO patients (tenant_id, ssn, birth_date, notes, visits)
SELECT (ARRAY['acme', 'globex', 'initech'])[1 + i % 3],
       'ssn-' || lpad(i::text, 9, '0'),
       DATE '1950-01-01' + i,
       CASE WHEN i % 7 = 0 THEN NULL ELSE 'note ' || i || ' ' || repeat('x', i % 50) END,
       i % 5
FROM generate_series(1, 3000) AS i;";

pub(crate) const COLUMNS: &[&str] = &[
    "ssn: {type: text, search: equality}",
    "birth_date: {type: date}",
    "notes: {type: text}",
];

/// A catalog refresh of 1 s, so the swap waits 3 s.
pub(crate) const SERVER: &str = "server:\n  catalog_refresh: 1s\n";

/// Every row as text (simple query), by id: read directly before, and
/// through the proxy (which opens the cells) after.
pub(crate) async fn snapshot(client: &tokio_postgres::Client) -> HashMap<i64, Vec<Option<String>>> {
    rows(
        client,
        "SELECT id, tenant_id, ssn, birth_date, notes, visits FROM patients ORDER BY id",
    )
    .await
    .into_iter()
    .map(|r| (r[0].as_deref().unwrap_or("0").parse().unwrap_or(0), r))
    .collect()
}

fn encrypt_command(setup: &EncryptedSetup, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"));
    command
        .arg("encrypt")
        .arg("--config")
        .arg(setup.proxy.config_path())
        .args(["--table", "public.patients"])
        .args(extra)
        .env("RUST_LOG", "info");
    command
}

fn run_encrypt(setup: &EncryptedSetup, extra: &[&str]) -> Output {
    encrypt_command(setup, extra)
        .output()
        .expect("run cmk-proxy encrypt")
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What the application last wrote to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) ssn: Option<String>,
    pub(crate) notes: Option<String>,
    pub(crate) visits: i32,
}

/// An application writing and reading through the proxy until `stop`:
/// updates of protected and unprotected columns of acme and globex rows,
/// inserts, and reads that must return what it wrote. Returns what it
/// wrote last per row, and how many statements failed (refused at the
/// swap's instant; a failed write is known to the application, never
/// lost silently).
pub(crate) async fn application(
    app: tokio_postgres::Client,
    tenant: &'static str,
    stop: Arc<AtomicBool>,
) -> (HashMap<i64, Written>, u64, u64) {
    app.batch_execute(&format!("SET cmk.tenant_id = '{tenant}'"))
        .await
        .expect("session tenant");
    // Rows of this tenant: acme is id % 3 == 0, globex id % 3 == 1.
    let residue = if tenant == "acme" { 0 } else { 1 };
    let mut written: HashMap<i64, Written> = HashMap::new();
    let mut failures = 0u64;
    let mut statements = 0u64;
    let mut step = 0i64;
    while !stop.load(Ordering::Acquire) {
        step += 1;
        let id = 1 + (step * 7919) % 3000;
        if id % 3 != residue {
            continue;
        }
        statements += 1;
        let outcome = match step % 4 {
            0 => {
                let ssn = format!("new-ssn-{step}");
                app.execute("UPDATE patients SET ssn = $1 WHERE id = $2", &[&ssn, &id])
                    .await
                    .map(|_| {
                        let row = written.entry(id).or_insert(Written {
                            ssn: None,
                            notes: None,
                            visits: -1,
                        });
                        row.ssn = Some(ssn);
                    })
            }
            1 => {
                let notes = format!("app note {step}");
                app.execute(
                    "UPDATE patients SET notes = $1, visits = 1000 + $3 WHERE id = $2",
                    &[&notes, &id, &((step % 1000) as i32)],
                )
                .await
                .map(|_| {
                    let row = written.entry(id).or_insert(Written {
                        ssn: None,
                        notes: None,
                        visits: -1,
                    });
                    row.notes = Some(notes);
                    row.visits = 1000 + (step % 1000) as i32;
                })
            }
            2 => {
                let ssn = format!("inserted-{step}");
                app.query_one(
                    "INSERT INTO patients (tenant_id, ssn, birth_date, notes) \
                     VALUES ($1, $2, '2001-02-03', NULL) RETURNING id",
                    &[&tenant, &ssn],
                )
                .await
                .map(|row| {
                    written.insert(
                        row.get(0),
                        Written {
                            ssn: Some(ssn),
                            notes: None,
                            visits: 0,
                        },
                    );
                })
            }
            _ => {
                let read = app
                    .query_one(
                        "SELECT ssn, notes, visits FROM patients WHERE id = $1",
                        &[&id],
                    )
                    .await;
                read.and_then(|row| {
                    let ssn: Option<String> = row.try_get(0)?;
                    let notes: Option<String> = row.try_get(1)?;
                    if let Some(expected) = written.get(&id) {
                        if expected.ssn.is_some() {
                            assert_eq!(ssn, expected.ssn, "row {id} read back");
                        }
                        if expected.visits >= 0 {
                            assert_eq!(notes, expected.notes, "row {id} read back");
                        }
                    }
                    Ok(())
                })
            }
        };
        if let Err(e) = outcome {
            failures += 1;
            eprintln!(
                "application statement {} failed: {e} {:?}",
                step % 4,
                common::sqlstate(&e)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (written, statements, failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_converts_a_legacy_table_online_resumes_after_sigkill_and_finishes() {
    let setup =
        EncryptedSetup::start_configured(LEGACY, "public.patients", COLUMNS, "", "", SERVER).await;
    let before = snapshot(&setup.direct).await;
    assert_eq!(before.len(), 3000);

    // Before encrypt the table is legacy: served untouched through the proxy.
    let app = setup.app().await;
    let ssn: String = app
        .query_one("SELECT ssn FROM patients WHERE id = 1", &[])
        .await
        .expect("legacy read through the proxy")
        .get(0);
    assert_eq!(ssn, "ssn-000000001");

    // A dry run prints the plan and changes nothing.
    let out = run_encrypt(&setup, &["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("CREATE VIEW"), "{}", text(&out));
    assert!(text(&out).contains("convert 3000 rows"), "{}", text(&out));
    assert_eq!(snapshot(&setup.direct).await, before);

    // The application runs during the whole conversion.
    let stop = Arc::new(AtomicBool::new(false));
    drop(app);
    let acme = tokio::spawn(application(setup.app().await, "acme", stop.clone()));
    let globex = tokio::spawn(application(setup.app().await, "globex", stop.clone()));

    // First run: killed with SIGKILL once batches have committed.
    let mut child = encrypt_command(&setup, &["--batch-size", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn encrypt");
    let mut killed = false;
    for _ in 0..600 {
        let position = setup
            .direct
            .query_opt(
                "SELECT resume_after FROM cmk.adoptions WHERE table_name = 'public.patients'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<Vec<String>>>(0));
        if position.is_some_and(|p| {
            p.first()
                .is_some_and(|k| k.parse::<i64>().unwrap_or(0) > 500)
        }) {
            child.kill().expect("SIGKILL encrypt");
            killed = true;
            break;
        }
        if child.try_wait().expect("poll encrypt").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.wait();
    assert!(killed, "encrypt ended before it could be killed");

    // Mid-way, every protected value is exactly one of legacy or cell.
    let torn: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM patients__cmk_base WHERE \
             (ssn IS NOT NULL AND ssn__cmk IS NOT NULL) OR \
             (birth_date IS NOT NULL AND birth_date__cmk IS NOT NULL) OR \
             (notes IS NOT NULL AND notes__cmk IS NOT NULL)",
            &[],
        )
        .await
        .expect("transition state")
        .get(0);
    assert_eq!(torn, 0);

    // Resumed: finishes every tenant with a key; initech has none.
    let out = run_encrypt(&setup, &["--batch-size", "200"]);
    let report = text(&out);
    eprintln!("resumed encrypt:\n{report}");
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(
        report.contains("tenant initech: tenant has no registered key"),
        "{report}"
    );
    assert!(report.contains("1000 rows of tenant initech"), "{report}");

    stop.store(true, Ordering::Release);
    let (mut written, mut statements, mut failures) = acme.await.expect("application acme");
    let (globex_written, globex_statements, globex_failures) =
        globex.await.expect("application globex");
    written.extend(globex_written);
    statements += globex_statements;
    failures += globex_failures;
    eprintln!("application: {statements} statements, {failures} failed");
    assert!(!written.is_empty());

    // Every row the application wrote equals its last write, read through
    // the proxy; every other row of acme and globex is unchanged.
    let app = setup.app().await;
    let served = rows(
        &app,
        "SELECT id, ssn, notes, visits FROM patients ORDER BY id",
    )
    .await;
    let mut checked = 0;
    for row in &served {
        let id: i64 = row[0].as_deref().unwrap().parse().unwrap();
        if let Some(w) = written.get(&id) {
            if w.ssn.is_some() {
                assert_eq!(row[1], w.ssn, "row {id}");
            }
            if w.visits >= 0 {
                assert_eq!(row[2], w.notes, "row {id}");
                assert_eq!(
                    row[3].as_deref(),
                    Some(w.visits.to_string().as_str()),
                    "row {id}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, written.len());
    let now = snapshot(&app).await;
    for (id, row) in &before {
        if !written.contains_key(id) {
            assert_eq!(now.get(id), Some(row), "row {id} changed");
        }
    }
    // acme and globex rows hold no legacy value; initech's are untouched.
    let legacy_left = rows(
        &setup.direct,
        "SELECT tenant_id, count(*) FROM patients__cmk_base \
         WHERE ssn IS NOT NULL OR birth_date IS NOT NULL OR notes IS NOT NULL GROUP BY 1",
    )
    .await;
    eprintln!(
        "{:?}",
        rows(
            &setup.direct,
            "SELECT id, ssn, birth_date, notes, ssn__cmk IS NULL, birth_date__cmk IS NULL, notes__cmk IS NULL \
             FROM patients__cmk_base WHERE tenant_id <> 'initech' AND (ssn IS NOT NULL OR birth_date IS NOT NULL OR notes IS NOT NULL) ORDER BY id LIMIT 8"
        )
        .await
    );
    assert_eq!(
        legacy_left,
        vec![vec![Some("initech".to_owned()), Some("1000".to_owned())]]
    );
    // During the transition PostgreSQL already refuses plaintext cells.
    let err = setup
        .direct
        .batch_execute("UPDATE patients__cmk_base SET ssn__cmk = 'plain'::bytea WHERE id = 3")
        .await
        .expect_err("the shadow column's envelope CHECK");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"), "{err}");
    let (ok, live) = run_cmk_proxy([
        "check-config".as_ref(),
        "--live".as_ref(),
        setup.proxy.config_path().as_os_str(),
    ]);
    assert!(!ok && live.contains("in transition"), "{live}");

    // initech gets a key: the next run finishes the table.
    keyring(&setup.ring(), "create", "initech");
    let (ok, added) = run_cmk_proxy([
        "tenants".as_ref(),
        "add".as_ref(),
        "initech".as_ref(),
        "--provider".as_ref(),
        "local".as_ref(),
        "--key".as_ref(),
        "initech".as_ref(),
        "--config".as_ref(),
        setup.proxy.config_path().as_os_str(),
    ]);
    assert!(ok, "{added}");
    let out = run_encrypt(&setup, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("out of transition"), "{}", text(&out));

    // The table is in the policy's format; the database refuses plaintext.
    let kinds = rows(
        &setup.direct,
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute \
         WHERE attrelid = 'patients'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .await;
    let kinds: Vec<String> = kinds
        .iter()
        .map(|r| format!("{} {}", r[0].as_deref().unwrap(), r[1].as_deref().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            "id bigint",
            "tenant_id text",
            "visits integer",
            "birth_date bytea",
            "notes bytea",
            "ssn bytea",
            "cmk_edek jsonb",
            "ssn_bidx bytea",
        ]
        .map(str::to_owned)
    );

    let err = setup
        .direct
        .batch_execute("UPDATE patients SET ssn = 'plain'::bytea WHERE id = 2")
        .await
        .expect_err("the envelope CHECK refuses plaintext");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"), "{err}");
    let validated: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'patients'::regclass \
             AND conname LIKE 'cmk_envelope_%' AND convalidated",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(validated, 3);
    let indexed: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'patients'::regclass \
             AND conname = 'cmk_bidx_ssn' AND convalidated",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexed, 1, "every ssn has its blind index");
    assert_eq!(
        rows(&setup.direct, "SELECT count(*) FROM cmk.adoptions").await,
        vec![vec![Some("0".to_owned())]]
    );

    // Every row reads back through the proxy as before (or as last
    // written), after the proxy has seen the table's final form.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = setup.app().await;
    let now = snapshot(&app).await;
    for (id, row) in &before {
        if !written.contains_key(id) {
            assert_eq!(now.get(id), Some(row), "row {id} after the end");
        }
    }
    // Lookups by the searchable ssn are answered on the converted table.
    let mut untouched: Vec<i64> = before
        .keys()
        .filter(|id| !written.contains_key(id))
        .copied()
        .collect();
    untouched.sort_unstable();
    for id in untouched.iter().take(5) {
        let row = app
            .query_one("SELECT tenant_id, ssn FROM patients WHERE id = $1", &[id])
            .await
            .unwrap();
        let (tenant, ssn): (String, String) = (row.get(0), row.get(1));
        let found: Vec<i64> = app
            .query(
                "SELECT id FROM patients WHERE tenant_id = $1 AND ssn = $2",
                &[&tenant, &ssn],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(found, vec![*id], "lookup of row {id}'s ssn");
    }
    // A non-envelope cell is KM005 again.
    setup
        .direct
        .batch_execute(
            "ALTER TABLE patients DROP CONSTRAINT cmk_envelope_notes; \
             UPDATE patients SET notes = 'raw'::bytea WHERE id = 5",
        )
        .await
        .unwrap();
    let err = app
        .query_one("SELECT notes FROM patients WHERE id = 5", &[])
        .await
        .expect_err("strict again");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM005"), "{err}");

    // No plaintext at rest: not in the table's columns, not in a pg_dump.
    let leaked: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM patients WHERE position('ssn-0'::bytea IN ssn) > 0 \
             OR position('note '::bytea IN notes) > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    let dump = Command::new(crate::encryption_at_rest::pg_dump_bin())
        .arg("--dbname")
        .arg(setup.pg.admin_url("app"))
        .arg("--table")
        .arg("public.patients")
        .output()
        .expect("pg_dump");
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("COPY public.patients"), "{dump}");
    for plain in ["ssn-000000001", "ssn-000002999", "note 1 x", "1950-01-02"] {
        assert!(!dump.contains(plain), "{plain} in pg_dump");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_refuses_a_table_without_a_primary_key() {
    let schema = "CREATE TABLE patients (tenant_id text, ssn text, birth_date date, notes text); \
                  INSERT INTO patients VALUES ('acme', 'x', '2000-01-01', 'n')";
    let setup =
        EncryptedSetup::start_configured(schema, "public.patients", COLUMNS, "", "", SERVER).await;
    let out = run_encrypt(&setup, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("has no primary key"), "{}", text(&out));
    // Nothing changed.
    assert_eq!(
        rows(&setup.direct, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'patients'::regclass AND attnum > 0").await,
        vec![vec![Some("4".to_owned())]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_refuses_a_table_that_views_depend_on_and_changes_nothing() {
    let schema = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text, ssn text, \
                  birth_date date, notes text); \
                  INSERT INTO patients VALUES (1, 'acme', 'x', '2000-01-01', 'n'); \
                  CREATE VIEW patient_names AS SELECT id, notes FROM patients";
    let setup =
        EncryptedSetup::start_configured(schema, "public.patients", COLUMNS, "", "", SERVER).await;
    let out = run_encrypt(&setup, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("patient_names"), "{}", text(&out));
    assert_eq!(
        rows(&setup.direct, "SELECT count(*) FROM cmk.adoptions").await,
        vec![vec![Some("0".to_owned())]]
    );
    // The legacy table is still served untouched through the proxy.
    let app = setup.app().await;
    assert_eq!(
        rows(&app, "SELECT ssn, birth_date FROM patients").await,
        vec![vec![Some("x".to_owned()), Some("2000-01-01".to_owned())]]
    );
}
