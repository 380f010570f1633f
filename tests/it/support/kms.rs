//! Shared pieces of the provider tests (`kms_pkcs11`, `kms_kmip`,
//! `kms_vault`): a key context, the denial reason of a result, and the
//! end-to-end setting of a `vault` table with tenant acme on the provider
//! under test and globex on the local keyring.
#![allow(dead_code)]

use cmk_proxy::kms::{DenialReason, KeyContext, KmsError};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::common::encryption::{assert_sealed, poll_until, EncryptedSetup};
use crate::common::sqlstate;

/// The read the end-to-end tests poll.
pub const ACME_READ: &str = "SELECT secret FROM vault WHERE tenant_id = 'acme'";
const INSERT: &str = "INSERT INTO vault (tenant_id, secret) VALUES ($1, $2)";

/// The context a DEK of `tenant` with id `dek_id` is wrapped under.
pub fn ctx(tenant: &str, dek_id: Uuid) -> KeyContext<'_> {
    KeyContext {
        tenant_id: tenant,
        dek_id,
    }
}

/// The denial reason of `result`; panics on success or another error.
pub fn reason(result: Result<impl std::fmt::Debug, KmsError>) -> DenialReason {
    match result {
        Err(e) => e
            .denial_reason()
            .unwrap_or_else(|| panic!("expected a denial, got {e}")),
        Ok(v) => panic!("expected a denial, got {v:?}"),
    }
}

/// A proxy protecting `vault.secret`, with `provider` (a `name: {…}` line
/// of `keys.providers`) and tenant acme's line `acme`.
pub async fn start(provider: &str, acme: &str) -> EncryptedSetup {
    EncryptedSetup::start_with(
        "CREATE TABLE vault (id serial PRIMARY KEY, tenant_id text NOT NULL, \
         secret bytea, cmk_edek jsonb)",
        "public.vault",
        &["secret: {type: text}"],
        provider,
        acme,
    )
    .await
}

/// Writes `acme_value` for acme and `local-held` for globex, waits until
/// acme's row reads back, and checks it is sealed at rest.
pub async fn write_both(s: &EncryptedSetup, app: &Client, acme_value: &str) {
    app.execute(INSERT, &[&"acme", &acme_value])
        .await
        .expect("acme write");
    app.execute(INSERT, &[&"globex", &"local-held"])
        .await
        .expect("globex write");
    assert!(poll_until(false, || app.query(ACME_READ, &[]))
        .await
        .is_none());
    assert_sealed(&s.direct, ACME_READ, acme_value).await;
}

/// Waits until acme's reads fail with KM001, then checks that its writes
/// are refused with KM001 and globex still reads on the same connection.
pub async fn assert_acme_revoked(app: &Client) {
    let err = poll_until(true, || app.query(ACME_READ, &[]))
        .await
        .expect("revoked");
    assert_eq!(sqlstate(&err).as_deref(), Some("KM001"), "{err}");
    let err = app
        .execute(INSERT, &[&"acme", &"refused"])
        .await
        .expect_err("write refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("KM001"), "{err}");
    let globex: String = app
        .query_one("SELECT secret FROM vault WHERE tenant_id = 'globex'", &[])
        .await
        .expect("globex keeps working")
        .get(0);
    assert_eq!(globex, "local-held");
}

/// Outcomes of the audit's `kms_call` events of `provider`, in order.
pub fn kms_outcomes(s: &EncryptedSetup, provider: &str) -> Vec<String> {
    s.audit()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "kms_call" && e["provider"] == provider)
        .filter_map(|e| e["outcome"].as_str().map(str::to_owned))
        .collect()
}

/// Wraps a fresh DEK for acme under `acme_key` and checks that it unwraps
/// to the same bytes, that the EDEK does not contain them, and that it does
/// not open for another tenant, another DEK id or under `other_key`.
pub async fn assert_bound_round_trip(
    p: &dyn cmk_proxy::kms::KeyProvider,
    acme_key: &str,
    other_key: &str,
) -> (cmk_proxy::crypto::Dek, Uuid, cmk_proxy::kms::Edek) {
    let dek = cmk_proxy::crypto::Dek::generate();
    let id = Uuid::new_v4();
    let edek = p
        .wrap(acme_key, &ctx("acme", id), &dek)
        .await
        .expect("wrap");
    assert!(!edek.0.windows(32).any(|w| w == dek.expose_bytes()));
    let back = p
        .unwrap(acme_key, &ctx("acme", id), &edek)
        .await
        .expect("unwrap");
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
    for (key_ref, tenant, dek_id) in [
        (acme_key, "globex", id),
        (acme_key, "acme", Uuid::new_v4()),
        (other_key, "acme", id),
    ] {
        assert_eq!(
            reason(p.unwrap(key_ref, &ctx(tenant, dek_id), &edek).await),
            DenialReason::InvalidCiphertext,
            "{key_ref}/{tenant}"
        );
    }
    (dek, id, edek)
}
