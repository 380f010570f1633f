//! The Azure Key Vault / Managed HSM provider over REST API 7.4
//! (<https://learn.microsoft.com/rest/api/keyvault/keys/>): a key read for
//! its state (`enabled`, `exp`, `nbf`, `key_ops`), `wrapkey`/`unwrapkey`
//! of a per-DEK key-encryption key that seals the DEK bound to the tenant
//! and DEK id (`edek.rs`), tokens from Microsoft Entra (`credential.rs`),
//! key refs only on Azure's domains or allowed hosts (`key_ref.rs`).

mod credential;
mod edek;
mod key_ref;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde_json::Value;
use zeroize::Zeroizing;

pub use credential::{AuthFields, AzureAuth, IdentityEndpoint, SecretSource};
pub use key_ref::{AllowedHosts, KeyRef, DEFAULT_SCOPE};

use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::config::ProviderConfig;
use crate::crypto::Dek;
use credential::{Credential, DEFAULT_AUTHORITY};
use edek::{AzureEdek, WrapAlgorithm, AAD_LABEL, KEK_LEN};

/// Everything the provider needs, resolved from the policy and environment.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// How tokens are obtained.
    pub auth: AzureAuth,
    /// Microsoft Entra authority (`https://login.microsoftonline.com`).
    pub authority: String,
    /// Hosts allowed besides Azure's domains, and their token scope.
    pub allowed: AllowedHosts,
    /// CA certificate (PEM) trusted besides the system roots.
    pub ca: Option<PathBuf>,
}

/// Settings from a `kind: azure-key-vault` entry of `keys.providers`, with
/// the gaps filled from the process environment as Azure SDKs do.
pub fn settings(name: &str, cfg: &ProviderConfig) -> Result<AzureSettings, KmsError> {
    settings_with_env(name, cfg, &|var| std::env::var(var).ok())
}

/// [`settings`] with an explicit environment (tests).
pub fn settings_with_env(
    name: &str,
    cfg: &ProviderConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AzureSettings, KmsError> {
    let ProviderConfig::AzureKeyVault {
        auth,
        tenant_id,
        client_id,
        client_secret_file,
        federated_token_file,
        authority_host,
        identity_endpoint,
        allowed_hosts,
        scope,
        ca,
    } = cfg
    else {
        return Err(KmsError::Config(format!(
            "provider '{name}' is not azure-key-vault"
        )));
    };
    let auth = AzureAuth::resolve(
        &AuthFields {
            auth: auth.as_deref(),
            tenant_id: tenant_id.as_deref(),
            client_id: client_id.as_deref(),
            client_secret_file: client_secret_file.as_deref(),
            federated_token_file: federated_token_file.as_deref(),
            identity_endpoint: identity_endpoint.as_deref(),
        },
        env,
    )?;
    let authority = authority_host
        .clone()
        .or_else(|| env("AZURE_AUTHORITY_HOST").filter(|a| !a.is_empty()))
        .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
    if let Some(bad) = allowed_hosts.iter().find(|h| {
        h.is_empty() || h.contains(['/', '@', '?', '#']) || h.contains(char::is_whitespace)
    }) {
        return Err(KmsError::Config(format!(
            "azure-key-vault provider '{name}': allowed_hosts entry '{bad}' is not host[:port]"
        )));
    }
    if !authority.starts_with("https://") {
        return Err(KmsError::Config(format!(
            "azure-key-vault provider '{name}': authority {authority} is not https"
        )));
    }
    Ok(AzureSettings {
        auth,
        authority,
        allowed: AllowedHosts {
            hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            scope: scope.clone().unwrap_or_else(|| DEFAULT_SCOPE.to_owned()),
        },
        ca: ca.clone(),
    })
}

/// `KeyProvider` over Azure Key Vault and Managed HSM.
pub struct AzureKeyVaultProvider {
    http: reqwest::Client,
    credential: Credential,
    allowed: AllowedHosts,
}

impl std::fmt::Debug for AzureKeyVaultProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureKeyVaultProvider")
            .field("allowed_hosts", &self.allowed.hosts)
            .finish_non_exhaustive()
    }
}

/// What a key read says about the key.
#[derive(Debug)]
struct UsableKey {
    /// The versioned id of the version in use.
    kid: KeyRef,
    alg: WrapAlgorithm,
}

