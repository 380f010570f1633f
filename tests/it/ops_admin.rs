//! The admin endpoint: `/metrics` scraped during an encrypted run and read
//! with a strict Prometheus text parser, tenant labels only when asked for,
//! `/healthz`, and `/readyz` following PostgreSQL stopped and started again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::encryption::{assert_refused, rows, EncryptedSetup};
use crate::common::free_port;

pub const SCHEMA: &str = "CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, notes bytea, cmk_edek jsonb)";

/// `admin:` YAML on a free port, and that port.
pub fn admin_yaml() -> (String, u16) {
    let port = free_port();
    (format!("admin:\n  listen: 127.0.0.1:{port}\n"), port)
}

/// Status and body of an HTTP request to the admin endpoint.
pub async fn admin(port: u16, method: &str, path: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}{path}");
    let request = match method {
        "POST" => client.post(&url),
        _ => client.get(&url),
    };
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// One sample: metric name and its labels, sorted.
type SampleKey = (String, Vec<(String, String)>);

/// Parses Prometheus / OpenMetrics text strictly: every line is a comment
/// of a known kind or `name{labels} value`; anything else fails the test.
pub fn parse_metrics(text: &str) -> HashMap<SampleKey, f64> {
    let mut samples = HashMap::new();
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap_or_default();
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT" | "EOF"),
                "unknown comment: {line}"
            );
            if kind == "TYPE" {
                let ty = comment.rsplit(' ').next().unwrap_or_default();
                assert!(
                    matches!(
                        ty,
                        "counter" | "gauge" | "histogram" | "info" | "summary" | "unknown"
                    ),
                    "unknown type: {line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                parse_labels(
                    rest.strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line}")),
                    line,
                ),
            ),
            None => (series, Vec::new()),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "duplicate sample: {line}"
        );
    }
    samples
}

