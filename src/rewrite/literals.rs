//! The literal-insensitive shape of a simple query. Every string and number
//! literal becomes a placeholder `$n`, so queries that differ only in their
//! values share one plan, and the literals are kept to be put back. Also
//! the other direction: SQL cut at its placeholders, to be filled again and
//! again ([`SqlTemplate`]).
//!
//! The scanner reads only what it reads with certainty. Escape strings
//! (`E'..'`), prefixed strings (`B'..'`, `X'..'`, `U&'..'`, `N'..'`),
//! Unicode-escaped names (`U&"..."`), dollar
//! quotes, a backslash in a string (its meaning depends on
//! `standard_conforming_strings`), strings continued on the next line,
//! numbers glued to letters (`0x1F`, `1_000`) and unterminated quotes or
//! comments all give `None`: the caller then plans the original SQL.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

use super::lexer::{self, is_word_byte, TokenKind};

/// A literal of the original SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal<'a> {
    /// As written, quotes included: put back verbatim where it is not encrypted.
    pub source: &'a str,
    /// Its value: a string's content with doubled quotes undone, or the number.
    pub value: Cow<'a, str>,
}

/// SQL whose literals are replaced by `$1..$n`, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameterized<'a> {
    /// The SQL with placeholders: the key of its plan.
    pub template: String,
    /// `literals[n - 1]` is the literal behind `$n`.
    pub literals: Vec<Literal<'a>>,
}

/// More literals than this: planned as written (a huge multi-row INSERT
/// gains nothing from a shared plan).
const MAX_LITERALS: usize = 4096;

/// The literal-insensitive form of `sql`, or `None` when the scanner cannot
/// read it with certainty, when `sql` holds parameters of its own, or when
/// it holds more than one statement.
pub fn parameterize(sql: &str) -> Option<Parameterized<'_>> {
    let mut template = String::with_capacity(sql.len().min(1024));
    let mut literals = Vec::new();
    scan(sql, |token| {
        match token {
            Token::Text(range) => template.push_str(&sql[range]),
            Token::Param(_) => return None,
            Token::String { range, value } => {
                literals.push(Literal {
                    source: &sql[range],
                    value,
                });
                let _ = write!(template, "${}", literals.len());
            }
            Token::Number(range) => {
                let source = &sql[range];
                literals.push(Literal {
                    source,
                    value: Cow::Borrowed(source),
                });
                let _ = write!(template, "${}", literals.len());
            }
        }
        (literals.len() <= MAX_LITERALS).then_some(())
    })?;
    // One statement: a `;` only at the very end (a `;` in a quoted name or
    // a comment also lands here, which only costs the shared plan).
    let body = template.trim_end();
    let body = body.strip_suffix(';').unwrap_or(body);
    if body.contains(';') {
        return None;
    }
    Some(Parameterized { template, literals })
}

/// SQL cut at its placeholders `$n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlTemplate {
    pieces: Vec<Piece>,
    /// Bytes of text outside placeholders (to size the output).
    text_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(usize),
}

impl SqlTemplate {
    /// Cuts `sql` at its placeholders; `None` if the scanner cannot read it.
    pub fn new(sql: &str) -> Option<Self> {
        let mut pieces: Vec<Piece> = Vec::new();
        scan(sql, |token| {
            match token {
                Token::Param(n) => pieces.push(Piece::Param(n)),
                Token::Text(range) | Token::String { range, .. } | Token::Number(range) => {
                    match pieces.last_mut() {
                        Some(Piece::Text(text)) => text.push_str(&sql[range]),
                        _ => pieces.push(Piece::Text(sql[range].to_owned())),
                    }
                }
            }
            Some(())
        })?;
        let text_len = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Param(_) => 0,
            })
            .sum();
        Some(Self { pieces, text_len })
    }

    /// The numbers of the placeholders, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(n) => Some(*n),
            Piece::Text(_) => None,
        })
    }

    /// The SQL with each placeholder `$n` replaced by what `put(n, out)`
    /// appends; `None` as soon as `put` has nothing for a placeholder.
    pub fn fill(
        &self,
        extra: usize,
        mut put: impl FnMut(usize, &mut String) -> Option<()>,
    ) -> Option<String> {
        let mut out = String::with_capacity(self.text_len + extra);
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Param(n) => put(*n, &mut out)?,
            }
        }
        Some(out)
    }
}

/// What the scanner finds, in order; `Text` runs may be split.
enum Token<'a> {
    /// Anything that is not a literal or placeholder (words, operators,
    /// quoted names, comments, whitespace).
    Text(Range<usize>),
    /// `'...'` with its value.
    String {
        range: Range<usize>,
        value: Cow<'a, str>,
    },
    /// An unsigned numeric constant.
    Number(Range<usize>),
    /// `$n`.
    Param(usize),
}

