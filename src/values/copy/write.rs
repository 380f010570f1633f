//! Rows → COPY data: the upstream text format the proxy sends PostgreSQL,
//! and the client's text or CSV format, as `copyto.c` prints them.

use super::{CopyFormat, CopyOptions};

/// Appends one field in PostgreSQL's default text format (tab-separated,
/// `\N` for NULL): the form the proxy sends upstream.
pub fn write_upstream_field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(value) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    let mut start = 0;
    for (i, &c) in value.iter().enumerate() {
        let escaped = match c {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.push(b'\\');
        out.push(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// Appends `bytes` as a bytea field in the upstream text format (`\\x…`).
pub fn write_upstream_bytea(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(b"\\\\x");
    let at = out.len();
    out.resize(at + bytes.len() * 2, 0);
    // The slice is exactly twice the input: encoding cannot fail.
    let _ = faster_hex::hex_encode(bytes, &mut out[at..]);
}

/// Appends one row in the client's format, with its end of line.
pub fn write_client_row(out: &mut Vec<u8>, options: &CopyOptions, values: &[Option<&[u8]>]) {
    let single = values.len() == 1;
    for (index, value) in values.iter().enumerate() {
        if index > 0 {
            out.push(options.delimiter);
        }
        match value {
            None => out.extend_from_slice(&options.null),
            Some(value) => match options.format {
                CopyFormat::Text => text_field(out, options.delimiter, value),
                CopyFormat::Csv => {
                    let forced =
                        options.force_quote_all || options.force_quote.get(index) == Some(&true);
                    csv_field(out, options, value, forced, single)
                }
            },
        }
    }
    out.push(b'\n');
}

/// `CopyAttributeOutText`.
fn text_field(out: &mut Vec<u8>, delimiter: u8, value: &[u8]) {
    let mut start = 0;
    for (i, &c) in value.iter().enumerate() {
        let escaped = match c {
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x0b => b'v',
            b'\\' => b'\\',
            c if c == delimiter => c,
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.push(b'\\');
        out.push(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// `CopyAttributeOutCSV`.
fn csv_field(out: &mut Vec<u8>, options: &CopyOptions, value: &[u8], forced: bool, single: bool) {
    let CopyOptions {
        delimiter,
        quote,
        escape,
        ..
    } = *options;
    let quoted = forced
        || value == &options.null[..]
        || (single && value == b"\\.")
        || value
            .iter()
            .any(|c| *c == delimiter || *c == quote || *c == b'\n' || *c == b'\r');
    if !quoted {
        out.extend_from_slice(value);
        return;
    }
    out.push(quote);
    for &c in value {
        if c == quote || c == escape {
            out.push(escape);
        }
        out.push(c);
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_rows_are_printed_as_postgresql_prints_them() {
        let text = CopyOptions::defaults(CopyFormat::Text, 3);
        let mut out = Vec::new();
        write_client_row(
            &mut out,
            &text,
            &[Some(b"a\tb\\c\n"), None, Some(b"\x08\x0b|")],
        );
        assert_eq!(out, b"a\\tb\\\\c\\n\t\\N\t\\b\\v|\n");
        let mut csv = CopyOptions::defaults(CopyFormat::Csv, 3);
        out.clear();
        write_client_row(&mut out, &csv, &[Some(b"a,\"b\""), None, Some(b"")]);
        assert_eq!(out, b"\"a,\"\"b\"\"\",,\"\"\n");
        csv.force_quote = vec![true, false, false];
        out.clear();
        write_client_row(
            &mut out,
            &csv,
            &[Some(b"x"), Some(b"multi\nline"), Some(b"\\.")],
        );
        assert_eq!(out, b"\"x\",\"multi\nline\",\\.\n");
        out.clear();
        let one = CopyOptions::defaults(CopyFormat::Csv, 1);
        write_client_row(&mut out, &one, &[Some(b"\\.")]);
        assert_eq!(out, b"\"\\.\"\n");
    }

    #[test]
    fn upstream_fields_use_the_default_text_format() {
        let mut out = Vec::new();
        write_upstream_field(&mut out, Some(b"a\tb\\\r\n"));
        out.push(b'\t');
        write_upstream_field(&mut out, None);
        out.push(b'\t');
        write_upstream_bytea(&mut out, &[0xde, 0xad]);
        assert_eq!(out, b"a\\tb\\\\\\r\\n\t\\N\t\\\\xdead");
    }
}
