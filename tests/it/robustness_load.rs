//! Load the relay must carry without growing: many concurrent sessions, and a
//! 100 MB result read slowly while the proxy's peak memory stays bounded
//! (issue 3).

use crate::common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_copy_in_streams_through_bounded_proxy_memory() {
    use futures_util::SinkExt;

    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client
        .batch_execute("CREATE UNLOGGED TABLE sink (payload text)")
        .await
        .unwrap();
    let before = proxy.hwm_kib();
    let copy = async {
        let sink = client.copy_in("COPY sink FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        let line = bytes::Bytes::from(format!("{}\n", "c".repeat(1024 * 1024 - 1)));
        for _ in 0..100 {
            sink.send(line.clone()).await.unwrap();
        }
        sink.finish().await.unwrap()
    };
    // Hang guard: a stalled relay fails the test with PostgreSQL's view of the COPY.
    let copied = match tokio::time::timeout(Duration::from_secs(120), copy).await {
        Ok(n) => n,
        Err(_) => {
            let (admin, _ha) = connect(&pg.admin_url("app")).await;
            let progress: Vec<String> = admin
                .simple_query(
                    "SELECT bytes_processed::text || ' bytes, ' || tuples_processed::text || ' rows' \
                     FROM pg_stat_progress_copy",
                )
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect();
            panic!(
                "COPY IN stalled; PostgreSQL has received {progress:?} of 104857600 bytes, 100 rows\n{}",
                proxy.log_text()
            );
        }
    };
    assert_eq!(copied, 100);
    let growth_kib = proxy.hwm_kib().saturating_sub(before);
    println!("COPY IN 100 MB: proxy VmHWM before {before} KiB, growth {growth_kib} KiB");
    assert!(
        growth_kib < 64 * 1024,
        "the proxy's peak memory grew by {growth_kib} KiB for a 100 MB COPY IN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_64_mb_value_passes_through_in_both_directions() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client.simple_query("SELECT 1").await.unwrap();
    let before = proxy.hwm_kib();
    let big: String = client
        .query_one("SELECT repeat('v', 64 * 1024 * 1024)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 64 * 1024 * 1024);
    let echoed: i32 = client
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(echoed, 64 * 1024 * 1024);
    let growth_kib = proxy.hwm_kib().saturating_sub(before);
    println!("64 MB value both ways: proxy VmHWM before {before} KiB, growth {growth_kib} KiB");
    // One frame may be held whole (a DataRow or Bind the proxy inspects), never several copies.
    assert!(
        growth_kib < 160 * 1024,
        "the proxy's peak memory grew by {growth_kib} KiB for one 64 MB value"
    );
}
