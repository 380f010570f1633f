//! SQL analysis and rewriting for statements that touch protected columns
//! (sqlparser, PostgreSQL dialect). It decides, per statement, whether it
//! can pass untouched, is a read whose results the session decrypts, is a
//! write whose protected values become parameter slots the session fills
//! with ciphertext, or must be refused (KM003/KM004) — fail closed.
//! Knows SQL and the policy; knows nothing of sockets or keys.

mod analyze;
mod bindable;
mod copy;
mod ddl;
mod fingerprint;
mod flux;
mod gate;
mod lexer;
mod lineage;
mod literals;
mod lookup;
mod names;
mod pg_reading;
mod render;
mod row_tenant;
mod set_config;
mod sql_prepare;
mod write;
mod write_unnest;

pub use analyze::{
    analyze, analyze_in, nonstandard_strings_refusal, Analysis, SavepointOp, SchemaFacts,
    StatementPlan, TenantChange,
};
pub use bindable::{literal_param_type, negation_types_otherwise, typed_placeholders};
pub use copy::{CopyFieldRole, CopyInPlan, CopyOutPlan, CopyPlan};
pub use fingerprint::fingerprint;
pub use flux::schema_flux;
pub use gate::parse_statements;
pub use literals::{parameterize, Literal, Parameterized, SqlTemplate};
pub use lookup::{Lookup, LookupSlot, LookupValue};
pub use names::{ident_name, mentions_policy_table};
pub use render::{quote_literal, render_with_literals};
pub use row_tenant::{RowTenantRead, ROW_TENANT_COLUMN};
pub use sql_prepare::{sql_prepare_ops, SqlPrepareOp};
pub use write::{CellSlot, RowPlan, TenantSource, ValueSource, WritePlan, BYTEA_ARRAY_OID};
pub use write_unnest::{ArrayCells, ArraySource, UnnestPlan};

/// A statement the proxy refuses, with what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// SQLSTATE from DESIGN section 6.
    pub sqlstate: &'static str,
    /// `schema.table` involved, if known.
    pub table: Option<String>,
    /// Protected column involved, if known.
    pub column: Option<String>,
    /// Full message for the client.
    pub message: String,
}

/// KM003: statement not supported on a protected column.
pub const KM003: &str = "KM003";
/// KM004: tenant could not be determined for a write.
pub const KM004: &str = "KM004";

impl Rejection {
    /// KM003 naming table and column.
    pub fn unsupported(table: &str, column: Option<&str>, what: &str) -> Self {
        let target = match column {
            Some(c) => format!("protected column {table}.{c}"),
            None => format!("protected table {table}"),
        };
        Self {
            sqlstate: KM003,
            table: Some(table.to_owned()),
            column: column.map(str::to_owned),
            message: format!("cmk-proxy: {what} is not supported on {target}"),
        }
    }
}

#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;
