//! One client session: the startup phase (TLS, GSSENC refusal, cancel
//! requests), the upstream connection, and the two relay directions. This is
//! the only place that knows the order of protocol phases.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::auth::{self, AuthOutcome};
use super::context::ServerContext;
use super::encryption::Encryption;
use super::pending::{Expected, PendingQueue};
use super::relay::{Inspector, Interest, Pump, PumpEnd, Verdict};
use super::responses::{ResponseTracker, Step};
use super::state::SessionState;
use super::statements::{self, ClientStatements, ClientStep};
use super::stream::send;
use super::stream::Stream;
use crate::config::ScramPassthrough;
use crate::ops::metrics::{metrics, TlsLabel};
use crate::protocol::{
    backend, frontend, rewrite_sasl_mechanisms, sqlstate, ErrorResponse, FrameHeader,
    StartupPacket, StartupParams,
};

mod startup;

use startup::*;

/// How long and how much a session that broke the protocol is read away
/// after its FATAL, before the socket closes.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(500);
const DRAIN_LIMIT: usize = 16 << 20;

/// Serves one accepted client connection to its end.
pub async fn serve_client(socket: TcpStream, peer: SocketAddr, ctx: Arc<ServerContext>) {
    let span = tracing::info_span!(
        "conn",
        client = %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty,
        tls = tracing::field::Empty,
    );
    async move {
        let _ = socket.set_nodelay(true);
        let _open = OpenConnection::count();
        match startup(socket, &ctx).await {
            Ok(Some((client, params, leftover))) => {
                let span = tracing::Span::current();
                span.record("user", params.user.as_str());
                span.record("database", params.database.as_str());
                span.record("tls", client.is_tls());
                metrics()
                    .client_connections
                    .get_or_create(&TlsLabel {
                        tls: client.is_tls(),
                    })
                    .inc();
                run_session(client, leftover, &params, peer, &ctx).await;
            }
            Ok(None) => {}
            Err(e) => debug!(error = %e, "connection ended during startup"),
        }
    }
    .instrument(span)
    .await
}

/// Counts a client connection as open while it lives.
struct OpenConnection;

