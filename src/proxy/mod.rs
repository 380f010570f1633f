//! Listener, per-connection session state machine, upstream connection.
