//! The Azure Key Vault provider against a local HTTPS server that answers
//! the documented Key Vault and Microsoft Entra requests (recorded API
//! behaviour, not the live cloud: see
//! `tests/it/fixtures/azure-key-vault/README.md`): wrapkey/unwrapkey of a
//! KEK that seals the DEK bound to tenant and DEK id, the key's state
//! (disabled, expired, not yet valid, deleted, no wrapKey) and a 403 as
//! denials, 429, 503 and no answer as transient, 401 answered by one new
//! token, rotation, the three credential kinds, and revocation end to end
//! through the proxy with `tenants add` and `decrypt-dump`.

use crate::common;
use crate::support::azure_fake::{FakeAzure, Fault, KeyType, CLIENT_ID, SCOPE, TENANT_ID};
use crate::support::kms;

use std::time::{Duration, Instant};

use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::azure::{AllowedHosts, AzureAuth, IdentityEndpoint, SecretSource};
use cmk_proxy::kms::{
    AzureKeyVaultProvider, AzureSettings, DenialReason, Edek, KeyProvider, KmsError,
};
use common::encryption::poll_until;
use kms::{ctx, reason, ACME_READ};
use uuid::Uuid;

fn transient_detail(result: Result<impl std::fmt::Debug, KmsError>) -> String {
    match result {
        Err(KmsError::Transient { detail, .. }) => detail,
        other => panic!("expected transient, got {other:?}"),
    }
}

fn secret_auth(az: &FakeAzure) -> AzureAuth {
    AzureAuth::ClientSecret {
        tenant_id: TENANT_ID.to_owned(),
        client_id: CLIENT_ID.to_owned(),
        secret: SecretSource::File(az.secret_file()),
    }
}

fn provider(az: &FakeAzure, auth: AzureAuth) -> AzureKeyVaultProvider {
    AzureKeyVaultProvider::new(AzureSettings {
        auth,
        authority: az.address().to_owned(),
        allowed: AllowedHosts {
            hosts: vec![az.authority().to_owned()],
            scope: SCOPE.to_owned(),
        },
        ca: Some(az.ca()),
    })
    .expect("azure provider")
}

