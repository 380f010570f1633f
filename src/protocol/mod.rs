//! PostgreSQL wire protocol (version 3): framing of the byte stream into
//! messages, the startup packet, and the handful of messages the proxy
//! decodes or builds. Everything else is relayed as opaque bytes; this module
//! knows nothing of sockets, sessions or SQL.
//!
//! Our own small codec rather than `pgwire` or `postgres-protocol`: the relay
//! needs to find frame boundaries in a shared read buffer and forward byte
//! ranges without copying or re-encoding them, and to stream frames larger
//! than the buffer. Neither crate exposes that (pgwire decodes every message
//! into owned structs; postgres-protocol parses only backend messages).

pub mod encode;
mod error;
mod frame;
pub mod messages;
mod startup;

pub use error::{edit_error_field, error_code, error_field, ErrorResponse};
pub use frame::{FrameError, FrameHeader, HEADER_LEN};
pub use startup::{
    rewrite_sasl_mechanisms, StartupError, StartupPacket, StartupParams, CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE, PROTOCOL_V3, SSL_REQUEST_CODE,
};

/// Backend message tags the proxy looks at.
pub mod backend {
    /// Authentication request (`R`).
    pub const AUTHENTICATION: u8 = b'R';
    /// BackendKeyData (`K`): the backend's pid and cancel secret.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// ReadyForQuery (`Z`): end of a request cycle, with the transaction status.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// ErrorResponse (`E`).
    pub const ERROR_RESPONSE: u8 = b'E';
    /// ParameterStatus (`S`).
    pub const PARAMETER_STATUS: u8 = b'S';
    /// CopyInResponse (`G`).
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse (`H`).
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// CopyBothResponse (`W`).
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// RowDescription (`T`).
    pub const ROW_DESCRIPTION: u8 = b'T';
    /// DataRow (`D`).
    pub const DATA_ROW: u8 = b'D';
    /// CommandComplete (`C`).
    pub const COMMAND_COMPLETE: u8 = b'C';
}

/// Frontend message tags the proxy looks at.
pub mod frontend {
    /// Terminate (`X`).
    pub const TERMINATE: u8 = b'X';
    /// Simple Query (`Q`).
    pub const QUERY: u8 = b'Q';
    /// Sync (`S`).
    pub const SYNC: u8 = b'S';
    /// Parse (`P`).
    pub const PARSE: u8 = b'P';
    /// Bind (`B`).
    pub const BIND: u8 = b'B';
    /// Describe (`D`).
    pub const DESCRIBE: u8 = b'D';
    /// Execute (`E`).
    pub const EXECUTE: u8 = b'E';
    /// Close (`C`).
    pub const CLOSE: u8 = b'C';
    /// FunctionCall (`F`).
    pub const FUNCTION_CALL: u8 = b'F';
    /// CopyData (`d`).
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone (`c`).
    pub const COPY_DONE: u8 = b'c';
    /// CopyFail (`f`).
    pub const COPY_FAIL: u8 = b'f';
}

/// SQLSTATE codes the proxy itself raises.
pub mod sqlstate {
    /// protocol_violation
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// sqlclient_unable_to_establish_sqlconnection
    pub const CANNOT_CONNECT: &str = "08001";
    /// connection_failure
    pub const CONNECTION_FAILURE: &str = "08006";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// feature_not_supported
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}
