//! The byte pump of one direction of a session. It finds frame boundaries,
//! lets an [`Inspector`] look at the few messages that matter, and forwards
//! everything else as contiguous byte ranges of the read buffer: no copy,
//! no re-encoding, no allocation per message. Frames larger than the buffer
//! are streamed through in pieces, so memory stays bounded.

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::stream::send;

use crate::protocol::{FrameError, FrameHeader};

/// Smallest read buffer; a session starts with this much per direction.
const MIN_BUFFER: usize = 2 * 1024;
/// Largest read buffer kept between reads for streaming traffic.
const MAX_STREAM_BUFFER: usize = 128 * 1024;
/// Largest room a pump keeps ready for its next read once it has seen
/// bursts that big (one response of a few rows, a Parse/Bind batch).
const MAX_BURST_HINT: usize = 16 * 1024;

/// What an inspector needs to see of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Only the header: forward immediately, body may stream.
    Header,
    /// The whole frame in memory, read-only, forwarded unchanged.
    Observe,
    /// The whole frame in memory; the inspector may replace it.
    Rewrite,
}

/// What to do with a frame the inspector asked to rewrite.
pub enum Verdict {
    /// Forward the frame unchanged.
    Forward,
    /// Forward these bytes instead of the frame.
    Replace(BytesMut),
    /// Forward nothing for this frame.
    Drop,
    /// Hand the frame to the caller (it needs async work); forwarding
    /// stops after the bytes before it.
    Hold,
}

/// Decides which frames a direction looks at, and looks at them.
pub trait Inspector {
    /// How much of a frame with this tag must be seen. May be asked more
    /// than once for the same frame (while it is incomplete): no side effects.
    fn interest(&mut self, tag: u8) -> Interest;
    /// Called exactly once for every frame, before it is forwarded (for
    /// `Observe` and `Rewrite`: once it is complete, just before `on_frame`).
    fn on_header(&mut self, header: FrameHeader);
    /// Called with the complete frame for `Observe` and `Rewrite` interest.
    fn on_frame(&mut self, header: FrameHeader, frame: &[u8]) -> Verdict;
}

/// Why a pump stopped.
#[derive(Debug)]
pub enum PumpEnd {
    /// The reading side closed the connection.
    Eof,
    /// Reading failed.
    ReadError(std::io::Error),
    /// Writing to the other side failed.
    WriteError(std::io::Error),
    /// The reading side sent an impossible frame.
    Protocol(FrameError),
}

/// Staged output larger than this is sent without waiting for the end of
/// the read buffer.
const MAX_STAGED: usize = 64 * 1024;

/// One direction of a session: the read buffer and streaming state.
pub struct Pump {
    buf: BytesMut,
    /// Output staged around rewritten or held frames, sent in one write
    /// when the buffer is done (empty while traffic passes through as is).
    staged: BytesMut,
    /// Bytes of the current passthrough frame still to forward.
    pending: usize,
    /// A write is under way (if its future is dropped, output may end mid-frame).
    writing: bool,
    limit: usize,
    /// Room to have free before a read: grows when a read fills the
    /// buffer, so a burst that came in one segment is read in one call.
    burst_hint: usize,
    /// A read error met while reading on without waiting, reported by the
    /// next `fill` (after the bytes read before it are forwarded).
    deferred_error: Option<std::io::Error>,
}

impl Pump {
    /// A pump with an initial buffer (bytes already read from the source)
    /// and a cap on the size of any frame (larger ones are a protocol error;
    /// passthrough frames are streamed, never held whole).
    pub fn new(initial: BytesMut, limit: usize) -> Self {
        let mut buf = initial;
        if buf.capacity() < MIN_BUFFER {
            buf.reserve(MIN_BUFFER - buf.len());
        }
        Self {
            buf,
            staged: BytesMut::new(),
            pending: 0,
            writing: false,
            limit,
            burst_hint: MIN_BUFFER,
            deferred_error: None,
        }
    }

    /// True when no partial frame has been forwarded: a frame built by the
    /// proxy can be inserted into the output stream here.
    pub fn at_frame_boundary(&self) -> bool {
        self.pending == 0 && !self.writing
    }

