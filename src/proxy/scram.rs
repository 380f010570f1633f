//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) arithmetic for authentication
//! pass-through. With the role's stored verifier (StoredKey, ServerKey) the
//! proxy can check a client's proof, learn the ClientKey from it, and use that
//! ClientKey to answer the server's own challenge. This is what lets SCRAM
//! cross a proxy that terminates TLS on both legs, where relaying the
//! exchange fails PostgreSQL's channel-binding downgrade check.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// A role's SCRAM-SHA-256 verifier as stored in `pg_authid.rolpassword`.
pub struct Verifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt, base64 as stored.
    pub salt_b64: String,
    stored_key: [u8; 32],
    server_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

/// A SCRAM exchange that cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The stored password is not a SCRAM-SHA-256 verifier.
    #[error("the role's password is not stored as a SCRAM-SHA-256 verifier")]
    NotScramVerifier,
    /// A message did not follow RFC 5802.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client's proof does not match the verifier.
    #[error("client proof does not match")]
    BadProof,
    /// The server's signature does not match the verifier.
    #[error("server signature does not match the stored verifier")]
    BadServerSignature,
}

impl Verifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(stored: &str) -> Result<Self, ScramError> {
        let rest = stored
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::NotScramVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::NotScramVerifier)?;
        let (iterations, salt) = params.split_once(':').ok_or(ScramError::NotScramVerifier)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(ScramError::NotScramVerifier)?;
        let decode32 = |text: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(text)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or(ScramError::NotScramVerifier)
        };
        Ok(Self {
            iterations: iterations
                .parse()
                .map_err(|_| ScramError::NotScramVerifier)?,
            salt_b64: salt.to_owned(),
            stored_key: decode32(stored_key)?,
            server_key: Zeroizing::new(decode32(server_key)?),
        })
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A fresh printable nonce (24 random bytes, base64).
pub fn nonce() -> String {
    let mut bytes = [0u8; 24];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    B64.encode(bytes)
}

/// The client's first message, split into its GS2 header and bare part.
#[derive(Debug, Clone)]
pub struct ClientFirst {
    /// `n,,` or `y,,` (channel binding `p=` is refused).
    pub gs2_header: String,
    /// `n=...,r=...`
    pub bare: String,
    /// The client nonce.
    pub nonce: String,
}

impl ClientFirst {
    /// Parses the data of a SASLInitialResponse.
    pub fn parse(data: &[u8]) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let gs2_len = match text.as_bytes().first() {
            Some(b'n') | Some(b'y') => {
                let first = text
                    .find(',')
                    .ok_or(ScramError::Malformed("no GS2 header"))?;
                let second = text[first + 1..]
                    .find(',')
                    .ok_or(ScramError::Malformed("no GS2 header"))?;
                first + second + 2
            }
            Some(b'p') => return Err(ScramError::Malformed("channel binding was not offered")),
            _ => return Err(ScramError::Malformed("bad GS2 header")),
        };
        let (gs2, bare) = text.split_at(gs2_len);
        let nonce = attribute(bare, 'r').ok_or(ScramError::Malformed("no client nonce"))?;
        Ok(Self {
            gs2_header: gs2.to_owned(),
            bare: bare.to_owned(),
            nonce: nonce.to_owned(),
        })
    }
}

fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// Server side of the exchange with the client.
pub struct ServerExchange {
    client_first: ClientFirst,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Starts the exchange; returns it and the server-first message to send.
    pub fn start(client_first: ClientFirst, verifier: &Verifier) -> (Self, String) {
        let nonce = format!("{}{}", client_first.nonce, nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            verifier.salt_b64, verifier.iterations
        );
        (
            Self {
                client_first,
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        )
    }

    /// Checks the client-final message. On success returns the client's
    /// ClientKey and the server-final message (`v=...`) to send.
    pub fn finish(
        &self,
        client_final: &[u8],
        verifier: &Verifier,
    ) -> Result<(Zeroizing<[u8; 32]>, String), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof_b64) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let binding = attribute(without_proof, 'c').ok_or(ScramError::Malformed("no binding"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.client_first.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if attribute(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof_b64)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
            .ok_or(ScramError::Malformed("bad proof encoding"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first.bare, self.server_first, without_proof
        );
        let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        let mut client_key = Zeroizing::new([0u8; 32]);
        for (i, byte) in client_key.iter_mut().enumerate() {
            *byte = proof[i] ^ signature[i];
        }
        let digest: [u8; 32] = Sha256::digest(client_key.as_slice()).into();
        // subtle: the compiler may not turn the comparison into an early exit.
        if !bool::from(digest.ct_eq(&verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(verifier.server_key.as_slice(), auth_message.as_bytes());
        Ok((client_key, format!("v={}", B64.encode(server_signature))))
    }
}

/// Client side of the exchange with the server, using a known ClientKey.
pub struct ClientExchange {
    bare: String,
    nonce: String,
    auth_message: String,
}

impl ClientExchange {
    /// Starts the exchange; returns it and the client-first message
    /// (`n,,n=,r=...`, no channel binding).
    pub fn start() -> (Self, String) {
        let nonce = nonce();
        let bare = format!("n=,r={nonce}");
        let first = format!("n,,{bare}");
        (
            Self {
                bare,
                nonce,
                auth_message: String::new(),
            },
            first,
        )
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(
        &mut self,
        server_first: &[u8],
        client_key: &[u8; 32],
        verifier: &Verifier,
    ) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attribute(text, 'r').ok_or(ScramError::Malformed("no server nonce"))?;
        if !nonce.starts_with(&self.nonce) {
            return Err(ScramError::Malformed("server nonce does not extend ours"));
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{},{}", self.bare, text, without_proof);
        let signature = hmac(&verifier.stored_key, self.auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (i, byte) in proof.iter_mut().enumerate() {
            *byte = client_key[i] ^ signature[i];
        }
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message (`v=...`).
    pub fn verify_server(
        &self,
        server_final: &[u8],
        verifier: &Verifier,
    ) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let given = attribute(text, 'v').ok_or(ScramError::Malformed("no server signature"))?;
        let expected = hmac(verifier.server_key.as_slice(), self.auth_message.as_bytes());
        let given = B64.decode(given).unwrap_or_default();
        if bool::from(given.as_slice().ct_eq(expected.as_slice())) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Derives a verifier from a password the way PostgreSQL does.
    fn verifier_for(password: &str, salt: &[u8], iterations: u32) -> (Verifier, [u8; 32]) {
        let mut salted = [0u8; 32];
        let mut u = hmac(password.as_bytes(), &[salt, &1u32.to_be_bytes()].concat());
        salted.copy_from_slice(&u);
        for _ in 1..iterations {
            u = hmac(password.as_bytes(), &u);
            for (s, x) in salted.iter_mut().zip(u) {
                *s ^= x;
            }
        }
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        let text = format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            B64.encode(salt),
            B64.encode(stored_key),
            B64.encode(server_key)
        );
        (Verifier::parse(&text).unwrap(), client_key)
    }

    /// RFC 7677 section 3 test vector (user "user", password "pencil").
    #[test]
    fn rfc7677_proof_and_server_signature() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let (verifier, _) = verifier_for("pencil", &salt, 4096);
        let client_first = ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let exchange = ServerExchange {
            client_first,
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".to_owned(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".to_owned(),
        };
        let client_final = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let (_, server_final) = exchange.finish(client_final, &verifier).unwrap();
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn learned_client_key_authenticates_upstream() {
        let (verifier, client_key) = verifier_for("secret", b"salty-salt", 4096);
        // Client side (as libpq would do, with channel binding flag y).
        let first = ClientFirst::parse(b"y,,n=,r=clientnonce").unwrap();
        let (server, server_first) = ServerExchange::start(first, &verifier);
        let nonce = attribute(&server_first, 'r').unwrap().to_owned();
        let without_proof = format!("c={},r={nonce}", B64.encode("y,,"));
        let auth = format!("n=,r=clientnonce,{server_first},{without_proof}");
        let sig = hmac(&verifier.stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        let client_final = format!("{without_proof},p={}", B64.encode(proof));
        let (learned, _) = server.finish(client_final.as_bytes(), &verifier).unwrap();
        assert_eq!(*learned, client_key);
        // Wrong proof is refused.
        let bad = format!("{without_proof},p={}", B64.encode([0u8; 32]));
        assert_eq!(
            server.finish(bad.as_bytes(), &verifier).unwrap_err(),
            ScramError::BadProof
        );
        // A downgrade of the binding flag is refused.
        let flipped = client_final.replacen(&B64.encode("y,,"), &B64.encode("n,,"), 1);
        assert!(server.finish(flipped.as_bytes(), &verifier).is_err());
    }

    #[test]
    fn rejects_non_scram_verifiers_and_channel_binding_requests() {
        assert_eq!(
            Verifier::parse("md5abc").unwrap_err(),
            ScramError::NotScramVerifier
        );
        assert!(ClientFirst::parse(b"p=tls-server-end-point,,n=,r=x").is_err());
        assert!(format!("{:?}", verifier_for("x", b"s", 2).0).contains("redacted"));
    }
}
