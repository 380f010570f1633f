//! `reencrypt`: moves a tenant's cells from retired DEKs to its current one
//! (after `keys rotate`) and rewrites the rows' EDEK copies (after `rewrap`),
//! online: batches by primary key, a compare-and-set per cell, so a value
//! the application writes meanwhile is never overwritten. A row is done when
//! every cell names the current DEK and its EDEK column is the current
//! EDEK. Its position (the last key of a committed batch) is recorded in
//! `cmk.positions` in the batch's transaction: a run killed at any moment
//! and started again goes on after it.

use tokio_postgres::Client;
use uuid::Uuid;

use crate::catalog::adoption;
use crate::catalog::quote_ident;
use crate::config::{split_table_name, Policy, TablePolicy};
use crate::crypto::{peek_dek_id, CellAad};
use crate::keys::KeyService;

use super::shape::TableShape;
use super::{position, AdoptError};

/// What a run did to one table.
#[derive(Debug, Default)]
pub struct TableOutcome {
    /// Rows rewritten.
    pub rows: u64,
    /// Cells sealed again under the current DEK.
    pub cells: u64,
}

/// Re-encrypts the cells of `tenant` in `table` (a policy table in its
/// format). `progress` is told the rows of every committed batch.
pub async fn reencrypt_table(
    client: &mut Client,
    keys: &KeyService,
    policy: &Policy,
    table: &str,
    tenant: &str,
    batch: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<TableOutcome, AdoptError> {
    let table_policy = policy
        .tables
        .get(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table} is not a table of the policy")))?;
    if adoption::adoptions(client).await?.contains_key(table) {
        return Err(AdoptError::Refused(format!(
            "{table} is in transition from legacy plaintext: finish cmk-proxy encrypt first"
        )));
    }
    let shape = TableShape::read(client, table, None).await?;
    if shape.primary_key.is_empty() {
        return Err(AdoptError::Refused(format!(
            "{table} has no primary key: reencrypt works in batches by primary key"
        )));
    }
    let (_, name) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    let write = keys
        .write_key(tenant)
        .await
        .map_err(|e| AdoptError::Keys(e.to_string()))?;
    let current = write.dek.dek_id;
    let others: Vec<String> = keys
        .registry()
        .data_keys(tenant)
        .await
        .map_err(|e| AdoptError::Keys(e.to_string()))?
        .iter()
        .map(|k| k.dek_id.to_string())
        .filter(|id| *id != current.to_string())
        .collect();
    let sql = Sql::new(&shape, name, table_policy);
    let select_first = client.prepare(&sql.select(false)).await?;
    let select_next = client.prepare(&sql.select(true)).await?;
    let update = client.prepare(&sql.update).await?;
    let limit = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
    let current_bytes = current.as_bytes().to_vec();
    let edek_json = write.edek_json.to_string();
    let width = shape.primary_key.len();
    let columns: Vec<&String> = table_policy.columns.keys().collect();
    let task = position::task("reencrypt", table, Some(tenant));
    let mut resume: Option<Vec<String>> = position::load(client, &task).await?;
    let mut outcome = TableOutcome::default();
    loop {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&limit, &tenant, &current_bytes, &edek_json];
        let rows = match &resume {
            None => client.query(&select_first, &params).await?,
            Some(after) => {
                params.extend(
                    after
                        .iter()
                        .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)),
                );
                client.query(&select_next, &params).await?
            }
        };
        let Some(last) = rows.last() else {
            break;
        };
        let last_key: Vec<String> = (0..width).map(|i| last.get(i)).collect();
        let mut pks: Vec<Vec<String>> = vec![Vec::new(); width];
        let mut old: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::new(); columns.len()];
        let mut new: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::new(); columns.len()];
        for row in &rows {
            for (i, pk) in pks.iter_mut().enumerate() {
                pk.push(row.get(i));
            }
            for (i, column) in columns.iter().enumerate() {
                let cell: Option<Vec<u8>> = row.get(width + i);
                let resealed = match &cell {
                    Some(cell) if peek_dek_id(cell).ok() != Some(current) => {
                        outcome.cells += 1;
                        Some(reseal(keys, &write, tenant, table, column, cell).await?)
                    }
                    _ => None,
                };
                // NULL old: nothing to move (the CASE keeps the cell).
                old[i].push(resealed.as_ref().and(cell));
                new[i].push(resealed);
            }
        }
        let mut update_params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        for pk in &pks {
            update_params.push(pk);
        }
        for i in 0..columns.len() {
            update_params.push(&old[i]);
            update_params.push(&new[i]);
        }
        update_params.push(&tenant);
        update_params.push(&others);
        update_params.push(&edek_json);
        let transaction = client.transaction().await?;
        transaction.execute(&update, &update_params).await?;
        position::save(&transaction, &task, &last_key).await?;
        transaction.commit().await?;
        outcome.rows += rows.len() as u64;
        progress(rows.len() as u64);
        if rows.len() < batch.max(1) {
            break;
        }
        resume = Some(last_key);
    }
    position::clear(client, &task).await?;
    Ok(outcome)
}

