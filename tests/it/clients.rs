//! Real client libraries through the proxy: psql, psycopg 3, node-postgres and
//! pgJDBC each run a full session (TLS with certificate verification, SCRAM,
//! DDL, prepared statements, rollback, COPY, cancel) from `integration/`.
//! The client programs assert their own results; these tests start PostgreSQL
//! and the proxy, run one program, and require exit code 0.
//! A missing client runtime is a failure ("run scripts/install-deps.sh").

use crate::common;

use std::path::Path;

use common::clients::*;

fn setup() -> ClientSetup {
    tls_setup("", |_| {})
}

#[test]
fn psql_session_through_proxy_over_tls_scram() {
    require_command("psql", "psql (postgresql-client)");
    let script = repo().join("integration/psql/session.sh");
    require(&script, "integration/psql/session.sh");
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("bash"),
        &[script.to_str().expect("utf-8 path")],
        &repo(),
        &[],
    );
}

#[test]
fn python_psycopg_session_through_proxy_over_tls_scram() {
    let python = repo().join(".venv/bin/python");
    require(&python, "Python venv (.venv with psycopg)");
    let script = repo().join("integration/python/session.py");
    require(&script, "integration/python/session.py");
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        &python,
        &[script.to_str().expect("utf-8 path")],
        &repo(),
        &[],
    );
}

#[test]
fn node_pg_session_through_proxy_over_tls_scram() {
    require_command("node", "Node.js");
    let dir = repo().join("integration/node");
    require(
        &dir.join("node_modules/pg/package.json"),
        "node-postgres (integration/node/node_modules)",
    );
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("node"),
        &["session.js"],
        &dir,
        &[],
    );
}

#[test]
fn java_jdbc_session_through_proxy_over_tls_scram() {
    let classpath = require_java_class("Session");
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("java"),
        &["-cp", &classpath, "Session"],
        &repo().join("integration/java"),
        &[],
    );
}

#[test]
fn psql_session_through_proxy_with_sslmode_require() {
    require_command("psql", "psql (postgresql-client)");
    let script = repo().join("integration/psql/session.sh");
    require(&script, "integration/psql/session.sh");
    let setup = setup();
    run_client(
        &setup,
        "require",
        Path::new("bash"),
        &[script.to_str().expect("utf-8 path")],
        &repo(),
        &[],
    );
}
