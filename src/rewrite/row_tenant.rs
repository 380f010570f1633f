//! The columns a read gets so that each protected cell is opened only in
//! a row of its own tenant: the tenant columns that the lineage walk found
//! for its protected result columns, added after the client's columns
//! under one reserved name (the result planner hides them).

use sqlparser::ast::{Expr, Ident, SelectItem, SetExpr, Statement};

use super::lineage::RowTenantColumn;

/// A read sent with hidden row-tenant columns after the client's own.
#[derive(Debug, Clone)]
pub struct RowTenantRead {
    /// The statement as sent.
    pub sql: String,
    /// The same, parsed.
    pub statement: Statement,
    /// How many columns were added.
    pub hidden: usize,
}

/// The name of every result column the proxy adds to name a row's tenant.
pub const ROW_TENANT_COLUMN: &str = "cmk$row_tenant";

/// The statement with `attached` columns (as [`ROW_TENANT_COLUMN`]) after
/// its own result columns (a SELECT's, or an UPDATE's or DELETE's
/// RETURNING list); `None` for any other statement.
pub(super) fn with_row_tenants(
    statement: &Statement,
    attached: &[RowTenantColumn],
) -> Option<Statement> {
    let mut statement = statement.clone();
    let items = match &mut statement {
        Statement::Query(query) => {
            let mut body = query.body.as_mut();
            loop {
                match body {
                    SetExpr::Select(select) => break &mut select.projection,
                    SetExpr::Query(inner) => body = inner.body.as_mut(),
                    _ => return None,
                }
            }
        }
        Statement::Update {
            returning: Some(items),
            ..
        } => items,
        Statement::Delete(delete) => delete.returning.as_mut()?,
        _ => return None,
    };
    for column in attached {
        items.push(SelectItem::ExprWithAlias {
            expr: Expr::CompoundIdentifier(vec![
                Ident::with_quote('"', &column.qualifier),
                Ident::with_quote('"', &column.column),
            ]),
            alias: Ident::with_quote('"', ROW_TENANT_COLUMN),
        });
    }
    Some(statement)
}
