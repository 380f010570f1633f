//! Bad clients must not hurt anyone else: a client that vanishes mid-query,
//! malformed and oversized protocol messages. Each case checks that another
//! client's session keeps working (issue 3).

use crate::common;

use std::io::Read;
use std::time::Duration;

use common::*;

/// Polls until no backend with `application_name` is left (hang guard: 10 s).
async fn backend_gone(admin: &tokio_postgres::Client, app: &str) -> bool {
    for _ in 0..200 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnecting_mid_query_ends_its_backend() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    let url = format!(
        "{}?application_name=vanishing-client",
        proxy.url("scram_user", "scram_pw", "app")
    );
    let (client, conn) = connect(&url).await;
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    wait_for_activity(&admin, "SELECT pg_sleep(30)").await;
    // Drop the client and its socket while the query runs.
    sleeper.abort();
    conn.abort();
    let _ = sleeper.await;
    let _ = conn.await;
    assert!(
        backend_gone(&admin, "vanishing-client").await,
        "the backend of a vanished client still runs:\n{}",
        proxy.log_text()
    );
}

/// Another client's session that must survive whatever a bad client does.
struct Bystander {
    client: tokio_postgres::Client,
    _conn: tokio::task::JoinHandle<()>,
}

impl Bystander {
    async fn new(proxy: &Proxy) -> Self {
        let (client, _conn) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
        client
            .batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1)")
            .await
            .unwrap();
        Bystander { client, _conn }
    }

    async fn still_works(&self) {
        let v: i32 = self
            .client
            .query_one("SELECT v FROM mine", &[])
            .await
            .expect("the bystander session broke")
            .get(0);
        assert_eq!(v, 1);
    }
}

/// Reads everything the proxy sends until it closes the socket; returns the
/// SQLSTATEs of its ErrorResponses. Panics if the socket is not closed.
fn errors_then_close(s: &mut std::net::TcpStream) -> Vec<String> {
    let mut codes = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        match s.read(&mut tag) {
            Ok(0) => return codes,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return codes,
            Err(e) => panic!("the proxy kept the malformed connection open: {e}"),
        }
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return codes;
        }
        let len = u32::from_be_bytes(len) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if s.read_exact(&mut body).is_err() {
            return codes;
        }
        let m = raw::BackendMessage { tag: tag[0], body };
        if m.tag == b'E' {
            codes.push(m.field(b'C').unwrap_or_default());
        }
    }
}

