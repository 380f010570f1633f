//! Upstream TLS as libpq does it (issue 20), for the sessions and for the
//! registry connection (`cmk-proxy migrate`), against a server with a CA
//! signed X.509 v3 certificate and one with a self-signed X.509 **v1**
//! certificate (what Citus and `openssl x509 -req` make), in every mode.

use crate::common;
use rustls::pki_types::pem::PemObject;

use std::path::Path;

use cmk_proxy::config::{Policy, UpstreamTlsMode};
use cmk_proxy::keys::Registry;
use cmk_proxy::localpg::{LocalPostgres, LocalPostgresOptions, ServerCert};
use common::*;
use x509_cert::der::Decode;

fn server(cert: ServerCert) -> LocalPostgres {
    let pg = pg_with(LocalPostgresOptions {
        server_cert: cert,
        ..Default::default()
    });
    let pem = std::fs::read(pg.data_dir().join("server.crt")).unwrap();
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    let version = x509_cert::Certificate::from_der(&der)
        .unwrap()
        .tbs_certificate
        .version;
    let wanted = match cert {
        ServerCert::CaSigned => x509_cert::Version::V3,
        ServerCert::SelfSignedV1 => x509_cert::Version::V1,
    };
    assert_eq!(version, wanted, "the test server's certificate version");
    pg
}

fn mode_yaml(mode: &str, ca: Option<&Path>) -> String {
    match ca {
        Some(ca) => format!("tls:\n  upstream: {{mode: {mode}, ca: {}}}\n", ca.display()),
        None => format!("tls:\n  upstream: {{mode: {mode}}}\n"),
    }
}

/// Whether PostgreSQL sees the session over TLS, through a proxy in `mode`.
async fn session_ssl(pg: &LocalPostgres, mode: &str, ca: Option<&Path>) -> Result<bool, String> {
    let proxy = start_proxy(pg, &mode_yaml(mode, ca));
    let (client, _h) = try_connect(&proxy.url("scram_user", "scram_pw", "app"))
        .await
        .map_err(|e| error_message(&e))?;
    Ok(server_sees_tls(&client).await)
}

fn registry_policy(pg: &LocalPostgres, mode: UpstreamTlsMode, ca: Option<&Path>) -> Policy {
    let mut policy = Policy {
        upstream: pg.url("scram_user", "scram_pw", "app"),
        ..Policy::default()
    };
    policy.tls.upstream.mode = mode;
    policy.tls.upstream.ca = ca.map(Path::to_owned);
    policy
}

/// Whether PostgreSQL sees the registry connection over TLS.
async fn registry_ssl(
    pg: &LocalPostgres,
    mode: UpstreamTlsMode,
    ca: Option<&Path>,
) -> Result<bool, String> {
    let registry = Registry::new(&registry_policy(pg, mode, ca)).map_err(|e| e.to_string())?;
    let client = registry
        .connect_dedicated()
        .await
        .map_err(|e| e.to_string())?;
    Ok(server_sees_tls(&client).await)
}

const MODES: [(&str, UpstreamTlsMode); 5] = [
    ("disable", UpstreamTlsMode::Disable),
    ("prefer", UpstreamTlsMode::Prefer),
    ("require", UpstreamTlsMode::Require),
    ("verify-ca", UpstreamTlsMode::VerifyCa),
    ("verify-full", UpstreamTlsMode::VerifyFull),
];

/// Every mode against one server: sessions and registry agree with libpq.
async fn every_mode(cert: ServerCert, verify_full_ok: bool) {
    let pg = server(cert);
    let ca = pg.ca_cert_path().unwrap().to_owned();
    for (name, mode) in MODES {
        let ca = matches!(
            mode,
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull
        )
        .then_some(ca.as_path());
        let expected = match mode {
            UpstreamTlsMode::Disable => Some(false),
            UpstreamTlsMode::VerifyFull if !verify_full_ok => None,
            _ => Some(true),
        };
        let session = session_ssl(&pg, name, ca).await;
        let registry = registry_ssl(&pg, mode, ca).await;
        match expected {
            Some(ssl) => {
                assert_eq!(session, Ok(ssl), "session, {cert:?}, mode {name}");
                assert_eq!(registry, Ok(ssl), "registry, {cert:?}, mode {name}");
            }
            None => {
                let session = session.expect_err(name);
                assert!(session.contains("certificate"), "{name}: {session}");
                let registry = registry.expect_err(name);
                assert!(registry.contains("certificate"), "{name}: {registry}");
            }
        }
    }
}

#[tokio::test]
async fn every_mode_against_a_ca_signed_v3_certificate() {
    every_mode(ServerCert::CaSigned, true).await;
}

/// The defect of issue 20: prefer (the default) and require failed with
/// "error performing TLS handshake" against an X.509 v1 certificate.
/// verify-ca trusts it when it is itself the CA file (pinned), as libpq
/// with OpenSSL does; verify-full refuses it (WebPKI checks names only in
/// v3 certificates).
#[tokio::test]
async fn every_mode_against_a_self_signed_v1_certificate() {
    every_mode(ServerCert::SelfSignedV1, false).await;
}

