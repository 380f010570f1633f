//! A local HTTPS server answering the documented Azure Key Vault (REST API
//! 7.4) and Microsoft Entra token requests with the documented responses
//! (fixtures in `tests/it/fixtures/azure-key-vault/`, whose README links the
//! reference pages): key read, `wrapkey`/`unwrapkey` that really wrap
//! (RSA-OAEP-256 with an `rsa` key, AES key wrap for `oct-HSM` keys), the
//! client-credentials, workload-identity and IMDS token endpoints checking
//! the credentials, and the answers a tenant or Azure can cause (disabled,
//! expired or not-yet-valid key, rotation, deletion, 401, 403, 429, 503,
//! no answer). Recorded API behaviour, not the live cloud.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

use super::https_fake::{reply, reply_with, HttpsFake, Reply, Served as Request};

/// The directory (tenant) id the token endpoint serves.
pub const TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The app registration's client id.
pub const CLIENT_ID: &str = "0e4c4d2a-1f6b-4a0e-9a59-cmkproxy0001";
/// Its client secret.
pub const CLIENT_SECRET: &str = "cmk~proxy.test-secret";
/// The federated (workload identity) token the endpoint accepts.
pub const FEDERATED_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.workload.identity";
/// Scope of the tokens Key Vault accepts.
pub const SCOPE: &str = "https://vault.azure.net/.default";

fn fixture(name: &str) -> Value {
    super::https_fake::fixture("azure-key-vault", name)
}

/// A key's type at the fake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// A vault's RSA key (2048 bits here, for speed).
    Rsa,
    /// A Managed HSM AES-256 key.
    OctHsm,
}

/// What the whole vault answers instead of serving (the token endpoint
/// keeps working).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 401 to every request: tokens are never accepted.
    Unauthorized,
    /// 403 ForbiddenByRbac (the tenant removed the vendor's role).
    Forbidden,
    /// 429 Throttled with `Retry-After`.
    Throttled,
    /// 503 ServiceUnavailable.
    Unavailable,
    /// Accepts the request and never answers.
    Silent,
}

enum Material {
    Rsa(Box<rsa::RsaPrivateKey>),
    Aes([u8; 32]),
}

struct Version {
    id: String,
    enabled: bool,
    exp: Option<i64>,
    nbf: Option<i64>,
    material: Material,
}

struct Key {
    kty: KeyType,
    key_ops: Vec<String>,
    /// Oldest first; the last is the current version.
    versions: Vec<Version>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    tokens: Vec<String>,
    fault: Option<Fault>,
    token_requests: usize,
    vault_requests: usize,
    calls: HashMap<&'static str, usize>,
}

/// A running fake Azure (stops with the test's runtime).
pub struct FakeAzure {
    server: HttpsFake,
    state: Arc<Mutex<State>>,
}

fn new_version(kty: KeyType) -> Version {
    let material = match kty {
        KeyType::Rsa => Material::Rsa(Box::new(
            rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("rsa key"),
        )),
        KeyType::OctHsm => Material::Aes(rand::random()),
    };
    Version {
        id: uuid::Uuid::new_v4().simple().to_string(),
        enabled: true,
        exp: None,
        nbf: None,
        material,
    }
}

impl FakeAzure {
    /// Starts the server with a fresh CA and the credential files.
    pub async fn start() -> FakeAzure {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let address = Arc::new(Mutex::new(String::new()));
        let base = address.clone();
        let server = HttpsFake::start(move |req| {
            let state = shared.clone();
            let base = base.lock().unwrap().clone();
            async move { answer(&state, &base, req).await }
        })
        .await;
        *address.lock().unwrap() = server.address().to_owned();
        std::fs::write(
            server.dir().join("client-secret"),
            format!("{CLIENT_SECRET}\n"),
        )
        .unwrap();
        std::fs::write(server.dir().join("federated-token"), FEDERATED_TOKEN).unwrap();
        FakeAzure { server, state }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        self.server.address()
    }

