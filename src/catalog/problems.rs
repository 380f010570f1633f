//! What is wrong with the live schema for the policy (`check-config
//! --live`), each problem with the DDL or command that fixes it.

use std::collections::HashMap;
use std::fmt;

use super::*;

/// A mismatch between the policy and the live schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// `schema.table` or `schema.table.column`.
    pub location: String,
    /// What is wrong.
    pub message: String,
    /// DDL that fixes it, when there is one.
    pub fix: Option<String>,
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

/// Compares the policy with the live schema; every problem comes with the
/// DDL that fixes it where one exists.
pub async fn check_schema(
    client: &tokio_postgres::Client,
    policy: &Policy,
) -> Result<Vec<SchemaProblem>, CatalogError> {
    let (adoptions, mut tables, _) = read_policy_tables(client, policy).await?;
    let mut problems = Vec::new();
    for (name, table_policy) in &policy.tables {
        let Some(info) = tables.get(name) else {
            continue;
        };
        let state = table_state(name, info, table_policy, &adoptions);
        let command = if matches!(state, TableState::Leaving(_)) {
            "decrypt"
        } else {
            "encrypt"
        };
        let fix = Some(format!(
            "cmk-proxy {command} --config <policy> --table {name}"
        ));
        let message = match state {
            TableState::Normal => continue,
            TableState::Legacy(None) => {
                "holds legacy plaintext (no protected column is bytea, no EDEK column): served untouched until converted".to_owned()
            }
            TableState::Legacy(Some(_)) => {
                "in transition from legacy plaintext (phase prepared: the transition view is not swapped in yet)".to_owned()
            }
            TableState::Leaving(_) => {
                "leaving the policy's format (cmk-proxy decrypt, phase leaving: the transition view is not swapped in yet)".to_owned()
            }
            TableState::Transition(adoption) => format!(
                "in transition between legacy plaintext and cells (phase converting, real table {}, resume after {}): legacy values are served beside cells until encrypt or decrypt finishes it",
                adoption.base_name,
                adoption
                    .resume_after
                    .as_ref()
                    .map_or("the start".to_owned(), |key| key.join(","))
            ),
        };
        problems.push(SchemaProblem {
            location: name.clone(),
            message,
            fix,
        });
    }
    let mut analysed = policy.clone();
    analysed.tables.retain(|name, table_policy| {
        tables.get(name).is_none_or(|info| {
            !matches!(
                table_state(name, info, table_policy, &adoptions),
                TableState::Legacy(_)
            )
        })
    });
    tables.retain(|name, _| analysed.tables.contains_key(name));
    problems.extend(schema_problems(&analysed, &tables));
    Ok(problems)
}

pub(super) fn schema_problems(
    policy: &Policy,
    tables: &HashMap<String, TableInfo>,
) -> Vec<SchemaProblem> {
    let mut problems = Vec::new();
    for (name, table_policy) in &policy.tables {
        let Some(info) = tables.get(name) else {
            problems.push(SchemaProblem {
                location: name.clone(),
                message: "table does not exist (or is not a plain or partitioned table)".to_owned(),
                fix: None,
            });
            continue;
        };
        let table = qualified(name);
        let mut expect = |column: &str, wanted: &str, why: &str, add_extra: Option<String>| {
            let location = format!("{name}.{column}");
            let col = quote_ident(column);
            match info.attrs.get(column) {
                None => problems.push(SchemaProblem {
                    location,
                    message: format!("column does not exist ({why})"),
                    fix: Some(format!(
                        "ALTER TABLE {table} ADD COLUMN {col} {wanted};{}",
                        add_extra.map(|e| format!(" {e}")).unwrap_or_default()
                    )),
                }),
                Some(attr) if attr.type_name != wanted => problems.push(SchemaProblem {
                    location,
                    message: format!("stored as {}, must be {wanted} ({why})", attr.type_name),
                    fix: Some(if wanted == "bytea" {
                        // Existing values become legacy plaintext cells: serve
                        // them with `mode: migrating` until re-encrypted.
                        format!(
                            "ALTER TABLE {table} ALTER COLUMN {col} TYPE bytea USING convert_to({col}::text, 'UTF8');"
                        )
                    } else {
                        format!("ALTER TABLE {table} ALTER COLUMN {col} TYPE {wanted} USING {col}::{wanted};")
                    }),
                }),
                Some(attr) if attr.has_default && wanted == "bytea" => problems.push(SchemaProblem {
                    location,
                    message: "has a DEFAULT, which would store a value the proxy never encrypted".to_owned(),
                    fix: Some(format!("ALTER TABLE {table} ALTER COLUMN {col} DROP DEFAULT;")),
                }),
                Some(_) => {}
            }
        };
        for (column, column_policy) in &table_policy.columns {
            expect(
                column,
                "bytea",
                "protected columns hold encrypted cells",
                None,
            );
            if column_policy.search == SearchMode::Equality {
                let bidx = format!("{column}_bidx");
                let index = format!("CREATE INDEX ON {table} ({});", quote_ident(&bidx));
                expect(
                    &bidx,
                    "bytea",
                    "blind index for search: equality",
                    Some(index),
                );
            }
        }
        expect(
            &table_policy.edek_column,
            "jsonb",
            "the EDEK column holds {dek_id: wrapped key}",
            None,
        );
        if !info.attrs.contains_key(&table_policy.tenant_column) {
            problems.push(SchemaProblem {
                location: format!("{name}.{}", table_policy.tenant_column),
                message: "tenant column does not exist".to_owned(),
                fix: None,
            });
        }
    }
    problems
}
