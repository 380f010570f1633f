//! Microsoft Entra access tokens for Key Vault: client secret, workload
//! identity (a federated token file) or managed identity (IMDS, or App
//! Service's `IDENTITY_ENDPOINT`). Each token is cached per scope until 80 %
//! of its lifetime; secrets are read from their file or the environment at
//! every token request (so rotation needs no restart), never from the policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::kms::KmsError;

/// Microsoft Entra ID of the public cloud.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The instance metadata service's managed identity endpoint.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// A token is fetched again after this share of its lifetime.
const LIFETIME_SHARE: f64 = 0.8;
/// Longest lifetime believed from a token answer (Entra's are 1-24 h).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Where the client secret is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file holding it.
    File(PathBuf),
    /// `AZURE_CLIENT_SECRET`.
    Env,
}

/// Where a managed identity's tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityEndpoint {
    /// IMDS (VMs, AKS nodes) or another URL speaking its protocol.
    Imds(String),
    /// App Service / Functions: `IDENTITY_ENDPOINT` with the
    /// `IDENTITY_HEADER` secret, read from the environment at each request.
    AppService(String),
}

/// How the proxy gets its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureAuth {
    /// An app registration's client secret.
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The secret.
        secret: SecretSource,
    },
    /// Workload identity federation (AKS): the federated token file is the
    /// client assertion.
    WorkloadIdentity {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The projected service-account token.
        token_file: PathBuf,
    },
    /// The machine's managed identity.
    ManagedIdentity {
        /// A user-assigned identity's client id (None: system-assigned).
        client_id: Option<String>,
        /// Token endpoint.
        endpoint: IdentityEndpoint,
    },
}

/// The policy's optional fields, before the environment fills the gaps.
#[derive(Debug, Default, Clone)]
pub struct AuthFields<'a> {
    /// `auth`.
    pub auth: Option<&'a str>,
    /// `tenant_id`.
    pub tenant_id: Option<&'a str>,
    /// `client_id`.
    pub client_id: Option<&'a str>,
    /// `client_secret_file`.
    pub client_secret_file: Option<&'a Path>,
    /// `federated_token_file`.
    pub federated_token_file: Option<&'a Path>,
    /// `identity_endpoint`.
    pub identity_endpoint: Option<&'a str>,
}

