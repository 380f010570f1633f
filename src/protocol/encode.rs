//! The messages the proxy builds itself, byte for byte: the frontend
//! messages it sends to PostgreSQL in a client's place (Query, Describe,
//! Close, Execute, Sync, a Parse of a name in any encoding), the SCRAM
//! exchange, and the SSLRequest and CancelRequest packets. Parse and Bind
//! are in [`super::messages`], next to their decoders.

use bytes::{BufMut, BytesMut};

use super::{frontend, CANCEL_REQUEST_CODE, SSL_REQUEST_CODE};

/// Which object a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement (`S`).
    Statement,
    /// A portal (`P`).
    Portal,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// Length field of a message whose body is `body_len` bytes. Frames the
/// proxy builds are bounded by what it read (SQL, names, SCRAM data), all
/// far below 4 GiB; a larger one would be a bug, and is cut to the field's
/// maximum rather than wrapped.
fn length(body_len: usize) -> u32 {
    u32::try_from(body_len.saturating_add(4)).unwrap_or(u32::MAX)
}

/// Appends a message of `tag` with `body`.
pub fn frame(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.reserve(body.len() + 5);
    out.put_u8(tag);
    out.put_u32(length(body.len()));
    out.extend_from_slice(body);
}

/// Appends a simple Query of `sql`.
pub fn query(sql: &str, out: &mut BytesMut) {
    out.reserve(sql.len() + 6);
    out.put_u8(frontend::QUERY);
    out.put_u32(length(sql.len() + 1));
    out.extend_from_slice(sql.as_bytes());
    out.put_u8(0);
}

/// Appends a Describe of the statement or portal `name`.
pub fn describe(target: Target, name: &str, out: &mut BytesMut) {
    named(frontend::DESCRIBE, target, name, out);
}

/// Appends a Close of the statement or portal `name`.
pub fn close(target: Target, name: &str, out: &mut BytesMut) {
    named(frontend::CLOSE, target, name, out);
}

fn named(tag: u8, target: Target, name: &str, out: &mut BytesMut) {
    out.reserve(name.len() + 7);
    out.put_u8(tag);
    out.put_u32(length(1 + name.len() + 1));
    out.put_u8(target.byte());
    out.extend_from_slice(name.as_bytes());
    out.put_u8(0);
}

/// Appends an Execute of `portal`; `max_rows` 0 runs it to the end.
pub fn execute(portal: &str, max_rows: u32, out: &mut BytesMut) {
    out.put_u8(frontend::EXECUTE);
    out.put_u32(length(portal.len() + 1 + 4));
    out.extend_from_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_u32(max_rows);
}

/// Appends a Sync.
pub fn sync(out: &mut BytesMut) {
    out.put_u8(frontend::SYNC);
    out.put_u32(4);
}

/// Appends a Parse of `sql` under `name` as the client sent it (bytes that
/// may not be UTF-8), declaring no parameter types.
pub fn parse_raw_name(name: &[u8], sql: &str, out: &mut BytesMut) {
    out.reserve(name.len() + sql.len() + 9);
    out.put_u8(frontend::PARSE);
    out.put_u32(length(name.len() + 1 + sql.len() + 1 + 2));
    out.extend_from_slice(name);
    out.put_u8(0);
    out.extend_from_slice(sql.as_bytes());
    out.put_u8(0);
    out.put_i16(0);
}

/// Appends a CopyData (`d`, either direction) carrying `data`.
pub fn copy_data(data: &[u8], out: &mut BytesMut) {
    frame(b'd', data, out);
}

/// Appends a CopyDone (`c`, either direction).
pub fn copy_done(out: &mut BytesMut) {
    frame(b'c', &[], out);
}

/// Appends a CopyFail (`f`) with `message`.
pub fn copy_fail(message: &str, out: &mut BytesMut) {
    let text: Vec<u8> = message.bytes().filter(|b| *b != 0).collect();
    out.reserve(text.len() + 6);
    out.put_u8(b'f');
    out.put_u32(length(text.len() + 1));
    out.extend_from_slice(&text);
    out.put_u8(0);
}

/// Appends a CopyInResponse (`G`) or CopyOutResponse (`H`) of `columns`
/// text-format columns (text and CSV both travel as format 0).
pub fn copy_response(tag: u8, columns: u16, out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_u32(length(1 + 2 + 2 * usize::from(columns)));
    out.put_u8(0);
    out.put_u16(columns);
    for _ in 0..columns {
        out.put_i16(0);
    }
}

