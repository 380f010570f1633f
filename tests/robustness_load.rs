//! Load the relay must carry without growing: many concurrent sessions, and a
//! 100 MB result read slowly while the proxy's peak memory stays bounded
//! (issue 3).

mod common;

use std::time::Duration;

use cmk_proxy::localpg::LocalPostgresOptions;
use common::*;
use futures_util::{StreamExt, TryStreamExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_clients_each_run_a_query() {
    let pg = pg_with(LocalPostgresOptions {
        max_connections: 600,
        ..Default::default()
    });
    let proxy = start_proxy(&pg, "");
    let url = proxy.url("scram_user", "scram_pw", "app");
    let tasks: Vec<_> = (0..500i32)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let (client, _h) = try_connect(&url).await?;
                let row = client.query_one("SELECT $1::int + 1", &[&i]).await?;
                // Hold the session until everyone has queried at least once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let again = client.query_one("SELECT $1::int", &[&i]).await?;
                Ok::<_, tokio_postgres::Error>((row.get::<_, i32>(0), again.get::<_, i32>(0)))
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok((a, b)) => {
                assert_eq!(a, i as i32 + 1);
                assert_eq!(b, i as i32);
            }
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_result_read_slowly_streams_through_bounded_proxy_memory() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client.simple_query("SELECT 1").await.unwrap();
    let before = proxy.hwm_kib();

    let rows = client
        .query_raw(
            "SELECT repeat('x', 1024 * 1024) FROM generate_series(1, 100)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut total = 0usize;
    let mut count = 0;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        total += row.get::<_, &str>(0).len();
        count += 1;
        // A slow consumer: the proxy must apply backpressure, not buffer.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count, 100);
    assert_eq!(total, 100 * 1024 * 1024);

    let growth_kib = proxy.hwm_kib().saturating_sub(before);
    println!("proxy VmHWM before {before} KiB, growth {growth_kib} KiB");
    assert!(
        growth_kib < 64 * 1024,
        "the proxy's peak memory grew by {growth_kib} KiB for a 100 MB result"
    );
    // Text-format COPY of the same volume, also streamed.
    let copied: usize = client
        .copy_out("COPY (SELECT repeat('z', 1024 * 1024) FROM generate_series(1, 50)) TO STDOUT")
        .await
        .unwrap()
        .map_ok(|b| b.len())
        .try_fold(0, |acc, n| async move { Ok(acc + n) })
        .await
        .unwrap();
    assert_eq!(copied, 50 * (1024 * 1024 + 1));
    let growth_kib = proxy.hwm_kib().saturating_sub(before);
    assert!(growth_kib < 64 * 1024, "growth {growth_kib} KiB after COPY");
}
