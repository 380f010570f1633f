//! The DEK registry in PostgreSQL (`cmk.tenants`, `cmk.data_keys`): one
//! reconnecting tokio-postgres connection using the `policy.upstream`
//! credentials and `tls.upstream`. It stores wrapped keys only, never a DEK.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use uuid::Uuid;

use super::KeyError;
use crate::config::{Policy, UpstreamAddr, UpstreamTls, UpstreamTlsMode};

/// Whether a tenant may use its key (`cmk.tenants.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantStatus {
    /// Reads and writes allowed (subject to the KMS).
    Active,
    /// Administratively disabled: treated exactly like a revoked key.
    Disabled,
}

impl TenantStatus {
    /// The value stored in `cmk.tenants.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
        }
    }

    fn parse(s: &str) -> Self {
        // The CHECK constraint allows only the two values; anything else is
        // treated as disabled (fail closed).
        if s == "active" {
            Self::Active
        } else {
            Self::Disabled
        }
    }
}

/// One row of `cmk.tenants`.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    /// Tenant id, as used in rows and in the AAD.
    pub tenant_id: String,
    /// Provider name from `keys.providers`.
    pub provider: String,
    /// Key reference within the provider.
    pub key_ref: String,
    /// Active or disabled.
    pub status: TenantStatus,
    /// Optional per-tenant audit sink (JSON form of `config::AuditSink`).
    pub audit_sink: Option<serde_json::Value>,
    /// When the tenant was added.
    pub created_at: Option<DateTime<Utc>>,
}

/// One row of `cmk.data_keys`: a wrapped DEK of one tenant epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct DataKeyRecord {
    /// Key id, written into every cell header.
    pub dek_id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// Provider that wrapped the EDEK.
    pub provider: String,
    /// Key reference that wrapped the EDEK.
    pub key_ref: String,
    /// The wrapped DEK (not secret).
    pub edek: Vec<u8>,
    /// Epoch number, 1-based, unique per tenant.
    pub epoch: i32,
    /// When the DEK was created.
    pub created_at: DateTime<Utc>,
    /// When it stopped encrypting (still decrypts).
    pub retired_at: Option<DateTime<Utc>>,
}

/// Connection settings and the live connection to the registry.
pub struct Registry {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    authority: String,
    conn: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("upstream", &self.authority)
            .finish_non_exhaustive()
    }
}

const TENANT_COLS: &str = "tenant_id, provider, key_ref, status, audit_sink, created_at";
const DEK_COLS: &str = "dek_id, tenant_id, provider, key_ref, edek, epoch, created_at, retired_at";

fn pg_err(what: &str) -> impl Fn(tokio_postgres::Error) -> KeyError + '_ {
    move |e| KeyError::Registry(format!("{what}: {e}"))
}

impl Registry {
    /// Prepares (does not open) the registry connection described by the policy.
    pub fn new(policy: &Policy) -> Result<Registry, KeyError> {
        let addr = UpstreamAddr::parse(&policy.upstream)
            .map_err(|e| KeyError::Registry(format!("upstream: {e}")))?;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&addr.host)
            .port(addr.port)
            .user(addr.user.as_deref().unwrap_or("postgres"))
            .application_name("cmk-proxy-registry")
            .connect_timeout(policy.server.connect_timeout);
        if let Some(pw) = &addr.password {
            config.password(pw);
        }
        if let Some(db) = &addr.dbname {
            config.dbname(db);
        }
        if let Some(options) = &addr.options {
            config.options(options);
        }
        let up = &policy.tls.upstream;
        config.ssl_mode(match up.mode {
            UpstreamTlsMode::Disable => SslMode::Disable,
            UpstreamTlsMode::Prefer => SslMode::Prefer,
            UpstreamTlsMode::Require | UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull => {
                SslMode::Require
            }
        });
        if let (UpstreamTlsMode::VerifyFull, Some(name)) = (up.mode, &up.server_name) {
            // Connect to the configured address, verify the certificate for `name`.
            if let Ok(ip) = addr.host.parse::<std::net::IpAddr>() {
                config.host(name).hostaddr(ip);
            } else {
                return Err(KeyError::Registry(
                    "tls.upstream.server_name needs an IP address as upstream host".into(),
                ));
            }
        }
        Ok(Registry {
            config,
            tls: upstream_tls(up)?,
            authority: addr.authority(),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Opens a new connection of its own (migrations, transactions).
    pub async fn connect_dedicated(&self) -> Result<Client, KeyError> {
        self.connect_notifying(None).await
    }

    /// A dedicated connection whose NOTIFY messages (for channels it
    /// LISTENs on) are sent to the returned receiver; the receiver ends
    /// when the connection does.
    pub async fn connect_listening(
        &self,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), KeyError> {
        let (send, receive) = mpsc::unbounded_channel();
        let client = self.connect_notifying(Some(send)).await?;
        Ok((client, receive))
    }

    async fn connect_notifying(
        &self,
        notify: Option<mpsc::UnboundedSender<Notification>>,
    ) -> Result<Client, KeyError> {
        match self.connect_with(&self.config, notify.clone()).await {
            // libpq's `prefer` tries again without TLS when the TLS attempt
            // fails (a handshake it cannot complete, or a server that
            // refuses the encrypted session); tokio-postgres does not.
            Err(e) if self.config.get_ssl_mode() == SslMode::Prefer && self.tls.is_some() => {
                let mut plain = self.config.clone();
                plain.ssl_mode(SslMode::Disable);
                tracing::warn!(upstream = %self.authority, error = %e, "registry TLS attempt failed; retrying without TLS (prefer)");
                self.connect_with(&plain, notify)
                    .await
                    .map_err(|again| KeyError::Registry(format!("{e}; and without TLS: {again}")))
            }
            other => other,
        }
    }

    async fn connect_with(
        &self,
        config: &tokio_postgres::Config,
        notify: Option<mpsc::UnboundedSender<Notification>>,
    ) -> Result<Client, KeyError> {
        let unreachable = |e: tokio_postgres::Error| {
            KeyError::Registry(format!("registry {}: {}", self.authority, with_causes(&e)))
        };
        let client = match &self.tls {
            None => {
                let (client, conn) = config.connect(NoTls).await.map_err(unreachable)?;
                tokio::spawn(drive(conn, notify));
                client
            }
            Some(tls) => {
                let (client, conn) = config.connect(tls.clone()).await.map_err(unreachable)?;
                tokio::spawn(drive(conn, notify));
                client
            }
        };
        Ok(client)
    }

    /// The shared connection, reopened when it has broken.
    pub async fn client(&self) -> Result<Arc<Client>, KeyError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.connect_dedicated().await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Inserts a tenant unless it exists; returns whether it was inserted.
    pub async fn add_tenant(
        &self,
        tenant_id: &str,
        provider: &str,
        key_ref: &str,
        audit_sink: Option<&serde_json::Value>,
    ) -> Result<bool, KeyError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO cmk.tenants (tenant_id, provider, key_ref, audit_sink) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO NOTHING",
                &[&tenant_id, &provider, &key_ref, &audit_sink],
            )
            .await
            .map_err(pg_err("adding tenant"))?;
        Ok(n == 1)
    }

