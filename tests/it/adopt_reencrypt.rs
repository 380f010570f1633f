//! `cmk-proxy reencrypt` and `keys list` after `keys rotate`: a table
//! encrypted by `cmk-proxy encrypt`, its tenant's DEK rotated, its cells
//! moved to the new DEK (zero left on the retired one), every row still
//! reading back as before through the proxy, the rows' EDEK copies current.

use std::collections::HashMap;
use std::process::Command;

use crate::common::encryption::{rows, EncryptedSetup};

const LEGACY: &str = "CREATE TABLE patients (
    id int PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn text,
    birth_date date,
    notes text,
    visits int NOT NULL DEFAULT 0);
INSERT INTO patients (id, tenant_id, ssn, birth_date, notes)
SELECT i, (ARRAY['acme', 'globex'])[1 + i % 2], 'ssn-' || i, DATE '1960-01-01' + i,
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'note ' || i END
FROM generate_series(1, 400) AS i;";

const COLUMNS: &[&str] = &[
    "ssn: {type: text}",
    "birth_date: {type: date}",
    "notes: {type: text}",
];

fn cmk(setup: &EncryptedSetup, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .arg("--config")
        .arg(setup.proxy.config_path())
        .output()
        .expect("run cmk-proxy");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `keys list` rows: (state, cells).
fn key_list(setup: &EncryptedSetup, tenant: &str) -> Vec<(String, i64)> {
    let (code, out) = cmk(setup, &["keys", "list", "--tenant", tenant]);
    assert_eq!(code, Some(0), "{out}");
    out.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(2)?.to_string(), fields.get(3)?.parse().ok()?))
        })
        .collect()
}

