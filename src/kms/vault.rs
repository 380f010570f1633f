//! The HashiCorp Vault / OpenBao Transit provider over its HTTP API
//! (<https://developer.hashicorp.com/vault/api-docs/secret/transit>):
//! `encrypt`/`decrypt` with the tenant id and DEK id as `associated_data`
//! (AEAD key types), and a key read for its state. Authentication by token
//! (environment or file), AppRole or Kubernetes login, never a secret in the
//! policy file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::config::ProviderConfig;
use crate::crypto::Dek;

/// A login token is renewed by a new login after this share of its lease.
const LEASE_SHARE: f64 = 0.8;
/// Separates this provider's AAD from any other use of the tenant's key.
const AAD_LABEL: &[u8] = b"cmk-proxy/vault-transit/v1";

/// How the proxy authenticates to Vault.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    /// A token from a file, else from `VAULT_TOKEN`.
    Token {
        /// File holding the token.
        file: Option<PathBuf>,
    },
    /// AppRole login (`auth/<mount>/login`) with a role id and a secret id file.
    AppRole {
        /// Auth mount path (default `approle`).
        mount: String,
        /// The role id (not secret).
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// Kubernetes login (`auth/<mount>/login`) with the pod's service-account token.
    Kubernetes {
        /// Auth mount path (default `kubernetes`).
        mount: String,
        /// The Vault role.
        role: String,
        /// File holding the service-account JWT.
        jwt_file: PathBuf,
    },
}

/// Where Vault is and how to reach it.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// `https://vault:8200`.
    pub address: String,
    /// Transit mount path (default `transit`).
    pub mount: String,
    /// Vault Enterprise / HCP namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    /// CA certificate (PEM) for Vault's TLS certificate, besides the system roots.
    pub ca: Option<PathBuf>,
    /// Authentication method.
    pub auth: VaultAuth,
}

/// Settings from a `kind: vault-transit` entry of `keys.providers`.
pub fn settings(name: &str, cfg: &ProviderConfig) -> Result<VaultSettings, KmsError> {
    let ProviderConfig::VaultTransit {
        address,
        mount,
        namespace,
        ca,
        auth,
        token_file,
        role_id,
        secret_id_file,
        role,
        jwt_file,
        auth_mount,
    } = cfg
    else {
        return Err(KmsError::Config(format!(
            "provider '{name}' is not vault-transit"
        )));
    };
    let need =
        |what: &str| KmsError::Config(format!("vault-transit provider '{name}' needs {what}"));
    let auth = match auth.as_deref().unwrap_or("token") {
        "token" => VaultAuth::Token {
            file: token_file.clone(),
        },
        "approle" => VaultAuth::AppRole {
            mount: auth_mount.clone().unwrap_or_else(|| "approle".to_owned()),
            role_id: role_id.clone().ok_or_else(|| need("role_id"))?,
            secret_id_file: secret_id_file
                .clone()
                .ok_or_else(|| need("secret_id_file"))?,
        },
        "kubernetes" => VaultAuth::Kubernetes {
            mount: auth_mount
                .clone()
                .unwrap_or_else(|| "kubernetes".to_owned()),
            role: role.clone().ok_or_else(|| need("role"))?,
            jwt_file: jwt_file.clone().unwrap_or_else(|| {
                PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
            }),
        },
        other => {
            return Err(KmsError::Config(format!(
            "vault-transit provider '{name}': auth '{other}' is not token, approle or kubernetes"
        )))
        }
    };
    Ok(VaultSettings {
        address: address.clone(),
        mount: mount.clone().unwrap_or_else(|| "transit".to_owned()),
        namespace: namespace.clone(),
        ca: ca.clone(),
        auth,
    })
}

/// A token and when to log in again (`None`: never expires here).
struct Session {
    token: Zeroizing<String>,
    renew_at: Option<Instant>,
}

/// `KeyProvider` over Vault Transit.
pub struct VaultTransitProvider {
    http: reqwest::Client,
    settings: VaultSettings,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for VaultTransitProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultTransitProvider")
            .field("address", &self.settings.address)
            .field("mount", &self.settings.mount)
            .finish()
    }
}