/// Key Vault's error, `{"error": {"code", "message", "innererror": {"code"}}}`.
fn answer_error(status: u16, body: &Value) -> String {
    let error = &body["error"];
    let mut text = format!("HTTP {status}");
    for part in [
        &error["code"],
        &error["innererror"]["code"],
        &error["message"],
    ] {
        if let Some(s) = part.as_str().and_then(|s| s.lines().next()) {
            text.push_str(": ");
            text.push_str(s);
        }
    }
    text
}

/// Which request an answer belongs to, for the statuses that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Read,
    Wrap,
    Unwrap,
}

/// Maps an answer's status (Key Vault "Common error codes"): 403 and 404 are
/// the tenant's refusal (403 `KeyDisabled`: disabled); 400 on `unwrapkey` is
/// a wrapped key that does not open; 429, 5xx and the rest are transient.
fn status_outcome(
    key_ref: &str,
    op: Operation,
    status: u16,
    retry_after: Option<&str>,
    value: Value,
) -> Result<Value, KmsError> {
    let detail = answer_error(status, &value);
    let denied = |reason| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("azure key vault: {detail}"),
        })
    };
    match status {
        200..=299 => Ok(value),
        403 if value["error"]["innererror"]["code"] == "KeyDisabled" => {
            denied(DenialReason::Disabled)
        }
        403 => denied(DenialReason::AccessDenied),
        404 => denied(DenialReason::NotFound),
        400 if op == Operation::Unwrap => denied(DenialReason::InvalidCiphertext),
        400 => denied(DenialReason::AccessDenied),
        _ => Err(KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: match retry_after {
                Some(after) => format!("azure key vault: {detail} (Retry-After {after})"),
                None => format!("azure key vault: {detail}"),
            },
        }),
    }
}

/// The JSON of a `wrapkey`/`unwrapkey` request, `{"alg", "value"}`, built
/// in wiped memory (the value may be the plaintext KEK). Neither field needs
/// escaping: the algorithm is a fixed name, the value base64url.
fn wrap_request(alg: WrapAlgorithm, value: &[u8]) -> Zeroizing<Vec<u8>> {
    let encoded = Zeroizing::new(B64URL.encode(value));
    Zeroizing::new(
        format!(
            "{{\"alg\":\"{}\",\"value\":\"{}\"}}",
            alg.name(),
            encoded.as_str()
        )
        .into_bytes(),
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A key read's answer: usable only when enabled, within `nbf`..`exp`,
/// allowed to wrap and unwrap, and of a type that wraps.
fn key_state(
    key_ref: &str,
    value: &Value,
    now: i64,
    allowed: &AllowedHosts,
) -> Result<UsableKey, KmsError> {
    let deny = |reason, detail: &str| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("azure key {detail}"),
        })
    };
    let attributes = &value["attributes"];
    let key = &value["key"];
    if !key.is_object() || !attributes.is_object() {
        return deny(DenialReason::NotFound, "read returned no key");
    }
    if attributes["enabled"].as_bool() != Some(true) {
        return deny(DenialReason::Disabled, "is disabled");
    }
    if attributes["exp"].as_i64().is_some_and(|exp| exp <= now) {
        return deny(DenialReason::Disabled, "has expired");
    }
    if attributes["nbf"].as_i64().is_some_and(|nbf| nbf > now) {
        return deny(DenialReason::Disabled, "is not yet valid (nbf)");
    }
    let ops: Vec<&str> = key["key_ops"]
        .as_array()
        .map(|ops| ops.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !ops.contains(&"wrapKey") || !ops.contains(&"unwrapKey") {
        return deny(
            DenialReason::AccessDenied,
            "does not allow wrapKey and unwrapKey",
        );
    }
    let kty = key["kty"].as_str().unwrap_or("");
    let Some(alg) = WrapAlgorithm::for_key_type(kty) else {
        return deny(
            DenialReason::AccessDenied,
            &format!("type {kty} cannot wrap"),
        );
    };
    let kid = key["kid"]
        .as_str()
        .and_then(|kid| KeyRef::parse(kid, allowed).ok())
        .filter(|kid| kid.version.is_some());
    match kid {
        Some(kid) => Ok(UsableKey { kid, alg }),
        None => Err(KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: "azure key read answered without a versioned kid".to_owned(),
        }),
    }
}

