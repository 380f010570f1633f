//! TLS material and the rustls configuration of the upstream leg, shared by
//! the proxy's sessions and the key registry's connection (both speak to the
//! same PostgreSQL, so they negotiate TLS the same way, as libpq does).
//! It owns PEM loading and certificate verification; it knows nothing of
//! sessions, keys or the PostgreSQL protocol.

mod pem;
mod upstream;
mod verify;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use pem::{load_certs, load_key};
pub use upstream::{server_name, upstream_client_config};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is missing.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of both legs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
