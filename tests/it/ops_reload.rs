//! Configuration reload: SIGHUP, `cmk-proxy reload --pid-file` and `POST
//! /reload`. A live session sees a newly protected column at its next
//! statement; a broken file is refused as a whole (old policy stays,
//! errors logged and counted); the log level follows the file; sessions
//! under load lose no transaction across ten reloads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::encryption::{assert_sealed, rows, EncryptedSetup};
use crate::common::{connect, pg, run_cmk_proxy, start_proxy_args};
use crate::ops_admin::{admin, admin_yaml, encrypted_with_admin, sample, scrape};

const SSN_ONLY: &str = "      ssn: {type: text}\n";
const SSN_AND_NOTES: &str = "      ssn: {type: text}\n      notes: {type: text}\n";

/// Replaces `from` by `to` in the proxy's policy file.
fn edit_policy(setup: &EncryptedSetup, from: &str, to: &str) {
    let path = setup.proxy.config_path();
    let text = std::fs::read_to_string(&path).expect("read policy");
    assert!(text.contains(from), "{from:?} not in\n{text}");
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write policy");
}

/// Waits until the proxy's log shows `needle` `times` times (hang guard only).
fn wait_log(proxy: &crate::common::Proxy, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.log_text().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} x{times} in\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sighup(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("send SIGHUP");
}

