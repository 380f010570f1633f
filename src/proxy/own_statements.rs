//! The proxy's own named prepared statements on one server connection.
//!
//! A simple-query write planned by its shape runs as a named statement of
//! the proxy: parsed once per connection, then only bound and executed,
//! its cells as binary parameters. PostgreSQL then neither parses and plans
//! the statement again nor scans and hex-decodes the ciphertext (about a
//! quarter of its CPU for a write of a 1 KiB cell).
//!
//! So does an unnamed extended-protocol Parse on protected tables that the
//! session sends again (drivers that never name statements send one per
//! execution): the repeat is answered by a Parse of the proxy's statement
//! when new, else by an empty unnamed Parse, and the client's Binds and
//! Describes of its unnamed statement name the proxy's. Directly against
//! PostgreSQL, pgbench's encrypted-workload script costs the server about
//! half the CPU per transaction when prepared (docs/BENCHMARKS.md).
//!
//! Names start with [`NAME_PREFIX`]; clients may not use them. A statement
//! is used again only once its ParseComplete arrived. Names are never used
//! twice, so a statement the proxy forgot (its Parse failed, the client ran
//! DEALLOCATE or DISCARD or DDL, the server lost it) is parsed again under a
//! new name and no Parse can meet an old statement of the same name; the
//! forgotten ones are closed with the next batch (closing a statement that
//! does not exist is no error), so none lingers on the server. They are
//! unique across sessions and proxy processes too (a random tag per
//! process), so that behind a pooler that hands server connections from one
//! session to another no session binds another's statement.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use crate::catalog::CatalogMap;

/// The prefix of the proxy's statement names.
pub(crate) const NAME_PREFIX: &str = "__cmk_proxy_";

/// Statements kept per connection; the oldest is closed for a new one.
const MAX_STATEMENTS: usize = 64;

/// Forgotten statements waiting to be closed, at most (beyond, the oldest
/// are left to the end of the connection).
const MAX_TO_CLOSE: usize = 256;

/// The server statement a write runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatementUse {
    /// The statement's number (its name is [`statement_name`]).
    pub number: u64,
    /// It is new: send its Parse first.
    pub parse: bool,
    /// Statements to close first (forgotten, or making room).
    pub close: Vec<u64>,
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
    /// The catalog map they were parsed under: a new one (DDL seen, or the
    /// periodic reload) means the schema may have changed, and PostgreSQL
    /// keeps the parameter types it inferred at Parse (a column now `text`
    /// would still get `int4` for `'007'`). Weak: an idle session does not
    /// keep an old map's contents alive (the allocation it keeps cannot be
    /// reused for a newer map, so the comparison stays exact).
    catalog: Weak<CatalogMap>,
    /// Forgotten statements the server may still hold.
    to_close: VecDeque<u64>,
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

/// What SQL text says about prepared statements, read in one pass (every
/// simple query and Parse is read, 1 KiB literals included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StatementWords {
    /// It has the word `DEALLOCATE` or `DISCARD` (anywhere, a string too:
    /// a false alarm only costs a new Parse): it may drop statements.
    pub drops: bool,
    /// It names one of the proxy's statements, or may: a `U&"…"` name next
    /// to `PREPARE`, `EXECUTE` or `DEALLOCATE` can spell one with escapes
    /// (a client's use of them is refused).
    pub names_own: bool,
    /// It has `execute`, in any case, anywhere.
    pub executes: bool,
    /// It has the word `prepare` (anywhere, a string too).
    pub prepares: bool,
}

/// The words [`StatementWords`] looks for, in this order.
const WORDS: [&str; 6] = [
    "deallocate",
    "discard",
    NAME_PREFIX,
    "u&\"",
    "prepare",
    "execute",
];

