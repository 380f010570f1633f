//! The AWS KMS provider: Encrypt/Decrypt bound to an encryption context
//! `{"tenant_id", "dek_id"}`, DescribeKey to confirm the key is Enabled, and
//! a mapping of SDK errors onto denial versus transient unavailability.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use zeroize::Zeroizing;

use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::crypto::Dek;

/// TCP connect timeout towards KMS: an unreachable KMS is a fast `Transient`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one HTTP attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of a whole operation (one attempt: see `keys/retry.rs`).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);

/// `KeyProvider` over AWS KMS (or any endpoint that speaks its API, e.g. moto).
#[derive(Debug, Clone)]
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
}

impl AwsKmsProvider {
    /// Builds a client from the standard AWS configuration chain (env,
    /// shared config/credentials files, SSO, IMDS…), with optional region,
    /// endpoint override and named profile.
    pub async fn from_settings(
        region: Option<&str>,
        endpoint: Option<&str>,
        profile: Option<&str>,
    ) -> Result<AwsKmsProvider, KmsError> {
        let mut loader = Self::loader(region, endpoint);
        if let Some(profile) = profile {
            loader = loader.profile_name(profile);
        }
        Self::finish(loader.load().await)
    }

    /// Like [`from_settings`](Self::from_settings) with fixed credentials
    /// instead of the credential chain (tests against moto, static setups).
    pub async fn with_static_credentials(
        region: Option<&str>,
        endpoint: Option<&str>,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<AwsKmsProvider, KmsError> {
        let creds = Credentials::new(access_key_id, secret_access_key, None, None, "cmk-proxy");
        let loader = Self::loader(region, endpoint).credentials_provider(creds);
        Self::finish(loader.load().await)
    }

    fn loader(region: Option<&str>, endpoint: Option<&str>) -> aws_config::ConfigLoader {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            // The key service retries with jitter; SDK retries would stack on it.
            .retry_config(RetryConfig::disabled());
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_owned()));
        }
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        loader
    }

    fn finish(sdk: aws_config::SdkConfig) -> Result<AwsKmsProvider, KmsError> {
        if sdk.region().is_none() {
            return Err(KmsError::Config(
                "aws-kms provider has no region: set `region:` or AWS_REGION".to_owned(),
            ));
        }
        Ok(AwsKmsProvider {
            client: aws_sdk_kms::Client::new(&sdk),
        })
    }

    /// The underlying SDK client (tests use it to create and disable keys).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    /// DescribeKey: `Ok` only when KeyState is Enabled.
    async fn require_enabled(&self, key_ref: &str) -> Result<(), KmsError> {
        let out = self
            .client
            .describe_key()
            .key_id(key_ref)
            .send()
            .await
            .map_err(|e| map_sdk_error(key_ref, "DescribeKey", e))?;
        let state = out
            .key_metadata()
            .and_then(|m| m.key_state())
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        key_state_outcome(key_ref, &state)
    }
}

/// Maps a DescribeKey KeyState onto the provider's answer. Anything that is
/// not Enabled refuses; only states AWS documents as in-flight are transient.
fn key_state_outcome(key_ref: &str, state: &str) -> Result<(), KmsError> {
    let deny = |reason| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("KMS key state is {state}"),
        })
    };
    match state {
        "Enabled" => Ok(()),
        "Disabled" | "PendingImport" | "Unavailable" => deny(DenialReason::Disabled),
        "PendingDeletion" | "PendingReplicaDeletion" => deny(DenialReason::PendingDeletion),
        "Creating" | "Updating" => Err(KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("KMS key state is {state}"),
        }),
        "" => deny(DenialReason::NotFound),
        _ => deny(DenialReason::Disabled),
    }
}