impl OpenConnection {
    fn count() -> OpenConnection {
        metrics().client_connections_open.inc();
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics().client_connections_open.dec();
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    ClientClosed,
    ClientError(String),
    ClientProtocol(String),
    UpstreamClosed,
    UpstreamError(String),
    Shutdown,
}

async fn run_session(
    mut client: Stream,
    startup_bytes: BytesMut,
    params: &StartupParams,
    peer: SocketAddr,
    ctx: &ServerContext,
) {
    let user = params.user.as_str();
    // Boxed: rarely-used large futures stay out of every idle session's
    // state (per-connection memory is a budget).
    let mut server = match Box::pin(ctx.upstream.connect()).await {
        Ok(server) => {
            metrics().upstream_connections.inc();
            server
        }
        Err(e) => {
            metrics().upstream_errors.inc();
            warn!(error = %e, "upstream connection failed");
            reject(
                &mut client,
                sqlstate::CANNOT_CONNECT,
                &format!("cmk-proxy: {e}"),
            )
            .await;
            return;
        }
    };
    // The startup packet has no tag byte: send it raw, then frame the rest.
    let mut client_buf = startup_bytes;
    let startup = client_buf.split_to(startup_len(&client_buf));
    if let Err(e) = send(&mut server, &startup).await {
        warn!(error = %e, "upstream connection failed");
        reject(
            &mut client,
            sqlstate::CANNOT_CONNECT,
            &format!("cmk-proxy: upstream {}: {e}", ctx.upstream.authority()),
        )
        .await;
        return;
    }
    let started = std::time::Instant::now();
    info!(upstream = ctx.upstream.authority(), "session started");
    let mut server_buf = BytesMut::new();
    let policy = ctx.policy();
    if policy.auth.scram_passthrough == ScramPassthrough::Auto && client.is_tls() && server.is_tls()
    {
        let outcome = Box::pin(auth::scram_passthrough(
            &mut client,
            &mut client_buf,
            &mut server,
            &mut server_buf,
            user,
            &ctx.verifiers,
        ))
        .await;
        match outcome {
            Ok(AuthOutcome::Done) | Ok(AuthOutcome::Relay) => {}
            Ok(AuthOutcome::Failed) => {
                info!("session ended: authentication failed");
                let _ = client.shutdown().await;
                return;
            }
            Err(e) => {
                info!(error = %e, "session ended during authentication");
                return;
            }
        }
    }
    let default_tenant = startup_tenant(params, &policy);
    let state = SessionState {
        open_cycles: AtomicI64::new(1),
        tx_status: AtomicU8::new(b'I'),
        cancel_packet: Mutex::new(None),
        terminated: AtomicBool::new(false),
        poison: Default::default(),
        tenant: Mutex::new(default_tenant.clone()),
        default_tenant,
        tenant_undo: Mutex::new(Default::default()),
        pending: PendingQueue::new(),
        refresh_catalog: AtomicBool::new(false),
        schema_flux: Default::default(),
        nonstandard_strings: AtomicBool::new(false),
        other_client_encoding: AtomicBool::new(false),
        retirements: Mutex::new(Default::default()),
        own_statements: Mutex::new(Default::default()),
        extended_open: AtomicBool::new(false),
        syncs: Default::default(),
        // The startup cycle (its ReadyForQuery is counted as answered).
        cycles_sent: std::sync::atomic::AtomicU64::new(1),
        cycles_answered: Default::default(),
        user: params.user.clone(),
        client_addr: peer.to_string(),
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let limit = policy.server.max_message_size;
    let shutdown = ctx.shutdown.clone();
    let hard_stop = ctx.hard_stop.clone();

    // Owned here, not by the direction future, so that after the session
    // ends we still know whether the client's stream is at a frame boundary.
    let mut server_pump = Pump::new(server_buf, usize::MAX >> 1);
    let end = {
        let client_to_server = client_to_server(
            &mut client_read,
            &mut server_write,
            client_buf,
            limit,
            &state,
            ctx.encryption.as_deref(),
        );
        let server_to_client = server_to_client(
            &mut server_pump,
            &mut server_read,
            &mut client_write,
            &state,
            &shutdown,
            &hard_stop,
            ctx.encryption.as_deref(),
        );
        tokio::select! {
            end = client_to_server => end,
            end = server_to_client => end,
        }
    };

    if let SessionEnd::ClientProtocol(message) = &end {
        if server_pump.at_frame_boundary() {
            let bytes = ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, message).to_bytes();
            let _ = send(&mut client_write, &bytes).await;
        }
    }
    match &end {
        SessionEnd::ClientClosed | SessionEnd::ClientError(_) | SessionEnd::ClientProtocol(_) => {
            if !state.terminated.load(Ordering::Acquire) && !state.is_idle() {
                // The client vanished mid-query: stop the backend's work now
                // instead of letting it run to completion for nobody.
                let packet = state.cancel_packet.lock().ok().and_then(|p| *p);
                if let Some(packet) = packet {
                    info!("client left mid-query; cancelling its backend query");
                    if let Err(e) = ctx.upstream.send_cancel(&packet).await {
                        warn!(error = %e, "cancel after client disconnect failed");
                    }
                }
            }
        }
        SessionEnd::UpstreamClosed | SessionEnd::UpstreamError(_) | SessionEnd::Shutdown => {}
    }
    if !matches!(
        end,
        SessionEnd::UpstreamClosed | SessionEnd::UpstreamError(_)
    ) {
        let _ = send(&mut server_write, &[frontend::TERMINATE, 0, 0, 0, 4]).await;
        let _ = server_write.shutdown().await;
    }
    let _ = client_write.shutdown().await;
    if matches!(end, SessionEnd::ClientProtocol(_)) {
        // Closing with unread input makes the kernel answer with a reset,
        // which can destroy the FATAL still in flight: read the rest of the
        // offending message away first (bounded in time and size).
        let drain = async {
            // On the heap: an array here would be part of every session's
            // future, also of the idle ones.
            let mut scratch = vec![0u8; 8192];
            let mut total = 0usize;
            while total < DRAIN_LIMIT {
                match client_read.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    match end {
        SessionEnd::ClientError(e)
        | SessionEnd::UpstreamError(e)
        | SessionEnd::ClientProtocol(e) => {
            warn!(reason = %e, duration_ms, "session ended")
        }
        other => info!(reason = ?other, duration_ms, "session ended"),
    }
}

/// Counts request cycles and notices Terminate; with a policy, plans and
/// records every request (see `statements`) and holds the ones that need
/// keys.
struct ClientInspector<'a> {
    state: &'a SessionState,
    encryption: Option<&'a Encryption>,
    statements: ClientStatements,
    /// The held frame was held only because the session is poisoned: it is
    /// handled after the poison query.
    deferred: bool,
}

impl ClientInspector<'_> {
    /// The request records of messages relayed on their header alone.
    fn record_header(&self, tag: u8) {
        match tag {
            frontend::SYNC => {
                self.state.syncs.fetch_add(1, Ordering::AcqRel);
                self.state.pending.push(Expected::Sync {
                    // DDL parsed in this cycle: reload at its ReadyForQuery.
                    refresh: self.state.refresh_catalog.swap(false, Ordering::AcqRel),
                })
            }
            frontend::FUNCTION_CALL => self.state.pending.push(Expected::query()),
            _ => {}
        }
    }

    /// Handles a frame that was deferred behind the poison query.
    fn handle_deferred(&mut self, frame: &[u8], encryption: &Encryption) -> ClientStep {
        let tag = frame.first().copied().unwrap_or_default();
        match tag {
            frontend::QUERY
            | frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE => self.statements.on_frame(frame, encryption, self.state),
            _ => {
                self.record_header(tag);
                ClientStep::Forward
            }
        }
    }
}

impl Inspector for ClientInspector<'_> {
    fn interest(&mut self, tag: u8) -> Interest {
        match tag {
            frontend::TERMINATE => Interest::Header,
            _ if self.encryption.is_none() => Interest::Header,
            _ if self.state.is_poisoned() => Interest::Rewrite,
            frontend::QUERY
            | frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE => Interest::Rewrite,
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL
                if self.statements.in_copy() =>
            {
                Interest::Rewrite
            }
            _ => Interest::Header,
        }
    }

    fn on_header(&mut self, header: FrameHeader) {
        match header.tag {
            frontend::QUERY => {
                metrics().queries_simple.inc();
            }
            frontend::EXECUTE => {
                metrics().queries_extended.inc();
            }
            frontend::FUNCTION_CALL => {
                metrics().queries_function_call.inc();
            }
            _ => {}
        }
        match header.tag {
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL => self.state.cycle_sent(),
            frontend::TERMINATE => self.state.terminated.store(true, Ordering::Release),
            _ => {}
        }
        if self.encryption.is_none() {
            return;
        }
        match header.tag {
            frontend::SYNC => self.state.extended_open.store(false, Ordering::Release),
            frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE => self.state.extended_open.store(true, Ordering::Release),
            _ => {}
        }
        if !self.state.is_poisoned() {
            self.record_header(header.tag);
        }
    }

    fn on_frame(&mut self, _header: FrameHeader, frame: &[u8]) -> Verdict {
        let Some(encryption) = self.encryption else {
            return Verdict::Forward;
        };
        if self.state.is_poisoned() {
            self.deferred = true;
            return Verdict::Hold;
        }
        match self.statements.on_frame(frame, encryption, self.state) {
            ClientStep::Forward => Verdict::Forward,
            ClientStep::Replace(bytes) => Verdict::Replace(bytes),
            ClientStep::Async => Verdict::Hold,
        }
    }
}

async fn client_to_server<R, W>(
    client: &mut R,
    server: &mut W,
    pending: BytesMut,
    limit: usize,
    state: &SessionState,
    encryption: Option<&Encryption>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pump = Pump::new(pending, limit);
    let mut inspector = ClientInspector {
        state,
        encryption,
        statements: ClientStatements::default(),
        deferred: false,
    };
    let mut held = match pump.forward(server, &mut inspector).await {
        Ok(held) => held,
        Err(end) => return client_end(end),
    };
    loop {
        while let Some(frame) = held.take() {
            if let Some(encryption) = encryption {
                let step = if std::mem::take(&mut inspector.deferred) {
                    if let Some(fail) = statements::poison_query(state) {
                        if let Err(e) = pump.stage(server, &fail).await {
                            return client_end(e);
                        }
                    }
                    inspector.handle_deferred(&frame, encryption)
                } else {
                    ClientStep::Async
                };
                let out = match step {
                    ClientStep::Forward => None,
                    ClientStep::Replace(bytes) => Some(bytes),
                    ClientStep::Async => {
                        Some(Box::pin(inspector.statements.finish(&frame, encryption, state)).await)
                    }
                };
                if let Err(e) = pump.stage(server, out.as_deref().unwrap_or(&frame)).await {
                    return client_end(e);
                }
            }
            held = match pump.forward(server, &mut inspector).await {
                Ok(held) => held,
                Err(end) => return client_end(end),
            };
        }
        held = match pump.step(client, server, &mut inspector).await {
            Ok(held) => held,
            Err(end) => return client_end(end),
        };
        if state.is_idle() {
            pump.shrink_if_idle();
        }
    }
}

fn client_end(end: PumpEnd) -> SessionEnd {
    match end {
        PumpEnd::Eof => SessionEnd::ClientClosed,
        PumpEnd::ReadError(e) => SessionEnd::ClientError(e.to_string()),
        PumpEnd::WriteError(e) => SessionEnd::UpstreamError(e.to_string()),
        PumpEnd::Protocol(e) => {
            SessionEnd::ClientProtocol(format!("cmk-proxy: protocol violation: {e}"))
        }
    }
}

/// Tracks ReadyForQuery and BackendKeyData, strips channel binding from the
/// SASL offer; with a policy, matches every response with its request (see
/// `responses`) and holds the rows to decrypt.
struct ServerInspector<'a> {
    state: &'a SessionState,
    last_fatal: bool,
    encryption: Option<&'a Encryption>,
    tracker: ResponseTracker,
    /// The interest last returned: header-only frames are tracked in
    /// `on_header`, the others in `on_frame`.
    last_interest: Interest,
}

