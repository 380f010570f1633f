//! A tenant's approval: asked of its KMS, renewed in the background before
//! it lapses so a busy tenant never waits, revoked or expired with its DEKs.

use super::*;

impl Inner {
    /// Purges the tenant and remembers the denial for one approval TTL.
    pub(super) fn revoke(&self, tenant: &str, detail: &str) {
        let until = now_nanos().saturating_add(nanos(self.approval_ttl));
        self.denied
            .insert(tenant.to_owned(), (until, detail.to_owned()));
        let m = metrics();
        m.tenants_denied.get_or_create(&m.tenant(tenant)).inc();
        self.purge(tenant, "revoked");
    }

    pub(super) fn purge(&self, tenant: &str, why: &'static str) {
        if let Some((_, ts)) = self.tenants.remove(tenant) {
            ts.purged.store(true, Ordering::SeqCst);
            ts.lease.end();
            ts.set_write_slot(None);
            ts.set_index_key(None);
        }
        let dropped = self.cache.purge_tenant(tenant);
        metrics().approval_evictions.inc_by(dropped as u64);
        if dropped > 0 {
            self.audit.emit(AuditEvent::KeyLifecycle {
                tenant: tenant.to_owned(),
                operation: "purged",
                dek_id: None,
                detail: format!("{why}: {dropped} cached data keys dropped"),
            });
        }
    }

    /// Drops the cached DEKs of an idle or unreachable tenant (not a
    /// revocation: the tenant state stays, the next use asks the KMS again).
    pub(super) fn expire(&self, ts: &TenantState, why: &'static str) {
        ts.set_write_slot(None);
        ts.set_index_key(None);
        let dropped = self.cache.purge_tenant(&ts.id);
        metrics().approval_evictions.inc_by(dropped as u64);
        if dropped > 0 {
            self.lifecycle(
                &ts.id,
                "purged",
                None,
                &format!("{why}: {dropped} cached data keys dropped"),
            );
        }
    }

