//! The Google Cloud KMS provider against a local HTTPS server that answers
//! the documented REST API (recorded behaviour, not the live cloud: see
//! `tests/it/fixtures/gcp-kms/README.md`): encrypt/decrypt bound to tenant
//! and DEK id by `additionalAuthenticatedData`, key and version states
//! (disabled, scheduled for destruction, destroyed, signing key, missing)
//! and a 403 as denials, 429, 503 and no answer as transient, the token
//! exchange of a service-account key file (signature checked by the
//! server), the metadata server, a 401 answered by one fresh token, and
//! revocation end to end through the proxy, `tenants add` and `decrypt-dump`.

use crate::common;
use crate::support::gcp_fake::{FakeGcp, Fault};
use crate::support::kms;

use std::time::{Duration, Instant};

use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{
    DenialReason, Edek, GcpCredentials, GcpKmsProvider, GcpKmsSettings, KeyProvider, KmsError,
};
use common::encryption::poll_until;
use common::sqlstate;
use kms::{ctx, reason, ACME_READ};
use uuid::Uuid;

fn is_transient(result: Result<impl std::fmt::Debug, KmsError>) -> bool {
    matches!(result, Err(KmsError::Transient { .. }))
}

fn provider_with(gcp: &FakeGcp, credentials: GcpCredentials) -> GcpKmsProvider {
    GcpKmsProvider::new(GcpKmsSettings {
        endpoint: gcp.endpoint().to_owned(),
        ca: Some(gcp.ca()),
        credentials,
    })
    .expect("gcp provider")
}

