//! The Vault Transit provider against a local HTTPS server that answers the
//! documented Transit API (recorded behaviour, not a live Vault: see
//! `tests/it/fixtures/vault-transit/README.md`): encrypt/decrypt bound to
//! tenant and DEK id by `associated_data`, the key's state (deleted,
//! `deletion_allowed`, raised `min_decryption_version`, signing-only) and a
//! 403 as denials, 429, 503 and no answer as transient, token and AppRole
//! auth, and revocation end to end through the proxy.

use crate::common;
use crate::support::kms;
use crate::support::vault_fake::{FakeVault, Fault, ROLE_ID};

use std::time::{Duration, Instant};

use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{
    DenialReason, Edek, KeyProvider, KmsError, VaultAuth, VaultSettings, VaultTransitProvider,
};
use common::encryption::poll_until;
use kms::{ctx, reason, ACME_READ};
use uuid::Uuid;

fn is_transient(result: Result<impl std::fmt::Debug, KmsError>) -> bool {
    matches!(result, Err(KmsError::Transient { .. }))
}

fn provider(vault: &FakeVault, auth: VaultAuth) -> VaultTransitProvider {
    VaultTransitProvider::new(VaultSettings {
        address: vault.address().to_owned(),
        mount: "transit".to_owned(),
        namespace: None,
        ca: Some(vault.ca()),
        auth,
    })
    .expect("vault provider")
}

fn token_auth(vault: &FakeVault) -> VaultAuth {
    VaultAuth::Token {
        file: Some(vault.token_file()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_wrap_unwrap_round_trips_bound_to_tenant_dek_id_and_key() {
    let vault = FakeVault::start().await;
    vault.create_key("acme");
    vault.create_key("globex");
    let p = provider(&vault, token_auth(&vault));
    assert_eq!(p.kind(), "vault-transit");
    let (_, id, edek) = kms::assert_bound_round_trip(&p, "acme", "globex").await;
    assert!(edek.0.starts_with(b"vault:v1:"));
    for bad in [&b""[..], b"vault:vx:abc", b"\xff\xfe", b"vault:v1:nope"] {
        assert_eq!(
            reason(
                p.unwrap("acme", &ctx("acme", id), &Edek(bad.to_vec()))
                    .await
            ),
            DenialReason::InvalidCiphertext
        );
    }
    assert_eq!(
        reason(p.check_key("../sys/seal").await),
        DenialReason::NotFound
    );
    p.unwrap("acme", &ctx("acme", id), &edek)
        .await
        .expect("still opens");
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_deleted_deletable_too_old_or_signing_key_is_denied() {
    let vault = FakeVault::start().await;
    vault.create_key("acme");
    let p = provider(&vault, token_auth(&vault));
    let id = Uuid::new_v4();
    let edek = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .expect("wrap");

    vault.set_deletion_allowed("acme", true);
    assert_eq!(
        reason(p.check_key("acme").await),
        DenialReason::PendingDeletion
    );
    vault.set_deletion_allowed("acme", false);
    p.check_key("acme").await.expect("back");

    vault.rotate("acme");
    vault.set_min_decryption_version("acme", 2);
    p.check_key("acme").await.expect("the key itself is usable");
    assert_eq!(
        reason(p.unwrap("acme", &ctx("acme", id), &edek).await),
        DenialReason::Disabled,
        "v1 EDEKs are refused"
    );
    let newer = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .expect("wrap under v2");
    assert!(newer.0.starts_with(b"vault:v2:"));
    p.unwrap("acme", &ctx("acme", id), &newer)
        .await
        .expect("v2 opens");

    vault.create_key("signer");
    vault.make_signing_only("signer");
    assert_eq!(
        reason(p.check_key("signer").await),
        DenialReason::AccessDenied
    );

    vault.delete_key("acme");
    assert_eq!(reason(p.check_key("acme").await), DenialReason::NotFound);
    assert_eq!(
        reason(p.unwrap("acme", &ctx("acme", id), &newer).await),
        DenialReason::NotFound
    );
    assert_eq!(
        reason(p.wrap("acme", &ctx("acme", id), &Dek::generate()).await),
        DenialReason::NotFound,
        "encrypt would create the key: the read refuses first"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_403_is_denied_and_429_503_or_silence_are_transient() {
    let vault = FakeVault::start().await;
    vault.create_key("acme");
    let p = provider(&vault, token_auth(&vault));
    p.check_key("acme").await.expect("ok");

    vault.set_fault(Some(Fault::Forbidden));
    assert_eq!(
        reason(p.check_key("acme").await),
        DenialReason::AccessDenied
    );
    vault.set_fault(Some(Fault::Throttled));
    assert!(is_transient(p.check_key("acme").await));
    vault.set_fault(Some(Fault::Sealed));
    assert!(is_transient(p.check_key("acme").await));
    vault.set_fault(Some(Fault::Silent));
    let started = Instant::now();
    assert!(is_transient(p.check_key("acme").await));
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    vault.set_fault(None);
    p.check_key("acme").await.expect("recovers");

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gone = VaultTransitProvider::new(VaultSettings {
        address: format!("https://127.0.0.1:{port}"),
        mount: "transit".to_owned(),
        namespace: None,
        ca: Some(vault.ca()),
        auth: token_auth(&vault),
    })
    .unwrap();
    assert!(is_transient(gone.check_key("acme").await));
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_approle_logs_in_and_again_after_its_token_is_revoked() {
    let vault = FakeVault::start().await;
    vault.create_key("acme");
    let approle = |secret_id_file| VaultAuth::AppRole {
        mount: "approle".to_owned(),
        role_id: ROLE_ID.to_owned(),
        secret_id_file,
    };
    let p = provider(&vault, approle(vault.secret_id_file()));
    p.check_key("acme").await.expect("after login");
    p.check_key("acme").await.expect("same token");
    assert_eq!(vault.logins(), 1);
    vault.revoke_tokens();
    p.check_key("acme").await.expect("logs in again");
    assert_eq!(vault.logins(), 2);

    let wrong = vault.secret_id_file().with_file_name("wrong-secret");
    std::fs::write(&wrong, "nope\n").unwrap();
    let p = provider(&vault, approle(wrong));
    assert!(
        is_transient(p.check_key("acme").await),
        "the proxy's own credentials are not the tenant's refusal"
    );
    let p = provider(
        &vault,
        approle(vault.secret_id_file().with_file_name("missing")),
    );
    assert!(matches!(
        p.check_key("acme").await,
        Err(KmsError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_key_deleted_revokes_the_tenant_through_the_proxy() {
    let vault = FakeVault::start().await;
    vault.create_key("acme-key");
    let s = kms::start(
        &format!("transit: {}", vault.provider_yaml()),
        "acme: {provider: transit, key: acme-key}",
    )
    .await;
    let app = s.app().await;
    kms::write_both(&s, &app, "vault-held").await;

    vault.set_fault(Some(Fault::Forbidden));
    kms::assert_acme_revoked(&app).await;
    vault.set_fault(None);
    assert!(
        poll_until(false, || app.query(ACME_READ, &[]))
            .await
            .is_none(),
        "restored"
    );

    vault.delete_key("acme-key");
    kms::assert_acme_revoked(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "transit");
    for want in ["ok", "denied:access-denied", "denied:not-found"] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    assert!(!s.audit().contains("vault-held"));
}