#[tokio::test]
async fn sighup_reload_protects_a_new_column_for_a_live_session() {
    let (setup, port) = encrypted_with_admin("").await;
    let app = setup.app().await;
    app.batch_execute(
        "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES (1, 'acme', '111', 'before')",
    )
    .await
    .expect("insert before");
    let stored: bool = setup
        .direct
        .query_one(
            "SELECT notes = 'before'::bytea FROM patients WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored, "notes is not protected before the reload");

    edit_policy(&setup, SSN_ONLY, SSN_AND_NOTES);
    sighup(setup.proxy.pid());
    wait_log(&setup.proxy, "configuration reloaded", 1);

    // The same session, its next statement: notes is sealed and opened.
    app.batch_execute(
        "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES (2, 'acme', '222', 'after')",
    )
    .await
    .expect("insert after");
    assert_sealed(
        &setup.direct,
        "SELECT notes FROM patients WHERE id = 2",
        "notes after the reload",
    )
    .await;
    assert_eq!(
        rows(&app, "SELECT ssn, notes FROM patients WHERE id = 2").await,
        vec![vec![Some("222".to_owned()), Some("after".to_owned())]]
    );
    let m = scrape(port).await;
    assert_eq!(
        sample(&m, "cmk_proxy_config_reloads_total", &[("outcome", "ok")]),
        1.0
    );
}

#[tokio::test]
async fn broken_policy_file_is_refused_and_the_old_policy_stays() {
    let (setup, port) = encrypted_with_admin("").await;
    let app = setup.app().await;
    let original = std::fs::read_to_string(setup.proxy.config_path()).unwrap();
    edit_policy(
        &setup,
        SSN_ONLY,
        "      ssn: {type: txet}\n      notes: {type: text, serach: equality}\n",
    );
    let (status, body) = admin(port, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["outcome"], "error", "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("txet") && error.contains("serach"),
        "every error is named: {error}"
    );
    let log = setup.proxy.log_text();
    assert!(log.contains("configuration reload refused"), "{log}");
    let m = scrape(port).await;
    assert_eq!(
        sample(
            &m,
            "cmk_proxy_config_reloads_total",
            &[("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "cmk_proxy_config_reloads_total", &[("outcome", "ok")]),
        0.0
    );
    let ready: serde_json::Value =
        serde_json::from_str(&admin(port, "GET", "/readyz").await.1).unwrap();
    assert!(
        ready["last_reload"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error"),
        "{ready}"
    );

    // The old policy serves the live session and new ones: ssn sealed,
    // notes still unprotected.
    for client in [&app, &setup.app().await] {
        client
            .batch_execute(
                "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '333', 'plain')",
            )
            .await
            .expect("insert under the old policy");
    }
    assert_sealed(
        &setup.direct,
        "SELECT ssn FROM patients ORDER BY id DESC LIMIT 1",
        "ssn under the old policy",
    )
    .await;
    let plain: i64 = setup
        .direct
        .query_one(
            "SELECT count(*) FROM patients WHERE notes = 'plain'::bytea",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 2, "notes stayed unprotected");

    // Mended, the file is taken.
    std::fs::write(setup.proxy.config_path(), original).unwrap();
    assert_eq!(admin(port, "POST", "/reload").await.0, 200);
}

/// Waits until `config_reloads_total{outcome="ok"}` reaches `count`.
async fn wait_reloads(port: u16, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(port).await;
        if sample(&m, "cmk_proxy_config_reloads_total", &[("outcome", "ok")]) >= count {
            return;
        }
        assert!(Instant::now() < deadline, "reload {count} not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session, runs one query and closes it.
async fn one_session(url: &str) {
    let (client, _conn) = connect(url).await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn reload_command_signals_the_pid_file_and_the_log_level_follows() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("cmk-proxy.pid");
    let (admin_yaml, port) = admin_yaml();
    let proxy = start_proxy_args(
        &pg,
        &format!("{admin_yaml}server:\n  log_level: info\n"),
        &["--pid-file", pid_file.to_str().unwrap()],
    );
    let written = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(written.trim(), proxy.pid().to_string());
    let url = proxy.url("postgres", "", "app");
    one_session(&url).await;
    wait_log(&proxy, "session started", 1);

    let policy = std::fs::read_to_string(proxy.config_path()).unwrap();
    std::fs::write(
        proxy.config_path(),
        policy.replace("log_level: info", "log_level: warn"),
    )
    .unwrap();
    let (ok, out) = run_cmk_proxy(["reload", "--pid-file", pid_file.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_reloads(port, 1.0).await;
    one_session(&url).await;

    std::fs::write(proxy.config_path(), &policy).unwrap();
    sighup(proxy.pid());
    wait_reloads(port, 2.0).await;
    one_session(&url).await;
    wait_log(&proxy, "session started", 2);
    assert_eq!(
        proxy.log_text().matches("session started").count(),
        2,
        "log_level: warn hid the second session's info line:\n{}",
        proxy.log_text()
    );

    let (ok, out) = run_cmk_proxy(["reload", "--pid-file", "/nonexistent/pid"]);
    assert!(!ok && out.contains("cannot read"), "{out}");
}

#[tokio::test]
async fn sessions_under_load_lose_no_transaction_across_ten_reloads() {
    let (setup, port) = encrypted_with_admin("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4i32 {
        let app = setup.app().await;
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0i32;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let id = worker * 1_000_000 + n;
                let tx = async {
                    app.batch_execute("BEGIN").await?;
                    app.execute(
                        "INSERT INTO patients (id, tenant_id, ssn) VALUES ($1, 'acme', $2)",
                        &[&id, &format!("ssn-{id}")],
                    )
                    .await?;
                    let row = app
                        .query_one("SELECT ssn FROM patients WHERE id = $1", &[&id])
                        .await?;
                    let ssn: String = row.get(0);
                    app.batch_execute(&format!(
                        "UPDATE patients SET ssn = 'x{id}' WHERE id = {id} AND tenant_id = 'acme'"
                    ))
                    .await?;
                    app.batch_execute("COMMIT").await?;
                    Ok::<_, tokio_postgres::Error>(ssn)
                };
                match tx.await {
                    Ok(ssn) if ssn == format!("ssn-{id}") => {
                        done.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(ssn) => failures.push(format!("{id}: read {ssn}")),
                    Err(e) => {
                        failures.push(format!("{id}: {e:?}"));
                        let _ = app.batch_execute("ROLLBACK").await;
                    }
                }
            }
            failures
        }));
    }
    for round in 0..10 {
        let (from, to) = if round % 2 == 0 {
            (SSN_ONLY, SSN_AND_NOTES)
        } else {
            (SSN_AND_NOTES, SSN_ONLY)
        };
        edit_policy(&setup, from, to);
        let (status, body) = admin(port, "POST", "/reload").await;
        assert_eq!(status, 200, "reload {round}: {body}");
        // Transactions complete after each reload before the next one.
        let seen = done.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::Acquire) < seen + 8 {
            assert!(
                Instant::now() < deadline,
                "no progress after reload {round}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Release);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    assert!(failures.is_empty(), "failed transactions: {failures:#?}");
    let committed: i64 = setup
        .direct
        .query_one("SELECT count(*) FROM patients", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed as u64, done.load(Ordering::Acquire));
    let m = scrape(port).await;
    assert_eq!(
        sample(&m, "cmk_proxy_config_reloads_total", &[("outcome", "ok")]),
        10.0
    );
}