    /// Reads what `src` has (waiting for at least one byte) into the
    /// buffer. A read that fills the buffer is followed by more reads that
    /// do not wait, so bytes that arrived together are forwarded together
    /// (a RowDescription is not sent alone while its rows sit unread in the
    /// socket). Cancel-safe: if the future is dropped, no bytes are lost.
    /// `Err` when the direction ends.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, src: &mut R) -> Result<(), PumpEnd> {
        if let Some(e) = self.deferred_error.take() {
            return Err(PumpEnd::ReadError(e));
        }
        self.ensure_room();
        let mut room = self.buf.capacity() - self.buf.len();
        let mut n = src
            .read_buf(&mut self.buf)
            .await
            .map_err(PumpEnd::ReadError)?;
        if n == 0 {
            return Err(PumpEnd::Eof);
        }
        while n == room && self.buf.len() < MAX_STREAM_BUFFER {
            self.burst_hint = (self.burst_hint * 2).min(MAX_BURST_HINT);
            self.buf.reserve(self.burst_hint);
            room = self.buf.capacity() - self.buf.len();
            // Only what is already there: never waits (the next `fill`
            // does), and a pending read leaves no state behind.
            n = match src.read_buf(&mut self.buf).now_or_never() {
                Some(Ok(read)) => read,
                // An error: the next `fill` reports it, after the bytes
                // read so far are forwarded (as it does end of stream).
                Some(Err(e)) => {
                    self.deferred_error = Some(e);
                    break;
                }
                None => break,
            };
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Reads once from `src` and forwards what can be forwarded to `dst`.
    /// Returns a frame the inspector held, if any.
    pub async fn step<R, W, I>(
        &mut self,
        src: &mut R,
        dst: &mut W,
        inspector: &mut I,
    ) -> Result<Option<BytesMut>, PumpEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        I: Inspector,
    {
        self.fill(src).await?;
        self.forward(dst, inspector).await
    }

    /// Forwards every complete (or streamable) frame in the buffer, up to a
    /// frame the inspector holds, which is returned (call again after it).
    pub async fn forward<W, I>(
        &mut self,
        dst: &mut W,
        inspector: &mut I,
    ) -> Result<Option<BytesMut>, PumpEnd>
    where
        W: AsyncWrite + Unpin,
        I: Inspector,
    {
        let mut ready = 0usize;
        loop {
            if self.pending > 0 {
                let take = self.pending.min(self.buf.len() - ready);
                ready += take;
                self.pending -= take;
                if self.pending > 0 {
                    break;
                }
                continue;
            }
            let header = match FrameHeader::peek(&self.buf[ready..], self.limit) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    // Forward what is complete before reporting the bad frame.
                    self.flush_ready(dst, ready).await?;
                    return Err(PumpEnd::Protocol(e));
                }
            };
            let interest = inspector.interest(header.tag);
            let available = self.buf.len() - ready;
            match interest {
                Interest::Header => {
                    inspector.on_header(header);
                    let take = header.frame_len().min(available);
                    ready += take;
                    self.pending = header.frame_len() - take;
                }
                Interest::Observe | Interest::Rewrite => {
                    if available < header.frame_len() {
                        // Make sure the whole frame fits before reading on.
                        // The inspector sees this header again, once, when
                        // the frame is complete.
                        let need = ready + header.frame_len();
                        if self.buf.capacity() < need {
                            self.buf.reserve(need - self.buf.len());
                        }
                        break;
                    }
                    inspector.on_header(header);
                    let frame = &self.buf[ready..ready + header.frame_len()];
                    match inspector.on_frame(header, frame) {
                        Verdict::Forward => ready += header.frame_len(),
                        Verdict::Replace(bytes) => {
                            self.stage_ready(dst, ready).await?;
                            ready = 0;
                            self.stage(dst, &bytes).await?;
                            self.buf.advance(header.frame_len());
                        }
                        Verdict::Drop => {
                            self.stage_ready(dst, ready).await?;
                            ready = 0;
                            self.buf.advance(header.frame_len());
                        }
                        Verdict::Hold => {
                            self.stage_ready(dst, ready).await?;
                            return Ok(Some(self.buf.split_to(header.frame_len())));
                        }
                    }
                }
            }
        }
        self.flush_ready(dst, ready).await?;
        Ok(None)
    }

    /// Sends the staged output and the first `ready` bytes of the buffer:
    /// straight from the buffer when nothing is staged (no copy), else in
    /// one write after the staged bytes.
    async fn flush_ready<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        ready: usize,
    ) -> Result<(), PumpEnd> {
        if self.staged.is_empty() {
            if ready == 0 {
                return Ok(());
            }
            self.writing = true;
            send(dst, &self.buf[..ready])
                .await
                .map_err(PumpEnd::WriteError)?;
            self.writing = false;
            self.buf.advance(ready);
            return Ok(());
        }
        self.staged.extend_from_slice(&self.buf[..ready]);
        self.buf.advance(ready);
        self.send_staged(dst).await
    }

    /// Moves the first `ready` bytes of the buffer behind the staged output.
    async fn stage_ready<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        ready: usize,
    ) -> Result<(), PumpEnd> {
        self.staged.extend_from_slice(&self.buf[..ready]);
        self.buf.advance(ready);
        if self.staged.len() >= MAX_STAGED {
            self.send_staged(dst).await?;
        }
        Ok(())
    }

    async fn send_staged<W: AsyncWrite + Unpin>(&mut self, dst: &mut W) -> Result<(), PumpEnd> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.writing = true;
        send(dst, &self.staged).await.map_err(PumpEnd::WriteError)?;
        self.writing = false;
        self.staged.clear();
        if self.staged.capacity() > MAX_STAGED * 2 {
            self.staged = BytesMut::new();
        }
        Ok(())
    }

    /// Stages proxy-made bytes (whole frames), sent with the rest of the
    /// output at the end of the next `forward`.
    pub async fn stage<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        bytes: &[u8],
    ) -> Result<(), PumpEnd> {
        self.staged.extend_from_slice(bytes);
        if self.staged.len() >= MAX_STAGED {
            self.send_staged(dst).await?;
        }
        Ok(())
    }

    /// Writes proxy-made bytes (whole frames) to `dst` now, after anything
    /// staged.
    pub async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        bytes: &[u8],
    ) -> Result<(), PumpEnd> {
        self.staged.extend_from_slice(bytes);
        self.send_staged(dst).await
    }

    /// Keeps spare capacity for the next read: the burst size seen so far,
    /// more while traffic streams, and drops a large buffer once it is
    /// empty so idle sessions stay small.
    fn ensure_room(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > MAX_STREAM_BUFFER {
            self.buf = BytesMut::with_capacity(self.burst_hint);
            return;
        }
        let spare = self.buf.capacity() - self.buf.len();
        if spare < self.burst_hint {
            self.buf.reserve(self.burst_hint);
        } else if spare < MIN_BUFFER / 2 {
            let grow = (self.buf.capacity()).clamp(MIN_BUFFER, MAX_STREAM_BUFFER);
            self.buf.reserve(grow);
        }
    }

    /// Shrinks an empty buffer back to the burst size (called when a
    /// session has nothing in flight).
    pub fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.pending == 0 && self.buf.capacity() > self.burst_hint * 2 {
            self.buf = BytesMut::with_capacity(self.burst_hint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct CountTags(Vec<u8>);

    impl Inspector for CountTags {
        fn interest(&mut self, tag: u8) -> Interest {
            if tag == b'Z' {
                Interest::Observe
            } else if tag == b'R' {
                Interest::Rewrite
            } else {
                Interest::Header
            }
        }
        fn on_header(&mut self, header: FrameHeader) {
            self.0.push(header.tag);
        }
        fn on_frame(&mut self, header: FrameHeader, _frame: &[u8]) -> Verdict {
            if header.tag == b'R' {
                Verdict::Replace(BytesMut::from(&b"R\0\0\0\x04"[..]))
            } else {
                Verdict::Forward
            }
        }
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn forwards_bytes_exactly_and_rewrites_asked_frames() {
        let mut input = Vec::new();
        input.extend(frame(b'D', &[7u8; 100_000]));
        input.extend(frame(b'R', b"\0\0\0\x0aSCRAM\0\0"));
        input.extend(frame(b'Z', b"I"));
        let mut src = std::io::Cursor::new(input.clone());
        let mut out = Vec::new();
        let mut pump = Pump::new(BytesMut::new(), 1 << 20);
        let mut inspector = CountTags(Vec::new());
        loop {
            match pump.step(&mut src, &mut out, &mut inspector).await {
                Ok(_) => {}
                Err(PumpEnd::Eof) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        let mut expected = frame(b'D', &[7u8; 100_000]);
        expected.extend_from_slice(b"R\0\0\0\x04");
        expected.extend(frame(b'Z', b"I"));
        assert_eq!(out, expected);
        assert_eq!(inspector.0, b"DRZ");
        // The 100 kB frame was streamed, never held whole.
        assert!(pump.buf.capacity() < 100_000 + MAX_STREAM_BUFFER);
    }

    /// Records every write call, so a test can count the sends.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_response_that_arrived_whole_is_forwarded_in_one_write() {
        // A RowDescription and a DataRow larger than the initial buffer,
        // written by the server at once: the client must not get the
        // RowDescription alone (one more wakeup and send per query).
        let (mut server, client) = tokio::io::duplex(1 << 20);
        let mut response = frame(b'T', &[1u8; 100]);
        response.extend(frame(b'R', &[2u8; 3 * MIN_BUFFER]));
        response.extend(frame(b'Z', b"I"));
        tokio::io::AsyncWriteExt::write_all(&mut server, &response)
            .await
            .unwrap();
        let mut src = client;
        let mut pump = Pump::new(BytesMut::new(), 1 << 20);
        let mut out = Writes::default();
        let mut inspector = CountTags(Vec::new());
        pump.step(&mut src, &mut out, &mut inspector).await.unwrap();
        assert_eq!(out.0.len(), 1, "one write for the whole response");
        assert_eq!(inspector.0, b"TRZ");
        // The pump learned the burst size: the next one is read in one call.
        assert!(pump.burst_hint > MIN_BUFFER);
    }

    /// Fills whatever room the first read has, fails the second read
    /// (connection reset), then reads end of stream, as a socket does.
    struct FullThenReset(u8);

    impl AsyncRead for FullThenReset {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.0 += 1;
            std::task::Poll::Ready(match self.0 {
                1 => {
                    buf.put_slice(&vec![b'D'; buf.remaining()]);
                    Ok(())
                }
                2 => Err(std::io::ErrorKind::ConnectionReset.into()),
                _ => Ok(()),
            })
        }
    }

    #[tokio::test]
    async fn a_read_error_met_while_reading_on_is_reported_not_taken_for_the_end() {
        let mut pump = Pump::new(BytesMut::new(), 1 << 20);
        let mut src = FullThenReset(0);
        pump.fill(&mut src).await.unwrap();
        assert!(!pump.buf.is_empty(), "the bytes read before the error stay");
        match pump.fill(&mut src).await {
            Err(PumpEnd::ReadError(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset)
            }
            other => panic!("expected the read error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_frame_is_a_protocol_error_before_any_byte_of_it_is_sent() {
        let mut src = std::io::Cursor::new(frame(b'Q', &[1u8; 2048]));
        let mut out = Vec::new();
        let mut pump = Pump::new(BytesMut::new(), 1024);
        let end = pump
            .step(&mut src, &mut out, &mut CountTags(Vec::new()))
            .await;
        assert!(matches!(
            end,
            Err(PumpEnd::Protocol(FrameError::TooLarge { .. }))
        ));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn bad_length_is_a_protocol_error() {
        let mut src = std::io::Cursor::new(b"Q\0\0\0\x01".to_vec());
        let mut out = Vec::new();
        let mut pump = Pump::new(BytesMut::new(), 1024);
        let end = pump
            .step(&mut src, &mut out, &mut CountTags(Vec::new()))
            .await;
        assert!(matches!(
            end,
            Err(PumpEnd::Protocol(FrameError::BadLength { .. }))
        ));
        assert!(out.is_empty());
    }
}
