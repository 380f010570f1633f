//! `KeyService`: the facade sessions call for a tenant's write DEK and for the
//! DEK of a cell. It ties the registry, the key providers and the approval
//! cache together: single-flight KMS calls, background re-approval, purge on
//! denial, the `max_stale` grace, and epoch rollover/rotation/rewrap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dashmap::DashMap;
use uuid::Uuid;

use super::approval::{nanos, now_nanos, ApprovalCache, ApprovedDek, Flights, Lease};
use super::registry::{DataKeyRecord, Registry, TenantRecord, TenantStatus};
use super::KeyError;
use crate::audit::{Audit, AuditEvent};
use crate::config::{AuditSink, KeysConfig, Policy};
use crate::crypto::{BlindIndexKey, Dek};
use crate::kms::{DenialReason, Edek, KeyContext, KeyProvider, KmsError, Providers};
use crate::ops::metrics::metrics;

use super::retry::{kms_retry_delays, KMS_BACKOFF};

mod approvals;
mod rotation;
/// How often the registry is asked to settle the current epoch before giving up.
const EPOCH_TRIES: u32 = 5;

/// The key a write seals new cells with, and the EDEK to store in the row.
#[derive(Debug, Clone)]
pub struct WriteKey {
    /// The approved current DEK of the tenant.
    pub dek: Arc<ApprovedDek>,
    /// Its wrapped form.
    pub edek: Arc<Edek>,
    /// The EDEK column value for rows sealed with it,
    /// `{"<dek_id>": "<base64 EDEK>"}` (made once per DEK, not per row).
    pub edek_json: Arc<str>,
}

impl WriteKey {
    fn of(slot: &WriteSlot) -> Self {
        Self {
            dek: slot.dek.clone(),
            edek: slot.edek.clone(),
            edek_json: slot.edek_json.clone(),
        }
    }
}

/// The EDEK column value of one DEK: `{"<dek_id>": "<base64 EDEK>"}`.
fn edek_column_json(dek_id: Uuid, edek: &Edek) -> String {
    let mut map = serde_json::Map::new();
    map.insert(
        dek_id.to_string(),
        serde_json::Value::String(B64.encode(&edek.0)),
    );
    serde_json::Value::Object(map).to_string()
}

/// Result of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateOutcome {
    /// The DEK that was retired, if the tenant had one.
    pub retired: Option<Uuid>,
    /// The new current DEK.
    pub dek_id: Uuid,
    /// Its epoch.
    pub epoch: i32,
}

/// Provider and key of a tenant, as last read from `cmk.tenants`.
struct TenantInfo {
    provider_name: String,
    provider: Arc<dyn KeyProvider>,
    key_ref: String,
}

/// The current write DEK of a tenant in this process.
struct WriteSlot {
    dek: Arc<ApprovedDek>,
    edek: Arc<Edek>,
    edek_json: Arc<str>,
    /// now_nanos after which the DEK is too old to encrypt.
    roll_at: u64,
}

/// Everything this process knows about one tenant. Replaced (not reset) on
/// purge, so in-flight work on the old state cannot resurrect its keys.
struct TenantState {
    id: String,
    info: RwLock<Arc<TenantInfo>>,
    lease: Arc<Lease>,
    purged: AtomicBool,
    refresher: AtomicBool,
    write: RwLock<Option<Arc<WriteSlot>>>,
    /// Blind-index key, derived from the tenant's first DEK.
    index_key: RwLock<Option<Arc<BlindIndexKey>>>,
    /// Serializes creation/rollover of the write DEK within this process.
    write_lock: tokio::sync::Mutex<()>,
}

