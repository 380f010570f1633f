//! The encryption side of a session, shared by all sessions: key service,
//! catalog map and audit. It turns a simple query into the query that
//! reaches PostgreSQL (ciphertext instead of plaintext, EDEK and blind index
//! set) and opens the protected cells of result rows. It knows statements
//! and cells; the session decides when to call it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use uuid::Uuid;

use crate::audit::{Audit, AuditEvent};
use crate::catalog::{self, CatalogMap};
use crate::config::{Policy, TableMode};
use crate::crypto::{self, CellAad};
use crate::keys::{KeyError, KeyService};
use crate::ops::metrics::{metrics, OutcomeLabel, SqlstateLabel};
use crate::rewrite::{self, quote_literal, Rejection, StatementPlan, TenantChange};
use plans::ParsePlan;

mod copy_plans;
mod plan_cache;
pub(crate) mod plans;
mod sealing;
pub(crate) use sealing::seal_value;
mod shapes;

/// How often the catalog is reloaded while a transition view is about to
/// take a table's name.
const SWAP_REFRESH: std::time::Duration = std::time::Duration::from_millis(100);

/// Why encryption could not start.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    /// Audit sinks could not open.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The key registry or providers failed.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
}

/// What a session tells the engine about itself.
pub struct SessionInfo<'a> {
    /// The session's tenant, if one is set.
    pub tenant: Option<&'a str>,
    /// A simple query's write may run as the proxy's own prepared statement
    /// (no extended-protocol batch of the client's is open).
    pub prepare_writes: bool,
    /// The tenant the session started with (where RESET goes back to).
    pub default_tenant: Option<&'a str>,
    /// Database user.
    pub user: &'a str,
    /// Client address.
    pub client_addr: &'a str,
}

/// The query to send instead, and what it changes in the session.
#[derive(Debug, Default)]
pub struct QueryRewrite {
    /// Replacement SQL (`None`: forward the original untouched).
    pub sql: Option<String>,
    /// The tenant changes and savepoints of the query, in order.
    pub tenant_changes: Vec<TenantChange>,
    /// The query changes the schema: refresh the catalog map afterwards.
    pub ddl: bool,
    /// Audit fingerprint, when the query touches protected tables.
    pub fingerprint: Option<Arc<str>>,
    /// Run the query as a prepared statement with these parameters
    /// instead (takes precedence over `sql`).
    pub bound: Option<BoundQuery>,
    /// The query is a COPY the proxy takes part in (docs/COPY.md).
    pub copy: Option<super::copy::CopyRewrite>,
    /// The query is one read or write of protected tables, whose rows may
    /// carry protected columns: where an execution's RowDescription does
    /// not name their origins (see `CatalogMap::traces_by_statement`), it
    /// runs as the unnamed statement, described before it runs.
    pub one_statement: bool,
}

/// A simple query's write as a prepared statement: the client's literals
/// and the proxy's values as parameters, the cells in binary, so that
/// PostgreSQL neither parses the statement again nor scans and hex-decodes
/// the ciphertext.
#[derive(Debug)]
pub struct BoundQuery {
    /// The statement, `$n` for every literal and proxy value.
    pub sql: Arc<str>,
    /// The catalog map its shape was planned against.
    pub catalog: Arc<CatalogMap>,
    /// It returns rows (RETURNING): describe them as a simple query would.
    pub returns_rows: bool,
    /// Declared parameter types (0: left to the server, as a string
    /// literal's type is).
    pub types: Vec<u32>,
    /// Values in parameter order (`None`: NULL), and their formats.
    pub values: Vec<Option<Vec<u8>>>,
    pub formats: Vec<i16>,
}

/// A cell that cannot be shown to the client.
#[derive(Debug, Clone)]
pub struct CellFailure {
    /// SQLSTATE (KM001, KM002, KM005, KM006).
    pub sqlstate: &'static str,
    /// Message naming table, column and tenant (never values or keys).
    pub message: String,
    /// Tenant concerned, if known.
    pub tenant: Option<String>,
}