/// Ids end up in URL paths: letters, digits, dashes and dots only.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl AzureAuth {
    /// Resolves the auth method from the policy's fields and `env` (the
    /// process environment in production), as Azure SDKs read it.
    pub fn resolve(
        fields: &AuthFields<'_>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AzureAuth, KmsError> {
        let config = |m: String| KmsError::Config(format!("azure-key-vault: {m}"));
        let field_or_env = |field: Option<&str>, var: &str| {
            field
                .map(str::to_owned)
                .or_else(|| env(var).filter(|v| !v.is_empty()))
        };
        let tenant_id = field_or_env(fields.tenant_id, "AZURE_TENANT_ID");
        let client_id = field_or_env(fields.client_id, "AZURE_CLIENT_ID");
        let secret = match fields.client_secret_file {
            Some(file) => Some(SecretSource::File(file.to_owned())),
            None => env("AZURE_CLIENT_SECRET")
                .filter(|v| !v.is_empty())
                .map(|_| SecretSource::Env),
        };
        let token_file = fields
            .federated_token_file
            .map(Path::to_owned)
            .or_else(|| env("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from));
        let method = match fields.auth {
            Some(m) => m,
            None if secret.is_some() => "client-secret",
            None if token_file.is_some() => "workload-identity",
            None => "managed-identity",
        };
        let ids = |what: &str| -> Result<(String, String), KmsError> {
            let tenant = tenant_id
                .clone()
                .ok_or_else(|| config(format!("{what} needs tenant_id or AZURE_TENANT_ID")))?;
            let client = client_id
                .clone()
                .ok_or_else(|| config(format!("{what} needs client_id or AZURE_CLIENT_ID")))?;
            if !valid_id(&tenant) || !valid_id(&client) {
                return Err(config(
                    "tenant_id and client_id are ids or domain names".into(),
                ));
            }
            Ok((tenant, client))
        };
        match method {
            "client-secret" => {
                let (tenant_id, client_id) = ids("client-secret")?;
                let secret = secret.ok_or_else(|| {
                    config("client-secret needs client_secret_file or AZURE_CLIENT_SECRET".into())
                })?;
                Ok(AzureAuth::ClientSecret {
                    tenant_id,
                    client_id,
                    secret,
                })
            }
            "workload-identity" => {
                let (tenant_id, client_id) = ids("workload-identity")?;
                let token_file = token_file.ok_or_else(|| {
                    config(
                        "workload-identity needs federated_token_file or \
                         AZURE_FEDERATED_TOKEN_FILE"
                            .into(),
                    )
                })?;
                Ok(AzureAuth::WorkloadIdentity {
                    tenant_id,
                    client_id,
                    token_file,
                })
            }
            "managed-identity" => {
                let endpoint = match (fields.identity_endpoint, env("IDENTITY_ENDPOINT")) {
                    (Some(url), _) => IdentityEndpoint::Imds(url.to_owned()),
                    (None, Some(url)) if env("IDENTITY_HEADER").is_some() => {
                        IdentityEndpoint::AppService(url)
                    }
                    _ => IdentityEndpoint::Imds(IMDS_ENDPOINT.to_owned()),
                };
                Ok(AzureAuth::ManagedIdentity {
                    client_id,
                    endpoint,
                })
            }
            other => Err(config(format!(
                "auth '{other}' is not client-secret, workload-identity or managed-identity"
            ))),
        }
    }
}

/// One cached token.
struct Cached {
    token: Zeroizing<String>,
    renew_at: Instant,
}

/// The tokens of each scope, and the last failed request of each.
#[derive(Default)]
struct Tokens {
    cached: HashMap<String, Cached>,
    /// When a token request last failed, and why: callers that were
    /// waiting for it share its failure instead of each waiting a deadline.
    failed: HashMap<String, (Instant, String)>,
}

/// Gets and caches tokens for one provider.
pub struct Credential {
    http: reqwest::Client,
    auth: AzureAuth,
    authority: String,
    tokens: Mutex<Tokens>,
}

fn read_secret(what: &str, path: &Path) -> Result<Zeroizing<String>, KmsError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        KmsError::Config(format!("azure-key-vault {what} {}: {e}", path.display()))
    })?);
    let trimmed = Zeroizing::new(text.trim().to_owned());
    if trimmed.is_empty() {
        return Err(KmsError::Config(format!(
            "azure-key-vault {what} {} is empty",
            path.display()
        )));
    }
    Ok(trimmed)
}

fn env_secret(var: &str) -> Result<Zeroizing<String>, KmsError> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Zeroizing::new)
        .ok_or_else(|| KmsError::Config(format!("azure-key-vault: {var} is not set")))
}

