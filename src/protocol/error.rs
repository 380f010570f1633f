//! ErrorResponse messages built by the proxy itself.

use bytes::{BufMut, BytesMut};

/// An ErrorResponse (or FATAL) the proxy sends to a client.
#[derive(Debug, Clone)]
pub struct ErrorResponse<'a> {
    /// `ERROR` or `FATAL`.
    pub severity: &'a str,
    /// Five-character SQLSTATE.
    pub code: &'a str,
    /// Primary message.
    pub message: &'a str,
    /// Optional detail line.
    pub detail: Option<&'a str>,
    /// Optional hint line.
    pub hint: Option<&'a str>,
    /// Optional context (`CONTEXT: COPY t, line 3`).
    pub context: Option<&'a str>,
}

impl<'a> ErrorResponse<'a> {
    /// An `ERROR` with code and message.
    pub fn error(code: &'a str, message: &'a str) -> Self {
        Self {
            severity: "ERROR",
            code,
            message,
            detail: None,
            hint: None,
            context: None,
        }
    }

    /// A `FATAL` with code and message (the connection closes after it).
    pub fn fatal(code: &'a str, message: &'a str) -> Self {
        Self {
            severity: "FATAL",
            ..Self::error(code, message)
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(b'E');
        out.put_u32(0);
        let mut field = |kind: u8, value: &str| {
            out.put_u8(kind);
            // NUL would end the field early: drop it from proxy-made text.
            out.extend(value.bytes().filter(|b| *b != 0));
            out.put_u8(0);
        };
        field(b'S', self.severity);
        field(b'V', self.severity);
        field(b'C', self.code);
        field(b'M', self.message);
        if let Some(detail) = self.detail {
            field(b'D', detail);
        }
        if let Some(hint) = self.hint {
            field(b'H', hint);
        }
        if let Some(context) = self.context {
            field(b'W', context);
        }
        out.put_u8(0);
        let len = (out.len() - start - 1) as u32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded message as a fresh buffer.
    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut out);
        out
    }
}

/// Reads the SQLSTATE (`C` field) of an encoded ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<&str> {
    error_field(body, b'C')
}

/// Reads one field of an ErrorResponse/NoticeResponse body.
pub fn error_field(body: &[u8], kind: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&k, tail)) = rest.split_first() {
        if k == 0 {
            return None;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if k == kind {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

/// An ErrorResponse/NoticeResponse `frame` with field `kind` replaced by
/// `edit` of it (`None` when the frame has no such field or is malformed).
pub fn edit_error_field(
    frame: &[u8],
    kind: u8,
    edit: impl Fn(&[u8]) -> Vec<u8>,
) -> Option<BytesMut> {
    let (&tag, rest) = frame.split_first()?;
    let mut body = rest.get(4..)?;
    let mut fields = Vec::new();
    let mut found = false;
    while let Some((&k, tail)) = body.split_first() {
        if k == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        let value = &tail[..end];
        if k == kind {
            found = true;
            let mut edited = edit(value);
            edited.retain(|b| *b != 0);
            fields.push((k, edited));
        } else {
            fields.push((k, value.to_vec()));
        }
        body = &tail[end + 1..];
    }
    if !found {
        return None;
    }
    let mut out = BytesMut::with_capacity(frame.len());
    out.put_u8(tag);
    out.put_u32(0);
    for (k, value) in fields {
        out.put_u8(k);
        out.extend_from_slice(&value);
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_field_is_edited_and_the_rest_kept() {
        let frame = ErrorResponse {
            context: Some("COPY t, line 1: \"x\""),
            ..ErrorResponse::error("23502", "null value")
        }
        .to_bytes();
        let edited = edit_error_field(&frame, b'W', |w| w[..13].to_vec()).unwrap();
        assert_eq!(error_field(&edited[5..], b'W'), Some("COPY t, line "));
        assert_eq!(error_field(&edited[5..], b'C'), Some("23502"));
        let len = u32::from_be_bytes([edited[1], edited[2], edited[3], edited[4]]) as usize;
        assert_eq!(len + 1, edited.len());
        assert!(edit_error_field(&frame, b'D', |d| d.to_vec()).is_none());
    }

    #[test]
    fn encodes_fields_and_length() {
        let bytes = ErrorResponse::fatal("08P01", "bad\0thing").to_bytes();
        assert_eq!(bytes[0], b'E');
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + 1, bytes.len());
        let body = &bytes[5..];
        assert_eq!(error_code(body), Some("08P01"));
        assert_eq!(error_field(body, b'M'), Some("badthing"));
        assert_eq!(error_field(body, b'S'), Some("FATAL"));
    }
}
