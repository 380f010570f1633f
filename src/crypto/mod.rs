//! Cell envelope, AES-256-GCM-SIV, blind index and zeroizing key types (DESIGN section 3).
//! Owns the bytes of a cell and the key material that seals it; knows nothing
//! about SQL, sockets or where keys come from (that is `kms` and `keys`).

mod blind;
mod cell;
mod dek;

pub use blind::{blind_index, BlindIndexKey, BLIND_INDEX_LEN};
pub use cell::{
    is_envelope, open, peek_dek_id, seal, CellAad, CellError, ENVELOPE_OVERHEAD, ENVELOPE_VERSION,
    HEADER_LEN, MAGIC,
};
pub use dek::{Dek, DEK_LEN};