impl AzureKeyVaultProvider {
    /// Builds the HTTP client; tokens are fetched on first use.
    pub fn new(settings: AzureSettings) -> Result<AzureKeyVaultProvider, KmsError> {
        let http = super::http::client_builder("azure", settings.ca.as_deref())?
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KmsError::Config(format!("azure http client: {e}")))?;
        Ok(AzureKeyVaultProvider {
            credential: Credential::new(http.clone(), settings.auth, settings.authority),
            http,
            allowed: settings.allowed,
        })
    }

    fn parse_ref(&self, key_ref: &str) -> Result<KeyRef, KmsError> {
        KeyRef::parse(key_ref, &self.allowed).map_err(|why| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::NotFound,
            detail: format!("not an Azure key URL: {why}"),
        })
    }

    /// One authenticated request; a 401 drops the token and tries once more
    /// with a fresh one (Key Vault's answer to an expired or revoked token).
    async fn call(
        &self,
        key_ref: &str,
        key: &KeyRef,
        op: Operation,
        url: &str,
        body: Option<&Zeroizing<Vec<u8>>>,
    ) -> Result<Value, KmsError> {
        let transient = |detail: String| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("azure key vault: {detail}"),
        };
        for attempt in 0..2 {
            let token = self.credential.token(&key.scope, key_ref).await?;
            let mut req = match body {
                Some(body) => self
                    .http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec()),
                None => self.http.get(url),
            };
            req = req.bearer_auth(token.as_str());
            let resp = req.send().await.map_err(|e| transient(e.to_string()))?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = super::http::read_answer(resp).await.map_err(transient)?;
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if status == 401 {
                self.credential.forget(&key.scope, token.as_str()).await;
                if attempt == 0 {
                    continue;
                }
                // The proxy's own token refused twice: not the tenant's decision.
                return Err(transient(answer_error(status, &value)));
            }
            return status_outcome(key_ref, op, status, retry_after.as_deref(), value);
        }
        Err(transient("no answer".to_owned()))
    }

    /// Reads the key (its pinned version, else the latest) and checks its state.
    async fn require_usable(&self, key_ref: &str, key: &KeyRef) -> Result<UsableKey, KmsError> {
        let value = self
            .call(key_ref, key, Operation::Read, &key.url(None), None)
            .await?;
        let usable = key_state(key_ref, &value, unix_now(), &self.allowed)?;
        if !key.same_key(&usable.kid) {
            return Err(KmsError::Transient {
                key_ref: key_ref.to_owned(),
                detail: "azure key read answered another key's kid".to_owned(),
            });
        }
        Ok(usable)
    }

    /// The `value` of a wrap or unwrap answer, decoded.
    fn answer_value(
        key_ref: &str,
        value: &mut Value,
        reason: DenialReason,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let bad = || KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: "azure key vault answered without a base64url value".to_owned(),
        };
        let encoded = match value["value"].take() {
            Value::String(s) => Zeroizing::new(s),
            _ => return Err(bad()),
        };
        B64URL
            .decode(encoded.trim_end_matches('='))
            .map(Zeroizing::new)
            .map_err(|_| bad())
    }
}