    /// `127.0.0.1:PORT`, for `allowed_hosts`.
    pub fn authority(&self) -> &str {
        self.server.authority()
    }

    /// The CA certificate of the server's TLS certificate.
    pub fn ca(&self) -> PathBuf {
        self.server.ca()
    }

    /// A file holding the client secret.
    pub fn secret_file(&self) -> PathBuf {
        self.server.dir().join("client-secret")
    }

    /// A file holding the federated token.
    pub fn federated_token_file(&self) -> PathBuf {
        self.server.dir().join("federated-token")
    }

    /// The IMDS-style managed identity endpoint of this server.
    pub fn identity_endpoint(&self) -> String {
        format!("{}/metadata/identity/oauth2/token", self.address())
    }

    /// The key ref of key `name` (no version pinned).
    pub fn key_ref(&self, name: &str) -> String {
        format!("{}/keys/{name}", self.address())
    }

    /// A `keys.providers` entry for this server with client-secret auth.
    pub fn provider_yaml(&self) -> String {
        format!(
            "{{kind: azure-key-vault, tenant_id: \"{TENANT_ID}\", client_id: \"{CLIENT_ID}\", \
             client_secret_file: \"{}\", authority_host: \"{}\", \
             allowed_hosts: [\"{}\"], ca: \"{}\"}}",
            self.secret_file().display(),
            self.address(),
            self.authority(),
            self.ca().display()
        )
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn with_key<T>(&self, name: &str, f: impl FnOnce(&mut Key) -> T) -> T {
        self.with(|s| f(s.keys.get_mut(name).expect("key exists")))
    }

    /// `PUT /keys/{name}/create` (RSA: `key_ops` as the portal's default).
    pub fn create_key(&self, name: &str, kty: KeyType) -> String {
        let version = new_version(kty);
        self.with(|s| {
            s.keys.insert(
                name.to_owned(),
                Key {
                    kty,
                    key_ops: ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
                        .map(str::to_owned)
                        .to_vec(),
                    versions: vec![version],
                },
            )
        });
        self.key_ref(name)
    }

    /// `POST /keys/{name}/rotate`: a new current version; returns its id.
    pub fn rotate(&self, name: &str) -> String {
        let kty = self.with_key(name, |k| k.kty);
        let version = new_version(kty);
        let id = version.id.clone();
        self.with_key(name, |k| k.versions.push(version));
        id
    }

    /// The current version's id.
    pub fn current_version(&self, name: &str) -> String {
        self.with_key(name, |k| k.versions.last().unwrap().id.clone())
    }

    /// `PATCH /keys/{name}` `attributes.enabled` of the current version.
    pub fn set_enabled(&self, name: &str, enabled: bool) {
        self.with_key(name, |k| k.versions.last_mut().unwrap().enabled = enabled);
    }

    /// `PATCH /keys/{name}/{version}` `attributes.enabled`.
    pub fn set_version_enabled(&self, name: &str, version: &str, enabled: bool) {
        self.with_key(name, |k| {
            k.versions
                .iter_mut()
                .find(|v| v.id == version)
                .unwrap()
                .enabled = enabled
        });
    }

    /// `attributes.exp` and `attributes.nbf` of the current version.
    pub fn set_validity(&self, name: &str, nbf: Option<i64>, exp: Option<i64>) {
        self.with_key(name, |k| {
            let v = k.versions.last_mut().unwrap();
            v.nbf = nbf;
            v.exp = exp;
        });
    }

    /// `PATCH /keys/{name}` `key_ops`.
    pub fn set_key_ops(&self, name: &str, ops: &[&str]) {
        self.with_key(name, |k| {
            k.key_ops = ops.iter().map(|o| (*o).to_owned()).collect()
        });
    }

    /// `DELETE /keys/{name}` (soft delete: reads answer 404).
    pub fn delete_key(&self, name: &str) {
        self.with(|s| s.keys.remove(name));
    }

    /// Makes every vault answer the given fault (None: normal service).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.with(|s| s.fault = fault);
    }

    /// Invalidates every token issued so far (as when they expire early).
    pub fn revoke_tokens(&self) {
        self.with(|s| s.tokens.clear());
    }

