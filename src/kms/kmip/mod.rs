//! The KMIP provider (Thales CipherTrust, Fortanix, Entrust KeyControl, IBM,
//! PyKMIP): DEKs are sealed by the server's Encrypt with AES-GCM under the
//! tenant's symmetric key (its Unique Identifier is the key ref), with the
//! tenant id and DEK id as Authenticated Encryption Additional Data; the
//! key's State attribute must be Active for every use.
//!
//! Our own TTLV codec (`ttlv`) rather than a crate: `kmip-protocol` (NLnet
//! Labs) covers KMIP 1.0–1.2 with a closed set of operations and no
//! Encrypt/Decrypt with additional data (a KMIP 1.4 field), and
//! `cosmian_kmip` targets KMIP 2.1 with its own server's extensions.

pub mod client;
pub mod ttlv;

use rand::RngCore;
use zeroize::Zeroizing;

pub use self::client::KmipSettings;
use self::client::{operation, tag, Answer, KmipClient, Refusal};
use self::ttlv::{Item, Value};
use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::crypto::Dek;

/// First byte of an EDEK of this provider: AES-GCM, 96-bit IV, 128-bit tag.
const FORMAT_GCM: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Separates this provider's AAD from any other use of the tenant's key.
const AAD_LABEL: &[u8] = b"cmk-proxy/kmip/v1";
/// KMIP enumerations: Cryptographic Algorithm AES, Block Cipher Mode GCM.
const AES: u32 = 0x03;
const GCM: u32 = 0x09;
/// Result Reason "General Failure".
const GENERAL_FAILURE: u32 = 0x100;

/// KMIP State values (KMIP 1.4, 9.1.3.2.19).
mod state {
    pub const PRE_ACTIVE: u32 = 1;
    pub const ACTIVE: u32 = 2;
    pub const DEACTIVATED: u32 = 3;
    pub const COMPROMISED: u32 = 4;
    pub const DESTROYED: u32 = 5;
    pub const DESTROYED_COMPROMISED: u32 = 6;
}

/// `KeyProvider` over a KMIP server.
#[derive(Debug)]
pub struct KmipProvider {
    client: KmipClient,
}

impl KmipProvider {
    /// Loads the TLS identity; the server is first contacted on first use.
    pub fn new(settings: &KmipSettings) -> Result<KmipProvider, KmsError> {
        Ok(KmipProvider {
            client: KmipClient::new(settings)?,
        })
    }

    async fn encrypt(
        &self,
        key_ref: &str,
        plain: &[u8],
        iv: &[u8],
        aad: &[u8],
    ) -> Result<Answer, KmsError> {
        self.client
            .call(
                key_ref,
                operation::ENCRYPT,
                vec![
                    uid(key_ref),
                    gcm_parameters(),
                    Item::new(tag::DATA, Value::Bytes(plain.to_vec())),
                    Item::new(tag::IV_COUNTER_NONCE, Value::Bytes(iv.to_vec())),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
                        Value::Bytes(aad.to_vec()),
                    ),
                ],
            )
            .await
    }

    async fn decrypt(
        &self,
        key_ref: &str,
        sealed: &[u8],
        iv: &[u8],
        aad: &[u8],
        auth_tag: &[u8],
    ) -> Result<Answer, KmsError> {
        self.client
            .call(
                key_ref,
                operation::DECRYPT,
                vec![
                    uid(key_ref),
                    gcm_parameters(),
                    Item::new(tag::DATA, Value::Bytes(sealed.to_vec())),
                    Item::new(tag::IV_COUNTER_NONCE, Value::Bytes(iv.to_vec())),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
                        Value::Bytes(aad.to_vec()),
                    ),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_TAG,
                        Value::Bytes(auth_tag.to_vec()),
                    ),
                ],
            )
            .await
    }

    /// True when the server seals and opens a probe under `key_ref`: it is
    /// healthy, so an earlier failure was the EDEK's.
    async fn probe(&self, key_ref: &str) -> bool {
        let probe = b"cmk-proxy probe";
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let Ok(Ok(sealed)) = self.encrypt(key_ref, probe, &iv, AAD_LABEL).await else {
            return false;
        };
        let (Some(data), Some(auth_tag)) = (
            sealed.bytes(tag::DATA),
            sealed.bytes(tag::AUTHENTICATED_ENCRYPTION_TAG),
        ) else {
            return false;
        };
        let iv = sealed.bytes(tag::IV_COUNTER_NONCE).unwrap_or(&iv);
        matches!(
            self.decrypt(key_ref, data, iv, AAD_LABEL, auth_tag).await,
            Ok(Ok(opened)) if opened.bytes(tag::DATA) == Some(&probe[..])
        )
    }

    /// Get Attributes (State): `Ok` only for an Active key.
    async fn require_active(&self, key_ref: &str) -> Result<(), KmsError> {
        let answer = self
            .client
            .call(
                key_ref,
                operation::GET_ATTRIBUTES,
                vec![
                    uid(key_ref),
                    Item::new(tag::ATTRIBUTE_NAME, Value::Text("State".to_owned())),
                ],
            )
            .await?;
        let payload = refused(key_ref, "Get Attributes", answer)?;
        let state = payload
            .child(tag::ATTRIBUTE)
            .and_then(|a| a.enumeration(tag::ATTRIBUTE_VALUE));
        state_outcome(key_ref, state)
    }
}