fn parse_labels(mut rest: &str, line: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label: {line}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape: {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    labels.sort();
    labels
}

/// The value of one sample (0 when absent).
pub fn sample(samples: &HashMap<SampleKey, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    samples
        .get(&(name.to_owned(), labels))
        .copied()
        .unwrap_or(0.0)
}

/// Scrapes and parses `/metrics`.
pub async fn scrape(port: u16) -> HashMap<SampleKey, f64> {
    let (status, text) = admin(port, "GET", "/metrics").await;
    assert_eq!(status, 200, "{text}");
    parse_metrics(&text)
}

pub async fn encrypted_with_admin(extra: &str) -> (EncryptedSetup, u16) {
    let (yaml, port) = admin_yaml();
    let setup = EncryptedSetup::start_configured(
        SCHEMA,
        "public.patients",
        &["ssn: {type: text}"],
        "",
        "",
        &format!("{yaml}{extra}"),
    )
    .await;
    (setup, port)
}

/// Writes, reads and a refusal through the proxy.
async fn some_work(setup: &EncryptedSetup) {
    let app = setup.app().await;
    app.batch_execute(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789'), ('acme', '987-65-4321')",
    )
    .await
    .expect("insert");
    let read = rows(&app, "SELECT ssn FROM patients ORDER BY id").await;
    assert_eq!(read.len(), 2);
    app.query("SELECT ssn FROM patients WHERE id = $1", &[&1i32])
        .await
        .expect("extended read");
    assert_refused(
        &app,
        &["SELECT id FROM patients ORDER BY ssn"],
        "KM003",
        "ssn",
    )
    .await;
}

#[tokio::test]
async fn metrics_scraped_during_an_encrypted_run_parse_as_prometheus_text() {
    let (setup, port) = encrypted_with_admin("").await;
    let before = scrape(port).await;
    some_work(&setup).await;
    // The proxy's session of some_work is still open when scraped.
    let _open = setup.app().await;
    let after = scrape(port).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(a > b, "{name}{labels:?}: {b} -> {a}");
    };
    grew("cmk_proxy_client_connections_total", &[("tls", "false")]);
    grew("cmk_proxy_upstream_connections_total", &[]);
    grew("cmk_proxy_queries_total", &[("protocol", "simple")]);
    grew("cmk_proxy_queries_total", &[("protocol", "extended")]);
    grew("cmk_proxy_refusals_total", &[("sqlstate", "KM003")]);
    grew("cmk_proxy_cells_sealed_total", &[]);
    grew("cmk_proxy_cells_opened_total", &[]);
    grew("cmk_proxy_approval_cache_hits_total", &[]);
    grew("cmk_proxy_audit_events_total", &[("sink", "file")]);
    assert!(sample(&after, "cmk_proxy_client_connections_open", &[]) >= 1.0);
    assert!(
        sample(&after, "cmk_proxy_approval_cache_misses_total", &[]) >= 1.0,
        "the first use of a tenant misses"
    );
    let kms_ok: f64 = after
        .iter()
        .filter(|((name, labels), _)| {
            name == "cmk_proxy_kms_calls_total"
                && labels.contains(&("provider".to_owned(), "local".to_owned()))
                && labels.contains(&("outcome".to_owned(), "ok".to_owned()))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(kms_ok >= 1.0, "no KMS call counted");
    assert!(
        after
            .keys()
            .any(|(name, _)| name == "cmk_proxy_kms_call_duration_seconds_bucket"),
        "no KMS latency histogram"
    );
    assert!(
        sample(
            &after,
            "cmk_proxy_tenants_approved_total",
            &[("tenant", "all")]
        ) >= 1.0,
        "tenant ids are not labels by default"
    );
    assert!(
        !after
            .keys()
            .any(|(_, labels)| labels.iter().any(|(k, v)| k == "tenant" && v == "acme")),
        "a tenant id became a label without metrics.tenant_labels"
    );
    assert_eq!(
        sample(
            &after,
            "cmk_proxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

#[tokio::test]
async fn tenant_labels_appear_only_when_configured() {
    let (setup, port) = encrypted_with_admin("metrics:\n  tenant_labels: true\n").await;
    some_work(&setup).await;
    let after = scrape(port).await;
    assert!(
        sample(
            &after,
            "cmk_proxy_tenants_approved_total",
            &[("tenant", "acme")]
        ) >= 1.0,
        "{after:?}"
    );
}

#[tokio::test]
async fn admin_endpoint_is_off_unless_configured_and_refuses_unknown_paths() {
    let (setup, port) = encrypted_with_admin("").await;
    assert_eq!(admin(port, "GET", "/nope").await.0, 404);
    assert_eq!(admin(port, "POST", "/metrics").await.0, 405);
    let (status, body) = admin(port, "GET", "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"alive\"}"));
    assert!(setup.proxy.log_text().contains("admin endpoint listening"));
    // Without admin.listen there is no admin endpoint.
    let plain = crate::common::start_proxy(&setup.pg, "");
    assert!(!plain.log_text().contains("admin endpoint listening"));
}

/// Polls `/readyz` until its status is `want` (the limit guards a hang).
async fn readyz_until(port: u16, want: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = admin(port, "GET", "/readyz").await;
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        if status == want {
            return json;
        }
        assert!(Instant::now() < deadline, "still {status}: {json}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn readyz_follows_postgresql_stopped_and_started_again() {
    let (setup, port) = encrypted_with_admin("").await;
    some_work(&setup).await;
    let ready = readyz_until(port, 200).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"]["upstream"]["ok"], true, "{ready}");
    assert_eq!(ready["checks"]["registry"]["ok"], true, "{ready}");
    assert_eq!(ready["checks"]["policy"]["ok"], true, "{ready}");
    assert_eq!(ready["kms"]["local"], "ok", "{ready}");

    setup.pg.stop().expect("stop PostgreSQL");
    let (status, body) = admin(port, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let down: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(down["status"], "not ready", "{down}");
    assert_eq!(down["checks"]["upstream"]["ok"], false, "{down}");
    assert_eq!(down["checks"]["registry"]["ok"], false, "{down}");
    // Alive all along.
    assert_eq!(admin(port, "GET", "/healthz").await.0, 200);

    setup.pg.start_again().expect("start PostgreSQL again");
    let back = readyz_until(port, 200).await;
    assert_eq!(back["checks"]["upstream"]["ok"], true, "{back}");
    assert_eq!(back["checks"]["registry"]["ok"], true, "{back}");
    // And it serves again.
    let app = setup.app().await;
    assert_eq!(
        rows(&app, "SELECT ssn FROM patients ORDER BY id")
            .await
            .len(),
        2
    );
}
