//! The KMIP provider against a real PyKMIP server over TLS with client
//! certificates: AES-GCM Encrypt/Decrypt bound to tenant and DEK id, the
//! key's State (revoked, compromised, destroyed) as denials, transport
//! failures as transient, and revocation end to end through the proxy.

use crate::common;
use crate::support::kms;
use crate::support::pykmip::PyKmip;

use std::time::{Duration, Instant};

use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{DenialReason, Edek, KeyProvider, KmipProvider, KmipSettings, KmsError};
use kms::{ctx, reason};
use uuid::Uuid;

fn settings(kmip: &PyKmip, endpoint: &str) -> KmipSettings {
    KmipSettings {
        endpoint: endpoint.to_owned(),
        ca: kmip.file("ca.pem"),
        client_cert: kmip.file("client.pem"),
        client_key: kmip.file("client.key"),
        server_name: None,
    }
}

fn provider(kmip: &PyKmip) -> KmipProvider {
    KmipProvider::new(&settings(kmip, &kmip.endpoint())).expect("kmip provider")
}

#[tokio::test(flavor = "multi_thread")]
async fn kmip_wrap_unwrap_round_trips_bound_to_tenant_dek_id_and_key() {
    let kmip = PyKmip::start();
    let acme = kmip.create_key();
    let globex = kmip.create_key();
    let p = provider(&kmip);
    assert_eq!(p.kind(), "kmip");
    let (_, id, edek) = kms::assert_bound_round_trip(&p, &acme, &globex).await;
    p.check_key(&acme).await.expect("active");
    let mut bad_tag = edek.0.clone();
    bad_tag[14] ^= 1;
    let mut bad_body = edek.0.clone();
    let last = bad_body.len() - 1;
    bad_body[last] ^= 1;
    for bad in [bad_tag, bad_body, vec![], vec![1; 29], vec![2; 61]] {
        assert_eq!(
            reason(p.unwrap(&acme, &ctx("acme", id), &Edek(bad)).await),
            DenialReason::InvalidCiphertext
        );
    }
    p.unwrap(&acme, &ctx("acme", id), &edek)
        .await
        .expect("still opens");
}

#[tokio::test(flavor = "multi_thread")]
async fn kmip_revoked_compromised_or_destroyed_key_is_denied() {
    let kmip = PyKmip::start();
    let p = provider(&kmip);
    let id = Uuid::new_v4();
    let dek = Dek::generate();

    let revoked = kmip.create_key();
    let edek = p
        .wrap(&revoked, &ctx("acme", id), &dek)
        .await
        .expect("wrap");
    kmip.revoke(&revoked);
    assert_eq!(reason(p.check_key(&revoked).await), DenialReason::Disabled);
    assert_eq!(
        reason(p.unwrap(&revoked, &ctx("acme", id), &edek).await),
        DenialReason::Disabled
    );
    assert_eq!(
        reason(p.wrap(&revoked, &ctx("acme", id), &dek).await),
        DenialReason::Disabled
    );

    let compromised = kmip.create_key();
    kmip.compromise(&compromised);
    assert_eq!(
        reason(p.check_key(&compromised).await),
        DenialReason::Disabled
    );

    kmip.destroy(&revoked);
    assert_eq!(reason(p.check_key(&revoked).await), DenialReason::NotFound);
    assert_eq!(
        reason(p.unwrap(&revoked, &ctx("acme", id), &edek).await),
        DenialReason::NotFound
    );
    assert_eq!(reason(p.check_key("999999").await), DenialReason::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn kmip_unreachable_silent_or_stopped_server_is_transient_and_bad_files_are_config() {
    let mut kmip = PyKmip::start();
    let key = kmip.create_key();

    // A port that accepts TCP and never answers: the call deadline ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_endpoint = silent.local_addr().unwrap().to_string();
    let p = KmipProvider::new(&settings(&kmip, &silent_endpoint)).unwrap();
    let started = Instant::now();
    assert!(matches!(
        p.check_key(&key).await,
        Err(KmsError::Transient { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");

    let p = provider(&kmip);
    p.check_key(&key).await.expect("reachable");
    drop(std::mem::replace(&mut kmip, PyKmip::start()));
    // The old server is gone: pooled connection and reconnect both fail.
    match p.check_key(&key).await {
        Err(KmsError::Transient { detail, .. }) => assert!(!detail.is_empty()),
        other => panic!("expected transient, got {other:?}"),
    }

    let mut missing = settings(&kmip, &kmip.endpoint());
    missing.client_key = kmip.file("nope.key");
    let mut not_host_port = settings(&kmip, "no-port-here");
    not_host_port.server_name = None;
    let mut wrong_ca = settings(&kmip, &kmip.endpoint());
    wrong_ca.ca = kmip.file("client.key");
    for bad in [missing, not_host_port, wrong_ca] {
        assert!(
            matches!(KmipProvider::new(&bad), Err(KmsError::Config(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kmip_key_revoked_at_the_server_revokes_the_tenant_through_the_proxy() {
    let kmip = PyKmip::start();
    let key = kmip.create_key();
    let s = kms::start(
        &format!("kmip: {}", kmip.provider_yaml()),
        &format!("acme: {{provider: kmip, key: \"{key}\"}}"),
    )
    .await;
    let app = s.app().await;
    kms::write_both(&s, &app, "kmip-held").await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        rows.contains("kmip-held") && rows.contains("local-held"),
        "{rows}"
    );

    // tenants add checks the key at the server before storing a tenant.
    let config = s.proxy.dir().join("policy.yaml");
    let add = |tenant: &str, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args(["tenants", "add", tenant, "--provider", "kmip", "--key", key])
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = add("initech", "424242");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-found"),
        "{out:?}"
    );

    kmip.revoke(&key);
    kms::assert_acme_revoked(&app).await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 1, "the revoked tenant's rows fail: {stderr}");
    assert!(
        rows.contains("local-held") && !rows.contains("kmip-held"),
        "{rows}"
    );
    let out = add("hooli", &key);
    assert_eq!(out.status.code(), Some(1), "revoked key refused: {out:?}");
    let stored = common::encryption::count(
        &s.direct,
        "SELECT count(*) FROM cmk.tenants WHERE tenant_id IN ('initech', 'hooli')",
    )
    .await;
    assert_eq!(stored, 0);

    kmip.destroy(&key);
    kms::assert_acme_revoked(&app).await;
    let sealed = common::encryption::count(
        &s.direct,
        "SELECT count(*) FROM vault WHERE tenant_id = 'acme'",
    )
    .await;
    assert_eq!(sealed, 1, "the sealed row is still there, unreadable");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "kmip");
    for want in ["ok", "denied:disabled"] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    assert!(!s.audit().contains("kmip-held"));
}