fn provider(gcp: &FakeGcp) -> GcpKmsProvider {
    provider_with(
        gcp,
        GcpCredentials::ServiceAccountFile(gcp.credentials_file()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_wrap_unwrap_round_trips_bound_to_tenant_dek_id_and_key() {
    let gcp = FakeGcp::start().await;
    let acme = gcp.create_key("acme");
    let globex = gcp.create_key("globex");
    let p = provider(&gcp);
    assert_eq!(p.kind(), "gcp-kms");
    let (_, id, edek) = kms::assert_bound_round_trip(&p, &acme, &globex).await;
    assert!(
        edek.0.starts_with(b"gcp-kms:1:"),
        "the EDEK names version 1"
    );
    for bad in [
        &b""[..],
        b"gcp-kms:x:AAAA",
        b"\xff\xfe",
        b"gcp-kms:1:bm9wZQ==",
    ] {
        assert_eq!(
            reason(p.unwrap(&acme, &ctx("acme", id), &Edek(bad.to_vec())).await),
            DenialReason::InvalidCiphertext,
            "{bad:?}"
        );
    }
    p.unwrap(&acme, &ctx("acme", id), &edek)
        .await
        .expect("still opens");
    assert_eq!(gcp.token_fetches(), 1, "one token serves every call");

    // A version name is refused, with the reason, for wrap and the check.
    let pinned = format!("{acme}/cryptoKeyVersions/1");
    let err = p.check_key(&pinned).await.unwrap_err();
    assert_eq!(err.denial_reason(), Some(DenialReason::NotFound));
    assert!(err.to_string().contains("give the CryptoKey"), "{err}");
    assert_eq!(
        reason(p.wrap(&pinned, &ctx("acme", id), &Dek::generate()).await),
        DenialReason::NotFound
    );
    for bad in ["acme", "projects/p/locations/l/keyRings/../cryptoKeys/k"] {
        assert_eq!(reason(p.check_key(bad).await), DenialReason::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_disabled_scheduled_or_destroyed_versions_and_signing_keys_are_denied() {
    let gcp = FakeGcp::start().await;
    let acme = gcp.create_key("acme");
    let p = provider(&gcp);
    let id = Uuid::new_v4();
    let v1 = p
        .wrap(&acme, &ctx("acme", id), &Dek::generate())
        .await
        .expect("wrap under v1");

    // The tenant rotates, then disables the old version: EDEKs under it
    // stop opening, the key itself (its primary) stays usable.
    assert_eq!(gcp.rotate(&acme), 2);
    let v2 = p
        .wrap(&acme, &ctx("acme", id), &Dek::generate())
        .await
        .expect("wrap under v2");
    assert!(v2.0.starts_with(b"gcp-kms:2:"));
    gcp.set_version_state(&acme, 1, "DISABLED");
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &v1).await),
        DenialReason::Disabled
    );
    p.check_key(&acme).await.expect("primary v2 is enabled");
    p.unwrap(&acme, &ctx("acme", id), &v2)
        .await
        .expect("v2 opens");
    gcp.set_version_state(&acme, 1, "DESTROY_SCHEDULED");
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &v1).await),
        DenialReason::PendingDeletion
    );
    gcp.set_version_state(&acme, 1, "DESTROYED");
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &v1).await),
        DenialReason::Destroyed
    );

    // The primary disabled: no check, no wrap, no unwrap.
    gcp.set_version_state(&acme, 2, "DISABLED");
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::Disabled);
    assert_eq!(
        reason(p.wrap(&acme, &ctx("acme", id), &Dek::generate()).await),
        DenialReason::Disabled
    );
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &v2).await),
        DenialReason::Disabled
    );
    gcp.set_version_state(&acme, 2, "ENABLED");
    p.unwrap(&acme, &ctx("acme", id), &v2)
        .await
        .expect("enabled again");

    let signer = gcp.create_signing_key("signer");
    assert_eq!(
        reason(p.check_key(&signer).await),
        DenialReason::AccessDenied
    );
    let missing = FakeGcp::key_name("never-created");
    assert_eq!(reason(p.check_key(&missing).await), DenialReason::NotFound);
    assert_eq!(
        reason(p.unwrap(&missing, &ctx("acme", id), &v2).await),
        DenialReason::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_403_is_denied_and_429_503_or_silence_are_transient() {
    let gcp = FakeGcp::start().await;
    let acme = gcp.create_key("acme");
    let p = provider(&gcp);
    p.check_key(&acme).await.expect("ok");

    gcp.set_fault(Some(Fault::Forbidden));
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::AccessDenied);
    gcp.set_fault(Some(Fault::Throttled));
    assert!(is_transient(p.check_key(&acme).await));
    gcp.set_fault(Some(Fault::Unavailable));
    assert!(is_transient(p.check_key(&acme).await));
    gcp.set_fault(Some(Fault::Silent));
    let started = Instant::now();
    assert!(is_transient(p.check_key(&acme).await));
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    gcp.set_fault(None);
    p.check_key(&acme).await.expect("recovers");

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gone = GcpKmsProvider::new(GcpKmsSettings {
        endpoint: format!("https://127.0.0.1:{port}"),
        ca: Some(gcp.ca()),
        credentials: GcpCredentials::ServiceAccountFile(gcp.credentials_file()),
    })
    .unwrap();
    assert!(is_transient(gone.check_key(&acme).await));
    let plain = GcpKmsProvider::new(GcpKmsSettings {
        endpoint: format!("http://127.0.0.1:{port}"),
        ca: None,
        credentials: GcpCredentials::ServiceAccountFile(gcp.credentials_file()),
    });
    assert!(matches!(plain, Err(KmsError::Config(_))), "https only");
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_401_fetches_one_new_token_and_the_call_succeeds() {
    let gcp = FakeGcp::start().await;
    let acme = gcp.create_key("acme");
    let p = provider(&gcp);
    p.check_key(&acme).await.expect("first token");
    p.check_key(&acme).await.expect("same token");
    assert_eq!(gcp.token_fetches(), 1);
    gcp.revoke_tokens();
    let calls = (0..16).map(|_| p.check_key(&acme));
    for result in futures_util::future::join_all(calls).await {
        result.expect("a new token after the 401");
    }
    assert_eq!(
        gcp.token_fetches(),
        2,
        "16 calls refused at once fetch one token"
    );

    // A 401 to every token: one new token, then a transient error, no loop.
    gcp.set_fault(Some(Fault::Unauthenticated));
    assert!(is_transient(p.check_key(&acme).await));
    assert_eq!(gcp.token_fetches(), 3);
    gcp.set_fault(None);

    // A key file signed by a deleted key: the token endpoint refuses the
    // assertion; the proxy's own credentials are not the tenant's refusal.
    let foreign = provider_with(
        &gcp,
        GcpCredentials::ServiceAccountFile(gcp.foreign_credentials_file()),
    );
    let err = foreign.check_key(&acme).await.unwrap_err();
    assert!(matches!(err, KmsError::Transient { .. }), "{err}");
    assert!(err.to_string().contains("invalid_grant"), "{err}");
    assert_eq!(gcp.token_fetches(), 3, "no token for a bad signature");
    let missing = provider_with(
        &gcp,
        GcpCredentials::ServiceAccountFile(gcp.ca().with_file_name("missing.json")),
    );
    assert!(matches!(
        missing.check_key(&acme).await,
        Err(KmsError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_metadata_server_token_serves_without_a_key_file() {
    let gcp = FakeGcp::start().await;
    let acme = gcp.create_key("acme");
    let p = provider_with(
        &gcp,
        GcpCredentials::MetadataServer {
            host: gcp.metadata_host().to_owned(),
        },
    );
    let (_, _, _) = kms::assert_bound_round_trip(&p, &acme, &gcp.create_key("other")).await;
    assert_eq!(gcp.metadata_fetches(), 1);
    assert_eq!(gcp.token_fetches(), 0);
    gcp.revoke_tokens();
    p.check_key(&acme).await.expect("a new metadata token");
    assert_eq!(gcp.metadata_fetches(), 2);
}

/// `cmk-proxy tenants add TENANT --provider gcp --key KEY` with the policy of `s`.
fn tenants_add(
    s: &common::encryption::EncryptedSetup,
    tenant: &str,
    key: &str,
) -> std::process::Output {
    let config = s.proxy.dir().join("policy.yaml");
    std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["tenants", "add", tenant, "--provider", "gcp", "--key", key])
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_tenants_add_checks_the_key_before_storing_the_tenant() {
    let gcp = FakeGcp::start().await;
    let s = kms::start(&format!("gcp: {}", gcp.provider_yaml()), "").await;
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = tenants_add(&s, "initech", &FakeGcp::key_name("no-such-key"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("not-found"), "{out:?}");

    let hooli = gcp.create_key("hooli");
    gcp.set_version_state(&hooli, 1, "DISABLED");
    let out = tenants_add(&s, "hooli", &hooli);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("disabled"), "{out:?}");

    let initech = gcp.create_key("initech");
    let out = tenants_add(&s, "initech", &format!("{initech}/cryptoKeyVersions/1"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("cryptoKeyVersions"), "{out:?}");

    let out = tenants_add(&s, "initech", &initech);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stored = common::encryption::count(
        &s.direct,
        "SELECT count(*) FROM cmk.tenants WHERE tenant_id IN ('initech', 'hooli') AND provider = 'gcp'",
    )
    .await;
    assert_eq!(stored, 1, "only the tenant with a usable key is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_version_disabled_revokes_the_tenant_through_the_proxy() {
    let gcp = FakeGcp::start().await;
    let key = gcp.create_key("acme-key");
    let s = kms::start(
        &format!("gcp: {}", gcp.provider_yaml()),
        &format!("acme: {{provider: gcp, key: \"{key}\"}}"),
    )
    .await;
    let app = s.app().await;
    kms::write_both(&s, &app, "gcp-held").await;
    // decrypt-dump opens a pg_dump through the same provider.
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        rows.contains("gcp-held") && rows.contains("local-held"),
        "{rows}"
    );

    // The tenant disables its key's primary version in the console.
    gcp.set_version_state(&key, 1, "DISABLED");
    kms::assert_acme_revoked(&app).await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 1, "the revoked tenant's rows fail: {stderr}");
    assert!(
        rows.contains("local-held") && !rows.contains("gcp-held"),
        "{rows}"
    );
    gcp.set_version_state(&key, 1, "ENABLED");
    assert!(
        poll_until(false, || app.query(ACME_READ, &[]))
            .await
            .is_none(),
        "re-enabled"
    );
    let rows = app.query(ACME_READ, &[]).await.expect("read");
    assert_eq!(rows[0].get::<_, String>(0), "gcp-held", "nothing was lost");

    // The tenant removes the vendor's IAM grant.
    gcp.set_fault(Some(Fault::Forbidden));
    kms::assert_acme_revoked(&app).await;
    gcp.set_fault(None);
    assert!(poll_until(false, || app.query(ACME_READ, &[]))
        .await
        .is_none());

    // Quota exhausted: KM002 once the approval runs out, after retries.
    let before = gcp.api_calls();
    gcp.set_fault(Some(Fault::Throttled));
    let err = poll_until(true, || app.query(ACME_READ, &[]))
        .await
        .expect("unavailable");
    assert_eq!(sqlstate(&err).as_deref(), Some("KM002"), "{err}");
    assert!(gcp.api_calls() - before >= 3, "the key service retried");
    gcp.set_fault(None);
    assert!(poll_until(false, || app.query(ACME_READ, &[]))
        .await
        .is_none());

    // Destroying the version is final.
    gcp.set_version_state(&key, 1, "DESTROYED");
    kms::assert_acme_revoked(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "gcp");
    for want in [
        "ok",
        "denied:disabled",
        "denied:access-denied",
        "transient",
        "denied:destroyed",
    ] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    assert!(!s.audit().contains("gcp-held"));
}
