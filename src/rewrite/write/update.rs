//! Planning UPDATE on a protected table: the tenant from the WHERE or the
//! session, protected values as slots, the EDEK merged.

use super::*;

/// Finds `tenant_column = <literal or $n>` among the top-level AND terms;
/// a qualified column counts only when it is the target row's (`row_name`),
/// not another table's of `UPDATE … FROM`.
pub(super) fn tenant_in_where(
    selection: Option<&Expr>,
    tenant_column: &str,
    row_name: &str,
) -> Option<TenantSource> {
    let expr = selection?;
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => tenant_in_where(Some(left), tenant_column, row_name)
            .or_else(|| tenant_in_where(Some(right), tenant_column, row_name)),
        Expr::Nested(inner) => tenant_in_where(Some(inner), tenant_column, row_name),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            let is_tenant = |e: &Expr| match e {
                Expr::Identifier(i) => ident_name(i) == tenant_column,
                Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                    [.., qualifier, column] => {
                        ident_name(column) == tenant_column && ident_name(qualifier) == row_name
                    }
                    _ => false,
                },
                _ => false,
            };
            let (column_side, value_side) = if is_tenant(left) {
                (left, right)
            } else if is_tenant(right) {
                (right, left)
            } else {
                return None;
            };
            let _ = column_side;
            match tenant_operand(value_side) {
                Operand::Literal(t) => Some(TenantSource::Literal(t)),
                Operand::Param(n) => Some(TenantSource::Param(n)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Plans an UPDATE of a protected table. `Ok(None)`: no protected column is set.
pub(crate) fn plan_update(
    table: &str,
    policy: &TablePolicy,
    mut statement: Statement,
    client_params: usize,
) -> Result<Option<WritePlan>, Rejection> {
    let Statement::Update {
        table: target,
        assignments,
        selection,
        ..
    } = &mut statement
    else {
        return Ok(None);
    };
    // How the WHERE clause names the target row: its alias, else its name.
    let row_name = match &target.relation {
        TableFactor::Table {
            alias: Some(alias), ..
        } => ident_name(&alias.name),
        TableFactor::Table { name, .. } => last_name(name).unwrap_or_default(),
        _ => String::new(),
    };
    let mut slots = Placeholders::after(client_params);
    let mut cells = Vec::new();
    let mut extra_assignments = Vec::new();
    // ORMs set every column when they save an entity, the tenant column to
    // the value it has (Django `save()`, JPA): the tenant that value names.
    let mut assigned_tenant: Option<(TenantSource, Expr)> = None;
    for assignment in assignments.iter_mut() {
        let Some(column) = assigned_column(assignment) else {
            if let Some(refusal) =
                sealed_target_refusal(table, policy, assignment, "a tuple assignment")
            {
                return Err(refusal);
            }
            continue;
        };
        if let Some(refusal) = managed_column_refusal(table, policy, &column) {
            return Err(refusal);
        }
        if column == policy.tenant_column {
            let source = match tenant_operand(&assignment.value) {
                Operand::Literal(t) => TenantSource::Literal(t),
                Operand::Param(n) => TenantSource::Param(n),
                _ => {
                    return Err(Rejection::unsupported(
                        table,
                        Some(&column),
                        "setting the tenant of a row to anything but a literal or a parameter \
                         (its cells are bound to the tenant)",
                    ))
                }
            };
            assigned_tenant = Some((source, assignment.value.clone()));
            continue;
        }
        let Some(column_policy) = policy.columns.get(&column) else {
            continue;
        };
        let (value, target) = match operand(&assignment.value) {
            Operand::Null => {
                if column_policy.search == SearchMode::Equality {
                    extra_assignments.push((format!("{column}_bidx"), Expr::value(Value::Null)));
                }
                continue;
            }
            Operand::Literal(text) => {
                let (n, expr) = slots.take();
                assignment.value = bytea_cast(expr);
                (ValueSource::Literal(text), n)
            }
            Operand::Param(n) => {
                assignment.value = bytea_cast(placeholder(n));
                (ValueSource::Param(n), n)
            }
            Operand::Default | Operand::Other => {
                return Err(Rejection::unsupported(
                    table,
                    Some(&column),
                    "an expression as the value",
                ));
            }
        };
        let bidx_param = (column_policy.search == SearchMode::Equality).then(|| {
            let (n, expr) = slots.take();
            extra_assignments.push((format!("{column}_bidx"), bytea_cast(expr)));
            n
        });
        cells.push(CellSlot {
            column,
            ty: column_policy.ty,
            value,
            target_param: target,
            bidx_param,
        });
    }
    if cells.is_empty() && extra_assignments.is_empty() && assigned_tenant.is_none() {
        return Ok(None);
    }
    let in_where = tenant_in_where(selection.as_ref(), &policy.tenant_column, &row_name);
    let mut tenant = match (assigned_tenant, in_where) {
        (Some((TenantSource::Literal(set), _)), Some(TenantSource::Literal(found)))
            if set != found =>
        {
            return Err(Rejection::unsupported(
                table,
                Some(&policy.tenant_column),
                "moving a row to another tenant (its cells are bound to the tenant)",
            ));
        }
        (Some((source, value)), _) => {
            // Only rows that already belong to the tenant set are updated:
            // setting the tenant column can never move a row.
            let column = match row_name.as_str() {
                "" => Expr::Identifier(column_ident(&policy.tenant_column)),
                row => Expr::CompoundIdentifier(vec![
                    Ident::new(row),
                    column_ident(&policy.tenant_column),
                ]),
            };
            let pin = Expr::BinaryOp {
                left: Box::new(column),
                op: BinaryOperator::Eq,
                right: Box::new(value),
            };
            *selection = Some(match selection.take() {
                Some(existing) => Expr::BinaryOp {
                    left: Box::new(Expr::Nested(Box::new(existing))),
                    op: BinaryOperator::And,
                    right: Box::new(pin),
                },
                None => pin,
            });
            source
        }
        (None, found) => found.unwrap_or(TenantSource::Session),
    };
    let mut tenant_pin_param = None;
    if tenant == TenantSource::Session && !cells.is_empty() {
        // Pin the UPDATE to the session tenant so no row of another tenant
        // receives a cell under this tenant's key.
        let (n, expr) = slots.take();
        let pin = Expr::BinaryOp {
            left: Box::new(Expr::Identifier(column_ident(&policy.tenant_column))),
            op: BinaryOperator::Eq,
            right: Box::new(expr),
        };
        *selection = Some(match selection.take() {
            Some(existing) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(existing))),
                op: BinaryOperator::And,
                right: Box::new(pin),
            },
            None => pin,
        });
        tenant_pin_param = Some(n);
        tenant = TenantSource::Session;
    }
    let edek_param = if cells.is_empty() {
        None
    } else {
        let (n, expr) = slots.take();
        let edek = &policy.edek_column;
        extra_assignments.push((
            edek.clone(),
            merge_edek(Expr::Identifier(column_ident(edek)), jsonb_cast(expr)),
        ));
        Some(n)
    };
    for (column, value) in extra_assignments {
        assignments.push(Assignment {
            target: AssignmentTarget::ColumnName(ObjectName(vec![ObjectNamePart::Identifier(
                column_ident(&column),
            )])),
            value,
        });
    }
    let plan = WritePlan {
        table: table.to_owned(),
        tenant_column: policy.tenant_column.clone(),
        rows: vec![RowPlan {
            tenant,
            cells,
            edek_param,
        }],
        tenant_pin_param,
        extra_params: slots.added,
        statement,
        lookups: Vec::new(),
        cleared: Vec::new(),
        hidden_results: 0,
        unnest: None,
    };
    check_parameter_uses(&plan)?;
    Ok(Some(plan))
}
