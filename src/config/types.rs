//! Serde types of the policy file. Every struct denies unknown keys so a typo
//! is an error, not a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Address the proxy listens on for application connections.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Upstream PostgreSQL, e.g. `postgres://user:pw@127.0.0.1:5432/app`.
    /// Host and port are where client sessions are relayed; user, password and
    /// database are the proxy's own credentials for the `cmk` registry.
    #[serde(default = "defaults::upstream")]
    pub upstream: String,
    /// TLS towards clients and towards PostgreSQL.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Key providers and key lifetimes.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Audit sinks.
    #[serde(default)]
    pub audit: AuditConfig,
    /// How the tenant of a session or row is found.
    #[serde(default)]
    pub tenant: TenantConfig,
    /// Tenants to seed into `cmk.tenants` (optional).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSeed>,
    /// Protected tables, keyed by `schema.table`.
    #[serde(default)]
    pub tables: BTreeMap<String, TablePolicy>,
    /// Server behaviour: shutdown, limits, logging.
    #[serde(default)]
    pub server: ServerConfig,
    /// Client authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The operator's HTTP endpoint: metrics, health, readiness, reload.
    #[serde(default)]
    pub admin: AdminConfig,
    /// What the metrics show.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// The admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `POST
/// /reload`). Off unless `listen` is set; it has no authentication, so
/// bind it to a loopback or private address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin endpoint, e.g. `127.0.0.1:9187`.
    pub listen: Option<SocketAddr>,
}

/// Metrics settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Label tenant-level series with the tenant id (one series per tenant
    /// in each such family); off: every tenant counts under `all`.
    #[serde(default)]
    pub tenant_labels: bool,
}

/// Client authentication. The proxy relays authentication to PostgreSQL;
/// SCRAM pass-through is needed only when TLS is terminated on both legs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `auto`: when the client and the upstream both use TLS and the server
    /// asks for SCRAM, verify the client against the role's SCRAM verifier
    /// and answer the server with the learned ClientKey (PgBouncer-style
    /// pass-through), because relaying would fail the server's
    /// channel-binding downgrade check. `off`: always relay.
    #[serde(default)]
    pub scram_passthrough: ScramPassthrough,
    /// Query returning the stored SCRAM verifier for role `$1`, run with
    /// the upstream URL's credentials (superuser, or a SECURITY DEFINER
    /// function as for PgBouncer's auth_query).
    #[serde(default = "defaults::verifier_query")]
    pub verifier_query: String,
    /// How long a looked-up verifier is reused.
    #[serde(default = "defaults::verifier_cache_ttl", with = "humantime_serde")]
    pub verifier_cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            scram_passthrough: ScramPassthrough::Auto,
            verifier_query: defaults::verifier_query(),
            verifier_cache_ttl: defaults::verifier_cache_ttl(),
        }
    }
}

/// Whether SCRAM pass-through is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScramPassthrough {
    /// When both legs use TLS.
    #[default]
    Auto,
    /// Never: authentication is always relayed.
    Off,
}

/// TLS settings for both legs of the proxy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate the proxy presents to clients. Without it, client
    /// SSLRequests are answered with `N` (no TLS).
    pub client: Option<ClientTls>,
    /// TLS towards PostgreSQL.
    #[serde(default)]
    pub upstream: UpstreamTls,
}

/// Server certificate and key (PEM files) presented to clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// TLS towards the upstream PostgreSQL.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// disable / prefer / require / verify-ca / verify-full, as libpq's sslmode.
    #[serde(default)]
    pub mode: UpstreamTlsMode,
    /// CA bundle (PEM) used by `verify-ca` and `verify-full`; the system
    /// roots when absent.
    pub ca: Option<PathBuf>,
    /// Name checked against the server certificate in `verify-full`
    /// (defaults to the upstream host).
    pub server_name: Option<String>,
    /// Client certificate chain (PEM) shown to PostgreSQL, as libpq's
    /// `sslcert`; needs `key`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`, as libpq's `sslkey`.
    pub key: Option<PathBuf>,
}

/// libpq-like sslmode for the upstream leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate.
    #[default]
    Prefer,
    /// Require TLS, without verifying the certificate.
    Require,
    /// Require TLS and verify the certificate chain, not the host name.
    VerifyCa,
    /// Require TLS and verify the certificate chain and host name.
    VerifyFull,
}

