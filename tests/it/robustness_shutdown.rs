//! Graceful shutdown: on SIGTERM the proxy stops accepting, lets open sessions
//! finish their work, and exits 0 (issue 3).

use crate::common;

use std::time::Duration;

use common::*;

/// Generous hang guard; the policy's shutdown_timeout is 5 s.
const EXIT_WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_transaction_finish_and_exits_0() {
    let pg = pg();
    // With two session threads (the other test runs with one).
    let mut proxy = start_proxy(&pg, "server: {shutdown_timeout: 5s, worker_threads: 2}\n");
    let url = proxy.url("scram_user", "scram_pw", "app");
    let (client, _h) = connect(&url).await;
    client
        .batch_execute("CREATE TABLE work (step int); BEGIN; INSERT INTO work VALUES (1)")
        .await
        .unwrap();

    proxy.sigterm();

    // New sessions are refused once the signal is handled (hang guard 20 s).
    let mut refused = false;
    for _ in 0..400 {
        if try_connect(&url).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "new sessions are still accepted after SIGTERM");

    // The open session finishes its transaction.
    client
        .batch_execute("INSERT INTO work VALUES (2); COMMIT")
        .await
        .expect("the open session was cut before its shutdown_timeout");
    drop(client);

    let status = tokio::task::block_in_place(|| proxy.wait_exit_for(EXIT_WAIT))
        .expect("the proxy did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        proxy.log_text()
    );

    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    let steps: i64 = admin
        .query_one("SELECT count(*) FROM work", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(steps, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_idle_session_past_the_timeout_closes_it_with_57p01_and_exits_0() {
    let pg = pg();
    let mut proxy = start_proxy(&pg, "server: {shutdown_timeout: 1s, worker_threads: 1}\n");
    let (client, connection) = tokio_postgres::connect(
        &proxy.url("scram_user", "scram_pw", "app"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    proxy.sigterm();
    let status = tokio::task::block_in_place(|| proxy.wait_exit_for(EXIT_WAIT))
        .expect("the proxy did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        proxy.log_text()
    );
    // The idle session was told why it was closed.
    let ended = connection.await.unwrap();
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("session outlived the proxy");
    let codes: Vec<String> = [ended.as_ref().err().and_then(sqlstate), sqlstate(&err)]
        .into_iter()
        .flatten()
        .collect();
    assert!(
        codes.iter().any(|c| c == "57P01"),
        "no 57P01 for the closed session: connection {ended:?}, query {err:?}"
    );
}