/// Shared encryption state of the server.
pub struct Encryption {
    /// The policy in force (replaced by a reload, together with the
    /// catalog map made from it).
    policy: ArcSwap<Policy>,
    keys: KeyService,
    audit: Audit,
    catalog: RwLock<Arc<CatalogMap>>,
    dek_tenants: DashMap<Uuid, Arc<str>>,
    /// Catalog loads begun, and the ticket of the load installed last.
    catalog_loads: AtomicU64,
    catalog_installed: AtomicU64,
    /// SQL → (declared parameter types, plan): looked up by `&str`, so a
    /// hit allocates nothing.
    parse_plans: plan_cache::PlanCache<Arc<Vec<CachedParsePlan>>>,
    /// Bumped whenever `parse_plans` starts over: plans a session kept
    /// from an older epoch are stale.
    plan_epoch: AtomicU64,
    /// Simple queries planned by their literal-insensitive shape.
    shapes: shapes::ShapeCache,
}

/// A cached Parse plan for one list of declared parameter types.
/// Declared parameter types, the plan epoch it was made in, the plan.
type CachedParsePlan = (Vec<u32>, u64, Result<Arc<ParsePlan>, Rejection>);

impl Encryption {
    /// Starts audit, connects the key service (migrating the `cmk` schema and
    /// seeding tenants) and loads the catalog map.
    pub async fn start(policy: Arc<Policy>) -> Result<Arc<Self>, EncryptionError> {
        let audit = Audit::start(&policy.audit)?;
        let keys = KeyService::connect(&policy, audit.clone()).await?;
        let client = super::admin::connect(&policy).await?;
        let map = catalog::load_map(&client, &policy).await?;
        tracing::info!(protected_columns = map.len(), "catalog map loaded");
        for check in catalog::envelope::envelope_checks(&client, &policy).await? {
            tracing::warn!(
                fix = %check.fix(),
                "{check}: PostgreSQL itself will not refuse plaintext there (server-side code, direct connections); run cmk-proxy migrate --config <policy>"
            );
        }
        let plan_cache_size = policy.server.plan_cache_size;
        let encryption = Arc::new(Self {
            policy: ArcSwap::new(policy),
            keys,
            audit,
            catalog: RwLock::new(Arc::new(map)),
            dek_tenants: DashMap::new(),
            catalog_loads: AtomicU64::new(0),
            catalog_installed: AtomicU64::new(0),
            parse_plans: plan_cache::PlanCache::new(plan_cache_size),
            plan_epoch: AtomicU64::new(0),
            shapes: shapes::ShapeCache::new(plan_cache_size),
        });
        tokio::spawn(follow_schema_changes(Arc::downgrade(&encryption)));
        Ok(encryption)
    }

    /// The policy in force.
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// The audit handle.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Makes `policy` the one in force: loads the catalog map for it,
    /// seeds its tenants, reopens the audit sinks, then installs map and
    /// policy together and starts the plan caches over. On an error
    /// nothing has changed. Key providers and key lifetimes stay as they
    /// were started (they need a restart).
    pub async fn reload(&self, policy: Arc<Policy>) -> Result<(), EncryptionError> {
        let ticket = self.catalog_loads.fetch_add(1, Ordering::AcqRel) + 1;
        let client = super::admin::connect(&policy).await?;
        let map = catalog::load_map(&client, &policy).await?;
        for check in catalog::envelope::envelope_checks(&client, &policy).await? {
            tracing::warn!(
                fix = %check.fix(),
                "{check}: PostgreSQL itself will not refuse plaintext there; run cmk-proxy migrate --config <policy>"
            );
        }
        crate::audit::check_config(&policy.audit)?;
        self.keys.seed_tenants(&policy).await?;
        self.audit.reload(&policy.audit)?;
        {
            let mut slot = self.catalog.write().unwrap_or_else(|p| p.into_inner());
            self.catalog_installed.fetch_max(ticket, Ordering::AcqRel);
            *slot = Arc::new(map);
            self.policy.store(policy);
        }
        self.clear_parse_plans();
        self.shapes.clear();
        tracing::info!(protected_columns = self.catalog().len(), "policy reloaded");
        Ok(())
    }

