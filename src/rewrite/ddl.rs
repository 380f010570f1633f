//! ALTER TABLE on a policy table through the proxy. Most of it is the
//! DBA's business and passes (constraints, triggers, new columns), but a
//! change that moves the policy's names away from the data opens a hole:
//! after `RENAME TO` or `RENAME COLUMN ssn TO x` the catalog no longer
//! matches the policy and writes under the new name would store plaintext
//! next to ciphertext; `ATTACH PARTITION` brings in rows that never passed
//! the proxy; a DEFAULT on a protected column stores its value unencrypted;
//! a type change or drop of the EDEK or tenant column strands every cell.
//! Those are refused (KM003): run them directly against PostgreSQL, with
//! the policy changed to match. So are the other ways to put a policy
//! name on data that never passed the proxy (renaming another table or a
//! schema onto it, CREATE TABLE … AS, SELECT … INTO) and triggers on a
//! policy table (they may rewrite a row after the proxy sealed it).

use sqlparser::ast::{
    AlterColumnOperation, AlterSchemaOperation, AlterTableOperation, ColumnOption, ObjectName,
    RenameTableNameKind, SetExpr, Statement,
};

use super::names::{ident_name, last_name, policy_table};
use super::Rejection;
use crate::config::{Policy, TablePolicy};

/// What the refusal tells the user to do instead.
const INSTEAD: &str = "(change the schema directly in PostgreSQL and the policy with it)";

/// The refusal of DDL that renames, moves or reshapes a policy table or
/// one of its policy columns, puts a policy table's name on other data, or
/// adds a trigger to one; `None` for anything else.
pub(crate) fn ddl_refusal(policy: &Policy, statement: &Statement) -> Option<Rejection> {
    let refuse = |table: &str, what: &str| {
        Some(Rejection::unsupported(
            table,
            None,
            &format!("{what} through cmk-proxy {INSTEAD}"),
        ))
    };
    let target = |name: &ObjectName| policy_table(policy, name).map(|(table, _)| table);
    match statement {
        Statement::AlterTable {
            name, operations, ..
        } => {
            let renamed_onto = operations.iter().find_map(|op| match op {
                AlterTableOperation::RenameTable {
                    table_name: RenameTableNameKind::To(new) | RenameTableNameKind::As(new),
                } => target(new),
                _ => None,
            });
            if let Some(table) = renamed_onto {
                return refuse(table, "renaming a table to a policy table's name");
            }
            let (table, table_policy) = policy_table(policy, name)?;
            operations
                .iter()
                .find_map(|op| operation_refusal(table, table_policy, op))
        }
        Statement::AlterSchema(alter) => {
            let renamed = alter
                .operations
                .iter()
                .any(|op| matches!(op, AlterSchemaOperation::Rename { .. }));
            let table = schema_table(policy, &alter.name)?;
            renamed.then(|| refuse(&table, "renaming the schema of a policy table"))?
        }
        Statement::CreateTrigger(trigger) => {
            let table = target(&trigger.table_name)?;
            refuse(table, "a trigger on a policy table")
        }
        Statement::CreateTable(create) if create.query.is_some() || create.clone.is_some() => {
            let table = target(&create.name)?;
            refuse(table, "CREATE TABLE … AS with a policy table's name")
        }
        Statement::Query(query) => {
            let SetExpr::Select(select) = query.body.as_ref() else {
                return None;
            };
            let table = target(&select.into.as_ref()?.name)?;
            refuse(table, "SELECT … INTO a policy table")
        }
        _ => None,
    }
}

/// A policy table in the schema `name` (for a refusal's message).
fn schema_table(policy: &Policy, name: &ObjectName) -> Option<String> {
    let schema = last_name(name)?;
    policy
        .tables
        .keys()
        .find(|key| key.split_once('.').is_some_and(|(s, _)| s == schema))
        .cloned()
}

fn operation_refusal(
    table: &str,
    policy: &TablePolicy,
    operation: &AlterTableOperation,
) -> Option<Rejection> {
    let refuse = |column: Option<&str>, what: &str| {
        Some(Rejection::unsupported(
            table,
            column,
            &format!("{what} through cmk-proxy {INSTEAD}"),
        ))
    };
    let policy_column = |name: &sqlparser::ast::Ident| {
        let name = ident_name(name);
        policy.names_column(&name).then_some(name)
    };
    match operation {
        AlterTableOperation::RenameTable { .. } => refuse(None, "renaming a policy table"),
        AlterTableOperation::AttachPartition { .. } => {
            refuse(None, "attaching a partition to a policy table")
        }
        AlterTableOperation::SwapWith { .. } => refuse(None, "swapping a policy table"),
        AlterTableOperation::RenameColumn {
            old_column_name,
            new_column_name,
        } => policy_column(old_column_name)
            .or_else(|| policy_column(new_column_name))
            .and_then(|c| refuse(Some(&c), "renaming a column to or from a policy column")),
        AlterTableOperation::ChangeColumn {
            old_name, new_name, ..
        } => policy_column(old_name)
            .or_else(|| policy_column(new_name))
            .and_then(|c| refuse(Some(&c), "changing a policy column")),
        AlterTableOperation::ModifyColumn { col_name, .. } => {
            policy_column(col_name).and_then(|c| refuse(Some(&c), "changing a policy column"))
        }
        AlterTableOperation::AddColumn { column_def, .. } => {
            let column = policy_column(&column_def.name)?;
            let computed = column_def.options.iter().any(|o| {
                matches!(
                    o.option,
                    ColumnOption::Default(_) | ColumnOption::Generated { .. }
                )
            });
            computed.then(|| {
                refuse(
                    Some(&column),
                    "adding a policy column with a default or generated value",
                )
            })?
        }
        AlterTableOperation::DropColumn { column_names, .. } => column_names
            .iter()
            .find_map(policy_column)
            .and_then(|c| refuse(Some(&c), "dropping a policy column")),
        AlterTableOperation::AlterColumn { column_name, op } => {
            let column = policy_column(column_name)?;
            match op {
                // Harmless: NULL-ness and removing a default.
                AlterColumnOperation::SetNotNull
                | AlterColumnOperation::DropNotNull
                | AlterColumnOperation::DropDefault => None,
                _ => refuse(
                    Some(&column),
                    "changing the type, default or generation of a policy column",
                ),
            }
        }
        _ => None,
    }
}
