//! The PKCS#11 provider against a real SoftHSM2 token: AES-GCM sealing bound
//! to tenant and DEK id, the tenant's revocation (CKA_DECRYPT cleared, key
//! deleted) as denials, configuration errors, a bounded session pool under
//! concurrency, `tenants add` checking the key, and revocation end to end
//! through the proxy.

use crate::common;
use crate::support::kms;
use crate::support::softhsm::{SoftHsm, MODULE, TOKEN};

use std::path::Path;
use std::time::Duration;

use cmk_proxy::config::{KeysConfig, ProviderConfig};
use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{
    build_providers, DenialReason, Edek, KeyProvider, KmsError, PinSource, Pkcs11Provider,
};
use common::encryption::poll_until;
use kms::{ctx, reason, ACME_READ};
use uuid::Uuid;

fn provider(hsm: &SoftHsm, sessions: Option<usize>) -> Pkcs11Provider {
    Pkcs11Provider::open(
        Path::new(MODULE),
        TOKEN,
        &PinSource::File(hsm.pin_file()),
        sessions,
    )
    .expect("pkcs11 provider")
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_wrap_unwrap_round_trips_bound_to_tenant_dek_id_and_key() {
    let hsm = SoftHsm::start();
    hsm.create_key("acme");
    hsm.create_key("globex");
    // Built from the policy's config, as the proxy builds it.
    let cfg = KeysConfig {
        providers: [(
            "hsm".to_owned(),
            ProviderConfig::Pkcs11 {
                module: MODULE.into(),
                token: TOKEN.to_owned(),
                pin_file: Some(hsm.pin_file()),
                pin_env: None,
                sessions: None,
            },
        )]
        .into_iter()
        .collect(),
        ..KeysConfig::default()
    };
    let providers = build_providers(&cfg).await.expect("build");
    let p = providers.get("hsm").expect("hsm provider");
    assert_eq!(p.kind(), "pkcs11");
    let (dek, id, edek) = kms::assert_bound_round_trip(p.as_ref(), "acme", "globex").await;
    let again = p.wrap("acme", &ctx("acme", id), &dek).await.expect("wrap");
    assert_ne!(edek, again, "a fresh IV per wrap");
    let last = edek.0.len() - 1;
    let mut tampered = edek.0.clone();
    tampered[last] ^= 1;
    for bad in [
        tampered,
        vec![],
        vec![1],
        vec![9; 61],
        edek.0[..20].to_vec(),
    ] {
        assert_eq!(
            reason(p.unwrap("acme", &ctx("acme", id), &Edek(bad)).await),
            DenialReason::InvalidCiphertext
        );
    }
    // The good EDEK still opens: nothing was lost by the refusals.
    p.unwrap("acme", &ctx("acme", id), &edek)
        .await
        .expect("unwrap");
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_key_with_decrypt_cleared_or_deleted_is_denied() {
    let hsm = SoftHsm::start();
    hsm.create_key("acme");
    let p = provider(&hsm, Some(2));
    let id = Uuid::new_v4();
    let dek = Dek::generate();
    let edek = p.wrap("acme", &ctx("acme", id), &dek).await.expect("wrap");
    p.check_key("acme").await.expect("enabled");

    hsm.set_decrypt("acme", false);
    assert_eq!(reason(p.check_key("acme").await), DenialReason::Disabled);
    assert_eq!(
        reason(p.unwrap("acme", &ctx("acme", id), &edek).await),
        DenialReason::Disabled
    );
    assert_eq!(
        reason(p.wrap("acme", &ctx("acme", id), &dek).await),
        DenialReason::Disabled,
        "no EDEK is minted under a revoked key"
    );

    hsm.set_decrypt("acme", true);
    p.check_key("acme").await.expect("re-enabled");
    let back = p
        .unwrap("acme", &ctx("acme", id), &edek)
        .await
        .expect("unwrap");
    assert_eq!(back.expose_bytes(), dek.expose_bytes());

    hsm.delete_key("acme");
    assert_eq!(reason(p.check_key("acme").await), DenialReason::NotFound);
    assert_eq!(
        reason(p.unwrap("acme", &ctx("acme", id), &edek).await),
        DenialReason::NotFound
    );
    assert_eq!(
        reason(p.check_key("never-made").await),
        DenialReason::NotFound
    );

    // A new key under the old label is found again, and is not the old key.
    hsm.create_key("acme");
    p.check_key("acme").await.expect("the new key");
    assert_eq!(
        reason(p.unwrap("acme", &ctx("acme", id), &edek).await),
        DenialReason::InvalidCiphertext
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_bad_pin_token_module_or_pin_source_is_a_config_error() {
    let hsm = SoftHsm::start();
    let wrong_pin = hsm.pin_file().with_file_name("wrong.pin");
    std::fs::write(&wrong_pin, "0000\n").unwrap();
    let open = |module: &str, token: &str, pin: PinSource| {
        Pkcs11Provider::open(Path::new(module), token, &pin, None)
    };
    let cases = [
        open(MODULE, TOKEN, PinSource::File(wrong_pin.clone())),
        open(MODULE, "no-such-token", PinSource::File(hsm.pin_file())),
        open(
            "/nonexistent/libpkcs11.so",
            TOKEN,
            PinSource::File(hsm.pin_file()),
        ),
        open(MODULE, TOKEN, PinSource::File("/nonexistent/pin".into())),
        open(
            MODULE,
            TOKEN,
            PinSource::Env("CMK_TEST_UNSET_PIN_VAR".to_owned()),
        ),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        match case {
            Err(KmsError::Config(msg)) => assert!(!msg.contains("4711"), "{msg}"),
            other => panic!("case {i}: expected a config error, got {other:?}"),
        }
    }
    let neither = KeysConfig {
        providers: [(
            "hsm".to_owned(),
            ProviderConfig::Pkcs11 {
                module: MODULE.into(),
                token: TOKEN.to_owned(),
                pin_file: None,
                pin_env: None,
                sessions: None,
            },
        )]
        .into_iter()
        .collect(),
        ..KeysConfig::default()
    };
    assert!(matches!(
        build_providers(&neither).await,
        Err(KmsError::Config(_))
    ));
    // The PIN from the environment works as well as from a file.
    std::env::set_var("CMK_TEST_HSM_PIN", crate::support::softhsm::PIN);
    open(MODULE, TOKEN, PinSource::Env("CMK_TEST_HSM_PIN".to_owned())).expect("pin from env");
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_concurrent_calls_share_a_small_session_pool() {
    let hsm = SoftHsm::start();
    hsm.create_key("acme");
    let p = std::sync::Arc::new(provider(&hsm, Some(3)));
    let mut tasks = Vec::new();
    for i in 0..48 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let tenant = format!("t{i}");
            let id = Uuid::new_v4();
            let dek = Dek::generate();
            let edek = p.wrap("acme", &ctx(&tenant, id), &dek).await?;
            let back = p.unwrap("acme", &ctx(&tenant, id), &edek).await?;
            assert_eq!(back.expose_bytes(), dek.expose_bytes());
            p.check_key("acme").await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("call through the pool");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_tenants_add_checks_the_key_before_storing_the_tenant() {
    let hsm = SoftHsm::start();
    hsm.create_key("acme");
    let s = kms::start(&format!("hsm: {}", hsm.provider_yaml()), "").await;
    let config = s.proxy.dir().join("policy.yaml");
    let cli = |tenant: &str, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args(["tenants", "add", tenant, "--provider", "hsm", "--key", key])
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = cli("initech", "no-such-label");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-found"),
        "{out:?}"
    );
    hsm.create_key("hooli");
    hsm.set_decrypt("hooli", false);
    let out = cli("hooli", "hooli");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disabled"),
        "{out:?}"
    );
    let out = cli("initech", "acme");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stored = common::encryption::count(
        &s.direct,
        "SELECT count(*) FROM cmk.tenants WHERE tenant_id IN ('initech', 'hooli') AND provider = 'hsm'",
    )
    .await;
    assert_eq!(stored, 1, "only the tenant with a usable key is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_key_revoked_in_softhsm_revokes_the_tenant_through_the_proxy() {
    let hsm = SoftHsm::start();
    hsm.create_key("acme-key");
    let s = kms::start(
        &format!("hsm: {}", hsm.provider_yaml()),
        "acme: {provider: hsm, key: acme-key}",
    )
    .await;
    let app = s.app().await;
    kms::write_both(&s, &app, "hsm-held").await;
    // decrypt-dump opens a pg_dump through the same provider.
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        rows.contains("hsm-held") && rows.contains("local-held"),
        "{rows}"
    );

    // The tenant clears CKA_DECRYPT in its token (another process).
    hsm.set_decrypt("acme-key", false);
    kms::assert_acme_revoked(&app).await;
    let (code, rows, stderr) = common::encryption::decrypt_dump(&s);
    assert_eq!(code, 1, "the revoked tenant's rows fail: {stderr}");
    assert!(
        rows.contains("local-held") && !rows.contains("hsm-held"),
        "{rows}"
    );
    assert!(stderr.contains("acme"), "{stderr}");

    hsm.set_decrypt("acme-key", true);
    assert!(
        poll_until(false, || app.query(ACME_READ, &[]))
            .await
            .is_none(),
        "re-enabled"
    );
    let rows = app.query(ACME_READ, &[]).await.expect("read");
    assert_eq!(rows.len(), 1, "nothing was lost while revoked");
    assert_eq!(rows[0].get::<_, String>(0), "hsm-held");

    // Deleting the key is final.
    hsm.delete_key("acme-key");
    kms::assert_acme_revoked(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = kms::kms_outcomes(&s, "hsm");
    for want in ["ok", "denied:disabled", "denied:not-found"] {
        assert!(outcomes.iter().any(|o| o == want), "{want} in {outcomes:?}");
    }
    assert!(!s.audit().contains("hsm-held"));
}
