//! Adopting an existing database (docs/ADOPTING.md): `encrypt` turns a
//! legacy plaintext table into the policy's format online, through a
//! transition state recorded in `cmk.adoptions`; `decrypt` takes it back
//! through the same state. Owns the schema steps and
//! the batch converter; uses keys (to seal) and the catalog (names, state),
//! knows nothing of proxy sessions.

pub mod convert;
pub mod ddl;
pub mod decrypt;
pub mod open;
pub mod position;
pub mod progress;
pub mod reencrypt;
pub mod shape;
pub mod usage;

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_postgres::Client;

use crate::catalog::adoption::{self, Adoption, Phase};
use crate::config::{split_table_name, Policy, TablePolicy};
use crate::keys::KeyService;

use convert::{Converter, Skips};
use shape::TableShape;

/// Why a conversion stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The table cannot be converted as it is (the message says why).
    #[error("{0}")]
    Refused(String),
    /// PostgreSQL failed.
    #[error("database: {}", crate::pg_error::text(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The key registry failed.
    #[error("key registry: {0}")]
    Keys(String),
    /// Reading the catalog failed.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// A lock was not granted within `lock_timeout` however often tried.
    #[error("{0}: the lock was not granted within 1 s in {1} tries (long transactions on the table?); run encrypt again")]
    LockTimeout(String, usize),
}

/// SQLSTATE lock_not_available, raised when `lock_timeout` expires.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE undefined_object (a constraint that does not exist).
const UNDEFINED_OBJECT: &str = "42704";
/// On Citus (a no-op elsewhere): the step's DDL reaches the shards over one
/// connection per node, so a function or view command may follow a table
/// command in the same transaction, as Citus requires.
pub(crate) const CITUS_SEQUENTIAL: &str =
    "SELECT set_config('citus.multi_shard_modify_mode', 'sequential', true) \
     WHERE current_setting('citus.multi_shard_modify_mode', true) IS NOT NULL";
/// Tries of one DDL step before giving up.
const DDL_TRIES: usize = 30;
/// Passes over the table while rows of tenants with keys are left (rows
/// changed by the application during a pass get another one).
const MAX_PASSES: usize = 3;