impl ServerInspector<'_> {
    fn verdict(step: Step) -> Verdict {
        match step {
            Step::Forward => Verdict::Forward,
            Step::Replace(bytes) => Verdict::Replace(bytes),
            Step::Drop => Verdict::Drop,
            Step::Decrypt | Step::Ready => Verdict::Hold,
        }
    }
}

impl Inspector for ServerInspector<'_> {
    fn interest(&mut self, tag: u8) -> Interest {
        let interest = match (tag, self.encryption) {
            (backend::AUTHENTICATION, _) => Interest::Rewrite,
            (backend::BACKEND_KEY_DATA, _) => Interest::Observe,
            (backend::PARAMETER_STATUS, Some(_)) => Interest::Observe,
            (_, Some(encryption)) => self.tracker.interest(tag, self.state, encryption),
            (backend::READY_FOR_QUERY | backend::ERROR_RESPONSE, None) => Interest::Observe,
            _ => Interest::Header,
        };
        self.last_interest = interest;
        interest
    }

    fn on_header(&mut self, header: FrameHeader) {
        if let Some(encryption) = self.encryption {
            if self.last_interest == Interest::Header {
                let _ = self
                    .tracker
                    .on_message(header.tag, None, self.state, encryption);
            }
        }
    }

    fn on_frame(&mut self, header: FrameHeader, frame: &[u8]) -> Verdict {
        let body = &frame[crate::protocol::HEADER_LEN..];
        match header.tag {
            backend::AUTHENTICATION => {
                if let Some(rewritten) = rewrite_sasl_mechanisms(body) {
                    debug!("removed SCRAM-SHA-256-PLUS from the SASL offer");
                    return Verdict::Replace(rewritten);
                }
                return Verdict::Forward;
            }
            backend::BACKEND_KEY_DATA => {
                if let Some(packet) = crate::protocol::encode::cancel_request(body) {
                    if let Ok(mut slot) = self.state.cancel_packet.lock() {
                        *slot = Some(packet);
                    }
                }
                return Verdict::Forward;
            }
            backend::PARAMETER_STATUS => {
                let mut fields = body.split(|b| *b == 0);
                match fields.next() {
                    Some(b"standard_conforming_strings") => {
                        let off = fields.next() != Some(b"on");
                        self.state.nonstandard_strings.store(off, Ordering::Release);
                    }
                    Some(b"client_encoding") => {
                        let other = fields.next() != Some(b"UTF8");
                        self.state
                            .other_client_encoding
                            .store(other, Ordering::Release);
                    }
                    _ => {}
                }
            }
            backend::READY_FOR_QUERY => {
                if let Some(status) = body.first() {
                    self.state.tx_status.store(*status, Ordering::Release);
                }
                self.state.open_cycles.fetch_sub(1, Ordering::AcqRel);
                self.state.cycles_answered.fetch_add(1, Ordering::AcqRel);
            }
            backend::ERROR_RESPONSE => {
                self.last_fatal = matches!(
                    crate::protocol::error_field(body, b'V')
                        .or(crate::protocol::error_field(body, b'S')),
                    Some("FATAL") | Some("PANIC")
                );
            }
            _ => {}
        }
        match self.encryption {
            Some(encryption) => Self::verdict(self.tracker.on_message(
                header.tag,
                Some(frame),
                self.state,
                encryption,
            )),
            None => Verdict::Forward,
        }
    }
}