impl TenantState {
    fn info(&self) -> Arc<TenantInfo> {
        match self.info.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_info(&self, info: TenantInfo) {
        match self.info.write() {
            Ok(mut g) => *g = Arc::new(info),
            Err(p) => *p.into_inner() = Arc::new(info),
        }
    }

    fn write_slot(&self) -> Option<Arc<WriteSlot>> {
        match self.write.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn index_key(&self) -> Option<Arc<BlindIndexKey>> {
        match self.index_key.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_index_key(&self, key: Option<Arc<BlindIndexKey>>) {
        match self.index_key.write() {
            Ok(mut g) => *g = key,
            Err(p) => *p.into_inner() = key,
        }
    }

    fn set_write_slot(&self, slot: Option<Arc<WriteSlot>>) {
        match self.write.write() {
            Ok(mut g) => *g = slot,
            Err(p) => *p.into_inner() = slot,
        }
    }
}

struct Inner {
    registry: Registry,
    providers: Providers,
    audit: Audit,
    approval_ttl: Duration,
    max_stale: Duration,
    dek_max_age: Duration,
    dek_max_cells: u64,
    cache: ApprovalCache,
    tenants: DashMap<String, Arc<TenantState>>,
    /// Tenants recently denied: (until now_nanos, detail). Bounded by the TTL
    /// so an re-enabled key is picked up without hammering a revoked KMS.
    denied: DashMap<String, (u64, String)>,
    tenant_flights: Flights<String, Arc<TenantState>>,
    approve_flights: Flights<String, ()>,
    unwrap_flights: Flights<(String, Uuid), Arc<ApprovedDek>>,
    kms_calls: AtomicU64,
}

/// Keys for every session: cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct KeyService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("registry", &self.inner.registry)
            .field("cache", &self.inner.cache)
            .finish_non_exhaustive()
    }
}

fn revoked(tenant: &str, detail: impl Into<String>) -> KeyError {
    KeyError::Revoked {
        tenant: tenant.to_owned(),
        detail: detail.into(),
    }
}

fn unavailable(tenant: &str, detail: impl Into<String>) -> KeyError {
    KeyError::Unavailable {
        tenant: tenant.to_owned(),
        detail: detail.into(),
    }
}

/// Parses a stored per-tenant audit sink (`cmk.tenants.audit_sink`).
pub(crate) fn parse_sink(value: &serde_json::Value) -> Result<AuditSink, KeyError> {
    serde_json::from_value(value.clone())
        .map_err(|e| KeyError::Registry(format!("invalid audit_sink {value}: {e}")))
}

impl KeyService {
    /// Connects to the registry (creating or upgrading the `cmk` schema),
    /// builds the key providers, seeds `policy.tenants` (insert if missing)
    /// and registers per-tenant audit sinks.
    pub async fn connect(policy: &Policy, audit: Audit) -> Result<KeyService, KeyError> {
        let registry = Registry::new(policy)?;
        let client = registry.connect_dedicated().await?;
        super::migrate(&client).await?;
        drop(client);
        let providers = crate::kms::build_providers(&policy.keys)
            .await
            .map_err(|e| KeyError::Registry(format!("key providers: {e}")))?;
        let service = Self::from_parts(registry, providers, &policy.keys, audit);
        service.seed_tenants(policy).await?;
        Ok(service)
    }

    /// Adds `policy.tenants` missing from the registry and registers every
    /// tenant's own audit sink (at start and on a configuration reload).
    pub async fn seed_tenants(&self, policy: &Policy) -> Result<(), KeyError> {
        for (tenant, seed) in &policy.tenants {
            if !self.inner.providers.contains_key(&seed.provider) {
                return Err(KeyError::Registry(format!(
                    "tenants.{tenant}: unknown provider '{}' (key providers change only at a restart)",
                    seed.provider
                )));
            }
        }
        for (tenant, seed) in &policy.tenants {
            let sink = seed.audit_sink.as_ref().map(sink_to_json);
            self.inner
                .registry
                .add_tenant(tenant, &seed.provider, &seed.key, sink.as_ref())
                .await?;
        }
        for record in self.inner.registry.list_tenants().await? {
            self.register_sink(&record)?;
        }
        Ok(())
    }

    /// Builds a service from parts (tests, tools that bring their own providers).
    pub fn from_parts(
        registry: Registry,
        providers: Providers,
        keys: &KeysConfig,
        audit: Audit,
    ) -> KeyService {
        KeyService {
            inner: Arc::new(Inner {
                registry,
                providers,
                audit,
                approval_ttl: keys.approval_ttl,
                max_stale: keys.max_stale,
                dek_max_age: keys.dek_max_age,
                dek_max_cells: keys.dek_max_cells.max(1),
                cache: ApprovalCache::default(),
                tenants: DashMap::new(),
                denied: DashMap::new(),
                tenant_flights: Flights::default(),
                approve_flights: Flights::default(),
                unwrap_flights: Flights::default(),
                kms_calls: AtomicU64::new(0),
            }),
        }
    }