    /// Token requests served so far (good or bad).
    pub fn token_requests(&self) -> usize {
        self.with(|s| s.token_requests)
    }

    /// Requests to the vault (not the token endpoints), faults included.
    pub fn vault_requests(&self) -> usize {
        self.with(|s| s.vault_requests)
    }

    /// Vault requests of one kind (`get`, `wrapkey`, `unwrapkey`) so far.
    pub fn calls(&self, op: &str) -> usize {
        self.with(|s| s.calls.get(op).copied().unwrap_or(0))
    }
}

fn issue_token(s: &mut State, template: &str) -> Value {
    let token = format!("fake-token-{}", uuid::Uuid::new_v4().simple());
    s.tokens.push(token.clone());
    let mut out = fixture(template);
    out["access_token"] = json!(token);
    out
}

/// `POST /{tenant}/oauth2/v2.0/token` (client credentials, secret or
/// federated assertion).
fn token_endpoint(s: &mut State, tenant: &str, req: &Request) -> Reply {
    s.token_requests += 1;
    let param = |name| req.param(name).unwrap_or_default();
    let secret_ok = param("client_secret") == CLIENT_SECRET;
    let assertion_ok = param("client_assertion_type")
        == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        && param("client_assertion") == FEDERATED_TOKEN;
    if tenant != TENANT_ID
        || param("grant_type") != "client_credentials"
        || param("client_id") != CLIENT_ID
        || param("scope") != SCOPE
        || !(secret_ok || assertion_ok)
    {
        return reply(401, fixture("error_token_invalid_client.json"));
    }
    reply(200, issue_token(s, "token.json"))
}

/// `GET /metadata/identity/oauth2/token` (IMDS).
fn imds_endpoint(s: &mut State, req: &Request) -> Reply {
    s.token_requests += 1;
    if req.header("metadata") != Some("true")
        || req.param("api-version").as_deref() != Some("2018-02-01")
        || req.param("resource").as_deref() != Some("https://vault.azure.net")
    {
        return reply(400, fixture("error_imds_no_metadata.json"));
    }
    let mut out = issue_token(s, "token_imds.json");
    out["resource"] = json!("https://vault.azure.net");
    reply(200, out)
}

fn kid(base: &str, name: &str, version: &str) -> String {
    format!("{base}/keys/{name}/{version}")
}

fn key_bundle(base: &str, name: &str, key: &Key, v: &Version) -> Value {
    let mut out = fixture("get_key.json");
    out["key"]["kid"] = json!(kid(base, name, &v.id));
    out["key"]["key_ops"] = json!(key.key_ops);
    match &v.material {
        Material::Rsa(private) => {
            out["key"]["kty"] = json!("RSA");
            out["key"]["n"] = json!(B64URL.encode(private.n().to_bytes_be()));
            out["key"]["e"] = json!(B64URL.encode(private.e().to_bytes_be()));
        }
        Material::Aes(_) => {
            out["key"]["kty"] = json!("oct-HSM");
            let k = out["key"].as_object_mut().unwrap();
            k.remove("n");
            k.remove("e");
        }
    }
    let attributes = &mut out["attributes"];
    attributes["enabled"] = json!(v.enabled);
    if let Some(exp) = v.exp {
        attributes["exp"] = json!(exp);
    }
    if let Some(nbf) = v.nbf {
        attributes["nbf"] = json!(nbf);
    }
    out
}

fn wrap(material: &Material, alg: &str, plain: &[u8]) -> Option<Vec<u8>> {
    match (material, alg) {
        (Material::Rsa(private), "RSA-OAEP-256") => private
            .to_public_key()
            .encrypt(
                &mut rand::rngs::OsRng,
                rsa::Oaep::new::<sha2::Sha256>(),
                plain,
            )
            .ok(),
        (Material::Aes(key), "A256KW") => aes_kw::KekAes256::from(*key).wrap_vec(plain).ok(),
        _ => None,
    }
}