/// What `encrypt` was asked to do.
#[derive(Debug, Clone)]
pub struct EncryptOptions {
    /// Policy table `schema.table`.
    pub table: String,
    /// Rows per batch.
    pub batch: usize,
    /// Print the plan only.
    pub dry_run: bool,
    /// How long proxies get to load the transition view before the swap.
    pub swap_after: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub enum EncryptOutcome {
    /// `--dry-run`: nothing changed.
    Planned,
    /// Every protected cell is an envelope or NULL; the table is out of
    /// transition.
    Finished {
        /// Rows sealed by this run.
        rows: u64,
        /// Seconds the conversion took.
        secs: f64,
    },
    /// Rows were skipped; the table stays in transition.
    Incomplete {
        /// Rows sealed by this run.
        rows: u64,
        /// Rows left with legacy values, by tenant.
        remaining: Vec<(Option<String>, i64)>,
        /// Why rows were skipped in this run.
        skips: Skips,
    },
}

/// Settings of the converter's session, so legacy values read in their
/// canonical text forms.
const SESSION_SETTINGS: &str = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET bytea_output = 'hex'";

/// Runs `encrypt` for one table (see docs/ADOPTING.md).
pub async fn encrypt(
    policy: &Policy,
    keys: &KeyService,
    client: &mut Client,
    options: &EncryptOptions,
) -> Result<EncryptOutcome, AdoptError> {
    let table = options.table.as_str();
    let table_policy = policy.tables.get(table).ok_or_else(|| {
        AdoptError::Refused(format!(
            "{table} is not a table of the policy (name it under tables:, with its columns' legacy types)"
        ))
    })?;
    let (schema, name) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    client.batch_execute(SESSION_SETTINGS).await?;
    let mut adoption = adoption::adoptions(client).await?.remove(table);
    if adoption.is_none() {
        let shape = TableShape::read(client, table, None).await?;
        if finished_already(&shape, table_policy) {
            if options.dry_run {
                println!("{table} is already in the policy's format: nothing to do");
                return Ok(EncryptOutcome::Planned);
            }
            validate_envelopes(client, &shape.relation(name), table_policy).await?;
            println!(
                "{table} is already in the policy's format; its envelope checks are validated"
            );
            return Ok(EncryptOutcome::Finished { rows: 0, secs: 0.0 });
        }
        shape.check_legacy(table, table_policy)?;
        let steps = ddl::prepare(table, &shape, table_policy);
        if options.dry_run {
            print_plan(client, table, &shape, table_policy, &steps, options).await?;
            return Ok(EncryptOutcome::Planned);
        }
        tracing::info!(
            table,
            "prepare: shadow columns, transition view, adoption record"
        );
        run_locked(client, "prepare", &steps).await?;
        adoption = adoption::adoptions(client).await?.remove(table);
    } else if options.dry_run {
        let legacy = count_legacy(client, adoption.as_ref(), table_policy).await?;
        println!(
            "{table} is in transition (phase {:?}): {legacy} rows with legacy values left; encrypt resumes it",
            adoption.as_ref().map(|a| a.phase)
        );
        return Ok(EncryptOutcome::Planned);
    }
    let Some(mut adoption) = adoption else {
        return Err(AdoptError::Refused(format!(
            "{table}: the adoption record vanished (another encrypt finished it?)"
        )));
    };
    if adoption.phase == Phase::Leaving {
        return Err(AdoptError::Refused(format!(
            "{table}: decrypt has prepared it to leave the policy's format (transition view not swapped in): run cmk-proxy decrypt to go on"
        )));
    }
    if adoption.phase == Phase::Prepared {
        wait_for_proxies(client, table, options.swap_after).await?;
        let shape = TableShape::read_oid(client, schema, name, adoption.base_oid, None).await?;
        tracing::info!(table, "swap: the transition view takes the table's name");
        run_locked(client, "swap", &ddl::swap(table, &shape)).await?;
        adoption.phase = Phase::Converting;
    }
    convert_and_finish(policy, keys, client, options, &adoption, table_policy).await
}

/// Converts the rows of a table in transition, then finishes it when no
/// legacy value is left.
async fn convert_and_finish(
    _policy: &Policy,
    keys: &KeyService,
    client: &mut Client,
    options: &EncryptOptions,
    adoption: &Adoption,
    table_policy: &TablePolicy,
) -> Result<EncryptOutcome, AdoptError> {
    let table = adoption.table.as_str();
    let (schema, name) = split_table_name(table)
        .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
    let base = TableShape::read_oid(
        client,
        schema,
        &adoption.base_name,
        adoption.base_oid,
        Some(adoption.view_oid),
    )
    .await?;
    let converter = Converter::new(table, &base, table_policy, options.batch.max(1))?;
    let total: i64 = converter
        .remaining(client)
        .await?
        .iter()
        .map(|(_, n)| n)
        .sum();
    let mut progress = progress::Progress::start(
        &format!("encrypt {table}"),
        u64::try_from(total).unwrap_or(0),
    );
    let mut resume = adoption.resume_after.clone();
    let mut sealed = 0;
    let mut skips = Skips::new();
    let mut remaining = Vec::new();
    for pass in 0..MAX_PASSES {
        let outcome = converter
            .pass(client, keys, resume.take(), &mut |n| progress.advance(n))
            .await?;
        tracing::info!(
            table,
            pass,
            rows = outcome.rows_seen,
            sealed = outcome.rows_sealed,
            "pass done"
        );
        sealed += outcome.rows_sealed;
        for (key, n) in outcome.skips {
            *skips.entry(key).or_default() += n;
        }
        remaining = converter.remaining(client).await?;
        let skipped_tenant = |tenant: &Option<String>| {
            skips.keys().any(|(t, _)| {
                Some(t.as_str()) == tenant.as_deref() || (t.is_empty() && tenant.is_none())
            })
        };
        if remaining.iter().all(|(tenant, _)| skipped_tenant(tenant)) {
            break;
        }
    }
    progress.finish();
    let secs = progress.elapsed().as_secs_f64();
    if !remaining.is_empty() {
        return Ok(EncryptOutcome::Incomplete {
            rows: sealed,
            remaining,
            skips,
        });
    }
    finish(client, table, schema, name, adoption, table_policy).await?;
    Ok(EncryptOutcome::Finished { rows: sealed, secs })
}

/// The end: prove the legacy columns empty, swap the table back in, drop
/// them, validate the envelope CHECKs, vacuum the old row versions.
async fn finish(
    client: &mut Client,
    table: &str,
    schema: &str,
    name: &str,
    adoption: &Adoption,
    table_policy: &TablePolicy,
) -> Result<(), AdoptError> {
    let base = format!(
        "{}.{}",
        crate::catalog::quote_ident(schema),
        crate::catalog::quote_ident(&adoption.base_name)
    );
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = $1 AND conname = $2)",
            &[&adoption.base_oid, &ddl::NO_PLAINTEXT_CHECK],
        )
        .await?
        .get(0);
    if !exists {
        run_locked(
            client,
            "no-plaintext check",
            &[ddl::no_plaintext_check(&base, table_policy)],
        )
        .await?;
    }
    tracing::info!(table, "validating that no legacy value is left");
    client
        .batch_execute(&format!(
            "ALTER TABLE {base} VALIDATE CONSTRAINT {}",
            ddl::NO_PLAINTEXT_CHECK
        ))
        .await?;
    tracing::info!(table, "finish: the table takes its name back in its format");
    run_locked(
        client,
        "finish",
        &ddl::finish(table, schema, name, table_policy),
    )
    .await?;
    let relation = format!(
        "{}.{}",
        crate::catalog::quote_ident(schema),
        crate::catalog::quote_ident(name)
    );
    validate_envelopes(client, &relation, table_policy).await?;
    // Old row versions still hold the plaintext until vacuumed.
    client.batch_execute(&format!("VACUUM {relation}")).await?;
    Ok(())
}

