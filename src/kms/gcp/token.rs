//! OAuth 2.0 access tokens for Cloud KMS, from a service-account key file
//! (a signed RS256 JWT assertion exchanged at the file's `token_uri`,
//! <https://developers.google.com/identity/protocols/oauth2/service-account#httprest>)
//! or from the metadata server of the VM or GKE workload
//! (<https://cloud.google.com/compute/docs/access/authenticate-workloads>).
//! A token is kept until 80 % of its lifetime, or until the API says 401.
//! Knows nothing of keys; the provider maps its errors.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::kms::KmsError;

/// The OAuth scope of Cloud KMS.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";
/// Host of the metadata server when `GCE_METADATA_HOST` is not set.
pub const METADATA_HOST: &str = "metadata.google.internal";
/// A token is fetched again after this share of its `expires_in`.
const LIFETIME_SHARE: f64 = 0.8;
/// Longest `expires_in` believed (Google's access tokens live one hour).
const MAX_LIFETIME_SECS: u64 = 24 * 3600;
/// Lifetime asked for in the JWT assertion (Google's maximum).
const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// Where the proxy's access tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcpCredentials {
    /// A service-account JSON key file (`"type": "service_account"`).
    ServiceAccountFile(PathBuf),
    /// The metadata server at `host` (`host[:port]`, plain HTTP as Google
    /// serves it on the link-local address).
    MetadataServer {
        /// `metadata.google.internal` unless `GCE_METADATA_HOST` says otherwise.
        host: String,
    },
}

impl GcpCredentials {
    /// The usual order of Google's client libraries: the policy's
    /// `credentials_file`, else `GOOGLE_APPLICATION_CREDENTIALS`, else the
    /// metadata server (`GCE_METADATA_HOST` overriding its host).
    pub fn resolve(
        credentials_file: Option<&Path>,
        application_credentials: Option<OsString>,
        metadata_host: Option<String>,
    ) -> GcpCredentials {
        if let Some(file) = credentials_file {
            return GcpCredentials::ServiceAccountFile(file.to_owned());
        }
        match application_credentials.filter(|v| !v.is_empty()) {
            Some(file) => GcpCredentials::ServiceAccountFile(PathBuf::from(file)),
            None => GcpCredentials::MetadataServer {
                host: metadata_host
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| METADATA_HOST.to_owned()),
            },
        }
    }
}

/// The fields of a service-account key file the token exchange needs.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct ServiceAccountKey {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    token_uri: String,
}

/// Claims of the JWT assertion (RFC 7523, Google's service-account flow).
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// A token endpoint's or the metadata server's answer.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

struct CachedToken {
    token: Zeroizing<String>,
    renew_at: Instant,
}

/// Fetches and caches the proxy's access token.
pub struct TokenSource {
    credentials: GcpCredentials,
    cached: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source with nothing cached yet.
    pub fn new(credentials: GcpCredentials) -> TokenSource {
        TokenSource {
            credentials,
            cached: Mutex::new(None),
        }
    }

    /// The cached token, or a fresh one when there is none or it is due.
    /// Fetching failures are `Transient` (the proxy's own credentials, not
    /// the tenant's decision); an unreadable key file is `Config`.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        key_ref: &str,
    ) -> Result<Zeroizing<String>, KmsError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let answer = match &self.credentials {
            GcpCredentials::ServiceAccountFile(path) => exchange(http, path, key_ref).await?,
            GcpCredentials::MetadataServer { host } => metadata(http, host, key_ref).await?,
        };
        let believed = answer.expires_in.min(MAX_LIFETIME_SECS);
        let lifetime = Duration::from_secs_f64(believed as f64 * LIFETIME_SHARE);
        let token = Zeroizing::new(answer.access_token.clone());
        *cached = Some(CachedToken {
            token: token.clone(),
            renew_at: Instant::now() + lifetime,
        });
        Ok(token)
    }

    /// Drops the cached token if it is still `refused` (the API answered
    /// 401 with it; a token fetched meanwhile by another call is kept).
    pub async fn forget(&self, refused: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token.as_str() == refused) {
            *cached = None;
        }
    }
}

fn transient(key_ref: &str, detail: String) -> KmsError {
    KmsError::Transient {
        key_ref: key_ref.to_owned(),
        detail: format!("gcp token: {detail}"),
    }
}

fn read_key_file(path: &Path) -> Result<ServiceAccountKey, KmsError> {
    let bad = |detail: String| {
        KmsError::Config(format!("gcp credentials file {}: {detail}", path.display()))
    };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    // serde_json's message names a line and column, never the file's text.
    let key: ServiceAccountKey = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if key.kind != "service_account" {
        return Err(bad(format!("type is '{}', not service_account", key.kind)));
    }
    if !key.token_uri.starts_with("https://") {
        return Err(bad("token_uri is not an https:// URL".to_owned()));
    }
    Ok(key)
}

