//! SCRAM pass-through for sessions with TLS on both legs. The proxy checks
//! the client's proof against the role's stored verifier and then answers
//! the server's challenge with the ClientKey it learned. Relaying the
//! exchange instead would fail: a TLS client tells the server "I support
//! channel binding" (`y`), and a server that also runs TLS then reports a
//! downgrade attack.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::{debug, warn};

use super::scram::{ClientExchange, ClientFirst, ScramError, ServerExchange};
use super::stream::send;
use super::verifiers::VerifierStore;
use crate::protocol::{encode, sqlstate, ErrorResponse, FrameHeader, HEADER_LEN};

const SASL: u32 = 10;
const SASL_CONTINUE: u32 = 11;
const SASL_FINAL: u32 = 12;
const MECHANISM: &str = "SCRAM-SHA-256";
/// Authentication messages are small; anything bigger is an attack.
const AUTH_FRAME_LIMIT: usize = 64 * 1024;

/// How the authentication phase went.
pub enum AuthOutcome {
    /// The proxy authenticated both legs; relay the rest.
    Done,
    /// Pass-through does not apply: the buffered server bytes are relayed.
    Relay,
    /// Authentication failed; the client was told and the session ends.
    Failed,
}

/// Failure talking to either side during authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Socket error.
    #[error("I/O during authentication: {0}")]
    Io(#[from] std::io::Error),
    /// A peer closed the connection.
    #[error("peer closed the connection during authentication")]
    Closed,
    /// A peer sent an impossible frame.
    #[error("protocol violation during authentication: {0}")]
    Protocol(String),
}