/// Appends a CommandComplete (`C`) with `tag`.
pub fn command_complete(tag: &str, out: &mut BytesMut) {
    out.put_u8(b'C');
    out.put_u32(length(tag.len() + 1));
    out.extend_from_slice(tag.as_bytes());
    out.put_u8(0);
}

/// An Authentication request (`R`) with its `code` and `data`.
pub fn authentication(code: u32, data: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(9 + data.len());
    out.put_u8(b'R');
    out.put_u32(length(4 + data.len()));
    out.put_u32(code);
    out.extend_from_slice(data);
    out
}

/// A SASLInitialResponse (`p`): the chosen `mechanism` and its first data.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(mechanism.len() + data.len() + 10);
    out.put_u8(b'p');
    out.put_u32(length(mechanism.len() + 1 + 4 + data.len()));
    out.extend_from_slice(mechanism.as_bytes());
    out.put_u8(0);
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(data);
    out
}

/// A SASLResponse (`p`) carrying `data`.
pub fn sasl_response(data: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(data.len() + 5);
    frame(b'p', data, &mut out);
    out
}

/// The SSLRequest packet.
pub fn ssl_request() -> [u8; 8] {
    let mut packet = [0u8; 8];
    packet[..4].copy_from_slice(&8u32.to_be_bytes());
    packet[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    packet
}

/// The CancelRequest packet for the backend whose BackendKeyData body (pid
/// and secret key, 8 bytes) is `key`; `None` when `key` is shorter.
pub fn cancel_request(key: &[u8]) -> Option<[u8; 16]> {
    let key = key.get(..8)?;
    let mut packet = [0u8; 16];
    packet[..4].copy_from_slice(&16u32.to_be_bytes());
    packet[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    packet[8..].copy_from_slice(key);
    Some(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(build: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        build(&mut out);
        out.to_vec()
    }

    #[test]
    fn copy_messages_are_the_bytes_of_the_protocol() {
        assert_eq!(built(|o| copy_data(b"a\n", o)), b"d\0\0\0\x06a\n");
        assert_eq!(built(copy_done), b"c\0\0\0\x04");
        assert_eq!(built(|o| copy_fail("no", o)), b"f\0\0\0\x07no\0");
        assert_eq!(
            built(|o| copy_response(b'G', 2, o)),
            b"G\0\0\0\x0b\0\0\x02\0\0\0\0"
        );
        assert_eq!(
            built(|o| command_complete("COPY 3", o)),
            b"C\0\0\0\x0bCOPY 3\0"
        );
    }

    #[test]
    fn frontend_messages_are_the_bytes_of_the_protocol() {
        assert_eq!(built(|o| query("SELECT 1", o)), b"Q\0\0\0\x0dSELECT 1\0");
        assert_eq!(
            built(|o| describe(Target::Portal, "", o)),
            b"D\0\0\0\x06P\0"
        );
        assert_eq!(
            built(|o| describe(Target::Statement, "s1", o)),
            b"D\0\0\0\x08Ss1\0"
        );
        assert_eq!(
            built(|o| close(Target::Statement, "__cmk_proxy_7", o)),
            b"C\0\0\0\x13S__cmk_proxy_7\0"
        );
        assert_eq!(built(|o| execute("", 0, o)), b"E\0\0\0\x09\0\0\0\0\0");
        assert_eq!(built(sync), b"S\0\0\0\x04");
        assert_eq!(
            built(|o| parse_raw_name(b"n\xff", "x", o)),
            b"P\0\0\0\x0bn\xff\0x\0\0\0"
        );
        assert_eq!(
            built(|o| frame(b'E', b"SERROR\0\0", o)),
            b"E\0\0\0\x0cSERROR\0\0"
        );
    }

    #[test]
    fn authentication_and_startup_packets_are_exact() {
        assert_eq!(
            authentication(12, b"v=abc").to_vec(),
            b"R\0\0\0\x0d\0\0\0\x0cv=abc"
        );
        assert_eq!(
            sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x").to_vec(),
            b"p\0\0\0\x1fSCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x"
        );
        assert_eq!(sasl_response(b"c=biws").to_vec(), b"p\0\0\0\x0ac=biws");
        assert_eq!(ssl_request(), [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(
            cancel_request(&[0, 0, 0, 42, 1, 2, 3, 4, 9]),
            Some([0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 42, 1, 2, 3, 4])
        );
        assert_eq!(cancel_request(&[1, 2, 3]), None);
    }
}