/// Signs an assertion with the file's key and exchanges it for a token.
async fn exchange(
    http: &reqwest::Client,
    path: &Path,
    key_ref: &str,
) -> Result<TokenAnswer, KmsError> {
    let key = read_key_file(path)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| KmsError::Config("system clock before 1970".to_owned()))?
        .as_secs();
    let claims = Claims {
        iss: &key.client_email,
        scope: SCOPE,
        aud: &key.token_uri,
        iat: now,
        exp: now + ASSERTION_LIFETIME_SECS,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = (!key.private_key_id.is_empty()).then(|| key.private_key_id.clone());
    let signing_key = EncodingKey::from_rsa_pem(key.private_key.as_bytes()).map_err(|e| {
        KmsError::Config(format!(
            "gcp credentials file {}: private_key: {e}",
            path.display()
        ))
    })?;
    let assertion = Zeroizing::new(
        jsonwebtoken::encode(&header, &claims, &signing_key)
            .map_err(|e| KmsError::Config(format!("gcp JWT assertion: {e}")))?,
    );
    let req = http.post(&key.token_uri).form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", assertion.as_str()),
    ]);
    read_answer(req, key_ref, "token exchange").await
}

/// Asks the metadata server for the default service account's token.
async fn metadata(
    http: &reqwest::Client,
    host: &str,
    key_ref: &str,
) -> Result<TokenAnswer, KmsError> {
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    let req = http.get(url).header("Metadata-Flavor", "Google");
    read_answer(req, key_ref, "metadata server").await
}

async fn read_answer(
    req: reqwest::RequestBuilder,
    key_ref: &str,
    what: &str,
) -> Result<TokenAnswer, KmsError> {
    let resp = req
        .send()
        .await
        .map_err(|e| transient(key_ref, format!("{what}: {e}")))?;
    let status = resp.status().as_u16();
    let body = crate::kms::http::read_answer(resp)
        .await
        .map_err(|e| transient(key_ref, format!("{what}: {e}")))?;
    if status != 200 {
        // OAuth errors: {"error": "invalid_grant", "error_description": …}.
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let error = &value["error"];
        let detail = error
            .as_str()
            .map(str::to_owned)
            .or_else(|| error["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let description = value["error_description"].as_str().unwrap_or_default();
        return Err(transient(
            key_ref,
            format!("{what}: HTTP {status}: {detail} {description}")
                .trim_end()
                .to_owned(),
        ));
    }
    let answer: TokenAnswer = serde_json::from_slice(&body)
        .map_err(|e| transient(key_ref, format!("{what}: unexpected answer: {e}")))?;
    if answer.access_token.is_empty() || answer.expires_in == 0 {
        return Err(transient(
            key_ref,
            format!("{what}: answer without a usable token"),
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_file_then_the_environment_then_the_metadata_server() {
        let file = Path::new("/etc/sa.json");
        assert_eq!(
            GcpCredentials::resolve(Some(file), Some("/other.json".into()), None),
            GcpCredentials::ServiceAccountFile(file.to_owned())
        );
        assert_eq!(
            GcpCredentials::resolve(None, Some("/other.json".into()), Some("x:1".into())),
            GcpCredentials::ServiceAccountFile("/other.json".into())
        );
        assert_eq!(
            GcpCredentials::resolve(None, Some("".into()), Some("127.0.0.1:8080".into())),
            GcpCredentials::MetadataServer {
                host: "127.0.0.1:8080".to_owned()
            }
        );
        assert_eq!(
            GcpCredentials::resolve(None, None, None),
            GcpCredentials::MetadataServer {
                host: METADATA_HOST.to_owned()
            }
        );
    }

    #[test]
    fn key_files_of_another_type_or_a_plain_http_token_uri_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, kind: &str, uri: &str| {
            let path = dir.path().join(name);
            let json = serde_json::json!({"type": kind, "client_email": "a@b",
                "private_key": "x", "token_uri": uri});
            std::fs::write(&path, json.to_string()).unwrap();
            path
        };
        for path in [
            write(
                "user.json",
                "authorized_user",
                "https://oauth2.googleapis.com/token",
            ),
            write(
                "http.json",
                "service_account",
                "http://oauth2.googleapis.com/token",
            ),
            dir.path().join("missing.json"),
        ] {
            assert!(matches!(read_key_file(&path), Err(KmsError::Config(_))));
        }
        let ok = write(
            "ok.json",
            "service_account",
            "https://oauth2.googleapis.com/token",
        );
        assert!(read_key_file(&ok).is_ok());
    }
}
