//! The data-encryption key: 32 random bytes plus the AES-256-GCM-SIV cipher
//! expanded from them once, both wiped on drop.

use aes_gcm_siv::{Aes256GcmSiv, KeyInit};
use rand::RngCore;
use zeroize::Zeroizing;

use super::CellError;

/// Length of a DEK in bytes (AES-256).
pub const DEK_LEN: usize = 32;

/// A 256-bit data-encryption key.
///
/// The raw bytes live in a [`Zeroizing`] buffer and the expanded AES key
/// schedule (built once, so sealing a small cell does not pay for key
/// expansion) is wiped on drop by the `aes` crate's `zeroize` feature.
/// Not `Clone`: share it behind an `Arc`. `Debug` never shows the bytes.
/// The material sits behind a `Box`, so moving a `Dek` moves a pointer and
/// leaves no stale copy of the key schedule behind.
pub struct Dek {
    inner: Box<DekInner>,
}

struct DekInner {
    bytes: Zeroizing<[u8; DEK_LEN]>,
    cipher: Aes256GcmSiv,
}

impl Dek {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Dek {
        let mut bytes = Zeroizing::new([0u8; DEK_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Self::from_array(bytes)
    }

    /// A key from exactly 32 bytes (an unwrapped EDEK); the input is wiped
    /// when dropped by the caller's `Zeroizing`.
    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Result<Dek, CellError> {
        if bytes.len() != DEK_LEN {
            return Err(CellError::BadKeyLength);
        }
        let mut array = Zeroizing::new([0u8; DEK_LEN]);
        array.copy_from_slice(&bytes);
        Ok(Self::from_array(array))
    }

    fn from_array(bytes: Zeroizing<[u8; DEK_LEN]>) -> Dek {
        let cipher = Aes256GcmSiv::new((&*bytes).into());
        Dek {
            inner: Box::new(DekInner { bytes, cipher }),
        }
    }

    /// The expanded cipher (built once per key).
    pub(super) fn cipher(&self) -> &Aes256GcmSiv {
        &self.inner.cipher
    }

    /// The raw key bytes. Only for wrapping by a `KeyProvider` and for key
    /// derivation; never log or persist them.
    pub fn expose_bytes(&self) -> &[u8] {
        self.inner.bytes.as_slice()
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_differ_and_have_32_bytes() {
        let a = Dek::generate();
        let b = Dek::generate();
        assert_eq!(a.expose_bytes().len(), DEK_LEN);
        assert_ne!(a.expose_bytes(), b.expose_bytes());
    }

    #[test]
    fn from_bytes_rejects_wrong_lengths() {
        for len in [0usize, 16, 31, 33, 64] {
            let err = Dek::from_bytes(Zeroizing::new(vec![7u8; len])).unwrap_err();
            assert_eq!(err, CellError::BadKeyLength);
        }
        let dek = Dek::from_bytes(Zeroizing::new(vec![7u8; 32])).unwrap();
        assert_eq!(dek.expose_bytes(), &[7u8; 32]);
    }

    #[test]
    fn debug_is_redacted() {
        let dek = Dek::from_bytes(Zeroizing::new(vec![0xAB; 32])).unwrap();
        let shown = format!("{dek:?}");
        assert_eq!(shown, "Dek(<redacted>)");
        assert!(!shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn expanded_cipher_wipes_itself() {
        fn wipes_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let dek = Dek::generate();
        // Compiles only while the `aes` crate's `zeroize` feature is on.
        wipes_on_drop(&dek.cipher_key_schedule_probe());
    }

    impl Dek {
        fn cipher_key_schedule_probe(&self) -> aes::Aes256 {
            aes::Aes256::new(self.inner.bytes.as_slice().into())
        }
    }
}
