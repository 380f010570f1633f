//! The batch converter of `encrypt`: reads rows with legacy values in
//! primary-key order, seals them under their tenant's current DEK, and
//! writes the cells with a compare-and-set per column, recording its
//! position in the same transaction (docs/ADOPTING.md, "Converting rows").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_postgres::Client;

use crate::catalog::adoption::shadow_column;
use crate::catalog::quote_ident;
use crate::config::{DeclaredType, SearchMode, TablePolicy};
use crate::crypto::{blind_index, BlindIndexKey, CellAad};
use crate::keys::{KeyError, KeyService, WriteKey};
use crate::values;

use super::shape::TableShape;
use super::AdoptError;

/// Why rows of a tenant were left as they are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// The row's tenant column is NULL.
    NoTenant,
    /// The tenant is not in `cmk.tenants`.
    UnknownTenant,
    /// The tenant's key is revoked or disabled.
    Revoked,
    /// The tenant's KMS could not be reached.
    Unavailable,
    /// A legacy value is not valid for the column's declared type.
    InvalidValue,
    /// A cell fails its integrity check (`decrypt`): left sealed.
    Damaged,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoTenant => "no tenant in the row",
            Self::UnknownTenant => "tenant has no registered key",
            Self::Revoked => "tenant's key is revoked (KM001)",
            Self::Unavailable => "tenant's KMS unavailable (KM002)",
            Self::InvalidValue => "a value is not valid for its declared type",
            Self::Damaged => "a cell fails its integrity check (KM005)",
        })
    }
}

/// Rows left as they are, by (tenant, reason).
pub type Skips = BTreeMap<(String, SkipReason), u64>;

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassOutcome {
    /// Rows read.
    pub rows_seen: u64,
    /// Rows written with their cells.
    pub rows_sealed: u64,
    /// Cells sealed.
    pub cells: u64,
    /// Rows skipped.
    pub skips: Skips,
}

/// A protected column as the converter sees it.
struct Protected {
    name: String,
    ty: DeclaredType,
    search: bool,
}

/// The converter of one table in transition.
pub struct Converter {
    table: String,
    base: String,
    tenant_column: String,
    columns: Vec<Protected>,
    key_types: Vec<String>,
    select_first: String,
    select_next: String,
    update: String,
    /// Rows per batch.
    pub batch: usize,
}

