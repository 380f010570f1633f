//! Tenants' keys for `decrypt-dump`: providers built on first use, each
//! distinct EDEK unwrapped once, refusals remembered.

use super::*;

/// (tenant, dek_id, the row's EDEK bytes): one unwrap per distinct EDEK.
pub(super) type DekKey = (String, Uuid, Vec<u8>);

/// Tenants' keys: providers built on first use, DEKs unwrapped once per
/// distinct EDEK, refusals remembered.
pub(super) struct Keys<'p> {
    pub(super) policy: &'p Policy,
    pub(super) registry: DumpRegistry,
    pub(super) use_registry: bool,
    pub(super) providers: HashMap<String, Result<Arc<dyn KeyProvider>, String>>,
    pub(super) deks: HashMap<DekKey, Result<Arc<Dek>, Failure>>,
    /// Tenants whose KMS refused the key (disabled, destroyed, denied).
    pub(super) refused: HashMap<String, Failure>,
    /// Tenants whose key the KMS confirmed enabled (`check_key`).
    pub(super) checked: BTreeSet<String>,
    pub(super) unwrap_calls: u64,
    pub(super) check_calls: u64,
}

impl Keys<'_> {
    pub(super) fn tenant_key(&self, tenant: &str) -> Option<(String, String)> {
        if let Some(found) = self.registry.tenants.get(tenant) {
            return Some(found.clone());
        }
        self.policy
            .tenants
            .get(tenant)
            .map(|seed| (seed.provider.clone(), seed.key.clone()))
    }

    pub(super) async fn provider(&mut self, name: &str) -> Result<Arc<dyn KeyProvider>, String> {
        if let Some(p) = self.providers.get(name) {
            return p.clone();
        }
        let built = match self.policy.keys.providers.get(name) {
            None => Err(format!(
                "provider '{name}' is not configured in keys.providers of the policy"
            )),
            Some(cfg) => {
                let one = KeysConfig {
                    providers: [(name.to_owned(), cfg.clone())].into_iter().collect(),
                    ..KeysConfig::default()
                };
                match crate::kms::build_providers(&one).await {
                    Ok(mut built) => built
                        .remove(name)
                        .ok_or_else(|| format!("provider '{name}' could not be built")),
                    Err(e) => Err(format!("provider '{name}': {e}")),
                }
            }
        };
        self.providers.insert(name.to_owned(), built.clone());
        built
    }

    pub(super) async fn unwrap_once(
        &mut self,
        provider: &Arc<dyn KeyProvider>,
        key_ref: &str,
        tenant: &str,
        dek_id: Uuid,
        edek: &[u8],
    ) -> Result<Dek, KmsError> {
        self.unwrap_calls += 1;
        let ctx = KeyContext {
            tenant_id: tenant,
            dek_id,
        };
        provider.unwrap(key_ref, &ctx, &Edek(edek.to_vec())).await
    }

    /// The DEK of a cell, from the row's EDEK (or the dump's registry copy).
    pub(super) async fn dek(
        &mut self,
        tenant: &str,
        dek_id: Uuid,
        row_edek: Option<&[u8]>,
    ) -> Result<Arc<Dek>, Failure> {
        let failure = |kind, detail: String| Failure {
            kind,
            column: None,
            detail,
        };
        if let Some(f) = self.refused.get(tenant) {
            return Err(f.clone());
        }
        let cache_key = (
            tenant.to_owned(),
            dek_id,
            row_edek.map(<[u8]>::to_vec).unwrap_or_default(),
        );
        if let Some(done) = self.deks.get(&cache_key) {
            return done.clone();
        }
        let Some((provider_name, key_ref)) = self.tenant_key(tenant) else {
            return Err(failure(
                "unknown tenant",
                format!(
                    "'{tenant}' is neither in the dump's cmk.tenants nor in tenants: of the policy"
                ),
            ));
        };
        let provider = self
            .provider(&provider_name)
            .await
            .map_err(|e| failure("provider", e))?;
        if !self.checked.contains(tenant) {
            // As the proxy does before using a tenant's keys: the key must be
            // enabled, whatever the provider's Decrypt would still accept.
            self.check_calls += 1;
            if let Err(e) = provider.check_key(&key_ref).await {
                if let Some(f) = self.tenant_refusal(tenant, &key_ref, &e) {
                    return Err(f);
                }
                let f = failure(
                    "key refused",
                    format!("tenant '{tenant}''s key {key_ref}: {e}"),
                );
                self.refused.insert(tenant.to_owned(), f.clone());
                return Err(f);
            }
            self.checked.insert(tenant.to_owned());
        }
        let registry_copy = if self.use_registry {
            self.registry.data_keys.get(&dek_id).cloned()
        } else {
            None
        };
        if let Some((owner, _, _)) = &registry_copy {
            if owner != tenant {
                let f = failure(
                    "integrity",
                    format!("data key {dek_id} belongs to tenant '{owner}' in the dump's cmk.data_keys, not to the row's tenant '{tenant}'"),
                );
                self.deks.insert(cache_key, Err(f.clone()));
                return Err(f);
            }
        }
        let mut row_error = None;
        if let Some(edek) = row_edek {
            match self
                .unwrap_once(&provider, &key_ref, tenant, dek_id, edek)
                .await
            {
                Ok(dek) => {
                    let dek = Arc::new(dek);
                    self.deks.insert(cache_key, Ok(dek.clone()));
                    return Ok(dek);
                }
                Err(e) => row_error = Some(e),
            }
        }
        if let Some(e) = &row_error {
            if let Some(f) = self.tenant_refusal(tenant, &key_ref, e) {
                return Err(f);
            }
        }
        let result = match (registry_copy, &row_error) {
            (Some((_, reg_key_ref, edek)), _) if row_edek != Some(edek.as_slice()) => {
                let reg_key_ref = if reg_key_ref.is_empty() {
                    key_ref.clone()
                } else {
                    reg_key_ref
                };
                match self
                    .unwrap_once(&provider, &reg_key_ref, tenant, dek_id, &edek)
                    .await
                {
                    Ok(dek) => {
                        let why = if row_error.is_some() {
                            "does not unwrap"
                        } else {
                            "is missing"
                        };
                        eprintln!(
                            "cmk-proxy: decrypt-dump: warning: the rows' EDEK of data key {dek_id} (tenant '{tenant}') {why}; used the copy in the dump's cmk.data_keys"
                        );
                        Ok(Arc::new(dek))
                    }
                    Err(e) => {
                        if let Some(f) = self.tenant_refusal(tenant, &reg_key_ref, &e) {
                            return Err(f);
                        }
                        Err(failure(
                            "EDEK does not unwrap",
                            format!("EDEK of data key {dek_id} does not unwrap under tenant '{tenant}''s key {reg_key_ref}: {e}"),
                        ))
                    }
                }
            }
            (_, Some(e)) => Err(failure(
                "EDEK does not unwrap",
                format!("EDEK of data key {dek_id} in the row does not unwrap under tenant '{tenant}''s key {key_ref}: {e}"),
            )),
            (_, None) => Err(failure(
                "missing EDEK",
                format!(
                    "the row's EDEK column has no entry for data key {dek_id}{}",
                    if self.use_registry {
                        " and the dump's cmk.data_keys has none either"
                    } else {
                        " (--no-registry)"
                    }
                ),
            )),
        };
        self.deks.insert(cache_key, result.clone());
        result
    }

    /// A denial that concerns the tenant's key as a whole (not this EDEK):
    /// remembered so the KMS is not asked again for every data key.
    pub(super) fn tenant_refusal(
        &mut self,
        tenant: &str,
        key_ref: &str,
        e: &KmsError,
    ) -> Option<Failure> {
        let f = match e {
            KmsError::Denied { reason, .. } if *reason != DenialReason::InvalidCiphertext => {
                Failure {
                    kind: "key refused",
                    column: None,
                    detail: format!(
                        "the KMS refuses tenant '{tenant}''s key {key_ref} ({reason}): its cells cannot be decrypted: {e}"
                    ),
                }
            }
            KmsError::Transient { .. } | KmsError::Config(_) => Failure {
                kind: "KMS unavailable",
                column: None,
                detail: format!("tenant '{tenant}''s KMS: {e}"),
            },
            KmsError::Denied { .. } => return None,
        };
        self.refused.insert(tenant.to_owned(), f.clone());
        Some(f)
    }
}
