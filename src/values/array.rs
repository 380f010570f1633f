//! One-dimensional arrays of the declared types, as a client binds them for
//! `col = ANY($1)`: PostgreSQL's text form (`{a,"b c",NULL}`, as
//! `array_in` reads it) and its binary form (as `array_recv` reads it), and
//! the text form of a `bytea[]` the proxy binds in their place.

use super::{from_binary, ValueError};
use crate::config::DeclaredType;

fn bad(reason: &'static str) -> ValueError {
    ValueError {
        ty: "array",
        reason,
    }
}

/// The elements of an array in text form (`None`: NULL). Multi-dimensional
/// arrays and explicit bounds (`[1:2]={…}`) are refused.
pub fn parse_text_array(text: &str) -> Result<Vec<Option<String>>, ValueError> {
    let mut chars = text.trim_matches(is_space).chars().peekable();
    if chars.next() != Some('{') {
        return Err(bad("expected '{' (explicit bounds are not supported)"));
    }
    let mut elements = Vec::new();
    skip_space(&mut chars);
    if chars.peek() == Some(&'}') {
        chars.next();
        return end(chars, elements);
    }
    loop {
        skip_space(&mut chars);
        let element = match chars.peek() {
            Some('{') => return Err(bad("multi-dimensional arrays are not supported")),
            Some('"') => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => value.push(chars.next().ok_or(bad("unterminated element"))?),
                        Some(c) => value.push(c),
                        None => return Err(bad("unterminated quoted element")),
                    }
                }
                skip_space(&mut chars);
                Some(value)
            }
            _ => {
                let mut value = String::new();
                // Trailing unescaped space is not part of the element.
                let mut kept = 0;
                let mut escaped = false;
                while let Some(&c) = chars.peek() {
                    match c {
                        ',' | '}' => break,
                        '{' | '"' => return Err(bad("unexpected character in element")),
                        '\\' => {
                            chars.next();
                            value.push(chars.next().ok_or(bad("unterminated element"))?);
                            kept = value.len();
                            escaped = true;
                            continue;
                        }
                        c => value.push(c),
                    }
                    if !is_space(c) {
                        kept = value.len();
                    }
                    chars.next();
                }
                value.truncate(kept);
                if value.is_empty() && !escaped {
                    return Err(bad("empty element"));
                }
                (escaped || !value.eq_ignore_ascii_case("null")).then_some(value)
            }
        };
        elements.push(element);
        match chars.next() {
            Some(',') => continue,
            Some('}') => return end(chars, elements),
            _ => return Err(bad("expected ',' or '}'")),
        }
    }
}

fn end(
    mut rest: impl Iterator<Item = char>,
    elements: Vec<Option<String>>,
) -> Result<Vec<Option<String>>, ValueError> {
    match rest.next() {
        None => Ok(elements),
        Some(_) => Err(bad("junk after closing '}'")),
    }
}

/// PostgreSQL's `scanner_isspace`.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

fn skip_space(chars: &mut std::iter::Peekable<impl Iterator<Item = char>>) {
    while chars.peek().is_some_and(|c| is_space(*c)) {
        chars.next();
    }
}

