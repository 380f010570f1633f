//! What the REST providers (Vault Transit, Google Cloud KMS, Azure Key
//! Vault) share on the wire: an HTTPS client with bounded timeouts and an
//! optional extra CA, and answers read with a size cap into wiped memory.

use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use super::KmsError;

/// TCP connect timeout: an unreachable key service is a fast `Transient`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from a key service or a token endpoint.
const MAX_ANSWER: usize = 1 << 20;

/// A client builder with the providers' timeouts, trusting `ca` (PEM)
/// besides the built-in public roots; `what` names the provider in errors.
pub(crate) fn client_builder(
    what: &str,
    ca: Option<&Path>,
) -> Result<reqwest::ClientBuilder, KmsError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    if let Some(ca) = ca {
        let bad = |e: String| KmsError::Config(format!("{what} ca {}: {e}", ca.display()));
        let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| bad(e.to_string()))?;
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}

/// Reads an answer's body, at most `MAX_ANSWER` bytes, into memory that is
/// wiped when dropped (unwrap answers and tokens are secret).
pub(crate) async fn read_answer(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, String> {
    let expected = resp
        .content_length()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    if expected > MAX_ANSWER {
        return Err(format!("answer of {expected} bytes"));
    }
    let mut body = Zeroizing::new(Vec::with_capacity(expected));
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len().saturating_add(chunk.len()) > MAX_ANSWER {
            return Err(format!("answer over {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