    /// The registry this service uses (CLI: tenants, rewrap).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The audit handle.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }

    /// KMS calls made so far (wrap, unwrap, check_key, including retries).
    pub fn kms_calls(&self) -> u64 {
        self.inner.kms_calls.load(Ordering::Relaxed)
    }

    /// Number of DEKs of `tenant` held in memory now.
    pub fn cached_deks(&self, tenant: &str) -> usize {
        self.inner.cache.tenant_len(tenant)
    }

    /// The tenant's blind-index key for searchable equality. Derived from
    /// the tenant's *first* DEK (epoch 1, created here if needed), so index
    /// values stay comparable across rotations and rewraps. Subject to the
    /// same approval as the DEKs: revoked tenants get `Revoked`.
    pub async fn blind_index_key(&self, tenant: &str) -> Result<Arc<BlindIndexKey>, KeyError> {
        if let Some(ts) = self.inner.tenants.get(tenant).map(|t| t.clone()) {
            if let Some(key) = ts.index_key() {
                if ts.lease.usable(now_nanos()) {
                    return Ok(key);
                }
            }
        }
        let first = match self.inner.registry.first_data_key(tenant).await? {
            Some(first) => first,
            None => {
                self.write_key(tenant).await?;
                self.inner
                    .registry
                    .first_data_key(tenant)
                    .await?
                    .ok_or_else(|| {
                        KeyError::Registry(format!("tenant '{tenant}' has no data key"))
                    })?
            }
        };
        let dek = self.read_key(tenant, first.dek_id, None).await?;
        let key = Arc::new(dek.blind_index_key());
        if let Some(ts) = self.inner.tenants.get(tenant).map(|t| t.clone()) {
            ts.set_index_key(Some(key.clone()));
        }
        Ok(key)
    }

    /// Zeroizes every cached DEK of the tenant (the next use asks the KMS again).
    pub fn purge_tenant(&self, tenant: &str) {
        self.inner.purge(tenant, "purged");
    }

    /// The DEK that opens a cell with header `dek_id`. `edek` is the row's
    /// copy of the wrapped key, used when the registry has no row for it.
    /// A hit is one map lookup; a miss unwraps once however many sessions ask.
    pub async fn read_key(
        &self,
        tenant: &str,
        dek_id: Uuid,
        edek: Option<&Edek>,
    ) -> Result<Arc<ApprovedDek>, KeyError> {
        if let Some(dek) = self.inner.cache.get(tenant, dek_id) {
            metrics().approval_hits.inc();
            return Ok(dek);
        }
        metrics().approval_misses.inc();
        self.inner.clone().read_key_slow(tenant, dek_id, edek).await
    }

    /// The tenant's current write DEK: created on the first write, rolled to a
    /// new epoch at `dek_max_age` / `dek_max_cells`.
    pub async fn write_key(&self, tenant: &str) -> Result<WriteKey, KeyError> {
        let inner = &self.inner;
        if let Some(ts) = inner.tenants.get(tenant).map(|t| t.clone()) {
            if let Some(slot) = ts.write_slot() {
                let now = now_nanos();
                if ts.lease.usable(now) && inner.slot_fresh(&slot, now) {
                    metrics().approval_hits.inc();
                    return Ok(WriteKey::of(&slot));
                }
            }
        }
        metrics().approval_misses.inc();
        inner
            .clone()
            .write_key_slow(tenant, false)
            .await
            .map(|(k, _)| k)
    }

    /// Asks a provider whether `key_ref` exists and is enabled (counted and
    /// audited; `tenants add` uses it before storing a tenant).
    pub async fn check_key(
        &self,
        provider: &str,
        key_ref: &str,
        tenant: &str,
    ) -> Result<(), KeyError> {
        let inner = &self.inner;
        let p = inner
            .providers
            .get(provider)
            .cloned()
            .ok_or_else(|| KeyError::Registry(format!("unknown provider '{provider}'")))?;
        inner
            .kms_call(tenant, provider, key_ref, "check", || p.check_key(key_ref))
            .await
            .map_err(|e| {
                if e.is_denial() {
                    revoked(tenant, e.to_string())
                } else {
                    unavailable(tenant, e.to_string())
                }
            })
    }

