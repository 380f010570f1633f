//! The Google Cloud KMS provider over the REST API v1
//! (<https://cloud.google.com/kms/docs/reference/rest>): `encrypt`/`decrypt`
//! of the DEK under the tenant's symmetric CryptoKey with the tenant id and
//! DEK id as `additionalAuthenticatedData`, and a read of the CryptoKey (its
//! purpose and its primary version's state) for approvals. The EDEK keeps
//! the CryptoKeyVersion that sealed it, so a refused decrypt names its
//! version's state. Credentials from a service-account file or the metadata
//! server (`token`), never from the policy file.

pub mod token;

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use self::token::GcpCredentials;
use self::token::TokenSource;
use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::config::ProviderConfig;
use crate::crypto::Dek;

/// The public endpoint of the API.
pub const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";
/// Separates this provider's AAD from any other use of the tenant's key.
const AAD_LABEL: &[u8] = b"cmk-proxy/gcp-kms/v1";
/// Prefix of this provider's EDEKs: `gcp-kms:<version id>:<base64 ciphertext>`.
const EDEK_PREFIX: &str = "gcp-kms:";

/// Where the API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct GcpKmsSettings {
    /// `https://cloudkms.googleapis.com` (or a Private Service Connect name).
    pub endpoint: String,
    /// CA certificate (PEM) of the endpoint's TLS certificate, besides the system roots.
    pub ca: Option<PathBuf>,
    /// Where access tokens come from.
    pub credentials: GcpCredentials,
}

/// Settings from a `kind: gcp-kms` entry of `keys.providers`, with the
/// credentials resolved from the environment as Google's libraries do.
pub fn settings(name: &str, cfg: &ProviderConfig) -> Result<GcpKmsSettings, KmsError> {
    let ProviderConfig::GcpKms {
        credentials_file,
        endpoint,
        ca,
    } = cfg
    else {
        return Err(KmsError::Config(format!(
            "provider '{name}' is not gcp-kms"
        )));
    };
    Ok(GcpKmsSettings {
        endpoint: endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
        ca: ca.clone(),
        credentials: GcpCredentials::resolve(
            credentials_file.as_deref(),
            std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS"),
            std::env::var("GCE_METADATA_HOST").ok(),
        ),
    })
}

/// `KeyProvider` over Cloud KMS.
pub struct GcpKmsProvider {
    http: reqwest::Client,
    endpoint: String,
    tokens: TokenSource,
}

impl std::fmt::Debug for GcpKmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpKmsProvider")
            .field("endpoint", &self.endpoint)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// Why a call did not return its answer.
enum CallError {
    /// 400 FAILED_PRECONDITION: a key or version not ENABLED (the caller
    /// reads the state to say which), or a project-side precondition.
    Precondition(String),
    /// Anything else, already mapped.
    Kms(KmsError),
}

impl From<KmsError> for CallError {
    fn from(e: KmsError) -> Self {
        CallError::Kms(e)
    }
}

/// The operation a status is mapped for (a 400 INVALID_ARGUMENT on decrypt
/// is a ciphertext or AAD that does not open).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Encrypt,
    Decrypt,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptRequest<'a> {
    plaintext: &'a str,
    additional_authenticated_data: String,
}

#[derive(Deserialize)]
struct EncryptResponse {
    name: String,
    ciphertext: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DecryptRequest<'a> {
    ciphertext: &'a str,
    additional_authenticated_data: String,
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct DecryptResponse {
    plaintext: String,
}

impl GcpKmsProvider {
    /// Builds the HTTP client; fetches a token on first use.
    pub fn new(settings: GcpKmsSettings) -> Result<GcpKmsProvider, KmsError> {
        let builder = super::http::client_builder("gcp-kms", settings.ca.as_deref())?;
        let endpoint = settings.endpoint.trim_end_matches('/').to_owned();
        if url::Url::parse(&endpoint).map(|u| u.scheme() != "https") != Ok(false) {
            return Err(KmsError::Config(format!(
                "gcp-kms endpoint '{endpoint}' is not an https:// URL"
            )));
        }
        let http = builder
            .build()
            .map_err(|e| KmsError::Config(format!("gcp-kms http client: {e}")))?;
        Ok(GcpKmsProvider {
            http,
            endpoint,
            tokens: TokenSource::new(settings.credentials),
        })
    }

