//! The policy checked against a live schema: each mismatch is reported with
//! the DDL that fixes it, and the catalog map finds protected columns by
//! (table OID, attnum).

use crate::common;

use std::process::Command;

use cmk_proxy::catalog::{self, ColumnRole};
use cmk_proxy::config::{parse_policy, DeclaredType};

fn policy_text(upstream: &str) -> String {
    format!(
        "upstream: {upstream}\ntls: {{upstream: {{mode: disable}}}}\ntables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {{type: text, search: equality}}\n      birth_date: {{type: date}}\n"
    )
}

#[tokio::test]
async fn check_config_live_reports_each_mismatch_with_fixing_ddl() {
    let pg = common::pg();
    let (admin, _conn) = common::connect(&pg.admin_url("app")).await;
    admin
        .batch_execute("CREATE TABLE patients (id serial primary key, tenant_id text not null, ssn text, notes text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy_text(&pg.admin_url("app"))).unwrap();

    let run = || {
        Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args(["check-config", "--live"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("public.patients.ssn: stored as text, must be bytea"),
        "{stderr}"
    );
    assert!(
        stderr.contains("public.patients.birth_date: column does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("public.patients.cmk_edek: column does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("public.patients.ssn_bidx: column does not exist"),
        "{stderr}"
    );

    // Applying every printed fix makes the schema match.
    let fixes: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fix: "))
        .collect();
    assert_eq!(fixes.len(), 4, "{stderr}");
    for fix in fixes {
        admin.batch_execute(fix).await.unwrap();
    }
    // With the columns bytea, the envelope CHECK constraints come next.
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let fixes: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fix: "))
        .collect();
    // Two envelope CHECKs, and the blind-index CHECK of searchable ssn.
    assert_eq!(fixes.len(), 3, "{stderr}");
    assert!(
        stderr.contains("public.patients.ssn: has no CHECK constraint refusing"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "public.patients.ssn: has no CHECK constraint that every value has a blind index"
        ),
        "{stderr}"
    );
    for fix in fixes {
        admin.batch_execute(fix).await.unwrap();
    }
    let out = run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("schema matches"));
}

#[tokio::test]
async fn migrate_print_with_a_policy_prints_the_cmk_schema_and_every_table_fix() {
    let pg = common::pg();
    let (admin, _conn) = common::connect(&pg.admin_url("app")).await;
    admin
        .batch_execute(
            "CREATE TABLE patients (id serial primary key, tenant_id text not null, \
             ssn bytea DEFAULT '\\x00', birth_date date)",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy_text(&pg.admin_url("app"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["migrate", "--print", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CREATE SCHEMA"), "{stdout}");
    for fix in [
        "ALTER TABLE public.patients ALTER COLUMN ssn DROP DEFAULT;",
        "ALTER TABLE public.patients ALTER COLUMN birth_date TYPE bytea",
        "ALTER TABLE public.patients ADD COLUMN ssn_bidx bytea;",
        "ALTER TABLE public.patients ADD COLUMN cmk_edek jsonb;",
    ] {
        assert!(stdout.contains(fix), "{fix} missing in:\n{stdout}");
    }
    // Printing changed nothing.
    let has_edek: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE column_name = 'cmk_edek')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!has_edek);
}

#[tokio::test]
async fn catalog_map_finds_protected_columns_by_oid_and_attnum() {
    let pg = common::pg();
    let (admin, _conn) = common::connect(&pg.admin_url("app")).await;
    admin
        .batch_execute(
            "CREATE TABLE patients (id serial primary key, tenant_id text not null, ssn bytea, \
             ssn_bidx bytea, birth_date bytea, cmk_edek jsonb, notes text)",
        )
        .await
        .unwrap();
    let policy = parse_policy(&policy_text(&pg.admin_url("app")), "test").unwrap();
    let map = catalog::load_map(&admin, &policy).await.unwrap();
    let oid: u32 = admin
        .query_one("SELECT 'public.patients'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(map.table_oid("public.patients"), Some(oid));
    let ssn = map.lookup(oid, 3).expect("ssn mapped");
    assert_eq!(&*ssn.column, "ssn");
    assert_eq!(ssn.role, ColumnRole::Protected(DeclaredType::Text));
    assert_eq!(
        map.lookup(oid, 4).map(|c| c.role.clone()),
        Some(ColumnRole::BlindIndex)
    );
    assert_eq!(
        map.lookup(oid, 5).map(|c| c.role.clone()),
        Some(ColumnRole::Protected(DeclaredType::Date))
    );
    assert_eq!(
        map.lookup(oid, 6).map(|c| c.role.clone()),
        Some(ColumnRole::Edek)
    );
    assert_eq!(
        map.lookup(oid, 2).map(|c| c.role.clone()),
        Some(ColumnRole::Tenant)
    );
    assert!(map.lookup(oid, 7).is_none(), "notes is not protected");
    assert!(map.lookup(0, 3).is_none());
}
