//! TLS on both legs, GSSENC refusal, relayed authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256, without channel binding) and cancel
//! requests, through the real proxy binary (issue 3).

use crate::common;

use std::path::Path;
use std::sync::Arc;

use cmk_proxy::localpg::LocalPostgresOptions;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::NoTls;

/// Which backend serves the session, and over TLS or not (as PostgreSQL sees it).
async fn upstream_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn client_tls_verified_against_the_ca_works() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (yaml, ca) = client_tls_yaml(dir.path(), "require");
    let proxy = start_proxy(&pg, &yaml);
    let (client, _h) = connect_tls(&proxy.url("scram_user", "scram_pw", "app"), &ca).await;
    assert_eq!(
        client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "scram_user"
    );
    assert!(upstream_ssl(&client).await);

    // A client trusting another CA refuses the proxy's certificate.
    let other = tempfile::tempdir().unwrap();
    let (_, _, wrong_ca) = client_tls_files(other.path());
    let err = try_connect_tls(&proxy.url("scram_user", "scram_pw", "app"), &wrong_ca)
        .await
        .expect_err("a certificate from an unknown CA was accepted");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_requiring_tls_is_refused_when_the_proxy_has_no_certificate() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let ca = pg.ca_cert_path().unwrap().to_owned();
    let err = try_connect_tls(&proxy.url("scram_user", "scram_pw", "app"), &ca)
        .await
        .expect_err("sslmode=require must fail against a proxy without tls.client");
    assert!(
        format!("{err}").to_lowercase().contains("tls")
            || format!("{err}").to_lowercase().contains("ssl"),
        "{err}"
    );
    // Plain connections still work.
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client.simple_query("SELECT 1").await.unwrap();
}

async fn upstream_mode_case(mode: &str, pg_tls: bool, expect_ssl: bool) {
    let pg = pg_with(LocalPostgresOptions {
        tls: pg_tls,
        ..Default::default()
    });
    let extra = match (mode, pg.ca_cert_path()) {
        ("verify-full", Some(ca)) => format!(
            "tls:\n  upstream: {{mode: verify-full, ca: {}}}\n",
            ca.display()
        ),
        _ => format!("tls:\n  upstream: {{mode: {mode}}}\n"),
    };
    let proxy = start_proxy(&pg, &extra);
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    assert_eq!(upstream_ssl(&client).await, expect_ssl, "mode {mode}");
}

#[tokio::test]
async fn upstream_tls_disable_uses_plain_tcp() {
    upstream_mode_case("disable", true, false).await;
}

#[tokio::test]
async fn upstream_tls_prefer_uses_tls_when_offered_and_plain_otherwise() {
    upstream_mode_case("prefer", true, true).await;
    upstream_mode_case("prefer", false, false).await;
}

#[tokio::test]
async fn upstream_tls_require_uses_tls() {
    upstream_mode_case("require", true, true).await;
}

#[tokio::test]
async fn upstream_tls_verify_full_with_the_right_ca_uses_tls() {
    upstream_mode_case("verify-full", true, true).await;
}

#[tokio::test]
async fn upstream_tls_require_against_a_server_without_tls_fails_clearly() {
    let pg = pg_with(LocalPostgresOptions {
        tls: false,
        ..Default::default()
    });
    let proxy = start_proxy(&pg, "tls:\n  upstream: {mode: require}\n");
    let err = try_connect(&proxy.url("scram_user", "scram_pw", "app"))
        .await
        .expect_err("require must not fall back to plain TCP");
    let msg = error_message(&err).to_lowercase();
    assert!(msg.contains("tls") || msg.contains("ssl"), "{err}");
    assert!(sqlstate(&err).is_some(), "expected an ErrorResponse: {err}");
}

#[tokio::test]
async fn upstream_tls_verify_full_with_a_wrong_ca_fails_with_a_clear_error() {
    let pg = pg();
    let other = tempfile::tempdir().unwrap();
    let (_, _, wrong_ca) = client_tls_files(other.path());
    let proxy = start_proxy(
        &pg,
        &format!(
            "tls:\n  upstream: {{mode: verify-full, ca: {}}}\n",
            wrong_ca.display()
        ),
    );
    let err = try_connect(&proxy.url("scram_user", "scram_pw", "app"))
        .await
        .expect_err("an upstream certificate from another CA was accepted");
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err}");
    let msg = error_message(&err);
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", pg.port())), "{msg}");
}

