//! The `KeyProvider` trait and its providers: local keyring, AWS KMS,
//! PKCS#11 tokens, KMIP servers, Vault Transit, Google Cloud KMS,
//! Azure Key Vault.
//! A provider wraps and unwraps DEKs under a tenant's master key and says
//! whether that key is still enabled; it caches nothing and knows no SQL.

pub mod aws;
pub mod azure;
pub mod gcp;
mod http;
pub mod kmip;
pub mod local;
pub mod pkcs11;
pub mod vault;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{KeysConfig, ProviderConfig};
use crate::crypto::Dek;

pub use aws::AwsKmsProvider;
pub use azure::{AzureKeyVaultProvider, AzureSettings};
pub use gcp::{GcpCredentials, GcpKmsProvider, GcpKmsSettings};
pub use kmip::{KmipProvider, KmipSettings};
pub use local::{Keyring, KeyringEntry, KeyringState, LocalProvider};
pub use pkcs11::{PinSource, Pkcs11Provider};
pub use vault::{VaultAuth, VaultSettings, VaultTransitProvider};

/// A wrapped DEK (ciphertext from the tenant's KMS). Not secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edek(pub Vec<u8>);

/// What a wrapped DEK is bound to; becomes the KMS encryption context
/// (`{"tenant_id": .., "dek_id": ..}`) or the local wrap's AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyContext<'a> {
    /// Tenant owning the DEK.
    pub tenant_id: &'a str,
    /// Registry id of the DEK.
    pub dek_id: uuid::Uuid,
}

impl KeyContext<'_> {
    /// AEAD associated data for providers that seal DEKs themselves
    /// (PKCS#11, KMIP, Vault Transit, Cloud KMS): the provider's `label`, then the
    /// tenant id length-prefixed (so no two contexts encode alike), then the
    /// DEK id's 16 bytes.
    pub fn associated_data(&self, label: &[u8]) -> Result<Vec<u8>, KmsError> {
        let tenant = self.tenant_id.as_bytes();
        let len = u32::try_from(tenant.len())
            .map_err(|_| KmsError::Config("tenant id too long".to_owned()))?;
        let mut aad = Vec::with_capacity(label.len() + 4 + tenant.len() + 16);
        aad.extend_from_slice(label);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(tenant);
        aad.extend_from_slice(self.dek_id.as_bytes());
        Ok(aad)
    }
}

/// A tenant key management service.
#[async_trait::async_trait]
pub trait KeyProvider: Send + Sync + 'static {
    /// `"local"`, `"aws-kms"`, `"pkcs11"`…
    fn kind(&self) -> &'static str;
    /// Wraps `dek` under the master key `key_ref`, bound to `ctx`.
    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError>;
    /// Unwraps `edek`; succeeds only if `key_ref` is enabled and `ctx`
    /// matches the one used to wrap.
    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError>;
    /// `Ok` only if the master key exists and is enabled.
    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError>;
}

/// Why a KMS refused: the tenant (or its KMS) said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialReason {
    /// The master key is disabled.
    Disabled,
    /// The master key is scheduled for deletion.
    PendingDeletion,
    /// The master key is destroyed (material gone).
    Destroyed,
    /// The KMS denied access to the key.
    AccessDenied,
    /// No such master key.
    NotFound,
    /// The EDEK or its context does not match (wrong tenant/dek_id, other key, tampered).
    InvalidCiphertext,
}

impl DenialReason {
    /// Short stable name for logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending-deletion",
            Self::Destroyed => "destroyed",
            Self::AccessDenied => "access-denied",
            Self::NotFound => "not-found",
            Self::InvalidCiphertext => "invalid-ciphertext",
        }
    }
}