impl StatementWords {
    /// Reads `sql`.
    pub(crate) fn of(sql: &str) -> Self {
        static SEARCH: OnceLock<Option<aho_corasick::AhoCorasick>> = OnceLock::new();
        let search = SEARCH.get_or_init(|| {
            aho_corasick::AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(WORDS)
                .ok()
        });
        let Some(search) = search else {
            // Cannot happen (fixed patterns); read as the most careful answer.
            return Self {
                drops: true,
                names_own: true,
                executes: true,
                prepares: true,
            };
        };
        let bytes = sql.as_bytes();
        let is_word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || *b >= 0x80;
        let mut found = [false; WORDS.len()];
        for hit in search.find_overlapping_iter(bytes) {
            let (start, end) = (hit.start(), hit.end());
            let whole_word = !start
                .checked_sub(1)
                .and_then(|i| bytes.get(i))
                .is_some_and(is_word)
                && !bytes.get(end).is_some_and(is_word);
            let index = hit.pattern().as_usize();
            // The statement-name prefix, `U&"` and `execute` count anywhere.
            if whole_word || matches!(index, 2 | 3 | 5) {
                found[index] = true;
            }
        }
        let [deallocate, discard, own_prefix, unicode_name, prepare, execute] = found;
        Self {
            drops: deallocate || discard,
            names_own: own_prefix || (unicode_name && (prepare || execute || deallocate)),
            executes: execute,
            prepares: prepare,
        }
    }
}

