//! The gate between PostgreSQL's reading of SQL and sqlparser's: which
//! statements need the proxy at all, sqlparser run in bounded time, and the
//! refusal of a query string the two read differently. See
//! docs/SQL-READING.md.

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::analyze::{mentions_protected, names_tenant_setting, Scope};
use super::pg_reading::{PgReading, StatementClass};
use super::Rejection;

/// sqlparser's statements of `sql`, in bounded time: `None` when calls
/// nest too deep for it (its time doubles with each level) or it cannot
/// parse the SQL. Every use of sqlparser goes through here.
pub fn parse_statements(sql: &str) -> Option<Vec<Statement>> {
    if super::lexer::call_nesting(sql).is_some_and(|n| n > MAX_CALL_NESTING) {
        return None;
    }
    parse_bounded(sql).ok()
}

/// sqlparser with a recursion limit: the depth check above bounds what
/// PostgreSQL's reading may hold, this bounds sqlparser's own descent.
pub(super) fn parse_bounded(sql: &str) -> Result<Vec<Statement>, ()> {
    Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(SQLPARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|_| ())
}

/// Comparison operators whose `OPERATOR(pg_catalog.op)` form before
/// `ANY`/`ALL`/`SOME` sqlparser cannot read (pg_dump writes it).
const QUALIFIED_COMPARISONS: [&str; 6] = ["=", "<>", "<", ">", "<=", ">="];

/// `sql` with every `OPERATOR(pg_catalog.op) ANY|ALL|SOME (…)` of a
/// comparison written `op ANY|ALL|SOME (…)`, for sqlparser, which reads only
/// the latter (`pg_dump -t` asks `relkind OPERATOR(pg_catalog.=) ANY
/// (array[…])`). `None`: there is none. Tokens come from the one lexer, so
/// nothing inside a string or comment is touched; the disagreement check
/// compares operators without their `pg_catalog` qualifier.
pub(super) fn with_plain_comparisons(sql: &str) -> Option<String> {
    let tokens = super::lexer::tokens(sql)?;
    let text = |i: usize| tokens.get(i).map(|t| &sql[t.range.clone()]);
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    let mut i = 0;
    while i < tokens.len() {
        let qualified = text(i).is_some_and(|w| w.eq_ignore_ascii_case("operator"))
            && text(i + 1) == Some("(")
            && text(i + 2).is_some_and(|w| w.eq_ignore_ascii_case("pg_catalog"))
            && text(i + 3) == Some(".")
            && text(i + 4).is_some_and(|op| QUALIFIED_COMPARISONS.contains(&op))
            && text(i + 5) == Some(")")
            && text(i + 6).is_some_and(|w| {
                ["any", "all", "some"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k))
            });
        if qualified {
            out.push_str(&sql[copied..tokens[i].range.start]);
            out.push(' ');
            out.push_str(text(i + 4).unwrap_or("="));
            out.push(' ');
            copied = tokens[i + 5].range.end;
            i += 6;
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

/// Deepest nesting of calls (`f(`, `ROW(`, `IN (`) sqlparser is given: its
/// time doubles with each level (a millisecond at 10, seconds at 20).
pub(super) const MAX_CALL_NESTING: usize = 10;

/// sqlparser's own nesting limit (its default is 50).
const SQLPARSER_RECURSION_LIMIT: usize = 64;

/// True when the query string may touch what the proxy guards: a protected
/// table, view or child (named in the text, or by PostgreSQL's decoding of
/// the names), the tenant setting, `set_config`, `pg_settings`, or a
/// statement the proxy follows whatever it names (transactions, SET,
/// PREPARE, COPY, DO, functions …). Anything else passes untouched without
/// sqlparser ever reading it.
pub(super) fn needs_the_proxy(
    scope: &Scope<'_>,
    reading: &PgReading,
    index: usize,
    sql: &str,
) -> bool {
    let text = reading.text(index, sql);
    match reading.classes().get(index) {
        Some(StatementClass::Show) => false,
        Some(StatementClass::Followed) => true,
        _ => {
            mentions_protected(scope, text).is_some()
                || names_tenant_setting(scope.policy, text)
                || has_unicode_escape(text)
                || reading.names_any(index, |name| is_guarded_name(scope, name))
        }
    }
}

/// A relation or function name (its last part, as PostgreSQL decoded it)
/// that the proxy guards.
pub(super) fn is_guarded_name(scope: &Scope<'_>, bare: &str) -> bool {
    let is_bare = |key: &String| key.rsplit('.').next() == Some(bare);
    scope.policy.tables.keys().any(is_bare)
        || scope.views.keys().any(is_bare)
        || scope.children.keys().any(is_bare)
        || matches!(bare, "set_config" | "pg_settings")
}

/// `U&'…'` or `U&"…"` anywhere (escapes can spell any name).
pub(super) fn has_unicode_escape(sql: &str) -> bool {
    sql.as_bytes()
        .windows(2)
        .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&')
}

/// The refusal of a query string that sqlparser reads otherwise than
/// PostgreSQL: another number of statements, or a statement that, printed
/// back from sqlparser's tree, PostgreSQL parses to another tree than the
/// client's text. Whatever sqlparser misread (a dollar quote, a nested
/// comment, an escape) would make every later check a check of some other
/// statement.
pub(super) fn disagreement(
    scope: &Scope<'_>,
    reading: &PgReading,
    statements: &[Statement],
    sql: &str,
) -> Result<(), Rejection> {
    // A SHOW touches no data (and sqlparser prints `SHOW a.b` as `SHOW a b`).
    let agrees = statements.len() == reading.len()
        && statements.iter().enumerate().all(|(i, statement)| {
            reading.classes().get(i) == Some(&StatementClass::Show)
                && matches!(statement, Statement::ShowVariable { .. })
                || reading.agrees(i, &statement.to_string())
        });
    if agrees {
        return Ok(());
    }
    Err(Rejection::unsupported(
        mentions_protected(scope, sql).as_deref().unwrap_or(""),
        None,
        "SQL that cmk-proxy's parser reads otherwise than PostgreSQL (write it more plainly: \
         standard quotes, no nested comments)",
    ))
}
