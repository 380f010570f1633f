//! Statement fingerprints for the audit log: the same statement shape gives
//! the same fingerprint whatever its literal values, and no value can be read
//! back from it.

use sha2::{Digest, Sha256};

/// 16 hex digits of SHA-256 over the statement with string and number
/// literals replaced by `?`, whitespace collapsed and letters lower-cased.
pub fn fingerprint(sql: &str) -> String {
    let mut normal = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut last_space = true;
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // A string literal ('' inside is an escaped quote).
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                        }
                        Some('\'') | None => break,
                        Some(_) => {}
                    }
                }
                normal.push('?');
                last_space = false;
            }
            c if (c.is_ascii_digit()
                || (c == '.' && chars.peek().is_some_and(char::is_ascii_digit)))
                && !normal.ends_with(|p: char| p.is_alphanumeric() || p == '_' || p == '$') =>
            {
                // A numeric constant: digits, a fraction, an exponent (as
                // the simple-query shapes read it, so both agree).
                while chars
                    .peek()
                    .is_some_and(|d| d.is_ascii_digit() || *d == '.')
                {
                    chars.next();
                }
                if chars.peek().is_some_and(|e| *e == 'e' || *e == 'E') {
                    let mut ahead = chars.clone();
                    ahead.next();
                    if ahead.peek().is_some_and(|s| *s == '+' || *s == '-') {
                        ahead.next();
                    }
                    if ahead.peek().is_some_and(char::is_ascii_digit) {
                        while ahead.peek().is_some_and(char::is_ascii_digit) {
                            ahead.next();
                        }
                        chars = ahead;
                    }
                }
                normal.push('?');
                last_space = false;
            }
            c if c.is_whitespace() => {
                if !last_space {
                    normal.push(' ');
                    last_space = true;
                }
            }
            c => {
                normal.extend(c.to_lowercase());
                last_space = false;
            }
        }
    }
    let digest = Sha256::digest(normal.trim_end().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn literals_do_not_change_the_fingerprint() {
        let a = fingerprint("INSERT INTO p (ssn, n) VALUES ('123-45', 42)");
        let b = fingerprint("insert  into p (ssn, n)\n VALUES ('it''s', 7.5)");
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert_ne!(a, fingerprint("SELECT ssn FROM p"));
        assert_eq!(
            fingerprint("SELECT 1.5e3, .5, -2"),
            fingerprint("SELECT 7, 8E-2, -9")
        );
        // Placeholders and identifiers with digits are kept.
        assert_ne!(fingerprint("SELECT $1"), fingerprint("SELECT $2"));
        assert_ne!(
            fingerprint("SELECT c1 FROM t"),
            fingerprint("SELECT c2 FROM t")
        );
    }
}
