//! `INSERT … ON CONFLICT DO UPDATE` on a protected table: the SET list's
//! protected values and EXCLUDED references, and the EDEK merged.

use super::*;

/// `DO UPDATE SET col = EXCLUDED.col` keeps the proposed row's cell; the EDEK
/// of that row is merged in too. Other values for protected columns are refused.
///
/// The conflicting row may belong to another tenant than the proposed one:
/// `AND <table>.<tenant> = EXCLUDED.<tenant>` keeps a cell sealed under one
/// tenant's key out of another tenant's row (that row is then left as it
/// is), and the tenant column itself cannot be changed here.
pub(super) fn plan_conflict_update(
    table: &str,
    policy: &TablePolicy,
    update: &mut sqlparser::ast::DoUpdate,
) -> Result<(), Rejection> {
    let assignments = &mut update.assignments;
    let mut touches = false;
    let mut sets_tenant = false;
    for assignment in assignments.iter() {
        let Some(column) = assigned_column(assignment) else {
            // `SET (a, b) = (…)`: no protected, managed or tenant column.
            if let Some(refusal) = sealed_target_refusal(
                table,
                policy,
                assignment,
                "a tuple assignment in ON CONFLICT DO UPDATE",
            ) {
                return Err(refusal);
            }
            continue;
        };
        if let Some(refusal) = managed_column_refusal(table, policy, &column) {
            return Err(refusal);
        }
        if column == policy.tenant_column {
            // `SET tenant = EXCLUDED.tenant` (Rails upsert_all, Django
            // bulk_create with update_conflicts): with the same-tenant pin
            // below it changes nothing; any other value would move the row.
            if !is_excluded(&assignment.value, &column) {
                return Err(Rejection::unsupported(
                    table,
                    Some(&column),
                    "ON CONFLICT DO UPDATE moving a row to another tenant (only EXCLUDED.<tenant column> is accepted)",
                ));
            }
            sets_tenant = true;
            continue;
        }
        if policy.columns.contains_key(&column) {
            if !is_excluded(&assignment.value, &column) {
                return Err(Rejection::unsupported(
                    table,
                    Some(&column),
                    "ON CONFLICT DO UPDATE with a value other than EXCLUDED.<column>",
                ));
            }
            touches = true;
        }
    }
    let table_name = table.rsplit('.').next().unwrap_or(table);
    if touches || sets_tenant {
        let same_tenant = Expr::BinaryOp {
            left: Box::new(Expr::CompoundIdentifier(vec![
                Ident::new(table_name),
                column_ident(&policy.tenant_column),
            ])),
            op: BinaryOperator::Eq,
            right: Box::new(Expr::CompoundIdentifier(vec![
                Ident::new("excluded"),
                column_ident(&policy.tenant_column),
            ])),
        };
        update.selection = Some(match update.selection.take() {
            Some(condition) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(condition))),
                op: BinaryOperator::And,
                right: Box::new(same_tenant),
            },
            None => same_tenant,
        });
    }
    if touches {
        let edek = &policy.edek_column;
        let assignments = &mut update.assignments;
        assignments.push(Assignment {
            target: AssignmentTarget::ColumnName(ObjectName(vec![ObjectNamePart::Identifier(
                column_ident(edek),
            )])),
            value: merge_edek(
                Expr::CompoundIdentifier(vec![Ident::new(table_name), Ident::new(edek)]),
                Expr::CompoundIdentifier(vec![Ident::new("excluded"), Ident::new(edek)]),
            ),
        });
        for (column, column_policy) in &policy.columns {
            if column_policy.search == SearchMode::Equality
                && assignments
                    .iter()
                    .any(|a| assigned_column(a).as_deref() == Some(column))
            {
                let bidx = format!("{column}_bidx");
                assignments.push(Assignment {
                    target: AssignmentTarget::ColumnName(ObjectName(vec![
                        ObjectNamePart::Identifier(column_ident(&bidx)),
                    ])),
                    value: Expr::CompoundIdentifier(vec![Ident::new("excluded"), Ident::new(bidx)]),
                });
            }
        }
    }
    Ok(())
}

/// True when `value` is `EXCLUDED.<column>`: the proposed row's own value.
pub(super) fn is_excluded(value: &Expr, column: &str) -> bool {
    matches!(value, Expr::CompoundIdentifier(parts)
        if parts.len() == 2 && ident_name(&parts[0]) == "excluded" && ident_name(&parts[1]) == column)
}

/// `COALESCE(old, '{}'::jsonb) || new`: the row keeps every DEK its cells use.
pub(super) fn merge_edek(old: Expr, new: Expr) -> Expr {
    Expr::BinaryOp {
        left: Box::new(Expr::Function(sqlparser::ast::Function {
            name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new("COALESCE"))]),
            uses_odbc_syntax: false,
            parameters: sqlparser::ast::FunctionArguments::None,
            args: sqlparser::ast::FunctionArguments::List(sqlparser::ast::FunctionArgumentList {
                duplicate_treatment: None,
                args: vec![
                    sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(
                        old,
                    )),
                    sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(
                        jsonb_cast(Expr::value(Value::SingleQuotedString("{}".to_owned()))),
                    )),
                ],
                clauses: vec![],
            }),
            filter: None,
            null_treatment: None,
            over: None,
            within_group: vec![],
        })),
        op: BinaryOperator::StringConcat,
        right: Box::new(new),
    }
}
