//! Configuration errors: `check-config` and `serve` both refuse a bad policy
//! with exit code 2 and name every problem with its location (issue 3).

use std::process::{Command, Output};

fn cmk_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .output()
        .expect("run cmk-proxy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes `yaml`, runs `check-config` and `serve` on it, asserts exit 2 for
/// both, and returns check-config's output.
fn rejected(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, yaml).unwrap();
    let file = path.to_str().unwrap();
    let check = cmk_proxy(&["check-config", file]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "check-config: {}",
        text(&check)
    );
    let serve = cmk_proxy(&["serve", "--config", file]);
    assert_eq!(serve.status.code(), Some(2), "serve: {}", text(&serve));
    assert!(
        text(&serve).contains(file),
        "serve does not name the file: {}",
        text(&serve)
    );
    text(&check)
}

#[test]
fn unknown_key_is_reported_with_its_line_and_exit_code_2() {
    let out = rejected(
        "listen: 127.0.0.1:6432\nupstream: postgres://127.0.0.1:5432/app\nlisten_port: 5\n",
    );
    assert!(out.contains("listen_port"), "{out}");
    assert!(out.contains("line 3"), "{out}");
}

#[test]
fn unknown_nested_key_is_reported_with_its_line() {
    let out = rejected("server:\n  shutdown_timeout: 5s\n  max_mesage_size: 10\n");
    assert!(out.contains("max_mesage_size"), "{out}");
    assert!(out.contains("line 3"), "{out}");
}

#[test]
fn zero_worker_threads_is_reported_with_its_line() {
    let out = rejected("server:\n  shutdown_timeout: 5s\n  worker_threads: 0\n");
    assert!(out.contains("worker_threads"), "{out}");
    assert!(out.contains("line 3"), "{out}");
}

#[test]
fn missing_required_field_is_reported_with_its_location() {
    let out = rejected("tables:\n  public.patients:\n    columns:\n      ssn: {type: text}\n");
    assert!(out.contains("tenant_column"), "{out}");
    assert!(out.contains("line"), "{out}");
}

#[test]
fn bad_listen_address_is_reported_with_its_location() {
    let out = rejected("listen: 127.0.0.1:not-a-port\n");
    assert!(out.contains("line 1"), "{out}");
}

#[test]
fn bad_upstream_url_is_reported_under_upstream() {
    let out = rejected("upstream: mysql://db:3306/app\n");
    assert!(out.contains("upstream"), "{out}");
    assert!(out.contains("mysql"), "{out}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let out = rejected(
        "upstream: mysql://x\n\
         tenants:\n  acme: {provider: nowhere, key: k}\n\
         tables:\n  patients:\n    tenant_column: tenant_id\n    columns: {}\n",
    );
    for location in [
        "upstream",
        "tenants.acme.provider",
        "tables.patients",
        "tables.patients.columns",
    ] {
        assert!(out.contains(location), "{location} missing from:\n{out}");
    }
}

#[test]
fn missing_certificate_files_are_reported() {
    let out =
        rejected("tls:\n  client: {cert: /nonexistent/cert.pem, key: /nonexistent/key.pem}\n");
    assert!(out.contains("tls.client.cert"), "{out}");
    assert!(out.contains("tls.client.key"), "{out}");
}

#[test]
fn unreadable_policy_file_exits_2() {
    let check = cmk_proxy(&["check-config", "/nonexistent/policy.yaml"]);
    assert_eq!(check.status.code(), Some(2), "{}", text(&check));
    assert!(
        text(&check).contains("/nonexistent/policy.yaml"),
        "{}",
        text(&check)
    );
    let serve = cmk_proxy(&["serve", "--config", "/nonexistent/policy.yaml"]);
    assert_eq!(serve.status.code(), Some(2), "{}", text(&serve));
}

#[test]
fn bad_upstream_flag_exits_2() {
    let serve = cmk_proxy(&[
        "serve",
        "--upstream",
        "not a url",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(serve.status.code(), Some(2), "{}", text(&serve));
    assert!(text(&serve).contains("upstream"), "{}", text(&serve));
}

#[test]
fn valid_policy_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:6432\nupstream: postgres://127.0.0.1:5432/app\nserver: {shutdown_timeout: 5s}\n",
    )
    .unwrap();
    let check = cmk_proxy(&["check-config", path.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
}

#[test]
fn zero_catalog_refresh_is_refused() {
    let out = rejected("server:\n  catalog_refresh: 0s\n");
    assert!(out.contains("server.catalog_refresh"), "{out}");
    assert!(out.contains("greater than zero"), "{out}");
}
