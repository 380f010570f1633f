//! The untagged packets a client sends first (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest) and the SASL mechanism list the proxy edits.

use bytes::{BufMut, Bytes, BytesMut};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_V3: u32 = 196_608;
/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Largest startup packet accepted (PostgreSQL uses the same bound).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// A startup-phase packet.
#[derive(Debug, Clone)]
pub enum StartupPacket {
    /// Client asks for TLS.
    SslRequest,
    /// Client asks for GSSAPI encryption.
    GssEncRequest,
    /// Client asks to cancel a running query; `raw` is the whole packet.
    Cancel {
        /// Backend pid.
        pid: u32,
        /// The packet as received, forwarded unchanged.
        raw: Bytes,
    },
    /// The StartupMessage; `raw` is what goes upstream: the packet as
    /// received, or a 3.0 one without `_pq_.` options when negotiated.
    Startup {
        /// Parsed parameters.
        params: StartupParams,
        /// The protocol 3.0 packet for the upstream.
        raw: Bytes,
        /// NegotiateProtocolVersion for the client, when it asked for a
        /// newer minor version or for protocol options.
        negotiate: Option<Bytes>,
    },
}

/// Parameters of a StartupMessage the proxy cares about.
#[derive(Debug, Clone, Default)]
pub struct StartupParams {
    /// `user`
    pub user: String,
    /// `database` (defaults to the user, as in PostgreSQL).
    pub database: String,
    /// `options` (may carry `-c cmk.tenant_id=...`).
    pub options: Option<String>,
    /// `application_name`
    pub application_name: Option<String>,
    /// Every parameter in order.
    pub all: Vec<(String, String)>,
}

