//! Server certificate verifiers for the modes that rustls's own WebPKI
//! verifier does not cover: libpq's `require` (encrypt, trust whoever
//! answers) and `verify-ca` (chain to a trusted CA, no host name check).
//!
//! The handshake signature is always checked against the key of the
//! certificate the server sent, so a man in the middle must still own
//! that key. WebPKI refuses X.509 version 1 certificates outright (Citus,
//! and `openssl x509 -req` without extensions, make them), so the key is
//! read with `x509-cert`, which parses every version, and checked as a raw
//! public key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_cert::der::{Decode, Encode};

/// What the server's certificate must satisfy.
#[derive(Debug)]
pub(super) enum Trust {
    /// libpq's `prefer` / `require`: any certificate, of any X.509 version.
    Anyone,
    /// libpq's `verify-ca`: the certificate chains to a trusted CA; the
    /// host name is not checked. A server certificate that is itself in
    /// `pinned` (a self-signed certificate, as OpenSSL accepts it) is
    /// trusted whatever its X.509 version, within its validity period.
    Chain {
        /// The CAs, for WebPKI (X.509 v3) chains.
        roots: Arc<RootCertStore>,
        /// The CA file's certificates themselves.
        pinned: Vec<CertificateDer<'static>>,
    },
}

/// The verifier of `require` and `verify-ca` (see the module doc).
#[derive(Debug)]
pub(super) struct LibpqVerifier {
    pub(super) trust: Trust,
    pub(super) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (roots, pinned) = match &self.trust {
            Trust::Anyone => {
                // Not trusted, but it must hold a key the signatures can be checked with.
                subject_public_key_info(end_entity)?;
                return Ok(ServerCertVerified::assertion());
            }
            Trust::Chain { roots, pinned } => (roots, pinned),
        };
        if pinned.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            check_validity(end_entity, now)?;
            return Ok(ServerCertVerified::assertion());
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signed_by_certificate_key(&self.provider, message, cert, dss.scheme, dss.signature())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let spki = subject_public_key_info(cert)?;
        verify_tls13_signature_with_raw_key(
            message,
            &spki,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn bad_encoding() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
}

fn parse(cert: &CertificateDer<'_>) -> Result<x509_cert::Certificate, rustls::Error> {
    x509_cert::Certificate::from_der(cert.as_ref()).map_err(|_| bad_encoding())
}

/// The DER SubjectPublicKeyInfo of a certificate of any X.509 version.
fn subject_public_key_info(
    cert: &CertificateDer<'_>,
) -> Result<SubjectPublicKeyInfoDer<'static>, rustls::Error> {
    let der = parse(cert)?
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|_| bad_encoding())?;
    Ok(SubjectPublicKeyInfoDer::from(der))
}

/// notBefore <= now <= notAfter, as every verifier checks.
fn check_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let validity = parse(cert)?.tbs_certificate.validity;
    let now = now.as_secs();
    let not_before = validity.not_before.to_unix_duration().as_secs();
    let not_after = validity.not_after.to_unix_duration().as_secs();
    if now < not_before {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > not_after {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// Checks `signature` over `message` with the public key of `cert` (any
/// X.509 version). A scheme may map to several algorithms (rustls's own
/// `verify_tls12_signature` tries each in turn; so does this).
fn signed_by_certificate_key(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let spki = subject_public_key_info(cert)?;
    let key = webpki::RawPublicKeyEntity::try_from(&spki).map_err(|_| bad_encoding())?;
    let candidates = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(known, _)| *known == scheme)
        .map(|(_, algs)| *algs)
        .ok_or(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ))?;
    for alg in candidates {
        match key.verify_signature(*alg, message, signature) {
            Ok(()) => return Ok(HandshakeSignatureValid::assertion()),
            Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => continue,
            Err(_) => break,
        }
    }
    Err(rustls::Error::InvalidCertificate(
        CertificateError::BadSignature,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::localpg::write_self_signed_v1_cert;
    use crate::tls::{load_certs, load_key, provider};

    /// A v1 certificate, its key, and a signature by that key over `message`.
    fn v1_signed(
        dir: &std::path::Path,
        message: &[u8],
    ) -> (CertificateDer<'static>, SignatureScheme, Vec<u8>) {
        let files = write_self_signed_v1_cert(dir).expect("openssl makes a v1 certificate");
        let cert = load_certs(&files.cert).unwrap().remove(0);
        let key =
            rustls::crypto::ring::sign::any_supported_type(&load_key(&files.key).unwrap()).unwrap();
        let signer = key
            .choose_scheme(&[SignatureScheme::RSA_PSS_SHA256])
            .unwrap();
        let scheme = signer.scheme();
        (cert, scheme, signer.sign(message).unwrap())
    }

    #[test]
    fn a_v1_certificate_is_refused_by_webpki_but_its_key_checks_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let message = b"handshake transcript";
        let (cert, scheme, signature) = v1_signed(dir.path(), message);
        let version = x509_cert::Certificate::from_der(cert.as_ref())
            .unwrap()
            .tbs_certificate
            .version;
        assert_eq!(version, x509_cert::Version::V1);
        assert!(webpki::EndEntityCert::try_from(&cert).is_err());
        let p = provider();
        assert!(signed_by_certificate_key(&p, message, &cert, scheme, &signature).is_ok());
        // Another message, or a key the certificate does not hold, fails.
        let other = signed_by_certificate_key(&p, b"another transcript", &cert, scheme, &signature);
        assert!(matches!(
            other,
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
            ))
        ));
        let other_dir = tempfile::tempdir().unwrap();
        let (_, _, foreign) = v1_signed(other_dir.path(), message);
        assert!(signed_by_certificate_key(&p, message, &cert, scheme, &foreign).is_err());
    }

    #[test]
    fn garbage_is_no_certificate() {
        let verifier = LibpqVerifier {
            trust: Trust::Anyone,
            provider: provider(),
        };
        let err = verifier
            .verify_server_cert(
                &CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]),
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
        ));
    }
}