    fn register_sink(&self, record: &TenantRecord) -> Result<(), KeyError> {
        if let Some(value) = &record.audit_sink {
            let sink = parse_sink(value)?;
            self.inner.audit.set_tenant_sink(&record.tenant_id, sink);
        }
        Ok(())
    }
}

/// JSON form of an audit sink, as stored in `cmk.tenants.audit_sink`.
pub(crate) fn sink_to_json(sink: &AuditSink) -> serde_json::Value {
    match sink {
        AuditSink::None => serde_json::json!({"kind": "none"}),
        AuditSink::Stdout => serde_json::json!({"kind": "stdout"}),
        AuditSink::File { path } => serde_json::json!({"kind": "file", "path": path}),
        AuditSink::TenantFiles { dir } => serde_json::json!({"kind": "tenant-files", "dir": dir}),
        AuditSink::Http {
            url,
            batch_size,
            spool_dir,
            spool_max_bytes,
        } => {
            let mut json = serde_json::json!({"kind": "http", "url": url});
            if let Some(n) = batch_size {
                json["batch_size"] = serde_json::json!(n);
            }
            if let Some(dir) = spool_dir {
                json["spool_dir"] = serde_json::json!(dir);
            }
            if let Some(n) = spool_max_bytes {
                json["spool_max_bytes"] = serde_json::json!(n);
            }
            json
        }
    }
}

impl Inner {
    fn slot_fresh(&self, slot: &WriteSlot, now: u64) -> bool {
        now < slot.roll_at && slot.dek.cells_sealed() < self.dek_max_cells
    }

    fn provider(&self, record: &TenantRecord) -> Result<Arc<dyn KeyProvider>, KeyError> {
        self.providers
            .get(&record.provider)
            .cloned()
            .ok_or_else(|| {
                KeyError::Registry(format!(
                    "tenant '{}' uses provider '{}', which is not configured in keys.providers",
                    record.tenant_id, record.provider
                ))
            })
    }

    /// One KMS operation with retries on transient errors; every attempt is
    /// counted and audited.
    async fn kms_call<T, F, Fut>(
        &self,
        tenant: &str,
        provider: &str,
        key_ref: &str,
        operation: &'static str,
        mut call: F,
    ) -> Result<T, KmsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KmsError>>,
    {
        let mut delays = kms_retry_delays();
        loop {
            self.kms_calls.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = call().await;
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.outcome(),
            };
            let elapsed = started.elapsed().as_secs_f64();
            metrics().kms_call(provider, operation, &outcome, elapsed);
            self.audit.emit(AuditEvent::KmsCall {
                tenant: tenant.to_owned(),
                provider: provider.to_owned(),
                key_ref: key_ref.to_owned(),
                operation,
                outcome,
                latency_ms: elapsed * 1000.0,
            });
            match (result, delays.next()) {
                (Err(KmsError::Transient { .. }), Some(delay)) => tokio::time::sleep(delay).await,
                (other, _) => return other,
            }
        }
    }

    /// Maps a KMS error; an explicit denial of the tenant's key purges it.
    fn kms_error(&self, tenant: &str, dek_id: Option<Uuid>, e: KmsError) -> KeyError {
        match (e.denial_reason(), dek_id) {
            // A bad EDEK is one cell's problem, not a revocation of the tenant
            // (anyone who can write a row could otherwise lock a tenant out).
            (Some(DenialReason::InvalidCiphertext), Some(dek_id)) => KeyError::Integrity {
                tenant: tenant.to_owned(),
                dek_id,
                detail: e.to_string(),
            },
            (Some(_), _) => {
                let detail = e.to_string();
                self.revoke(tenant, &detail);
                revoked(tenant, detail)
            }
            (None, _) => unavailable(tenant, e.to_string()),
        }
    }

