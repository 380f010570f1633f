//! The process's Prometheus metrics: one registry, counted from every layer
//! through small calls (`metrics().cells_sealed.inc()`), rendered as text by
//! the admin endpoint. It knows numbers and label names, nothing of SQL,
//! sockets or keys; no value, key or statement text ever becomes a label.
//!
//! Counting is always on (an uncontended atomic add); serving `/metrics`
//! is what `admin.listen` turns on. Tenant ids become labels only with
//! `metrics.tenant_labels: true`, because every tenant adds a series to
//! each tenant-labelled family.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label of the tenant-labelled families: the tenant, or `all` when
/// `metrics.tenant_labels` is off.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// Tenant id, or `all`.
    pub tenant: String,
}

/// Whether a client connection uses TLS.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabel {
    /// `true` or `false`.
    pub tls: bool,
}

/// Protocol of a query: `simple` (Query) or `extended` (Execute).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// `simple`, `extended` or `function_call`.
    pub protocol: &'static str,
}

/// SQLSTATE of a refusal or failure sent to a client.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SqlstateLabel {
    /// Five-character SQLSTATE (KM001..KM006).
    pub sqlstate: &'static str,
}

/// One KMS call's provider, operation and outcome class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLabels {
    /// Provider name from `keys.providers`.
    pub provider: String,
    /// `wrap`, `unwrap` or `check`.
    pub operation: &'static str,
    /// `ok`, `denied`, `transient`, … (the part before `:` of the audit outcome).
    pub outcome: String,
}

/// Provider and operation of the KMS latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsOpLabels {
    /// Provider name.
    pub provider: String,
    /// `wrap`, `unwrap` or `check`.
    pub operation: &'static str,
}

/// An audit sink, named by its kind (`file`, `http`, …) and whether it is
/// the main sink or a tenant's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// `stdout`, `file`, `tenant-files`, `http`.
    pub sink: &'static str,
}

/// Outcome of a catalog or configuration reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tenant_labels: AtomicBool,
    /// Provider name → outcome of its last call (readiness shows them).
    kms_last: Mutex<BTreeMap<String, String>>,
    /// Client connections open now.
    pub client_connections_open: Gauge,
    /// Client connections accepted, by TLS.
    pub client_connections: Family<TlsLabel, Counter>,
    /// Upstream connections opened for sessions.
    pub upstream_connections: Counter,
    /// Upstream connections that failed (connect, TLS, startup).
    pub upstream_errors: Counter,
    /// Queries by protocol.
    queries: Family<ProtocolLabel, Counter>,
    /// The `simple` series of `queries` (hot path: no label lookup).
    pub queries_simple: Counter,
    /// The `extended` series of `queries`.
    pub queries_extended: Counter,
    /// The `function_call` series of `queries`.
    pub queries_function_call: Counter,
    /// Statements refused by the proxy, by SQLSTATE.
    pub refusals: Family<SqlstateLabel, Counter>,
    /// Cells encrypted.
    pub cells_sealed: Counter,
    /// Cells decrypted.
    pub cells_opened: Counter,
    /// Cells that could not be shown, by SQLSTATE.
    pub decrypt_failures: Family<SqlstateLabel, Counter>,
    /// KMS calls by provider, operation and outcome.
    pub kms_calls: Family<KmsLabels, Counter>,
    /// KMS call latency by provider and operation.
    pub kms_latency: Family<KmsOpLabels, Histogram, fn() -> Histogram>,
    /// Approval-cache lookups that found a usable DEK.
    pub approval_hits: Counter,
    /// Approval-cache lookups that did not.
    pub approval_misses: Counter,
    /// DEKs dropped from the approval cache (expiry, revocation).
    pub approval_evictions: Counter,
    /// Tenant approvals by the KMS (per tenant with `tenant_labels`).
    pub tenants_approved: Family<TenantLabel, Counter>,
    /// Tenant denials by the KMS (per tenant with `tenant_labels`).
    pub tenants_denied: Family<TenantLabel, Counter>,
    /// Audit events handed to a sink.
    pub audit_emitted: Family<SinkLabel, Counter>,
    /// Audit deliveries tried again after a failure.
    pub audit_retried: Family<SinkLabel, Counter>,
    /// Audit events written to the on-disk spool.
    pub audit_spooled: Family<SinkLabel, Counter>,
    /// Audit events lost (queue or spool full with `on_failure: allow`).
    pub audit_dropped: Family<SinkLabel, Counter>,
    /// Catalog map reloads by outcome.
    pub catalog_reloads: Family<OutcomeLabel, Counter>,
    /// Configuration reloads by outcome.
    pub config_reloads: Family<OutcomeLabel, Counter>,
}

