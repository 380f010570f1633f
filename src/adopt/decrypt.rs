//! `decrypt`, the way back (docs/ADOPTING.md, "The way back"): a table in
//! the policy's format goes through the same transition state as `encrypt`
//! with the roles reversed (cells in the shadow columns, plaintext in
//! legacy-typed columns), its cells are opened batch by batch, and the
//! finish drops the cell, EDEK and blind-index columns so the table is a
//! legacy table again, served untouched. `--tenant` opens one tenant's
//! cells and leaves the table in transition, mixed (docs/ADOPTING.md).

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_postgres::Client;

use crate::audit::AuditEvent;
use crate::catalog::adoption::{self, shadow_column, Adoption, Phase};
use crate::catalog::quote_ident;
use crate::config::{split_table_name, DeclaredType, Policy, TablePolicy};
use crate::keys::KeyService;

use super::convert::Skips;
use super::open::Opener;
use super::shape::TableShape;
use super::{ddl, position, progress, run_locked, wait_for_proxies, AdoptError};

/// Passes over the table while cells of tenants with keys are left.
const MAX_PASSES: usize = 3;
/// Tries of the finish (each may find cells the application wrote since
/// the last pass, open them under the lock, or go for another pass).
const FINISH_TRIES: usize = 10;
/// Cells the finish opens under its lock; more go to another pass first.
const FINISH_MAX_ROWS: i64 = 1000;
/// SQLSTATE lock_not_available.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What `decrypt` was asked to do.
#[derive(Debug, Clone)]
pub struct DecryptOptions {
    /// Policy table `schema.table`.
    pub table: String,
    /// Only this tenant's rows (the table then stays in transition).
    pub tenant: Option<String>,
    /// Rows per batch.
    pub batch: usize,
    /// Print the plan only.
    pub dry_run: bool,
    /// How long proxies get to load the transition view before the swap.
    pub swap_after: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub enum DecryptOutcome {
    /// `--dry-run`: nothing changed.
    Planned,
    /// No cell is left: the table is a legacy plaintext table again.
    Finished {
        /// Rows opened by this run.
        rows: u64,
        /// Seconds the conversion took.
        secs: f64,
    },
    /// `--tenant`: the tenant's rows hold plaintext; the table stays in
    /// transition (mixed) for the other tenants' cells.
    TenantDone {
        /// Rows opened by this run.
        rows: u64,
        /// Rows with cells left, by tenant (other tenants).
        remaining: Vec<(Option<String>, i64)>,
    },
    /// Rows were skipped (revoked key …): they stay encrypted, the table
    /// in transition.
    Incomplete {
        /// Rows opened by this run.
        rows: u64,
        /// Rows with cells left, by tenant.
        remaining: Vec<(Option<String>, i64)>,
        /// Why rows were skipped.
        skips: Skips,
    },
}

/// Runs `decrypt` for one table (see docs/ADOPTING.md).
pub async fn decrypt(
    policy: &Policy,
    keys: &KeyService,
    client: &mut Client,
    options: &DecryptOptions,
) -> Result<DecryptOutcome, AdoptError> {
    let table = options.table.as_str();
    let table_policy = policy.tables.get(table).ok_or_else(|| {
        AdoptError::Refused(format!(
            "{table} is not a table of the policy (decrypt needs its columns' declared types)"
        ))
    })?;
    if let Some((column, _)) = table_policy
        .columns
        .iter()
        .find(|(_, p)| p.ty == DeclaredType::Bytea)
    {
        return Err(AdoptError::Refused(format!(
            "{table}.{column} is declared bytea: its plaintext could not be told from a cell once decrypted"
        )));
    }
    let (schema, name) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    client.batch_execute(super::SESSION_SETTINGS).await?;
    let mut adoption = adoption::adoptions(client).await?.remove(table);
    if adoption.is_none() {
        let shape = TableShape::read(client, table, None).await?;
        if is_plaintext(&shape, table_policy) {
            println!("{table} holds no cells (legacy plaintext table): nothing to decrypt");
            return Ok(DecryptOutcome::Finished { rows: 0, secs: 0.0 });
        }
        check_format(table, &shape, table_policy)?;
        let steps = ddl::prepare_leaving(table, &shape, table_policy);
        if options.dry_run {
            print_plan(client, table, &shape, table_policy, &steps, options).await?;
            return Ok(DecryptOutcome::Planned);
        }
        tracing::info!(
            table,
            "prepare: transition view beside the table, adoption record (leaving)"
        );
        run_locked(client, "prepare", &steps).await?;
        adoption = adoption::adoptions(client).await?.remove(table);
    } else if options.dry_run {
        let left = cells_left(
            client,
            adoption.as_ref(),
            table_policy,
            options.tenant.as_deref(),
        )
        .await?;
        println!(
            "{table} is in transition (phase {:?}): {left} rows with cells left{}; decrypt resumes it",
            adoption.as_ref().map(|a| a.phase),
            options.tenant.as_deref().map(|t| format!(" of tenant {t}")).unwrap_or_default()
        );
        return Ok(DecryptOutcome::Planned);
    }
    let Some(mut adoption) = adoption else {
        return Err(AdoptError::Refused(format!(
            "{table}: the adoption record vanished (another run finished it?)"
        )));
    };
    match adoption.phase {
        Phase::Prepared => {
            return Err(AdoptError::Refused(format!(
                "{table}: encrypt has prepared it (legacy plaintext, transition view not swapped in): run cmk-proxy encrypt to go on"
            )))
        }
        Phase::Leaving => {
            wait_for_proxies(client, table, options.swap_after).await?;
            let shape = TableShape::read_oid(client, schema, name, adoption.base_oid, Some(adoption.view_oid)).await?;
            check_format(table, &shape, table_policy)?;
            tracing::info!(table, "swap: cells to shadow columns, legacy columns added, the transition view takes the table's name");
            run_locked(client, "swap", &ddl::swap_leaving(table, &shape, table_policy)).await?;
            adoption.phase = Phase::Converting;
        }
        Phase::Converting => {}
    }
    convert_and_finish(keys, client, options, &adoption, table_policy).await
}

/// Opens the cells of a table in transition, then finishes it (whole
/// table, no cell left) or leaves it mixed (`--tenant`).
async fn convert_and_finish(
    keys: &KeyService,
    client: &mut Client,
    options: &DecryptOptions,
    adoption: &Adoption,
    table_policy: &TablePolicy,
) -> Result<DecryptOutcome, AdoptError> {
    let table = adoption.table.as_str();
    let (schema, _) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    let base = TableShape::read_oid(
        client,
        schema,
        &adoption.base_name,
        adoption.base_oid,
        Some(adoption.view_oid),
    )
    .await?;
    let opener = Opener::new(table, &base, table_policy, options.batch.max(1))?;
    let tenant = options.tenant.as_deref();
    let task = position::task("decrypt", table, tenant);
    let total: i64 = opener
        .remaining(client, tenant)
        .await?
        .iter()
        .map(|(_, n)| n)
        .sum();
    let mut progress = progress::Progress::start(
        &format!("decrypt {table}"),
        u64::try_from(total).unwrap_or(0),
    );
    let mut opened = 0;
    let mut skips = Skips::new();
    let mut remaining = Vec::new();
    for pass in 0..MAX_PASSES {
        let outcome = opener
            .pass(client, keys, tenant, &task, &mut |n| progress.advance(n))
            .await?;
        tracing::info!(
            table,
            pass,
            rows = outcome.rows_seen,
            opened = outcome.rows_sealed,
            "pass done"
        );
        opened += outcome.rows_sealed;
        // Skipped rows are read again by every pass: count them once.
        for (key, n) in outcome.skips {
            let count = skips.entry(key).or_default();
            *count = (*count).max(n);
        }
        remaining = opener.remaining(client, tenant).await?;
        if remaining.iter().all(|(t, _)| skipped(&skips, t)) {
            break;
        }
    }
    progress.finish();
    let secs = progress.elapsed().as_secs_f64();
    audit_refusals(keys, table, &skips);
    if !skips.is_empty() {
        return Ok(DecryptOutcome::Incomplete {
            rows: opened,
            remaining,
            skips,
        });
    }
    if tenant.is_some() {
        // The tenant's cells written by the application after the last
        // pass, if any, are listed with the others'.
        let left = opener.remaining(client, None).await?;
        if !left.is_empty() {
            return Ok(DecryptOutcome::TenantDone {
                rows: opened,
                remaining: left,
            });
        }
    }
    match finish(keys, client, &opener, &base, adoption, table_policy).await? {
        Some(more) => {
            opened += more;
            position::clear_table(client, "decrypt", table).await?;
            Ok(DecryptOutcome::Finished { rows: opened, secs })
        }
        None => {
            let remaining = opener.remaining(client, None).await?;
            Ok(DecryptOutcome::Incomplete {
                rows: opened,
                remaining,
                skips,
            })
        }
    }
}

/// True when the rows of `tenant` were skipped (their cells stay).
fn skipped(skips: &Skips, tenant: &Option<String>) -> bool {
    skips
        .keys()
        .any(|(t, _)| Some(t.as_str()) == tenant.as_deref() || (t.is_empty() && tenant.is_none()))
}

/// A KM001-style refusal in the audit log per tenant whose rows stayed
/// sealed, as the proxy records a refused statement.
fn audit_refusals(keys: &KeyService, table: &str, skips: &Skips) {
    for ((tenant, reason), rows) in skips {
        keys.audit().emit(AuditEvent::Rejection {
            sqlstate: match reason {
                super::convert::SkipReason::Revoked => "KM001",
                super::convert::SkipReason::Unavailable => "KM002",
                super::convert::SkipReason::UnknownTenant
                | super::convert::SkipReason::NoTenant => "KM004",
                _ => "KM005",
            },
            reason: format!("cmk-proxy decrypt: {rows} rows left encrypted: {reason}"),
            tenant: (!tenant.is_empty()).then(|| tenant.clone()),
            table: Some(table.to_owned()),
            column: None,
            client_addr: "cmk-proxy decrypt".to_owned(),
            user: String::new(),
        });
    }
}

/// The end: builds the partial index of cells left (CONCURRENTLY), then in
/// one short transaction under the lock opens the cells the application
/// wrote since the last pass and turns the table back into a legacy table.
/// Returns the rows opened under the lock, or `None` when cells could not
/// be opened (a key revoked meanwhile): the table stays in transition.
async fn finish(
    keys: &KeyService,
    client: &mut Client,
    opener: &Opener,
    base: &TableShape,
    adoption: &Adoption,
    table_policy: &TablePolicy,
) -> Result<Option<u64>, AdoptError> {
    let table = adoption.table.as_str();
    let (schema, name) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    let relation = base.relation(&base.name);
    let index = ddl::cells_left_index_name(name);
    let invalid: Option<bool> = client
        .query_opt(
            "SELECT NOT i.indisvalid FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1 AND c.relname = $2",
            &[&adoption.base_oid, &index],
        )
        .await?
        .map(|r| r.get(0));
    if invalid == Some(true) {
        // Left by a run killed while building it.
        client
            .batch_execute(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}",
                base.relation(&index)
            ))
            .await?;
    }
    tracing::info!(
        table,
        "indexing the cells left (CONCURRENTLY: reads and writes go on)"
    );
    client
        .batch_execute(&ddl::cells_left_index(
            &relation,
            name,
            table_policy,
            &base.primary_key,
        ))
        .await?;
    let finish = ddl::finish_leaving(table, schema, name, table_policy);
    let delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(FINISH_TRIES * 3)
        .with_jitter()
        .build();
    let mut delays = delays.into_iter();
    let mut opened = 0;
    for _ in 0..FINISH_TRIES * 3 {
        let transaction = client.transaction().await?;
        transaction
            .batch_execute("SET LOCAL lock_timeout = '1s'")
            .await?;
        transaction.batch_execute(super::CITUS_SEQUENTIAL).await?;
        let locked = transaction
            .batch_execute(&format!(
                "LOCK TABLE {}, {relation} IN ACCESS EXCLUSIVE MODE",
                base.relation(name)
            ))
            .await;
        match locked {
            Err(e) if e.code().is_some_and(|c| c.code() == LOCK_NOT_AVAILABLE) => {
                let _ = transaction.rollback().await;
                let Some(delay) = delays.next() else { break };
                tracing::warn!(table, "lock not granted within 1 s; trying again");
                tokio::time::sleep(delay).await;
                continue;
            }
            other => other?,
        }
        let limit = FINISH_MAX_ROWS + 1;
        let none: Option<&str> = None;
        let rows = transaction
            .query(opener.select_first(), &[&limit, &none])
            .await?;
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) > FINISH_MAX_ROWS {
            // Many cells written meanwhile: open them without the lock first.
            transaction.rollback().await?;
            let task = position::task("decrypt", table, None);
            opener.pass(client, keys, None, &task, &mut |_| {}).await?;
            continue;
        }
        let outcome = opener.open_rows(&transaction, keys, &rows).await?;
        if !outcome.skips.is_empty() {
            transaction.rollback().await?;
            audit_refusals(keys, table, &outcome.skips);
            return Ok(None);
        }
        opened += outcome.rows_sealed;
        for statement in &finish {
            transaction.batch_execute(statement).await?;
        }
        transaction.commit().await?;
        tracing::info!(
            table,
            rows = opened,
            "finish: the table is legacy plaintext again"
        );
        return Ok(Some(opened));
    }
    Err(AdoptError::LockTimeout(
        "finish".to_owned(),
        FINISH_TRIES * 3,
    ))
}