fn uid(key_ref: &str) -> Item {
    Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(key_ref.to_owned()))
}

fn gcm_parameters() -> Item {
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::new(tag::BLOCK_CIPHER_MODE, Value::Enumeration(GCM)),
            Item::new(tag::CRYPTOGRAPHIC_ALGORITHM, Value::Enumeration(AES)),
            Item::new(tag::TAG_LENGTH, Value::Integer(TAG_LEN as i32)),
        ],
    )
}

/// Maps a key State: only Active is usable.
fn state_outcome(key_ref: &str, state: Option<u32>) -> Result<(), KmsError> {
    let deny = |reason, name: &str| {
        Err(KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("KMIP key state is {name}"),
        })
    };
    match state {
        Some(state::ACTIVE) => Ok(()),
        Some(state::PRE_ACTIVE) => deny(DenialReason::Disabled, "Pre-Active"),
        Some(state::DEACTIVATED) => deny(DenialReason::Disabled, "Deactivated"),
        Some(state::COMPROMISED) => deny(DenialReason::Disabled, "Compromised"),
        Some(state::DESTROYED) => deny(DenialReason::Destroyed, "Destroyed"),
        Some(state::DESTROYED_COMPROMISED) => {
            deny(DenialReason::Destroyed, "Destroyed Compromised")
        }
        Some(_) => deny(DenialReason::Disabled, "unknown"),
        None => deny(DenialReason::NotFound, "not reported"),
    }
}

/// The payload of a successful answer; a refusal mapped onto denial versus
/// unavailability by its Result Reason (KMIP 1.4, 9.1.3.2.29).
fn refused(key_ref: &str, operation: &str, answer: Answer) -> Result<Item, KmsError> {
    let Refusal { reason, message } = match answer {
        Ok(payload) => return Ok(payload),
        Err(refusal) => refusal,
    };
    let detail = format!("{operation}: result reason {reason:#x}: {message}");
    let denied = |why| KmsError::Denied {
        key_ref: key_ref.to_owned(),
        reason: why,
        detail: detail.clone(),
    };
    Err(match reason {
        // Item Not Found, Object Not Found.
        0x01 | 0x37 => denied(DenialReason::NotFound),
        // Permission Denied, Not Authorised, Illegal Object Type,
        // Incompatible Cryptographic Usage Mask.
        0x0C | 0x39 | 0x28 | 0x29 => denied(DenialReason::AccessDenied),
        // Object Archived, Wrong Key Lifecycle State.
        0x0D | 0x43 => denied(DenialReason::Disabled),
        // Object Destroyed.
        0x36 => denied(DenialReason::Destroyed),
        // Cryptographic Failure: the tag did not verify.
        0x0A => denied(DenialReason::InvalidCiphertext),
        _ => KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: detail.clone(),
        },
    })
}

