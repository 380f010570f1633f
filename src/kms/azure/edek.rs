//! The Azure provider's EDEK: Key Vault's `wrapkey` takes no associated
//! data, so a fresh 32-byte key-encryption key (KEK) is wrapped by Key Vault
//! and the DEK is sealed under it with AES-256-GCM-SIV, whose AAD is the
//! tenant id and DEK id (`KeyContext::associated_data`) followed by this
//! header (so the kid, algorithm and wrapped KEK cannot be swapped).
//!
//! Layout: `"CMKZ"`, format 1, algorithm (1 RSA-OAEP-256, 2 A256KW),
//! kid length (u16 BE), kid (`https://…/keys/NAME/VERSION`), wrapped KEK
//! length (u16 BE), wrapped KEK, 12-byte nonce, sealed DEK (32 + 16 tag).

use aes_gcm_siv::aead::AeadInPlace;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit, Nonce, Tag};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::crypto::{Dek, DEK_LEN};

const MAGIC: &[u8; 4] = b"CMKZ";
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Longest kid and wrapped KEK accepted (RSA 4096 wraps to 512 bytes).
const MAX_FIELD: usize = 2048;
/// Separates this provider's AAD from any other use of the same context.
pub const AAD_LABEL: &[u8] = b"cmk-proxy/azure-key-vault/v1";
/// Length of the key-encryption key Key Vault wraps.
pub const KEK_LEN: usize = 32;

/// Key Vault's wrap algorithm for a key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapAlgorithm {
    /// RSA keys (`RSA`, `RSA-HSM`).
    RsaOaep256,
    /// AES keys of Managed HSM (`oct`, `oct-HSM`).
    A256Kw,
}

impl WrapAlgorithm {
    /// The algorithm for a key's `kty`, if it can wrap.
    pub fn for_key_type(kty: &str) -> Option<WrapAlgorithm> {
        match kty {
            "RSA" | "RSA-HSM" => Some(Self::RsaOaep256),
            "oct" | "oct-HSM" => Some(Self::A256Kw),
            _ => None,
        }
    }

    /// The JWA name Key Vault expects in `alg`.
    pub fn name(self) -> &'static str {
        match self {
            Self::RsaOaep256 => "RSA-OAEP-256",
            Self::A256Kw => "A256KW",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::RsaOaep256 => 1,
            Self::A256Kw => 2,
        }
    }

    fn from_code(code: u8) -> Option<WrapAlgorithm> {
        match code {
            1 => Some(Self::RsaOaep256),
            2 => Some(Self::A256Kw),
            _ => None,
        }
    }
}

/// A parsed EDEK.
#[derive(Debug)]
pub struct AzureEdek<'a> {
    /// Algorithm the KEK was wrapped with.
    pub alg: WrapAlgorithm,
    /// The versioned key id that wrapped the KEK.
    pub kid: &'a str,
    /// The KEK as Key Vault wrapped it.
    pub wrapped_kek: &'a [u8],
    header: &'a [u8],
    nonce: &'a [u8],
    sealed: &'a [u8],
}

/// Why an EDEK does not open (no detail about the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], Malformed> {
    if bytes.len() < n {
        return Err(Malformed);
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_field<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    let len = take(bytes, 2)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len == 0 || len > MAX_FIELD {
        return Err(Malformed);
    }
    take(bytes, len)
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) -> Result<(), Malformed> {
    let len = u16::try_from(field.len()).map_err(|_| Malformed)?;
    if field.is_empty() || field.len() > MAX_FIELD {
        return Err(Malformed);
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
    Ok(())
}

fn aad(context: &[u8], header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(context.len() + header.len());
    aad.extend_from_slice(context);
    aad.extend_from_slice(header);
    aad
}

/// A fresh random KEK.
pub fn new_kek() -> Zeroizing<[u8; KEK_LEN]> {
    let mut kek = Zeroizing::new([0u8; KEK_LEN]);
    rand::rngs::OsRng.fill_bytes(kek.as_mut());
    kek
}

/// Builds the EDEK: seals `dek` under `kek`, bound to `context` (the
/// tenant's associated data) and to the header.
pub fn seal(
    alg: WrapAlgorithm,
    kid: &str,
    wrapped_kek: &[u8],
    kek: &[u8; KEK_LEN],
    context: &[u8],
    dek: &Dek,
) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::with_capacity(16 + kid.len() + wrapped_kek.len() + DEK_LEN + 28);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.push(alg.code());
    push_field(&mut out, kid.as_bytes())?;
    push_field(&mut out, wrapped_kek)?;
    let aad = aad(context, &out);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut sealed = Zeroizing::new(dek.expose_bytes().to_vec());
    let tag = Aes256GcmSiv::new(kek.into())
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut sealed)
        .map_err(|_| Malformed)?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out.extend_from_slice(&tag);
    Ok(out)
}

