//! The approval cache: unwrapped DEKs a tenant's KMS has approved recently,
//! keyed by (tenant, dek_id), each tied to its tenant's lease. A hit is one
//! dashmap lookup and one clock compare; nothing here calls the KMS.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use super::KeyError;
use crate::crypto::{self, BlindIndexKey, CellAad, CellError, Dek};
use crate::ops::metrics::metrics;

/// Nanoseconds since the first call in this process: a monotonic clock that
/// fits an atomic.
pub(crate) fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A DEK the tenant's KMS has approved: usable for sealing and opening cells
/// while its lease lasts. The key zeroizes when the last `Arc` goes away.
pub struct ApprovedDek {
    /// Key id written into every cell header.
    pub dek_id: Uuid,
    /// Owning tenant (part of every cell's AAD).
    pub tenant: String,
    dek: Dek,
    sealed: AtomicU64,
}

impl std::fmt::Debug for ApprovedDek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovedDek")
            .field("dek_id", &self.dek_id)
            .field("tenant", &self.tenant)
            .field("dek", &"<redacted>")
            .finish()
    }
}

impl ApprovedDek {
    pub(crate) fn new(tenant: &str, dek_id: Uuid, dek: Dek) -> ApprovedDek {
        ApprovedDek {
            dek_id,
            tenant: tenant.to_owned(),
            dek,
            sealed: AtomicU64::new(0),
        }
    }

    /// Encrypts one cell under this DEK (counted towards `dek_max_cells`).
    pub fn seal(&self, aad: &CellAad<'_>, pt: &[u8]) -> Vec<u8> {
        self.sealed.fetch_add(1, Ordering::Relaxed);
        metrics().cells_sealed.inc();
        crypto::seal(&self.dek, self.dek_id, aad, pt)
    }

    /// Decrypts one cell sealed under this DEK.
    pub fn open(&self, aad: &CellAad<'_>, cell: &[u8]) -> Result<Vec<u8>, CellError> {
        let opened = crypto::open(&self.dek, aad, cell);
        if opened.is_ok() {
            metrics().cells_opened.inc();
        }
        opened
    }

    /// Cells sealed by this process under this DEK.
    pub fn cells_sealed(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// The blind-index key derived from this DEK for its tenant (HKDF).
    /// Derived per DEK, so values differ between epochs: for searchable
    /// columns use `KeyService::blind_index_key`, which is stable.
    pub fn blind_index_key(&self) -> BlindIndexKey {
        BlindIndexKey::derive(&self.dek, &self.tenant)
    }
}

/// A tenant's approval lease, shared by all of its cached DEKs: the KMS
/// approves the tenant's key, so one refresh renews every DEK of the tenant.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    /// When the KMS last approved (now_nanos).
    pub approved_at: AtomicU64,
    /// End of the approval (approved_at + approval_ttl).
    pub expires_at: AtomicU64,
    /// Hits are served until here: `expires_at`, or later inside the
    /// `max_stale` grace while the KMS is unreachable.
    pub serve_until: AtomicU64,
    /// Set by hits, cleared by the refresher: only used tenants are refreshed.
    pub used: AtomicBool,
}

impl Lease {
    /// Hit-path check; marks the tenant as in use.
    #[inline]
    pub fn usable(&self, now: u64) -> bool {
        if now < self.serve_until.load(Ordering::Acquire) {
            if !self.used.load(Ordering::Relaxed) {
                self.used.store(true, Ordering::Relaxed);
            }
            true
        } else {
            false
        }
    }

    /// Whether the KMS approval itself (not the stale grace) is current.
    pub fn approved(&self, now: u64) -> bool {
        now < self.expires_at.load(Ordering::Acquire)
    }

    /// Records a fresh approval at `now`.
    pub fn approve(&self, now: u64, ttl: Duration) {
        let until = now.saturating_add(nanos(ttl));
        self.approved_at.store(now, Ordering::Release);
        self.expires_at.store(until, Ordering::Release);
        self.serve_until.store(until, Ordering::Release);
    }

    /// After a transient KMS failure: keep serving until `until`, never past
    /// `expires_at + max_stale`.
    pub fn extend_stale(&self, until: u64, max_stale: Duration) {
        let cap = self
            .expires_at
            .load(Ordering::Acquire)
            .saturating_add(nanos(max_stale));
        let until = until.min(cap);
        self.serve_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Ends the lease now (revocation, expiry).
    pub fn end(&self) {
        self.expires_at.store(0, Ordering::Release);
        self.serve_until.store(0, Ordering::Release);
    }
}

/// Owned cache key.
struct CacheKey {
    tenant: Box<str>,
    dek_id: Uuid,
}

/// Borrowed view of a cache key, so a lookup needs no allocation.
trait KeyView {
    fn tenant(&self) -> &str;
    fn dek_id(&self) -> Uuid;
}

impl KeyView for CacheKey {
    fn tenant(&self) -> &str {
        &self.tenant
    }
    fn dek_id(&self) -> Uuid {
        self.dek_id
    }
}

impl KeyView for (&str, Uuid) {
    fn tenant(&self) -> &str {
        self.0
    }
    fn dek_id(&self) -> Uuid {
        self.1
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.tenant().hash(state);
        self.dek_id().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.dek_id() == other.dek_id() && self.tenant() == other.tenant()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyView).hash(state);
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn KeyView) == (other as &dyn KeyView)
    }
}

impl Eq for CacheKey {}