/// Key providers and DEK lifetimes (DESIGN section 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// How long an unwrapped DEK may be used before the KMS is asked again.
    #[serde(default = "defaults::approval_ttl", with = "humantime_serde")]
    pub approval_ttl: Duration,
    /// How long cached approvals may outlive an unreachable KMS (0 = never).
    #[serde(default, with = "humantime_serde")]
    pub max_stale: Duration,
    /// Age after which a DEK stops encrypting and a new epoch starts.
    #[serde(default = "defaults::dek_max_age", with = "humantime_serde")]
    pub dek_max_age: Duration,
    /// Number of cells after which a DEK stops encrypting.
    #[serde(default = "defaults::dek_max_cells")]
    pub dek_max_cells: u64,
    /// Named key providers, referenced by tenants.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            approval_ttl: defaults::approval_ttl(),
            max_stale: Duration::ZERO,
            dek_max_age: defaults::dek_max_age(),
            dek_max_cells: defaults::dek_max_cells(),
            providers: BTreeMap::new(),
        }
    }
}

/// One key provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// A local keyring file (development and tests).
    Local {
        /// Path of the keyring JSON file (mode 0600).
        path: PathBuf,
    },
    /// AWS KMS through the standard credential chain.
    AwsKms {
        /// AWS region, e.g. `eu-west-1`.
        region: Option<String>,
        /// Endpoint override (tests: a local moto server).
        endpoint: Option<String>,
        /// Named profile of the shared AWS config.
        profile: Option<String>,
    },
    /// A PKCS#11 token (HSM); a tenant's key ref is its AES key's label
    /// (or `id:HEX` for CKA_ID).
    Pkcs11 {
        /// Path of the vendor's PKCS#11 library.
        module: PathBuf,
        /// Label of the token holding the tenants' keys.
        token: String,
        /// File holding the token's user PIN.
        pin_file: Option<PathBuf>,
        /// Environment variable holding the user PIN (instead of `pin_file`).
        pin_env: Option<String>,
        /// Sessions opened at most at once (default 8).
        sessions: Option<usize>,
    },
    /// A KMIP 1.4+ server over TLS with a client certificate; a tenant's
    /// key ref is its AES key's Unique Identifier.
    Kmip {
        /// `host:port` of the server (usually port 5696).
        endpoint: String,
        /// CA certificate(s) (PEM) of the server.
        ca: PathBuf,
        /// The proxy's client certificate (PEM).
        client_cert: PathBuf,
        /// Its private key (PEM).
        client_key: PathBuf,
        /// Name checked in the server's certificate (default: endpoint host).
        server_name: Option<String>,
    },
    /// HashiCorp Vault / OpenBao Transit; a tenant's key ref is its
    /// Transit key name.
    VaultTransit {
        /// `https://vault:8200`.
        address: String,
        /// Transit mount path (default `transit`).
        mount: Option<String>,
        /// Namespace (Vault Enterprise, HCP).
        namespace: Option<String>,
        /// CA certificate (PEM) of Vault's TLS certificate.
        ca: Option<PathBuf>,
        /// `token` (default: `token_file` or VAULT_TOKEN), `approle` or `kubernetes`.
        auth: Option<String>,
        /// File holding the token (auth `token`).
        token_file: Option<PathBuf>,
        /// AppRole role id (auth `approle`).
        role_id: Option<String>,
        /// File holding the AppRole secret id.
        secret_id_file: Option<PathBuf>,
        /// Vault role (auth `kubernetes`).
        role: Option<String>,
        /// Service-account token file (default: the pod's).
        jwt_file: Option<PathBuf>,
        /// Auth mount path (default `approle` / `kubernetes`).
        auth_mount: Option<String>,
    },
    /// Google Cloud KMS; a tenant's key ref is its CryptoKey's name
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    GcpKms {
        /// Service-account JSON key file (default: GOOGLE_APPLICATION_CREDENTIALS,
        /// else the metadata server).
        credentials_file: Option<PathBuf>,
        /// API endpoint (default `https://cloudkms.googleapis.com`).
        endpoint: Option<String>,
        /// CA certificate (PEM) of the endpoint's TLS certificate.
        ca: Option<PathBuf>,
    },
    /// Azure Key Vault or Managed HSM; a tenant's key ref is its key's URL,
    /// `https://VAULT.vault.azure.net/keys/NAME[/VERSION]`.
    AzureKeyVault {
        /// `client-secret`, `workload-identity` or `managed-identity`
        /// (default: the first whose credentials are present, in that order).
        auth: Option<String>,
        /// Directory (tenant) id of the vendor's app (else `AZURE_TENANT_ID`).
        tenant_id: Option<String>,
        /// Application (client) id (else `AZURE_CLIENT_ID`); for managed
        /// identity, picks a user-assigned identity.
        client_id: Option<String>,
        /// File holding the client secret (else `AZURE_CLIENT_SECRET`).
        client_secret_file: Option<PathBuf>,
        /// Federated token file of workload identity (else
        /// `AZURE_FEDERATED_TOKEN_FILE`).
        federated_token_file: Option<PathBuf>,
        /// Microsoft Entra authority (else `AZURE_AUTHORITY_HOST`, else
        /// `https://login.microsoftonline.com`).
        authority_host: Option<String>,
        /// Managed identity token URL (default: the IMDS endpoint, or App
        /// Service's `IDENTITY_ENDPOINT`).
        identity_endpoint: Option<String>,
        /// `host[:port]`s accepted in key refs besides Azure's own vault
        /// domains: a private endpoint's name or a test server.
        #[serde(default)]
        allowed_hosts: Vec<String>,
        /// Token scope for `allowed_hosts` (default `https://vault.azure.net/.default`).
        scope: Option<String>,
        /// CA certificate (PEM) trusted besides the built-in public roots.
        ca: Option<PathBuf>,
    },
}