fn read_secret(what: &str, path: &std::path::Path) -> Result<Zeroizing<String>, KmsError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| KmsError::Config(format!("vault {what} {}: {e}", path.display())))?,
    );
    let trimmed = Zeroizing::new(text.trim().to_owned());
    if trimmed.is_empty() {
        return Err(KmsError::Config(format!(
            "vault {what} {} is empty",
            path.display()
        )));
    }
    Ok(trimmed)
}

/// The error of a Vault answer: `(status, first message)`.
fn answer_error(status: u16, body: &Value) -> String {
    let errors = body["errors"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    format!("HTTP {status}: {errors}")
}

impl VaultTransitProvider {
    /// Builds the HTTP client; logs in on first use.
    pub fn new(settings: VaultSettings) -> Result<VaultTransitProvider, KmsError> {
        let builder = super::http::client_builder("vault", settings.ca.as_deref())?;
        if let VaultAuth::Token { file: None } = &settings.auth {
            if std::env::var_os("VAULT_TOKEN").is_none() {
                return Err(KmsError::Config(
                    "vault-transit: no token_file and VAULT_TOKEN is not set".to_owned(),
                ));
            }
        }
        let http = builder
            .build()
            .map_err(|e| KmsError::Config(format!("vault http client: {e}")))?;
        Ok(VaultTransitProvider {
            http,
            settings,
            session: Mutex::new(None),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.settings.address.trim_end_matches('/'))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req
    }

    /// Sends and reads a JSON answer; transport trouble is `Transient`.
    async fn send(
        &self,
        key_ref: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), KmsError> {
        let transient = |detail: String| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("vault: {detail}"),
        };
        let resp = req.send().await.map_err(|e| transient(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| transient(e.to_string()))?;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        Ok((status, value))
    }

    /// The current token, logging in when there is none or it is due.
    async fn token(&self, key_ref: &str) -> Result<Zeroizing<String>, KmsError> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_ref() {
            if s.renew_at.is_none_or(|at| Instant::now() < at) {
                return Ok(s.token.clone());
            }
        }
        let fresh = self.login(key_ref).await?;
        let token = fresh.token.clone();
        *session = Some(fresh);
        Ok(token)
    }

    async fn login(&self, key_ref: &str) -> Result<Session, KmsError> {
        let (mount, body) = match &self.settings.auth {
            VaultAuth::Token { file } => {
                let token = match file {
                    Some(path) => read_secret("token_file", path)?,
                    None => Zeroizing::new(std::env::var("VAULT_TOKEN").map_err(|_| {
                        KmsError::Config("vault-transit: VAULT_TOKEN is not set".to_owned())
                    })?),
                };
                return Ok(Session {
                    token,
                    renew_at: None,
                });
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret = read_secret("secret_id_file", secret_id_file)?;
                (
                    mount,
                    json!({"role_id": role_id, "secret_id": secret.as_str()}),
                )
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret("jwt_file", jwt_file)?;
                (mount, json!({"role": role, "jwt": jwt.as_str()}))
            }
        };
        let req = self
            .request(reqwest::Method::POST, &format!("auth/{mount}/login"))
            .json(&body);
        let (status, value) = self.send(key_ref, req).await?;
        let token = value["auth"]["client_token"].as_str().unwrap_or_default();
        if status != 200 || token.is_empty() {
            // The proxy's own credentials, not the tenant's decision.
            return Err(KmsError::Transient {
                key_ref: key_ref.to_owned(),
                detail: format!("vault login: {}", answer_error(status, &value)),
            });
        }
        let lease = value["auth"]["lease_duration"].as_u64().unwrap_or(0);
        Ok(Session {
            token: Zeroizing::new(token.to_owned()),
            renew_at: (lease > 0)
                .then(|| Instant::now() + Duration::from_secs_f64(lease as f64 * LEASE_SHARE)),
        })
    }

    /// One authenticated call; a 403 after a login retries once with a new
    /// login (the token may have been revoked early).
    async fn call(
        &self,
        key_ref: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, KmsError> {
        for attempt in 0..2 {
            let token = self.token(key_ref).await?;
            let mut req = self
                .request(method.clone(), path)
                .header("X-Vault-Token", token.as_str());
            if let Some(body) = body {
                req = req.json(body);
            }
            let (status, value) = self.send(key_ref, req).await?;
            let logs_in = !matches!(self.settings.auth, VaultAuth::Token { .. });
            if status == 403 && logs_in && attempt == 0 {
                *self.session.lock().await = None;
                continue;
            }
            return status_outcome(key_ref, status, value);
        }
        Err(KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: "vault: no answer".to_owned(),
        })
    }

    /// Reads the key: it must exist, encrypt and decrypt, and not be
    /// marked deletable. Returns its `min_decryption_version`.
    async fn require_usable(&self, key_ref: &str) -> Result<u64, KmsError> {
        let path = format!("{}/keys/{}", self.settings.mount, key_path(key_ref)?);
        let value = self
            .call(key_ref, reqwest::Method::GET, &path, None)
            .await?;
        key_state_outcome(key_ref, &value["data"])
    }
}

/// A key name as one URL path segment (Transit names have no `/`).
fn key_path(key_ref: &str) -> Result<&str, KmsError> {
    if key_ref.is_empty()
        || !key_ref
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::NotFound,
            detail: "not a Transit key name".to_owned(),
        });
    }
    Ok(key_ref)
}

