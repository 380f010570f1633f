//! The certificate the proxy shows to clients. The upstream leg's rustls
//! configuration lives in `crate::tls`, shared with the key registry.

use std::sync::Arc;

use crate::config::ClientTls;
pub use crate::tls::TlsError;
use crate::tls::{load_certs, load_key, provider};

/// The acceptor for client connections that ask for TLS.
pub fn client_acceptor(cfg: &ClientTls) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