impl std::fmt::Display for DenialReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of a key provider. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The KMS refused: revoke the tenant's cached DEKs.
    #[error("key {key_ref} denied ({reason}): {detail}")]
    Denied {
        /// Master key reference.
        key_ref: String,
        /// Why.
        reason: DenialReason,
        /// Provider's explanation.
        detail: String,
    },
    /// The KMS could not be reached or answered with a retryable error.
    #[error("key {key_ref} temporarily unavailable: {detail}")]
    Transient {
        /// Master key reference.
        key_ref: String,
        /// What went wrong.
        detail: String,
    },
    /// The provider is misconfigured (bad file, bad mode, bad settings).
    #[error("key provider configuration: {0}")]
    Config(String),
}

impl KmsError {
    /// True for an explicit refusal by the KMS (as opposed to unavailability
    /// or misconfiguration).
    pub fn is_denial(&self) -> bool {
        matches!(self, Self::Denied { .. })
    }

    /// The denial reason, if this is a denial.
    pub fn denial_reason(&self) -> Option<DenialReason> {
        match self {
            Self::Denied { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Short outcome label for audit events (`denied:disabled`, `transient`, `config`).
    pub fn outcome(&self) -> String {
        match self {
            Self::Denied { reason, .. } => format!("denied:{reason}"),
            Self::Transient { .. } => "transient".to_owned(),
            Self::Config(_) => "config".to_owned(),
        }
    }
}

/// Providers by their name in `keys.providers`.
pub type Providers = HashMap<String, Arc<dyn KeyProvider>>;

/// Builds every provider named in the policy.
pub async fn build_providers(cfg: &KeysConfig) -> Result<Providers, KmsError> {
    let mut providers: Providers = HashMap::new();
    for (name, provider) in &cfg.providers {
        let built: Arc<dyn KeyProvider> = match provider {
            ProviderConfig::Local { path } => Arc::new(LocalProvider::open(path)?),
            ProviderConfig::AwsKms {
                region,
                endpoint,
                profile,
            } => Arc::new(
                AwsKmsProvider::from_settings(
                    region.as_deref(),
                    endpoint.as_deref(),
                    profile.as_deref(),
                )
                .await?,
            ),
            ProviderConfig::Pkcs11 {
                module,
                token,
                pin_file,
                pin_env,
                sessions,
            } => {
                let pin = match (pin_file, pin_env) {
                    (Some(file), None) => PinSource::File(file.clone()),
                    (None, Some(var)) => PinSource::Env(var.clone()),
                    _ => {
                        return Err(KmsError::Config(format!(
                            "pkcs11 provider '{name}' needs exactly one of pin_file, pin_env"
                        )))
                    }
                };
                Arc::new(Pkcs11Provider::open(module, token, &pin, *sessions)?)
            }
            ProviderConfig::Kmip {
                endpoint,
                ca,
                client_cert,
                client_key,
                server_name,
            } => Arc::new(KmipProvider::new(&KmipSettings {
                endpoint: endpoint.clone(),
                ca: ca.clone(),
                client_cert: client_cert.clone(),
                client_key: client_key.clone(),
                server_name: server_name.clone(),
            })?),
            vault @ ProviderConfig::VaultTransit { .. } => {
                Arc::new(VaultTransitProvider::new(vault::settings(name, vault)?)?)
            }
            gcp @ ProviderConfig::GcpKms { .. } => {
                Arc::new(GcpKmsProvider::new(gcp::settings(name, gcp)?)?)
            }
            azure @ ProviderConfig::AzureKeyVault { .. } => {
                Arc::new(AzureKeyVaultProvider::new(azure::settings(name, azure)?)?)
            }
        };
        providers.insert(name.clone(), built);
    }
    Ok(providers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn associated_data_differs_per_tenant_dek_and_label() {
        let id = uuid::Uuid::new_v4();
        let aad = |tenant_id, dek_id, label: &[u8]| {
            KeyContext { tenant_id, dek_id }
                .associated_data(label)
                .unwrap()
        };
        let a = aad("ab", id, b"x");
        assert_ne!(a, aad("a", id, b"x"));
        assert_ne!(a, aad("ab", uuid::Uuid::new_v4(), b"x"));
        assert_ne!(a, aad("ab", id, b"y"));
        assert_eq!(a, aad("ab", id, b"x"));
    }
}
