//! `cmk-proxy dev`: a local PostgreSQL plus the proxy in one command, the
//! first thing a new user runs.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn dev_demo_shows_encrypt_decrypt_revoke_and_exits_0() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["dev", "--exit-after-demo", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .expect("run cmk-proxy dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.contains(&format!(
            "DATABASE_URL=postgres://scram_user:scram_pw@127.0.0.1:{port}/app"
        )),
        "{stdout}"
    );
    // Encrypt, decrypt, revoke, refuse, restore.
    assert!(
        stdout.contains("ssn = \\x434d4b01"),
        "ciphertext at rest: {stdout}"
    );
    assert!(
        stdout.contains("1 | acme | 123-45-6789 | 1980-01-02 | allergic to penicillin"),
        "plaintext through the proxy: {stdout}"
    );
    assert!(
        stdout.contains("ERROR KM001"),
        "revoked tenant refused: {stdout}"
    );
    assert!(
        stdout.contains("ERROR KM003"),
        "unsupported query refused: {stdout}"
    );
    assert!(
        stdout.contains("2 | globex | 987-65-4321"),
        "restored: {stdout}"
    );
    assert!(stdout.contains("demo complete"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_printed_url_until_ctrl_c() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["dev", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cmk-proxy dev");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Keep draining stdout so the child never writes into a closed pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("DATABASE_URL=") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(url.to_owned());
                }
            }
        }
    });
    let url = rx.await.expect("dev printed no DATABASE_URL");

    let (client, _h) = connect(&url).await;
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "scram_user");
    assert_eq!(row.get::<_, String>(1), "app");
    drop(client);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    // Hang guard only.
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("dev did not stop on Ctrl-C")
    });
    assert!(status.success(), "{status}");
}
