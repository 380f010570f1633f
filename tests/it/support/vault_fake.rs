//! A local HTTPS server answering the documented Vault Transit requests with
//! the documented responses (fixtures in `tests/it/fixtures/vault-transit/`,
//! whose README links the API reference): key read, encrypt and decrypt with
//! `associated_data`, AppRole login, and the error answers a tenant or an
//! operator can cause (deleted key, `deletion_allowed`, raised
//! `min_decryption_version`, 403, 429, 503 sealed, no answer at all).
//! Recorded API behaviour, not a live Vault.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::https_fake::{reply, HttpsFake, Reply, Served};

/// The token the server accepts without a login.
pub const TOKEN: &str = "s.cmk-proxy-test-token";
/// AppRole credentials the server accepts.
pub const ROLE_ID: &str = "cmk-proxy-role";
pub const SECRET_ID: &str = "cmk-proxy-secret";

fn fixture(name: &str) -> Value {
    super::https_fake::fixture("vault-transit", name)
}

/// What the whole server does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 403 permission denied (the tenant removed the vendor's policy).
    Forbidden,
    /// 429 rate limit quota exceeded.
    Throttled,
    /// 503 Vault is sealed.
    Sealed,
    /// Accepts the request and never answers.
    Silent,
}

struct Key {
    latest_version: u64,
    min_decryption_version: u64,
    deletion_allowed: bool,
    supports_decryption: bool,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    /// ciphertext → (key, associated_data, plaintext), as Vault would open it.
    sealed: HashMap<String, (String, String, String)>,
    tokens: Vec<String>,
    fault: Option<Fault>,
    logins: usize,
}

/// A running fake Vault (stops with the test's runtime).
pub struct FakeVault {
    state: Arc<Mutex<State>>,
    server: HttpsFake,
}