async fn server_to_client<R, W>(
    pump: &mut Pump,
    server: &mut R,
    client: &mut W,
    state: &SessionState,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
    encryption: Option<&Encryption>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut inspector = ServerInspector {
        state,
        last_fatal: false,
        encryption,
        tracker: ResponseTracker::default(),
        last_interest: Interest::Header,
    };
    // Bytes read during the authentication phase go first.
    let mut held = match pump.forward(client, &mut inspector).await {
        Ok(held) => held,
        Err(PumpEnd::WriteError(e)) => return SessionEnd::ClientError(e.to_string()),
        Err(_) => None,
    };
    // Registered once, not per read: each `cancelled()` future takes the
    // token's lock when it is first polled and again when dropped.
    let mut shutdown_signal = std::pin::pin!(shutdown.cancelled());
    let mut hard_stop_signal = std::pin::pin!(hard_stop.cancelled());
    // Mirrors of the tokens, updated when their signal fires: asking a
    // token takes its lock, and this loop runs for every read.
    let mut draining = shutdown.is_cancelled();
    let mut stopping = hard_stop.is_cancelled();
    loop {
        while let Some(frame) = held.take() {
            if let Some(encryption) = encryption {
                let tracker = &mut inspector.tracker;
                let out = if frame.first() == Some(&backend::READY_FOR_QUERY) {
                    Box::pin(tracker.ready(&frame, encryption, state)).await
                } else {
                    Box::pin(tracker.decrypt(&frame, encryption, state)).await
                };
                if !out.is_empty() {
                    if let Err(e) = pump.stage(client, &out).await {
                        return SessionEnd::ClientError(format!("{e:?}"));
                    }
                }
            } else if let Err(e) = pump.stage(client, &frame).await {
                return SessionEnd::ClientError(format!("{e:?}"));
            }
            held = match pump.forward(client, &mut inspector).await {
                Ok(held) => held,
                Err(PumpEnd::WriteError(e)) => return SessionEnd::ClientError(e.to_string()),
                Err(end) => return upstream_end(end, pump, client, &inspector).await,
            };
        }
        if (draining && state.is_idle() && pump.at_frame_boundary()) || stopping {
            if pump.at_frame_boundary() {
                let bytes = ErrorResponse::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection because cmk-proxy is shutting down",
                )
                .to_bytes();
                let _ = pump.write(client, &bytes).await;
            }
            return SessionEnd::Shutdown;
        }
        // Only the read races the shutdown signals: it is cancel-safe, the
        // forwarding after it is not and always runs to completion.
        // Each signal future is polled only until it fires (then draining,
        // or the hard stop, ends the loop above).
        let filled = tokio::select! {
            r = pump.fill(server) => r,
            _ = &mut shutdown_signal, if !draining => {
                draining = true;
                continue;
            }
            _ = &mut hard_stop_signal, if !stopping => {
                stopping = true;
                continue;
            }
        };
        let result = match filled {
            Ok(()) => pump.forward(client, &mut inspector).await,
            Err(end) => Err(end),
        };
        match result {
            Ok(next) => {
                held = next;
                if held.is_none() && state.is_idle() {
                    pump.shrink_if_idle();
                }
            }
            Err(PumpEnd::WriteError(e)) => return SessionEnd::ClientError(e.to_string()),
            Err(end) => return upstream_end(end, pump, client, &inspector).await,
        }
    }
}

