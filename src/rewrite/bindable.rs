//! Whether a simple query's literals can become parameters without a change
//! of meaning. A string literal is of type `unknown` until its context gives
//! it a type, as is a parameter of undeclared type; a number literal has the
//! type of its value (`int4`, `int8` or `numeric`), which its parameter is
//! declared as. The two resolve alike where the context alone decides the
//! type: a VALUES item or SET value (the column's), one side of a comparison
//! with a column (`col = 'x'`, `col IN (1, 2)`), a cast (`'x'::date`). Left
//! to itself an unknown literal becomes `text` while a parameter is an error
//! (`SELECT 'x'`), so a literal anywhere else keeps the query as written.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, BinaryOperator, Expr, OnConflictAction, OnInsert, SetExpr, Statement,
    UnaryOperator, Value,
};

use super::literals::Literal;
use super::write::param_number;
use crate::config::DeclaredType;

/// True when every client literal (`$1..=$literals`) of `statement` sits
/// where the context alone decides its type.
pub fn literals_bind_as_written(statement: &Statement, literals: usize) -> bool {
    let mut typed = HashSet::new();
    for expr in assigned_values(statement) {
        mark_operand(expr, &mut typed);
    }
    let _ = visit_expressions(statement, |expr| {
        match expr {
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                if is_column(left) {
                    mark_operand(right, &mut typed);
                }
                if is_column(right) {
                    mark_operand(left, &mut typed);
                }
            }
            Expr::InList { expr, list, .. } if is_column(expr) => {
                for item in list {
                    mark_operand(item, &mut typed);
                }
            }
            Expr::Cast { expr, .. } => mark_operand(expr, &mut typed),
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    let untyped = visit_expressions(statement, |expr| match placeholder(expr) {
        Some(n) if n <= literals && !typed.contains(&n) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    untyped.is_continue()
}

/// The declared type of a literal's parameter: 0 (undeclared, like the
/// literal's `unknown`) for a string; for a number the type PostgreSQL gives
/// the constant: `int4` or `int8` when it is an integer that fits, else
/// `numeric`.
pub fn literal_param_type(literal: &Literal<'_>) -> u32 {
    if literal.source.starts_with('\'') {
        return 0;
    }
    if literal.source.bytes().all(|b| b.is_ascii_digit()) {
        if literal.source.parse::<i32>().is_ok() {
            return DeclaredType::Int4.oid();
        }
        if literal.source.parse::<i64>().is_ok() {
            return DeclaredType::Int8.oid();
        }
    }
    DeclaredType::Numeric.oid()
}

/// The VALUES items of an INSERT and the values of its ON CONFLICT DO
/// UPDATE SET, or of an UPDATE's SET.
fn assigned_values(statement: &Statement) -> Vec<&Expr> {
    match statement {
        Statement::Insert(insert) => {
            let mut values: Vec<&Expr> = Vec::new();
            if let Some(SetExpr::Values(rows)) = insert.source.as_deref().map(|q| &*q.body) {
                values.extend(rows.rows.iter().flatten());
            }
            if let Some(OnInsert::OnConflict(conflict)) = &insert.on {
                if let OnConflictAction::DoUpdate(update) = &conflict.action {
                    values.extend(update.assignments.iter().map(|a| &a.value));
                }
            }
            values
        }
        Statement::Update { assignments, .. } => assignments.iter().map(|a| &a.value).collect(),
        _ => Vec::new(),
    }
}

/// Marks a placeholder that is the whole operand (negated or in
/// parentheses too: `-5` is the negated `int4` as written).
fn mark_operand(expr: &Expr, typed: &mut HashSet<usize>) {
    match expr {
        Expr::Nested(inner)
        | Expr::UnaryOp {
            op: UnaryOperator::Minus | UnaryOperator::Plus,
            expr: inner,
        } => mark_operand(inner, typed),
        _ => {
            if let Some(n) = placeholder(expr) {
                typed.insert(n);
            }
        }
    }
}

fn placeholder(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => param_number(p),
            _ => None,
        },
        _ => None,
    }
}

fn is_column(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    )
}

#[cfg(test)]
mod tests {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    use super::*;
    use crate::rewrite::parameterize;

    fn binds(sql: &str) -> bool {
        let shaped = parameterize(sql).expect("shaped");
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, &shaped.template)
            .expect("parses")
            .remove(0);
        literals_bind_as_written(&statement, shaped.literals.len())
    }

    #[test]
    fn literals_typed_by_their_context_bind() {
        for sql in [
            "INSERT INTO t (a, b, c) VALUES ('x', 5, -1.5), ('y', (7), '2020-01-01'::date)",
            "INSERT INTO t (a) VALUES ('x') ON CONFLICT (a) DO UPDATE SET b = 'y'",
            "UPDATE t SET a = 'x', b = 3 WHERE id = 5 AND t.c <> 'z' AND 'q' < d",
            "UPDATE t SET a = 'x' WHERE id IN (1, 2, 3)",
        ] {
            assert!(binds(sql), "{sql}");
        }
    }

    #[test]
    fn literals_left_to_default_to_text_do_not_bind() {
        for sql in [
            "INSERT INTO t (a) VALUES ('x') RETURNING id, 'label'",
            "INSERT INTO t (a) VALUES ('x' || 'y')",
            "INSERT INTO t (a) VALUES (lower('X'))",
            "UPDATE t SET a = 'x' WHERE b LIKE 'y%'",
            "UPDATE t SET a = coalesce(b, 'x')",
            "INSERT INTO t (a) SELECT 'x'",
        ] {
            assert!(!binds(sql), "{sql}");
        }
    }

    #[test]
    fn number_parameters_are_typed_like_the_constants() {
        let ty = |source: &str| {
            literal_param_type(&Literal {
                source,
                value: source.into(),
            })
        };
        assert_eq!(ty("'5'"), 0);
        assert_eq!(ty("5"), 23);
        assert_eq!(ty("2147483647"), 23);
        assert_eq!(ty("2147483648"), 20);
        assert_eq!(ty("9223372036854775808"), 1700);
        assert_eq!(ty("1.5"), 1700);
        assert_eq!(ty("1e3"), 1700);
        assert_eq!(ty(".5"), 1700);
    }
}
