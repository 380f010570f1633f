//! The database's own refusal of plaintext: a CHECK constraint on every
//! protected column that accepts only NULL or a cell envelope. It holds
//! against what the proxy cannot see (server-side functions, DO blocks with
//! dynamic SQL, rules, triggers, direct connections, a parser mistake).
//! `migrate` adds it without a long lock (NOT VALID, then VALIDATE);
//! `check-config --live` prints it; `serve` warns where it is missing.
//!
//! Beside it, on every `search: equality` column, the blind-index CHECK:
//! a value has an index value and NULL has none. Validated, it proves that
//! a lookup through the index finds every row PostgreSQL would find on the
//! plaintext; the proxy answers lookups only on columns where it is.

use std::fmt;

use crate::config::{split_table_name, Policy, SearchMode, TableMode};

use super::{qualified, quote_ident, CatalogError};

/// The first bytes of every cell: `CMK` and format version 1.
pub(crate) const ENVELOPE_PREFIX_HEX: &str = "434d4b01";

/// How far a protected column's CHECK constraint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckState {
    /// No constraint of that name.
    Missing,
    /// Added NOT VALID: new writes are checked, old rows not yet.
    NotValidated,
}

/// Which rule a CHECK constraint states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// Every cell of the protected column is NULL or an envelope.
    Envelope,
    /// A searchable column's value has a blind index, and NULL has none.
    BlindIndex,
}

/// A protected column whose envelope (or blind-index) CHECK is missing or
/// not validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeCheck {
    /// `schema.table`.
    pub table: String,
    /// The protected column.
    pub column: String,
    /// The rule.
    pub kind: CheckKind,
    /// Where it stands.
    pub state: CheckState,
}

impl EnvelopeCheck {
    /// The constraint's name (PostgreSQL keeps 63 bytes of a name).
    pub fn name(&self) -> String {
        match self.kind {
            CheckKind::Envelope => constraint_name(&self.column),
            CheckKind::BlindIndex => blind_index_constraint_name(&self.column),
        }
    }

    /// `ALTER TABLE … ADD CONSTRAINT … NOT VALID`: a brief lock, no scan.
    pub fn add_sql(&self) -> String {
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID;",
            qualified(&self.table),
            quote_ident(&self.name()),
            check_clause(self.kind, &self.column),
        )
    }

    /// `ALTER TABLE … VALIDATE CONSTRAINT …`: scans the table under a lock
    /// that lets reads and writes go on (SHARE UPDATE EXCLUSIVE).
    pub fn validate_sql(&self) -> String {
        format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {};",
            qualified(&self.table),
            quote_ident(&self.name())
        )
    }

    /// The DDL that completes it.
    pub fn fix(&self) -> String {
        match self.state {
            CheckState::Missing => format!("{} {}", self.add_sql(), self.validate_sql()),
            CheckState::NotValidated => self.validate_sql(),
        }
    }
}

impl fmt::Display for EnvelopeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.kind, self.state) {
            (CheckKind::Envelope, CheckState::Missing) => {
                "has no CHECK constraint refusing non-envelope cells"
            }
            (CheckKind::Envelope, CheckState::NotValidated) => {
                "has its envelope CHECK constraint NOT VALID (rows written before it are unchecked)"
            }
            (CheckKind::BlindIndex, CheckState::Missing) => {
                "has no CHECK constraint that every value has a blind index (equality lookups on it are refused)"
            }
            (CheckKind::BlindIndex, CheckState::NotValidated) => {
                "has its blind-index CHECK constraint NOT VALID (equality lookups on it are refused until it is validated)"
            }
        };
        write!(f, "{}.{}: {what}", self.table, self.column)
    }
}

/// The CHECK clause of a rule on `column`; the blind-index one as
/// PostgreSQL prints it back (`pg_get_constraintdef`), so the proxy can
/// recognise it.
pub(crate) fn check_clause(kind: CheckKind, column: &str) -> String {
    let quoted = quote_ident(column);
    match kind {
        CheckKind::Envelope => {
            format!("CHECK (substr({quoted}, 1, 4) = '\\x{ENVELOPE_PREFIX_HEX}'::bytea)")
        }
        CheckKind::BlindIndex => format!(
            "CHECK ((({quoted} IS NULL) = ({} IS NULL)))",
            quote_ident(&format!("{column}_bidx"))
        ),
    }
}

/// `cmk_bidx_<column>`, cut to PostgreSQL's 63-byte names.
pub(crate) fn blind_index_constraint_name(column: &str) -> String {
    let mut name = format!("cmk_bidx_{column}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// `cmk_envelope_<column>`, cut to PostgreSQL's 63-byte names.
pub(crate) fn constraint_name(column: &str) -> String {
    let mut name = format!("cmk_envelope_{column}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Protected bytea columns of existing policy tables whose envelope CHECK
/// is missing or not validated. Tables in `mode: migrating` hold legacy
/// plaintext by design and are left out, as are tables in transition (a
/// view has their name; `cmk-proxy encrypt` adds the checks at the end).
pub async fn envelope_checks(
    client: &tokio_postgres::Client,
    policy: &Policy,
) -> Result<Vec<EnvelopeCheck>, CatalogError> {
    let mut out = Vec::new();
    for (table, table_policy) in &policy.tables {
        if table_policy.mode == TableMode::Migrating {
            continue;
        }
        let Some((schema, name)) = split_table_name(table) else {
            continue;
        };
        for (column, column_policy) in &table_policy.columns {
            let mut kinds = vec![CheckKind::Envelope];
            if column_policy.search == SearchMode::Equality {
                kinds.push(CheckKind::BlindIndex);
            }
            for kind in kinds {
                let constraint = match kind {
                    CheckKind::Envelope => constraint_name(column),
                    CheckKind::BlindIndex => blind_index_constraint_name(column),
                };
                let row = client
                    .query_opt(
                        "SELECT (SELECT k.convalidated FROM pg_catalog.pg_constraint k \
                                 WHERE k.conrelid = c.oid AND k.contype = 'c' AND k.conname = $4) \
                         FROM pg_catalog.pg_class c \
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped \
                         WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 \
                           AND c.relkind IN ('r', 'p') AND a.atttypid = 'pg_catalog.bytea'::regtype",
                        &[&schema, &name, column, &constraint],
                    )
                    .await?;
                let state = match row.map(|r| r.get::<_, Option<bool>>(0)) {
                    // No such bytea column: the schema check reports it.
                    None => continue,
                    Some(Some(true)) => continue,
                    Some(Some(false)) => CheckState::NotValidated,
                    Some(None) => CheckState::Missing,
                };
                out.push(EnvelopeCheck {
                    table: table.clone(),
                    column: column.clone(),
                    kind,
                    state,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constraint_accepts_only_the_envelope_prefix_and_fits_a_name() {
        let check = EnvelopeCheck {
            table: "public.patients".into(),
            column: "ssn".into(),
            kind: CheckKind::Envelope,
            state: CheckState::Missing,
        };
        assert_eq!(
            check.fix(),
            "ALTER TABLE public.patients ADD CONSTRAINT cmk_envelope_ssn CHECK \
             (substr(ssn, 1, 4) = '\\x434d4b01'::bytea) NOT VALID; \
             ALTER TABLE public.patients VALIDATE CONSTRAINT cmk_envelope_ssn;"
        );
        assert_eq!(constraint_name(&"c".repeat(80)).len(), 63);
    }
}
