//! The COPY data formats, text and CSV, as PostgreSQL reads and prints
//! them (`copyfromparse.c`, `copyto.c`): the options, a reader that splits
//! client data into rows and fields however it is cut into messages, and
//! the writers of a row in either format. Knows bytes and COPY options;
//! knows nothing of SQL, keys or sockets.

mod read;
mod write;

pub use read::{CopyField, RowReader};
pub use write::{write_client_row, write_upstream_bytea, write_upstream_field};

/// Text or CSV (binary is refused before any data flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// PostgreSQL's text format (backslash escapes).
    Text,
    /// Comma-separated values.
    Csv,
}

/// The format options of one COPY, defaults filled in as PostgreSQL does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Text or CSV.
    pub format: CopyFormat,
    /// Field separator (one byte).
    pub delimiter: u8,
    /// The string that stands for NULL.
    pub null: Vec<u8>,
    /// The first line is a header (skipped on input, written on output).
    pub header: bool,
    /// CSV quote character.
    pub quote: u8,
    /// CSV escape character (defaults to the quote).
    pub escape: u8,
    /// Per field: always quoted on output (CSV FORCE_QUOTE).
    pub force_quote: Vec<bool>,
    /// Every field is quoted on output (CSV `FORCE_QUOTE *`).
    pub force_quote_all: bool,
    /// Per field: an unquoted NULL string is a value (CSV FORCE_NOT_NULL).
    pub force_not_null: Vec<bool>,
    /// Per field: a quoted NULL string is NULL too (CSV FORCE_NULL).
    pub force_null: Vec<bool>,
}

impl CopyOptions {
    /// PostgreSQL's defaults for `format` with `fields` fields.
    pub fn defaults(format: CopyFormat, fields: usize) -> Self {
        let (delimiter, null): (u8, &[u8]) = match format {
            CopyFormat::Text => (b'\t', b"\\N"),
            CopyFormat::Csv => (b',', b""),
        };
        Self {
            format,
            delimiter,
            null: null.to_vec(),
            header: false,
            quote: b'"',
            escape: b'"',
            force_quote: vec![false; fields],
            force_quote_all: false,
            force_not_null: vec![false; fields],
            force_null: vec![false; fields],
        }
    }

    /// The checks PostgreSQL makes of the options (`ProcessCopyOptions`):
    /// the proxy sends its own options upstream, so it must make them.
    pub fn validate(&self) -> Result<(), CopyError> {
        let bad = |message: &str| Err(CopyError::new("22023", message.to_owned()));
        let csv = self.format == CopyFormat::Csv;
        if matches!(self.delimiter, b'\n' | b'\r') {
            return bad("COPY delimiter cannot be newline or carriage return");
        }
        if self.null.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return bad("COPY null representation cannot use newline or carriage return");
        }
        if !csv
            && (self.delimiter == b'\\'
                || self.delimiter.is_ascii_alphanumeric()
                || self.delimiter == b'.')
        {
            return Err(CopyError::new(
                "22023",
                format!("COPY delimiter cannot be \"{}\"", self.delimiter as char),
            ));
        }
        if csv && self.delimiter == self.quote {
            return bad("COPY delimiter and quote must be different");
        }
        if self.null.contains(&self.delimiter) {
            return bad("COPY delimiter character must not appear in the NULL specification");
        }
        if csv && self.null.contains(&self.quote) {
            return bad("CSV quote character must not appear in the NULL specification");
        }
        Ok(())
    }
}

/// A COPY input that PostgreSQL would refuse, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CopyError {
    /// SQLSTATE (22P04 bad_copy_file_format, 22023, 22021 …).
    pub sqlstate: &'static str,
    /// Message (never a value: it may be secret).
    pub message: String,
}

impl CopyError {
    pub(crate) fn new(sqlstate: &'static str, message: String) -> Self {
        Self { sqlstate, message }
    }

    pub(crate) fn format(message: &str) -> Self {
        Self::new("22P04", message.to_owned())
    }
}
