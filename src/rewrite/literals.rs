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

/// A byte that continues a word (PostgreSQL: letters, digits, `_`, `$`, and
/// every non-ASCII byte).
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Walks `sql` token by token; `None` when `on` says stop or the scanner
/// meets something it does not read with certainty.
fn scan<'a>(sql: &'a str, mut on: impl FnMut(Token<'a>) -> Option<()>) -> Option<()> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut text_start = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        match b {
            b'\'' => {
                // A prefix glued to the quote (E, B, X, N, U&) changes the
                // meaning of the content.
                if i > 0 && (is_word_byte(bytes[i - 1]) || bytes[i - 1] == b'&') {
                    return None;
                }
                let (end, value) = string_literal(sql, i)?;
                flush_text(&mut on, &mut text_start, i)?;
                on(Token::String {
                    range: i..end,
                    value,
                })?;
                i = end;
                text_start = end;
                // 'a'\n'b' is one string in PostgreSQL; 'a' 'b' an error.
                let after = bytes[end..]
                    .iter()
                    .position(|c| !c.is_ascii_whitespace())
                    .map(|k| bytes[end + k]);
                if after == Some(b'\'') {
                    return None;
                }
                continue;
            }
            b'"' => {
                // U&"..." spells a name with escapes the shape cannot see.
                if i > 0 && bytes[i - 1] == b'&' {
                    return None;
                }
                i = quoted_name_end(bytes, i)?;
            }
            b'-' if next == Some(b'-') => {
                // A line comment ends at a newline or a carriage return.
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n' || c == b'\r')
                    .map_or(bytes.len(), |k| i + k + 1);
            }
            b'/' if next == Some(b'*') => i = block_comment_end(bytes, i)?,
            b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                let end = i + 1 + digits;
                if digits == 0 || bytes.get(end).is_some_and(|&c| is_word_byte(c)) {
                    return None; // a dollar quote
                }
                let n = sql[i + 1..end].parse().ok()?;
                flush_text(&mut on, &mut text_start, i)?;
                on(Token::Param(n))?;
                i = end;
                text_start = end;
            }
            b'\\' => return None,
            b'0'..=b'9' => {
                let end = number_end(bytes, i)?;
                flush_text(&mut on, &mut text_start, i)?;
                on(Token::Number(i..end))?;
                i = end;
                text_start = end;
            }
            b'.' if next.is_some_and(|c| c.is_ascii_digit()) => {
                let end = number_end(bytes, i)?;
                flush_text(&mut on, &mut text_start, i)?;
                on(Token::Number(i..end))?;
                i = end;
                text_start = end;
            }
            b if is_word_byte(b) => {
                // A whole word, so digits inside names are not numbers.
                i += bytes[i..].iter().take_while(|&&c| is_word_byte(c)).count();
            }
            _ => i += 1,
        }
    }
    flush_text(&mut on, &mut text_start, bytes.len())
}

fn flush_text<'a>(
    on: &mut impl FnMut(Token<'a>) -> Option<()>,
    start: &mut usize,
    end: usize,
) -> Option<()> {
    if *start < end {
        on(Token::Text(*start..end))?;
    }
    *start = end;
    Some(())
}

/// The end of the string literal opening at `start`, and its value.
fn string_literal(sql: &str, start: usize) -> Option<(usize, Cow<'_, str>)> {
    let bytes = sql.as_bytes();
    let mut i = start + 1;
    let mut doubled = false;
    loop {
        let k = bytes[i..].iter().position(|&c| c == b'\'' || c == b'\\')?;
        i += k;
        if bytes[i] == b'\\' {
            return None;
        }
        if bytes.get(i + 1) == Some(&b'\'') {
            doubled = true;
            i += 2;
            continue;
        }
        let content = &sql[start + 1..i];
        let value = if doubled {
            Cow::Owned(content.replace("''", "'"))
        } else {
            Cow::Borrowed(content)
        };
        return Some((i + 1, value));
    }
}

/// The end of the quoted name opening at `start` (`""` is a quote inside).
fn quoted_name_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += bytes[i..].iter().position(|&c| c == b'"')?;
        if bytes.get(i + 1) == Some(&b'"') {
            i += 2;
            continue;
        }
        return Some(i + 1);
    }
}

/// The end of the (nested) block comment opening at `start`.
fn block_comment_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The end of the numeric constant at `start`: digits, a fraction, an
/// exponent. `None` when letters or another dot follow (`0x1F`, `1_000`,
/// `1.2.3`, `1e`).
fn number_end(bytes: &[u8], start: usize) -> Option<usize> {
    let digits = |from: usize| {
        bytes[from..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut i = start + digits(start);
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        i += digits(i);
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exponent = digits(i);
        if exponent == 0 {
            return None;
        }
        i += exponent;
    }
    match bytes.get(i) {
        Some(&c) if is_word_byte(c) || c == b'.' => None,
        _ => Some(i),
    }
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
