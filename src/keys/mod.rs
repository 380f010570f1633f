//! DEK registry, approval cache and rotation (DESIGN section 2).
//! Owns which DEK a tenant encrypts with, when a DEK may be used (the KMS
//! approval lease) and the `cmk` schema; knows no SQL rewriting or sockets.

mod approval;
mod migrate;
mod registry;
mod retry;
mod service;

pub use approval::{ApprovalCache, ApprovedDek};
pub use migrate::{ddl_script, migrate, Migration, MIGRATIONS, MIGRATION_LOCK_KEY};
pub use registry::{upstream_tls, DataKeyRecord, Registry, TenantRecord, TenantStatus};
pub use service::{KeyService, RotateOutcome, WriteKey};

/// Why a key could not be provided. Messages never contain key bytes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The tenant's key is disabled, destroyed or access is denied (or the
    /// tenant is disabled in `cmk.tenants`).
    #[error("key of tenant '{tenant}' is revoked: {detail}")]
    Revoked {
        /// Tenant.
        tenant: String,
        /// What the KMS or registry said.
        detail: String,
    },
    /// The tenant's KMS cannot be reached and no usable approval is cached.
    #[error("key service of tenant '{tenant}' is unavailable: {detail}")]
    Unavailable {
        /// Tenant.
        tenant: String,
        /// Last error.
        detail: String,
    },
    /// The tenant is not in `cmk.tenants`.
    #[error("unknown tenant '{tenant}'")]
    UnknownTenant {
        /// Tenant.
        tenant: String,
    },
    /// A wrapped key does not belong to this tenant or was rejected as
    /// invalid ciphertext by the KMS: one cell's key, not the tenant, is bad.
    #[error("data key {dek_id} cannot be used for tenant '{tenant}': {detail}")]
    Integrity {
        /// Tenant the caller named.
        tenant: String,
        /// Key id from the cell header.
        dek_id: uuid::Uuid,
        /// Why.
        detail: String,
    },
    /// The registry (PostgreSQL) failed, or the key configuration is wrong.
    #[error("key registry: {0}")]
    Registry(String),
}

impl KeyError {
    /// SQLSTATE for the client-facing ErrorResponse (DESIGN section 6).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::Revoked { .. } => "KM001",
            Self::Unavailable { .. } => "KM002",
            Self::UnknownTenant { .. } => "KM004",
            Self::Integrity { .. } => "KM005",
            // system_error: the proxy's own registry is broken.
            Self::Registry(_) => "58000",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_follow_the_design() {
        let t = || "acme".to_owned();
        assert_eq!(
            KeyError::Revoked {
                tenant: t(),
                detail: String::new()
            }
            .sqlstate(),
            "KM001"
        );
        assert_eq!(
            KeyError::Unavailable {
                tenant: t(),
                detail: String::new()
            }
            .sqlstate(),
            "KM002"
        );
        assert_eq!(KeyError::UnknownTenant { tenant: t() }.sqlstate(), "KM004");
        let i = KeyError::Integrity {
            tenant: t(),
            dek_id: uuid::Uuid::nil(),
            detail: String::new(),
        };
        assert_eq!(i.sqlstate(), "KM005");
    }
}
