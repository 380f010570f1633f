//! Audit events and sinks (DESIGN section 8).