    /// Every tenant, ordered by id.
    pub async fn list_tenants(&self) -> Result<Vec<TenantRecord>, KeyError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {TENANT_COLS} FROM cmk.tenants ORDER BY tenant_id"),
                &[],
            )
            .await
            .map_err(pg_err("listing tenants"))?;
        Ok(rows.iter().map(tenant_from_row).collect())
    }

    /// One tenant, if it exists.
    pub async fn tenant(&self, tenant_id: &str) -> Result<Option<TenantRecord>, KeyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {TENANT_COLS} FROM cmk.tenants WHERE tenant_id = $1"),
                &[&tenant_id],
            )
            .await
            .map_err(pg_err("reading tenant"))?;
        Ok(row.as_ref().map(tenant_from_row))
    }

    /// Sets a tenant's status; returns false when the tenant does not exist.
    pub async fn set_tenant_status(
        &self,
        tenant_id: &str,
        status: TenantStatus,
    ) -> Result<bool, KeyError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE cmk.tenants SET status = $2 WHERE tenant_id = $1",
                &[&tenant_id, &status.as_str()],
            )
            .await
            .map_err(pg_err("updating tenant status"))?;
        Ok(n == 1)
    }

    /// The DEK that encrypts now: highest epoch not retired.
    pub async fn current_data_key(
        &self,
        tenant_id: &str,
    ) -> Result<Option<DataKeyRecord>, KeyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {DEK_COLS} FROM cmk.data_keys WHERE tenant_id = $1 AND retired_at IS NULL \
                     ORDER BY epoch DESC LIMIT 1"
                ),
                &[&tenant_id],
            )
            .await
            .map_err(pg_err("reading current data key"))?;
        Ok(row.as_ref().map(dek_from_row))
    }

    /// The tenant's first DEK (lowest epoch): the root of its blind-index key,
    /// which must stay the same across rotations.
    pub async fn first_data_key(&self, tenant_id: &str) -> Result<Option<DataKeyRecord>, KeyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {DEK_COLS} FROM cmk.data_keys WHERE tenant_id = $1 ORDER BY epoch LIMIT 1"
                ),
                &[&tenant_id],
            )
            .await
            .map_err(pg_err("reading first data key"))?;
        Ok(row.as_ref().map(dek_from_row))
    }

    /// One data key by id.
    pub async fn data_key(&self, dek_id: Uuid) -> Result<Option<DataKeyRecord>, KeyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {DEK_COLS} FROM cmk.data_keys WHERE dek_id = $1"),
                &[&dek_id],
            )
            .await
            .map_err(pg_err("reading data key"))?;
        Ok(row.as_ref().map(dek_from_row))
    }

    /// Every data key of a tenant, by epoch.
    pub async fn data_keys(&self, tenant_id: &str) -> Result<Vec<DataKeyRecord>, KeyError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {DEK_COLS} FROM cmk.data_keys WHERE tenant_id = $1 ORDER BY epoch"
                ),
                &[&tenant_id],
            )
            .await
            .map_err(pg_err("listing data keys"))?;
        Ok(rows.iter().map(dek_from_row).collect())
    }

    /// Claims the next epoch for a new DEK, only while the tenant has no
    /// current (unretired) DEK. One statement, one snapshot: a replica racing
    /// us either sees our row (and inserts nothing) or computes the same
    /// epoch and hits the unique (tenant_id, epoch) key. Returns the epoch
    /// claimed, or `None` when another replica's DEK stands.
    pub async fn insert_data_key(
        &self,
        dek_id: Uuid,
        tenant_id: &str,
        provider: &str,
        key_ref: &str,
        edek: &[u8],
    ) -> Result<Option<i32>, KeyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO cmk.data_keys (dek_id, tenant_id, provider, key_ref, edek, epoch) \
                 SELECT $1, $2, $3, $4, $5, COALESCE(MAX(epoch), 0) + 1 \
                 FROM cmk.data_keys WHERE tenant_id = $2 \
                 HAVING NOT COALESCE(bool_or(retired_at IS NULL), false) \
                 ON CONFLICT (tenant_id, epoch) DO NOTHING RETURNING epoch",
                &[&dek_id, &tenant_id, &provider, &key_ref, &edek],
            )
            .await
            .map_err(pg_err("storing data key"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Marks a DEK retired (it stops encrypting). Returns false when it was
    /// already retired, i.e. someone else rolled the epoch.
    pub async fn retire_data_key(&self, dek_id: Uuid) -> Result<bool, KeyError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE cmk.data_keys SET retired_at = now() WHERE dek_id = $1 AND retired_at IS NULL",
                &[&dek_id],
            )
            .await
            .map_err(pg_err("retiring data key"))?;
        Ok(n == 1)
    }

    /// Replaces the EDEKs of a tenant and its key_ref in one transaction on a
    /// dedicated connection (the shared one must never carry a transaction).
    pub async fn store_rewrapped(
        &self,
        tenant_id: &str,
        key_ref: &str,
        edeks: &[(Uuid, Vec<u8>)],
    ) -> Result<(), KeyError> {
        let mut client = self.connect_dedicated().await?;
        let tx = client.transaction().await.map_err(pg_err("rewrap"))?;
        for (dek_id, edek) in edeks {
            let n = tx
                .execute(
                    "UPDATE cmk.data_keys SET edek = $3, key_ref = $2 WHERE dek_id = $1 AND tenant_id = $4",
                    &[dek_id, &key_ref, edek, &tenant_id],
                )
                .await
                .map_err(pg_err("rewrap"))?;
            if n != 1 {
                return Err(KeyError::Registry(format!(
                    "rewrap: data key {dek_id} vanished"
                )));
            }
        }
        tx.execute(
            "UPDATE cmk.tenants SET key_ref = $2 WHERE tenant_id = $1",
            &[&tenant_id, &key_ref],
        )
        .await
        .map_err(pg_err("rewrap"))?;
        tx.commit().await.map_err(pg_err("rewrap commit"))
    }
}

