//! The proxy's own connections to PostgreSQL (as the user named in the
//! `upstream` URL), with the same TLS settings as session connections.

use std::sync::Arc;

use crate::config::{Policy, UpstreamAddr};

/// Why the proxy's own connection failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The URL names no user for the proxy's own connection.
    #[error("the upstream URL names no user for the proxy's own connection")]
    NoUser,
    /// Connecting or querying failed.
    #[error("proxy connection to {authority}: {source}")]
    Postgres {
        /// `host:port`
        authority: String,
        /// The driver error.
        source: tokio_postgres::Error,
    },
    /// Bad TLS or URL settings.
    #[error(transparent)]
    Upstream(#[from] super::UpstreamError),
}

/// Opens a tokio-postgres connection with the proxy's credentials; the
/// connection task runs in the background until the client is dropped.
pub async fn connect(policy: &Policy) -> Result<tokio_postgres::Client, AdminError> {
    let addr = UpstreamAddr::parse(&policy.upstream).map_err(super::UpstreamError::from)?;
    let user = addr.user.clone().ok_or(AdminError::NoUser)?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&addr.host)
        .port(addr.port)
        .user(&user)
        .dbname(addr.dbname.as_deref().unwrap_or(&user))
        .application_name("cmk-proxy")
        .connect_timeout(policy.server.connect_timeout);
    if let Some(password) = &addr.password {
        config.password(password);
    }
    let fail = |source| AdminError::Postgres {
        authority: addr.authority(),
        source,
    };
    let tls = super::tls::upstream_client_config(&policy.tls.upstream)
        .map_err(super::UpstreamError::from)?;
    match tls {
        None => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            let mode = match policy.tls.upstream.mode {
                crate::config::UpstreamTlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            };
            config.ssl_mode(mode);
            let connector =
                tokio_postgres_rustls::MakeRustlsConnect::new(Arc::unwrap_or_clone(tls));
            let (client, connection) = config.connect(connector).await.map_err(fail)?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}