/// Audit configuration (DESIGN section 8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The main sink every event goes to.
    #[serde(default)]
    pub sink: AuditSink,
    /// Capacity of the in-memory queue in front of the sinks.
    #[serde(default = "defaults::audit_queue")]
    pub queue_capacity: usize,
    /// What happens when an HTTP sink's spool is full: `deny` (decrypts of
    /// the tenants whose events go there stop with KM007 until delivery
    /// resumes) or `allow` (events are dropped and counted).
    #[serde(default)]
    pub on_failure: AuditOnFailure,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sink: AuditSink::default(),
            queue_capacity: defaults::audit_queue(),
            on_failure: AuditOnFailure::default(),
        }
    }
}

/// What a full HTTP audit spool does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOnFailure {
    /// Fail closed: the tenants' decrypts stop until delivery resumes.
    #[default]
    Deny,
    /// Keep serving: events that do not fit are dropped and counted.
    Allow,
}

/// Where audit events are written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AuditSink {
    /// No main sink (per-tenant sinks still receive their events).
    None,
    /// Standard output.
    #[default]
    Stdout,
    /// Append JSON lines to a file.
    File {
        /// Path of the JSON-lines file.
        path: PathBuf,
    },
    /// A file per tenant in a directory (`<dir>/<tenant>.jsonl`).
    TenantFiles {
        /// Directory of the per-tenant files.
        dir: PathBuf,
    },
    /// POST events to an HTTP endpoint: batches of JSON lines (one event:
    /// one JSON object), retried with backoff and jitter, queued in a
    /// bounded spool while the endpoint is down. Each event has an `id`.
    Http {
        /// Endpoint URL.
        url: String,
        /// Most events per POST (default 100).
        #[serde(default)]
        batch_size: Option<usize>,
        /// Directory of the on-disk spool (default: a spool in memory,
        /// lost at a restart).
        #[serde(default)]
        spool_dir: Option<PathBuf>,
        /// Largest spool, in bytes (default 64 MiB).
        #[serde(default)]
        spool_max_bytes: Option<u64>,
    },
}

/// Tenant resolution (DESIGN section 5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Session setting that names the tenant (`SET cmk.tenant_id = 'acme'`).
    #[serde(default = "defaults::session_setting")]
    pub session_setting: String,
    /// Database user → tenant, for applications with a user per tenant.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// Look up the tenant of the target rows for UPDATEs that name none.
    #[serde(default = "defaults::yes")]
    pub resolve_updates: bool,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            session_setting: defaults::session_setting(),
            users: BTreeMap::new(),
            resolve_updates: true,
        }
    }
}

/// A tenant seeded into `cmk.tenants`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSeed {
    /// Provider name from `keys.providers`.
    pub provider: String,
    /// Key reference within the provider (ARN, alias, keyring entry).
    pub key: String,
    /// Optional per-tenant audit sink.
    pub audit_sink: Option<AuditSink>,
}