    /// The key service (for tests and tools).
    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    /// The current catalog map.
    pub fn catalog(&self) -> Arc<CatalogMap> {
        self.catalog
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Reloads the catalog map (after DDL, and periodically). A load that
    /// began before another one already installed is dropped: an older map
    /// never replaces a newer one. `false` when the catalog could not be
    /// read (the previous map stays).
    pub async fn refresh_catalog(&self) -> bool {
        let ticket = self.catalog_loads.fetch_add(1, Ordering::AcqRel) + 1;
        let policy = self.policy.load_full();
        let loaded = async {
            let client = super::admin::connect(&policy)
                .await
                .map_err(|e| e.to_string())?;
            catalog::load_map(&client, &policy)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let reloads = &metrics().catalog_reloads;
        match loaded {
            Ok(map) => {
                reloads.get_or_create(&OutcomeLabel { outcome: "ok" }).inc();
                if let Ok(mut slot) = self.catalog.write() {
                    // A map made for a policy a reload has replaced
                    // meanwhile is dropped, like an older load.
                    if self.catalog_installed.load(Ordering::Acquire) > ticket
                        || !Arc::ptr_eq(&policy, &self.policy.load())
                    {
                        // A newer load was installed, or is due.
                        return true;
                    }
                    self.catalog_installed.store(ticket, Ordering::Release);
                    if **slot == map {
                        // Nothing plans depend on changed: they stay valid
                        // (a periodic reload costs no prepared statement a
                        // new plan).
                        return true;
                    }
                    *slot = Arc::new(map);
                }
                // Plans depend on the views the catalog maps.
                self.clear_parse_plans();
                self.shapes.clear();
                true
            }
            Err(error) => {
                reloads
                    .get_or_create(&OutcomeLabel { outcome: "error" })
                    .inc();
                tracing::warn!(%error, "catalog map refresh failed; keeping the previous map");
                false
            }
        }
    }

    /// The plan of a Parse with this SQL and these declared types: cached,
    /// else made by `plan` (refusals are cached too; DDL is not). `epoch`
    /// is the plan epoch the caller read before asking: only a plan made in
    /// that epoch is taken from the cache, and a plan is cached under the
    /// epoch read before its catalog, so a plan made against an older
    /// catalog is never found in a newer epoch.
    pub(crate) fn parse_plan(
        &self,
        sql: &str,
        param_types: &[u32],
        epoch: u64,
        plan: impl FnOnce() -> Result<ParsePlan, Rejection>,
    ) -> Result<Arc<ParsePlan>, Rejection> {
        if let Some(plans) = self.parse_plans.get(sql) {
            let found = plans
                .iter()
                .find(|(types, made_in, _)| *made_in == epoch && types == param_types);
            if let Some((_, _, found)) = found {
                return found.clone();
            }
        }
        let made = plan().map(Arc::new);
        if !made.as_ref().is_ok_and(|p| p.is_ddl()) {
            // Another session may add its types meanwhile; one of the two
            // is planned again later, never wrongly.
            let mut plans: Vec<CachedParsePlan> = self
                .parse_plans
                .get(sql)
                .map(|plans| {
                    plans
                        .iter()
                        .filter(|(_, made_in, _)| *made_in == epoch)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            plans.push((param_types.to_vec(), epoch, made.clone()));
            self.parse_plans.insert(sql.to_owned(), Arc::new(plans));
        }
        made
    }

    /// The epoch of the Parse plan cache (see `plan_epoch`).
    pub(crate) fn plan_epoch(&self) -> u64 {
        self.plan_epoch.load(Ordering::Acquire)
    }

    /// Starts the Parse plan cache over, in a new epoch. The new catalog is
    /// installed before the epoch moves: a plan cached under an epoch was
    /// made against that epoch's catalog or a newer one.
    fn clear_parse_plans(&self) {
        self.plan_epoch.fetch_add(1, Ordering::AcqRel);
        self.parse_plans.clear();
    }

    /// Emits a rejection audit event.
    pub fn audit_rejection(&self, rejection: &Rejection, session: &SessionInfo<'_>) {
        metrics().refusal(rejection.sqlstate);
        self.audit.emit(AuditEvent::Rejection {
            sqlstate: rejection.sqlstate,
            reason: rejection.message.clone(),
            tenant: session.tenant.map(str::to_owned),
            table: rejection.table.clone(),
            column: rejection.column.clone(),
            client_addr: session.client_addr.to_owned(),
            user: session.user.to_owned(),
        });
    }

    /// Emits a decryption-batch audit event.
    pub fn audit_decrypt(&self, batch: DecryptBatch, session: &SessionInfo<'_>) {
        for entry in batch.entries {
            self.audit.emit(AuditEvent::DecryptBatch {
                tenant: entry.tenant.to_string(),
                table: entry.table.to_string(),
                columns: entry.columns.to_vec(),
                rows: entry.rows,
                fingerprint: batch.fingerprint.to_string(),
                client_addr: session.client_addr.to_owned(),
                user: session.user.to_owned(),
            });
        }
    }

    /// Plans a simple query and encrypts its protected values.
    pub async fn rewrite_simple_query(
        &self,
        sql: &str,
        session: &SessionInfo<'_>,
    ) -> Result<QueryRewrite, Rejection> {
        let catalog = self.catalog();
        if let Some(rewrite) = self.rewrite_by_shape(sql, session, &catalog).await {
            return rewrite;
        }
        let policy = self.policy();
        let analysis = rewrite::analyze_in(
            catalog.analysis_policy(&policy),
            catalog.schema_facts(),
            sql,
            0,
        )?;
        let mut out = QueryRewrite::default();
        let mut tenant = session.tenant.map(str::to_owned);
        let mut rendered = Vec::with_capacity(analysis.statements.len());
        let needs_rewrite = analysis.needs_rewrite();
        if analysis.statements.iter().any(|s| {
            matches!(
                s,
                StatementPlan::Read
                    | StatementPlan::ReadRowTenants(_)
                    | StatementPlan::Write(_)
                    | StatementPlan::Copy(_)
            )
        }) {
            out.fingerprint = Some(Arc::from(rewrite::fingerprint(sql)));
        }
        // The original statements, re-parsed, render the untouched ones
        // (a query of one statement that is a write needs none).
        let originals = if needs_rewrite && analysis.statements.len() > 1 {
            rewrite::parse_statements(sql).ok_or_else(|| {
                Rejection::unsupported("", None, "SQL that cmk-proxy cannot parse")
            })?
        } else {
            Vec::new()
        };
        let statements = analysis.statements.len();
        out.one_statement = statements == 1 && out.fingerprint.is_some();
        for (index, plan) in analysis.statements.into_iter().enumerate() {
            match plan {
                StatementPlan::Copy(plan) => {
                    let current = SessionInfo {
                        tenant: tenant.as_deref(),
                        ..*session
                    };
                    let (sql, copy) = self.plan_copy(*plan, statements, &current)?;
                    out.sql = Some(sql);
                    out.copy = Some(copy);
                    return Ok(out);
                }
                StatementPlan::SetTenant(change) => {
                    tenant = match &change.savepoint {
                        None => change.resolve(session.default_tenant),
                        // The savepoints are the session's, and what a COMMIT
                        // leaves depends on how the transaction went (a LOCAL
                        // tenant ends, a failed one rolls back): statements
                        // after a ROLLBACK [TO] or COMMIT in this query are
                        // planned with no tenant (writes then name theirs,
                        // or are KM004).
                        Some(
                            rewrite::SavepointOp::RollbackTo(_)
                            | rewrite::SavepointOp::Rollback
                            | rewrite::SavepointOp::Commit,
                        ) => None,
                        Some(_) => tenant,
                    };
                    out.tenant_changes.push(change);
                }
                StatementPlan::Ddl => out.ddl = true,
                StatementPlan::ReadRowTenants(read) => {
                    rendered.push(read.sql);
                    continue;
                }
                StatementPlan::Write(plan) => {
                    let current = SessionInfo {
                        tenant: tenant.as_deref(),
                        ..*session
                    };
                    rendered.push(self.encrypt_literals(&plan, &current).await?);
                    continue;
                }
                // A simple query binds no parameters: the server refuses `$n`.
                StatementPlan::Untouched
                | StatementPlan::Read
                | StatementPlan::SetTenantParam { .. } => {}
            }
            if needs_rewrite {
                if let Some(original) = originals.get(index) {
                    rendered.push(original.to_string());
                }
            }
        }
        if needs_rewrite {
            out.sql = Some(rendered.join("; "));
        }
        Ok(out)
    }

    /// Opens one protected cell and returns its canonical plaintext.
    /// `session_tenant`: cells of other tenants are refused (KM006);
    /// `row_tenant`: the tenant of the cell's row, a cell of another tenant
    /// is refused (KM005: it was moved there).
    pub async fn open_cell(
        &self,
        table: &str,
        column: &str,
        cell: &[u8],
        session_tenant: Option<&str>,
        row_tenant: Option<&str>,
    ) -> Result<(Option<Arc<str>>, Vec<u8>), CellFailure> {
        let opened = self
            .open_cell_counted(table, column, cell, session_tenant, row_tenant)
            .await;
        if let Err(failure) = &opened {
            metrics()
                .decrypt_failures
                .get_or_create(&SqlstateLabel {
                    sqlstate: failure.sqlstate,
                })
                .inc();
        }
        opened
    }

    async fn open_cell_counted(
        &self,
        table: &str,
        column: &str,
        cell: &[u8],
        session_tenant: Option<&str>,
        row_tenant: Option<&str>,
    ) -> Result<(Option<Arc<str>>, Vec<u8>), CellFailure> {
        let integrity = |tenant: Option<String>, what: &str| CellFailure {
            sqlstate: "KM005",
            message: format!("cmk-proxy: integrity failure: a cell of {table}.{column} {what}"),
            tenant,
        };
        if !crypto::is_envelope(cell) {
            // A table in transition from legacy plaintext (cmk-proxy
            // encrypt) serves its not yet sealed values.
            let migrating = self
                .policy()
                .tables
                .get(table)
                .is_some_and(|t| t.mode == TableMode::Migrating)
                || self.catalog().in_transition(table);
            if migrating {
                return Ok((None, cell.to_vec()));
            }
            return Err(integrity(
                None,
                "is not encrypted (legacy plaintext is served only in mode: migrating)",
            ));
        }
        let dek_id =
            crypto::peek_dek_id(cell).map_err(|_| integrity(None, "has a damaged header"))?;
        let tenant = match self.tenant_of_dek(dek_id).await {
            Ok(Some(tenant)) => tenant,
            Ok(None) => return Err(integrity(None, "names an unknown data key")),
            Err(e) => {
                return Err(CellFailure {
                    sqlstate: e.sqlstate(),
                    message: format!("cmk-proxy: cannot read {table}.{column}: {e}"),
                    tenant: None,
                })
            }
        };
        if row_tenant.is_some_and(|row| row != &*tenant) {
            return Err(integrity(
                None,
                "belongs to another tenant than its row (moved from another tenant's row)",
            ));
        }
        if let Some(session) = session_tenant {
            if session != &*tenant {
                return Err(CellFailure {
                    sqlstate: "KM006",
                    message: format!(
                        "cmk-proxy: cross-tenant access refused: a cell of {table}.{column} belongs to another tenant than the session tenant '{session}'"
                    ),
                    tenant: Some(session.to_owned()),
                });
            }
        }
        if self.audit.delivery_blocked(&tenant) {
            return Err(CellFailure {
                sqlstate: "KM007",
                message: format!(
                    "cmk-proxy: cannot read {table}.{column}: the audit trail of tenant '{tenant}' cannot be delivered and its spool is full; decrypts resume when delivery does (audit.on_failure: deny)"
                ),
                tenant: Some(tenant.to_string()),
            });
        }
        let key = self
            .keys
            .read_key(&tenant, dek_id, None)
            .await
            .map_err(|e| CellFailure {
                sqlstate: e.sqlstate(),
                message: format!("cmk-proxy: cannot read {table}.{column}: {e}"),
                tenant: Some(tenant.to_string()),
            })?;
        let aad = CellAad {
            tenant_id: &tenant,
            table,
            column,
        };
        let plaintext = key.open(&aad, cell).map_err(|_| {
            integrity(
                Some(tenant.to_string()),
                "failed to decrypt (tampered, or moved from another row, column or tenant)",
            )
        })?;
        Ok((Some(tenant), plaintext))
    }

    /// The tenant a DEK belongs to (the registry is authoritative; cached).
    async fn tenant_of_dek(&self, dek_id: Uuid) -> Result<Option<Arc<str>>, KeyError> {
        if let Some(t) = self.dek_tenants.get(&dek_id) {
            return Ok(Some(t.clone()));
        }
        let Some(record) = self.keys.registry().data_key(dek_id).await? else {
            return Ok(None);
        };
        let tenant: Arc<str> = Arc::from(record.tenant_id);
        self.dek_tenants.insert(dek_id, tenant.clone());
        Ok(Some(tenant))
    }
}

/// Per-statement decryption counts for the audit log.
#[derive(Debug, Default)]
pub struct DecryptBatch {
    /// One entry per (tenant, table) seen, in order of first appearance.
    entries: Vec<BatchEntry>,
    /// Statement fingerprint.
    fingerprint: Arc<str>,
}

/// The rows of one tenant in one table.
#[derive(Debug)]
struct BatchEntry {
    tenant: Arc<str>,
    table: Arc<str>,
    columns: Arc<[String]>,
    rows: u64,
}

impl DecryptBatch {
    /// An empty batch for the statement with `fingerprint`.
    pub fn new(fingerprint: Arc<str>) -> Self {
        Self {
            entries: Vec::new(),
            fingerprint,
        }
    }

    /// Counts one decrypted row of `tenant` in `table` with `columns`
    /// (no allocation once the pair has been seen).
    pub fn add(&mut self, tenant: &Arc<str>, table: &Arc<str>, columns: &Arc<[String]>) {
        let seen = self
            .entries
            .iter_mut()
            .find(|e| e.tenant == *tenant && e.table == *table);
        match seen {
            Some(entry) => entry.rows += 1,
            None => self.entries.push(BatchEntry {
                tenant: tenant.clone(),
                table: table.clone(),
                columns: columns.clone(),
                rows: 1,
            }),
        }
    }

    /// True when nothing was decrypted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub(crate) fn key_rejection(e: &KeyError, table: &str) -> Rejection {
    Rejection {
        sqlstate: e.sqlstate(),
        table: Some(table.to_owned()),
        column: None,
        message: format!("cmk-proxy: cannot write {table}: {e}"),
    }
}

/// `DO` block that makes PostgreSQL raise the rejection itself, so the
/// server's transaction state matches what the client is told.
pub fn rejection_query(rejection: &Rejection) -> String {
    let message = rejection.message.replace("$cmk$", "");
    format!(
        "DO $cmk$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}; END$cmk$",
        rejection.sqlstate,
        quote_literal(&message)
    )
}

/// Reloads the catalog when DDL run directly against PostgreSQL commits
/// (the NOTIFY of `migrate`'s event trigger, see `catalog::schema_notify`),
/// and every `server.catalog_refresh` in any case (more often while a
/// table's adoption is about to swap); ends with the proxy.
async fn follow_schema_changes(weak: std::sync::Weak<Encryption>) {
    let Some(every) = weak.upgrade().map(|e| e.policy().server.catalog_refresh) else {
        return;
    };
    let mut wait = every;
    let mut listening = None;
    loop {
        if listening.is_none() {
            let Some(encryption) = weak.upgrade() else {
                return;
            };
            listening = listen_for_schema_changes(&encryption.policy()).await;
        }
        let notified = async {
            match listening.as_mut() {
                Some((_, notes)) => notes.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            open = notified => {
                if !open {
                    // The connection ended: opened again at the next turn.
                    listening = None;
                }
            }
        }
        let Some(encryption) = weak.upgrade() else {
            return;
        };
        encryption.refresh_catalog().await;
        // While `cmk-proxy encrypt` is about to swap a table's transition
        // view in, much sooner (docs/ADOPTING.md, "The swap's instant").
        wait = if encryption.catalog().awaiting_swap() {
            every.min(SWAP_REFRESH)
        } else {
            every
        };
    }
}

/// A connection LISTENing for the schema-change NOTIFY, with its
/// notifications; `None` when the database cannot be reached (tried again
/// at the next reload).
async fn listen_for_schema_changes(
    policy: &Policy,
) -> Option<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
)> {
    let registry = crate::keys::Registry::new(policy).ok()?;
    let (client, notes) = registry.connect_listening().await.ok()?;
    let listen = format!("LISTEN {}", catalog::schema_notify::CHANNEL);
    client.batch_execute(&listen).await.ok()?;
    Some((client, notes))
}
