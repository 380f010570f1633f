//! The AWS KMS provider against a real moto server: round trip, encryption
//! context binding, key state (disable, enable, pending deletion) seen
//! through DescribeKey, unknown keys, and an unreachable endpoint.

use crate::support::moto;

use std::collections::BTreeMap;
use std::time::Instant;

use cmk_proxy::config::{KeysConfig, ProviderConfig};
use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{
    build_providers, AwsKmsProvider, DenialReason, KeyContext, KeyProvider, KmsError,
};
use moto::Moto;
use uuid::Uuid;

const REGION: &str = "us-east-1";

async fn provider(endpoint: &str) -> AwsKmsProvider {
    AwsKmsProvider::with_static_credentials(Some(REGION), Some(endpoint), "test", "test")
        .await
        .unwrap()
}

async fn create_key(p: &AwsKmsProvider) -> String {
    let out = p.client().create_key().send().await.unwrap();
    out.key_metadata().unwrap().key_id().to_owned()
}

fn ctx(tenant: &str, dek_id: Uuid) -> KeyContext<'_> {
    KeyContext {
        tenant_id: tenant,
        dek_id,
    }
}

fn reason(err: KmsError) -> DenialReason {
    err.denial_reason()
        .unwrap_or_else(|| panic!("expected a denial, got {err}"))
}

#[tokio::test]
async fn aws_wrap_unwrap_round_trips() {
    let moto = Moto::start();
    let p = provider(&moto.endpoint()).await;
    assert_eq!(p.kind(), "aws-kms");
    let key = create_key(&p).await;
    p.check_key(&key).await.unwrap();
    let dek = Dek::generate();
    let id = Uuid::new_v4();
    let edek = p.wrap(&key, &ctx("acme", id), &dek).await.unwrap();
    assert!(!edek.0.windows(32).any(|w| w == dek.expose_bytes()));
    let back = p.unwrap(&key, &ctx("acme", id), &edek).await.unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
}

#[tokio::test]
async fn aws_encryption_context_carries_tenant_and_dek_id() {
    let moto = Moto::start();
    let p = provider(&moto.endpoint()).await;
    let key = create_key(&p).await;
    let id = Uuid::new_v4();
    let edek = p
        .wrap(&key, &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();
    let err = p.unwrap(&key, &ctx("globex", id), &edek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::InvalidCiphertext);
    let err = p
        .unwrap(&key, &ctx("acme", Uuid::new_v4()), &edek)
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::InvalidCiphertext);
    // The raw Decrypt with the exact context succeeds: the context is what
    // the provider sends, not something it checks locally.
    let out = p
        .client()
        .decrypt()
        .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(edek.0.clone()))
        .encryption_context("tenant_id", "acme")
        .encryption_context("dek_id", id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(out.plaintext().unwrap().as_ref().len(), 32);
}

#[tokio::test]
async fn aws_disabled_key_is_denied_and_enable_restores() {
    let moto = Moto::start();
    let p = provider(&moto.endpoint()).await;
    let key = create_key(&p).await;
    let id = Uuid::new_v4();
    let dek = Dek::generate();
    let edek = p.wrap(&key, &ctx("acme", id), &dek).await.unwrap();

    p.client().disable_key().key_id(&key).send().await.unwrap();
    let err = p.unwrap(&key, &ctx("acme", id), &edek).await.unwrap_err();
    assert!(err.is_denial(), "{err}");
    assert_eq!(reason(err), DenialReason::Disabled);
    assert_eq!(
        reason(p.check_key(&key).await.unwrap_err()),
        DenialReason::Disabled
    );
    let err = p.wrap(&key, &ctx("acme", id), &dek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::Disabled);

    p.client().enable_key().key_id(&key).send().await.unwrap();
    p.check_key(&key).await.unwrap();
    let back = p.unwrap(&key, &ctx("acme", id), &edek).await.unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
}

#[tokio::test]
async fn aws_key_pending_deletion_is_denied() {
    let moto = Moto::start();
    let p = provider(&moto.endpoint()).await;
    let key = create_key(&p).await;
    let id = Uuid::new_v4();
    let edek = p
        .wrap(&key, &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();
    p.client()
        .schedule_key_deletion()
        .key_id(&key)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let err = p.unwrap(&key, &ctx("acme", id), &edek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::PendingDeletion);
    assert_eq!(
        reason(p.check_key(&key).await.unwrap_err()),
        DenialReason::PendingDeletion
    );
}

#[tokio::test]
async fn aws_unknown_key_is_not_found() {
    let moto = Moto::start();
    let p = provider(&moto.endpoint()).await;
    let ghost = Uuid::new_v4().to_string();
    assert_eq!(
        reason(p.check_key(&ghost).await.unwrap_err()),
        DenialReason::NotFound
    );
    let err = p
        .wrap(&ghost, &ctx("acme", Uuid::new_v4()), &Dek::generate())
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::NotFound);
}

#[tokio::test]
async fn aws_unreachable_endpoint_is_transient() {
    // Nothing listens on this port: connection refused, a dispatch failure.
    let endpoint = format!("http://127.0.0.1:{}", moto::free_port());
    let p = provider(&endpoint).await;
    let started = Instant::now();
    let err = p.check_key("any-key").await.unwrap_err();
    assert!(matches!(err, KmsError::Transient { .. }), "{err}");
    assert!(!err.is_denial());
    let err = p
        .unwrap(
            "any-key",
            &ctx("acme", Uuid::new_v4()),
            &cmk_proxy::kms::Edek(vec![1, 2, 3]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::Transient { .. }), "{err}");
    // Informational only (no timed assertion): how fast "unavailable" is.
    eprintln!(
        "two calls to an unreachable KMS took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn build_providers_makes_an_aws_provider_from_the_standard_chain() {
    let moto = Moto::start();
    // The standard chain reads credentials from the environment; only this
    // test in this binary relies on them (the others pass static ones).
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let mut providers = BTreeMap::new();
    providers.insert(
        "aws".to_owned(),
        ProviderConfig::AwsKms {
            region: Some(REGION.to_owned()),
            endpoint: Some(moto.endpoint()),
            profile: None,
        },
    );
    let cfg = KeysConfig {
        providers,
        ..KeysConfig::default()
    };
    let built = build_providers(&cfg).await.unwrap();
    let p = built.get("aws").unwrap();
    assert_eq!(p.kind(), "aws-kms");
    let key = create_key(&provider(&moto.endpoint()).await).await;
    let id = Uuid::new_v4();
    let dek = Dek::generate();
    let edek = p.wrap(&key, &ctx("acme", id), &dek).await.unwrap();
    let back = p.unwrap(&key, &ctx("acme", id), &edek).await.unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
}