/// Policy of one protected table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablePolicy {
    /// Column holding the tenant id of each row.
    pub tenant_column: String,
    /// jsonb column holding `{dek_id: base64(edek)}` for the row.
    #[serde(default = "defaults::edek_column")]
    pub edek_column: String,
    /// Show the EDEK column to clients (hidden by default).
    #[serde(default)]
    pub show_edek: bool,
    /// `enforcing` (default) or `migrating` (legacy plaintext readable).
    #[serde(default)]
    pub mode: TableMode,
    /// Protected columns and their declared plaintext types.
    pub columns: BTreeMap<String, ColumnPolicy>,
}

impl TablePolicy {
    /// True for a column the policy names: protected, the EDEK column, the
    /// tenant column, or the blind index (`<col>_bidx`) of a protected one.
    pub fn names_column(&self, column: &str) -> bool {
        column == self.tenant_column
            || column == self.edek_column
            || self.columns.contains_key(column)
            || column
                .strip_suffix("_bidx")
                .is_some_and(|base| self.columns.contains_key(base))
    }
}

/// Whether legacy plaintext cells are tolerated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableMode {
    /// Every cell must be an envelope.
    #[default]
    Enforcing,
    /// Cells without the envelope header are served as legacy plaintext.
    Migrating,
}

/// One protected column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnPolicy {
    /// Declared plaintext type presented to clients.
    #[serde(rename = "type")]
    pub ty: DeclaredType,
    /// Optional searchable equality through a blind index.
    #[serde(default)]
    pub search: SearchMode,
}

/// Plaintext types a protected column may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeclaredType {
    /// `text`
    Text,
    /// `varchar`
    Varchar,
    /// `int2`
    Int2,
    /// `int4`
    Int4,
    /// `int8`
    Int8,
    /// `numeric`
    Numeric,
    /// `float8`
    Float8,
    /// `bool`
    Bool,
    /// `date`
    Date,
    /// `timestamp`
    Timestamp,
    /// `timestamptz`
    Timestamptz,
    /// `uuid`
    Uuid,
    /// `jsonb`
    Jsonb,
    /// `bytea`
    Bytea,
}

impl DeclaredType {
    /// PostgreSQL type OID of the declared type.
    pub fn oid(self) -> u32 {
        match self {
            Self::Text => 25,
            Self::Varchar => 1043,
            Self::Int2 => 21,
            Self::Int4 => 23,
            Self::Int8 => 20,
            Self::Numeric => 1700,
            Self::Float8 => 701,
            Self::Bool => 16,
            Self::Date => 1082,
            Self::Timestamp => 1114,
            Self::Timestamptz => 1184,
            Self::Uuid => 2950,
            Self::Jsonb => 3802,
            Self::Bytea => 17,
        }
    }

    /// PostgreSQL type OID of an array of the declared type.
    pub fn array_oid(self) -> u32 {
        match self {
            Self::Text => 1009,
            Self::Varchar => 1015,
            Self::Int2 => 1005,
            Self::Int4 => 1007,
            Self::Int8 => 1016,
            Self::Numeric => 1231,
            Self::Float8 => 1022,
            Self::Bool => 1000,
            Self::Date => 1182,
            Self::Timestamp => 1115,
            Self::Timestamptz => 1185,
            Self::Uuid => 2951,
            Self::Jsonb => 3807,
            Self::Bytea => 1001,
        }
    }

    /// The declared type with this PostgreSQL type OID, if it is one.
    pub fn from_oid(oid: u32) -> Option<Self> {
        use DeclaredType as T;
        [
            T::Text,
            T::Varchar,
            T::Int2,
            T::Int4,
            T::Int8,
            T::Numeric,
            T::Float8,
            T::Bool,
            T::Date,
            T::Timestamp,
            T::Timestamptz,
            T::Uuid,
            T::Jsonb,
            T::Bytea,
        ]
        .into_iter()
        .find(|t| t.oid() == oid)
    }

    /// SQL name of the declared type.
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Varchar => "varchar",
            Self::Int2 => "int2",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Numeric => "numeric",
            Self::Float8 => "float8",
            Self::Bool => "bool",
            Self::Date => "date",
            Self::Timestamp => "timestamp",
            Self::Timestamptz => "timestamptz",
            Self::Uuid => "uuid",
            Self::Jsonb => "jsonb",
            Self::Bytea => "bytea",
        }
    }
}