/// The upstream went away: tell the client (at a frame boundary, unless the
/// server already sent a FATAL) and end the session.
async fn upstream_end<W: AsyncWrite + Unpin>(
    end: PumpEnd,
    pump: &mut Pump,
    client: &mut W,
    inspector: &ServerInspector<'_>,
) -> SessionEnd {
    let (ended, reason) = match end {
        PumpEnd::Eof => (
            SessionEnd::UpstreamClosed,
            "server closed the connection unexpectedly".to_owned(),
        ),
        PumpEnd::ReadError(e) | PumpEnd::WriteError(e) => {
            (SessionEnd::UpstreamError(e.to_string()), e.to_string())
        }
        PumpEnd::Protocol(e) => (SessionEnd::UpstreamError(e.to_string()), e.to_string()),
    };
    // After Terminate the server closing is the expected end, not a failure.
    let terminated = inspector.state.terminated.load(Ordering::Acquire);
    if pump.at_frame_boundary() && !inspector.last_fatal && !terminated {
        let message = format!("cmk-proxy: lost the upstream connection: {reason}");
        let bytes = ErrorResponse::fatal(sqlstate::CONNECTION_FAILURE, &message).to_bytes();
        let _ = pump.write(client, &bytes).await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{serve_client, split_options, startup_tenant};
    use crate::config::parse_policy;
    use crate::protocol::StartupParams;
    use crate::proxy::context::ServerContext;

    /// Every idle session keeps its whole future in memory: an array or a
    /// duplicated sub-future in it is paid per connection (an 8 KiB drain
    /// buffer once made an idle session cost 25 KiB instead of 9).
    #[tokio::test]
    async fn a_session_future_stays_small() {
        let policy = Arc::new(parse_policy("tls:\n  upstream: {mode: disable}\n", "test").unwrap());
        let ctx = Arc::new(
            ServerContext::new(policy, Default::default())
                .await
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = client.local_addr().unwrap();
        let session = serve_client(client, peer, ctx);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 4096, "a session's future takes {size} bytes");
    }

    fn params(options: Option<&str>, all: &[(&str, &str)]) -> StartupParams {
        StartupParams {
            user: "app".to_owned(),
            database: "app".to_owned(),
            options: options.map(str::to_owned),
            application_name: None,
            all: all
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn the_startup_tenant_is_read_as_postgresql_reads_it() {
        let policy = parse_policy("tenant:\n  users:\n    app: mapped\n", "test").unwrap();
        let tenant = |options: Option<&str>, all: &[(&str, &str)]| {
            startup_tenant(&params(options, all), &policy)
        };
        assert_eq!(tenant(None, &[]).as_deref(), Some("mapped"));
        assert_eq!(
            tenant(Some("-c cmk.tenant_id=acme"), &[]).as_deref(),
            Some("acme")
        );
        // Names are case-insensitive, `-` is `_`, the last one wins.
        assert_eq!(
            tenant(Some("-c CMK.TENANT_ID=acme --cmk.tenant-id=globex"), &[]).as_deref(),
            Some("globex")
        );
        assert_eq!(
            tenant(Some("-ccmk.tenant_id=acme -c cmk.tenant_id=initech"), &[]).as_deref(),
            Some("initech")
        );
        // A startup parameter of that name comes after the options.
        assert_eq!(
            tenant(
                Some("-c cmk.tenant_id=acme"),
                &[("Cmk.Tenant_Id", "globex")]
            )
            .as_deref(),
            Some("globex")
        );
        // A backslash keeps the next character.
        assert_eq!(
            tenant(Some(r"-c cmk.tenant_id=a\ b"), &[]).as_deref(),
            Some("a b")
        );
        assert_eq!(split_options(r" -c  x=1\\ "), vec!["-c", r"x=1\"]);
    }
}
