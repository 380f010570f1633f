//! A local HTTPS server answering the documented Cloud KMS REST v1 requests
//! with the documented responses (fixtures in `tests/it/fixtures/gcp-kms/`,
//! whose README links the reference pages): CryptoKey and CryptoKeyVersion
//! reads, `encrypt`/`decrypt` with `additionalAuthenticatedData`, the OAuth
//! token endpoint of a service-account key file (checking the JWT
//! assertion's RS256 signature with the account's public key), a plain-HTTP
//! metadata server, and the errors a tenant or an operator can cause
//! (disabled, scheduled or destroyed versions, 401, 403, 404, 429, 503, no
//! answer at all). Recorded API behaviour, not the live cloud.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::https_fake::{reply, start_plain, HttpsFake, Reply, Served};

/// The service account the fake knows.
pub const EMAIL: &str = "cmk-proxy@vendor-project.iam.gserviceaccount.com";
/// Project, location and key ring of the fake's keys.
pub const RING: &str = "projects/tenant-project/locations/europe-west1/keyRings/cmk";

fn fixture(name: &str) -> Value {
    super::https_fake::fixture("gcp-kms", name)
}

/// What every API answer is instead of the normal one (the token endpoint
/// and the metadata server keep answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 401 UNAUTHENTICATED to every token.
    Unauthenticated,
    /// 403 PERMISSION_DENIED (the tenant removed the vendor's IAM grant).
    Forbidden,
    /// 429 RESOURCE_EXHAUSTED (quota).
    Throttled,
    /// 503 UNAVAILABLE.
    Unavailable,
    /// Accepts the request and never answers.
    Silent,
}

struct Key {
    purpose: &'static str,
    primary: u64,
    /// State of version `i + 1`.
    versions: Vec<&'static str>,
}

struct Sealed {
    key: String,
    version: u64,
    aad: String,
    plaintext: String,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    sealed: HashMap<String, Sealed>,
    tokens: Vec<String>,
    fault: Option<Fault>,
    token_fetches: usize,
    metadata_fetches: usize,
    api_calls: usize,
    /// PKCS#1 DER of the service account's public key.
    public_key: Vec<u8>,
    token_uri: String,
}

/// A running fake Cloud KMS (stops with the test's runtime).
pub struct FakeGcp {
    state: Arc<Mutex<State>>,
    server: HttpsFake,
    metadata_host: String,
}

/// A fresh RSA key: `(PKCS#8 PEM, PKCS#1 DER of the public key)`.
fn rsa_key() -> (String, Vec<u8>) {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let body = B64.encode(der.as_ref());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    );
    (pem, pair.public_key().as_ref().to_vec())
}

impl FakeGcp {
    /// Starts the API and token endpoint (HTTPS, fresh CA) and a metadata
    /// server (HTTP), and writes a service-account key file for `EMAIL`.
    pub async fn start() -> FakeGcp {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let server = HttpsFake::start(move |req| {
            let state = shared.clone();
            async move { answer(&state, req).await }
        })
        .await;
        let shared = state.clone();
        let metadata_host = start_plain(move |req| {
            let state = shared.clone();
            async move { metadata(&state, &req) }
        })
        .await;
        let (pem, public_key) = rsa_key();
        let token_uri = format!("{}/token", server.address());
        {
            let mut s = state.lock().unwrap();
            s.public_key = public_key;
            s.token_uri = token_uri.clone();
        }
        let fake = FakeGcp {
            state,
            server,
            metadata_host,
        };
        fake.write_key_file(&fake.credentials_file(), &pem);
        fake
    }

    fn write_key_file(&self, path: &std::path::Path, pem: &str) {
        let mut file = fixture("service_account.json");
        file["private_key"] = json!(pem);
        file["client_email"] = json!(EMAIL);
        file["token_uri"] = json!(format!("{}/token", self.server.address()));
        std::fs::write(path, file.to_string()).unwrap();
    }

