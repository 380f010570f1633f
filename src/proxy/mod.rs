//! The proxy server: listener, per-connection sessions, upstream
//! connections and TLS. Sessions relay bytes; only `session` knows the order
//! of protocol phases.

pub mod admin;
mod auth;
mod context;
mod copy;
pub mod encryption;
mod own_statements;
mod pending;
mod recent_parses;
mod relay;
mod responses;
mod results;
pub mod scram;
mod server;
mod session;
mod sql_prepared;
mod state;
mod statements;
mod stream;
pub mod tls;
mod upstream;
mod verifiers;

pub use context::{ProxyError, ServerContext};
pub use server::{run_server, serve_context};
pub use upstream::{Upstream, UpstreamError};