/// The elements of an array in binary form, each as the text of its
/// element type (`None`: NULL).
pub fn parse_binary_array(bytes: &[u8]) -> Result<Vec<Option<String>>, ValueError> {
    let mut reader = Reader(bytes);
    let dimensions = reader.i32()?;
    let _has_nulls = reader.i32()?;
    let element_oid = u32::from_be_bytes(reader.take(4)?.try_into().map_err(|_| bad("short"))?);
    let count = match dimensions {
        0 => 0,
        1 => {
            let len = reader.i32()?;
            let _lower_bound = reader.i32()?;
            usize::try_from(len).map_err(|_| bad("negative dimension"))?
        }
        _ => return Err(bad("multi-dimensional arrays are not supported")),
    };
    let element_type = DeclaredType::from_oid(element_oid).ok_or(bad(
        "an element type cmk-proxy cannot convert (send it as text)",
    ))?;
    // Every element takes at least its 4-byte length: a count larger than
    // the message allows is refused before anything is allocated.
    if count > bytes.len() / 4 {
        return Err(bad("more elements than bytes"));
    }
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        let len = reader.i32()?;
        elements.push(match len {
            -1 => None,
            len => {
                let len = usize::try_from(len).map_err(|_| bad("negative element length"))?;
                Some(from_binary(element_type, reader.take(len)?)?)
            }
        });
    }
    if !reader.0.is_empty() {
        return Err(bad("junk after the last element"));
    }
    Ok(elements)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ValueError> {
        if self.0.len() < n {
            return Err(bad("truncated binary array"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn i32(&mut self) -> Result<i32, ValueError> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// The text form of a `bytea[]` (`{"\\x…",NULL}`).
pub fn bytea_array_text(elements: &[Option<Vec<u8>>]) -> String {
    let mut out = String::from("{");
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match element {
            Some(bytes) => {
                out.push_str("\"\\\\x");
                out.push_str(&faster_hex::hex_string(bytes));
                out.push('"');
            }
            None => out.push_str("NULL"),
        }
    }
    out.push('}');
    out
}

/// The text form of an array of texts, every element quoted (`{"a\\"b",NULL}`).
pub fn quoted_array_text(elements: &[Option<&str>]) -> String {
    let mut out = String::from("{");
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match element {
            Some(text) => {
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
            None => out.push_str("NULL"),
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(input: &str) -> Vec<Option<String>> {
        parse_text_array(input).unwrap_or_else(|e| panic!("{input}: {e}"))
    }

    #[test]
    fn text_arrays_read_as_array_in_reads_them() {
        assert_eq!(text("{}"), Vec::<Option<String>>::new());
        assert_eq!(
            text(r#" { a , "b c", NULL, "NULL", \NULL, "x\"y\\z" } "#),
            vec![
                Some("a".into()),
                Some("b c".into()),
                None,
                Some("NULL".into()),
                Some("NULL".into()),
                Some(r#"x"y\z"#.into()),
            ]
        );
        assert_eq!(text(r"{a\ }"), vec![Some("a ".into())]);
        assert_eq!(text("{123-45-6789}"), vec![Some("123-45-6789".into())]);
    }

    #[test]
    fn malformed_and_multidimensional_text_arrays_are_refused() {
        for input in [
            "",
            "a",
            "{",
            "{a",
            "{a,}",
            "{,a}",
            "{{a}}",
            "[1:1]={a}",
            "{a}x",
            r#"{"a}"#,
            "{a\"b}",
        ] {
            assert!(parse_text_array(input).is_err(), "{input:?} accepted");
        }
    }

    fn binary(elements: &[Option<&[u8]>], oid: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(1i32.to_be_bytes());
        out.extend(0i32.to_be_bytes());
        out.extend(oid.to_be_bytes());
        out.extend(i32::try_from(elements.len()).unwrap_or(0).to_be_bytes());
        out.extend(1i32.to_be_bytes());
        for e in elements {
            match e {
                Some(b) => {
                    out.extend(i32::try_from(b.len()).unwrap_or(0).to_be_bytes());
                    out.extend(*b);
                }
                None => out.extend((-1i32).to_be_bytes()),
            }
        }
        out
    }

    #[test]
    fn binary_arrays_read_as_array_recv_reads_them() {
        let bytes = binary(&[Some(b"a b"), None], 25);
        assert_eq!(
            parse_binary_array(&bytes),
            Ok(vec![Some("a b".into()), None])
        );
        let ints = binary(&[Some(&7i32.to_be_bytes())], 23);
        assert_eq!(parse_binary_array(&ints), Ok(vec![Some("7".into())]));
    }

    #[test]
    fn hostile_binary_arrays_are_refused_without_allocating() {
        let mut huge = binary(&[], 25);
        huge[12..16].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_binary_array(&huge).is_err());
        let mut negative = binary(&[Some(b"a")], 25);
        negative[20..24].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(parse_binary_array(&negative).is_err());
        assert!(parse_binary_array(&[0, 0, 0, 2]).is_err());
        let truncated = binary(&[Some(b"abc")], 25);
        assert!(parse_binary_array(&truncated[..truncated.len() - 1]).is_err());
    }

    #[test]
    fn quoted_arrays_read_back_as_written() {
        let elements = [Some(r#"{"k": "a\"b"}"#), None, Some("NULL"), Some("")];
        let text = quoted_array_text(&elements);
        let back = text_arrays(&text);
        let want: Vec<Option<String>> = elements.iter().map(|e| e.map(str::to_owned)).collect();
        assert_eq!(back, want);
    }

    fn text_arrays(text: &str) -> Vec<Option<String>> {
        parse_text_array(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn bytea_arrays_print_as_array_in_reads_them() {
        assert_eq!(
            bytea_array_text(&[Some(vec![1, 0xab]), None]),
            r#"{"\\x01ab",NULL}"#
        );
    }
}
