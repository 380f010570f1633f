//! The upstream going away: PostgreSQL stopped and restarted under a running
//! proxy, and an upstream that is not there at all (issue 3).

use crate::common;

use common::*;
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopping_errors_live_sessions_and_new_ones_until_it_is_back() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let url = proxy.url("scram_user", "scram_pw", "app");

    // A live session whose connection result we can inspect.
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();

    pg.stop().unwrap();

    let query_err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("a query succeeded with PostgreSQL stopped");
    let conn_result = connection.await.unwrap();
    let codes: Vec<String> = [sqlstate(&query_err)]
        .into_iter()
        .chain([conn_result.as_ref().err().and_then(sqlstate)])
        .flatten()
        .collect();
    assert!(
        codes.iter().any(|c| c == "57P01" || c == "08006"),
        "the live session got no 57P01/08006: query error {query_err:?}, connection {conn_result:?}"
    );

    // New sessions are refused with an error naming the upstream.
    let err = try_connect(&url)
        .await
        .expect_err("a session started with PostgreSQL stopped");
    let msg = error_message(&err);
    assert!(
        msg.contains(&format!("127.0.0.1:{}", pg.port())),
        "error does not name the upstream: {msg}"
    );
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err}");

    pg.start_again().unwrap();
    let (client, _h) = connect(&url).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn unreachable_upstream_is_reported_as_08001_naming_host_and_port() {
    let closed = free_port();
    let yaml = format!("upstream: postgres://postgres@127.0.0.1:{closed}/app\ntls:\n  upstream: {{mode: prefer}}\n");
    let proxy = Proxy::start(&yaml, &[]);
    let err = try_connect(&proxy.url("scram_user", "scram_pw", "app"))
        .await
        .expect_err("connected to a closed port");
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
    let msg = error_message(&err);
    assert!(msg.contains(&format!("127.0.0.1:{closed}")), "{msg}");
    // The proxy itself is still up and answers the next client the same way.
    let err = try_connect(&proxy.url("scram_user", "scram_pw", "app"))
        .await
        .expect_err("connected to a closed port");
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err:?}");
}