/// A startup packet that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// Length outside 8..=10000.
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    /// Unknown protocol major version or request code.
    #[error("unsupported frontend protocol {major}.{minor}: cmk-proxy supports 3.0")]
    UnsupportedProtocol {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// Parameters are not NUL-terminated UTF-8 pairs.
    #[error("malformed startup parameters")]
    MalformedParams,
    /// No `user` parameter.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

impl StartupPacket {
    /// Parses one packet from the start of `buf`. `Ok(None)` asks for more
    /// bytes; on success returns the packet and how many bytes it used.
    pub fn parse(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, StartupError> {
        let Some(len_bytes) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
            return Err(StartupError::BadLength(len));
        }
        let len = len as usize;
        let Some(packet) = buf.get(..len) else {
            return Ok(None);
        };
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let parsed = match code {
            SSL_REQUEST_CODE if len == 8 => StartupPacket::SslRequest,
            GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEncRequest,
            CANCEL_REQUEST_CODE if len >= 12 => StartupPacket::Cancel {
                pid: u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
                raw: Bytes::copy_from_slice(packet),
            },
            code if code >> 16 == PROTOCOL_V3 >> 16 => startup(code, packet)?,
            other => {
                return Err(StartupError::UnsupportedProtocol {
                    major: (other >> 16) as u16,
                    minor: (other & 0xffff) as u16,
                })
            }
        };
        Ok(Some((parsed, len)))
    }
}

/// A protocol 3.x StartupMessage. PostgreSQL 15 speaks 3.0 and knows no
/// `_pq_.` option: like it, the proxy answers a newer minor version or such
/// options with NegotiateProtocolVersion (3.0, the options it ignores) and
/// goes on at 3.0. It answers itself rather than relaying, so a newer
/// upstream never agrees to a protocol the proxy cannot read (3.2's longer
/// cancel keys, say).
fn startup(code: u32, packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut params = parse_params(&packet[8..])?;
    let (unrecognized, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut params.all)
        .into_iter()
        .partition(|(key, _)| key.starts_with("_pq_."));
    params.all = kept;
    if code == PROTOCOL_V3 && unrecognized.is_empty() {
        return Ok(StartupPacket::Startup {
            params,
            raw: Bytes::copy_from_slice(packet),
            negotiate: None,
        });
    }
    let names: Vec<&str> = unrecognized.iter().map(|(key, _)| key.as_str()).collect();
    Ok(StartupPacket::Startup {
        raw: startup_message(&params.all),
        negotiate: Some(negotiate_protocol_version(PROTOCOL_V3, &names)),
        params,
    })
}

/// A protocol 3.0 StartupMessage with these parameters.
pub fn startup_message(params: &[(String, String)]) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    out.put_u32(PROTOCOL_V3);
    for (key, value) in params {
        out.extend_from_slice(key.as_bytes());
        out.put_u8(0);
        out.extend_from_slice(value.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// NegotiateProtocolVersion (`v`): the newest version served (PostgreSQL
/// sends the whole version number, 196608 for 3.0, where the protocol
/// documentation says "minor version") and the options not recognized.
pub fn negotiate_protocol_version(version: u32, unrecognized: &[&str]) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u8(b'v');
    out.put_u32(0);
    out.put_u32(version);
    out.put_u32(u32::try_from(unrecognized.len()).unwrap_or(u32::MAX));
    for name in unrecognized {
        out.extend_from_slice(name.as_bytes());
        out.put_u8(0);
    }
    let len = u32::try_from(out.len() - 1).unwrap_or(u32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

fn parse_params(mut body: &[u8]) -> Result<StartupParams, StartupError> {
    let mut params = StartupParams::default();
    loop {
        let (key, rest) = take_cstr(body).ok_or(StartupError::MalformedParams)?;
        if key.is_empty() {
            break;
        }
        let (value, rest) = take_cstr(rest).ok_or(StartupError::MalformedParams)?;
        match key {
            "user" => params.user = value.to_owned(),
            "database" => params.database = value.to_owned(),
            "options" => params.options = Some(value.to_owned()),
            "application_name" => params.application_name = Some(value.to_owned()),
            _ => {}
        }
        params.all.push((key.to_owned(), value.to_owned()));
        body = rest;
    }
    if params.user.is_empty() {
        return Err(StartupError::NoUser);
    }
    if params.database.is_empty() {
        params.database = params.user.clone();
    }
    Ok(params)
}

fn take_cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let end = buf.iter().position(|b| *b == 0)?;
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    Some((text, &buf[end + 1..]))
}

/// SASL mechanism that needs channel binding, which cannot cross a
/// TLS-terminating proxy (the client would bind to the proxy's certificate).
pub const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Given the body of an `R` message, returns a rewritten frame if it is an
/// AuthenticationSASL offer that lists `SCRAM-SHA-256-PLUS`, with that
/// mechanism removed. `None` means forward the original frame unchanged.
pub fn rewrite_sasl_mechanisms(body: &[u8]) -> Option<BytesMut> {
    const AUTH_SASL: u32 = 10;
    let code = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    if code != AUTH_SASL {
        return None;
    }
    let mut mechanisms = Vec::new();
    let mut rest = &body[4..];
    loop {
        let (name, tail) = take_cstr(rest)?;
        if name.is_empty() {
            break;
        }
        mechanisms.push(name);
        rest = tail;
    }
    if !mechanisms.contains(&SCRAM_PLUS) {
        return None;
    }
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'R');
    out.put_u32(0);
    out.put_u32(AUTH_SASL);
    for name in mechanisms.iter().filter(|m| **m != SCRAM_PLUS) {
        out.extend_from_slice(name.as_bytes());
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

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn parses_startup_parameters() {
        let raw = startup(&[("user", "alice"), ("options", "-c cmk.tenant_id=acme")]);
        let (packet, used) = StartupPacket::parse(&raw).unwrap().unwrap();
        assert_eq!(used, raw.len());
        let StartupPacket::Startup { params, .. } = packet else {
            panic!("not a startup");
        };
        assert_eq!(params.user, "alice");
        assert_eq!(params.database, "alice");
        assert_eq!(params.options.as_deref(), Some("-c cmk.tenant_id=acme"));
    }

    #[test]
    fn partial_packet_asks_for_more() {
        let raw = startup(&[("user", "alice")]);
        assert!(StartupPacket::parse(&raw[..raw.len() - 1])
            .unwrap()
            .is_none());
    }

    #[test]
    fn rejects_bad_lengths_versions_and_missing_user() {
        assert_eq!(
            StartupPacket::parse(&[0, 0, 0, 3, 0, 0, 0, 0]).unwrap_err(),
            StartupError::BadLength(3)
        );
        assert!(matches!(
            StartupPacket::parse(&[0, 0, 0, 8, 0, 2, 0, 0]).unwrap_err(),
            StartupError::UnsupportedProtocol { major: 2, minor: 0 }
        ));
        assert_eq!(
            StartupPacket::parse(&startup(&[("database", "x")])).unwrap_err(),
            StartupError::NoUser
        );
    }

    fn startup_version(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = startup(params);
        raw[4..8].copy_from_slice(&version.to_be_bytes());
        raw
    }

    #[test]
    fn protocol_3_2_is_answered_with_negotiate_protocol_version() {
        // libpq 18 with max_protocol_version=latest, and a protocol option.
        let raw = startup_version(
            0x0003_0002,
            &[("user", "alice"), ("_pq_.x", "1"), ("database", "app")],
        );
        let (packet, used) = StartupPacket::parse(&raw).unwrap().unwrap();
        assert_eq!(used, raw.len());
        let StartupPacket::Startup {
            params,
            raw: upstream,
            negotiate,
        } = packet
        else {
            panic!("not a startup");
        };
        assert_eq!(
            (params.user.as_str(), params.database.as_str()),
            ("alice", "app")
        );
        // What PostgreSQL 15 answers: version 3.0, the option it ignored.
        let mut expected = vec![b'v', 0, 0, 0, 19, 0, 3, 0, 0, 0, 0, 0, 1];
        expected.extend_from_slice(b"_pq_.x\0");
        assert_eq!(negotiate.as_deref(), Some(&expected[..]));
        // Upstream gets a 3.0 startup without the option.
        assert_eq!(
            &upstream[..],
            &startup(&[("user", "alice"), ("database", "app")])[..]
        );
        // A plain 3.0 startup is relayed as it came, with nothing to answer.
        let plain = startup(&[("user", "alice")]);
        let Some((StartupPacket::Startup { raw, negotiate, .. }, _)) =
            StartupPacket::parse(&plain).unwrap()
        else {
            panic!("not a startup");
        };
        assert_eq!((&raw[..], negotiate), (&plain[..], None));
        // Other major versions stay refused.
        assert!(StartupPacket::parse(&startup_version(0x0004_0000, &[("user", "a")])).is_err());
    }

    #[test]
    fn strips_scram_plus_from_sasl_offer() {
        let mut body = 10u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let frame = rewrite_sasl_mechanisms(&body).unwrap();
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len + 1, frame.len());
        assert_eq!(&frame[9..], b"SCRAM-SHA-256\0\0");
        let mut plain = 10u32.to_be_bytes().to_vec();
        plain.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert!(rewrite_sasl_mechanisms(&plain).is_none());
        assert!(rewrite_sasl_mechanisms(&0u32.to_be_bytes()).is_none());
    }
}
