//! Whether a simple query's literals can become parameters without a change
//! of meaning. A string literal is of type `unknown` until its context gives
//! it a type, as is a parameter of undeclared type; a number literal has the
//! type of its value (`int4`, `int8` or `numeric`), which its parameter is
//! declared as. The two resolve alike where the context alone decides the
//! type: a VALUES item or SET value (the column's), one side of a comparison
//! with a column (`col = 'x'`, `col IN (1, 2)`), a cast (`'x'::date`). Left
//! to itself an unknown literal becomes `text` while a parameter is an error
//! (`SELECT 'x'`), so a literal anywhere else keeps the query as written —
//! as does a type that reads a literal by its type modifier (`interval
//! minute` reads `'30'` as minutes, a parameter as seconds), or a domain
//! (a parameter is checked when bound, even for no row). Columns of such
//! types are the caller's to rule out (the catalog knows them).

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, ArrayElemTypeDef, BinaryOperator, DataType, Expr, OnConflictAction,
    OnInsert, SetExpr, Statement, UnaryOperator,
};

use super::literals::Literal;
use super::write::placeholder_number;
use crate::config::DeclaredType;

/// The placeholders of `statement` that sit where the context alone
/// decides their type, each with whether it is negated (`-$n`). A literal
/// placeholder not among them (or not an expression at all: `DATE $1`, so
/// the caller checks the placeholders of the rendered SQL) must stay a
/// literal.
pub fn typed_placeholders(statement: &Statement) -> HashMap<usize, bool> {
    let mut typed = HashMap::new();
    for expr in assigned_values(statement) {
        mark_operand(expr, false, &mut typed);
    }
    let _ = visit_expressions(statement, |expr| {
        match expr {
            Expr::BinaryOp { left, op, right } if is_comparison(op) => {
                if is_column(left) {
                    mark_operand(right, false, &mut typed);
                }
                if is_column(right) {
                    mark_operand(left, false, &mut typed);
                }
            }
            Expr::InList { expr, list, .. } if is_column(expr) => {
                for item in list {
                    mark_operand(item, false, &mut typed);
                }
            }
            Expr::Cast {
                expr, data_type, ..
            } if casts_like_a_literal(data_type) => mark_operand(expr, false, &mut typed),
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    typed
}

/// True for a number literal whose negation PostgreSQL types otherwise than
/// the negation of its parameter: `-2147483648` is an `int4` constant, and
/// `-9223372036854775808` an `int8` one.
pub fn negation_types_otherwise(literal: &Literal<'_>) -> bool {
    matches!(literal.source, "2147483648" | "9223372036854775808")
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
fn mark_operand(expr: &Expr, negated: bool, typed: &mut HashMap<usize, bool>) {
    match expr {
        Expr::Nested(inner)
        | Expr::UnaryOp {
            op: UnaryOperator::Plus,
            expr: inner,
        } => mark_operand(inner, negated, typed),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr: inner,
        } => mark_operand(inner, !negated, typed),
        _ => {
            if let Some(n) = placeholder_number(expr) {
                typed.insert(n, negated);
            }
        }
    }
}

/// A cast to this type reads an unknown literal as it reads an unknown
/// parameter: not an interval with fields or precision (read by its type
/// modifier), nor a type the parser does not know (a domain, say).
fn casts_like_a_literal(data_type: &DataType) -> bool {
    match data_type {
        DataType::Interval { fields, precision } => fields.is_none() && precision.is_none(),
        DataType::Custom(..) => false,
        DataType::Array(ArrayElemTypeDef::AngleBracket(inner))
        | DataType::Array(ArrayElemTypeDef::SquareBracket(inner, _))
        | DataType::Array(ArrayElemTypeDef::Parenthesis(inner)) => casts_like_a_literal(inner),
        _ => true,
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
    use crate::rewrite::{parameterize, SqlTemplate};

    /// Every literal placeholder of the statement as rendered is typed
    /// (as `BoundShape::new` requires).
    fn binds(sql: &str) -> bool {
        let shaped = parameterize(sql).expect("shaped");
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, &shaped.template)
            .expect("parses")
            .remove(0);
        let typed = typed_placeholders(&statement);
        let rendered = SqlTemplate::new(&statement.to_string()).expect("scans");
        let all_typed = rendered
            .placeholders()
            .all(|n| n > shaped.literals.len() || typed.contains_key(&n));
        all_typed
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
    fn typed_literals_and_casts_read_by_a_type_modifier_do_not_bind() {
        for sql in [
            "INSERT INTO t (a) VALUES (DATE '2001-02-03')",
            "INSERT INTO t (a) VALUES ('30'::interval minute)",
            "INSERT INTO t (a) VALUES ('30'::interval second)",
            "INSERT INTO t (a) VALUES ('-1'::posint)",
            "INSERT INTO t (a) VALUES ('{30}'::interval minute[])",
        ] {
            assert!(!binds(sql), "{sql}");
        }
        assert!(binds(
            "INSERT INTO t (a) VALUES ('30'::interval, '{1}'::int[])"
        ));
    }

    #[test]
    fn negated_placeholders_are_told() {
        let shaped = parameterize("UPDATE t SET a = -5, b = 6 WHERE c = -(-7)").unwrap();
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, &shaped.template)
            .unwrap()
            .remove(0);
        let typed = typed_placeholders(&statement);
        assert_eq!(typed.get(&1), Some(&true));
        assert_eq!(typed.get(&2), Some(&false));
        assert_eq!(typed.get(&3), Some(&false));
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