#[tokio::test]
async fn the_default_mode_serves_and_migrates_against_a_v1_certificate() {
    let pg = server(ServerCert::SelfSignedV1);
    // The default mode is prefer: no tls section at all.
    let proxy = Proxy::start(&format!("upstream: {}\n", pg.admin_url("app")), &[]);
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    assert!(
        server_sees_tls(&client).await,
        "prefer must encrypt against a v1 certificate"
    );
    let (ok, out) = run_cmk_proxy(["migrate", "--upstream", &pg.admin_url("app")]);
    assert!(ok, "migrate: {out}");
}

#[tokio::test]
async fn verify_modes_refuse_a_certificate_from_another_ca() {
    let pg = server(ServerCert::SelfSignedV1);
    let other = tempfile::tempdir().unwrap();
    let (_, _, wrong_ca) = client_tls_files(other.path());
    for (name, mode) in [
        ("verify-ca", UpstreamTlsMode::VerifyCa),
        ("verify-full", UpstreamTlsMode::VerifyFull),
    ] {
        let session = session_ssl(&pg, name, Some(&wrong_ca))
            .await
            .expect_err(name);
        assert!(session.contains("certificate"), "{name}: {session}");
        let registry = registry_ssl(&pg, mode, Some(&wrong_ca))
            .await
            .expect_err(name);
        assert!(registry.contains("certificate"), "{name}: {registry}");
    }
    let v3 = server(ServerCert::CaSigned);
    let session = session_ssl(&v3, "verify-ca", Some(&wrong_ca))
        .await
        .expect_err("verify-ca with another CA");
    assert!(session.contains("certificate"), "{session}");
}

/// A server whose TLS no client can complete (TLS 1.0 to 1.1 only):
/// prefer connects again without TLS, as libpq does; require fails.
#[tokio::test]
async fn prefer_falls_back_to_plain_when_the_handshake_fails() {
    let pg = server(ServerCert::CaSigned);
    for sql in [
        "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1'",
        "ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.1'",
        "SELECT pg_reload_conf()",
    ] {
        pg.psql("postgres", sql).unwrap();
    }
    assert_eq!(session_ssl(&pg, "prefer", None).await, Ok(false));
    assert_eq!(
        registry_ssl(&pg, UpstreamTlsMode::Prefer, None).await,
        Ok(false)
    );
    let err = session_ssl(&pg, "require", None)
        .await
        .expect_err("require must not fall back");
    assert!(err.to_lowercase().contains("tls"), "{err}");
    registry_ssl(&pg, UpstreamTlsMode::Require, None)
        .await
        .expect_err("require must not fall back (registry)");
}

/// `tls.upstream.cert`/`key`: the proxy shows a client certificate, so a
/// role with `cert` authentication logs in through it, and the registry
/// connection presents it too.
#[tokio::test]
async fn a_client_certificate_is_shown_to_postgresql() {
    let pg = server(ServerCert::CaSigned);
    pg.psql("postgres", "CREATE ROLE cert_user LOGIN").unwrap();
    let dir = pg.data_dir();
    let yaml = format!(
        "tls:\n  upstream: {{mode: verify-full, ca: {}, cert: {}, key: {}}}\n",
        dir.join("ca.crt").display(),
        dir.join("cert_user.crt").display(),
        dir.join("cert_user.key").display()
    );
    let proxy = start_proxy(&pg, &yaml);
    let (client, _h) = connect(&proxy.url("cert_user", "", "app")).await;
    let row = client
        .query_one(
            "SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cert_user");
    assert_eq!(row.get::<_, String>(1), "/CN=cert_user");

    // Without the certificate the same login is refused.
    let plain = start_proxy(&pg, &mode_yaml("require", None));
    let err = try_connect(&plain.url("cert_user", "", "app"))
        .await
        .expect_err("cert authentication without a certificate");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");

    let mut policy = registry_policy(&pg, UpstreamTlsMode::VerifyCa, Some(&dir.join("ca.crt")));
    policy.tls.upstream.cert = Some(dir.join("cert_user.crt"));
    policy.tls.upstream.key = Some(dir.join("cert_user.key"));
    let registry = Registry::new(&policy).unwrap();
    let dn: String = registry
        .connect_dedicated()
        .await
        .unwrap()
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dn, "/CN=cert_user");
}

#[test]
fn a_certificate_without_its_key_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("policy.yaml");
    std::fs::write(
        &config,
        "upstream: postgres://u@127.0.0.1:1/app\ntls:\n  upstream: {mode: require, cert: /x.crt}\n",
    )
    .unwrap();
    let (ok, text) = run_cmk_proxy([std::ffi::OsStr::new("check-config"), config.as_os_str()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("tls.upstream") && text.contains("cert and key must be given together"),
        "{text}"
    );
}