impl OwnStatements {
    /// The statement to run `sql` with parameter `types` as: the one parsed
    /// before, or a new one (closing the oldest when full). One whose Parse
    /// is still unanswered is not used: should that Parse fail, a Bind of
    /// it would fail too.
    pub(crate) fn statement_for(
        &mut self,
        sql: &Arc<str>,
        types: &[u32],
        catalog: &Arc<CatalogMap>,
    ) -> StatementUse {
        if !std::ptr::eq(self.catalog.as_ptr(), Arc::as_ptr(catalog)) {
            self.clear();
            self.catalog = Arc::downgrade(catalog);
        }
        let mut close: Vec<u64> = self.to_close.drain(..).collect();
        if let Some(entry) = self
            .entries
            .iter()
            .find(|e| e.ready && *e.sql == **sql && e.types == types)
        {
            return StatementUse {
                number: entry.number,
                parse: false,
                close,
            };
        }
        if self.entries.len() >= MAX_STATEMENTS {
            close.extend(self.entries.pop_front().map(|e| e.number));
        }
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

    /// A query run as statement `number` failed with `sqlstate` (`None`:
    /// its cycle ended). The statement is forgotten when its Parse failed or
    /// was skipped, or when the server no longer has it (26000) or cannot
    /// run it as planned (0A000: a cached plan whose result type changed;
    /// closed with the next batch).
    pub(crate) fn failed(&mut self, number: u64, sqlstate: Option<&str>) {
        let lost = matches!(sqlstate, Some("26000" | "0A000"));
        let Some(index) = self.entries.iter().position(|e| e.number == number) else {
            return;
        };
        let ready = self.entries[index].ready;
        if !ready || lost {
            self.entries.remove(index);
        }
        if ready && lost {
            self.close_later([number]);
        }
    }

    /// Forgets every statement, closing them with the next batch (the
    /// client may have dropped them, or changed what they mean).
    pub(crate) fn clear(&mut self) {
        let numbers: Vec<u64> = self.entries.drain(..).map(|e| e.number).collect();
        self.close_later(numbers);
    }

    fn close_later(&mut self, numbers: impl IntoIterator<Item = u64>) {
        self.to_close.extend(numbers);
        while self.to_close.len() > MAX_TO_CLOSE {
            self.to_close.pop_front();
        }
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
        let map = Arc::new(CatalogMap::default());
        let sql: Arc<str> = Arc::from("INSERT INTO t VALUES ($1, $2)");
        let first = own.statement_for(&sql, &[23, 17], &map);
        assert!(first.parse);
        // Not used again before its ParseComplete.
        let early = own.statement_for(&sql, &[23, 17], &map);
        assert!(early.parse && early.number != first.number);
        own.parsed(first.number);
        let again = own.statement_for(&sql, &[23, 17], &map);
        assert_eq!((again.number, again.parse), (first.number, false));
        let other_types = own.statement_for(&sql, &[20, 17], &map);
        assert!(other_types.parse);
        assert_ne!(other_types.number, first.number);
    }

    #[test]
    fn a_failed_parse_or_a_lost_statement_is_parsed_again_under_a_new_name() {
        let mut own = OwnStatements::default();
        let map = Arc::new(CatalogMap::default());
        let sql: Arc<str> = Arc::from("UPDATE t SET a = $1");
        let first = own.statement_for(&sql, &[0], &map);
        own.failed(first.number, Some("42P01"));
        let second = own.statement_for(&sql, &[0], &map);
        assert!(second.parse && second.number > first.number);
        own.parsed(second.number);
        // An error of an execution keeps a parsed statement...
        own.failed(second.number, Some("23505"));
        assert!(!own.statement_for(&sql, &[0], &map).parse);
        // ...unless the server lost it: then it is closed with the next.
        own.failed(second.number, Some("0A000"));
        let third = own.statement_for(&sql, &[0], &map);
        assert!(third.parse && third.number > second.number);
        assert_eq!(third.close, vec![second.number]);
        own.parsed(third.number);
        own.clear();
        assert_eq!(own.len(), 0);
        let fourth = own.statement_for(&sql, &[0], &map);
        assert_eq!(fourth.close, vec![third.number]);
    }

    #[test]
    fn a_new_catalog_map_makes_every_statement_new() {
        let mut own = OwnStatements::default();
        let sql: Arc<str> = Arc::from("INSERT INTO t VALUES ($1)");
        let first_map = Arc::new(CatalogMap::default());
        let first = own.statement_for(&sql, &[0], &first_map);
        own.parsed(first.number);
        assert!(!own.statement_for(&sql, &[0], &first_map).parse);
        let again = own.statement_for(&sql, &[0], &Arc::new(CatalogMap::default()));
        assert!(again.parse);
        assert_eq!(again.close, vec![first.number]);
    }

    #[test]
    fn the_oldest_statement_is_closed_to_make_room() {
        let mut own = OwnStatements::default();
        let map = Arc::new(CatalogMap::default());
        let mut first = None;
        for i in 0..MAX_STATEMENTS {
            let sql: Arc<str> = Arc::from(format!("SELECT {i}"));
            let use_ = own.statement_for(&sql, &[], &map);
            assert!(use_.close.is_empty());
            first.get_or_insert(use_.number);
        }
        let sql: Arc<str> = Arc::from("SELECT 'new'");
        let use_ = own.statement_for(&sql, &[], &map);
        assert_eq!(use_.close, first.into_iter().collect::<Vec<_>>());
        assert_eq!(own.len(), MAX_STATEMENTS);
    }

    #[test]
    fn names_are_recognized_in_any_case() {
        assert!(is_own_name(&statement_name(7)));
        assert!(is_own_name("__CMK_PROXY_7"));
        assert!(!is_own_name("__cmk_prox"));
        let names_own = |sql: &str| StatementWords::of(sql).names_own;
        let drops = |sql: &str| StatementWords::of(sql).drops;
        assert!(names_own("EXECUTE __Cmk_Proxy_3(1)"));
        assert!(names_own("EXECUTE x__cmk_proxy_3(1)"));
        assert!(names_own("execute U&\"\\005F\\005Fcmk_proxy_1\"(1)"));
        assert!(!names_own("SELECT * FROM U&\"t\""));
        assert!(!names_own("SELECT 1"));
        assert!(drops("DEALLOCATE ALL"));
        assert!(drops("discard all"));
        assert!(drops("SELECT 1;DISCARD PLANS"));
        assert!(!drops("SELECT 1"));
        assert!(!drops("SELECT discarded_at FROM t"));
        assert!(!drops("SELECT 1 FROM undiscard"));
    }
}
