//! The cell envelope: `"CMK" | version | dek_id | nonce | ciphertext+tag`,
//! sealed with AES-256-GCM-SIV under AAD that binds tenant, table and column.

use aes_gcm_siv::aead::AeadInPlace;
use aes_gcm_siv::{Nonce, Tag};
use rand::RngCore;
use uuid::Uuid;

use super::Dek;

/// First bytes of every envelope.
pub const MAGIC: &[u8; 3] = b"CMK";
/// The only envelope version this build reads and writes.
pub const ENVELOPE_VERSION: u8 = 1;
const DEK_ID_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes before the ciphertext: magic, version, dek_id, nonce.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + DEK_ID_LEN + NONCE_LEN;
/// Bytes an envelope adds to the plaintext (header + tag).
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Longest plaintext a cell may hold. PostgreSQL caps a field at 1 GiB,
/// far below RFC 8452's 2^36-byte limit.
const MAX_PLAINTEXT: usize = 1 << 36;

/// Why a cell could not be read. Carries no key or cell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// The value starts like an envelope but is too short to be one.
    #[error("encrypted cell is truncated")]
    Truncated,
    /// The value has no `CMK` header (legacy plaintext or foreign bytes).
    #[error("value is not an encrypted cell (no CMK header)")]
    NotAnEnvelope,
    /// The header names an envelope version this build does not know.
    #[error("encrypted cell has unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// Authentication failed: tampered bytes, wrong key, or a cell moved to
    /// another tenant, table or column.
    #[error("encrypted cell failed its integrity check (tampered, wrong key, or moved to another tenant/table/column)")]
    Integrity,
    /// Key material of the wrong length.
    #[error("data key has the wrong length (expected 32 bytes)")]
    BadKeyLength,
}

/// Where a cell lives: bound into its AAD so it cannot be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellAad<'a> {
    /// Tenant that owns the row.
    pub tenant_id: &'a str,
    /// Table as `schema.table`.
    pub table: &'a str,
    /// Column name.
    pub column: &'a str,
}

impl CellAad<'_> {
    /// `version | dek_id | len|tenant | len|table | len|column`; each
    /// variable field is prefixed with its u32 big-endian length so field
    /// boundaries cannot be shifted (`("ab","c")` ≠ `("a","bc")`).
    fn encode(&self, dek_id: &[u8]) -> Vec<u8> {
        let fields = [self.tenant_id, self.table, self.column];
        let len = 1 + dek_id.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(dek_id);
        for field in fields {
            // Names longer than 4 GiB cannot exist (identifiers are ≤ 63 bytes).
            let n = u32::try_from(field.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

/// Encrypts `plaintext` into a self-describing envelope under `dek`.
///
/// The nonce comes from the OS RNG (read 256 nonces at a time per thread);
/// AES-GCM-SIV keeps a rare nonce repeat
/// from revealing more than plaintext equality. Plaintext beyond 2^36 bytes
/// (impossible for a PostgreSQL value) yields an empty vector, which every
/// reader rejects as [`CellError::Truncated`]: never plaintext, never a panic.
pub fn seal(dek: &Dek, dek_id: Uuid, aad: &CellAad<'_>, plaintext: &[u8]) -> Vec<u8> {
    if plaintext.len() > MAX_PLAINTEXT {
        tracing::error!(len = plaintext.len(), "plaintext too large to encrypt");
        return Vec::new();
    }
    let nonce = next_nonce();
    let id = dek_id.as_bytes();
    let mut cell = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
    cell.extend_from_slice(MAGIC);
    cell.push(ENVELOPE_VERSION);
    cell.extend_from_slice(id);
    cell.extend_from_slice(&nonce);
    cell.extend_from_slice(plaintext);
    let aad_bytes = aad.encode(id);
    match dek.cipher().encrypt_in_place_detached(
        Nonce::from_slice(&nonce),
        &aad_bytes,
        &mut cell[HEADER_LEN..],
    ) {
        Ok(tag) => {
            cell.extend_from_slice(&tag);
            cell
        }
        Err(_) => {
            // Unreachable given the length check above; wipe the plaintext
            // copy and return an unreadable cell rather than panic.
            zeroize::Zeroize::zeroize(&mut cell);
            tracing::error!("cell encryption failed");
            Vec::new()
        }
    }
}

/// Nonces per refill of a thread's pool: one `getrandom` call per 256 cells
/// instead of one per cell (the syscall was a third of sealing a 64 B cell).
const NONCES_PER_REFILL: usize = 256;

/// A thread's buffer of OS randomness, consumed 12 bytes at a time. Nonces
/// are public (they are stored in the cell), so buffering them exposes
/// nothing; each is used once and the buffer is refilled from the OS RNG.
struct NoncePool {
    bytes: [u8; NONCE_LEN * NONCES_PER_REFILL],
    next: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool {
            bytes: [0u8; NONCE_LEN * NONCES_PER_REFILL],
            next: NONCES_PER_REFILL,
        })
    };
}

/// A fresh 96-bit nonce from the operating system's RNG (buffered per thread).
fn next_nonce() -> [u8; NONCE_LEN] {
    NONCES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next == NONCES_PER_REFILL {
            rand::rngs::OsRng.fill_bytes(&mut pool.bytes);
            pool.next = 0;
        }
        let at = pool.next * NONCE_LEN;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[at..at + NONCE_LEN]);
        // Never hand out the same bytes twice.
        pool.bytes[at..at + NONCE_LEN].fill(0);
        pool.next += 1;
        nonce
    })
}