/// Searchable-encryption mode of a column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SearchMode {
    /// No search: only whole-value reads and writes.
    #[default]
    None,
    /// Equality through a blind index column `<col>_bidx`.
    Equality,
}

/// Server behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// How long sessions may finish after SIGTERM/SIGINT.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Largest protocol message accepted from a client, in bytes.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// Timeout for connecting to the upstream.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `human` or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Log filter (`RUST_LOG` syntax, e.g. `info,cmk_proxy=debug`);
    /// unset: `RUST_LOG`, else `info`. Reloadable.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Threads that run sessions, each with its own sessions (`None`: one
    /// per CPU). Fewer than the CPUs when PostgreSQL or the application
    /// share the machine.
    #[serde(default)]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// How often the catalog map (protected views, writable tables) is
    /// reloaded, besides after DDL that passes through the proxy: DDL run
    /// directly against PostgreSQL is seen within this interval.
    #[serde(default = "defaults::catalog_refresh", with = "humantime_serde")]
    pub catalog_refresh: Duration,
    /// Run simple-query writes as the proxy's own named prepared
    /// statements (parsed once per server connection, the cells sent in
    /// binary). Off: the literals and cells are spliced into the SQL text.
    /// Turn it off when the upstream is a transaction-pooling PgBouncer
    /// without `max_prepared_statements`, where named statements do not
    /// follow a session from one server connection to the next.
    #[serde(default = "defaults::yes")]
    pub prepare_simple_writes: bool,
    /// Run an unnamed extended-protocol statement on protected tables that
    /// a session sends again (drivers that never name their statements:
    /// libpq's `PQexecParams`, psycopg, node-postgres) as the proxy's own
    /// named statement, parsed once per server connection. Off: every
    /// execution is parsed and planned again by PostgreSQL. Turn it off
    /// with `prepare_simple_writes` behind a transaction-pooling upstream.
    #[serde(default = "defaults::yes")]
    pub prepare_repeated_statements: bool,
    /// Plans kept in each of the two shared plan caches (Parse plans by
    /// SQL, simple queries by shape); the least useful are evicted first.
    #[serde(default = "defaults::plan_cache_size")]
    pub plan_cache_size: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: defaults::shutdown_timeout(),
            max_message_size: defaults::max_message_size(),
            connect_timeout: defaults::connect_timeout(),
            log_format: LogFormat::Human,
            log_level: None,
            worker_threads: None,
            catalog_refresh: defaults::catalog_refresh(),
            plan_cache_size: defaults::plan_cache_size(),
            prepare_simple_writes: true,
            prepare_repeated_statements: true,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Default values, in one place.
pub mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub(crate) fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6432))
    }
    pub(crate) fn upstream() -> String {
        "postgres://127.0.0.1:5432/postgres".to_owned()
    }
    pub(crate) fn approval_ttl() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn dek_max_age() -> Duration {
        Duration::from_secs(30 * 24 * 3600)
    }
    /// 2^32 cells per DEK keeps random 96-bit nonces far inside
    /// AES-GCM-SIV's bounds.
    pub(crate) fn dek_max_cells() -> u64 {
        1 << 32
    }
    pub(crate) fn audit_queue() -> usize {
        65_536
    }
    pub(crate) fn audit_batch_size() -> usize {
        100
    }
    pub(crate) fn audit_spool_max_bytes() -> u64 {
        64 << 20
    }
    pub(crate) fn session_setting() -> String {
        "cmk.tenant_id".to_owned()
    }
    pub(crate) fn edek_column() -> String {
        "cmk_edek".to_owned()
    }
    pub(crate) fn yes() -> bool {
        true
    }
    pub(crate) fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    /// Default cap on a single client message (1 GiB, as PostgreSQL).
    pub(crate) fn max_message_size() -> usize {
        1 << 30
    }
    pub(crate) fn plan_cache_size() -> usize {
        4096
    }

    pub(crate) fn catalog_refresh() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn verifier_query() -> String {
        "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1".to_owned()
    }
    pub(crate) fn verifier_cache_ttl() -> Duration {
        Duration::from_secs(60)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            listen: defaults::listen(),
            upstream: defaults::upstream(),
            tls: TlsConfig::default(),
            keys: KeysConfig::default(),
            audit: AuditConfig::default(),
            tenant: TenantConfig::default(),
            tenants: BTreeMap::new(),
            tables: BTreeMap::new(),
            server: ServerConfig::default(),
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}
