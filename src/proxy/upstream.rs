//! Connecting to PostgreSQL: TCP, the SSLRequest negotiation of the
//! configured mode, and forwarding of CancelRequests.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use crate::config::{Policy, UpstreamAddr, UpstreamTlsMode};
use crate::tls::{self, TlsError};

/// Why the upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("could not connect to upstream {authority}: {source}")]
    Connect {
        /// `host:port`
        authority: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TCP connect did not finish in time.
    #[error("could not connect to upstream {authority}: timed out after {after:?}")]
    Timeout {
        /// `host:port`
        authority: String,
        /// The configured timeout.
        after: Duration,
    },
    /// The mode requires TLS but the server refused it.
    #[error("upstream {authority} does not accept TLS, but tls.upstream.mode requires it")]
    TlsRefused {
        /// `host:port`
        authority: String,
    },
    /// The TLS handshake failed (e.g. certificate verification).
    #[error("TLS handshake with upstream {authority} failed: {source}")]
    Handshake {
        /// `host:port`
        authority: String,
        /// The I/O error carrying the rustls error.
        source: std::io::Error,
    },
    /// Bad TLS material in the configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Bad upstream URL.
    #[error(transparent)]
    Addr(#[from] crate::config::UpstreamAddrError),
}

/// How to reach PostgreSQL; shared by all sessions.
pub struct Upstream {
    addr: UpstreamAddr,
    authority: String,
    mode: UpstreamTlsMode,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl Upstream {
    /// Builds the upstream description from the policy.
    pub fn from_policy(policy: &Policy) -> Result<Self, UpstreamError> {
        let addr = UpstreamAddr::parse(&policy.upstream)?;
        let tls = match tls::upstream_client_config(&policy.tls.upstream)? {
            Some(config) => {
                let name = policy
                    .tls
                    .upstream
                    .server_name
                    .as_deref()
                    .unwrap_or(&addr.host);
                Some((
                    tokio_rustls::TlsConnector::from(config),
                    tls::server_name(name)?,
                ))
            }
            None => None,
        };
        Ok(Self {
            authority: addr.authority(),
            addr,
            mode: policy.tls.upstream.mode,
            tls,
            connect_timeout: policy.server.connect_timeout,
        })
    }

    /// `host:port` of the upstream.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    async fn tcp(&self) -> Result<TcpStream, UpstreamError> {
        let connect = TcpStream::connect((self.addr.host.as_str(), self.addr.port));
        let socket = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::Timeout {
                authority: self.authority.clone(),
                after: self.connect_timeout,
            })?
            .map_err(|source| UpstreamError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        // Latency matters more than packet count for a query protocol.
        let _ = socket.set_nodelay(true);
        Ok(socket)
    }

    /// Opens a session connection, negotiating TLS as configured.
    pub async fn connect(&self) -> Result<Stream, UpstreamError> {
        let mut socket = self.tcp().await?;
        let Some((connector, name)) = &self.tls else {
            return Ok(Stream::Plain(socket));
        };
        let io_err = |source| UpstreamError::Connect {
            authority: self.authority.clone(),
            source,
        };
        let request = crate::protocol::encode::ssl_request();
        socket.write_all(&request).await.map_err(io_err)?;
        let answer = socket.read_u8().await.map_err(io_err)?;
        if answer != b'S' {
            if self.mode == UpstreamTlsMode::Prefer {
                return Ok(Stream::Plain(socket));
            }
            return Err(UpstreamError::TlsRefused {
                authority: self.authority.clone(),
            });
        }
        match connector.connect(name.clone(), socket).await {
            Ok(tls) => Ok(Stream::ClientTls(Box::new(tls))),
            // libpq's `prefer` opens a new connection without TLS when the
            // handshake fails (e.g. no cipher or protocol version in common).
            Err(e) if self.mode == UpstreamTlsMode::Prefer => {
                tracing::warn!(upstream = %self.authority, error = %e, "TLS handshake failed; connecting without TLS (prefer)");
                Ok(Stream::Plain(self.tcp().await?))
            }
            Err(source) => Err(UpstreamError::Handshake {
                authority: self.authority.clone(),
                source,
            }),
        }
    }

    /// Forwards a CancelRequest packet unchanged on a fresh connection.
    /// PostgreSQL accepts cancel requests without TLS and answers nothing.
    pub async fn send_cancel(&self, packet: &[u8]) -> Result<(), UpstreamError> {
        let mut socket = self.tcp().await?;
        socket
            .write_all(packet)
            .await
            .map_err(|source| UpstreamError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        // Wait for the server to close, so the cancel is delivered before we return.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut sink)).await;
        Ok(())
    }
}