#[tokio::test]
async fn gssenc_request_is_refused_and_startup_continues_on_the_same_socket() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let mut s = raw::connect(proxy.port());
    raw::send(&mut s, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
    let mut answer = [0u8; 1];
    std::io::Read::read_exact(&mut s, &mut answer).unwrap();
    assert_eq!(answer[0], b'N');
    raw::send(&mut s, &raw::startup("postgres", "app"));
    let msgs = raw::read_until_ready(&mut s);
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
    raw::send(&mut s, &raw::query("SELECT 1"));
    let msgs = raw::read_until_ready(&mut s);
    assert!(msgs.iter().any(|m| m.tag == b'D'), "{msgs:?}");
}

/// Every test role, through the proxy, with and without client TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_is_relayed_with_and_without_client_tls() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (yaml, ca) = client_tls_yaml(dir.path(), "require");
    let proxy = start_proxy(&pg, &yaml);
    for (user, pw) in [
        ("postgres", ""),
        ("plain_user", "plain_pw"),
        ("md5_user", "md5_pw"),
        ("scram_user", "scram_pw"),
    ] {
        let url = proxy.url(user, pw, "app");
        let (plain, _h1) = connect(&url).await;
        let (tls, _h2) = connect_tls(&url, &ca).await;
        for client in [&plain, &tls] {
            let who: String = client
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(who, user);
        }
    }
}

#[tokio::test]
async fn wrong_password_is_relayed_as_28p01() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (yaml, ca) = client_tls_yaml(dir.path(), "require");
    let proxy = start_proxy(&pg, &yaml);
    for user in ["plain_user", "md5_user", "scram_user"] {
        let url = proxy.url(user, "wrong-password", "app");
        let err = try_connect(&url)
            .await
            .expect_err("wrong password accepted");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{user}: {err}");
        let err = try_connect_tls(&url, &ca)
            .await
            .expect_err("wrong password accepted");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{user}: {err}");
    }
    // The proxy keeps serving.
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client.simple_query("SELECT 1").await.unwrap();
}

/// Reads backend messages until AuthenticationSASL and returns its mechanisms.
async fn sasl_mechanisms<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, user: &str) -> Vec<String> {
    s.write_all(&raw::startup(user, "app")).await.unwrap();
    loop {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_u32().await.unwrap() as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        assert_ne!(tag, b'E', "error instead of authentication request");
        if tag == b'R' && body[..4] == 10u32.to_be_bytes() {
            return body[4..]
                .split(|&b| b == 0)
                .filter(|m| !m.is_empty())
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect();
        }
    }
}