#[async_trait::async_trait]
impl KeyProvider for AzureKeyVaultProvider {
    fn kind(&self) -> &'static str {
        "azure-key-vault"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        let key = self.parse_ref(key_ref)?;
        let usable = self.require_usable(key_ref, &key).await?;
        let kek = edek::new_kek();
        let body = wrap_request(usable.alg, kek.as_ref());
        let mut value = self
            .call(
                key_ref,
                &key,
                Operation::Wrap,
                &usable.kid.url(Some("wrapkey")),
                Some(&body),
            )
            .await?;
        let wrapped = Self::answer_value(key_ref, &mut value, DenialReason::AccessDenied)?;
        let kid = value["kid"]
            .as_str()
            .filter(|kid| {
                KeyRef::parse(kid, &self.allowed)
                    .is_ok_and(|k| k.version.is_some() && key.same_key(&k))
            })
            .ok_or_else(|| KmsError::Transient {
                key_ref: key_ref.to_owned(),
                detail: "azure wrapkey answered without this key's versioned kid".to_owned(),
            })?;
        let sealed = edek::seal(
            usable.alg,
            kid,
            &wrapped,
            &kek,
            &ctx.associated_data(AAD_LABEL)?,
            dek,
        )
        .map_err(|_| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: "azure wrapkey answered a kid or wrapped key too long".to_owned(),
        })?;
        Ok(Edek(sealed))
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
        let key = self.parse_ref(key_ref)?;
        let parsed = AzureEdek::parse(&edek.0).map_err(|_| bad("not an Azure EDEK"))?;
        let kid = KeyRef::parse(parsed.kid, &self.allowed)
            .ok()
            .filter(|kid| kid.version.is_some() && key.same_key(kid))
            .ok_or_else(|| bad("EDEK wrapped under another key"))?;
        // The tenant's current decision about the key, then the version that wrapped.
        self.require_usable(key_ref, &key).await?;
        let body = wrap_request(parsed.alg, parsed.wrapped_kek);
        let mut value = self
            .call(
                key_ref,
                &key,
                Operation::Unwrap,
                &kid.url(Some("unwrapkey")),
                Some(&body),
            )
            .await?;
        let kek = Self::answer_value(key_ref, &mut value, DenialReason::InvalidCiphertext)?;
        if kek.len() != KEK_LEN {
            return Err(bad("azure unwrapkey returned a key of the wrong length"));
        }
        parsed
            .open(&kek, &ctx.associated_data(AAD_LABEL)?)
            .map_err(|_| bad("EDEK does not open for this tenant and DEK id"))
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        let key = self.parse_ref(key_ref)?;
        self.require_usable(key_ref, &key).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allowed() -> AllowedHosts {
        AllowedHosts {
            hosts: vec![],
            scope: DEFAULT_SCOPE.to_owned(),
        }
    }

    fn error(code: &str, inner: Option<&str>) -> Value {
        let mut e = json!({"error": {"code": code, "message": "m"}});
        if let Some(inner) = inner {
            e["error"]["innererror"] = json!({"code": inner});
        }
        e
    }

    #[test]
    fn statuses_map_to_denial_or_unavailability() {
        for (status, op, body, reason) in [
            (
                403,
                Operation::Read,
                error("Forbidden", Some("ForbiddenByRbac")),
                DenialReason::AccessDenied,
            ),
            (
                403,
                Operation::Unwrap,
                error("Forbidden", Some("KeyDisabled")),
                DenialReason::Disabled,
            ),
            (
                404,
                Operation::Read,
                error("KeyNotFound", None),
                DenialReason::NotFound,
            ),
            (
                400,
                Operation::Unwrap,
                error("BadParameter", None),
                DenialReason::InvalidCiphertext,
            ),
            (
                400,
                Operation::Wrap,
                error("BadParameter", None),
                DenialReason::AccessDenied,
            ),
        ] {
            let err = status_outcome("k", op, status, None, body).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{status} {op:?}");
        }
        for status in [429, 500, 502, 503, 504] {
            let err = status_outcome(
                "k",
                Operation::Read,
                status,
                Some("7"),
                error("Throttled", None),
            )
            .unwrap_err();
            match err {
                KmsError::Transient { detail, .. } => {
                    assert!(detail.contains("Retry-After 7"), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(status_outcome("k", Operation::Read, 200, None, json!({})).is_ok());
    }

    fn key(ops: &[&str], kty: &str, attributes: Value) -> Value {
        json!({
            "key": {"kid": "https://acme.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef",
                    "kty": kty, "key_ops": ops},
            "attributes": attributes,
        })
    }

    #[test]
    fn key_reads_map_to_state() {
        let ops = ["wrapKey", "unwrapKey", "encrypt"];
        let now = 1_700_000_000;
        let ok = key(
            &ops,
            "RSA",
            json!({"enabled": true, "exp": now + 10, "nbf": now - 10}),
        );
        let usable = key_state("k", &ok, now, &allowed()).unwrap();
        assert_eq!(usable.alg, WrapAlgorithm::RsaOaep256);
        assert_eq!(usable.kid.name, "k");
        let hsm = key(&ops, "oct-HSM", json!({"enabled": true}));
        assert_eq!(
            key_state("k", &hsm, now, &allowed()).unwrap().alg,
            WrapAlgorithm::A256Kw
        );
        for (value, reason) in [
            (
                key(&ops, "RSA", json!({"enabled": false})),
                DenialReason::Disabled,
            ),
            (
                key(&ops, "RSA", json!({"enabled": true, "exp": now})),
                DenialReason::Disabled,
            ),
            (
                key(&ops, "RSA", json!({"enabled": true, "nbf": now + 60})),
                DenialReason::Disabled,
            ),
            (
                key(&["unwrapKey"], "RSA", json!({"enabled": true})),
                DenialReason::AccessDenied,
            ),
            (
                key(&ops, "EC", json!({"enabled": true})),
                DenialReason::AccessDenied,
            ),
            (Value::Null, DenialReason::NotFound),
        ] {
            let err = key_state("k", &value, now, &allowed()).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{value}");
        }
        let mut unversioned = ok.clone();
        unversioned["key"]["kid"] = json!("https://acme.vault.azure.net/keys/k");
        assert!(matches!(
            key_state("k", &unversioned, now, &allowed()),
            Err(KmsError::Transient { .. })
        ));
    }
}