/// VALIDATE of the envelope CHECKs (adds them first where missing).
async fn validate_envelopes(
    client: &Client,
    relation: &str,
    table_policy: &TablePolicy,
) -> Result<(), AdoptError> {
    for statement in ddl::validate_envelopes(relation, table_policy) {
        match client.batch_execute(&statement).await {
            // A table put in its format by hand may lack the checks:
            // `check-config --live` reports them.
            Err(e) if e.code().is_some_and(|c| c.code() == UNDEFINED_OBJECT) => {}
            other => other?,
        }
    }
    Ok(())
}

/// A table already in the policy's format: every protected column bytea
/// and the EDEK column present.
fn finished_already(shape: &TableShape, table_policy: &TablePolicy) -> bool {
    shape.column(&table_policy.edek_column).is_some()
        && table_policy
            .columns
            .keys()
            .all(|c| shape.column(c).is_some_and(|c| c.type_name == "bytea"))
}

/// Waits until proxies have had `swap_after` since the prepare to load the
/// transition view (their catalog refresh).
async fn wait_for_proxies(
    client: &Client,
    table: &str,
    swap_after: Duration,
) -> Result<(), AdoptError> {
    let since: f64 = client
        .query_one(
            "SELECT extract(epoch FROM now() - prepared_at)::float8 FROM cmk.adoptions WHERE table_name = $1",
            &[&table],
        )
        .await?
        .get(0);
    let left = swap_after.as_secs_f64() - since;
    if left > 0.0 {
        eprintln!(
            "{table}: waiting {left:.0}s for proxies to load the transition view (server.catalog_refresh)"
        );
        tokio::time::sleep(Duration::from_secs_f64(left)).await;
    }
    Ok(())
}

/// Runs `statements` in one transaction under `lock_timeout = 1s`, tried
/// again with backoff while the lock is not granted.
pub async fn run_locked(
    client: &mut Client,
    step: &str,
    statements: &[String],
) -> Result<(), AdoptError> {
    let delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(DDL_TRIES)
        .with_jitter()
        .build();
    let mut delays = delays.into_iter();
    let mut tries = 0;
    loop {
        tries += 1;
        let transaction = client.transaction().await?;
        transaction
            .batch_execute("SET LOCAL lock_timeout = '1s'")
            .await?;
        transaction.batch_execute(CITUS_SEQUENTIAL).await?;
        let mut failed = None;
        for statement in statements {
            if let Err(e) = transaction.batch_execute(statement).await {
                failed = Some(e);
                break;
            }
        }
        let Some(error) = failed else {
            transaction.commit().await?;
            return Ok(());
        };
        let _ = transaction.rollback().await;
        let lock = error.code().is_some_and(|c| c.code() == LOCK_NOT_AVAILABLE);
        if !lock {
            return Err(error.into());
        }
        match delays.next() {
            Some(delay) => {
                tracing::warn!(step, tries, "lock not granted within 1 s; trying again");
                tokio::time::sleep(delay).await;
            }
            None => return Err(AdoptError::LockTimeout(step.to_owned(), tries)),
        }
    }
}

/// Rows with legacy values of a table (legacy or in transition).
async fn count_legacy(
    client: &Client,
    adoption: Option<&Adoption>,
    table_policy: &TablePolicy,
) -> Result<i64, AdoptError> {
    let Some(adoption) = adoption else {
        return Ok(0);
    };
    let any = table_policy
        .columns
        .keys()
        .map(|c| format!("{} IS NOT NULL", crate::catalog::quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}::regclass WHERE {any}",
                crate::rewrite::quote_literal(&adoption.base_oid.to_string())
            ),
            &[],
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
    options: &EncryptOptions,
) -> Result<(), AdoptError> {
    let any = table_policy
        .columns
        .keys()
        .map(|c| format!("{} IS NOT NULL", crate::catalog::quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE {any}",
                shape.relation(&shape.name)
            ),
            &[],
        )
        .await?
        .get(0);
    println!("-- cmk-proxy encrypt {table} (dry run: nothing is changed)");
    println!("-- 1. prepare (one transaction, lock_timeout 1s, catalog changes only):");
    for step in steps {
        println!("{step};");
    }
    println!(
        "-- 2. wait {}s for proxies to load the transition view, then swap:",
        options.swap_after.as_secs()
    );
    for step in ddl::swap(table, shape) {
        println!("{step};");
    }
    println!(
        "-- 3. convert {rows} rows with legacy values in batches of {} by primary key ({}); about {:.0}s at 20,000 rows/s",
        options.batch,
        shape.primary_key.join(", "),
        rows as f64 / 20_000.0
    );
    println!("-- 4. prove no legacy value is left, then finish:");
    let names = ddl::Names::of(&shape.name);
    println!(
        "{};",
        ddl::no_plaintext_check(&shape.relation(&names.base), table_policy)
    );
    for step in ddl::finish(table, &shape.schema, &shape.name, table_policy) {
        println!("{step};");
    }
    for step in ddl::validate_envelopes(&shape.relation(&shape.name), table_policy) {
        println!("{step};");
    }
    Ok(())
}