/// Runs a connection until it ends, handing its notifications to `notify`.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(notification))) => {
                if let Some(notify) = &notify {
                    let _ = notify.send(notification);
                }
            }
            Some(Ok(AsyncMessage::Notice(notice))) => {
                tracing::info!("{}: {}", notice.severity(), notice.message());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "registry connection closed");
                return;
            }
            None => return,
        }
    }
}

/// The error and its causes: tokio-postgres says only "error performing
/// TLS handshake"; the certificate problem is in the source.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn tenant_from_row(r: &tokio_postgres::Row) -> TenantRecord {
    TenantRecord {
        tenant_id: r.get(0),
        provider: r.get(1),
        key_ref: r.get(2),
        status: TenantStatus::parse(r.get(3)),
        audit_sink: r.get(4),
        created_at: r.get(5),
    }
}

fn dek_from_row(r: &tokio_postgres::Row) -> DataKeyRecord {
    DataKeyRecord {
        dek_id: r.get(0),
        tenant_id: r.get::<_, Option<String>>(1).unwrap_or_default(),
        provider: r.get::<_, Option<String>>(2).unwrap_or_default(),
        key_ref: r.get::<_, Option<String>>(3).unwrap_or_default(),
        edek: r.get(4),
        epoch: r.get(5),
        created_at: r.get::<_, Option<DateTime<Utc>>>(6).unwrap_or_default(),
        retired_at: r.get(7),
    }
}

/// The rustls connector for the registry connection, or `None` for
/// `disable`: the same TLS settings as the session connections
/// (`tls::upstream_client_config`).
pub fn upstream_tls(
    tls: &UpstreamTls,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, KeyError> {
    let config = crate::tls::upstream_client_config(tls)
        .map_err(|e| KeyError::Registry(format!("TLS setup: {e}")))?;
    Ok(config.map(|c| tokio_postgres_rustls::MakeRustlsConnect::new(Arc::unwrap_or_clone(c))))
}
