//! `cmk` schema migrations against a real PostgreSQL: idempotent, safe from
//! several replicas at once, and the CLI applies or prints them.

use crate::support::pg as support;

use std::process::Command;
use std::time::Duration;

use cmk_proxy::keys::{migrate, Registry, MIGRATIONS};
use support::*;

async fn version_rows(client: &tokio_postgres::Client) -> Vec<(i32, i64)> {
    client
        .query(
            "SELECT version, count(*) FROM cmk.schema_version GROUP BY version ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_the_second_time() {
    let env = key_env(&[], Duration::from_secs(60));
    let registry = Registry::new(&env.policy).unwrap();
    let client = registry.connect_dedicated().await.unwrap();
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(migrate(&client).await.unwrap(), all);
    assert_eq!(migrate(&client).await.unwrap(), Vec::<u32>::new());
    let admin = admin(&env.pg, "app").await;
    let expected: Vec<(i32, i64)> = all.iter().map(|v| (*v as i32, 1)).collect();
    assert_eq!(version_rows(&admin).await, expected);
    let tables: Vec<String> = admin
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'cmk' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "adoptions",
            "data_keys",
            "positions",
            "schema_version",
            "tenants"
        ]
    );
}

#[tokio::test]
async fn four_replicas_migrating_at_once_create_one_schema_and_record_versions_once() {
    let env = key_env(&[], Duration::from_secs(60));
    let registry = std::sync::Arc::new(Registry::new(&env.policy).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let registry = registry.clone();
        tasks.push(tokio::spawn(async move {
            let client = registry.connect_dedicated().await.unwrap();
            migrate(&client).await
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.push(t.await.unwrap().expect("a replica's migration failed"));
    }
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(
        applied.iter().filter(|a| **a == all).count(),
        1,
        "{applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|a| a.is_empty()).count(),
        3,
        "{applied:?}"
    );
    let admin = admin(&env.pg, "app").await;
    let expected: Vec<(i32, i64)> = all.iter().map(|v| (*v as i32, 1)).collect();
    assert_eq!(version_rows(&admin).await, expected);
}

#[tokio::test]
async fn migrate_cli_applies_then_reports_up_to_date_and_print_shows_ddl() {
    let env = key_env(&[], Duration::from_secs(60));
    let bin = env!("CARGO_BIN_EXE_cmk-proxy");
    let upstream = env.policy.upstream.clone();
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = write_policy_yaml(&env);
    let config = config.to_str().unwrap();
    let (code, out, err) = run(&["migrate", "--config", config]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("applied cmk schema versions 1"), "{out}");
    let (code, out, err) = run(&["migrate", "--upstream", &upstream, "--config", config]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("up to date"), "{out}");
    let (code, ddl, _) = run(&["migrate", "--print"]);
    assert_eq!(code, Some(0));
    assert!(
        ddl.contains("CREATE TABLE IF NOT EXISTS cmk.data_keys"),
        "{ddl}"
    );
    // The printed script is valid SQL that leaves the same schema behind.
    env.pg.create_database("printed").unwrap();
    let printed = admin(&env.pg, "printed").await;
    printed.batch_execute(&ddl).await.unwrap();
    printed.batch_execute(&ddl).await.unwrap();
    assert_eq!(version_rows(&printed).await, vec![(1, 1), (2, 1), (3, 1)]);
    let (code, _, err) = run(&["migrate", "--upstream", "mysql://x"]);
    assert_eq!(code, Some(2), "{err}");
}
