//! The one lexer: PostgreSQL's own scanner (libpg_query's copy of scan.l).
//! The simple-query shapes, the templates of the proxy's own SQL and the
//! audit fingerprint all read tokens from here, so none of them can cut a
//! string, a comment or a dollar quote where the server does not.
//! Knows tokens only; what they mean is for the callers.

use std::ops::Range;

use pg_query::protobuf::Token as PgToken;

/// What a token is, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// `'…'`: a standard string constant, no prefix, on one piece.
    PlainString,
    /// Any other string constant: `E'…'`, `$tag$…$tag$`, `U&'…'`, `B'…'`,
    /// `X'…'`, a string continued on the next line, one with a backslash.
    OtherString,
    /// An unsigned numeric constant written with digits, `.` and an
    /// exponent only.
    Number,
    /// A numeric constant that PostgreSQL 16 and later read otherwise than
    /// 15 and earlier (`0x1F`, `0o17`, `0b1`, `1_000`).
    VersionedNumber,
    /// `$n`.
    Param(usize),
    /// `-- …` or `/* … */`.
    Comment,
    /// `;`.
    Semicolon,
    /// `U&"…"`: a name spelled with Unicode escapes.
    EscapedName,
    /// Words, quoted names, operators and punctuation.
    Other,
}

/// One token of the SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqlToken {
    /// What it is.
    pub kind: TokenKind,
    /// Its bytes in the SQL text.
    pub range: Range<usize>,
}

/// The tokens of `sql` as PostgreSQL reads it (standard-conforming
/// strings); `None` when PostgreSQL's scanner rejects it (an unterminated
/// quote or comment, a NUL byte).
pub(crate) fn tokens(sql: &str) -> Option<Vec<SqlToken>> {
    // pg_query 18.1 builds a slice from a null pointer when the scan finds
    // no token (undefined behaviour; debug builds abort the process): SQL
    // of PostgreSQL's whitespace only has no tokens, so it is not scanned.
    if sql
        .bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
    {
        return Some(Vec::new());
    }
    let scanned = pg_query::scan_tokens(sql).ok()?;
    let mut out = Vec::with_capacity(scanned.len());
    for token in scanned {
        let start = usize::try_from(token.start).ok()?;
        let end = usize::try_from(token.end).ok()?;
        let text = sql.get(start..end)?;
        let kind = match PgToken::try_from(token.token) {
            Ok(PgToken::Sconst) => string_kind(sql, start, text),
            Ok(PgToken::Usconst | PgToken::Bconst | PgToken::Xconst) => TokenKind::OtherString,
            Ok(PgToken::Iconst | PgToken::Fconst) => number_kind(text),
            Ok(PgToken::Param) => match text.get(1..).and_then(|n| n.parse().ok()) {
                Some(n) => TokenKind::Param(n),
                None => TokenKind::Other,
            },
            Ok(PgToken::SqlComment | PgToken::CComment) => TokenKind::Comment,
            Ok(PgToken::Ascii59) => TokenKind::Semicolon,
            Ok(PgToken::Uident) => TokenKind::EscapedName,
            _ => TokenKind::Other,
        };
        out.push(SqlToken {
            kind,
            range: start..end,
        });
    }
    Some(out)
}

/// A string constant is plain when it is `'…'` alone: no prefix glued to
/// it (the scanner's range starts at `E`, `N` is a separate keyword), no
/// backslash (its meaning depends on `standard_conforming_strings`), and no
/// continuation (`'a'\n'b'` is one constant whose text holds a quote pair
/// that is not a doubled quote).
fn string_kind(sql: &str, start: usize, text: &str) -> TokenKind {
    let glued = start > 0
        && sql
            .as_bytes()
            .get(start - 1)
            .is_some_and(|&b| is_word_byte(b) || b == b'&');
    let plain = !glued
        && text.len() >= 2
        && text.starts_with('\'')
        && text.ends_with('\'')
        && !text.contains('\\')
        && text[1..text.len() - 1]
            .replace("''", "")
            .find('\'')
            .is_none();
    if plain {
        TokenKind::PlainString
    } else {
        TokenKind::OtherString
    }
}

/// A byte that continues a word (PostgreSQL: letters, digits, `_`, `$`, and
/// every non-ASCII byte).
pub(crate) fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn number_kind(text: &str) -> TokenKind {
    let decimal = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if decimal {
        TokenKind::Number
    } else {
        TokenKind::VersionedNumber
    }
}