/// A legacy table: no protected column is bytea and there is no EDEK column.
fn is_plaintext(shape: &TableShape, table_policy: &TablePolicy) -> bool {
    shape.column(&table_policy.edek_column).is_none()
        && table_policy
            .columns
            .keys()
            .all(|c| shape.column(c).is_some_and(|c| c.type_name != "bytea"))
}

/// Refuses what `decrypt` cannot take back online: no primary key, views
/// over the table, a protected column missing or not bytea, no EDEK column.
fn check_format(table: &str, shape: &TableShape, policy: &TablePolicy) -> Result<(), AdoptError> {
    if shape.primary_key.is_empty() {
        return Err(AdoptError::Refused(format!(
            "{table} has no primary key: decrypt works in batches by primary key and needs one to resume and to compare-and-set"
        )));
    }
    if !shape.dependent_views.is_empty() {
        return Err(AdoptError::Refused(format!(
            "views depend on {table} ({}): drop them and create them again after decrypt",
            shape.dependent_views.join(", ")
        )));
    }
    if shape.column(&policy.tenant_column).is_none() {
        return Err(AdoptError::Refused(format!(
            "{table}: tenant column {} does not exist",
            policy.tenant_column
        )));
    }
    if shape.column(&policy.edek_column).is_none() {
        return Err(AdoptError::Refused(format!(
            "{table}: EDEK column {} does not exist: the table is not in the policy's format",
            policy.edek_column
        )));
    }
    for column in policy.columns.keys() {
        match shape.column(column) {
            Some(c) if c.type_name == "bytea" => {}
            _ => {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column} is not a bytea cell column: the table is not in the policy's format"
                )))
            }
        }
        if shadow_column(column).len() > 63 {
            return Err(AdoptError::Refused(format!(
                "{table}.{column}: the name is too long for its shadow column"
            )));
        }
    }
    Ok(())
}

