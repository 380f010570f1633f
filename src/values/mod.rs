//! Plaintext values of the declared column types: their canonical text form
//! (what is encrypted, so text and binary clients read the same value and a
//! blind index sees one spelling per value) and their binary wire format
//! (for clients that bind parameters or read results in binary).
//! Knows PostgreSQL type formats; knows nothing of keys, SQL or sockets.

mod array;
mod binary;
mod canonical;
pub mod copy;
mod jsonb;

pub use array::{bytea_array_text, parse_binary_array, parse_text_array, quoted_array_text};
pub use binary::{from_binary, to_binary};
pub use canonical::{canonical_text, parse_bytea};

/// A value that is not valid for its declared type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input for type {ty}: {reason}")]
pub struct ValueError {
    /// SQL name of the declared type.
    pub ty: &'static str,
    /// What is wrong (never the value itself: it may be secret).
    pub reason: &'static str,
}

pub(crate) fn invalid(ty: crate::config::DeclaredType, reason: &'static str) -> ValueError {
    ValueError {
        ty: ty.sql_name(),
        reason,
    }
}