    async fn read_key_slow(
        self: Arc<Self>,
        tenant: &str,
        dek_id: Uuid,
        edek: Option<&Edek>,
    ) -> Result<Arc<ApprovedDek>, KeyError> {
        self.check_denied(tenant)?;
        let ts = self.tenant_state(tenant).await?;
        match self.ensure_approved(&ts).await {
            Ok(()) => {}
            Err(e @ KeyError::Unavailable { .. }) => {
                // Inside the max_stale grace a cached DEK is still served.
                return match self.cache.get(tenant, dek_id) {
                    Some(dek) => Ok(dek),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        if let Some(dek) = self.cache.get_any(tenant, dek_id) {
            return Ok(dek);
        }
        let this = self.clone();
        let edek = edek.cloned();
        self.unwrap_flights
            .run((tenant.to_owned(), dek_id), || async move {
                if let Some(dek) = this.cache.get_any(tenant, dek_id) {
                    return Ok(dek);
                }
                this.unwrap_dek(&ts, dek_id, edek).await
            })
            .await
    }

    /// Unwraps one DEK (registry EDEK first: it is current after a rewrap;
    /// the row's copy otherwise) and caches it under the tenant's lease.
    async fn unwrap_dek(
        &self,
        ts: &Arc<TenantState>,
        dek_id: Uuid,
        row_edek: Option<Edek>,
    ) -> Result<Arc<ApprovedDek>, KeyError> {
        let tenant = ts.id.as_str();
        let info = ts.info();
        let (edek, key_ref) = match self.registry.data_key(dek_id).await? {
            Some(rec) if rec.tenant_id != tenant => {
                return Err(KeyError::Integrity {
                    tenant: tenant.to_owned(),
                    dek_id,
                    detail: "the data key belongs to another tenant".into(),
                })
            }
            Some(rec) => {
                let key_ref = if rec.key_ref.is_empty() {
                    info.key_ref.clone()
                } else {
                    rec.key_ref
                };
                (Edek(rec.edek), key_ref)
            }
            None => match row_edek {
                Some(e) => (e, info.key_ref.clone()),
                None => {
                    return Err(KeyError::Integrity {
                        tenant: tenant.to_owned(),
                        dek_id,
                        detail: "no such data key in the registry and no EDEK in the row".into(),
                    })
                }
            },
        };
        let ctx = KeyContext {
            tenant_id: tenant,
            dek_id,
        };
        let dek = self
            .kms_call(tenant, &info.provider_name, &key_ref, "unwrap", || {
                info.provider.unwrap(&key_ref, &ctx, &edek)
            })
            .await
            .map_err(|e| self.kms_error(tenant, Some(dek_id), e))?;
        Ok(self.admit(ts, dek_id, dek))
    }

    /// Caches an approved DEK, unless the tenant was purged meanwhile.
    fn admit(&self, ts: &Arc<TenantState>, dek_id: Uuid, dek: Dek) -> Arc<ApprovedDek> {
        let approved = Arc::new(ApprovedDek::new(&ts.id, dek_id, dek));
        self.cache.insert(approved.clone(), ts.lease.clone());
        // A purge between our KMS call and the insert must still win.
        if ts.purged.load(Ordering::SeqCst) {
            self.cache.remove_exact(&approved);
        }
        approved
    }

    /// Slow write path; with `rotate`, retires the current DEK first.
    /// Returns the write key and the DEK retired by a rotation.
    async fn write_key_slow(
        self: Arc<Self>,
        tenant: &str,
        rotate: bool,
    ) -> Result<(WriteKey, Option<Uuid>), KeyError> {
        self.check_denied(tenant)?;
        let ts = self.tenant_state(tenant).await?;
        match self.ensure_approved(&ts).await {
            Ok(()) => {}
            Err(e @ KeyError::Unavailable { .. }) => {
                // Inside the max_stale grace the cached write key still serves.
                return match ts.write_slot() {
                    Some(slot) if !rotate && ts.lease.usable(now_nanos()) => {
                        Ok((WriteKey::of(&slot), None))
                    }
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        let _serial = ts.write_lock.lock().await;
        let old = ts.write_slot();
        if !rotate {
            if let Some(slot) = &old {
                if self.slot_fresh(slot, now_nanos()) {
                    return Ok((WriteKey::of(slot), None));
                }
            }
        }
        let mut retired = None;
        if rotate {
            if let Some(cur) = self.registry.current_data_key(tenant).await? {
                if self.registry.retire_data_key(cur.dek_id).await? {
                    retired = Some(cur.dek_id);
                    self.lifecycle(tenant, "rotated", Some(cur.dek_id), "retired by rotation");
                }
            }
        }
        let slot = self.settle_write_slot(&ts, old.as_deref()).await?;
        ts.set_write_slot(Some(slot.clone()));
        Ok((WriteKey::of(&slot), retired))
    }

    fn lifecycle(&self, tenant: &str, operation: &'static str, dek_id: Option<Uuid>, detail: &str) {
        self.audit.emit(AuditEvent::KeyLifecycle {
            tenant: tenant.to_owned(),
            operation,
            dek_id,
            detail: detail.to_owned(),
        });
    }

    /// Agrees with the other replicas on the tenant's current DEK: use the
    /// registry's (rolling it when too old or, by our count, too used), or
    /// claim the next epoch with INSERT … ON CONFLICT DO NOTHING and re-read.
    async fn settle_write_slot(
        self: &Arc<Self>,
        ts: &Arc<TenantState>,
        old: Option<&WriteSlot>,
    ) -> Result<Arc<WriteSlot>, KeyError> {
        let tenant = ts.id.as_str();
        for _ in 0..EPOCH_TRIES {
            if let Some(cur) = self.registry.current_data_key(tenant).await? {
                let age = chrono::Utc::now()
                    .signed_duration_since(cur.created_at)
                    .to_std()
                    .unwrap_or_default();
                let exhausted = old.is_some_and(|o| {
                    o.dek.dek_id == cur.dek_id && o.dek.cells_sealed() >= self.dek_max_cells
                });
                if age < self.dek_max_age && !exhausted {
                    let dek = self.dek_for(ts, &cur).await?;
                    return Ok(self.slot(dek, Edek(cur.edek), age));
                }
                if self.registry.retire_data_key(cur.dek_id).await? {
                    let why = if exhausted {
                        "dek_max_cells reached"
                    } else {
                        "dek_max_age reached"
                    };
                    self.lifecycle(tenant, "rotated", Some(cur.dek_id), why);
                }
                continue;
            }
            let dek_id = Uuid::new_v4();
            let dek = Dek::generate();
            let info = ts.info();
            let ctx = KeyContext {
                tenant_id: tenant,
                dek_id,
            };
            let edek = self
                .kms_call(tenant, &info.provider_name, &info.key_ref, "wrap", || {
                    info.provider.wrap(&info.key_ref, &ctx, &dek)
                })
                .await
                .map_err(|e| self.kms_error(tenant, None, e))?;
            let claimed = self
                .registry
                .insert_data_key(dek_id, tenant, &info.provider_name, &info.key_ref, &edek.0)
                .await?;
            if let Some(epoch) = claimed {
                self.lifecycle(tenant, "created", Some(dek_id), &format!("epoch {epoch}"));
                let approved = self.admit(ts, dek_id, dek);
                return Ok(self.slot(approved, edek, Duration::ZERO));
            }
            // Another replica claimed this epoch: drop ours, use theirs.
        }
        Err(KeyError::Registry(format!(
            "could not settle the current data key of tenant '{tenant}' after {EPOCH_TRIES} attempts"
        )))
    }

    fn slot(&self, dek: Arc<ApprovedDek>, edek: Edek, age: Duration) -> Arc<WriteSlot> {
        let left = self.dek_max_age.saturating_sub(age);
        let edek_json = Arc::from(edek_column_json(dek.dek_id, &edek));
        Arc::new(WriteSlot {
            dek,
            edek: Arc::new(edek),
            edek_json,
            roll_at: now_nanos().saturating_add(nanos(left)),
        })
    }

    /// The approved DEK of a registry row (cached, or unwrapped once).
    async fn dek_for(
        self: &Arc<Self>,
        ts: &Arc<TenantState>,
        rec: &DataKeyRecord,
    ) -> Result<Arc<ApprovedDek>, KeyError> {
        if let Some(dek) = self.cache.get_any(&ts.id, rec.dek_id) {
            return Ok(dek);
        }
        let this = self.clone();
        let ts2 = ts.clone();
        let dek_id = rec.dek_id;
        let edek = Edek(rec.edek.clone());
        self.unwrap_flights
            .run((ts.id.clone(), dek_id), || async move {
                if let Some(dek) = this.cache.get_any(&ts2.id, dek_id) {
                    return Ok(dek);
                }
                this.unwrap_dek(&ts2, dek_id, Some(edek)).await
            })
            .await
    }
}