/// Walks `sql` token by token, as PostgreSQL's scanner cuts it; `None`
/// when `on` says stop or a token is one whose value the shapes do not
/// read with certainty (see [`TokenKind`]).
fn scan<'a>(sql: &'a str, mut on: impl FnMut(Token<'a>) -> Option<()>) -> Option<()> {
    let mut text_start = 0;
    for token in lexer::tokens(sql)? {
        let range = token.range.clone();
        let found = match token.kind {
            TokenKind::PlainString => Token::String {
                range: range.clone(),
                value: lexer::plain_string_value(&sql[range.clone()]),
            },
            TokenKind::Number => Token::Number(range.clone()),
            TokenKind::Param(n) => Token::Param(n),
            TokenKind::OtherString | TokenKind::VersionedNumber | TokenKind::EscapedName => {
                return None
            }
            TokenKind::Comment | TokenKind::Semicolon | TokenKind::Other => continue,
        };
        // A placeholder glued to a word would read as another token
        // (`'a'x` is a string and an alias; `$1x` is not; `1abc` is `1 abc`
        // to PostgreSQL 15 and an error to 16).
        if sql[range.end..]
            .bytes()
            .next()
            .is_some_and(|b| is_word_byte(b) || (b == b'.' && matches!(found, Token::Number(_))))
        {
            return None;
        }
        if text_start < range.start {
            on(Token::Text(text_start..range.start))?;
        }
        on(found)?;
        text_start = range.end;
    }
    if text_start < sql.len() {
        on(Token::Text(text_start..sql.len()))?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Option<(String, Vec<(String, String)>)> {
        parameterize(sql).map(|p| {
            let literals = p
                .literals
                .iter()
                .map(|l| (l.source.to_owned(), l.value.to_string()))
                .collect();
            (p.template, literals)
        })
    }

    fn pair(source: &str, value: &str) -> (String, String) {
        (source.to_owned(), value.to_owned())
    }

    #[test]
    fn strings_and_numbers_become_placeholders_in_order() {
        let (template, literals) = shape(
            "INSERT INTO t1 (a, b, c) VALUES ('it''s', 42, -1.5e3) RETURNING id, x2 -- 'no' 7\n;",
        )
        .unwrap();
        assert_eq!(
            template,
            "INSERT INTO t1 (a, b, c) VALUES ($1, $2, -$3) RETURNING id, x2 -- 'no' 7\n;"
        );
        assert_eq!(
            literals,
            vec![
                pair("'it''s'", "it's"),
                pair("42", "42"),
                pair("1.5e3", "1.5e3")
            ]
        );
    }

    #[test]
    fn names_comments_and_casts_are_not_literals() {
        let (template, literals) =
            shape(r#"SELECT "a'b""c", x FROM s.t /* '1' /* 2 */ 3 */ WHERE d = '2020-01-01'::date AND e = .5"#)
                .unwrap();
        assert_eq!(
            template,
            r#"SELECT "a'b""c", x FROM s.t /* '1' /* 2 */ 3 */ WHERE d = $1::date AND e = $2"#
        );
        assert_eq!(
            literals,
            vec![pair("'2020-01-01'", "2020-01-01"), pair(".5", ".5")]
        );
    }

    #[test]
    fn uncertain_sql_is_left_to_the_full_parser() {
        for sql in [
            "SELECT E'a\\nb'",
            "SELECT 'a\\'",
            "SELECT x'1F'",
            "SELECT U&'d\\0061t'",
            "SELECT $$a$$",
            "SELECT $tag$a$tag$",
            "SELECT * FROM t WHERE id = $1",
            "SELECT 'a'\n'b'",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1.2.3",
            "SELECT 1e",
            "SELECT 'open",
            "SELECT \"open",
            "SELECT /* open",
            "SELECT 1; SELECT 2",
            "SELECT * FROM U&\"p\\0061tients\"",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    #[test]
    fn a_line_comment_ends_at_a_carriage_return_too() {
        let (template, literals) = shape("UPDATE t SET a = 1 -- x\r, b = 'v' WHERE c = 2").unwrap();
        assert_eq!(template, "UPDATE t SET a = $1 -- x\r, b = $2 WHERE c = $3");
        assert_eq!(literals.len(), 3);
    }

    #[test]
    fn templates_are_filled_at_their_placeholders_only() {
        let template =
            SqlTemplate::new("INSERT INTO t (a, \"$2\", e) VALUES ($1::bytea, '$2', $12) -- $3")
                .unwrap();
        let filled = template
            .fill(0, |n, out| {
                out.push_str(&format!("<{n}>"));
                Some(())
            })
            .unwrap();
        assert_eq!(
            filled,
            "INSERT INTO t (a, \"$2\", e) VALUES (<1>::bytea, '$2', <12>) -- $3"
        );
        assert_eq!(template.fill(0, |n, _| (n != 12).then_some(())), None);
    }
}
