//! A local HTTPS server for the fakes of cloud KMS APIs: 127.0.0.1 on a
//! free port, a fresh CA and server certificate
//! (`cmk_proxy::localpg::write_ca_and_server_cert`), and every request
//! handed, body read, to the fake's own handler. Knows nothing of any API.
#![allow(dead_code)]

use rustls::pki_types::pem::PemObject;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// An answer of the fake.
pub type Reply = Response<Full<Bytes>>;

/// A request, read whole.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`…
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Request {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON (Null when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
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

/// A JSON answer.
pub fn reply(status: u16, body: &Value) -> Reply {
    reply_with(status, body, &[])
}

/// A JSON answer with extra headers.
pub fn reply_with(status: u16, body: &Value, headers: &[(&str, &str)]) -> Reply {
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

/// A running server (stops with the test's runtime).
pub struct HttpsFake {
    address: String,
    dir: tempfile::TempDir,
}

impl HttpsFake {
    /// Starts serving `handler` on a free 127.0.0.1 port.
    pub async fn start<F, Fut>(handler: F) -> HttpsFake
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
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
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let request = Request {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    query: parts.uri.query().unwrap_or("").to_owned(),
                                    headers: parts.headers,
                                    body,
                                };
                                Ok::<_, Infallible>(handler(request).await)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
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

    /// A directory living as long as the server, for the test's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