/// The highest `$n` in `sql`, as PostgreSQL's scanner reads it (0 when
/// there is none or the scanner rejects the text). Read from the tokens,
/// not from a walk of the parse tree: pg_query's walk skips parts of some
/// statements (the VALUES lists of an INSERT).
pub(crate) fn max_param(sql: &str) -> usize {
    tokens(sql)
        .unwrap_or_default()
        .iter()
        .filter_map(|token| match token.kind {
            TokenKind::Param(n) => Some(n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// How deep parentheses that follow a word (`f(`, `ROW(`, `IN (`) nest in
/// `sql`; `None` when the scanner rejects it. sqlparser's time grows
/// exponentially with nested function calls, so this is what bounds it.
pub(crate) fn call_nesting(sql: &str) -> Option<usize> {
    let mut open: Vec<bool> = Vec::new();
    let mut deepest = 0;
    let mut calls = 0usize;
    let mut after_word = false;
    for token in tokens(sql)? {
        let text = &sql[token.range.clone()];
        match (token.kind, text) {
            (TokenKind::Comment, _) => continue,
            (TokenKind::Other, "(") => {
                open.push(after_word);
                if after_word {
                    calls += 1;
                    deepest = deepest.max(calls);
                }
            }
            (TokenKind::Other, ")") if open.pop() == Some(true) => {
                calls = calls.saturating_sub(1);
            }
            _ => {}
        }
        after_word = matches!(token.kind, TokenKind::Other | TokenKind::EscapedName)
            && text
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'"' || b >= 0x80);
    }
    Some(deepest)
}

/// The value of a [`TokenKind::PlainString`]: its content with doubled
/// quotes undone.
pub(crate) fn plain_string_value(text: &str) -> std::borrow::Cow<'_, str> {
    let content = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or(text);
    if content.contains("''") {
        std::borrow::Cow::Owned(content.replace("''", "'"))
    } else {
        std::borrow::Cow::Borrowed(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, &str)> {
        tokens(sql)
            .unwrap()
            .into_iter()
            .map(|t| (t.kind, &sql[t.range]))
            .collect()
    }

    #[test]
    fn strings_are_cut_where_postgresql_cuts_them() {
        // A dollar quote whose tag is not ASCII: one string to PostgreSQL.
        let sql = "SELECT $§$, '$§$ AS a --'";
        let found = kinds(sql);
        assert_eq!(found[1], (TokenKind::OtherString, "$§$, '$§$"));
        assert_eq!(found[2], (TokenKind::Other, "AS"));
        // Nested comments close where PostgreSQL closes them.
        let found = kinds("SELECT /* a /* b */ 'c' */ 'd'");
        assert_eq!(found[1].0, TokenKind::Comment);
        assert_eq!(found[2], (TokenKind::PlainString, "'d'"));
        assert_eq!(
            kinds("SELECT E'a\\'b'")[1],
            (TokenKind::OtherString, "E'a\\'b'")
        );
        assert_eq!(kinds("SELECT 'a'\n'b'")[1].0, TokenKind::OtherString);
        assert_eq!(
            kinds("SELECT 'it''s'")[1],
            (TokenKind::PlainString, "'it''s'")
        );
        assert_eq!(kinds("SELECT U&\"x\"")[1].0, TokenKind::EscapedName);
        assert_eq!(kinds("SELECT 0x1F")[1].0, TokenKind::VersionedNumber);
        assert_eq!(kinds("SELECT 1.5e3")[1].0, TokenKind::Number);
        assert_eq!(kinds("SELECT $12")[1].0, TokenKind::Param(12));
        assert_eq!(tokens("SELECT 'open"), None);
        assert_eq!(tokens("SELECT /* open"), None);
    }

    #[test]
    fn the_highest_parameter_is_found_wherever_it_stands() {
        assert_eq!(
            max_param("INSERT INTO t (a, b) VALUES ($1, $3), ($2, $1)"),
            3
        );
        assert_eq!(max_param("SELECT '$9', $$ $8 $$, $2 -- $7"), 2);
        assert_eq!(max_param("SELECT 1"), 0);
    }

    #[test]
    fn call_nesting_counts_parentheses_after_words_only() {
        assert_eq!(call_nesting("SELECT abs(abs((1)))"), Some(2));
        assert_eq!(call_nesting("SELECT 1 IN (SELECT f(x) FROM t)"), Some(2));
        assert_eq!(call_nesting("SELECT ((((1))))"), Some(1));
        assert_eq!(call_nesting("SELECT f(/* ( */ 1) + g(2)"), Some(1));
        assert_eq!(call_nesting("SELECT \"f\"(')')"), Some(1));
    }

    #[test]
    fn a_plain_string_value_undoes_doubled_quotes() {
        assert_eq!(plain_string_value("'it''s'"), "it's");
        assert_eq!(plain_string_value("''"), "");
    }
}