/// Offset of the wrapped KEK in an EDEK (after magic, format, alg, kid).
fn wrapped_kek_at(edek: &[u8]) -> usize {
    let kid_len = usize::from(u16::from_be_bytes([edek[6], edek[7]]));
    8 + kid_len + 2
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_wrap_unwrap_round_trips_bound_to_tenant_dek_id_and_key() {
    let az = FakeAzure::start().await;
    let acme = az.create_key("acme", KeyType::Rsa);
    let globex = az.create_key("globex", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    assert_eq!(p.kind(), "azure-key-vault");
    let (_, id, edek) = kms::assert_bound_round_trip(&p, &acme, &globex).await;
    let text = String::from_utf8_lossy(&edek.0);
    assert!(
        text.contains(&format!("{acme}/{}", az.current_version("acme"))),
        "the EDEK records the versioned kid"
    );
    // Managed HSM AES keys wrap with A256KW and bind the same way.
    kms::assert_bound_round_trip(&p, &globex, &acme).await;

    let mut tampered_kek = edek.0.clone();
    tampered_kek[wrapped_kek_at(&edek.0) + 5] ^= 1;
    let mut tampered_dek = edek.0.clone();
    let last = tampered_dek.len() - 1;
    tampered_dek[last] ^= 1;
    let unwraps_before = az.calls("unwrapkey");
    for bad in [tampered_kek, tampered_dek, vec![], b"vault:v1:abc".to_vec()] {
        assert_eq!(
            reason(p.unwrap(&acme, &ctx("acme", id), &Edek(bad)).await),
            DenialReason::InvalidCiphertext
        );
    }
    assert_eq!(
        az.calls("unwrapkey") - unwraps_before,
        2,
        "Key Vault itself refused the tampered wrapped KEK (400)"
    );

    // The same EDEK pointed at another version: Key Vault cannot unwrap it.
    let old = az.current_version("acme");
    let new = az.rotate("acme");
    let moved = Edek(text.replace(&old, &new).into_bytes());
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &moved).await),
        DenialReason::InvalidCiphertext
    );
    p.unwrap(&acme, &ctx("acme", id), &edek)
        .await
        .expect("still opens");
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_rotation_keeps_old_edeks_and_new_wraps_use_the_new_version() {
    let az = FakeAzure::start().await;
    let acme = az.create_key("acme", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    let id = Uuid::new_v4();
    let dek = Dek::generate();
    let old_edek = p.wrap(&acme, &ctx("acme", id), &dek).await.expect("wrap");
    let v1 = az.current_version("acme");
    let v2 = az.rotate("acme");
    let back = p
        .unwrap(&acme, &ctx("acme", id), &old_edek)
        .await
        .expect("old EDEK unwraps with its recorded version");
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
    let new_edek = p.wrap(&acme, &ctx("acme", id), &dek).await.expect("wrap");
    let new_text = String::from_utf8_lossy(&new_edek.0).into_owned();
    assert!(new_text.contains(&v2) && !new_text.contains(&v1));

    // A ref pinned to v1 still wraps under v1 and opens v2's EDEKs (same key).
    let pinned = format!("{acme}/{v1}");
    let pinned_edek = p.wrap(&pinned, &ctx("acme", id), &dek).await.expect("wrap");
    assert!(String::from_utf8_lossy(&pinned_edek.0).contains(&v1));
    p.unwrap(&pinned, &ctx("acme", id), &new_edek)
        .await
        .expect("a version of the same key");

    // The tenant disables the old version only: its EDEKs stop opening.
    az.set_version_enabled("acme", &v1, false);
    p.check_key(&acme)
        .await
        .expect("the current version is fine");
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &old_edek).await),
        DenialReason::Disabled,
        "Key Vault answers 403 KeyDisabled"
    );
    p.unwrap(&acme, &ctx("acme", id), &new_edek)
        .await
        .expect("new EDEKs open");
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_disabled_expired_not_yet_valid_deleted_or_wrap_less_key_is_denied() {
    let az = FakeAzure::start().await;
    let acme = az.create_key("acme", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    let id = Uuid::new_v4();
    let edek = p
        .wrap(&acme, &ctx("acme", id), &Dek::generate())
        .await
        .expect("wrap");
    let now = chrono::Utc::now().timestamp();

    az.set_enabled("acme", false);
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::Disabled);
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &edek).await),
        DenialReason::Disabled
    );
    assert_eq!(
        reason(p.wrap(&acme, &ctx("acme", id), &Dek::generate()).await),
        DenialReason::Disabled
    );
    az.set_enabled("acme", true);
    p.check_key(&acme).await.expect("enabled again");

    az.set_validity("acme", None, Some(now - 60));
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::Disabled);
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &edek).await),
        DenialReason::Disabled,
        "Key Vault would still unwrap an expired key: the proxy refuses first"
    );
    az.set_validity("acme", Some(now + 3600), None);
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::Disabled);
    az.set_validity("acme", Some(now - 60), Some(now + 3600));
    p.check_key(&acme).await.expect("within nbf..exp");

    az.set_key_ops("acme", &["encrypt", "decrypt", "unwrapKey"]);
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::AccessDenied);
    az.set_key_ops("acme", &["wrapKey", "unwrapKey"]);
    p.check_key(&acme).await.expect("least key_ops suffice");

    az.delete_key("acme");
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::NotFound);
    assert_eq!(
        reason(p.unwrap(&acme, &ctx("acme", id), &edek).await),
        DenialReason::NotFound
    );
    assert_eq!(
        reason(p.check_key(&az.key_ref("never-created")).await),
        DenialReason::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_refs_outside_azure_domains_or_allowed_hosts_are_refused_without_a_request() {
    let az = FakeAzure::start().await;
    az.create_key("acme", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    let port = az.authority().rsplit(':').next().unwrap();
    for bad in [
        format!("https://localhost:{port}/keys/acme"),
        format!("https://127.0.0.1:{port}/secrets/acme"),
        format!("http://127.0.0.1:{port}/keys/acme"),
        "https://evil.example/keys/acme".to_owned(),
        "https://acme.vault.azure.net.evil.example/keys/acme".to_owned(),
        "acme".to_owned(),
    ] {
        assert_eq!(
            reason(p.check_key(&bad).await),
            DenialReason::NotFound,
            "{bad}"
        );
    }
    assert_eq!(az.token_requests(), 0, "no token was fetched for them");
    assert_eq!(az.calls("get"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_403_is_denied_and_429_503_or_silence_are_transient_with_one_attempt_each() {
    let az = FakeAzure::start().await;
    let acme = az.create_key("acme", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    p.check_key(&acme).await.expect("ok");

    az.set_fault(Some(Fault::Forbidden));
    assert_eq!(reason(p.check_key(&acme).await), DenialReason::AccessDenied);
    az.set_fault(Some(Fault::Throttled));
    let detail = transient_detail(p.check_key(&acme).await);
    assert!(
        detail.contains("429") && detail.contains("Retry-After 1"),
        "{detail}"
    );
    az.set_fault(Some(Fault::Unavailable));
    assert!(transient_detail(p.check_key(&acme).await).contains("503"));
    let before = az.vault_requests();
    transient_detail(p.check_key(&acme).await);
    assert_eq!(
        az.vault_requests() - before,
        1,
        "one attempt per call: retries belong to the key service"
    );
    az.set_fault(Some(Fault::Silent));
    let started = Instant::now();
    transient_detail(p.check_key(&acme).await);
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    az.set_fault(None);
    p.check_key(&acme).await.expect("recovers");

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let authority = closed.local_addr().unwrap().to_string();
    drop(closed);
    let gone = AzureKeyVaultProvider::new(AzureSettings {
        auth: secret_auth(&az),
        authority: format!("https://{authority}"),
        allowed: AllowedHosts {
            hosts: vec![authority.clone()],
            scope: SCOPE.to_owned(),
        },
        ca: Some(az.ca()),
    })
    .unwrap();
    transient_detail(
        gone.check_key(&format!("https://{authority}/keys/acme"))
            .await,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_401_fetches_one_new_token_and_every_credential_kind_gets_tokens() {
    let az = FakeAzure::start().await;
    let acme = az.create_key("acme", KeyType::OctHsm);
    let p = provider(&az, secret_auth(&az));
    p.check_key(&acme).await.expect("after a token");
    p.check_key(&acme).await.expect("same token");
    assert_eq!(az.token_requests(), 1, "cached");
    az.revoke_tokens();
    p.check_key(&acme).await.expect("401, new token, success");
    assert_eq!(az.token_requests(), 2);
    az.set_fault(Some(Fault::Unauthorized));
    let detail = transient_detail(p.check_key(&acme).await);
    assert!(detail.contains("401"), "{detail}");
    assert_eq!(az.token_requests(), 3, "exactly one new token per call");
    az.set_fault(None);

    let workload = provider(
        &az,
        AzureAuth::WorkloadIdentity {
            tenant_id: TENANT_ID.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            token_file: az.federated_token_file(),
        },
    );
    workload.check_key(&acme).await.expect("workload identity");
    let managed = provider(
        &az,
        AzureAuth::ManagedIdentity {
            client_id: None,
            endpoint: IdentityEndpoint::Imds(az.identity_endpoint()),
        },
    );
    managed
        .check_key(&acme)
        .await
        .expect("managed identity (IMDS)");

    let wrong = az.secret_file().with_file_name("wrong-secret");
    std::fs::write(&wrong, "nope\n").unwrap();
    let bad = provider(
        &az,
        AzureAuth::ClientSecret {
            tenant_id: TENANT_ID.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            secret: SecretSource::File(wrong),
        },
    );
    let detail = transient_detail(bad.check_key(&acme).await);
    assert!(
        detail.contains("invalid_client"),
        "the proxy's own credentials are not the tenant's refusal: {detail}"
    );
    let missing = provider(
        &az,
        AzureAuth::ClientSecret {
            tenant_id: TENANT_ID.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            secret: SecretSource::File(az.secret_file().with_file_name("missing")),
        },
    );
    assert!(matches!(
        missing.check_key(&acme).await,
        Err(KmsError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_key_disabled_revokes_the_tenant_through_the_proxy() {
    let az = FakeAzure::start().await;
    let key = az.create_key("acme-key", KeyType::Rsa);
    let s = kms::start(
        &format!("azure: {}", az.provider_yaml()),
        &format!("acme: {{provider: azure, key: \"{key}\"}}"),
    )
    .await;
    let app = s.app().await;
    kms::write_both(&s, &app, "azure-held").await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        rows.contains("azure-held") && rows.contains("local-held"),
        "{rows}"
    );

    // tenants add checks the key at the vault before storing a tenant.
    let config = s.proxy.dir().join("policy.yaml");
    let add = |tenant: &str, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args([
                "tenants",
                "add",
                tenant,
                "--provider",
                "azure",
                "--key",
                key,
            ])
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let disabled = az.create_key("initech-key", KeyType::OctHsm);
    az.set_enabled("initech-key", false);
    let out = add("initech", &disabled);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disabled"),
        "{out:?}"
    );
    let enabled = az.create_key("hooli-key", KeyType::OctHsm);
    let out = add("hooli", &enabled);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stored =
        |tenant: &str| format!("SELECT count(*) FROM cmk.tenants WHERE tenant_id = '{tenant}'");
    assert_eq!(
        common::encryption::count(&s.direct, &stored("initech")).await,
        0
    );
    assert_eq!(
        common::encryption::count(&s.direct, &stored("hooli")).await,
        1
    );

    az.set_enabled("acme-key", false);
    kms::assert_acme_revoked(&app).await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 1, "the revoked tenant's rows fail: {stderr}");
    assert!(
        rows.contains("local-held") && !rows.contains("azure-held"),
        "{rows}"
    );
    az.set_enabled("acme-key", true);
    assert!(
        poll_until(false, || app.query(ACME_READ, &[]))
            .await
            .is_none(),
        "restored"
    );

    az.set_fault(Some(Fault::Forbidden));
    kms::assert_acme_revoked(&app).await;
    az.set_fault(None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "azure");
    for want in ["ok", "denied:disabled", "denied:access-denied"] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    assert!(!s.audit().contains("azure-held"));
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_throttled_vault_is_km002_after_the_key_services_retries() {
    let az = FakeAzure::start().await;
    let key = az.create_key("acme-key", KeyType::OctHsm);
    let s = kms::start(
        &format!("azure: {}", az.provider_yaml()),
        &format!("acme: {{provider: azure, key: \"{key}\"}}"),
    )
    .await;
    let app = s.app().await;
    az.set_fault(Some(Fault::Throttled));
    let before = az.vault_requests();
    let err = app
        .execute(
            "INSERT INTO vault (tenant_id, secret) VALUES ($1, $2)",
            &[&"acme", &"throttled"],
        )
        .await
        .expect_err("no key while throttled");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM002"), "{err}");
    assert!(
        az.vault_requests() - before >= 3,
        "the key service tried again: {}",
        az.vault_requests() - before
    );
    az.set_fault(None);
    app.execute(
        "INSERT INTO vault (tenant_id, secret) VALUES ($1, $2)",
        &[&"acme", &"later"],
    )
    .await
    .expect("works once the vault answers");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "azure");
    assert!(
        outcomes.iter().filter(|o| *o == "transient").count() >= 3,
        "{outcomes:?}"
    );
    assert!(outcomes.iter().any(|o| o == "ok"), "{outcomes:?}");
}
