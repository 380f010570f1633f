//! Blind index for searchable equality: a per-tenant HMAC key derived from a
//! DEK with HKDF-SHA256, and HMAC-SHA256 truncated to 16 bytes.

use hkdf::Hkdf;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::Dek;

/// Length of a blind index value in bytes.
pub const BLIND_INDEX_LEN: usize = 16;
const INFO_LABEL: &[u8] = b"cmk-proxy blind index v1";

/// A tenant's blind-index key (32 bytes, wiped on drop, never printed).
pub struct BlindIndexKey {
    key: Zeroizing<[u8; 32]>,
}

impl BlindIndexKey {
    /// Derives the key of `tenant_id` from `dek` with HKDF-SHA256
    /// (RFC 5869, no salt, info = `"cmk-proxy blind index v1" || tenant_id`,
    /// 32 bytes of output). The same DEK and tenant always give the same key.
    pub fn derive(dek: &Dek, tenant_id: &str) -> BlindIndexKey {
        let mut key = Zeroizing::new([0u8; 32]);
        // expand fails only for an output longer than 255 * HashLen; this
        // one is a constant 32 bytes, so the error arm cannot be taken.
        let expanded = Hkdf::<Sha256>::new(None, dek.expose_bytes())
            .expand_multi_info(&[INFO_LABEL, tenant_id.as_bytes()], key.as_mut_slice());
        debug_assert!(expanded.is_ok());
        BlindIndexKey { key }
    }
}

impl std::fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndexKey(<redacted>)")
    }
}

/// HMAC-SHA256 of the value's canonical form, truncated to 16 bytes.
pub fn blind_index(key: &BlindIndexKey, canonical_value: &[u8]) -> [u8; BLIND_INDEX_LEN] {
    let full = hmac_sha256(&key.key, &[canonical_value]);
    let mut out = [0u8; BLIND_INDEX_LEN];
    out.copy_from_slice(&full[..BLIND_INDEX_LEN]);
    out
}

/// HMAC-SHA256 with a 32-byte key. The key is zero-padded to the 64-byte
/// block exactly as HMAC itself pads short keys, which makes construction
/// infallible (no `InvalidLength` path).
fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(key);
    let mut mac = <Hmac<Sha256> as KeyInit>::new((&*block).into());
    for part in parts {
        mac.update(part);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek(byte: u8) -> Dek {
        Dek::from_bytes(Zeroizing::new(vec![byte; 32])).unwrap()
    }

    #[test]
    fn derivation_matches_the_hkdf_crate() {
        let d = dek(9);
        let key = BlindIndexKey::derive(&d, "acme");
        let mut expected = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, d.expose_bytes())
            .expand(b"cmk-proxy blind index v1acme", &mut expected)
            .unwrap();
        assert_eq!(*key.key, expected);
    }

    #[test]
    fn index_matches_a_plain_hmac_and_is_truncated() {
        let key = BlindIndexKey::derive(&dek(1), "acme");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.key.as_slice()).unwrap();
        mac.update(b"123-45-6789");
        let full = mac.finalize().into_bytes();
        assert_eq!(blind_index(&key, b"123-45-6789"), full[..16]);
    }

    #[test]
    fn index_is_deterministic_per_tenant_and_differs_across_tenants() {
        let d = dek(3);
        let acme = BlindIndexKey::derive(&d, "acme");
        let acme2 = BlindIndexKey::derive(&d, "acme");
        let globex = BlindIndexKey::derive(&d, "globex");
        assert_eq!(blind_index(&acme, b"v"), blind_index(&acme2, b"v"));
        assert_ne!(blind_index(&acme, b"v"), blind_index(&globex, b"v"));
        assert_ne!(blind_index(&acme, b"v"), blind_index(&acme, b"w"));
        let other_dek = BlindIndexKey::derive(&dek(4), "acme");
        assert_ne!(blind_index(&acme, b"v"), blind_index(&other_dek, b"v"));
    }

    /// Values written before the move to the `hkdf` crate: existing blind
    /// indexes must stay valid.
    #[test]
    fn derivation_and_index_keep_their_bytes() {
        let d = Dek::from_bytes(Zeroizing::new((0u8..32).collect())).unwrap();
        let key = BlindIndexKey::derive(&d, "acme");
        assert_eq!(
            hex::encode(*key.key),
            "a52cd388cbcc4e1e5aa80a6de523b8f317c845cb8a75a0f8d326d6e9c8ec3d87"
        );
        assert_eq!(
            hex::encode(blind_index(&key, b"123-45-6789")),
            "b0c54f0ab2ef8bc37872cd831dc06a1e"
        );
    }

    #[test]
    fn debug_is_redacted() {
        assert_eq!(
            format!("{:?}", BlindIndexKey::derive(&dek(5), "t")),
            "BlindIndexKey(<redacted>)"
        );
    }
}
