//! The batch converter of `decrypt`: reads rows with cells left in
//! primary-key order (of one tenant, or all), opens each cell with its
//! tenant's key (the DEK its header names) and writes the plaintext back to
//! the legacy column in its declared type, with a compare-and-set per
//! column on the cell read, recording its position in the same transaction
//! (docs/ADOPTING.md, "The way back").

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::catalog::adoption::shadow_column;
use crate::catalog::quote_ident;
use crate::config::TablePolicy;
use crate::crypto::{peek_dek_id, CellAad};
use crate::keys::{KeyError, KeyService};

use super::convert::{PassOutcome, SkipReason};
use super::shape::TableShape;
use super::{position, AdoptError};

/// Who reads the cells, in the audit events (as a session's client address).
const AUDIT_CLIENT: &str = "cmk-proxy decrypt";

/// The cell converter of one table in transition.
pub struct Opener {
    table: String,
    columns: Vec<String>,
    width: usize,
    select_first: String,
    select_next: String,
    update: String,
    count_left: String,
    /// Rows per batch.
    pub batch: usize,
}

impl Opener {
    /// The opener of policy table `table`, whose real table is `base`.
    pub fn new(
        table: &str,
        base: &TableShape,
        policy: &TablePolicy,
        batch: usize,
    ) -> Result<Opener, AdoptError> {
        let relation = base.relation(&base.name);
        let q = |s: &str| quote_ident(s);
        let mut key_types = Vec::new();
        for k in &base.primary_key {
            let column = base.column(k).ok_or_else(|| {
                AdoptError::Refused(format!("{table}: primary-key column {k} not found"))
            })?;
            key_types.push(column.type_name.clone());
        }
        let columns: Vec<String> = policy.columns.keys().cloned().collect();
        let table_keys: Vec<String> = base
            .primary_key
            .iter()
            .map(|k| format!("b.{}", q(k)))
            .collect();
        let tenant = q(&policy.tenant_column);
        let cells_left = columns
            .iter()
            .map(|c| format!("b.{} IS NOT NULL", q(&shadow_column(c))))
            .collect::<Vec<_>>()
            .join(" OR ");
        let selected: Vec<String> = table_keys
            .iter()
            .map(|k| format!("{k}::text"))
            .chain(std::iter::once(format!("b.{tenant}::text")))
            .chain(
                columns
                    .iter()
                    .map(|c| format!("b.{}", q(&shadow_column(c)))),
            )
            .collect();
        let after: Vec<String> = key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("CAST(${}::text AS {ty})", i + 3))
            .collect();
        let select = |resume: &str| {
            format!(
                "SELECT {} FROM {relation} AS b WHERE ({cells_left}) \
                 AND ($2::text IS NULL OR b.{tenant}::text = $2::text){resume} ORDER BY {} LIMIT $1",
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
        // unnest(key…, tenant, per column: cell read, plaintext)
        let mut arrays = Vec::new();
        let mut names = Vec::new();
        for i in 0..key_types.len() {
            arrays.push(format!("${}::text[]", arrays.len() + 1));
            names.push(format!("k{i}"));
        }
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        names.push("tenant".to_owned());
        let mut sets = Vec::new();
        for (i, (c, p)) in policy.columns.iter().enumerate() {
            arrays.push(format!("${}::bytea[]", arrays.len() + 1));
            names.push(format!("cell{i}"));
            arrays.push(format!("${}::text[]", arrays.len() + 1));
            names.push(format!("plain{i}"));
            let shadow = q(&shadow_column(c));
            let same = format!("b.{shadow} = u.cell{i}");
            sets.push(format!(
                "{} = CASE WHEN {same} THEN CAST(u.plain{i} AS {}) ELSE b.{} END",
                q(c),
                p.ty.sql_name(),
                q(c)
            ));
            sets.push(format!(
                "{shadow} = CASE WHEN {same} THEN NULL ELSE b.{shadow} END"
            ));
        }
        let matches: Vec<String> = base
            .primary_key
            .iter()
            .zip(&key_types)
            .enumerate()
            .map(|(i, (k, ty))| format!("b.{} = CAST(u.k{i} AS {ty})", q(k)))
            .chain(std::iter::once(format!("b.{tenant}::text = u.tenant")))
            .collect();
        let update = format!(
            "UPDATE {relation} AS b SET {} FROM unnest({}) AS u({}) WHERE {}",
            sets.join(", "),
            arrays.join(", "),
            names.join(", "),
            matches.join(" AND ")
        );
        let count_left = format!(
            "SELECT b.{tenant}::text, count(*) FROM {relation} AS b WHERE ({cells_left}) \
             AND ($1::text IS NULL OR b.{tenant}::text = $1::text) GROUP BY 1 ORDER BY 1"
        );
        Ok(Opener {
            table: table.to_owned(),
            columns,
            width: key_types.len(),
            select_first,
            select_next,
            update,
            count_left,
            batch,
        })
    }

    /// Rows with a cell left, by tenant (`None`: no tenant), of `tenant` only
    /// when given.
    pub async fn remaining(
        &self,
        client: &impl GenericClient,
        tenant: Option<&str>,
    ) -> Result<Vec<(Option<String>, i64)>, AdoptError> {
        let rows = client.query(&self.count_left, &[&tenant]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// One pass from the recorded position of `task` (or the start) to the
    /// end of the table; `progress` is told the rows of every committed batch.
    pub async fn pass(
        &self,
        client: &mut Client,
        keys: &KeyService,
        tenant: Option<&str>,
        task: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<PassOutcome, AdoptError> {
        let select_first = client.prepare(&self.select_first).await?;
        let select_next = client.prepare(&self.select_next).await?;
        let update = client.prepare(&self.update).await?;
        let limit = i64::try_from(self.batch).unwrap_or(i64::MAX);
        let mut resume = position::load(client, task).await?;
        let mut outcome = PassOutcome::default();
        let user = current_user(client).await?;
        loop {
            let rows = match &resume {
                None => client.query(&select_first, &[&limit, &tenant]).await?,
                Some(after) => {
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&limit, &tenant];
                    params.extend(after.iter().map(|k| k as &(dyn ToSql + Sync)));
                    client.query(&select_next, &params).await?
                }
            };
            let Some(last) = rows.last() else {
                break;
            };
            let last_key: Vec<String> = (0..self.width).map(|i| last.get(i)).collect();
            let batch = self.open_batch(keys, &rows, &mut outcome).await?;
            let transaction = client.transaction().await?;
            if batch.rows > 0 {
                transaction.execute(&update, &batch.params()).await?;
            }
            position::save(&transaction, task, &last_key).await?;
            transaction.commit().await?;
            self.audit(keys, &batch, &user);
            outcome.rows_seen += rows.len() as u64;
            outcome.rows_sealed += batch.rows as u64;
            progress(rows.len() as u64);
            if rows.len() < self.batch {
                break;
            }
            resume = Some(last_key);
        }
        position::clear(client, task).await?;
        Ok(outcome)
    }

    /// Opens the cells of `rows` (read by the opener's query) and writes
    /// them back as plaintext through `client` (the finish's transaction):
    /// the cells written by the application since the last pass.
    pub async fn open_rows(
        &self,
        client: &impl GenericClient,
        keys: &KeyService,
        rows: &[Row],
    ) -> Result<PassOutcome, AdoptError> {
        let mut outcome = PassOutcome::default();
        let batch = self.open_batch(keys, rows, &mut outcome).await?;
        if batch.rows > 0 {
            client.execute(&self.update, &batch.params()).await?;
        }
        outcome.rows_seen = rows.len() as u64;
        outcome.rows_sealed = batch.rows as u64;
        let user = current_user(client).await?;
        self.audit(keys, &batch, &user);
        Ok(outcome)
    }

    /// The query of the rows with cells left (`$1` limit, `$2` tenant or NULL).
    pub fn select_first(&self) -> &str {
        &self.select_first
    }

    /// One audit event per tenant of a committed batch, as the proxy emits
    /// for the cells of a result it decrypts.
    fn audit(&self, keys: &KeyService, batch: &Batch, user: &str) {
        let mut by_tenant: HashMap<&str, u64> = HashMap::new();
        for tenant in &batch.tenants {
            *by_tenant.entry(tenant.as_str()).or_default() += 1;
        }
        for (tenant, rows) in by_tenant {
            keys.audit().emit(AuditEvent::DecryptBatch {
                tenant: tenant.to_owned(),
                table: self.table.clone(),
                columns: self.columns.clone(),
                rows,
                fingerprint: format!("cmk-proxy decrypt {}", self.table),
                client_addr: AUDIT_CLIENT.to_owned(),
                user: user.to_owned(),
            });
        }
    }

    /// Opens the cells of one batch of rows.
    async fn open_batch(
        &self,
        keys: &KeyService,
        rows: &[Row],
        outcome: &mut PassOutcome,
    ) -> Result<Batch, AdoptError> {
        let width = self.width;
        let mut batch = Batch::new(width, self.columns.len());
        let mut refused: HashMap<String, SkipReason> = HashMap::new();
        'rows: for row in rows {
            let tenant: Option<String> = row.get(width);
            let Some(tenant) = tenant else {
                *outcome
                    .skips
                    .entry((String::new(), SkipReason::NoTenant))
                    .or_default() += 1;
                continue;
            };
            if let Some(reason) = refused.get(&tenant) {
                *outcome.skips.entry((tenant, reason.clone())).or_default() += 1;
                continue;
            }
            let mut opened = Vec::with_capacity(self.columns.len());
            for (i, column) in self.columns.iter().enumerate() {
                let cell: Option<Vec<u8>> = row.get(width + 1 + i);
                let Some(cell) = cell else {
                    opened.push((None, None));
                    continue;
                };
                match self.open(keys, &tenant, column, &cell).await? {
                    Ok(plain) => {
                        opened.push((Some(cell), Some(plain)));
                        outcome.cells += 1;
                    }
                    Err(reason) => {
                        if reason != SkipReason::Damaged {
                            refused.insert(tenant.clone(), reason.clone());
                        }
                        *outcome.skips.entry((tenant, reason)).or_default() += 1;
                        continue 'rows;
                    }
                }
            }
            let pk: Vec<String> = (0..width).map(|i| row.get(i)).collect();
            batch.push(pk, tenant, opened);
        }
        Ok(batch)
    }

    /// The plaintext (canonical text of the declared type) of one cell, or
    /// why it stays sealed.
    async fn open(
        &self,
        keys: &KeyService,
        tenant: &str,
        column: &str,
        cell: &[u8],
    ) -> Result<Result<String, SkipReason>, AdoptError> {
        let Ok(dek_id) = peek_dek_id(cell) else {
            return Ok(Err(SkipReason::Damaged));
        };
        let key = match read_key(keys, tenant, dek_id).await? {
            Ok(key) => key,
            Err(reason) => return Ok(Err(reason)),
        };
        let aad = CellAad {
            tenant_id: tenant,
            table: &self.table,
            column,
        };
        let Ok(plain) = key.open(&aad, cell) else {
            return Ok(Err(SkipReason::Damaged));
        };
        let plain = Zeroizing::new(plain);
        Ok(match std::str::from_utf8(&plain) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err(SkipReason::Damaged),
        })
    }
}

/// The DEK `dek_id` of `tenant`, or why its cells stay sealed.
async fn read_key(
    keys: &KeyService,
    tenant: &str,
    dek_id: Uuid,
) -> Result<Result<std::sync::Arc<crate::keys::ApprovedDek>, SkipReason>, AdoptError> {
    match keys.read_key(tenant, dek_id, None).await {
        Ok(key) => Ok(Ok(key)),
        Err(KeyError::UnknownTenant { .. }) => Ok(Err(SkipReason::UnknownTenant)),
        Err(KeyError::Revoked { .. }) => Ok(Err(SkipReason::Revoked)),
        Err(KeyError::Unavailable { .. }) => Ok(Err(SkipReason::Unavailable)),
        Err(KeyError::Integrity { .. }) => Ok(Err(SkipReason::Damaged)),
        Err(KeyError::Registry(e)) => Err(AdoptError::Keys(e)),
    }
}

/// The database user the run connects as (named in its audit events).
async fn current_user(client: &impl GenericClient) -> Result<String, AdoptError> {
    Ok(client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0))
}

