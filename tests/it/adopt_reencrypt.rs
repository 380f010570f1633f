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