#[async_trait::async_trait]
impl KeyProvider for KmipProvider {
    fn kind(&self) -> &'static str {
        "kmip"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        // KMIP forbids Encrypt under a non-Active key, but not every server
        // checks: confirm first, so no EDEK is minted for a revoked key.
        self.require_active(key_ref).await?;
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let aad = ctx.associated_data(AAD_LABEL)?;
        let answer = self.encrypt(key_ref, dek.expose_bytes(), &iv, &aad).await?;
        let payload = refused(key_ref, "Encrypt", answer)?;
        let missing = |what: &str| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("Encrypt answered without {what}"),
        };
        let sealed = payload.bytes(tag::DATA).ok_or_else(|| missing("data"))?;
        let auth_tag = payload
            .bytes(tag::AUTHENTICATED_ENCRYPTION_TAG)
            .filter(|t| t.len() == TAG_LEN)
            .ok_or_else(|| missing("a 16-byte authentication tag"))?;
        // A server that chose its own IV says so; otherwise ours was used.
        let used_iv = payload.bytes(tag::IV_COUNTER_NONCE).unwrap_or(&iv);
        if used_iv.len() != IV_LEN {
            return Err(missing("a 12-byte IV"));
        }
        let mut edek = Vec::with_capacity(1 + IV_LEN + TAG_LEN + sealed.len());
        edek.push(FORMAT_GCM);
        edek.extend_from_slice(used_iv);
        edek.extend_from_slice(auth_tag);
        edek.extend_from_slice(sealed);
        Ok(Edek(edek))
    }

    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        let bad = |detail: &str| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::InvalidCiphertext,
            detail: detail.to_owned(),
        };
        let (format, rest) = edek.0.split_first().ok_or_else(|| bad("empty EDEK"))?;
        if *format != FORMAT_GCM || rest.len() <= IV_LEN + TAG_LEN {
            return Err(bad("not an EDEK of the kmip provider"));
        }
        let (iv, rest) = rest.split_at(IV_LEN);
        let (auth_tag, sealed) = rest.split_at(TAG_LEN);
        // KMIP lets a Deactivated key still decrypt; the tenant's
        // revocation must stop that, so the State is checked first.
        self.require_active(key_ref).await?;
        let aad = ctx.associated_data(AAD_LABEL)?;
        let answer = self.decrypt(key_ref, sealed, iv, &aad, auth_tag).await?;
        // PyKMIP (and others) answer a failed tag check with General
        // Failure, which also means a sick server: a probe tells which.
        if matches!(&answer, Err(r) if r.reason == GENERAL_FAILURE) && self.probe(key_ref).await {
            return Err(bad("Decrypt: the authentication tag did not verify"));
        }
        let mut payload = refused(key_ref, "Decrypt", answer)?;
        let plain = match payload.value {
            Value::Structure(ref mut items) => items
                .iter_mut()
                .find(|i| i.tag == tag::DATA)
                .and_then(|i| match &mut i.value {
                    Value::Bytes(b) => Some(Zeroizing::new(std::mem::take(b))),
                    _ => None,
                }),
            _ => None,
        }
        .ok_or_else(|| bad("Decrypt answered without data"))?;
        Dek::from_bytes(plain).map_err(|_| bad("Decrypt returned a key of the wrong length"))
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.require_active(key_ref).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_keys_are_usable() {
        assert!(state_outcome("k", Some(state::ACTIVE)).is_ok());
        for (s, reason) in [
            (Some(state::PRE_ACTIVE), DenialReason::Disabled),
            (Some(state::DEACTIVATED), DenialReason::Disabled),
            (Some(state::COMPROMISED), DenialReason::Disabled),
            (Some(state::DESTROYED), DenialReason::Destroyed),
            (Some(state::DESTROYED_COMPROMISED), DenialReason::Destroyed),
            (Some(99), DenialReason::Disabled),
            (None, DenialReason::NotFound),
        ] {
            let err = state_outcome("k", s).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason), "{s:?}");
        }
    }

    #[test]
    fn result_reasons_map_to_denial_or_unavailability() {
        let refusal = |reason| {
            refused(
                "k",
                "Decrypt",
                Err(Refusal {
                    reason,
                    message: String::new(),
                }),
            )
            .unwrap_err()
        };
        for (reason, want) in [
            (0x01, DenialReason::NotFound),
            (0x0C, DenialReason::AccessDenied),
            (0x36, DenialReason::Destroyed),
            (0x43, DenialReason::Disabled),
            (0x0A, DenialReason::InvalidCiphertext),
        ] {
            assert_eq!(refusal(reason).denial_reason(), Some(want), "{reason:#x}");
        }
        for reason in [0x100, 0x2A, 0x03, 0] {
            assert!(matches!(refusal(reason), KmsError::Transient { .. }));
        }
    }
}
