//! The upstream connection string is read as libpq reads it (issue 17):
//! a password with `+`, `&` and `=` reaches PostgreSQL unchanged, in the
//! URI form and in the key=value form.

use crate::common;

use std::process::Command;

use common::*;

#[tokio::test]
async fn upstream_password_with_plus_and_ampersand_authenticates() {
    let pg = pg();
    let (admin, _h) = connect(&pg.admin_url("app")).await;
    admin
        .batch_execute("CREATE ROLE plus_user LOGIN SUPERUSER PASSWORD 'p+q&r=s'")
        .await
        .unwrap();
    let port = pg.port();
    for upstream in [
        format!("postgres://plus_user:p+q&r=s@127.0.0.1:{port}/app"),
        format!("postgresql://plus_user:p%2Bq%26r%3Ds@127.0.0.1:{port}/app?sslmode=prefer"),
        format!("host=127.0.0.1 port={port} user=plus_user password='p+q&r=s' dbname=app"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args(["migrate", "--upstream", &upstream])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{upstream}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let versions: i64 = admin
        .query_one("SELECT count(*) FROM cmk.schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert!(versions > 0);
}