    /// `https://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        self.server.address()
    }

    /// The CA certificate of the server's TLS certificate.
    pub fn ca(&self) -> PathBuf {
        self.server.ca()
    }

    /// The service-account key file the token endpoint accepts.
    pub fn credentials_file(&self) -> PathBuf {
        self.server.dir().join("service-account.json")
    }

    /// A key file for the same account signed by another key (a deleted
    /// service-account key): the token endpoint refuses its assertions.
    pub fn foreign_credentials_file(&self) -> PathBuf {
        let path = self.server.dir().join("foreign-service-account.json");
        self.write_key_file(&path, &rsa_key().0);
        path
    }

    /// `127.0.0.1:PORT` of the metadata server (what `GCE_METADATA_HOST` holds).
    pub fn metadata_host(&self) -> &str {
        &self.metadata_host
    }

    /// A `keys.providers` entry for this server with the key file.
    pub fn provider_yaml(&self) -> String {
        format!(
            "{{kind: gcp-kms, endpoint: \"{}\", ca: \"{}\", credentials_file: \"{}\"}}",
            self.endpoint(),
            self.ca().display(),
            self.credentials_file().display()
        )
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// The full name of key `id` in the fake's key ring.
    pub fn key_name(id: &str) -> String {
        format!("{RING}/cryptoKeys/{id}")
    }

    /// `cryptoKeys.create` of a symmetric ENCRYPT_DECRYPT key (version 1
    /// ENABLED and primary); returns its name.
    pub fn create_key(&self, id: &str) -> String {
        self.insert(id, "ENCRYPT_DECRYPT")
    }

    /// An ASYMMETRIC_SIGN key (not usable for encryption).
    pub fn create_signing_key(&self, id: &str) -> String {
        self.insert(id, "ASYMMETRIC_SIGN")
    }

    fn insert(&self, id: &str, purpose: &'static str) -> String {
        let name = Self::key_name(id);
        self.with(|s| {
            s.keys.insert(
                name.clone(),
                Key {
                    purpose,
                    primary: 1,
                    versions: vec!["ENABLED"],
                },
            )
        });
        name
    }

    /// `cryptoKeyVersions.create` + `updatePrimaryVersion`: a new primary.
    pub fn rotate(&self, name: &str) -> u64 {
        self.with(|s| {
            let key = s.keys.get_mut(name).unwrap();
            key.versions.push("ENABLED");
            key.primary = key.versions.len() as u64;
            key.primary
        })
    }

    /// `cryptoKeyVersions.patch` (ENABLED/DISABLED), `.destroy`
    /// (DESTROY_SCHEDULED) or the end of the scheduled period (DESTROYED).
    pub fn set_version_state(&self, name: &str, version: u64, state: &'static str) {
        self.with(|s| s.keys.get_mut(name).unwrap().versions[version as usize - 1] = state);
    }

    /// Makes every API answer the given fault (None: normal service).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.with(|s| s.fault = fault);
    }

    /// Invalidates every access token issued so far.
    pub fn revoke_tokens(&self) {
        self.with(|s| s.tokens.clear());
    }

    /// Tokens issued by the token endpoint so far.
    pub fn token_fetches(&self) -> usize {
        self.with(|s| s.token_fetches)
    }

    /// Tokens issued by the metadata server so far.
    pub fn metadata_fetches(&self) -> usize {
        self.with(|s| s.metadata_fetches)
    }

    /// API requests received so far (faulted ones included).
    pub fn api_calls(&self) -> usize {
        self.with(|s| s.api_calls)
    }
}

fn error(status: u16, code: &str, message: String) -> Reply {
    let mut body = fixture(&format!("error_{status}.json"));
    body["error"]["status"] = json!(code);
    body["error"]["message"] = json!(message);
    reply(status, body)
}

fn issue_token(s: &mut State, fixture_name: &str) -> Reply {
    let token = format!(
        "ya29.fake-{}",
        s.tokens.len() + s.token_fetches + s.metadata_fetches
    );
    s.tokens.push(token.clone());
    let mut body = fixture(fixture_name);
    body["access_token"] = json!(token);
    reply(200, body)
}

/// The metadata server's token endpoint (needs `Metadata-Flavor: Google`).
fn metadata(state: &Mutex<State>, req: &Served) -> Reply {
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    if req.path != path {
        return reply(404, json!({}));
    }
    if req.header("metadata-flavor") != Some("Google") {
        return reply(403, json!({}));
    }
    let mut s = state.lock().unwrap();
    s.metadata_fetches += 1;
    issue_token(&mut s, "metadata_token.json")
}