impl<'a> AzureEdek<'a> {
    /// Splits an EDEK into its parts; any other shape is `Malformed`.
    pub fn parse(bytes: &'a [u8]) -> Result<AzureEdek<'a>, Malformed> {
        let all = bytes;
        let mut rest = bytes;
        if take(&mut rest, MAGIC.len())? != MAGIC || take(&mut rest, 1)? != [FORMAT] {
            return Err(Malformed);
        }
        let alg = WrapAlgorithm::from_code(take(&mut rest, 1)?[0]).ok_or(Malformed)?;
        let kid = std::str::from_utf8(take_field(&mut rest)?).map_err(|_| Malformed)?;
        let wrapped_kek = take_field(&mut rest)?;
        let header = &all[..all.len() - rest.len()];
        let nonce = take(&mut rest, NONCE_LEN)?;
        if rest.len() != DEK_LEN + TAG_LEN {
            return Err(Malformed);
        }
        Ok(AzureEdek {
            alg,
            kid,
            wrapped_kek,
            header,
            nonce,
            sealed: rest,
        })
    }

    /// Opens the DEK with the unwrapped `kek`; fails if anything was
    /// changed or `context` differs from the one sealed under.
    pub fn open(&self, kek: &[u8], context: &[u8]) -> Result<Dek, Malformed> {
        let kek: &[u8; KEK_LEN] = kek.try_into().map_err(|_| Malformed)?;
        let (body, tag) = self.sealed.split_at(DEK_LEN);
        let mut plain = Zeroizing::new(body.to_vec());
        Aes256GcmSiv::new(kek.into())
            .decrypt_in_place_detached(
                Nonce::from_slice(self.nonce),
                &aad(context, self.header),
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| Malformed)?;
        Dek::from_bytes(plain).map_err(|_| Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KID: &str = "https://acme.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef";

    #[test]
    fn seals_and_opens_bound_to_context_and_header() {
        let dek = Dek::generate();
        let kek = new_kek();
        let edek = seal(WrapAlgorithm::A256Kw, KID, &[7; 40], &kek, b"ctx", &dek).unwrap();
        let parsed = AzureEdek::parse(&edek).unwrap();
        assert_eq!(parsed.kid, KID);
        assert_eq!(parsed.alg, WrapAlgorithm::A256Kw);
        assert_eq!(parsed.wrapped_kek, &[7; 40]);
        assert_eq!(
            parsed.open(kek.as_ref(), b"ctx").unwrap().expose_bytes(),
            dek.expose_bytes()
        );
        assert!(parsed.open(kek.as_ref(), b"other").is_err());
        assert!(parsed.open(new_kek().as_ref(), b"ctx").is_err());
        assert!(parsed.open(&kek[..16], b"ctx").is_err());
        for at in 0..edek.len() {
            let mut bad = edek.clone();
            bad[at] ^= 1;
            let opened = AzureEdek::parse(&bad).and_then(|p| p.open(kek.as_ref(), b"ctx"));
            assert!(opened.is_err(), "flip at {at}");
        }
    }

    #[test]
    fn truncated_or_padded_edeks_are_malformed() {
        let edek = seal(
            WrapAlgorithm::RsaOaep256,
            KID,
            &[1; 384],
            &new_kek(),
            b"c",
            &Dek::generate(),
        )
        .unwrap();
        for len in 0..edek.len() {
            assert!(AzureEdek::parse(&edek[..len]).is_err(), "{len}");
        }
        let mut longer = edek.clone();
        longer.push(0);
        assert!(AzureEdek::parse(&longer).is_err());
        assert!(AzureEdek::parse(b"vault:v1:abc").is_err());
    }

    #[test]
    fn key_types_map_to_wrap_algorithms() {
        assert_eq!(
            WrapAlgorithm::for_key_type("RSA-HSM").map(WrapAlgorithm::name),
            Some("RSA-OAEP-256")
        );
        assert_eq!(
            WrapAlgorithm::for_key_type("oct-HSM").map(WrapAlgorithm::name),
            Some("A256KW")
        );
        assert_eq!(WrapAlgorithm::for_key_type("EC"), None);
    }
}
