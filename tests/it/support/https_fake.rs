//! The plumbing of the recorded-API fakes (`vault_fake`, `gcp_fake`,
//! `azure_fake`): an
//! HTTPS server on a free 127.0.0.1 port with a fresh CA
//! (`cmk_proxy::localpg::write_ca_and_server_cert`), or a plain HTTP one,
//! handing each whole request to the fake's `answer` function; and the
//! fixture and JSON-reply helpers. Knows nothing of any API.
#![allow(dead_code)]

use rustls::pki_types::pem::PemObject;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One request, read whole.
pub struct Served {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Served {
    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of `name` in the query string or a form body.
    pub fn param(&self, name: &str) -> Option<String> {
        let query = url::form_urlencoded::parse(self.query.as_bytes());
        let form = url::form_urlencoded::parse(&self.body);
        query
            .chain(form)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

pub type Reply = Response<Full<Bytes>>;

/// A JSON reply with `status`.
pub fn reply(status: u16, body: Value) -> Reply {
    reply_with(status, body, &[])
}

/// A JSON reply with `status` and extra headers.
pub fn reply_with(status: u16, body: Value, headers: &[(&str, &str)]) -> Reply {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `tests/it/fixtures/{dir}/{name}` as JSON.
pub fn fixture(dir: &str, name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(dir)
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture JSON")
}

/// A running HTTPS server (stops with the test's runtime) and its
/// directory, which holds `ca.crt` and anything the fake writes there.
pub struct HttpsFake {
    address: String,
    dir: tempfile::TempDir,
}

impl HttpsFake {
    /// Starts serving `answer` over TLS.
    pub async fn start<F, Fut>(answer: F) -> HttpsFake
    where
        F: Fn(Served) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let files = cmk_proxy::localpg::write_ca_and_server_cert(dir.path(), &["127.0.0.1"])
            .expect("certificates");
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(TokioIo::new(tls), answer).await;
                    }
                });
            }
        });
        HttpsFake { address, dir }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `127.0.0.1:PORT`.
    pub fn authority(&self) -> &str {
        self.address.trim_start_matches("https://")
    }

    /// The CA certificate of the server's TLS certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server's directory (for credential files the test writes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts serving `answer` over plain HTTP (a metadata server, say);
/// returns `127.0.0.1:PORT`.
pub async fn start_plain<F, Fut>(answer: F) -> String
where
    F: Fn(Served) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(serve(TokioIo::new(tcp), answer));
        }
    });
    host
}

async fn serve<I, F, Fut>(io: I, answer: Arc<F>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Served) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let served = Served {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or("").to_owned(),
                headers: parts.headers,
                body,
            };
            Ok::<_, Infallible>(answer(served).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}