/// `POST /token`: a JWT-bearer grant whose assertion must be signed by the
/// account's key, for this audience, with the Cloud KMS scope.
fn token_exchange(state: &Mutex<State>, req: &Served) -> Reply {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let mut s = state.lock().unwrap();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return reply(400, fixture("error_unsupported_grant.json"));
    }
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[s.token_uri.as_str()]);
    validation.set_issuer(&[EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let key = jsonwebtoken::DecodingKey::from_rsa_der(&s.public_key);
    let claims = form
        .get("assertion")
        .and_then(|a| jsonwebtoken::decode::<Value>(a, &key, &validation).ok());
    match claims {
        Some(c) if c.claims["scope"] == "https://www.googleapis.com/auth/cloudkms" => {
            s.token_fetches += 1;
            issue_token(&mut s, "token.json")
        }
        _ => reply(400, fixture("error_invalid_grant.json")),
    }
}

async fn answer(state: &Mutex<State>, req: Served) -> Reply {
    if req.method == "POST" && req.path == "/token" {
        return token_exchange(state, &req);
    }
    let fault = {
        let mut s = state.lock().unwrap();
        s.api_calls += 1;
        s.fault
    };
    match fault {
        Some(Fault::Unauthenticated) => return reply(401, fixture("error_401.json")),
        Some(Fault::Forbidden) => return reply(403, fixture("error_403.json")),
        Some(Fault::Throttled) => return reply(429, fixture("error_429.json")),
        Some(Fault::Unavailable) => return reply(503, fixture("error_503.json")),
        Some(Fault::Silent) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return reply(503, fixture("error_503.json"));
        }
        None => {}
    }
    let mut s = state.lock().unwrap();
    let bearer = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| s.tokens.iter().any(|known| known == t)) {
        return reply(401, fixture("error_401.json"));
    }
    let Some(resource) = req.path.strip_prefix("/v1/") else {
        return error(404, "NOT_FOUND", format!("{} not found", req.path));
    };
    let (name, verb) = match resource.rsplit_once(':') {
        Some((name, verb)) if !verb.contains('/') => (name.to_owned(), Some(verb)),
        _ => (resource.to_owned(), None),
    };
    match (req.method.as_str(), verb) {
        ("GET", None) => read(&s, &name),
        ("POST", Some("encrypt")) => encrypt(&mut s, &name, &req.json()),
        ("POST", Some("decrypt")) => decrypt(&s, &name, &req.json()),
        _ => error(404, "NOT_FOUND", format!("{resource} not found")),
    }
}

fn version_json(key: &str, version: u64, state: &str) -> Value {
    let mut v = fixture("crypto_key_version.json");
    v["name"] = json!(format!("{key}/cryptoKeyVersions/{version}"));
    v["state"] = json!(state);
    v
}

fn not_found(what: &str, name: &str) -> Reply {
    error(404, "NOT_FOUND", format!("{what} {name} not found."))
}

fn not_enabled(key: &str, version: u64, state: &str) -> Reply {
    error(
        400,
        "FAILED_PRECONDITION",
        format!("{key}/cryptoKeyVersions/{version} is not enabled, current state is: {state}."),
    )
}

/// `cryptoKeys.get` or `cryptoKeyVersions.get`.
fn read(s: &State, name: &str) -> Reply {
    if let Some((key_name, version)) = name.split_once("/cryptoKeyVersions/") {
        let state = s.keys.get(key_name).and_then(|k| {
            let i: usize = version.parse().ok()?;
            k.versions.get(i.checked_sub(1)?)
        });
        return match state {
            Some(state) => reply(200, version_json(key_name, version.parse().unwrap(), state)),
            None => not_found("CryptoKeyVersion", name),
        };
    }
    let Some(key) = s.keys.get(name) else {
        return not_found("CryptoKey", name);
    };
    let mut out = fixture("crypto_key.json");
    out["name"] = json!(name);
    out["purpose"] = json!(key.purpose);
    out["primary"] = version_json(name, key.primary, key.versions[key.primary as usize - 1]);
    reply(200, out)
}

fn encrypt(s: &mut State, name: &str, body: &Value) -> Reply {
    let Some(key) = s.keys.get(name) else {
        return not_found("CryptoKey", name);
    };
    if key.purpose != "ENCRYPT_DECRYPT" {
        return error(
            400,
            "FAILED_PRECONDITION",
            format!("{name} has purpose {}, not ENCRYPT_DECRYPT.", key.purpose),
        );
    }
    let version = key.primary;
    let state = key.versions[version as usize - 1];
    if state != "ENABLED" {
        return not_enabled(name, version, state);
    }
    let ciphertext = B64.encode(uuid::Uuid::new_v4().as_bytes());
    s.sealed.insert(
        ciphertext.clone(),
        Sealed {
            key: name.to_owned(),
            version,
            aad: body["additionalAuthenticatedData"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            plaintext: body["plaintext"].as_str().unwrap_or("").to_owned(),
        },
    );
    let mut out = fixture("encrypt.json");
    out["name"] = json!(format!("{name}/cryptoKeyVersions/{version}"));
    out["ciphertext"] = json!(ciphertext);
    reply(200, out)
}

fn decrypt(s: &State, name: &str, body: &Value) -> Reply {
    let Some(key) = s.keys.get(name) else {
        return not_found("CryptoKey", name);
    };
    let ciphertext = body["ciphertext"].as_str().unwrap_or("");
    let aad = body["additionalAuthenticatedData"].as_str().unwrap_or("");
    match s.sealed.get(ciphertext) {
        Some(sealed) if sealed.key == name => {
            let state = key.versions[sealed.version as usize - 1];
            if state != "ENABLED" {
                return not_enabled(name, sealed.version, state);
            }
            if sealed.aad != aad {
                return reply(400, fixture("error_decrypt_failed.json"));
            }
            let mut out = fixture("decrypt.json");
            out["plaintext"] = json!(sealed.plaintext);
            out["usedPrimary"] = json!(sealed.version == key.primary);
            reply(200, out)
        }
        _ => reply(400, fixture("error_decrypt_failed.json")),
    }
}
