//! Rotation and rewrap of a tenant's data keys.

use super::*;

impl KeyService {
    /// Retires the tenant's current DEK and starts the next epoch (new writes
    /// use it; old cells stay readable). Other replicas switch at their next
    /// re-approval, within `approval_ttl`.
    pub async fn rotate(&self, tenant: &str) -> Result<RotateOutcome, KeyError> {
        let (key, retired) = self.inner.clone().write_key_slow(tenant, true).await?;
        let epoch = self
            .inner
            .registry
            .data_key(key.dek.dek_id)
            .await?
            .map(|r| r.epoch)
            .unwrap_or_default();
        Ok(RotateOutcome {
            retired,
            dek_id: key.dek.dek_id,
            epoch,
        })
    }

    /// Re-wraps every EDEK of the tenant under `to_key` (or the tenant's
    /// current key_ref, i.e. its newest key version) without touching cell
    /// ciphertext; updates `cmk.data_keys` and `cmk.tenants.key_ref` in one
    /// transaction. Returns how many keys were re-wrapped.
    pub async fn rewrap(&self, tenant: &str, to_key: Option<&str>) -> Result<usize, KeyError> {
        let inner = &self.inner;
        let record =
            inner
                .registry
                .tenant(tenant)
                .await?
                .ok_or_else(|| KeyError::UnknownTenant {
                    tenant: tenant.to_owned(),
                })?;
        let provider = inner.provider(&record)?;
        let target = to_key.unwrap_or(&record.key_ref).to_owned();
        inner
            .kms_call(tenant, &record.provider, &target, "check", || {
                provider.check_key(&target)
            })
            .await
            .map_err(|e| inner.kms_error(tenant, None, e))?;
        let mut rewrapped = Vec::new();
        for dk in inner.registry.data_keys(tenant).await? {
            let ctx = KeyContext {
                tenant_id: tenant,
                dek_id: dk.dek_id,
            };
            let old = Edek(dk.edek.clone());
            let key_ref = if dk.key_ref.is_empty() {
                record.key_ref.clone()
            } else {
                dk.key_ref.clone()
            };
            let dek = inner
                .kms_call(tenant, &record.provider, &key_ref, "unwrap", || {
                    provider.unwrap(&key_ref, &ctx, &old)
                })
                .await
                .map_err(|e| inner.kms_error(tenant, Some(dk.dek_id), e))?;
            let new = inner
                .kms_call(tenant, &record.provider, &target, "wrap", || {
                    provider.wrap(&target, &ctx, &dek)
                })
                .await
                .map_err(|e| inner.kms_error(tenant, Some(dk.dek_id), e))?;
            rewrapped.push((dk.dek_id, new.0));
        }
        inner
            .registry
            .store_rewrapped(tenant, &target, &rewrapped)
            .await?;
        for (dek_id, _) in &rewrapped {
            inner.audit.emit(AuditEvent::KeyLifecycle {
                tenant: tenant.to_owned(),
                operation: "rewrapped",
                dek_id: Some(*dek_id),
                detail: format!("now wrapped by {target}"),
            });
        }
        // Cached write EDEKs are stale now; DEKs themselves are unchanged.
        if let Some(ts) = inner.tenants.get(tenant).map(|t| t.clone()) {
            ts.set_write_slot(None);
            ts.set_info(TenantInfo {
                provider_name: record.provider.clone(),
                provider,
                key_ref: target,
            });
        }
        Ok(rewrapped.len())
    }
}
