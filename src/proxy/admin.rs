//! The proxy's own connections to PostgreSQL (as the user named in the
//! `upstream` URL, with the TLS settings of `tls.upstream`): catalog reads
//! and SCRAM verifier lookups share the key registry's connection setup.

use crate::config::Policy;
use crate::keys::{KeyError, Registry};

/// Opens a tokio-postgres connection with the proxy's credentials; the
/// connection task runs in the background until the client is dropped.
pub async fn connect(policy: &Policy) -> Result<tokio_postgres::Client, KeyError> {
    Registry::new(policy)?.connect_dedicated().await
}