/// Reads one whole frame into the front of `buf`; returns its tag and body.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), AuthError> {
    loop {
        match FrameHeader::peek(buf, AUTH_FRAME_LIMIT) {
            Ok(Some(h)) if buf.len() >= h.frame_len() => {
                let mut frame = buf.split_to(h.frame_len());
                let body = frame.split_off(HEADER_LEN);
                return Ok((h.tag, body));
            }
            Ok(_) => {}
            Err(e) => return Err(AuthError::Protocol(e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(AuthError::Closed);
        }
    }
}

fn auth_request(code: u32, data: &[u8]) -> BytesMut {
    encode::authentication(code, data)
}

fn sasl_initial_response(data: &str) -> BytesMut {
    encode::sasl_initial_response(MECHANISM, data.as_bytes())
}

fn sasl_response(data: &str) -> BytesMut {
    encode::sasl_response(data.as_bytes())
}

/// Parses a SASLInitialResponse body: mechanism and data.
fn parse_initial_response(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    let mechanism = std::str::from_utf8(&body[..end]).ok()?;
    let rest = &body[end + 1..];
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = if len < 0 {
        &[][..]
    } else {
        rest.get(4..4 + len as usize)?
    };
    Some((mechanism, data))
}

/// Parses an authentication request body: its code and the data after it.
fn auth_code(body: &[u8]) -> Option<(u32, &[u8])> {
    Some((
        u32::from_be_bytes(body.get(..4)?.try_into().ok()?),
        &body[4..],
    ))
}

fn offers_scram(data: &[u8]) -> bool {
    data.split(|b| *b == 0).any(|m| m == MECHANISM.as_bytes())
}

async fn fail_client<C: AsyncWrite + Unpin>(
    client: &mut C,
    code: &str,
    message: &str,
) -> Result<AuthOutcome, AuthError> {
    send(client, &ErrorResponse::fatal(code, message).to_bytes()).await?;
    Ok(AuthOutcome::Failed)
}

/// Runs SCRAM pass-through if the server asks for SASL and the role's
/// verifier is readable. Server bytes that are not consumed stay in
/// `server_buf` for the relay.
pub async fn scram_passthrough<C, S>(
    client: &mut C,
    client_buf: &mut BytesMut,
    server: &mut S,
    server_buf: &mut BytesMut,
    user: &str,
    verifiers: &VerifierStore,
) -> Result<AuthOutcome, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Peek at the first server message without consuming it.
    loop {
        match FrameHeader::peek(server_buf, AUTH_FRAME_LIMIT) {
            Ok(Some(h)) if server_buf.len() >= h.frame_len() => break,
            Ok(_) => {
                if server.read_buf(server_buf).await? == 0 {
                    return Err(AuthError::Closed);
                }
            }
            Err(_) => return Ok(AuthOutcome::Relay),
        }
    }
    let is_sasl = server_buf[0] == b'R'
        && auth_code(&server_buf[HEADER_LEN..])
            .is_some_and(|(code, data)| code == SASL && offers_scram(data));
    if !is_sasl {
        return Ok(AuthOutcome::Relay);
    }
    let verifier = match verifiers.get(user, false).await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "SCRAM pass-through unavailable; relaying authentication (TLS clients with channel binding enabled will be refused by the server)");
            return Ok(AuthOutcome::Relay);
        }
    };
    let _ = read_frame(server, server_buf).await?;
    debug!("SCRAM pass-through");

    // Client leg: the proxy is the SCRAM server.
    let mut offer = BytesMut::new();
    offer.extend_from_slice(MECHANISM.as_bytes());
    offer.extend_from_slice(b"\0\0");
    send(client, &auth_request(SASL, &offer)).await?;
    let (tag, body) = read_frame(client, client_buf).await?;
    let first = match (tag, parse_initial_response(&body)) {
        (b'p', Some((MECHANISM, data))) => ClientFirst::parse(data),
        _ => Err(ScramError::Malformed(
            "expected a SCRAM-SHA-256 SASLInitialResponse",
        )),
    };
    let first = match first {
        Ok(first) => first,
        Err(e) => return fail_client(client, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await,
    };
    let (exchange, server_first) = ServerExchange::start(first, &verifier);
    send(
        client,
        &auth_request(SASL_CONTINUE, server_first.as_bytes()),
    )
    .await?;
    let (tag, body) = read_frame(client, client_buf).await?;
    if tag != b'p' {
        return fail_client(
            client,
            sqlstate::PROTOCOL_VIOLATION,
            "expected a SASLResponse",
        )
        .await;
    }
    let (client_key, server_final) = match exchange.finish(&body, &verifier) {
        Ok(done) => done,
        Err(ScramError::BadProof) => {
            verifiers.forget(user);
            let message = format!("password authentication failed for user \"{user}\"");
            return fail_client(client, "28P01", &message).await;
        }
        Err(e) => return fail_client(client, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await,
    };

    // Server leg: the proxy is the SCRAM client, using the learned ClientKey.
    let (mut upstream, client_first) = ClientExchange::start();
    send(server, &sasl_initial_response(&client_first)).await?;
    let (tag, body) = read_frame(server, server_buf).await?;
    let continue_data = match (tag, auth_code(&body)) {
        (b'R', Some((SASL_CONTINUE, data))) => data,
        _ => return relay_server_error(client, tag, &body).await,
    };
    let reply = match upstream.respond(continue_data, &client_key, &verifier) {
        Ok(reply) => reply,
        Err(e) => {
            return fail_client(
                client,
                sqlstate::CONNECTION_FAILURE,
                &format!("cmk-proxy: upstream SCRAM: {e}"),
            )
            .await
        }
    };
    send(server, &sasl_response(&reply)).await?;
    let (tag, body) = read_frame(server, server_buf).await?;
    match (tag, auth_code(&body)) {
        (b'R', Some((SASL_FINAL, data))) => {
            if let Err(e) = upstream.verify_server(data, &verifier) {
                return fail_client(
                    client,
                    sqlstate::CONNECTION_FAILURE,
                    &format!("cmk-proxy: upstream SCRAM: {e}"),
                )
                .await;
            }
        }
        _ => return relay_server_error(client, tag, &body).await,
    }
    send(client, &auth_request(SASL_FINAL, server_final.as_bytes())).await?;
    Ok(AuthOutcome::Done)
}

/// Forwards a server ErrorResponse (e.g. password changed meanwhile) or
/// reports an unexpected message.
async fn relay_server_error<C: AsyncWrite + Unpin>(
    client: &mut C,
    tag: u8,
    body: &[u8],
) -> Result<AuthOutcome, AuthError> {
    if tag == b'E' {
        let mut frame = BytesMut::new();
        encode::frame(b'E', body, &mut frame);
        send(client, &frame).await?;
        return Ok(AuthOutcome::Failed);
    }
    fail_client(
        client,
        sqlstate::PROTOCOL_VIOLATION,
        "cmk-proxy: unexpected message from the server during SCRAM",
    )
    .await
}
