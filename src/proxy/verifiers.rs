//! SCRAM verifiers of roles, read through the proxy's own connection and
//! cached briefly, for SCRAM pass-through (see `scram`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::admin;
use super::scram::{ScramError, Verifier};
use crate::config::Policy;
use crate::keys::KeyError;

/// Why no verifier is available.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The proxy's connection failed.
    #[error(transparent)]
    Admin(#[from] KeyError),
    /// The query failed (e.g. permission denied on pg_authid).
    #[error("verifier query failed: {}", crate::pg_error::text(.0))]
    Query(tokio_postgres::Error),
    /// The role has no password or is unknown.
    #[error("role has no SCRAM verifier")]
    Missing,
    /// The stored password is not SCRAM.
    #[error(transparent)]
    Scram(#[from] ScramError),
}

/// Looks up and caches verifiers by role name.
pub struct VerifierStore {
    policy: Arc<Policy>,
    cache: DashMap<String, (Instant, Arc<Verifier>)>,
    client: Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl VerifierStore {
    /// A store using the policy's upstream credentials and query.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy,
            cache: DashMap::new(),
            client: Mutex::new(None),
        }
    }

    fn ttl(&self) -> Duration {
        self.policy.auth.verifier_cache_ttl
    }

    /// The verifier of `role`, from cache or from PostgreSQL.
    pub async fn get(&self, role: &str, fresh: bool) -> Result<Arc<Verifier>, VerifierError> {
        if !fresh {
            if let Some(entry) = self.cache.get(role) {
                if entry.0.elapsed() < self.ttl() {
                    return Ok(entry.1.clone());
                }
            }
        }
        let client = self.client().await?;
        let row = match client
            .query_opt(&self.policy.auth.verifier_query, &[&role])
            .await
        {
            Ok(row) => row,
            Err(e) => {
                if let Ok(mut slot) = self.client.lock() {
                    *slot = None;
                }
                return Err(VerifierError::Query(e));
            }
        };
        let stored: Option<String> = row.and_then(|r| r.try_get(0).ok());
        let verifier = Arc::new(Verifier::parse(&stored.ok_or(VerifierError::Missing)?)?);
        self.cache
            .insert(role.to_owned(), (Instant::now(), verifier.clone()));
        Ok(verifier)
    }

    /// Drops the cached verifier of `role` (after a failed proof).
    pub fn forget(&self, role: &str) {
        self.cache.remove(role);
    }

    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, VerifierError> {
        let existing = self.client.lock().ok().and_then(|slot| slot.clone());
        if let Some(client) = existing.filter(|c| !c.is_closed()) {
            return Ok(client);
        }
        let client = Arc::new(admin::connect(&self.policy).await?);
        if let Ok(mut slot) = self.client.lock() {
            *slot = Some(client.clone());
        }
        Ok(client)
    }
}