impl FakeVault {
    /// Starts the server on a free 127.0.0.1 port with a fresh CA.
    pub async fn start() -> FakeVault {
        let state = Arc::new(Mutex::new(State {
            tokens: vec![TOKEN.to_owned()],
            ..State::default()
        }));
        let shared = state.clone();
        let server = HttpsFake::start(move |req| {
            let state = shared.clone();
            async move { answer(&state, req).await }
        })
        .await;
        std::fs::write(server.dir().join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(server.dir().join("secret-id"), format!("{SECRET_ID}\n")).unwrap();
        FakeVault { state, server }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        self.server.address()
    }

    /// The CA certificate of the server's TLS certificate.
    pub fn ca(&self) -> PathBuf {
        self.server.ca()
    }

    /// A file holding the accepted token.
    pub fn token_file(&self) -> PathBuf {
        self.server.dir().join("token")
    }

    /// A file holding the AppRole secret id.
    pub fn secret_id_file(&self) -> PathBuf {
        self.server.dir().join("secret-id")
    }

    /// A `keys.providers` entry for this server with token auth.
    pub fn provider_yaml(&self) -> String {
        format!(
            "{{kind: vault-transit, address: \"{}\", ca: \"{}\", token_file: \"{}\"}}",
            self.address(),
            self.ca().display(),
            self.token_file().display()
        )
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// `POST /v1/transit/keys/:name` (aes256-gcm96).
    pub fn create_key(&self, name: &str) {
        self.with(|s| {
            s.keys.insert(
                name.to_owned(),
                Key {
                    latest_version: 1,
                    min_decryption_version: 1,
                    deletion_allowed: false,
                    supports_decryption: true,
                },
            )
        });
    }

    /// `POST /v1/transit/keys/:name/rotate`.
    pub fn rotate(&self, name: &str) {
        self.with(|s| s.keys.get_mut(name).unwrap().latest_version += 1);
    }

    /// `POST /v1/transit/keys/:name/config` with `min_decryption_version`.
    pub fn set_min_decryption_version(&self, name: &str, version: u64) {
        self.with(|s| s.keys.get_mut(name).unwrap().min_decryption_version = version);
    }

    /// `POST /v1/transit/keys/:name/config` with `deletion_allowed`.
    pub fn set_deletion_allowed(&self, name: &str, allowed: bool) {
        self.with(|s| s.keys.get_mut(name).unwrap().deletion_allowed = allowed);
    }

    /// A key that signs only (`supports_decryption: false`, e.g. ed25519).
    pub fn make_signing_only(&self, name: &str) {
        self.with(|s| s.keys.get_mut(name).unwrap().supports_decryption = false);
    }

    /// `DELETE /v1/transit/keys/:name`.
    pub fn delete_key(&self, name: &str) {
        self.with(|s| s.keys.remove(name));
    }

    /// Makes every answer the given fault (None: normal service).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.with(|s| s.fault = fault);
    }

    /// AppRole logins served so far.
    pub fn logins(&self) -> usize {
        self.with(|s| s.logins)
    }

    /// Revokes every token (as `vault token revoke`).
    pub fn revoke_tokens(&self) {
        self.with(|s| s.tokens.clear());
    }
}

async fn answer(state: &Mutex<State>, req: Served) -> Reply {
    let method = req.method.clone();
    let path = req.path.clone();
    let token = req.header("x-vault-token").map(str::to_owned);
    let body = req.json();
    let fault = state.lock().unwrap().fault;
    match fault {
        Some(Fault::Forbidden) => return reply(403, fixture("error_403.json")),
        Some(Fault::Throttled) => return reply(429, fixture("error_429.json")),
        Some(Fault::Sealed) => return reply(503, fixture("error_503.json")),
        Some(Fault::Silent) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return reply(503, fixture("error_503.json"));
        }
        None => {}
    }
    let mut s = state.lock().unwrap();
    if method == "POST" && path == "/v1/auth/approle/login" {
        if body["role_id"] != ROLE_ID || body["secret_id"] != SECRET_ID {
            return reply(400, fixture("error_login.json"));
        }
        s.logins += 1;
        let mut login = fixture("login_approle.json");
        let token = format!("s.login-{}", s.logins);
        login["auth"]["client_token"] = json!(token);
        s.tokens.push(token);
        return reply(200, login);
    }
    if !token.is_some_and(|t| s.tokens.contains(&t)) {
        return reply(403, fixture("error_403.json"));
    }
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let (op, name) = match parts.as_slice() {
        ["transit", op, name] => (*op, (*name).to_owned()),
        _ => return reply(404, fixture("error_404.json")),
    };
    let Some(key) = s.keys.get(&name) else {
        return reply(404, fixture("error_404.json"));
    };
    match (method.as_str(), op) {
        ("GET", "keys") => {
            let mut read = fixture("read_key.json");
            let data = &mut read["data"];
            data["name"] = json!(name);
            data["latest_version"] = json!(key.latest_version);
            data["min_decryption_version"] = json!(key.min_decryption_version);
            data["deletion_allowed"] = json!(key.deletion_allowed);
            data["supports_decryption"] = json!(key.supports_decryption);
            data["keys"] = json!((1..=key.latest_version)
                .map(|v| (v.to_string(), json!(1442851412)))
                .collect::<serde_json::Map<_, _>>());
            reply(200, read)
        }
        ("POST", "encrypt") => {
            let version = key.latest_version;
            let ciphertext = format!(
                "vault:v{version}:{}",
                B64.encode(uuid::Uuid::new_v4().as_bytes())
            );
            let aad = body["associated_data"].as_str().unwrap_or("").to_owned();
            let plain = body["plaintext"].as_str().unwrap_or("").to_owned();
            s.sealed.insert(ciphertext.clone(), (name, aad, plain));
            let mut out = fixture("encrypt.json");
            out["data"]["ciphertext"] = json!(ciphertext);
            out["data"]["key_version"] = json!(version);
            reply(200, out)
        }
        ("POST", "decrypt") => {
            let ciphertext = body["ciphertext"].as_str().unwrap_or("");
            let version: u64 = ciphertext
                .strip_prefix("vault:v")
                .and_then(|r| r.split_once(':'))
                .and_then(|(v, _)| v.parse().ok())
                .unwrap_or(0);
            if version < key.min_decryption_version {
                return reply(400, fixture("error_version_too_old.json"));
            }
            let aad = body["associated_data"].as_str().unwrap_or("");
            match s.sealed.get(ciphertext) {
                Some((k, a, plain)) if *k == name && a == aad => {
                    let mut out = fixture("decrypt.json");
                    out["data"]["plaintext"] = json!(plain);
                    reply(200, out)
                }
                _ => reply(400, fixture("error_decrypt_failed.json")),
            }
        }
        _ => reply(405, json!({"errors": []})),
    }
}
