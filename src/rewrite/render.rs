//! Turning a planned statement back into SQL, with the proxy's placeholders
//! replaced by literals (simple-protocol queries carry no parameters).

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{visit_expressions_mut, Expr, Statement};

use super::write::placeholder_number;

/// Renders `statement`, replacing placeholder `$n` by the SQL literal text
/// in `literals[n]` (already quoted and cast, e.g. `'\x434d..'::bytea`).
pub fn render_with_literals(statement: &Statement, literals: &HashMap<usize, String>) -> String {
    let mut statement = statement.clone();
    let _ = visit_expressions_mut(&mut statement, |expr| {
        if let Some(text) = placeholder_number(expr).and_then(|n| literals.get(&n)) {
            // A pre-quoted literal rendered verbatim.
            *expr = Expr::Identifier(sqlparser::ast::Ident::new(text.clone()));
        }
        ControlFlow::<()>::Continue(())
    });
    statement.to_string()
}

/// `'text'` with quotes doubled; with a backslash in `text`, the escape
/// string `E'..'` with backslashes doubled too, so the literal reads the
/// same whatever the session's `standard_conforming_strings`.
pub fn quote_literal(text: &str) -> String {
    if text.contains('\\') {
        format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", text.replace('\'', "''"))
    }
}