/// Maps an answer's status (API docs, "HTTP status codes"): 2xx is the
/// data; 403 and 404 are the tenant's refusal; 400 on decrypt is a
/// ciphertext that does not open; 429, 5xx (503: sealed) are transient.
fn status_outcome(key_ref: &str, status: u16, value: Value) -> Result<Value, KmsError> {
    let detail = answer_error(status, &value);
    let denied = |reason| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: detail.clone(),
        })
    };
    match status {
        200..=299 => Ok(value),
        403 => denied(DenialReason::AccessDenied),
        404 => denied(DenialReason::NotFound),
        400 if detail.contains("too old") || detail.contains("disallowed by policy") => {
            denied(DenialReason::Disabled)
        }
        400 => denied(DenialReason::InvalidCiphertext),
        _ => Err(KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("vault: {detail}"),
        }),
    }
}

/// A key read's `data`: usable only when it supports encryption and
/// decryption and is not marked `deletion_allowed` (the tenant's step
/// before deleting it).
fn key_state_outcome(key_ref: &str, data: &Value) -> Result<u64, KmsError> {
    let deny = |reason, detail: &str| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("vault transit key {detail}"),
        })
    };
    if !data.is_object() {
        return deny(DenialReason::NotFound, "read returned no data");
    }
    if data["deletion_allowed"].as_bool() == Some(true) {
        return deny(DenialReason::PendingDeletion, "has deletion_allowed set");
    }
    if data["supports_encryption"].as_bool() != Some(true)
        || data["supports_decryption"].as_bool() != Some(true)
    {
        return deny(DenialReason::AccessDenied, "cannot encrypt and decrypt");
    }
    Ok(data["min_decryption_version"].as_u64().unwrap_or(1))
}

/// The key version of a `vault:vN:` ciphertext.
fn ciphertext_version(ciphertext: &str) -> Option<u64> {
    ciphertext
        .strip_prefix("vault:v")?
        .split_once(':')?
        .0
        .parse()
        .ok()
}