fn assert_protocol_violation_or_closed(codes: &[String], case: &str) {
    assert!(
        codes.iter().all(|c| c == "08P01"),
        "{case}: unexpected errors {codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_with_length_3_is_rejected_and_others_keep_working() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let bystander = Bystander::new(&proxy).await;
    let mut s = raw::connect(proxy.port());
    raw::send(&mut s, &[0, 0, 0, 3, 0, 0, 0, 0]);
    let codes = errors_then_close(&mut s);
    assert_protocol_violation_or_closed(&codes, "length 3");
    bystander.still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_is_rejected_and_others_keep_working() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let bystander = Bystander::new(&proxy).await;
    for seed in 0..20u64 {
        // Deterministic garbage (xorshift), different per round.
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
        let garbage: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut s = raw::connect(proxy.port());
        raw::send(&mut s, &garbage);
        let codes = errors_then_close(&mut s);
        assert_protocol_violation_or_closed(&codes, &format!("garbage {seed}"));
    }
    // Garbage after a valid startup, inside a session.
    let mut s = raw::session(proxy.port(), "app");
    raw::send(
        &mut s,
        b"\x01\x02\x03\x04\x05\x06\x07\x08\x09garbage-after-startup",
    );
    let codes = errors_then_close(&mut s);
    assert_protocol_violation_or_closed(&codes, "garbage in session");
    bystander.still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_claiming_2_gib_is_rejected_with_08p01() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let bystander = Bystander::new(&proxy).await;
    let mut s = raw::session(proxy.port(), "app");
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(i32::MAX as u32).to_be_bytes());
    msg.extend_from_slice(b"SELECT 1");
    raw::send(&mut s, &msg);
    let codes = errors_then_close(&mut s);
    assert_eq!(
        codes,
        ["08P01"],
        "a 2 GiB message must be refused with 08P01"
    );
    bystander.still_works().await;
    assert!(
        proxy.hwm_kib() < 512 * 1024,
        "the proxy allocated for the claimed length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_above_max_message_size_is_rejected_with_08p01() {
    let pg = pg();
    let proxy = start_proxy(&pg, "server: {max_message_size: 1048576}\n");
    let bystander = Bystander::new(&proxy).await;
    let (client, _h) = connect(&proxy.url("md5_user", "md5_pw", "app")).await;
    // A query just under the limit passes ...
    let small = format!("SELECT length('{}')", "y".repeat(1_000_000));
    client.simple_query(&small).await.unwrap();
    // ... a 2 MiB one is refused.
    let big = format!("SELECT length('{}')", "x".repeat(2 * 1024 * 1024));
    let err = client
        .simple_query(&big)
        .await
        .expect_err("an oversized message went through");
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"), "{err:?}");
    bystander.still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_and_oversized_startup_packets_are_refused() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let bystander = Bystander::new(&proxy).await;

    // Protocol 2.0 StartupMessage.
    let mut v2 = raw::startup("postgres", "app");
    v2[4..8].copy_from_slice(&0x0002_0000u32.to_be_bytes());
    let mut s = raw::connect(proxy.port());
    raw::send(&mut s, &v2);
    let codes = errors_then_close(&mut s);
    assert!(
        codes.iter().all(|c| c == "0A000" || c == "08P01"),
        "protocol 2.0: {codes:?}"
    );

    // A startup packet of 20 000 bytes (PostgreSQL's limit is 10 000).
    let mut big = Vec::new();
    big.extend_from_slice(&20_000u32.to_be_bytes());
    big.extend_from_slice(&196_608u32.to_be_bytes());
    big.resize(20_000, b'a');
    let mut s = raw::connect(proxy.port());
    raw::send(&mut s, &big);
    let codes = errors_then_close(&mut s);
    assert_protocol_violation_or_closed(&codes, "20 000-byte startup");

    // A startup without a user.
    let mut s = raw::connect(proxy.port());
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"database\0app\0\0");
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    raw::send(&mut s, &msg);
    let codes = errors_then_close(&mut s);
    assert!(!codes.is_empty(), "no error for a startup without user");
    bystander.still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_transaction_rolls_it_back() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    admin
        .batch_execute("CREATE TABLE ledger (v int); GRANT ALL ON ledger TO scram_user")
        .await
        .unwrap();
    let url = format!(
        "{}?application_name=leaving-client",
        proxy.url("scram_user", "scram_pw", "app")
    );
    let (client, conn) = connect(&url).await;
    client
        .batch_execute("BEGIN; INSERT INTO ledger VALUES (1), (2)")
        .await
        .unwrap();
    drop(client);
    conn.abort();
    let _ = conn.await;
    assert!(
        backend_gone(&admin, "leaving-client").await,
        "the backend of a vanished client is still there"
    );
    let n: i64 = admin
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "an abandoned transaction was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_no_sockets_or_backends_behind() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (admin, _ha) = connect(&pg.admin_url("postgres")).await;
    let good = format!(
        "{}?application_name=churn",
        proxy.url("scram_user", "scram_pw", "app")
    );
    let bad = proxy.url("scram_user", "nope", "app");
    {
        let (c, _h) = connect(&good).await;
        c.simple_query("SELECT 1").await.unwrap();
    }
    let settle = |expected: usize| {
        let proxy = &proxy;
        async move {
            let mut fds = proxy.fd_count();
            for _ in 0..200 {
                if fds <= expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                fds = proxy.fd_count();
            }
            fds
        }
    };
    // Wait for the warm-up session to be fully gone, then take the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = proxy.fd_count();
    for i in 0..200 {
        match i % 5 {
            0 => {
                let (c, _h) = connect(&good).await;
                c.simple_query("SELECT 1").await.unwrap();
            }
            1 => {
                let err = try_connect(&bad).await.expect_err("bad password accepted");
                assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
            }
            2 => {
                // Startup sent, then gone before answering the auth request.
                let mut s = raw::connect(proxy.port());
                raw::send(&mut s, &raw::startup("scram_user", "app"));
                let m = raw::read_message(&mut s).expect("an auth request");
                assert_eq!(m.tag, b'R');
            }
            3 => {
                // Connect and leave without a byte.
                drop(raw::connect(proxy.port()));
            }
            _ => {
                let (c, h) = connect(&good).await;
                c.batch_execute("BEGIN; SELECT 1").await.unwrap();
                drop(c);
                h.abort();
            }
        }
    }
    let fds = settle(baseline + 2).await;
    assert!(
        fds <= baseline + 2,
        "the proxy holds {fds} descriptors after churn (baseline {baseline})"
    );
    assert!(backend_gone(&admin, "churn").await, "backends left behind");
    let (c, _h) = connect(&good).await;
    c.simple_query("SELECT 1").await.unwrap();
}