async fn snapshot(client: &tokio_postgres::Client) -> HashMap<String, Vec<Option<String>>> {
    rows(
        client,
        "SELECT id, tenant_id, ssn, birth_date, notes, visits FROM patients ORDER BY id",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone().unwrap_or_default(), r))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reencrypt_after_rotation_leaves_no_cell_on_the_retired_key() {
    let setup = EncryptedSetup::start_configured(
        LEGACY,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1s\n",
    )
    .await;
    let before = snapshot(&setup.direct).await;
    let (code, out) = cmk(&setup, &["encrypt", "--table", "public.patients"]);
    assert_eq!(code, Some(0), "{out}");
    // Run again on the finished table: nothing to do.
    let (code, out) = cmk(&setup, &["encrypt", "--table", "public.patients"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already in the policy's format"), "{out}");

    // acme: 200 rows, 3 cells each but 40 NULL notes.
    let sealed = 200 * 3 - 40;
    assert_eq!(
        key_list(&setup, "acme"),
        vec![("current".to_owned(), sealed)]
    );
    let (code, out) = cmk(&setup, &["keys", "rotate", "--tenant", "acme"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        key_list(&setup, "acme"),
        vec![("retired".to_owned(), sealed), ("current".to_owned(), 0)]
    );

    let (code, out) = cmk(
        &setup,
        &["reencrypt", "--tenant", "acme", "--batch-size", "64"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{sealed} cells moved")), "{out}");
    assert_eq!(
        key_list(&setup, "acme"),
        vec![("retired".to_owned(), 0), ("current".to_owned(), sealed)]
    );
    // globex untouched; a second run finds nothing left.
    assert_eq!(
        key_list(&setup, "globex"),
        vec![("current".to_owned(), sealed)]
    );
    let (code, out) = cmk(&setup, &["reencrypt", "--tenant", "acme"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("0 rows rewritten"), "{out}");

    // The rows' EDEK copies name the current DEK only.
    let edeks = rows(
        &setup.direct,
        "SELECT DISTINCT (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(cmk_edek) k)::text \
         FROM patients WHERE tenant_id = 'acme'",
    )
    .await;
    assert_eq!(edeks.len(), 1, "{edeks:?}");
    let current = rows(
        &setup.direct,
        "SELECT dek_id::text FROM cmk.data_keys WHERE tenant_id = 'acme' AND retired_at IS NULL",
    )
    .await;
    assert_eq!(
        edeks[0][0].as_deref(),
        Some(format!("{{{}}}", current[0][0].as_deref().unwrap()).as_str())
    );

    // Every row reads back as before through the proxy.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let app = setup.app().await;
    assert_eq!(snapshot(&app).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn reencrypt_records_its_position_and_resumes_after_sigkill() {
    let schema = "CREATE TABLE patients (
        id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, birth_date date, notes text,
        visits int NOT NULL DEFAULT 0);
    INSERT INTO patients (id, tenant_id, ssn, birth_date, notes) SELECT i, (ARRAY['acme', 'globex'])[1 + i % 2], 'ssn-' || i,
        DATE '1960-01-01' + i % 9000, 'note ' || i FROM generate_series(1, 6000) AS i;";
    let setup = EncryptedSetup::start_configured(
        schema,
        "public.patients",
        COLUMNS,
        "",
        "",
        "server:\n  catalog_refresh: 1s\n",
    )
    .await;
    let before = snapshot(&setup.direct).await;
    let (code, out) = cmk(&setup, &["encrypt", "--table", "public.patients"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cmk(&setup, &["keys", "rotate", "--tenant", "acme"]);
    assert_eq!(code, Some(0), "{out}");
    let sealed = 3000 * 3;
    assert_eq!(
        key_list(&setup, "acme"),
        vec![("retired".to_owned(), sealed), ("current".to_owned(), 0)]
    );

    // Killed with SIGKILL once its position has moved past id 600.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args([
            "reencrypt",
            "--tenant",
            "acme",
            "--batch-size",
            "10",
            "--config",
        ])
        .arg(setup.proxy.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn reencrypt");
    let mut position = None;
    for _ in 0..2000 {
        let found = setup
            .direct
            .query_opt(
                "SELECT resume_after[1]::int FROM cmk.positions \
                 WHERE task = 'reencrypt public.patients tenant acme'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, i32>(0));
        if found.is_some_and(|p| p > 600) {
            child.kill().expect("SIGKILL reencrypt");
            position = found;
            break;
        }
        if child.try_wait().expect("poll reencrypt").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = child.wait();
    assert!(
        position.is_some(),
        "reencrypt ended before it could be killed"
    );
    // Every acme row up to the recorded position is on the current DEK.
    let current = rows(
        &setup.direct,
        "SELECT dek_id::text FROM cmk.data_keys WHERE tenant_id = 'acme' AND retired_at IS NULL",
    )
    .await[0][0]
        .clone()
        .unwrap();
    let recorded: i32 = setup
        .direct
        .query_one(
            "SELECT resume_after[1]::int FROM cmk.positions WHERE task = 'reencrypt public.patients tenant acme'",
            &[],
        )
        .await
        .expect("the position survives the kill")
        .get(0);
    let stale: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM patients WHERE tenant_id = 'acme' AND id <= $1 \
             AND substr(ssn, 5, 16) <> decode(replace($2, '-', ''), 'hex')",
            &[&recorded, &current],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "rows before the recorded position are done");

    // A cell on the retired DEK planted before the position (acme's ssn of
    // the table's last row, copied to row 2): a run that resumes after the
    // position does not see it; only the next run from the start does.
    setup
        .direct
        .batch_execute(
            "UPDATE patients SET ssn = (SELECT ssn FROM patients WHERE id = 6000), \
             cmk_edek = cmk_edek || (SELECT cmk_edek FROM patients WHERE id = 6000) WHERE id = 2",
        )
        .await
        .unwrap();
    let rewritten = |out: &str| -> u64 {
        out.split(" rows rewritten")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .expect(out)
    };

    // Started again: it goes on after the position (fewer rows than the
    // tenant has), forgets its position at the end of the table.
    let (code, out) = cmk(
        &setup,
        &["reencrypt", "--tenant", "acme", "--batch-size", "500"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(rewritten(&out) > 0 && rewritten(&out) < 3000, "{out}");
    assert_eq!(
        key_list(&setup, "acme"),
        vec![
            ("retired".to_owned(), 1),
            ("current".to_owned(), sealed - 1)
        ]
    );
    assert_eq!(
        rows(&setup.direct, "SELECT count(*) FROM cmk.positions").await,
        vec![vec![Some("0".to_owned())]]
    );
    // The next run starts from the beginning: the planted cell moves too.
    let (code, out) = cmk(&setup, &["reencrypt", "--tenant", "acme"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rewritten(&out), 1, "{out}");
    assert_eq!(
        key_list(&setup, "acme"),
        vec![("retired".to_owned(), 0), ("current".to_owned(), sealed)]
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let app = setup.app().await;
    let mut expected = before;
    let last_ssn = expected["6000"][2].clone();
    if let Some(row) = expected.get_mut("2") {
        row[2] = last_ssn;
    }
    assert_eq!(snapshot(&app).await, expected);
}