fn kms_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let queries = Family::<ProtocolLabel, Counter>::default();
        let query = |protocol| queries.get_or_create_owned(&ProtocolLabel { protocol });
        let (queries_simple, queries_extended, queries_function_call) =
            (query("simple"), query("extended"), query("function_call"));
        let m = Metrics {
            registry: Registry::with_prefix("cmk_proxy"),
            tenant_labels: AtomicBool::new(false),
            kms_last: Mutex::new(BTreeMap::new()),
            client_connections_open: Gauge::default(),
            client_connections: Family::default(),
            upstream_connections: Counter::default(),
            upstream_errors: Counter::default(),
            queries,
            queries_simple,
            queries_extended,
            queries_function_call,
            refusals: Family::default(),
            cells_sealed: Counter::default(),
            cells_opened: Counter::default(),
            decrypt_failures: Family::default(),
            kms_calls: Family::default(),
            kms_latency: Family::new_with_constructor(kms_histogram as fn() -> Histogram),
            approval_hits: Counter::default(),
            approval_misses: Counter::default(),
            approval_evictions: Counter::default(),
            tenants_approved: Family::default(),
            tenants_denied: Family::default(),
            audit_emitted: Family::default(),
            audit_retried: Family::default(),
            audit_spooled: Family::default(),
            audit_dropped: Family::default(),
            catalog_reloads: Family::default(),
            config_reloads: Family::default(),
        };
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "client_connections_open",
            "Client connections open now",
            self.client_connections_open.clone(),
        );
        r.register(
            "client_connections",
            "Client connections accepted",
            self.client_connections.clone(),
        );
        r.register(
            "upstream_connections",
            "Upstream connections opened for client sessions",
            self.upstream_connections.clone(),
        );
        r.register(
            "upstream_connection_errors",
            "Upstream connections that could not be opened",
            self.upstream_errors.clone(),
        );
        r.register("queries", "Queries by protocol", self.queries.clone());
        r.register(
            "refusals",
            "Statements refused by the proxy, by SQLSTATE",
            self.refusals.clone(),
        );
        r.register("cells_sealed", "Cells encrypted", self.cells_sealed.clone());
        r.register("cells_opened", "Cells decrypted", self.cells_opened.clone());
        r.register(
            "decrypt_failures",
            "Protected cells that could not be shown, by SQLSTATE",
            self.decrypt_failures.clone(),
        );
        r.register(
            "kms_calls",
            "KMS calls by provider, operation and outcome",
            self.kms_calls.clone(),
        );
        r.register_with_unit(
            "kms_call_duration",
            "KMS call latency by provider and operation",
            Unit::Seconds,
            self.kms_latency.clone(),
        );
        r.register(
            "approval_cache_hits",
            "Approval-cache lookups that found a usable data key",
            self.approval_hits.clone(),
        );
        r.register(
            "approval_cache_misses",
            "Approval-cache lookups that had to ask the registry or the KMS",
            self.approval_misses.clone(),
        );
        r.register(
            "approval_cache_evictions",
            "Data keys dropped from the approval cache",
            self.approval_evictions.clone(),
        );
        r.register(
            "tenants_approved",
            "Tenant key approvals by the tenant's KMS",
            self.tenants_approved.clone(),
        );
        r.register(
            "tenants_denied",
            "Tenant key denials by the tenant's KMS",
            self.tenants_denied.clone(),
        );
        r.register(
            "audit_events",
            "Audit events handed to a sink",
            self.audit_emitted.clone(),
        );
        r.register(
            "audit_events_retried",
            "Audit deliveries tried again after a failure",
            self.audit_retried.clone(),
        );
        r.register(
            "audit_events_spooled",
            "Audit events written to the on-disk spool",
            self.audit_spooled.clone(),
        );
        r.register(
            "audit_events_dropped",
            "Audit events lost",
            self.audit_dropped.clone(),
        );
        r.register(
            "catalog_reloads",
            "Catalog map reloads by outcome",
            self.catalog_reloads.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads by outcome",
            self.config_reloads.clone(),
        );
        r.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        self
    }

    /// Turns tenant ids as labels on or off (`metrics.tenant_labels`).
    pub fn set_tenant_labels(&self, on: bool) {
        self.tenant_labels.store(on, Ordering::Relaxed);
    }

    /// The label of `tenant` in tenant-labelled families.
    pub fn tenant(&self, tenant: &str) -> TenantLabel {
        let tenant = if self.tenant_labels.load(Ordering::Relaxed) {
            tenant.to_owned()
        } else {
            "all".to_owned()
        };
        TenantLabel { tenant }
    }

    /// Counts one KMS call.
    pub fn kms_call(&self, provider: &str, operation: &'static str, outcome: &str, secs: f64) {
        let class = outcome.split(':').next().unwrap_or(outcome);
        self.kms_calls
            .get_or_create(&KmsLabels {
                provider: provider.to_owned(),
                operation,
                outcome: class.to_owned(),
            })
            .inc();
        self.kms_latency
            .get_or_create(&KmsOpLabels {
                provider: provider.to_owned(),
                operation,
            })
            .observe(secs);
        let mut last = self.kms_last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(provider) {
            Some(seen) if seen == class => {}
            Some(seen) => class.clone_into(seen),
            None => {
                last.insert(provider.to_owned(), class.to_owned());
            }
        }
    }

    /// Each KMS provider's last call outcome (`ok`, `denied`, `transient`, …).
    pub fn kms_last_outcomes(&self) -> BTreeMap<String, String> {
        self.kms_last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a refusal sent to a client.
    pub fn refusal(&self, sqlstate: &'static str) {
        self.refusals
            .get_or_create(&SqlstateLabel { sqlstate })
            .inc();
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_label_is_all_unless_enabled() {
        let m = Metrics::new();
        assert_eq!(m.tenant("acme").tenant, "all");
        m.set_tenant_labels(true);
        assert_eq!(m.tenant("acme").tenant, "acme");
    }

    #[test]
    fn render_names_every_family_once() {
        let m = Metrics::new();
        m.kms_call("aws", "unwrap", "denied:disabled", 0.01);
        m.refusal("KM003");
        let text = m.render();
        assert!(text.contains(
            "cmk_proxy_kms_calls_total{provider=\"aws\",operation=\"unwrap\",outcome=\"denied\"} 1"
        ));
        assert!(text.contains("cmk_proxy_refusals_total{sqlstate=\"KM003\"} 1"));
        assert!(text.contains("cmk_proxy_build_info{version="));
        assert!(text.ends_with("# EOF\n"));
    }
}