fn unwrap(material: &Material, alg: &str, wrapped: &[u8]) -> Option<Vec<u8>> {
    match (material, alg) {
        (Material::Rsa(private), "RSA-OAEP-256") => private
            .decrypt(rsa::Oaep::new::<sha2::Sha256>(), wrapped)
            .ok(),
        (Material::Aes(key), "A256KW") => aes_kw::KekAes256::from(*key).unwrap_vec(wrapped).ok(),
        _ => None,
    }
}

async fn answer(state: &Mutex<State>, base: &str, req: Request) -> Reply {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    {
        let mut s = state.lock().unwrap();
        match (req.method.as_str(), parts.as_slice()) {
            ("POST", [tenant, "oauth2", "v2.0", "token"]) => {
                return token_endpoint(&mut s, tenant, &req)
            }
            ("GET", ["metadata", "identity", "oauth2", "token"]) => {
                return imds_endpoint(&mut s, &req)
            }
            _ => {}
        }
    }
    let fault = {
        let mut s = state.lock().unwrap();
        s.vault_requests += 1;
        s.fault
    };
    match fault {
        Some(Fault::Forbidden) => return reply(403, fixture("error_403.json")),
        Some(Fault::Throttled) => {
            return reply_with(429, fixture("error_429.json"), &[("retry-after", "1")])
        }
        Some(Fault::Unavailable) => return reply(503, fixture("error_503.json")),
        Some(Fault::Silent) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return reply(503, fixture("error_503.json"));
        }
        Some(Fault::Unauthorized) | None => {}
    }
    let mut s = state.lock().unwrap();
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if fault == Some(Fault::Unauthorized) || !s.tokens.iter().any(|t| t == token) {
        return reply_with(
            401,
            fixture("error_401.json"),
            &[(
                "www-authenticate",
                "Bearer authorization=\"https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47\", resource=\"https://vault.azure.net\"",
            )],
        );
    }
    if req.param("api-version").as_deref() != Some("7.4") {
        return reply(
            400,
            json!({"error": {"code": "BadParameter", "message": "api-version"}}),
        );
    }
    let (name, version, op) = match parts.as_slice() {
        ["keys", name, ""] | ["keys", name] => (*name, None, "get"),
        ["keys", name, version] => (*name, Some(*version), "get"),
        ["keys", name, version, "wrapkey"] => (*name, Some(*version), "wrapkey"),
        ["keys", name, version, "unwrapkey"] => (*name, Some(*version), "unwrapkey"),
        _ => return reply(404, fixture("error_404.json")),
    };
    *s.calls.entry(op).or_default() += 1;
    let Some(key) = s.keys.get(name) else {
        return reply(404, fixture("error_404.json"));
    };
    let found = match version {
        None => key.versions.last(),
        Some(id) => key.versions.iter().find(|v| v.id == id),
    };
    let Some(v) = found else {
        return reply(404, fixture("error_404.json"));
    };
    match (req.method.as_str(), op) {
        ("GET", "get") => reply(200, key_bundle(base, name, key, v)),
        ("POST", "wrapkey" | "unwrapkey") => {
            if !v.enabled {
                return reply(403, fixture("error_403_disabled.json"));
            }
            let body = req.json();
            let alg = body["alg"].as_str().unwrap_or("");
            let Some(input) = body["value"].as_str().and_then(|b| B64URL.decode(b).ok()) else {
                return reply(400, fixture("error_400_unwrap.json"));
            };
            let output = if op == "wrapkey" {
                wrap(&v.material, alg, &input)
            } else {
                unwrap(&v.material, alg, &input)
            };
            match output {
                Some(out) => {
                    let mut answer = fixture("wrap_key.json");
                    answer["kid"] = json!(kid(base, name, &v.id));
                    answer["value"] = json!(B64URL.encode(out));
                    reply(200, answer)
                }
                None => reply(400, fixture("error_400_unwrap.json")),
            }
        }
        _ => reply(
            405,
            json!({"error": {"code": "MethodNotAllowed", "message": ""}}),
        ),
    }
}
