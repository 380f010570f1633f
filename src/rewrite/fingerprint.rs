//! Statement fingerprints for the audit log: the same statement shape gives
//! the same fingerprint whatever its literal values, and no value can be read
//! back from it. Read from the tokens of PostgreSQL's own scanner (the one
//! lexer, `lexer.rs`): every constant, whatever its quoting, is one `?`, and
//! comments are dropped, so no part of a value reaches the hash.

use sha2::{Digest, Sha256};

use super::lexer::{self, TokenKind};

/// 16 hex digits of SHA-256 over the statement's tokens, constants replaced
/// by `?`, comments dropped, unquoted words lower-cased.
pub fn fingerprint(sql: &str) -> String {
    let mut hasher = Sha256::new();
    match lexer::tokens(sql) {
        Some(tokens) => {
            for token in tokens {
                match token.kind {
                    TokenKind::PlainString
                    | TokenKind::OtherString
                    | TokenKind::Number
                    | TokenKind::VersionedNumber => hasher.update(b"?"),
                    TokenKind::Comment => continue,
                    TokenKind::Param(_)
                    | TokenKind::Semicolon
                    | TokenKind::EscapedName
                    | TokenKind::Other => {
                        let text = &sql[token.range];
                        if text.starts_with('"') {
                            hasher.update(text.as_bytes());
                        } else {
                            hasher.update(text.to_lowercase().as_bytes());
                        }
                    }
                }
                hasher.update(b" ");
            }
        }
        // SQL that PostgreSQL's scanner rejects never runs: one fingerprint
        // for all of it, so its text (a value, perhaps) is not hashed.
        None => hasher.update(b"\0unscannable"),
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::fingerprint;
    use proptest::prelude::*;

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

    #[test]
    fn the_forms_that_leaked_a_value_hash_no_value() {
        // Each pair differs only in the value; before the one lexer, the
        // fingerprint kept parts of these values.
        for (a, b) in [
            (
                "SELECT $$123-45-6789$$ FROM p",
                "SELECT $$000-00-0000$$ FROM p",
            ),
            ("SELECT E'12\\'3-45' FROM p", "SELECT E'99\\'9-00' FROM p"),
            (
                "SELECT /* it's */ '123-45-6789' FROM p",
                "SELECT /* it's */ '000-00-0000' FROM p",
            ),
            (
                "SELECT -- it's\n '123-45-6789' FROM p",
                "SELECT -- it's\n 'x' FROM p",
            ),
            ("SELECT $§$123$§$", "SELECT $§$456$§$"),
            ("SELECT 'a'\n'123'", "SELECT 'a'\n'456'"),
        ] {
            assert_eq!(fingerprint(a), fingerprint(b), "{a} / {b}");
        }
    }

    /// Every way to write a string constant PostgreSQL knows, with `v` in it.
    fn literal_forms(v: &str) -> Vec<String> {
        let standard = v.replace('\'', "''");
        let escaped = v.replace('\\', "\\\\").replace('\'', "\\'");
        let unicode = v.replace('\\', "\\\\").replace('\'', "''");
        let mut forms = vec![
            format!("'{standard}'"),
            format!("E'{escaped}'"),
            format!("e'{escaped}'"),
            format!("U&'{unicode}'"),
            format!("N'{standard}'"),
            format!("'{standard}'::text"),
            format!("'a'\n'{standard}'"),
        ];
        if !v.contains('$') {
            forms.push(format!("$${v}$$"));
            forms.push(format!("$tag$ {v} $tag$"));
            forms.push(format!("$§$ {v} $§$"));
        }
        forms
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn no_value_changes_the_fingerprint(
            value in "[ -~é§]{0,24}",
            number in any::<u64>(),
            comment in "[ -~]{0,12}",
        ) {
            let comment = comment.replace("*/", "").replace("/*", "");
            for (i, form) in literal_forms(&value).into_iter().enumerate() {
                let reference = &literal_forms("x")[i];
                let with = format!("SELECT /* {comment} */ {form}, {number} FROM p WHERE a = {form}");
                let without = format!("SELECT /* */ {reference}, 1 FROM p WHERE a = {reference}");
                prop_assert_eq!(fingerprint(&with), fingerprint(&without), "{}", with);
            }
        }
    }
}