    /// One authenticated call to `v1/{resource}`; a 401 fetches a new token
    /// at once and tries once more (the token may have been revoked early).
    async fn call<B: Serialize>(
        &self,
        key_ref: &str,
        op: Op,
        resource: &str,
        body: Option<&B>,
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let url = format!("{}/v1/{resource}", self.endpoint);
        let transient = |detail: String| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("gcp-kms: {detail}"),
        };
        for attempt in 0..2 {
            let token = self.tokens.token(&self.http, key_ref).await?;
            let mut req = match body {
                Some(body) => self.http.post(&url).json(body),
                None => self.http.get(&url),
            };
            req = req.bearer_auth(token.as_str());
            let resp = req.send().await.map_err(|e| transient(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = super::http::read_answer(resp).await.map_err(transient)?;
            if status == 401 && attempt == 0 {
                self.tokens.forget(&token).await;
                continue;
            }
            if (200..300).contains(&status) {
                return Ok(bytes);
            }
            let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(status_outcome(key_ref, op, status, &value));
        }
        Err(CallError::Kms(transient(
            "the API refused a freshly fetched token (401)".to_owned(),
        )))
    }

    /// Reads a resource's JSON (`GET v1/{resource}`).
    async fn read(&self, key_ref: &str, resource: &str) -> Result<Value, KmsError> {
        let bytes = self
            .call::<()>(key_ref, Op::Read, resource, None)
            .await
            .map_err(|e| match e {
                CallError::Kms(e) => e,
                CallError::Precondition(detail) => transient_answer(key_ref, detail),
            })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| transient_answer(key_ref, format!("unreadable answer: {e}")))
    }

    /// The CryptoKey must encrypt and decrypt and its primary version be ENABLED.
    async fn require_usable(&self, key_ref: &str) -> Result<(), KmsError> {
        let name = crypto_key_name(key_ref)?;
        let key = self.read(key_ref, name).await?;
        crypto_key_outcome(key_ref, &key)
    }