/// SSLRequest then a TLS handshake verified against `ca`, on raw TCP.
async fn tls_connect(
    port: u16,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client_config(ca)));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn scram_mechanisms_offered_to_clients_never_include_channel_binding() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (yaml, ca) = client_tls_yaml(dir.path(), "require");
    let proxy = start_proxy(&pg, &yaml);

    // Directly, PostgreSQL offers -PLUS over TLS: the proxy must strip it.
    let mut direct = tls_connect(pg.port(), pg.ca_cert_path().unwrap()).await;
    let offered = sasl_mechanisms(&mut direct, "scram_user").await;
    assert!(
        offered.contains(&"SCRAM-SHA-256-PLUS".to_owned()),
        "{offered:?}"
    );

    let mut tls = tls_connect(proxy.port(), &ca).await;
    let mechanisms = sasl_mechanisms(&mut tls, "scram_user").await;
    assert_eq!(mechanisms, ["SCRAM-SHA-256"]);

    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let mechanisms = sasl_mechanisms(&mut plain, "scram_user").await;
    assert_eq!(mechanisms, ["SCRAM-SHA-256"]);

    // A client that insists on channel binding is refused by its own driver,
    // not left half-authenticated.
    let url = format!(
        "{}?channel_binding=require",
        proxy.url("scram_user", "scram_pw", "app")
    );
    assert!(try_connect_tls(&url, &ca).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_through_the_proxy_cancels_the_running_query() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    let token = client.cancel_token();
    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        (r, client)
    });
    // Wait until the backend really runs the sleep, then cancel through the proxy.
    wait_for_activity(&admin, "SELECT pg_sleep(60)").await;
    token.cancel_query(NoTls).await.unwrap();
    let (result, client) = sleeper.await.unwrap();
    let err = result.expect_err("the query was not cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    // The session survives the cancel.
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_over_tls_reaches_the_backend() {
    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (yaml, ca) = client_tls_yaml(dir.path(), "require");
    let proxy = start_proxy(&pg, &yaml);
    let (client, _h) = connect_tls(&proxy.url("scram_user", "scram_pw", "app"), &ca).await;
    let token = client.cancel_token();
    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_for_activity(&admin, "SELECT pg_sleep(60)").await;
    // The cancel connection negotiates TLS first, like the session did.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client_config(&ca));
    token.cancel_query(tls).await.unwrap();
    let err = sleeper.await.unwrap().expect_err("not cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

/// A raw trust session on `port`: the socket, and the BackendKeyData it was given.
fn raw_session_with_key(port: u16) -> (std::net::TcpStream, [u8; 8]) {
    let mut s = raw::connect(port);
    raw::send(&mut s, &raw::startup("postgres", "app"));
    let msgs = raw::read_until_ready(&mut s);
    let key = msgs
        .iter()
        .find(|m| m.tag == b'K')
        .expect("no BackendKeyData");
    (s, key.body[..8].try_into().unwrap())
}

fn cancel_packet(key: [u8; 8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    p.extend_from_slice(&key);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_with_a_wrong_secret_cancels_nothing() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let (mut s, key) = raw_session_with_key(proxy.port());

    // Wrong secret: the running statement completes normally.
    raw::send(&mut s, &raw::query("SELECT pg_sleep(1.5), 'survived'"));
    let mut wrong = key;
    wrong[7] ^= 0xff;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut c = raw::connect(proxy.port());
    raw::send(&mut c, &cancel_packet(wrong));
    let msgs = raw::read_until_ready(&mut s);
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "a cancel with a wrong secret cancelled the query: {msgs:?}"
    );
    assert!(msgs.iter().any(|m| m.tag == b'D'), "{msgs:?}");

    // The right key (control): the same kind of statement is cancelled.
    raw::send(&mut s, &raw::query("SELECT pg_sleep(60)"));
    let (admin, _ha) = connect(&pg.admin_url("app")).await;
    wait_for_activity(&admin, "SELECT pg_sleep(60)").await;
    let mut c = raw::connect(proxy.port());
    raw::send(&mut c, &cancel_packet(key));
    let msgs = raw::read_until_ready(&mut s);
    let err = msgs.iter().find(|m| m.tag == b'E').expect("not cancelled");
    assert_eq!(err.field(b'C').as_deref(), Some("57014"));
}

#[tokio::test]
async fn ssl_prefer_client_falls_back_to_plain_when_the_proxy_has_no_certificate() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    let ca = pg.ca_cert_path().unwrap().to_owned();
    let url = format!("{}?sslmode=prefer", proxy.url("md5_user", "md5_pw", "app"));
    let (client, _h) = connect_tls(&url, &ca).await;
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "md5_user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_traffic_over_tls_on_both_legs_round_trips() {
    use futures_util::{SinkExt, TryStreamExt};
    use sha2::{Digest, Sha256};

    let pg = pg();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = client_tls_files(dir.path());
    let yaml = format!(
        "tls:\n  client: {{cert: {}, key: {}}}\n  upstream: {{mode: verify-full, ca: {}}}\n",
        cert.display(),
        key.display(),
        pg.ca_cert_path().unwrap().display()
    );
    let proxy = start_proxy(&pg, &yaml);
    let (client, _h) = connect_tls(&proxy.url("scram_user", "scram_pw", "app"), &ca).await;
    assert!(upstream_ssl(&client).await);
    client
        .batch_execute("CREATE TABLE bulk (id int, payload text)")
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..100_000u32 {
        sent.extend_from_slice(format!("{i}\t{}\n", "t".repeat((i % 97) as usize)).as_bytes());
    }
    let sink = client.copy_in("COPY bulk FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in sent.chunks(100_000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    let received: Vec<u8> = client
        .copy_out("COPY (SELECT * FROM bulk ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap();
    assert_eq!(Sha256::digest(&received), Sha256::digest(&sent));
    // A pipeline of large results over both TLS legs.
    let results = futures_util::future::join_all((0..50i32).map(|i| {
        let client = &client;
        async move {
            client
                .query_one("SELECT length(repeat('r', 100000 + $1::int))", &[&i])
                .await
        }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().get::<_, i32>(0), 100_000 + i as i32);
    }
}