/// Opens a cell under its own DEK and seals the plaintext under the current one.
async fn reseal(
    keys: &KeyService,
    write: &crate::keys::WriteKey,
    tenant: &str,
    table: &str,
    column: &str,
    cell: &[u8],
) -> Result<Vec<u8>, AdoptError> {
    let integrity = |what: &str| {
        AdoptError::Refused(format!("{table}.{column}: a cell of tenant {tenant} {what} (KM005); nothing was changed for it"))
    };
    let dek_id: Uuid = peek_dek_id(cell).map_err(|_| integrity("has a damaged header"))?;
    let key = keys
        .read_key(tenant, dek_id, None)
        .await
        .map_err(|e| AdoptError::Keys(e.to_string()))?;
    let aad = CellAad {
        tenant_id: tenant,
        table,
        column,
    };
    let plaintext = zeroize::Zeroizing::new(
        key.open(&aad, cell)
            .map_err(|_| integrity("failed to decrypt"))?,
    );
    Ok(write.dek.seal(&aad, &plaintext))
}

/// The statements of one table.
struct Sql {
    relation: String,
    keys: Vec<String>,
    key_types: Vec<String>,
    tenant: String,
    edek: String,
    columns: Vec<String>,
    update: String,
}

impl Sql {
    fn new(shape: &TableShape, name: &str, policy: &TablePolicy) -> Sql {
        let q = |s: &str| quote_ident(s);
        let relation = shape.relation(name);
        let keys: Vec<String> = shape.primary_key.iter().map(|k| q(k)).collect();
        let key_types: Vec<String> = shape
            .primary_key
            .iter()
            .map(|k| {
                shape
                    .column(k)
                    .map_or("text".to_owned(), |c| c.type_name.clone())
            })
            .collect();
        let columns: Vec<String> = policy.columns.keys().map(|c| q(c)).collect();
        let tenant = q(&policy.tenant_column);
        let edek = q(&policy.edek_column);
        let mut arrays = Vec::new();
        let mut names = Vec::new();
        let mut n = 0;
        for i in 0..keys.len() {
            n += 1;
            arrays.push(format!("${n}::text[]"));
            names.push(format!("k{i}"));
        }
        let mut sets = Vec::new();
        for (i, c) in columns.iter().enumerate() {
            arrays.push(format!("${}::bytea[]", n + 1));
            arrays.push(format!("${}::bytea[]", n + 2));
            n += 2;
            names.push(format!("old{i}"));
            names.push(format!("new{i}"));
            sets.push(format!(
                "{c} = CASE WHEN b.{c} = u.old{i} THEN u.new{i} ELSE b.{c} END"
            ));
        }
        // Every cell of the row is on the current DEK now (or was written
        // meanwhile, under it): the row's EDEK copies are the current one.
        sets.push(format!(
            "{edek} = (coalesce(b.{edek}, '{{}}'::jsonb) - ${}::text[]) || ${}::text::jsonb",
            n + 2,
            n + 3
        ));
        let matches: Vec<String> = keys
            .iter()
            .zip(&key_types)
            .enumerate()
            .map(|(i, (k, ty))| format!("b.{k} = CAST(u.k{i} AS {ty})"))
            .chain(std::iter::once(format!("b.{tenant}::text = ${}", n + 1)))
            .collect();
        let update = format!(
            "UPDATE {relation} AS b SET {} FROM unnest({}) AS u({}) WHERE {}",
            sets.join(", "),
            arrays.join(", "),
            names.join(", "),
            matches.join(" AND ")
        );
        Sql {
            relation,
            keys,
            key_types,
            tenant,
            edek,
            columns,
            update,
        }
    }

    /// Rows of tenant `$2` with a cell not on DEK `$3` or an EDEK column
    /// other than `$4`; `$5…` the key to resume after.
    fn select(&self, resume: bool) -> String {
        let table_keys: Vec<String> = self.keys.iter().map(|k| format!("b.{k}")).collect();
        let stale: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("(b.{c} IS NOT NULL AND substr(b.{c}, 5, 16) <> $3)"))
            .chain(std::iter::once(format!(
                "b.{} IS DISTINCT FROM $4::text::jsonb",
                self.edek
            )))
            .collect();
        let after = if resume {
            let values: Vec<String> = self
                .key_types
                .iter()
                .enumerate()
                .map(|(i, ty)| format!("CAST(${}::text AS {ty})", i + 5))
                .collect();
            format!(" AND ({}) > ({})", table_keys.join(", "), values.join(", "))
        } else {
            String::new()
        };
        format!(
            "SELECT {}, {} FROM {} AS b WHERE b.{}::text = $2 AND ({}){after} ORDER BY {} LIMIT $1",
            table_keys
                .iter()
                .map(|k| format!("{k}::text"))
                .collect::<Vec<_>>()
                .join(", "),
            self.columns
                .iter()
                .map(|c| format!("b.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.relation,
            self.tenant,
            stale.join(" OR "),
            table_keys.join(", ")
        )
    }
}
