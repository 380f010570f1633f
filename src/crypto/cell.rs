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
/// The nonce comes from the OS RNG; AES-GCM-SIV keeps a rare nonce repeat
/// from revealing more than plaintext equality. Plaintext beyond 2^36 bytes
/// (impossible for a PostgreSQL value) yields an empty vector, which every
/// reader rejects as [`CellError::Truncated`]: never plaintext, never a panic.
pub fn seal(dek: &Dek, dek_id: Uuid, aad: &CellAad<'_>, plaintext: &[u8]) -> Vec<u8> {
    if plaintext.len() > MAX_PLAINTEXT {
        tracing::error!(len = plaintext.len(), "plaintext too large to encrypt");
        return Vec::new();
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let id = dek_id.as_bytes();
    let mut cell = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
    cell.extend_from_slice(MAGIC);
    cell.push(ENVELOPE_VERSION);
    cell.extend_from_slice(id);
    cell.extend_from_slice(&nonce);
    cell.extend_from_slice(plaintext);
    let aad_bytes = aad.encode(id);
    match dek.cipher.encrypt_in_place_detached(
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
    dek.cipher
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