    pub(super) fn check_denied(&self, tenant: &str) -> Result<(), KeyError> {
        let now = now_nanos();
        let hit = self.denied.get(tenant).map(|d| (d.0, d.1.clone()));
        match hit {
            Some((until, detail)) if now < until => Err(revoked(tenant, detail)),
            Some(_) => {
                self.denied.remove_if(tenant, |_, d| d.0 <= now);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The tenant's state, loaded from the registry once per process.
    pub(super) async fn tenant_state(
        self: &Arc<Self>,
        tenant: &str,
    ) -> Result<Arc<TenantState>, KeyError> {
        if let Some(ts) = self.tenants.get(tenant).map(|t| t.clone()) {
            return Ok(ts);
        }
        let this = self.clone();
        self.tenant_flights
            .run(tenant.to_owned(), || async move {
                if let Some(ts) = this.tenants.get(tenant).map(|t| t.clone()) {
                    return Ok(ts);
                }
                let record = this.load_tenant(tenant).await?;
                if let Some(value) = &record.audit_sink {
                    this.audit.set_tenant_sink(tenant, parse_sink(value)?);
                }
                let provider = this.provider(&record)?;
                let ts = Arc::new(TenantState {
                    id: tenant.to_owned(),
                    info: RwLock::new(Arc::new(TenantInfo {
                        provider_name: record.provider.clone(),
                        provider,
                        key_ref: record.key_ref.clone(),
                    })),
                    lease: Arc::new(Lease::default()),
                    purged: AtomicBool::new(false),
                    refresher: AtomicBool::new(false),
                    write: RwLock::new(None),
                    index_key: RwLock::new(None),
                    write_lock: tokio::sync::Mutex::new(()),
                });
                Ok(this.tenants.entry(tenant.to_owned()).or_insert(ts).clone())
            })
            .await
    }

    /// Reads the tenant row; a disabled tenant is revoked.
    pub(super) async fn load_tenant(&self, tenant: &str) -> Result<TenantRecord, KeyError> {
        let Some(record) = self.registry.tenant(tenant).await? else {
            // Removed from the registry: its cached keys must not linger.
            self.purge(tenant, "tenant not in cmk.tenants");
            return Err(KeyError::UnknownTenant {
                tenant: tenant.to_owned(),
            });
        };
        if record.status == TenantStatus::Disabled {
            let detail = "tenant is disabled in cmk.tenants";
            self.revoke(tenant, detail);
            return Err(revoked(tenant, detail));
        }
        Ok(record)
    }

    /// Makes sure the tenant's lease is approved (one KMS check for all
    /// concurrent callers). Starts the background refresher.
    pub(super) async fn ensure_approved(
        self: &Arc<Self>,
        ts: &Arc<TenantState>,
    ) -> Result<(), KeyError> {
        if ts.lease.approved(now_nanos()) {
            return Ok(());
        }
        let this = self.clone();
        let ts2 = ts.clone();
        self.approve_flights
            .run(ts.id.clone(), || async move {
                if ts2.lease.approved(now_nanos()) {
                    return Ok(());
                }
                this.approve_now(&ts2).await
            })
            .await
    }

    /// Asks the registry (status, key_ref, current epoch) and the KMS
    /// (`check_key`) whether the tenant may keep using its keys.
    pub(super) async fn approve_now(
        self: &Arc<Self>,
        ts: &Arc<TenantState>,
    ) -> Result<(), KeyError> {
        let tenant = ts.id.as_str();
        let record = match self.load_tenant(tenant).await {
            Ok(r) => r,
            Err(KeyError::Registry(detail)) => return Err(self.transient_failure(ts, detail)),
            Err(e) => return Err(e),
        };
        let info = ts.info();
        if record.key_ref != info.key_ref || record.provider != info.provider_name {
            let provider = self.provider(&record)?;
            ts.set_info(TenantInfo {
                provider_name: record.provider.clone(),
                provider,
                key_ref: record.key_ref.clone(),
            });
            ts.set_write_slot(None);
        }
        let info = ts.info();
        let result = self
            .kms_call(tenant, &info.provider_name, &info.key_ref, "check", || {
                info.provider.check_key(&info.key_ref)
            })
            .await;
        match result {
            Ok(()) => {
                if ts.purged.load(Ordering::SeqCst) {
                    self.check_denied(tenant)?;
                    return Err(unavailable(tenant, "keys were purged meanwhile; retry"));
                }
                ts.lease.approve(now_nanos(), self.approval_ttl);
                let m = metrics();
                m.tenants_approved.get_or_create(&m.tenant(tenant)).inc();
                self.drop_stale_write_slot(ts).await;
                self.spawn_refresher(ts);
                Ok(())
            }
            Err(e) if e.is_denial() => Err(self.kms_error(tenant, None, e)),
            Err(e) => Err(self.transient_failure(ts, e.to_string())),
        }
    }

    /// KMS or registry unreachable: keep serving inside the `max_stale`
    /// grace, retrying at most every quarter TTL.
    pub(super) fn transient_failure(&self, ts: &TenantState, detail: String) -> KeyError {
        let now = now_nanos();
        let retry = nanos(self.approval_ttl / 4).max(nanos(KMS_BACKOFF));
        ts.lease
            .extend_stale(now.saturating_add(retry), self.max_stale);
        let end_of_grace = ts
            .lease
            .expires_at
            .load(Ordering::Acquire)
            .saturating_add(nanos(self.max_stale));
        if now >= end_of_grace {
            // Neither approved nor inside the grace: the keys must go.
            self.expire(ts, "key service unavailable beyond max_stale");
        }
        unavailable(&ts.id, detail)
    }

    /// Another replica may have rotated: if the registry's current DEK is
    /// not ours, forget our write slot so the next write re-reads it.
    pub(super) async fn drop_stale_write_slot(&self, ts: &TenantState) {
        let Some(slot) = ts.write_slot() else { return };
        match self.registry.current_data_key(&ts.id).await {
            Ok(Some(cur)) if cur.dek_id == slot.dek.dek_id => {}
            Ok(_) => ts.set_write_slot(None),
            Err(e) => tracing::warn!(tenant = %ts.id, error = %e, "cannot check current data key"),
        }
    }

    pub(super) fn spawn_refresher(self: &Arc<Self>, ts: &Arc<TenantState>) {
        if ts.refresher.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let ts = ts.clone();
        tokio::spawn(refresh_loop(weak, ts));
    }
}

/// Background re-approval of one tenant: at 75 % of the TTL, if the tenant
/// was used since the last approval, ask again so hot tenants never wait; an
/// idle tenant's DEKs are dropped when its lease ends.
async fn refresh_loop(weak: Weak<Inner>, ts: Arc<TenantState>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if ts.purged.load(Ordering::SeqCst) {
            return;
        }
        let ttl = nanos(inner.approval_ttl);
        let approved_at = ts.lease.approved_at.load(Ordering::Acquire);
        let expires_at = ts.lease.expires_at.load(Ordering::Acquire);
        let end_of_grace = expires_at.saturating_add(nanos(inner.max_stale));
        let refresh_at = approved_at.saturating_add(ttl / 4 * 3);
        let now = now_nanos();
        if now < refresh_at {
            drop(inner);
            sleep_until_nanos(refresh_at).await;
            continue;
        }
        if ts.lease.used.swap(false, Ordering::Relaxed) {
            match inner
                .approve_flights
                .run(ts.id.clone(), || inner.approve_now(&ts))
                .await
            {
                Ok(()) => continue,
                Err(KeyError::Unavailable { .. }) | Err(KeyError::Registry(_)) => {
                    if now_nanos() >= end_of_grace {
                        ts.refresher.store(false, Ordering::SeqCst);
                        inner.expire(&ts, "key service unavailable beyond max_stale");
                        return;
                    }
                    // Keep trying through the grace while sessions use the keys.
                    ts.lease.used.store(true, Ordering::Relaxed);
                    drop(inner);
                    tokio::time::sleep(KMS_BACKOFF * 4).await;
                    continue;
                }
                Err(_) => {
                    // Revoked or unknown: the tenant state was purged.
                    ts.refresher.store(false, Ordering::SeqCst);
                    return;
                }
            }
        }
        if now < expires_at {
            // Unused so far in this lease: look again a little later, so a
            // tenant that becomes busy is still re-approved before expiry.
            drop(inner);
            sleep_until_nanos(expires_at.min(now.saturating_add(ttl / 8))).await;
            continue;
        }
        // Idle and expired: forget the keys until someone asks again.
        ts.refresher.store(false, Ordering::SeqCst);
        if ts.lease.approved_at.load(Ordering::Acquire) == approved_at {
            inner.expire(&ts, "approval expired");
        } else {
            // Re-approved meanwhile by a request: keep refreshing.
            inner.spawn_refresher(&ts);
        }
        return;
    }
}

pub(super) async fn sleep_until_nanos(at: u64) {
    let now = now_nanos();
    if at > now {
        tokio::time::sleep(Duration::from_nanos(at - now)).await;
    }
}