struct CacheEntry {
    dek: Arc<ApprovedDek>,
    lease: Arc<Lease>,
}

/// Approved DEKs by (tenant, dek_id).
#[derive(Default)]
pub struct ApprovalCache {
    entries: DashMap<CacheKey, CacheEntry>,
}

impl std::fmt::Debug for ApprovalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalCache")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl ApprovalCache {
    /// The hot path: the DEK if cached and its tenant's lease is usable now.
    #[inline]
    pub fn get(&self, tenant: &str, dek_id: Uuid) -> Option<Arc<ApprovedDek>> {
        let entry = self.entries.get(&(tenant, dek_id) as &dyn KeyView)?;
        entry.lease.usable(now_nanos()).then(|| entry.dek.clone())
    }

    /// The DEK if cached, whatever its lease says (the slow path decides).
    pub(crate) fn get_any(&self, tenant: &str, dek_id: Uuid) -> Option<Arc<ApprovedDek>> {
        self.entries
            .get(&(tenant, dek_id) as &dyn KeyView)
            .map(|e| e.dek.clone())
    }

    pub(crate) fn insert(&self, dek: Arc<ApprovedDek>, lease: Arc<Lease>) {
        let key = CacheKey {
            tenant: dek.tenant.as_str().into(),
            dek_id: dek.dek_id,
        };
        self.entries.insert(key, CacheEntry { dek, lease });
    }

    /// Removes one entry if it still holds exactly `dek`.
    pub(crate) fn remove_exact(&self, dek: &Arc<ApprovedDek>) {
        self.entries.remove_if(
            &(dek.tenant.as_str(), dek.dek_id) as &dyn KeyView,
            |_, e| Arc::ptr_eq(&e.dek, dek),
        );
    }

    /// Drops every cached DEK of a tenant; returns how many were dropped.
    pub fn purge_tenant(&self, tenant: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|k, _| &*k.tenant != tenant);
        before.saturating_sub(self.entries.len())
    }

    /// Number of cached DEKs of a tenant.
    pub fn tenant_len(&self, tenant: &str) -> usize {
        self.entries
            .iter()
            .filter(|e| &*e.key().tenant == tenant)
            .count()
    }

    /// Number of cached DEKs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Single flight: concurrent callers with the same key share one run of the
/// work (one KMS call) and its result, success or error.
pub(crate) struct Flights<K: Hash + Eq, T> {
    map: DashMap<K, Arc<tokio::sync::OnceCell<Result<T, KeyError>>>>,
}

impl<K: Hash + Eq, T> Default for Flights<K, T> {
    fn default() -> Self {
        Self {
            map: DashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, T: Clone> Flights<K, T> {
    /// Runs `work` unless a run for `key` is in flight, then shares its result.
    /// `work` must re-check the cache first: a caller arriving just after a
    /// flight ended starts a new one.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Result<T, KeyError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, KeyError>>,
    {
        let cell = self.map.entry(key.clone()).or_default().clone();
        let result = cell.get_or_init(work).await.clone();
        self.map.remove_if(&key, |_, c| Arc::ptr_eq(c, &cell));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek(tenant: &str) -> Arc<ApprovedDek> {
        Arc::new(ApprovedDek::new(tenant, Uuid::new_v4(), Dek::generate()))
    }

    #[test]
    fn hit_needs_a_usable_lease() {
        let cache = ApprovalCache::default();
        let lease = Arc::new(Lease::default());
        let d = dek("acme");
        cache.insert(d.clone(), lease.clone());
        assert!(cache.get("acme", d.dek_id).is_none(), "no approval yet");
        lease.approve(now_nanos(), Duration::from_secs(60));
        assert!(cache.get("acme", d.dek_id).is_some());
        assert!(
            cache.get("other", d.dek_id).is_none(),
            "keyed by tenant too"
        );
        lease.end();
        assert!(cache.get("acme", d.dek_id).is_none());
    }

    #[test]
    fn stale_grace_is_capped_by_max_stale() {
        let lease = Lease::default();
        let now = now_nanos();
        lease.approve(now, Duration::from_secs(1));
        lease.extend_stale(
            now + nanos(Duration::from_secs(100)),
            Duration::from_secs(2),
        );
        let until = lease.serve_until.load(Ordering::Acquire);
        assert_eq!(until, now + nanos(Duration::from_secs(3)));
    }

    #[test]
    fn purge_drops_only_that_tenant() {
        let cache = ApprovalCache::default();
        let lease = Arc::new(Lease::default());
        lease.approve(now_nanos(), Duration::from_secs(60));
        let (a1, a2, b) = (dek("a"), dek("a"), dek("b"));
        for d in [&a1, &a2, &b] {
            cache.insert(d.clone(), lease.clone());
        }
        assert_eq!(cache.purge_tenant("a"), 2);
        assert!(cache.get("a", a1.dek_id).is_none());
        assert!(cache.get("b", b.dek_id).is_some());
        assert_eq!(Arc::strong_count(&a1), 1, "cache let go of the key");
    }

    #[test]
    fn debug_redacts_the_key() {
        let d = dek("acme");
        assert!(format!("{d:?}").contains("<redacted>"));
    }

    #[tokio::test]
    async fn flights_share_one_run() {
        let flights: Arc<Flights<u32, u32>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (f, r, g) = (flights.clone(), runs.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                f.run(7, || async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    g.notified().await;
                    Ok(42)
                })
                .await
            }));
        }
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 42);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
