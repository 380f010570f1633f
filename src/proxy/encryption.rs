//! The encryption side of a session, shared by all sessions: key service,
//! catalog map and audit. It turns a simple query into the query that
//! reaches PostgreSQL (ciphertext instead of plaintext, EDEK and blind index
//! set) and opens the protected cells of result rows. It knows statements
//! and cells; the session decides when to call it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dashmap::DashMap;
use uuid::Uuid;

use crate::audit::{Audit, AuditEvent};
use crate::catalog::{self, CatalogMap};
use crate::config::{DeclaredType, Policy, TableMode};
use crate::crypto::{self, CellAad};
use crate::keys::{KeyError, KeyService, WriteKey};
use crate::rewrite::{
    self, quote_literal, render_with_literals, Rejection, StatementPlan, TenantSource, ValueSource,
    WritePlan,
};
use crate::values;

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
    /// The query sets (or resets) the session tenant.
    pub set_tenant: Option<Option<String>>,
    /// The query changes the schema: refresh the catalog map afterwards.
    pub ddl: bool,
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
    policy: Arc<Policy>,
    keys: KeyService,
    audit: Audit,
    catalog: RwLock<Arc<CatalogMap>>,
    dek_tenants: DashMap<Uuid, String>,
}

impl Encryption {
    /// Starts audit, connects the key service (migrating the `cmk` schema and
    /// seeding tenants) and loads the catalog map.
    pub async fn start(policy: Arc<Policy>) -> Result<Arc<Self>, EncryptionError> {
        let audit = Audit::start(&policy.audit)?;
        let keys = KeyService::connect(&policy, audit.clone()).await?;
        let client = super::admin::connect(&policy).await?;
        let map = catalog::load_map(&client, &policy).await?;
        tracing::info!(protected_columns = map.len(), "catalog map loaded");
        Ok(Arc::new(Self {
            policy,
            keys,
            audit,
            catalog: RwLock::new(Arc::new(map)),
            dek_tenants: DashMap::new(),
        }))
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
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

    /// Reloads the catalog map (after DDL).
    pub async fn refresh_catalog(&self) {
        let loaded = async {
            let client = super::admin::connect(&self.policy).await.ok()?;
            catalog::load_map(&client, &self.policy).await.ok()
        }
        .await;
        match loaded {
            Some(map) => {
                if let Ok(mut slot) = self.catalog.write() {
                    *slot = Arc::new(map);
                }
            }
            None => tracing::warn!("catalog map refresh failed; keeping the previous map"),
        }
    }

    /// Emits a rejection audit event.
    pub fn audit_rejection(&self, rejection: &Rejection, session: &SessionInfo<'_>) {
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
        for ((tenant, table), (columns, rows)) in batch.counts {
            self.audit.emit(AuditEvent::DecryptBatch {
                tenant,
                table,
                columns,
                rows,
                fingerprint: batch.fingerprint.clone(),
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
        let analysis = rewrite::analyze(&self.policy, sql, 0)?;
        let mut out = QueryRewrite::default();
        let mut tenant = session.tenant.map(str::to_owned);
        let mut rendered = Vec::with_capacity(analysis.statements.len());
        let needs_rewrite = analysis.needs_rewrite();
        // The original statements, re-parsed, render the untouched ones.
        let originals = if needs_rewrite {
            sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
                .map_err(|_| Rejection::unsupported("", None, "SQL that cmk-proxy cannot parse"))?
        } else {
            Vec::new()
        };
        for (index, plan) in analysis.statements.into_iter().enumerate() {
            match plan {
                StatementPlan::SetTenant(t) => {
                    tenant = t.clone();
                    out.set_tenant = Some(t);
                }
                StatementPlan::Ddl => out.ddl = true,
                StatementPlan::Write(plan) => {
                    let current = SessionInfo {
                        tenant: tenant.as_deref(),
                        ..*session
                    };
                    rendered.push(self.encrypt_literals(&plan, &current).await?);
                    continue;
                }
                StatementPlan::Untouched | StatementPlan::Read => {}
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

    /// Resolves the tenant of a row, refusing disagreements with the session.
    fn row_tenant(
        &self,
        source: &TenantSource,
        plan: &WritePlan,
        session: &SessionInfo<'_>,
    ) -> Result<String, Rejection> {
        let km004 = |message: String| Rejection {
            sqlstate: rewrite::KM004,
            table: Some(plan.table.clone()),
            column: Some(plan.tenant_column.clone()),
            message,
        };
        match source {
            TenantSource::Literal(t) => match session.tenant {
                Some(s) if s != t => Err(km004(format!(
                    "cmk-proxy: row tenant '{t}' of {} disagrees with the session tenant '{s}'",
                    plan.table
                ))),
                _ => Ok(t.clone()),
            },
            TenantSource::Session => session.tenant.map(str::to_owned).ok_or_else(|| {
                km004(format!(
                    "cmk-proxy: cannot determine the tenant of a write to {}: set {} in the statement or SET {} first",
                    plan.table, plan.tenant_column, self.policy.tenant.session_setting
                ))
            }),
            TenantSource::Param(_) => Err(km004(format!(
                "cmk-proxy: the tenant of a write to {} comes from a parameter, which a simple query cannot have",
                plan.table
            ))),
        }
    }

    async fn encrypt_literals(
        &self,
        plan: &WritePlan,
        session: &SessionInfo<'_>,
    ) -> Result<String, Rejection> {
        let mut literals: HashMap<usize, String> = HashMap::new();
        for row in &plan.rows {
            let tenant = self.row_tenant(&row.tenant, plan, session)?;
            if row.cells.is_empty() {
                continue;
            }
            let key = self
                .keys
                .write_key(&tenant)
                .await
                .map_err(|e| key_rejection(&e, &plan.table))?;
            // The index key is the tenant's, not the epoch's: equality
            // search keeps finding rows written before a rotation.
            let index_key = if row.cells.iter().any(|c| c.bidx_param.is_some()) {
                Some(
                    self.keys
                        .blind_index_key(&tenant)
                        .await
                        .map_err(|e| key_rejection(&e, &plan.table))?,
                )
            } else {
                None
            };
            for cell in &row.cells {
                let ValueSource::Literal(text) = &cell.value else {
                    return Err(Rejection::unsupported(
                        &plan.table,
                        Some(&cell.column),
                        "a parameter in a simple query",
                    ));
                };
                let (ciphertext, bidx) = seal_value(
                    &key,
                    &tenant,
                    &plan.table,
                    &cell.column,
                    cell.ty,
                    text.as_bytes(),
                    cell.bidx_param.and(index_key.as_deref()),
                )
                .map_err(|e| invalid_value(&plan.table, &cell.column, &e))?;
                literals.insert(cell.target_param, bytea_literal(&ciphertext));
                if let (Some(n), Some(index)) = (cell.bidx_param, bidx) {
                    literals.insert(n, bytea_literal(&index));
                }
            }
            if let Some(n) = row.edek_param {
                literals.insert(n, quote_literal(&edek_json(&key)));
            }
        }
        if let Some(n) = plan.tenant_pin_param {
            let tenant = session.tenant.unwrap_or_default();
            literals.insert(n, quote_literal(tenant));
        }
        Ok(render_with_literals(&plan.statement, &literals))
    }

    /// Opens one protected cell and returns its canonical plaintext.
    /// `session_tenant`: cells of other tenants are refused (KM006).
    pub async fn open_cell(
        &self,
        table: &str,
        column: &str,
        cell: &[u8],
        session_tenant: Option<&str>,
    ) -> Result<(String, Vec<u8>), CellFailure> {
        let integrity = |tenant: Option<String>, what: &str| CellFailure {
            sqlstate: "KM005",
            message: format!("cmk-proxy: integrity failure: a cell of {table}.{column} {what}"),
            tenant,
        };
        if !crypto::is_envelope(cell) {
            let migrating = self
                .policy
                .tables
                .get(table)
                .is_some_and(|t| t.mode == TableMode::Migrating);
            if migrating {
                return Ok((String::new(), cell.to_vec()));
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
        if let Some(session) = session_tenant {
            if session != tenant {
                return Err(CellFailure {
                    sqlstate: "KM006",
                    message: format!(
                        "cmk-proxy: cross-tenant access refused: a cell of {table}.{column} belongs to another tenant than the session tenant '{session}'"
                    ),
                    tenant: Some(session.to_owned()),
                });
            }
        }
        let key = self
            .keys
            .read_key(&tenant, dek_id, None)
            .await
            .map_err(|e| CellFailure {
                sqlstate: e.sqlstate(),
                message: format!("cmk-proxy: cannot read {table}.{column}: {e}"),
                tenant: Some(tenant.clone()),
            })?;
        let aad = CellAad {
            tenant_id: &tenant,
            table,
            column,
        };
        let plaintext = key.open(&aad, cell).map_err(|_| {
            integrity(
                Some(tenant.clone()),
                "failed to decrypt (tampered, or moved from another row, column or tenant)",
            )
        })?;
        Ok((tenant, plaintext))
    }

    /// The tenant a DEK belongs to (the registry is authoritative; cached).
    async fn tenant_of_dek(&self, dek_id: Uuid) -> Result<Option<String>, KeyError> {
        if let Some(t) = self.dek_tenants.get(&dek_id) {
            return Ok(Some(t.clone()));
        }
        let Some(record) = self.keys.registry().data_key(dek_id).await? else {
            return Ok(None);
        };
        self.dek_tenants.insert(dek_id, record.tenant_id.clone());
        Ok(Some(record.tenant_id))
    }
}

/// Per-statement decryption counts for the audit log.
#[derive(Debug, Default)]
pub struct DecryptBatch {
    /// (tenant, table) → (columns, rows).
    pub counts: HashMap<(String, String), (Vec<String>, u64)>,
    /// Statement fingerprint.
    pub fingerprint: String,
}

impl DecryptBatch {
    /// Counts one decrypted row of `tenant` in `table` with `columns`.
    pub fn add(&mut self, tenant: &str, table: &str, columns: &[String]) {
        let entry = self
            .counts
            .entry((tenant.to_owned(), table.to_owned()))
            .or_insert_with(|| (columns.to_vec(), 0));
        entry.1 += 1;
    }

    /// True when nothing was decrypted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Encrypts one plaintext (text form) into a cell, and its blind index.
fn seal_value(
    key: &WriteKey,
    tenant: &str,
    table: &str,
    column: &str,
    ty: DeclaredType,
    text: &[u8],
    index_key: Option<&crypto::BlindIndexKey>,
) -> Result<(Vec<u8>, Option<Vec<u8>>), values::ValueError> {
    let canonical = values::canonical_text(ty, text)?;
    let aad = CellAad {
        tenant_id: tenant,
        table,
        column,
    };
    let cell = key.dek.seal(&aad, canonical.as_bytes());
    let index = index_key.map(|k| crypto::blind_index(k, canonical.as_bytes()).to_vec());
    Ok((cell, index))
}

/// `{"<dek_id>": "<base64 edek>"}`
fn edek_json(key: &WriteKey) -> String {
    let mut map = serde_json::Map::new();
    map.insert(
        key.dek.dek_id.to_string(),
        serde_json::Value::String(B64.encode(&key.edek.0)),
    );
    serde_json::Value::Object(map).to_string()
}

fn bytea_literal(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(4 + bytes.len() * 2);
    out.push_str("'\\x");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('\'');
    out
}

fn key_rejection(e: &KeyError, table: &str) -> Rejection {
    Rejection {
        sqlstate: e.sqlstate(),
        table: Some(table.to_owned()),
        column: None,
        message: format!("cmk-proxy: cannot write {table}: {e}"),
    }
}

fn invalid_value(table: &str, column: &str, e: &values::ValueError) -> Rejection {
    Rejection {
        sqlstate: "22P02",
        table: Some(table.to_owned()),
        column: Some(column.to_owned()),
        message: format!("cmk-proxy: {table}.{column}: {e}"),
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
