//! The proxy's own named prepared statements on one server connection.
//!
//! A simple-query write planned by its shape runs as a named statement of
//! the proxy: parsed once per connection, then only bound and executed,
//! its cells as binary parameters. PostgreSQL then neither parses and plans
//! the statement again nor scans and hex-decodes the ciphertext (about a
//! quarter of its CPU for a write of a 1 KiB cell).
//!
//! Names start with [`NAME_PREFIX`]; clients may not use them. A statement
//! is known to exist once its ParseComplete arrived. Names are never used
//! twice, so a statement the proxy forgot (its Parse failed, the client ran
//! DEALLOCATE or DISCARD, the server lost it) is parsed again under a new
//! name and no Parse can meet an old statement of the same name. They are
//! unique across sessions and proxy processes too (a random tag per
//! process), so that behind a pooler that hands server connections from one
//! session to another no session binds another's statement.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The prefix of the proxy's statement names.
pub(crate) const NAME_PREFIX: &str = "__cmk_proxy_";

/// Statements kept per connection; the oldest is closed for a new one.
const MAX_STATEMENTS: usize = 64;

/// The server statement a write runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatementUse {
    /// The statement's number (its name is [`statement_name`]).
    pub number: u64,
    /// It is new: send its Parse first.
    pub parse: bool,
    /// The statement to close first to make room.
    pub close: Option<u64>,
}

/// SQL and declared parameter types of one statement.
#[derive(Debug)]
struct Entry {
    sql: Arc<str>,
    types: Vec<u32>,
    number: u64,
    /// Its ParseComplete arrived: the server holds it.
    ready: bool,
}

/// The statements the proxy has parsed on one server connection.
#[derive(Debug, Default)]
pub(crate) struct OwnStatements {
    /// Oldest first.
    entries: VecDeque<Entry>,
}

/// Statement numbers, unique in the process.
static NEXT_NUMBER: AtomicU64 = AtomicU64::new(1);

/// The wire name of statement `number`: prefix, process tag, number.
pub(crate) fn statement_name(number: u64) -> String {
    static PROCESS_TAG: OnceLock<u32> = OnceLock::new();
    let tag = PROCESS_TAG.get_or_init(rand::random::<u32>);
    format!("{NAME_PREFIX}{tag:08x}_{number}")
}

/// True when `name` is one of the proxy's statement names.
pub(crate) fn is_own_name(name: &str) -> bool {
    name.len() >= NAME_PREFIX.len()
        && name.as_bytes()[..NAME_PREFIX.len()].eq_ignore_ascii_case(NAME_PREFIX.as_bytes())
}

/// True when SQL text names one of the proxy's statements (a client's
/// `PREPARE`, `EXECUTE` or `DEALLOCATE` of it is refused).
pub(crate) fn mentions_own_name(sql: &str) -> bool {
    let prefix = NAME_PREFIX.as_bytes();
    sql.as_bytes()
        .windows(prefix.len())
        .any(|w| w.eq_ignore_ascii_case(prefix))
}

/// True when SQL may drop prepared statements (`DEALLOCATE`, `DISCARD`).
pub(crate) fn may_drop_statements(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    [&b"deallocate"[..], &b"discard"[..]].iter().any(|word| {
        bytes
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    })
}

impl OwnStatements {
    /// The statement to run `sql` with parameter `types` as: the one parsed
    /// before, or a new one (closing the oldest when full).
    pub(crate) fn statement_for(&mut self, sql: &Arc<str>, types: &[u32]) -> StatementUse {
        if let Some(entry) = self
            .entries
            .iter()
            .find(|e| *e.sql == **sql && e.types == types)
        {
            return StatementUse {
                number: entry.number,
                parse: false,
                close: None,
            };
        }
        let close = if self.entries.len() >= MAX_STATEMENTS {
            self.entries.pop_front().map(|e| e.number)
        } else {
            None
        };
        let number = NEXT_NUMBER.fetch_add(1, Ordering::Relaxed);
        self.entries.push_back(Entry {
            sql: sql.clone(),
            types: types.to_vec(),
            number,
            ready: false,
        });
        StatementUse {
            number,
            parse: true,
            close,
        }
    }

    /// Its ParseComplete arrived.
    pub(crate) fn parsed(&mut self, number: u64) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.number == number) {
            entry.ready = true;
        }
    }

    /// A query run as statement `number` failed with `sqlstate`. The
    /// statement is forgotten when its Parse failed, or when the server no
    /// longer has it (26000) or cannot run it as planned (0A000: a cached
    /// plan whose result type changed).
    pub(crate) fn failed(&mut self, number: u64, sqlstate: Option<&str>) {
        let lost = matches!(sqlstate, Some("26000" | "0A000"));
        self.entries
            .retain(|e| e.number != number || (e.ready && !lost));
    }

    /// Forgets every statement (the client may have dropped them).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Statements known or being parsed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_parsed_once_per_sql_and_types() {
        let mut own = OwnStatements::default();
        let sql: Arc<str> = Arc::from("INSERT INTO t VALUES ($1, $2)");
        let first = own.statement_for(&sql, &[23, 17]);
        assert!(first.parse);
        own.parsed(first.number);
        let again = own.statement_for(&sql, &[23, 17]);
        assert_eq!((again.number, again.parse), (first.number, false));
        let other_types = own.statement_for(&sql, &[20, 17]);
        assert!(other_types.parse);
        assert_ne!(other_types.number, first.number);
    }

    #[test]
    fn a_failed_parse_or_a_lost_statement_is_parsed_again_under_a_new_name() {
        let mut own = OwnStatements::default();
        let sql: Arc<str> = Arc::from("UPDATE t SET a = $1");
        let first = own.statement_for(&sql, &[0]);
        own.failed(first.number, Some("42P01"));
        let second = own.statement_for(&sql, &[0]);
        assert!(second.parse && second.number > first.number);
        own.parsed(second.number);
        // An error of an execution keeps a parsed statement...
        own.failed(second.number, Some("23505"));
        assert!(!own.statement_for(&sql, &[0]).parse);
        // ...unless the server lost it.
        own.failed(second.number, Some("26000"));
        let third = own.statement_for(&sql, &[0]);
        assert!(third.parse && third.number > second.number);
        own.clear();
        assert_eq!(own.len(), 0);
    }

    #[test]
    fn the_oldest_statement_is_closed_to_make_room() {
        let mut own = OwnStatements::default();
        let mut first = None;
        for i in 0..MAX_STATEMENTS {
            let sql: Arc<str> = Arc::from(format!("SELECT {i}"));
            let use_ = own.statement_for(&sql, &[]);
            assert_eq!(use_.close, None);
            first.get_or_insert(use_.number);
        }
        let sql: Arc<str> = Arc::from("SELECT 'new'");
        let use_ = own.statement_for(&sql, &[]);
        assert_eq!(use_.close, first);
        assert_eq!(own.len(), MAX_STATEMENTS);
    }

    #[test]
    fn names_are_recognized_in_any_case() {
        assert!(is_own_name(&statement_name(7)));
        assert!(is_own_name("__CMK_PROXY_7"));
        assert!(!is_own_name("__cmk_prox"));
        assert!(mentions_own_name("EXECUTE __Cmk_Proxy_3(1)"));
        assert!(!mentions_own_name("SELECT 1"));
        assert!(may_drop_statements("DEALLOCATE ALL"));
        assert!(may_drop_statements("discard all"));
        assert!(!may_drop_statements("SELECT 1"));
    }
}