/// One cell of a batch: (cell read, its plaintext).
type Opened = (Option<Vec<u8>>, Option<String>);

/// The arrays of one batch's UPDATE; the plaintexts are zeroized on drop.
struct Batch {
    rows: usize,
    keys: Vec<Vec<String>>,
    tenants: Vec<String>,
    cells: Vec<Vec<Option<Vec<u8>>>>,
    plains: Vec<Zeroizing<Vec<Option<String>>>>,
}

impl Batch {
    fn new(width: usize, columns: usize) -> Batch {
        Batch {
            rows: 0,
            keys: vec![Vec::new(); width],
            tenants: Vec::new(),
            cells: vec![Vec::new(); columns],
            plains: (0..columns).map(|_| Zeroizing::new(Vec::new())).collect(),
        }
    }

    fn push(&mut self, pk: Vec<String>, tenant: String, opened: Vec<Opened>) {
        self.rows += 1;
        for (keys, k) in self.keys.iter_mut().zip(pk) {
            keys.push(k);
        }
        self.tenants.push(tenant);
        for (i, (cell, plain)) in opened.into_iter().enumerate() {
            if let (Some(cells), Some(plains)) = (self.cells.get_mut(i), self.plains.get_mut(i)) {
                cells.push(cell);
                plains.push(plain);
            }
        }
    }

    /// Parameters in the order of the UPDATE's unnest.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut out: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for k in &self.keys {
            out.push(k);
        }
        out.push(&self.tenants);
        for (cells, plains) in self.cells.iter().zip(&self.plains) {
            out.push(cells);
            out.push(&**plains);
        }
        out
    }
}