    /// After a FAILED_PRECONDITION: the denial the version's state explains,
    /// else a transient error (a project-side precondition, or the version
    /// was enabled again meanwhile).
    async fn explain_version(&self, key_ref: &str, version: u64, detail: String) -> KmsError {
        let name = format!("{key_ref}/cryptoKeyVersions/{version}");
        match self.read(key_ref, &name).await {
            Ok(v) => match version_state_outcome(key_ref, v["state"].as_str().unwrap_or("")) {
                Ok(()) => transient_answer(key_ref, detail),
                Err(e) => e,
            },
            Err(e) => e,
        }
    }
}

fn transient_answer(key_ref: &str, detail: String) -> KmsError {
    KmsError::Transient {
        key_ref: key_ref.to_owned(),
        detail: format!("gcp-kms: {detail}"),
    }
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`, checked segment by
/// segment so the name is safe as a URL path. A CryptoKeyVersion name is
/// refused: decrypt takes the CryptoKey (the version is in the ciphertext),
/// and wrapping under a pinned version would outlive the tenant's rotation.
fn crypto_key_name(key_ref: &str) -> Result<&str, KmsError> {
    let refuse = |detail: &str| KmsError::Denied {
        key_ref: key_ref.to_owned(),
        reason: DenialReason::NotFound,
        detail: detail.to_owned(),
    };
    let parts: Vec<&str> = key_ref.split('/').collect();
    if parts.len() == 10 && parts[8] == "cryptoKeyVersions" {
        return Err(refuse(
            "a cryptoKeyVersions name: give the CryptoKey \
             (projects/P/locations/L/keyRings/R/cryptoKeys/K); the version is chosen by Cloud KMS",
        ));
    }
    let shaped = parts.len() == 8
        && parts
            .iter()
            .step_by(2)
            .eq(["projects", "locations", "keyRings", "cryptoKeys"].iter())
        && parts.iter().skip(1).step_by(2).all(|id| {
            // Key ring and key ids may start with `-` or `_`; a segment of
            // dots only would walk the URL's path.
            id.bytes().any(|b| b != b'.')
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        });
    if !shaped {
        return Err(refuse(
            "not a Cloud KMS CryptoKey name (projects/P/locations/L/keyRings/R/cryptoKeys/K)",
        ));
    }
    Ok(key_ref)
}

/// Maps an error answer (<https://cloud.google.com/apis/design/errors>,
/// `{"error": {"code", "message", "status"}}`): 403 and 404 are the
/// tenant's refusal; 400 FAILED_PRECONDITION is a key or version not
/// ENABLED; 400 INVALID_ARGUMENT on decrypt is a ciphertext or AAD that does
/// not open; 401 (after a fresh token), 429 and 5xx are transient.
fn status_outcome(key_ref: &str, op: Op, status: u16, value: &Value) -> CallError {
    let error = &value["error"];
    let code = error["status"].as_str().unwrap_or("");
    let detail = format!(
        "HTTP {status} {code}: {}",
        error["message"].as_str().unwrap_or("")
    );
    let denied = |reason| {
        CallError::Kms(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: detail.clone(),
        })
    };
    match (status, code) {
        (403, _) => denied(DenialReason::AccessDenied),
        (404, _) => denied(DenialReason::NotFound),
        (400, "FAILED_PRECONDITION") => CallError::Precondition(detail),
        (400, "INVALID_ARGUMENT") if op == Op::Decrypt => denied(DenialReason::InvalidCiphertext),
        _ => CallError::Kms(transient_answer(key_ref, detail)),
    }
}

/// A CryptoKeyVersion `state`
/// (<https://cloud.google.com/kms/docs/reference/rest/v1/projects.locations.keyRings.cryptoKeys.cryptoKeyVersions#CryptoKeyVersionState>).
fn version_state_outcome(key_ref: &str, state: &str) -> Result<(), KmsError> {
    let deny = |reason| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("cloud kms key version is {state}"),
        })
    };
    match state {
        "ENABLED" => Ok(()),
        "DISABLED" => deny(DenialReason::Disabled),
        "DESTROY_SCHEDULED" => deny(DenialReason::PendingDeletion),
        "DESTROYED" => deny(DenialReason::Destroyed),
        "IMPORT_FAILED" | "GENERATION_FAILED" | "EXTERNAL_DESTRUCTION_FAILED" => {
            deny(DenialReason::NotFound)
        }
        // PENDING_GENERATION, PENDING_IMPORT, PENDING_EXTERNAL_DESTRUCTION,
        // or a state this build does not know: not a decision yet.
        _ => Err(transient_answer(
            key_ref,
            format!("key version state '{state}'"),
        )),
    }
}

/// A CryptoKey read: `purpose` must be ENCRYPT_DECRYPT and `primary` ENABLED.
fn crypto_key_outcome(key_ref: &str, key: &Value) -> Result<(), KmsError> {
    let deny = |reason, detail: &str| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("cloud kms key {detail}"),
        })
    };
    if key["purpose"] != "ENCRYPT_DECRYPT" {
        return deny(DenialReason::AccessDenied, "is not an ENCRYPT_DECRYPT key");
    }
    match key["primary"]["state"].as_str() {
        Some(state) => version_state_outcome(key_ref, state),
        None => deny(DenialReason::Disabled, "has no primary version"),
    }
}

/// The version id a CryptoKeyVersion name of `key_ref` ends in.
fn version_of(key_ref: &str, version_name: &str) -> Option<u64> {
    version_name
        .strip_prefix(key_ref)?
        .strip_prefix("/cryptoKeyVersions/")?
        .parse()
        .ok()
}

/// `(version id, base64 ciphertext)` of an EDEK of this provider.
fn parse_edek(edek: &Edek) -> Option<(u64, &str)> {
    let text = std::str::from_utf8(&edek.0)
        .ok()?
        .strip_prefix(EDEK_PREFIX)?;
    let (version, ciphertext) = text.split_once(':')?;
    let version = version.parse().ok()?;
    let decodes = !ciphertext.is_empty() && B64.decode(ciphertext).is_ok();
    decodes.then_some((version, ciphertext))
}

#[async_trait::async_trait]
impl KeyProvider for GcpKmsProvider {
    fn kind(&self) -> &'static str {
        "gcp-kms"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        let name = crypto_key_name(key_ref)?;
        let plaintext = Zeroizing::new(B64.encode(dek.expose_bytes()));
        let body = EncryptRequest {
            plaintext: &plaintext,
            additional_authenticated_data: B64.encode(ctx.associated_data(AAD_LABEL)?),
        };
        let resource = format!("{name}:encrypt");
        let bytes = match self
            .call(key_ref, Op::Encrypt, &resource, Some(&body))
            .await
        {
            Ok(bytes) => bytes,
            Err(CallError::Kms(e)) => return Err(e),
            // The primary is not ENABLED: the key read says how.
            Err(CallError::Precondition(detail)) => {
                self.require_usable(key_ref).await?;
                return Err(transient_answer(key_ref, detail));
            }
        };
        let answer: EncryptResponse = serde_json::from_slice(&bytes)
            .map_err(|e| transient_answer(key_ref, format!("unreadable encrypt answer: {e}")))?;
        let version = version_of(key_ref, &answer.name).ok_or_else(|| {
            transient_answer(
                key_ref,
                "encrypt answered without a version of the key".to_owned(),
            )
        })?;
        if B64
            .decode(&answer.ciphertext)
            .map_or(true, |c| c.is_empty())
        {
            return Err(transient_answer(
                key_ref,
                "encrypt answered without a base64 ciphertext".to_owned(),
            ));
        }
        Ok(Edek(
            format!("{EDEK_PREFIX}{version}:{}", answer.ciphertext).into_bytes(),
        ))
    }

    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        let bad = |detail: &str| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::InvalidCiphertext,
            detail: detail.to_owned(),
        };
        let (version, ciphertext) =
            parse_edek(edek).ok_or_else(|| bad("not a gcp-kms:<version>:<ciphertext> EDEK"))?;
        let name = crypto_key_name(key_ref)?;
        let body = DecryptRequest {
            ciphertext,
            additional_authenticated_data: B64.encode(ctx.associated_data(AAD_LABEL)?),
        };
        let resource = format!("{name}:decrypt");
        let bytes = match self
            .call(key_ref, Op::Decrypt, &resource, Some(&body))
            .await
        {
            Ok(bytes) => bytes,
            Err(CallError::Kms(e)) => return Err(e),
            Err(CallError::Precondition(detail)) => {
                return Err(self.explain_version(key_ref, version, detail).await)
            }
        };
        let answer: DecryptResponse = serde_json::from_slice(&bytes)
            .map_err(|_| bad("cloud kms decrypt answered without plaintext"))?;
        let plain = Zeroizing::new(
            B64.decode(answer.plaintext.as_bytes())
                .map_err(|_| bad("cloud kms decrypt answered bad base64"))?,
        );
        Dek::from_bytes(plain)
            .map_err(|_| bad("cloud kms decrypt returned a key of the wrong length"))
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.require_usable(key_ref).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "projects/p-1/locations/europe-west1/keyRings/ring/cryptoKeys/acme";

    fn error(code: u16, status: &str) -> Value {
        json!({"error": {"code": code, "message": "m", "status": status}})
    }

    fn reason_of(e: CallError) -> Option<DenialReason> {
        match e {
            CallError::Kms(e) => e.denial_reason(),
            CallError::Precondition(_) => None,
        }
    }

    #[test]
    fn statuses_map_to_denial_precondition_or_unavailability() {
        for (status, code, op, reason) in [
            (
                403,
                "PERMISSION_DENIED",
                Op::Read,
                DenialReason::AccessDenied,
            ),
            (404, "NOT_FOUND", Op::Encrypt, DenialReason::NotFound),
            (
                400,
                "INVALID_ARGUMENT",
                Op::Decrypt,
                DenialReason::InvalidCiphertext,
            ),
        ] {
            let got = reason_of(status_outcome(KEY, op, status, &error(status, code)));
            assert_eq!(got, Some(reason), "{status} {code}");
        }
        assert!(matches!(
            status_outcome(KEY, Op::Decrypt, 400, &error(400, "FAILED_PRECONDITION")),
            CallError::Precondition(_)
        ));
        for (status, code) in [
            (429, "RESOURCE_EXHAUSTED"),
            (500, "INTERNAL"),
            (503, "UNAVAILABLE"),
            (401, "UNAUTHENTICATED"),
            (400, "INVALID_ARGUMENT"),
        ] {
            assert!(matches!(
                status_outcome(KEY, Op::Encrypt, status, &error(status, code)),
                CallError::Kms(KmsError::Transient { .. })
            ));
        }
    }

    #[test]
    fn key_and_version_states_map_to_reasons() {
        let key = |purpose: &str, state: Option<&str>| match state {
            Some(s) => json!({"purpose": purpose, "primary": {"state": s}}),
            None => json!({"purpose": purpose}),
        };
        assert!(crypto_key_outcome(KEY, &key("ENCRYPT_DECRYPT", Some("ENABLED"))).is_ok());
        for (value, reason) in [
            (
                key("ENCRYPT_DECRYPT", Some("DISABLED")),
                DenialReason::Disabled,
            ),
            (
                key("ENCRYPT_DECRYPT", Some("DESTROYED")),
                DenialReason::Destroyed,
            ),
            (
                key("ENCRYPT_DECRYPT", Some("DESTROY_SCHEDULED")),
                DenialReason::PendingDeletion,
            ),
            (key("ENCRYPT_DECRYPT", None), DenialReason::Disabled),
            (
                key("ASYMMETRIC_SIGN", Some("ENABLED")),
                DenialReason::AccessDenied,
            ),
        ] {
            let err = crypto_key_outcome(KEY, &value).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{value}");
        }
        assert!(matches!(
            version_state_outcome(KEY, "PENDING_GENERATION"),
            Err(KmsError::Transient { .. })
        ));
    }

    #[test]
    fn key_names_are_crypto_keys_only() {
        assert!(crypto_key_name(KEY).is_ok());
        assert!(
            crypto_key_name("projects/example.com:p/locations/global/keyRings/r/cryptoKeys/k")
                .is_ok()
        );
        for bad in [
            "",
            "acme",
            "projects/p/locations/l/keyRings/r/cryptoKeys/",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k?x=1",
            "projects/p/locations/l/keyRings/../cryptoKeys/k",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/x",
            "projects/p/locations/l/keyRing/r/cryptoKeys/k",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
        ] {
            let err = crypto_key_name(bad).unwrap_err();
            assert_eq!(err.denial_reason(), Some(DenialReason::NotFound), "{bad}");
        }
        let pinned = format!("{KEY}/cryptoKeyVersions/3");
        assert!(crypto_key_name(&pinned)
            .unwrap_err()
            .to_string()
            .contains("cryptoKeyVersions"));
    }

    #[test]
    fn edeks_carry_their_version() {
        assert_eq!(
            version_of(KEY, &format!("{KEY}/cryptoKeyVersions/7")),
            Some(7)
        );
        assert_eq!(version_of(KEY, "projects/x/cryptoKeyVersions/7"), None);
        let edek = |s: &str| Edek(s.as_bytes().to_vec());
        assert_eq!(parse_edek(&edek("gcp-kms:7:AAAA")), Some((7, "AAAA")));
        for bad in [
            "gcp-kms:x:AAAA",
            "gcp-kms:7:",
            "gcp-kms:7:!!",
            "vault:v1:AAAA",
            "\u{ff}",
        ] {
            assert_eq!(parse_edek(&edek(bad)), None, "{bad}");
        }
    }
}