/// A number that token endpoints send as a JSON number or a string.
fn seconds(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// How long a token answer's token lives: `expires_in`, else `expires_on`
/// (App Service) minus now.
fn lifetime(answer: &Value) -> Duration {
    if let Some(secs) = seconds(&answer["expires_in"]) {
        return Duration::from_secs(secs);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    seconds(&answer["expires_on"])
        .map(|on| Duration::from_secs(on.saturating_sub(now)))
        .unwrap_or_default()
}

impl Credential {
    /// A credential using `http` (the provider's client, with its deadline
    /// and CA) against `authority` (for client secret and workload identity).
    pub fn new(http: reqwest::Client, auth: AzureAuth, authority: String) -> Credential {
        Credential {
            http,
            auth,
            authority: authority.trim_end_matches('/').to_owned(),
            tokens: Mutex::new(Tokens::default()),
        }
    }

    /// A token for `scope`, from the cache or fetched. One request at a
    /// time per provider; a caller that waited while a request failed gets
    /// that failure at once, so a silent endpoint costs one deadline, not
    /// one per waiting caller.
    pub async fn token(&self, scope: &str, key_ref: &str) -> Result<Zeroizing<String>, KmsError> {
        let asked_at = Instant::now();
        let mut tokens = self.tokens.lock().await;
        if let Some(cached) = tokens.cached.get(scope) {
            if Instant::now() < cached.renew_at {
                return Ok(cached.token.clone());
            }
        }
        if let Some((at, detail)) = tokens.failed.get(scope) {
            if *at >= asked_at {
                return Err(KmsError::Transient {
                    key_ref: key_ref.to_owned(),
                    detail: detail.clone(),
                });
            }
        }
        match self.fetch(scope, key_ref).await {
            Ok((token, lifetime)) => {
                let now = Instant::now();
                let renew_at = now
                    .checked_add(lifetime.min(MAX_LIFETIME).mul_f64(LIFETIME_SHARE))
                    .unwrap_or(now);
                tokens.failed.remove(scope);
                tokens.cached.insert(
                    scope.to_owned(),
                    Cached {
                        token: token.clone(),
                        renew_at,
                    },
                );
                Ok(token)
            }
            Err(e) => {
                if let KmsError::Transient { detail, .. } = &e {
                    tokens
                        .failed
                        .insert(scope.to_owned(), (Instant::now(), detail.clone()));
                }
                Err(e)
            }
        }
    }

    /// Drops the cached token of `scope` if it is still `refused` (Key
    /// Vault answered 401 with it; a token fetched meanwhile is kept).
    pub async fn forget(&self, scope: &str, refused: &str) {
        let mut tokens = self.tokens.lock().await;
        if tokens
            .cached
            .get(scope)
            .is_some_and(|c| c.token.as_str() == refused)
        {
            tokens.cached.remove(scope);
        }
    }

    async fn fetch(
        &self,
        scope: &str,
        key_ref: &str,
    ) -> Result<(Zeroizing<String>, Duration), KmsError> {
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let request = match &self.auth {
            AzureAuth::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let secret = match secret {
                    SecretSource::File(path) => read_secret("client_secret_file", path)?,
                    SecretSource::Env => env_secret("AZURE_CLIENT_SECRET")?,
                };
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.as_str()),
                    ("scope", scope),
                ];
                self.http
                    .post(format!("{}/{tenant_id}/oauth2/v2.0/token", self.authority))
                    .form(&form)
            }
            AzureAuth::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => {
                let assertion = read_secret("federated_token_file", token_file)?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                    ("client_assertion", assertion.as_str()),
                    ("scope", scope),
                ];
                self.http
                    .post(format!("{}/{tenant_id}/oauth2/v2.0/token", self.authority))
                    .form(&form)
            }
            AzureAuth::ManagedIdentity {
                client_id,
                endpoint,
            } => {
                let (url, api_version, header) = match endpoint {
                    IdentityEndpoint::Imds(url) => (
                        url,
                        "2018-02-01",
                        ("Metadata", Zeroizing::new("true".into())),
                    ),
                    IdentityEndpoint::AppService(url) => (
                        url,
                        "2019-08-01",
                        ("X-IDENTITY-HEADER", env_secret("IDENTITY_HEADER")?),
                    ),
                };
                let mut query = vec![("api-version", api_version), ("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                self.http
                    .get(url)
                    .query(&query)
                    .header(header.0, header.1.as_str())
            }
        };
        let failed = |detail: String| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("azure token: {detail}"),
        };
        let resp = request.send().await.map_err(|e| failed(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = crate::kms::http::read_answer(resp).await.map_err(failed)?;
        let mut answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let token = match answer["access_token"].take() {
            Value::String(t) if status == 200 && !t.is_empty() => Zeroizing::new(t),
            _ => {
                // The proxy's own credentials, not the tenant's decision.
                let error = answer["error"].as_str().unwrap_or("");
                let description = answer["error_description"]
                    .as_str()
                    .and_then(|d| d.lines().next())
                    .unwrap_or("");
                return Err(failed(format!("HTTP {status}: {error} {description}")));
            }
        };
        Ok((token, lifetime(&answer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn environment_picks_the_method_as_azure_sdks_do() {
        let none = AuthFields::default();
        let secret = env_of(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
        ]);
        assert_eq!(
            AzureAuth::resolve(&none, &secret).unwrap(),
            AzureAuth::ClientSecret {
                tenant_id: "t".into(),
                client_id: "c".into(),
                secret: SecretSource::Env
            }
        );
        let federated = env_of(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
        ]);
        assert_eq!(
            AzureAuth::resolve(&none, &federated).unwrap(),
            AzureAuth::WorkloadIdentity {
                tenant_id: "t".into(),
                client_id: "c".into(),
                token_file: "/f".into()
            }
        );
        assert_eq!(
            AzureAuth::resolve(&none, &env_of(&[])).unwrap(),
            AzureAuth::ManagedIdentity {
                client_id: None,
                endpoint: IdentityEndpoint::Imds(IMDS_ENDPOINT.into())
            }
        );
        let app_service = env_of(&[
            ("IDENTITY_ENDPOINT", "http://localhost:4141/msi/token"),
            ("IDENTITY_HEADER", "h"),
        ]);
        assert_eq!(
            AzureAuth::resolve(&none, &app_service).unwrap(),
            AzureAuth::ManagedIdentity {
                client_id: None,
                endpoint: IdentityEndpoint::AppService("http://localhost:4141/msi/token".into())
            }
        );
    }

    #[test]
    fn policy_fields_win_and_missing_or_bad_ids_are_config_errors() {
        let fields = AuthFields {
            auth: Some("client-secret"),
            tenant_id: Some("contoso.onmicrosoft.com"),
            client_id: Some("c"),
            client_secret_file: Some(Path::new("/run/secret")),
            ..AuthFields::default()
        };
        let env = env_of(&[("AZURE_TENANT_ID", "other"), ("AZURE_CLIENT_SECRET", "s")]);
        assert_eq!(
            AzureAuth::resolve(&fields, &env).unwrap(),
            AzureAuth::ClientSecret {
                tenant_id: "contoso.onmicrosoft.com".into(),
                client_id: "c".into(),
                secret: SecretSource::File("/run/secret".into())
            }
        );
        for bad in [
            AuthFields {
                auth: Some("client-secret"),
                ..AuthFields::default()
            },
            AuthFields {
                auth: Some("workload-identity"),
                tenant_id: Some("t"),
                client_id: Some("c"),
                ..AuthFields::default()
            },
            AuthFields {
                auth: Some("password"),
                ..AuthFields::default()
            },
            AuthFields {
                tenant_id: Some("../evil"),
                client_id: Some("c"),
                client_secret_file: Some(Path::new("/s")),
                ..AuthFields::default()
            },
        ] {
            assert!(
                matches!(
                    AzureAuth::resolve(&bad, &env_of(&[])),
                    Err(KmsError::Config(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lifetimes_come_from_expires_in_or_expires_on() {
        assert_eq!(
            lifetime(&serde_json::json!({"expires_in": 3599})),
            Duration::from_secs(3599)
        );
        assert_eq!(
            lifetime(&serde_json::json!({"expires_in": "86399"})),
            Duration::from_secs(86399)
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let on = lifetime(&serde_json::json!({"expires_on": (now + 600).to_string()}));
        assert!(on <= Duration::from_secs(600) && on >= Duration::from_secs(590));
        assert_eq!(lifetime(&serde_json::json!({})), Duration::ZERO);
    }
}
