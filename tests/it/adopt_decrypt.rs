//! `cmk-proxy decrypt` end to end (docs/ADOPTING.md, "The way back"): a
//! legacy table encrypted with `encrypt`, then decrypted back while an
//! application writes and reads through the proxy; killed with SIGKILL and
//! resumed; a revoked tenant's rows stay encrypted and are listed until its
//! key is enabled; every row byte-identical (per-row md5 taken before
//! `encrypt`); `--tenant` alone leaves the table mixed and served.

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::adopt_encrypt::{application, snapshot, text, COLUMNS, LEGACY, SERVER};
use crate::common::encryption::{keyring, rows, EncryptedSetup};
use crate::common::{self, run_cmk_proxy};

/// md5 of every row's legacy columns in their text form, by id.
async fn md5s(client: &tokio_postgres::Client) -> HashMap<String, String> {
    rows(
        client,
        "SELECT id, md5(row(id, tenant_id, ssn, birth_date, notes, visits)::text) FROM patients",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
    .collect()
}

fn command(setup: &EncryptedSetup, verb: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"));
    command
        .arg(verb)
        .arg("--config")
        .arg(setup.proxy.config_path())
        .args(["--table", "public.patients"])
        .args(extra)
        .env("RUST_LOG", "info");
    command
}

fn run(setup: &EncryptedSetup, verb: &str, extra: &[&str]) -> Output {
    command(setup, verb, extra).output().expect("run cmk-proxy")
}

/// Registers tenant `tenant` with a new key of the local keyring.
fn add_tenant(setup: &EncryptedSetup, tenant: &str) {
    keyring(&setup.ring(), "create", tenant);
    let (ok, added) = run_cmk_proxy([
        "tenants".as_ref(),
        "add".as_ref(),
        tenant.as_ref(),
        "--provider".as_ref(),
        "local".as_ref(),
        "--key".as_ref(),
        tenant.as_ref(),
        "--config".as_ref(),
        setup.proxy.config_path().as_os_str(),
    ]);
    assert!(ok, "{added}");
}

/// The table's columns as `name type`, in attribute order.
async fn columns(client: &tokio_postgres::Client, relation: &str) -> Vec<String> {
    rows(
        client,
        &format!(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = '{relation}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ),
    )
    .await
    .iter()
    .map(|r| format!("{} {}", r[0].as_deref().unwrap(), r[1].as_deref().unwrap()))
    .collect()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_restores_every_row_byte_identical_resumes_after_sigkill_and_leaves_a_revoked_tenant_encrypted(
) {
    let setup =
        EncryptedSetup::start_configured(LEGACY, "public.patients", COLUMNS, "", "", SERVER).await;
    add_tenant(&setup, "initech");
    let md5_before = md5s(&setup.direct).await;
    let before = snapshot(&setup.direct).await;
    assert_eq!(md5_before.len(), 3000);

    let out = run(&setup, "encrypt", &["--batch-size", "500"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(columns(&setup.direct, "patients")
        .await
        .contains(&"ssn bytea".to_owned()));
    let out = run(&setup, "decrypt", &["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("decrypt 3000 rows"), "{}", text(&out));
    assert!(text(&out).contains("ADD COLUMN ssn text"), "{}", text(&out));
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM cmk.adoptions").await,
        0
    );

    // initech's key is disabled: its rows must stay encrypted.
    keyring(&setup.ring(), "disable", "initech");

    // The application writes and reads through the proxy during every run,
    // the finish included.
    let stop = Arc::new(AtomicBool::new(false));
    let acme = tokio::spawn(application(setup.app().await, "acme", stop.clone()));
    let globex = tokio::spawn(application(setup.app().await, "globex", stop.clone()));

    // First run: killed with SIGKILL once batches have committed.
    let mut child = command(&setup, "decrypt", &["--batch-size", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn decrypt");
    let mut killed = false;
    for _ in 0..1200 {
        let position = setup
            .direct
            .query_opt(
                "SELECT resume_after FROM cmk.positions WHERE task = 'decrypt public.patients'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, Vec<String>>(0));
        if position.is_some_and(|p| {
            p.first()
                .is_some_and(|k| k.parse::<i64>().unwrap_or(0) > 500)
        }) {
            child.kill().expect("SIGKILL decrypt");
            killed = true;
            break;
        }
        if child.try_wait().expect("poll decrypt").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.wait();
    assert!(killed, "decrypt ended before it could be killed");
    // Mid-way, every protected value is exactly one of plaintext or cell.
    let torn = count(
        &setup.direct,
        "SELECT count(*) FROM patients__cmk_base WHERE \
         (ssn IS NOT NULL AND ssn__cmk IS NOT NULL) OR \
         (birth_date IS NOT NULL AND birth_date__cmk IS NOT NULL) OR \
         (notes IS NOT NULL AND notes__cmk IS NOT NULL)",
    )
    .await;
    assert_eq!(torn, 0);
    let plain_already = count(
        &setup.direct,
        "SELECT count(*) FROM patients__cmk_base WHERE ssn IS NOT NULL",
    )
    .await;
    assert!(plain_already > 0, "no batch committed before the kill");

    // Resumed: every tenant with a usable key is decrypted; initech stays
    // encrypted (KM001) and is listed; exit 3.
    let out = run(&setup, "decrypt", &["--batch-size", "200"]);
    let report = text(&out);
    eprintln!("resumed decrypt:\n{report}");
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(
        report.contains("tenant initech: tenant's key is revoked (KM001)"),
        "{report}"
    );
    assert!(
        report.contains("left encrypted: 1000 rows of tenant initech"),
        "{report}"
    );
    // Raw table: initech's rows are cells only, untouched.
    let initech = rows(
        &setup.direct,
        "SELECT count(*) FILTER (WHERE ssn__cmk IS NOT NULL AND birth_date__cmk IS NOT NULL), \
                count(*) FILTER (WHERE ssn IS NOT NULL OR notes IS NOT NULL OR birth_date IS NOT NULL) \
         FROM patients__cmk_base WHERE tenant_id = 'initech'",
    )
    .await;
    assert_eq!(initech, vec![vec![Some("1000".into()), Some("0".into())]]);
    // Through the proxy initech's rows are refused while its key is disabled.
    let reader = setup.app().await;
    let err = reader
        .query_one("SELECT ssn FROM patients WHERE id = 2", &[])
        .await
        .expect_err("initech's key is disabled");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM001"), "{err}");

    // initech's key is enabled again: the next run finishes the table
    // while the application goes on writing.
    keyring(&setup.ring(), "enable", "initech");
    let out = run(&setup, "decrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no cell is left"), "{}", text(&out));
    // Proxies follow the table's new form, the application goes on a bit.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Release);
    let (mut written, mut statements, mut failures) = acme.await.expect("application acme");
    let (more, more_statements, more_failures) = globex.await.expect("application globex");
    written.extend(more);
    statements += more_statements;
    failures += more_failures;
    eprintln!("application: {statements} statements, {failures} failed");
    assert!(!written.is_empty());

    // A legacy table again: the declared types, no cell/EDEK column, no
    // transition state, no recorded position.
    assert_eq!(
        columns(&setup.direct, "patients").await,
        [
            "id bigint",
            "tenant_id text",
            "visits integer",
            "birth_date date",
            "notes text",
            "ssn text",
        ]
        .map(str::to_owned)
    );
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM cmk.adoptions").await,
        0
    );
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM cmk.positions").await,
        0
    );

    // Byte-identical: every row the application did not write has the md5
    // it had before encrypt; the others equal their last write.
    let md5_after = md5s(&setup.direct).await;
    let mut same = 0;
    for (id, md5) in &md5_before {
        if !written.contains_key(&id.parse::<i64>().unwrap()) {
            assert_eq!(
                md5_after.get(id),
                Some(md5),
                "row {id} is not byte-identical"
            );
            same += 1;
        }
    }
    assert!(same >= 1000, "{same}");
    let now = snapshot(&setup.direct).await;
    for (id, w) in &written {
        let row = now.get(id).expect("written row");
        if w.ssn.is_some() {
            assert_eq!(row[2], w.ssn, "row {id}");
        }
        if w.visits >= 0 {
            assert_eq!(row[4], w.notes, "row {id}");
        }
    }
    assert_eq!(
        now.len(),
        before.len() + written.keys().filter(|id| **id > 3000).count()
    );

    // The proxy serves it untouched, as before encrypt.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = setup.app().await;
    assert_eq!(
        rows(&app, "SELECT ssn, birth_date FROM patients WHERE id = 3").await,
        vec![vec![
            Some("ssn-000000003".into()),
            Some("1950-01-04".into())
        ]]
    );

    // The opens are audited as the proxy audits decryptions; the refused
    // tenant as a KM001 rejection.
    let audit = setup.audit();
    assert!(
        audit.lines().any(|l| l.contains("\"decrypt_batch\"")
            && l.contains("cmk-proxy decrypt")
            && l.contains("\"tenant\":\"initech\"")),
        "{audit}"
    );
    assert!(
        audit.lines().any(|l| l.contains("\"rejection\"")
            && l.contains("KM001")
            && l.contains("\"tenant\":\"initech\"")),
        "{audit}"
    );
}

/// Two tenants only, so the table can be encrypted completely.
const TWO_TENANTS: &str = "CREATE TABLE patients (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn text,
    birth_date date,
    notes text,
    visits int NOT NULL DEFAULT 0);
INSERT INTO patients (tenant_id, ssn, birth_date, notes, visits)
SELECT (ARRAY['acme', 'globex'])[1 + i % 2], 'ssn-' || lpad(i::text, 9, '0'),
       DATE '1950-01-01' + i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'note ' || i END, i % 5
FROM generate_series(1, 400) AS i;";

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_one_tenant_leaves_the_table_mixed_served_and_resumable_both_ways() {
    let setup =
        EncryptedSetup::start_configured(TWO_TENANTS, "public.patients", COLUMNS, "", "", SERVER)
            .await;
    let md5_before = md5s(&setup.direct).await;
    let before = snapshot(&setup.direct).await;
    let out = run(&setup, "encrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));

    let out = run(
        &setup,
        "decrypt",
        &["--tenant", "acme", "--batch-size", "64"],
    );
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("stays in transition"), "{report}");
    assert!(
        report.contains("left encrypted: 200 rows of tenant globex"),
        "{report}"
    );

    // acme's rows hold plaintext in the legacy columns, globex's cells.
    let state = rows(
        &setup.direct,
        "SELECT tenant_id, count(*) FILTER (WHERE ssn__cmk IS NOT NULL), count(*) FILTER (WHERE ssn IS NOT NULL) \
         FROM patients__cmk_base GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(
        state,
        vec![
            vec![Some("acme".into()), Some("0".into()), Some("200".into())],
            vec![Some("globex".into()), Some("200".into()), Some("0".into())],
        ]
    );
    let leaked = count(
        &setup.direct,
        "SELECT count(*) FROM patients__cmk_base WHERE tenant_id = 'globex' AND (ssn IS NOT NULL OR notes IS NOT NULL OR birth_date IS NOT NULL)",
    )
    .await;
    assert_eq!(leaked, 0);
    // The transition state says so.
    let (ok, live) = run_cmk_proxy([
        "check-config".as_ref(),
        "--live".as_ref(),
        setup.proxy.config_path().as_os_str(),
    ]);
    assert!(!ok && live.contains("in transition"), "{live}");

    // The proxy serves the mixed table: every row as before.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = setup.app().await;
    assert_eq!(snapshot(&app).await, before);
    // Writes through the proxy land encrypted, acme's too (its key works);
    // a direct plaintext write to a cell column is refused by PostgreSQL.
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    app.execute(
        "UPDATE patients SET notes = $1 WHERE id = 2",
        &[&"acme again"],
    )
    .await
    .expect("update through the proxy");
    assert_eq!(
        rows(&app, "SELECT notes FROM patients WHERE id = 2").await,
        vec![vec![Some("acme again".into())]]
    );
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients__cmk_base WHERE id = 2 AND notes IS NULL AND notes__cmk IS NOT NULL").await,
        1
    );
    let err = setup
        .direct
        .batch_execute("UPDATE patients__cmk_base SET ssn__cmk = 'plain'::bytea WHERE id = 3")
        .await
        .expect_err("the cell column's envelope CHECK");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23514"), "{err}");

    // The whole table: finishes, every row byte-identical but the one written.
    let out = run(&setup, "decrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no cell is left"), "{}", text(&out));
    let md5_after = md5s(&setup.direct).await;
    assert_eq!(md5_after.len(), 400);
    for (id, md5) in &md5_before {
        if id != "2" {
            assert_eq!(md5_after.get(id), Some(md5), "row {id}");
        }
    }
    assert_eq!(
        rows(&setup.direct, "SELECT notes FROM patients WHERE id = 2").await,
        vec![vec![Some("acme again".into())]]
    );
    // A second run has nothing to do.
    let out = run(&setup, "decrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to decrypt"), "{}", text(&out));
    // And encrypt takes it back again (the round trip is repeatable).
    let out = run(&setup, "encrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = setup.app().await;
    let now = snapshot(&app).await;
    for (id, row) in &before {
        if *id != 2 {
            assert_eq!(now.get(id), Some(row), "row {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_takes_a_table_left_mixed_by_decrypt_tenant_back_to_the_format() {
    let setup =
        EncryptedSetup::start_configured(TWO_TENANTS, "public.patients", COLUMNS, "", "", SERVER)
            .await;
    let before = snapshot(&setup.direct).await;
    let out = run(&setup, "encrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&setup, "decrypt", &["--tenant", "globex"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        count(
            &setup.direct,
            "SELECT count(*) FROM patients__cmk_base WHERE ssn IS NOT NULL"
        )
        .await,
        200
    );
    // The way forward again from the mixed state: globex's plaintext is
    // sealed, the table leaves its transition in the policy's format.
    let out = run(&setup, "encrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("out of transition"), "{}", text(&out));
    assert_eq!(
        columns(&setup.direct, "patients").await,
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
    let leaked = count(
        &setup.direct,
        "SELECT count(*) FROM patients WHERE position('ssn-0'::bytea IN ssn) > 0",
    )
    .await;
    assert_eq!(leaked, 0);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = setup.app().await;
    assert_eq!(snapshot(&app).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_refuses_what_it_cannot_take_back_and_changes_nothing() {
    // A table in the policy's format made by hand, without a primary key.
    let schema = "CREATE TABLE patients (tenant_id text, ssn bytea, birth_date bytea, \
                  notes bytea, cmk_edek jsonb)";
    let setup =
        EncryptedSetup::start_configured(schema, "public.patients", COLUMNS, "", "", SERVER).await;
    let out = run(&setup, "decrypt", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("has no primary key"), "{}", text(&out));
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM cmk.adoptions").await,
        0
    );
    assert_eq!(columns(&setup.direct, "patients").await.len(), 5);
    // A legacy plaintext table: nothing to decrypt.
    setup
        .direct
        .batch_execute(
            "DROP TABLE patients; CREATE TABLE patients (id int PRIMARY KEY, tenant_id text, \
             ssn text, birth_date date, notes text)",
        )
        .await
        .unwrap();
    let out = run(&setup, "decrypt", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to decrypt"), "{}", text(&out));
}
