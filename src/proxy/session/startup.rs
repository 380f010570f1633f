//! A session's startup phase: SSL/GSSENC/cancel requests until the
//! StartupMessage, and the tenant the startup parameters set.

use super::*;

/// I/O failure during the startup phase.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartupFailure {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Sends a FATAL error to the client and closes the stream.
pub(super) async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, code: &str, message: &str) {
    let bytes = ErrorResponse::fatal(code, message).to_bytes();
    let _ = send(stream, &bytes).await;
    let _ = stream.shutdown().await;
}

/// Handles SSLRequest/GSSENCRequest/CancelRequest until the StartupMessage.
/// Returns `None` when the connection was fully handled (cancel, rejection).
pub(super) async fn startup(
    socket: TcpStream,
    ctx: &ServerContext,
) -> Result<Option<(Stream, StartupParams, BytesMut)>, StartupFailure> {
    let mut stream = Stream::Plain(socket);
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let parsed = match StartupPacket::parse(&buf) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!(error = %e, "malformed startup packet");
                reject(&mut stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
                return Ok(None);
            }
        };
        let Some((packet, used)) = parsed else {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
            continue;
        };
        let _ = buf.split_to(used);
        match packet {
            StartupPacket::SslRequest => {
                if !buf.is_empty() {
                    // Bytes after SSLRequest but before the handshake could be
                    // injected by a man in the middle (CVE-2021-23222).
                    reject(
                        &mut stream,
                        sqlstate::PROTOCOL_VIOLATION,
                        "unexpected data after SSLRequest",
                    )
                    .await;
                    return Ok(None);
                }
                match (ctx.acceptor(), stream) {
                    (Some(acceptor), Stream::Plain(mut tcp)) => {
                        send(&mut tcp, b"S").await?;
                        let tls = acceptor.accept(tcp).await?;
                        stream = Stream::ServerTls(Box::new(tls));
                    }
                    (_, mut other) => {
                        send(&mut other, b"N").await?;
                        stream = other;
                    }
                }
            }
            StartupPacket::GssEncRequest => {
                send(&mut stream, b"N").await?;
            }
            StartupPacket::Cancel { pid, raw } => {
                debug!(backend_pid = pid, "forwarding cancel request");
                if let Err(e) = ctx.upstream.send_cancel(&raw).await {
                    warn!(error = %e, "cancel request could not be forwarded");
                }
                // A TLS client (libpq 17+) expects close_notify, not a bare EOF.
                let _ = stream.shutdown().await;
                return Ok(None);
            }
            StartupPacket::Startup {
                params,
                raw,
                negotiate,
            } => {
                if let Some(reason) = ctx.refuse_new_sessions() {
                    reject(&mut stream, sqlstate::ADMIN_SHUTDOWN, reason).await;
                    return Ok(None);
                }
                if let Some(answer) = negotiate {
                    send(&mut stream, &answer).await?;
                }
                let mut initial = BytesMut::with_capacity(raw.len() + buf.len());
                initial.extend_from_slice(&raw);
                // The startup packet is relayed verbatim, ahead of whatever
                // the client pipelined after it.
                let leftover = buf;
                return Ok(Some((stream, params, prepend(initial, leftover))));
            }
        }
    }
}

pub(super) fn prepend(mut head: BytesMut, tail: BytesMut) -> BytesMut {
    head.extend_from_slice(&tail);
    head
}

/// The tenant a session starts with: `-c <setting>=<tenant>` in the startup
/// options, else the policy's user → tenant map.
/// Read as PostgreSQL reads them: the `options` switches first, then the
/// startup parameters themselves; setting names case-insensitive, `-` as
/// `_` in switches; the last assignment wins.
pub(super) fn startup_tenant(
    params: &StartupParams,
    policy: &crate::config::Policy,
) -> Option<String> {
    let setting = policy.tenant.session_setting.to_lowercase();
    let mut tenant: Option<String> = None;
    if let Some(options) = params.options.as_deref() {
        let words = split_options(options);
        let mut words = words.iter();
        while let Some(word) = words.next() {
            let assignment = match word.as_str() {
                "-c" => match words.next() {
                    Some(next) => next.as_str(),
                    None => break,
                },
                other => match other
                    .strip_prefix("-c")
                    .or_else(|| other.strip_prefix("--"))
                {
                    Some(rest) => rest,
                    None => continue,
                },
            };
            if let Some((name, value)) = assignment.split_once('=') {
                if name.replace('-', "_").to_lowercase() == setting {
                    tenant = Some(value.to_owned());
                }
            }
        }
    }
    for (name, value) in &params.all {
        if name.to_lowercase() == setting {
            tenant = Some(value.clone());
        }
    }
    tenant
        .filter(|t| !t.is_empty())
        .or_else(|| policy.tenant.users.get(&params.user).cloned())
}

/// The words of a startup `options` string: split at whitespace, a
/// backslash keeps the next character (as PostgreSQL's `pg_split_opts`).
pub(super) fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

pub(super) fn startup_len(bytes: &[u8]) -> usize {
    bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0)
        .min(bytes.len())
}