/// Decrypts an envelope sealed for the same tenant, table and column.
pub fn open(dek: &Dek, aad: &CellAad<'_>, cell: &[u8]) -> Result<Vec<u8>, CellError> {
    check_header(cell)?;
    if cell.len() < ENVELOPE_OVERHEAD {
        return Err(CellError::Truncated);
    }
    let id = &cell[MAGIC.len() + 1..MAGIC.len() + 1 + DEK_ID_LEN];
    let nonce = Nonce::from_slice(&cell[MAGIC.len() + 1 + DEK_ID_LEN..HEADER_LEN]);
    let (body, tag) = cell[HEADER_LEN..].split_at(cell.len() - HEADER_LEN - TAG_LEN);
    let mut plaintext = body.to_vec();
    let aad_bytes = aad.encode(id);
    dek.cipher()
        .decrypt_in_place_detached(nonce, &aad_bytes, &mut plaintext, Tag::from_slice(tag))
        .map_err(|_| CellError::Integrity)?;
    Ok(plaintext)
}

/// The `dek_id` named by a cell's header, without any key.
pub fn peek_dek_id(cell: &[u8]) -> Result<Uuid, CellError> {
    check_header(cell)?;
    let start = MAGIC.len() + 1;
    let id: [u8; DEK_ID_LEN] = cell
        .get(start..start + DEK_ID_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(CellError::Truncated)?;
    Ok(Uuid::from_bytes(id))
}

/// True when `bytes` starts with `CMK` and a known envelope version.
pub fn is_envelope(bytes: &[u8]) -> bool {
    bytes.len() > MAGIC.len() && bytes.starts_with(MAGIC) && bytes[MAGIC.len()] == ENVELOPE_VERSION
}

/// Checks magic and version; a non-empty prefix of the magic is a truncated
/// envelope, anything else without the magic is not an envelope.
fn check_header(cell: &[u8]) -> Result<(), CellError> {
    if cell.len() <= MAGIC.len() {
        return if !cell.is_empty() && MAGIC.starts_with(cell) {
            Err(CellError::Truncated)
        } else {
            Err(CellError::NotAnEnvelope)
        };
    }
    if !cell.starts_with(MAGIC) {
        return Err(CellError::NotAnEnvelope);
    }
    match cell[MAGIC.len()] {
        ENVELOPE_VERSION => Ok(()),
        other => Err(CellError::UnsupportedVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    const AAD: CellAad<'static> = CellAad {
        tenant_id: "acme",
        table: "public.patients",
        column: "ssn",
    };

    fn dek() -> Dek {
        Dek::generate()
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 8452 Appendix C.2 (AEAD_AES_256_GCM_SIV): key, nonce, AAD,
    /// plaintext, ciphertext || tag — run through the cipher a `Dek` builds.
    const RFC8452_C2: &[[&str; 5]] = &[
        [
            "0100000000000000000000000000000000000000000000000000000000000000",
            "030000000000000000000000",
            "",
            "",
            "07f5f4169bbf55a8400cd47ea6fd400f",
        ],
        [
            "0100000000000000000000000000000000000000000000000000000000000000",
            "030000000000000000000000",
            "",
            "0100000000000000",
            "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28",
        ],
        [
            "0100000000000000000000000000000000000000000000000000000000000000",
            "030000000000000000000000",
            "01",
            "0200000000000000",
            "1de22967237a813291213f267e3b452f02d01ae33e4ec854",
        ],
        [
            "e66021d5eb8e4f4066d4adb9c33560e4f46e44bb3da0015c94f7088736864200",
            "e0eaf5284d884a0e77d31646",
            "",
            "",
            "169fbb2fbf389a995f6390af22228a62",
        ],
        [
            "bae8e37fc83441b16034566b7a806c46bb91c3c5aedb64a6c590bc84d1a5e269",
            "e4b47801afc0577e34699b9e",
            "4fbdc66f14",
            "671fdd",
            "0eaccb93da9bb81333aee0c785b240d319719d",
        ],
        [
            "9745b3d1ae06556fb6aa7890bebc18fe6b3db4da3d57aa94842b9803a96e07fb",
            "6de71860f762ebfbd08284e4",
            "f37de21c7ff901cfe8a69615a93fdf7a98cad481796245709f",
            "21702de0de18baa9c9596291b08466",
            "793576dfa5c0f88729a7ed3c2f1bffb3080d28f6ebb5d3648ce97bd5ba67fd",
        ],
        [
            "3c535de192eaed3822a2fbbe2ca9dfc88255e14a661b8aa82cc54236093bbc23",
            "688089e55540db1872504e1c",
            "734320ccc9d9bbbb19cb81b2af4ecbc3e72834321f7aa0f70b7282b4f33df23f167541",
            "ced532ce4159b035277d4dfbb7db62968b13cd4eec",
            "626660c26ea6612fb17ad91e8e767639edd6c9faee9d6c7029675b89eaf4ba1ded1a286594",
        ],
    ];

    #[test]
    fn rfc8452_aes256_gcm_siv_known_answers() {
        for [key, nonce, aad, pt, expected] in RFC8452_C2 {
            let dek = Dek::from_bytes(Zeroizing::new(unhex(key))).unwrap();
            let mut buf = unhex(pt);
            let tag = dek
                .cipher()
                .encrypt_in_place_detached(Nonce::from_slice(&unhex(nonce)), &unhex(aad), &mut buf)
                .unwrap();
            buf.extend_from_slice(&tag);
            assert_eq!(hex::encode(&buf), *expected, "key {key}");
            let (ct, tag) = buf.split_at(buf.len() - TAG_LEN);
            let mut back = ct.to_vec();
            dek.cipher()
                .decrypt_in_place_detached(
                    Nonce::from_slice(&unhex(nonce)),
                    &unhex(aad),
                    &mut back,
                    Tag::from_slice(tag),
                )
                .unwrap();
            assert_eq!(hex::encode(back), *pt);
        }
    }

    #[test]
    fn envelope_layout_matches_the_design() {
        let dek = dek();
        let id = Uuid::new_v4();
        let cell = seal(&dek, id, &AAD, b"123-45-6789");
        assert_eq!(&cell[..3], b"CMK");
        assert_eq!(cell[3], 1);
        assert_eq!(&cell[4..20], id.as_bytes());
        assert_eq!(cell.len(), HEADER_LEN + 11 + TAG_LEN);
        assert!(is_envelope(&cell));
        assert_eq!(peek_dek_id(&cell).unwrap(), id);
        assert_eq!(open(&dek, &AAD, &cell).unwrap(), b"123-45-6789");
    }

    #[test]
    fn same_plaintext_seals_to_different_cells() {
        let dek = dek();
        let id = Uuid::new_v4();
        let a = seal(&dek, id, &AAD, b"same");
        let b = seal(&dek, id, &AAD, b"same");
        assert_ne!(a, b);
        assert_ne!(a[20..32], b[20..32], "fresh nonce per cell");
    }

    #[test]
    fn nonces_do_not_repeat_across_pool_refills() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..NONCES_PER_REFILL * 3 + 7 {
            assert!(seen.insert(next_nonce()));
        }
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let dek = dek();
        let cell = seal(&dek, Uuid::new_v4(), &AAD, b"");
        assert_eq!(cell.len(), ENVELOPE_OVERHEAD);
        assert_eq!(open(&dek, &AAD, &cell).unwrap(), b"");
    }

    #[test]
    fn every_single_byte_flip_fails() {
        let dek = dek();
        let cell = seal(&dek, Uuid::new_v4(), &AAD, b"a secret value of some length");
        for i in 0..cell.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = cell.clone();
                bad[i] ^= mask;
                let err = open(&dek, &AAD, &bad).unwrap_err();
                match i {
                    0..=2 => assert_eq!(err, CellError::NotAnEnvelope, "byte {i}"),
                    3 => assert_eq!(err, CellError::UnsupportedVersion(1 ^ mask), "byte {i}"),
                    _ => assert_eq!(err, CellError::Integrity, "byte {i} mask {mask:#x}"),
                }
            }
        }
    }

    #[test]
    fn moved_cells_fail_with_integrity() {
        let dek = dek();
        let id = Uuid::new_v4();
        let cell = seal(&dek, id, &AAD, b"v");
        let elsewhere = [
            CellAad {
                column: "notes",
                ..AAD
            },
            CellAad {
                table: "public.other",
                ..AAD
            },
            CellAad {
                table: "other.patients",
                ..AAD
            },
            CellAad {
                tenant_id: "globex",
                ..AAD
            },
            CellAad {
                tenant_id: "",
                ..AAD
            },
        ];
        for aad in elsewhere {
            assert_eq!(
                open(&dek, &aad, &cell).unwrap_err(),
                CellError::Integrity,
                "{aad:?}"
            );
        }
        // Field boundaries cannot be shifted between tenant, table and column.
        let ab_c = CellAad {
            tenant_id: "ab",
            table: "c",
            column: "x",
        };
        let a_bc = CellAad {
            tenant_id: "a",
            table: "bc",
            column: "x",
        };
        let cell = seal(&dek, id, &ab_c, b"v");
        assert_eq!(open(&dek, &a_bc, &cell).unwrap_err(), CellError::Integrity);
    }

    #[test]
    fn dek_id_is_authenticated() {
        let dek = dek();
        let mut cell = seal(&dek, Uuid::new_v4(), &AAD, b"v");
        cell[4..20].copy_from_slice(Uuid::new_v4().as_bytes());
        assert_eq!(open(&dek, &AAD, &cell).unwrap_err(), CellError::Integrity);
    }

    #[test]
    fn another_key_fails_with_integrity() {
        let cell = seal(&dek(), Uuid::new_v4(), &AAD, b"v");
        assert_eq!(open(&dek(), &AAD, &cell).unwrap_err(), CellError::Integrity);
    }

    #[test]
    fn truncated_cells_are_reported_as_truncated() {
        let dek = dek();
        let cell = seal(&dek, Uuid::new_v4(), &AAD, b"0123456789");
        assert_eq!(open(&dek, &AAD, &[]).unwrap_err(), CellError::NotAnEnvelope);
        for len in 1..ENVELOPE_OVERHEAD {
            assert_eq!(
                open(&dek, &AAD, &cell[..len]).unwrap_err(),
                CellError::Truncated,
                "{len}"
            );
        }
        for len in ENVELOPE_OVERHEAD..cell.len() {
            assert_eq!(
                open(&dek, &AAD, &cell[..len]).unwrap_err(),
                CellError::Integrity,
                "{len}"
            );
        }
        for len in 1..HEADER_LEN - NONCE_LEN {
            assert_eq!(
                peek_dek_id(&cell[..len]).unwrap_err(),
                CellError::Truncated,
                "{len}"
            );
        }
    }

    #[test]
    fn foreign_versions_and_plain_bytes_are_named() {
        let dek = dek();
        let mut cell = seal(&dek, Uuid::new_v4(), &AAD, b"v");
        cell[3] = 2;
        assert!(!is_envelope(&cell));
        assert_eq!(
            open(&dek, &AAD, &cell).unwrap_err(),
            CellError::UnsupportedVersion(2)
        );
        assert_eq!(
            peek_dek_id(&cell).unwrap_err(),
            CellError::UnsupportedVersion(2)
        );
        assert_eq!(
            CellError::UnsupportedVersion(2).to_string(),
            "encrypted cell has unsupported envelope version 2"
        );
        for plain in [
            &b"hello world, plain legacy text"[..],
            b"CM",
            b"",
            b"cmk\x01",
        ] {
            assert!(!is_envelope(plain));
        }
        assert_eq!(
            open(&dek, &AAD, b"hello world").unwrap_err(),
            CellError::NotAnEnvelope
        );
        assert_eq!(
            peek_dek_id(b"hello world").unwrap_err(),
            CellError::NotAnEnvelope
        );
    }

    proptest! {
        #[test]
        fn seal_then_open_round_trips(
            plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
            tenant in ".{0,40}",
            table in "[a-z_.]{1,40}",
            column in "[a-z_]{1,40}",
        ) {
            let dek = Dek::generate();
            let id = Uuid::new_v4();
            let aad = CellAad { tenant_id: &tenant, table: &table, column: &column };
            let cell = seal(&dek, id, &aad, &plaintext);
            prop_assert!(is_envelope(&cell));
            prop_assert_eq!(peek_dek_id(&cell).unwrap(), id);
            prop_assert_eq!(cell.len(), plaintext.len() + ENVELOPE_OVERHEAD);
            prop_assert_eq!(open(&dek, &aad, &cell).unwrap(), plaintext);
        }
    }
}
