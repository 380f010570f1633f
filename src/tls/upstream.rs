//! The rustls client configuration toward PostgreSQL, following libpq's
//! `sslmode` (see `verify` for what each mode checks).

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;

use super::pem::{load_certs, load_key};
use super::verify::{LibpqVerifier, Trust};
use super::{provider, TlsError};
use crate::config::{UpstreamTls, UpstreamTlsMode};

/// The rustls client configuration for the upstream leg, or `None` when
/// the mode is `disable`. With `tls.upstream.cert`/`key` the proxy shows a
/// client certificate to PostgreSQL (for `cert` authentication in pg_hba).
pub fn upstream_client_config(
    cfg: &UpstreamTls,
) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let trust = match cfg.mode {
        UpstreamTlsMode::Disable => return Ok(None),
        UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => Some(Trust::Anyone),
        UpstreamTlsMode::VerifyCa => {
            let (roots, pinned) = trusted(cfg)?;
            if roots.is_empty() && pinned.is_empty() {
                return Err(no_anchor("verify-ca has no CA certificate to trust"));
            }
            Some(Trust::Chain {
                roots: Arc::new(roots),
                pinned,
            })
        }
        UpstreamTlsMode::VerifyFull => None,
    };
    let builder = match trust {
        Some(trust) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                trust,
                provider: provider(),
            })),
        None => {
            let (roots, _) = trusted(cfg)?;
            if roots.is_empty() {
                return Err(no_anchor(
                    "verify-full has no X.509 v3 CA certificate to trust",
                ));
            }
            builder.with_root_certificates(roots)
        }
    };
    let config = match (&cfg.cert, &cfg.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
        }
        _ => {
            return Err(TlsError::Pem {
                path: "tls.upstream".to_owned(),
                what: "cert and key must be given together",
            })
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The trust anchors of the verifying modes: `tls.upstream.ca`, else the
/// system roots; with the CA file's certificates themselves (pinning).
fn trusted(cfg: &UpstreamTls) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut pinned = Vec::new();
    match &cfg.ca {
        Some(ca) => {
            for cert in load_certs(ca)? {
                // A v1 certificate is no WebPKI anchor, but may still be pinned.
                let _ = roots.add(cert.clone());
                pinned.push(cert);
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate is skipped, as libpq does.
                let _ = roots.add(cert);
            }
        }
    }
    Ok((roots, pinned))
}

fn no_anchor(what: &'static str) -> TlsError {
    TlsError::Pem {
        path: "tls.upstream.ca".to_owned(),
        what,
    }
}

/// The server name to verify for `host` (DNS name or IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::Pem {
        path: host.to_owned(),
        what: "not a valid TLS server name",
    })
}