/// Rows with cells left of a table in transition (of `tenant` when given).
async fn cells_left(
    client: &Client,
    adoption: Option<&Adoption>,
    table_policy: &TablePolicy,
    tenant: Option<&str>,
) -> Result<i64, AdoptError> {
    let Some(adoption) = adoption else {
        return Ok(0);
    };
    if adoption.phase == Phase::Leaving {
        return Ok(-1);
    }
    let any = table_policy
        .columns
        .keys()
        .map(|c| format!("{} IS NOT NULL", quote_ident(&shadow_column(c))))
        .collect::<Vec<_>>()
        .join(" OR ");
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}::regclass WHERE ({any}) AND ($1::text IS NULL OR {}::text = $1::text)",
                crate::rewrite::quote_literal(&adoption.base_oid.to_string()),
                quote_ident(&table_policy.tenant_column)
            ),
            &[&tenant],
        )
        .await?;
    Ok(row.get(0))
}

/// `--dry-run`: the DDL, the rows and an estimate.
async fn print_plan(
    client: &Client,
    table: &str,
    shape: &TableShape,
    table_policy: &TablePolicy,
    steps: &[String],
    options: &DecryptOptions,
) -> Result<(), AdoptError> {
    let any = table_policy
        .columns
        .keys()
        .map(|c| format!("{} IS NOT NULL", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let tenant = options.tenant.as_deref();
    let rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE ({any}) AND ($1::text IS NULL OR {}::text = $1::text)",
                shape.relation(&shape.name),
                quote_ident(&table_policy.tenant_column)
            ),
            &[&tenant],
        )
        .await?
        .get(0);
    println!("-- cmk-proxy decrypt {table} (dry run: nothing is changed)");
    println!("-- 1. prepare (one transaction, lock_timeout 1s, catalog changes only):");
    for step in steps {
        println!("{step};");
    }
    println!(
        "-- 2. wait {}s for proxies to load the transition view, then swap (one transaction, lock_timeout 1s, catalog changes only):",
        options.swap_after.as_secs()
    );
    for step in ddl::swap_leaving(table, shape, table_policy) {
        println!("{step};");
    }
    println!(
        "-- 3. decrypt {rows} rows with cells{} in batches of {} by primary key ({})",
        tenant
            .map(|t| format!(" of tenant {t}"))
            .unwrap_or_default(),
        options.batch,
        shape.primary_key.join(", "),
    );
    if let Some(tenant) = tenant {
        println!("-- 4. the table stays in transition: rows of {tenant} hold plaintext, the others' cells; run decrypt without --tenant to finish, or encrypt to seal them again");
        return Ok(());
    }
    let names = ddl::Names::of(&shape.name);
    println!("-- 4. index the cells left (CONCURRENTLY), then in one transaction under the lock open the last cells written meanwhile and finish:");
    println!(
        "{};",
        ddl::cells_left_index(
            &shape.relation(&names.base),
            &shape.name,
            table_policy,
            &shape.primary_key
        )
    );
    for step in ddl::finish_leaving(table, &shape.schema, &shape.name, table_policy) {
        println!("{step};");
    }
    Ok(())
}
