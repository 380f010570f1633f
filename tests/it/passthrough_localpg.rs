//! The harness itself: a local PostgreSQL with the test roles and their
//! authentication methods, reached directly (no proxy). If these fail, every
//! proxy test fails for a harness reason, not a proxy one.

use crate::common;

use cmk_proxy::localpg::LocalPostgresOptions;
use common::*;

#[tokio::test]
async fn local_postgres_serves_every_test_role_with_its_auth_method() {
    let pg = pg();
    for (user, pw, method) in [
        ("scram_user", "scram_pw", "scram-sha-256"),
        ("md5_user", "md5_pw", "md5"),
        ("plain_user", "plain_pw", "password"),
    ] {
        let (client, _h) = connect(&pg.url(user, pw, "app")).await;
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user, "{method}");
        assert_eq!(row.get::<_, String>(1), "app");
        client
            .batch_execute(&format!(
                "CREATE TABLE t_{user} (id int); DROP TABLE t_{user};"
            ))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot use schema public: {e}"));
        let err = try_connect(&pg.url(user, "wrong", "app"))
            .await
            .expect_err("wrong password accepted");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{user}: {err}");
    }
    let (admin, _h) = connect(&pg.admin_url("app")).await;
    let md5: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(md5.starts_with("md5"), "md5_user must have an md5 hash");
}

#[tokio::test]
async fn local_postgres_tls_verifies_against_its_ca() {
    let pg = pg();
    let ca = pg.ca_cert_path().expect("tls on").to_owned();
    let (client, _h) = connect_tls(&pg.url("scram_user", "scram_pw", "app"), &ca).await;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
}

#[tokio::test]
async fn local_postgres_stops_starts_again_and_creates_databases() {
    let pg = pg_with(LocalPostgresOptions {
        tls: false,
        ..Default::default()
    });
    assert!(pg.ca_cert_path().is_none());
    pg.create_database("other").unwrap();
    {
        let (c, _h) = connect(&pg.url("scram_user", "scram_pw", "other")).await;
        c.batch_execute("CREATE TABLE keep (v int); INSERT INTO keep VALUES (7)")
            .await
            .unwrap();
    }
    pg.stop().unwrap();
    assert!(try_connect(&pg.admin_url("other")).await.is_err());
    pg.start_again().unwrap();
    let (c, _h) = connect(&pg.admin_url("other")).await;
    let v: i32 = c.query_one("SELECT v FROM keep", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    assert!(pg.log_path().is_file());
}

#[tokio::test]
async fn local_postgres_in_a_given_data_dir_keeps_and_reuses_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let opts = LocalPostgresOptions {
        tls: false,
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    {
        let pg = pg_with(opts.clone());
        let (c, _h) = connect(&pg.admin_url("app")).await;
        c.batch_execute("CREATE TABLE survives (v int); INSERT INTO survives VALUES (42)")
            .await
            .unwrap();
    }
    assert!(
        data.join("PG_VERSION").is_file(),
        "a given data dir must be kept"
    );
    let pg = pg_with(opts);
    let (c, _h) = connect(&pg.admin_url("app")).await;
    let v: i32 = c
        .query_one("SELECT v FROM survives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
}