/// Maps an SDK error: explicit refusals are denials, unavailability is
/// transient. Detail strings come from the service and carry no key bytes.
fn map_sdk_error<E>(key_ref: &str, operation: &str, err: SdkError<E>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = |detail: String| KmsError::Transient {
        key_ref: key_ref.to_owned(),
        detail: format!("{operation}: {detail}"),
    };
    match &err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or("").to_owned();
            let message = ctx.err().message().unwrap_or("").to_owned();
            let status = ctx.raw().status().as_u16();
            let detail = format!("{operation}: {code}: {message}");
            let denied = |reason| KmsError::Denied {
                key_ref: key_ref.to_owned(),
                reason,
                detail: detail.clone(),
            };
            match code.as_str() {
                "DisabledException" => denied(DenialReason::Disabled),
                "KMSInvalidStateException" => {
                    if message.to_ascii_lowercase().contains("pending deletion")
                        || message.contains("PendingDeletion")
                    {
                        denied(DenialReason::PendingDeletion)
                    } else {
                        denied(DenialReason::Disabled)
                    }
                }
                "NotFoundException" | "InvalidArnException" => denied(DenialReason::NotFound),
                "AccessDeniedException" | "InvalidGrantTokenException" | "InvalidKeyUsageException" => {
                    denied(DenialReason::AccessDenied)
                }
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    denied(DenialReason::InvalidCiphertext)
                }
                "ThrottlingException"
                | "LimitExceededException"
                | "KMSInternalException"
                | "DependencyTimeoutException"
                | "KeyUnavailableException"
                | "ServiceUnavailableException"
                | "InternalFailure"
                | "RequestTimeout"
                | "RequestTimeoutException"
                // The proxy's own credentials, not the tenant's decision.
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId" => transient(format!("{code}: {message}")),
                _ if status >= 500 || status == 429 => transient(format!("{code}: {message}")),
                _ => denied(DenialReason::AccessDenied),
            }
        }
        SdkError::ConstructionFailure(_) => {
            KmsError::Config(format!("{operation}: {}", DisplayErrorContext(&err)))
        }
        _ => transient(DisplayErrorContext(&err).to_string()),
    }
}

#[async_trait::async_trait]
impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> &'static str {
        "aws-kms"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        // moto's Encrypt ignores key state, and AWS itself would refuse a
        // disabled key anyway: confirm first, so no EDEK is minted for it.
        self.require_enabled(key_ref).await?;
        let out = self
            .client
            .encrypt()
            .key_id(key_ref)
            .plaintext(Blob::new(dek.expose_bytes().to_vec()))
            .encryption_context("tenant_id", ctx.tenant_id)
            .encryption_context("dek_id", ctx.dek_id.to_string())
            .send()
            .await
            .map_err(|e| map_sdk_error(key_ref, "Encrypt", e))?;
        let blob = out.ciphertext_blob.ok_or_else(|| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: "Encrypt returned no ciphertext".to_owned(),
        })?;
        Ok(Edek(blob.into_inner()))
    }

    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        let out = self
            .client
            .decrypt()
            .key_id(key_ref)
            .ciphertext_blob(Blob::new(edek.0.clone()))
            .encryption_context("tenant_id", ctx.tenant_id)
            .encryption_context("dek_id", ctx.dek_id.to_string())
            .send()
            .await
            .map_err(|e| map_sdk_error(key_ref, "Decrypt", e))?;
        let plain = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        // Real AWS refuses Decrypt under a disabled key; moto does not.
        // DescribeKey makes the answer the same on both.
        self.require_enabled(key_ref).await?;
        Dek::from_bytes(plain).map_err(|_| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::InvalidCiphertext,
            detail: "Decrypt returned a key of the wrong length".to_owned(),
        })
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.require_enabled(key_ref).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_states_map_to_denials() {
        assert!(key_state_outcome("k", "Enabled").is_ok());
        for (state, reason) in [
            ("Disabled", DenialReason::Disabled),
            ("PendingImport", DenialReason::Disabled),
            ("Unavailable", DenialReason::Disabled),
            ("PendingDeletion", DenialReason::PendingDeletion),
            ("SomethingNew", DenialReason::Disabled),
        ] {
            let err = key_state_outcome("k", state).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{state}");
        }
        assert!(matches!(
            key_state_outcome("k", "Creating"),
            Err(KmsError::Transient { .. })
        ));
    }
}