#[async_trait::async_trait]
impl KeyProvider for VaultTransitProvider {
    fn kind(&self) -> &'static str {
        "vault-transit"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        // Encrypt would create a missing key (upsert); the read refuses first.
        self.require_usable(key_ref).await?;
        let plaintext = Zeroizing::new(B64.encode(dek.expose_bytes()));
        let body = json!({
            "plaintext": plaintext.as_str(),
            "associated_data": B64.encode(ctx.associated_data(AAD_LABEL)?),
        });
        let path = format!("{}/encrypt/{}", self.settings.mount, key_path(key_ref)?);
        let value = self
            .call(key_ref, reqwest::Method::POST, &path, Some(&body))
            .await?;
        let ciphertext = value["data"]["ciphertext"]
            .as_str()
            .filter(|c| ciphertext_version(c).is_some())
            .ok_or_else(|| KmsError::Transient {
                key_ref: key_ref.to_owned(),
                detail: "vault encrypt answered without a vault:vN: ciphertext".to_owned(),
            })?;
        Ok(Edek(ciphertext.as_bytes().to_vec()))
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
        let ciphertext = std::str::from_utf8(&edek.0)
            .ok()
            .filter(|c| ciphertext_version(c).is_some())
            .ok_or_else(|| bad("not a vault:vN: ciphertext"))?;
        let min_version = self.require_usable(key_ref).await?;
        if ciphertext_version(ciphertext).is_some_and(|v| v < min_version) {
            return Err(KmsError::Denied {
                key_ref: key_ref.to_owned(),
                reason: DenialReason::Disabled,
                detail: format!("key version below min_decryption_version {min_version}"),
            });
        }
        let body = json!({
            "ciphertext": ciphertext,
            "associated_data": B64.encode(ctx.associated_data(AAD_LABEL)?),
        });
        let path = format!("{}/decrypt/{}", self.settings.mount, key_path(key_ref)?);
        let mut value = self
            .call(key_ref, reqwest::Method::POST, &path, Some(&body))
            .await?;
        let encoded = match value["data"]["plaintext"].take() {
            Value::String(s) => Zeroizing::new(s),
            _ => return Err(bad("vault decrypt answered without plaintext")),
        };
        let plain = Zeroizing::new(
            B64.decode(encoded.as_bytes())
                .map_err(|_| bad("vault decrypt answered bad base64"))?,
        );
        Dek::from_bytes(plain).map_err(|_| bad("vault decrypt returned a key of the wrong length"))
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.require_usable(key_ref).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_denial_or_unavailability() {
        let errors = |msg: &str| json!({"errors": [msg]});
        for (status, msg, reason) in [
            (403, "permission denied", DenialReason::AccessDenied),
            (404, "", DenialReason::NotFound),
            (
                400,
                "cipher: message authentication failed",
                DenialReason::InvalidCiphertext,
            ),
            (
                400,
                "ciphertext or signature version is disallowed by policy (too old)",
                DenialReason::Disabled,
            ),
        ] {
            let err = status_outcome("k", status, errors(msg)).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{status} {msg}");
        }
        for status in [429, 500, 502, 503] {
            assert!(matches!(
                status_outcome("k", status, errors("x")),
                Err(KmsError::Transient { .. })
            ));
        }
        assert!(status_outcome("k", 200, json!({})).is_ok());
    }

    #[test]
    fn key_reads_map_to_state() {
        let ok = json!({"supports_encryption": true, "supports_decryption": true,
                        "deletion_allowed": false, "min_decryption_version": 3});
        assert_eq!(key_state_outcome("k", &ok).unwrap(), 3);
        let mut deletable = ok.clone();
        deletable["deletion_allowed"] = json!(true);
        let mut signing = ok.clone();
        signing["supports_decryption"] = json!(false);
        for (data, reason) in [
            (deletable, DenialReason::PendingDeletion),
            (signing, DenialReason::AccessDenied),
            (Value::Null, DenialReason::NotFound),
        ] {
            let err = key_state_outcome("k", &data).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason));
        }
    }

    #[test]
    fn ciphertext_versions_and_key_names() {
        assert_eq!(ciphertext_version("vault:v12:abc"), Some(12));
        assert_eq!(ciphertext_version("vault:vx:abc"), None);
        assert_eq!(ciphertext_version("v1:abc"), None);
        assert!(key_path("acme-key_1.x").is_ok());
        assert!(key_path("../sys/seal").is_err());
        assert!(key_path("").is_err());
    }
}
