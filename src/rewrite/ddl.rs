//! ALTER TABLE on a policy table through the proxy. Most of it is the
//! DBA's business and passes (constraints, triggers, new columns), but a
//! change that moves the policy's names away from the data opens a hole:
//! after `RENAME TO` or `RENAME COLUMN ssn TO x` the catalog no longer
//! matches the policy and writes under the new name would store plaintext
//! next to ciphertext; `ATTACH PARTITION` brings in rows that never passed
//! the proxy; a DEFAULT on a protected column stores its value unencrypted;
//! a type change or drop of the EDEK or tenant column strands every cell.
//! Those are refused (KM003): run them directly against PostgreSQL, with
//! the policy changed to match.

use sqlparser::ast::{AlterColumnOperation, AlterTableOperation, Statement};

use super::names::{ident_name, policy_table};
use super::Rejection;
use crate::config::{Policy, TablePolicy};

/// What the refusal tells the user to do instead.
const INSTEAD: &str = "(change the schema directly in PostgreSQL and the policy with it)";

/// The refusal of an ALTER TABLE that renames, moves or reshapes a policy
/// table or one of its policy columns; `None` for anything else.
pub(crate) fn alter_table_refusal(policy: &Policy, statement: &Statement) -> Option<Rejection> {
    let Statement::AlterTable {
        name, operations, ..
    } = statement
    else {
        return None;
    };
    let (table, table_policy) = policy_table(policy, name)?;
    operations
        .iter()
        .find_map(|op| operation_refusal(table, table_policy, op))
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