impl Converter {
    /// The converter of policy table `table`, whose real table is `base`.
    pub fn new(
        table: &str,
        base: &TableShape,
        policy: &TablePolicy,
        batch: usize,
    ) -> Result<Converter, AdoptError> {
        let relation = base.relation(&base.name);
        let mut key_types = Vec::new();
        for k in &base.primary_key {
            let column = base.column(k).ok_or_else(|| {
                AdoptError::Refused(format!("{table}: primary-key column {k} not found"))
            })?;
            key_types.push(column.type_name.clone());
        }
        let columns: Vec<Protected> = policy
            .columns
            .iter()
            .map(|(name, p)| Protected {
                name: name.clone(),
                ty: p.ty,
                search: p.search == SearchMode::Equality,
            })
            .collect();
        let q = |s: &str| quote_ident(s);
        let keys: Vec<String> = base.primary_key.iter().map(|k| q(k)).collect();
        let legacy_left = columns
            .iter()
            .map(|c| format!("b.{} IS NOT NULL", q(&c.name)))
            .collect::<Vec<_>>()
            .join(" OR ");
        let selected: Vec<String> = keys
            .iter()
            .map(|k| format!("b.{k}::text"))
            .chain(std::iter::once(format!(
                "b.{}::text",
                q(&policy.tenant_column)
            )))
            .chain(columns.iter().map(|c| format!("b.{}::text", q(&c.name))))
            .collect();
        let after: Vec<String> = key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("CAST(${}::text AS {ty})", i + 2))
            .collect();
        // The table's own key columns (`b.`), not the text outputs of the
        // same names, order and resume the scan.
        let table_keys: Vec<String> = keys.iter().map(|k| format!("b.{k}")).collect();
        let select = |resume: &str| {
            format!(
                "SELECT {} FROM {relation} AS b WHERE ({legacy_left}){resume} ORDER BY {} LIMIT $1",
                selected.join(", "),
                table_keys.join(", ")
            )
        };
        let select_first = select("");
        let select_next = select(&format!(
            " AND ({}) > ({})",
            table_keys.join(", "),
            after.join(", ")
        ));
        // unnest(key…, tenant, per column: old, cell[, bidx], edek)
        let mut arrays = Vec::new();
        let mut names = Vec::new();
        let mut n = 0;
        let mut next = |ty: &str, name: String, arrays: &mut Vec<String>| {
            n += 1;
            arrays.push(format!("${n}::{ty}[]"));
            names.push(name);
        };
        for i in 0..keys.len() {
            next("text", format!("k{i}"), &mut arrays);
        }
        next("text", "tenant".into(), &mut arrays);
        let mut sets = Vec::new();
        for (i, c) in columns.iter().enumerate() {
            next("text", format!("old{i}"), &mut arrays);
            next("bytea", format!("cell{i}"), &mut arrays);
            let same = format!("u.old{i} IS NOT NULL AND b.{}::text = u.old{i}", q(&c.name));
            let shadow = q(&shadow_column(&c.name));
            sets.push(format!(
                "{shadow} = CASE WHEN {same} THEN u.cell{i} ELSE b.{shadow} END"
            ));
            if c.search {
                next("bytea", format!("bidx{i}"), &mut arrays);
                let bidx = q(&format!("{}_bidx", c.name));
                sets.push(format!(
                    "{bidx} = CASE WHEN {same} THEN u.bidx{i} ELSE b.{bidx} END"
                ));
            }
            sets.push(format!(
                "{0} = CASE WHEN {same} THEN NULL ELSE b.{0} END",
                q(&c.name)
            ));
        }
        next("text", "edek".into(), &mut arrays);
        let edek = q(&policy.edek_column);
        sets.push(format!(
            "{edek} = coalesce(b.{edek}, '{{}}'::jsonb) || u.edek::jsonb"
        ));
        let matches: Vec<String> = keys
            .iter()
            .zip(&key_types)
            .enumerate()
            .map(|(i, (k, ty))| format!("b.{k} = CAST(u.k{i} AS {ty})"))
            .chain(std::iter::once(format!(
                "b.{}::text = u.tenant",
                q(&policy.tenant_column)
            )))
            .collect();
        let update = format!(
            "UPDATE {relation} AS b SET {} FROM unnest({}) AS u({}) WHERE {}",
            sets.join(", "),
            arrays.join(", "),
            names.join(", "),
            matches.join(" AND ")
        );
        Ok(Converter {
            table: table.to_owned(),
            base: relation,
            tenant_column: policy.tenant_column.clone(),
            columns,
            key_types,
            select_first,
            select_next,
            update,
            batch,
        })
    }

    /// Rows with a legacy value left, by tenant (`None`: no tenant).
    pub async fn remaining(
        &self,
        client: &Client,
    ) -> Result<Vec<(Option<String>, i64)>, AdoptError> {
        let legacy_left = self
            .columns
            .iter()
            .map(|c| format!("{} IS NOT NULL", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(" OR ");
        let rows = client
            .query(
                &format!(
                    "SELECT {0}::text, count(*) FROM {1} WHERE {legacy_left} GROUP BY 1 ORDER BY 1",
                    quote_ident(&self.tenant_column),
                    self.base
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// One pass from `resume` (or the start) to the end of the table;
    /// `progress` is told the rows of every committed batch.
    pub async fn pass(
        &self,
        client: &mut Client,
        keys: &KeyService,
        mut resume: Option<Vec<String>>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<PassOutcome, AdoptError> {
        let select_first = client.prepare(&self.select_first).await?;
        let select_next = client.prepare(&self.select_next).await?;
        let update = client.prepare(&self.update).await?;
        let limit = i64::try_from(self.batch).unwrap_or(i64::MAX);
        let mut outcome = PassOutcome::default();
        let width = self.key_types.len();
        loop {
            let rows = match &resume {
                None => client.query(&select_first, &[&limit]).await?,
                Some(after) => {
                    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&limit];
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
            let batch = self.seal_batch(keys, &rows, width, &mut outcome).await?;
            let transaction = client.transaction().await?;
            if batch.rows > 0 {
                let params = batch.params();
                transaction.execute(&update, &params).await?;
            }
            transaction
                .execute(
                    "UPDATE cmk.adoptions SET resume_after = $2, updated_at = now() WHERE table_name = $1",
                    &[&self.table, &last_key],
                )
                .await?;
            transaction.commit().await?;
            outcome.rows_seen += rows.len() as u64;
            outcome.rows_sealed += batch.rows as u64;
            progress(rows.len() as u64);
            if rows.len() < self.batch {
                break;
            }
            resume = Some(last_key);
        }
        client
            .execute(
                "UPDATE cmk.adoptions SET resume_after = NULL, updated_at = now() WHERE table_name = $1",
                &[&self.table],
            )
            .await?;
        Ok(outcome)
    }

    /// Seals the legacy values of one batch of rows.
    async fn seal_batch(
        &self,
        keys: &KeyService,
        rows: &[tokio_postgres::Row],
        width: usize,
        outcome: &mut PassOutcome,
    ) -> Result<Batch, AdoptError> {
        let mut batch = Batch::new(width, &self.columns);
        let mut tenant_keys: HashMap<String, Result<TenantKeys, SkipReason>> = HashMap::new();
        'rows: for row in rows {
            let tenant: Option<String> = row.get(width);
            let Some(tenant) = tenant else {
                *outcome
                    .skips
                    .entry((String::new(), SkipReason::NoTenant))
                    .or_default() += 1;
                continue;
            };
            if !tenant_keys.contains_key(&tenant) {
                let found = self.tenant_keys(keys, &tenant).await?;
                tenant_keys.insert(tenant.clone(), found);
            }
            let key = match tenant_keys.get(&tenant) {
                Some(Ok(key)) => key,
                Some(Err(reason)) => {
                    *outcome.skips.entry((tenant, reason.clone())).or_default() += 1;
                    continue;
                }
                None => continue,
            };
            let mut cells = Vec::with_capacity(self.columns.len());
            for (i, column) in self.columns.iter().enumerate() {
                let old: Option<String> = row.get(width + 1 + i);
                let Some(old) = old else {
                    cells.push((None, None, None));
                    continue;
                };
                let Ok(canonical) = values::canonical_text(column.ty, old.as_bytes()) else {
                    *outcome
                        .skips
                        .entry((tenant.clone(), SkipReason::InvalidValue))
                        .or_default() += 1;
                    continue 'rows;
                };
                let aad = CellAad {
                    tenant_id: &tenant,
                    table: &self.table,
                    column: &column.name,
                };
                let cell = key.write.dek.seal(&aad, canonical.as_bytes());
                let bidx = match (&key.index, column.search) {
                    (Some(index), true) => Some(blind_index(index, canonical.as_bytes()).to_vec()),
                    _ => None,
                };
                cells.push((Some(old), Some(cell), bidx));
                outcome.cells += 1;
            }
            let pk: Vec<String> = (0..width).map(|i| row.get(i)).collect();
            batch.push(pk, tenant.clone(), cells, key.write.edek_json.to_string());
        }
        Ok(batch)
    }

    /// The tenant's write key (and blind-index key when a column is
    /// searchable), or why its rows are skipped.
    async fn tenant_keys(
        &self,
        keys: &KeyService,
        tenant: &str,
    ) -> Result<Result<TenantKeys, SkipReason>, AdoptError> {
        let skip = |e: KeyError| match e {
            KeyError::UnknownTenant { .. } => Ok(Err(SkipReason::UnknownTenant)),
            KeyError::Revoked { .. } => Ok(Err(SkipReason::Revoked)),
            KeyError::Unavailable { .. } | KeyError::Integrity { .. } => {
                Ok(Err(SkipReason::Unavailable))
            }
            KeyError::Registry(e) => Err(AdoptError::Keys(e)),
        };
        let write = match keys.write_key(tenant).await {
            Ok(write) => write,
            Err(e) => return skip(e),
        };
        let index = if self.columns.iter().any(|c| c.search) {
            match keys.blind_index_key(tenant).await {
                Ok(index) => Some(index),
                Err(e) => return skip(e),
            }
        } else {
            None
        };
        Ok(Ok(TenantKeys { write, index }))
    }
}

/// A tenant's keys for one batch.
struct TenantKeys {
    write: WriteKey,
    index: Option<Arc<BlindIndexKey>>,
}

/// One cell of a batch: (legacy text read, cell, blind index).
type BatchCell = (Option<String>, Option<Vec<u8>>, Option<Vec<u8>>);

/// The arrays of one batch's UPDATE.
struct Batch {
    rows: usize,
    keys: Vec<Vec<String>>,
    tenants: Vec<String>,
    old: Vec<Vec<Option<String>>>,
    cells: Vec<Vec<Option<Vec<u8>>>>,
    bidx: Vec<Option<Vec<Option<Vec<u8>>>>>,
    edeks: Vec<String>,
}

impl Batch {
    fn new(width: usize, columns: &[Protected]) -> Batch {
        Batch {
            rows: 0,
            keys: vec![Vec::new(); width],
            tenants: Vec::new(),
            old: vec![Vec::new(); columns.len()],
            cells: vec![Vec::new(); columns.len()],
            bidx: columns.iter().map(|c| c.search.then(Vec::new)).collect(),
            edeks: Vec::new(),
        }
    }

    fn push(&mut self, pk: Vec<String>, tenant: String, cells: Vec<BatchCell>, edek: String) {
        self.rows += 1;
        for (i, k) in pk.into_iter().enumerate() {
            if let Some(keys) = self.keys.get_mut(i) {
                keys.push(k);
            }
        }
        self.tenants.push(tenant);
        for (i, (old, cell, bidx)) in cells.into_iter().enumerate() {
            self.old[i].push(old);
            self.cells[i].push(cell);
            if let Some(Some(column)) = self.bidx.get_mut(i) {
                column.push(bidx);
            }
        }
        self.edeks.push(edek);
    }

    /// Parameters in the order of the UPDATE's unnest.
    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut out: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        for k in &self.keys {
            out.push(k);
        }
        out.push(&self.tenants);
        for i in 0..self.old.len() {
            out.push(&self.old[i]);
            out.push(&self.cells[i]);
            if let Some(Some(bidx)) = self.bidx.get(i) {
                out.push(bidx);
            }
        }
        out.push(&self.edeks);
        out
    }
}
