//! Cold approvals of many tenants through the real PKCS#11 (SoftHSM2) and
//! KMIP (PyKMIP) providers: wall time and KMS calls per tenant, for the
//! first write (approval `check` + first DEK `wrap`) and for a restarted
//! proxy reading (approval `check` + `unwrap`), through `KeyService` against
//! a real registry in a throwaway PostgreSQL. Prints numbers, asserts none.
//!
//! Run: `cargo bench --bench approval_providers` (TENANTS, default 1000;
//! CONCURRENCY, default 16 tenants approved at once; PROVIDERS, default
//! `pkcs11,kmip`).
//!
//! With `HOLD_KEYS=DIR` it measures nothing: it starts the one provider
//! PROVIDERS names, creates TENANTS keys, writes `DIR/provider.yaml` (the
//! `keys.providers` entry), `DIR/tenants.yaml` (one `PREFIXi: {provider,
//! key}` line per tenant, PREFIX from TENANT_PREFIX, i from 1) and
//! `DIR/env` (what the proxy's environment needs), then `DIR/ready`, and
//! keeps the token or server alive until its stdin closes. The encrypted
//! benchmark runs on it with `PROVIDER=pkcs11|kmip`.

#[path = "../../tests/it/support/pykmip.rs"]
mod pykmip;
#[path = "../../tests/it/support/softhsm.rs"]
mod softhsm;

use std::time::{Duration, Instant};

use cmk_proxy::audit::Audit;
use cmk_proxy::config::{Policy, ProviderConfig, TenantSeed, UpstreamTlsMode};
use cmk_proxy::keys::KeyService;
use cmk_proxy::localpg::{LocalPostgres, LocalPostgresOptions};
use futures_util::{stream, StreamExt};
use uuid::Uuid;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One phase's numbers.
struct Phase {
    wall: Duration,
    calls: u64,
}

async fn approve_all(
    policy: &Policy,
    tenants: &[String],
    concurrency: usize,
    ids: Option<&[Uuid]>,
) -> (Phase, Vec<Uuid>) {
    let keys = KeyService::connect(policy, Audit::disabled())
        .await
        .expect("connect the key service");
    let before = keys.kms_calls();
    let started = Instant::now();
    let results: Vec<(usize, Uuid)> = stream::iter(tenants.iter().enumerate())
        .map(|(i, t)| {
            let keys = &keys;
            async move {
                let id = match ids {
                    None => keys.write_key(t).await.expect("write key").dek.dek_id,
                    Some(ids) => {
                        keys.read_key(t, ids[i], None)
                            .await
                            .expect("read key")
                            .dek_id
                    }
                };
                (i, id)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut out = vec![Uuid::nil(); tenants.len()];
    for (i, id) in results {
        out[i] = id;
    }
    let calls = keys.kms_calls() - before;
    (Phase { wall, calls }, out)
}

fn policy_for(
    pg: &LocalPostgres,
    provider: ProviderConfig,
    keys: &[String],
) -> (Policy, Vec<String>) {
    let mut policy = Policy {
        upstream: pg.url("scram_user", "scram_pw", "app"),
        ..Policy::default()
    };
    policy.tls.upstream.mode = UpstreamTlsMode::Disable;
    policy.keys.approval_ttl = Duration::from_secs(3600);
    policy.keys.providers.insert("p".into(), provider);
    let tenants: Vec<String> = (0..keys.len()).map(|i| format!("tenant-{i}")).collect();
    for (t, key) in tenants.iter().zip(keys) {
        policy.tenants.insert(
            t.clone(),
            TenantSeed {
                provider: "p".into(),
                key: key.clone(),
                audit_sink: None,
            },
        );
    }
    (policy, tenants)
}

fn report(
    name: &str,
    tenants: usize,
    concurrency: usize,
    setup: Duration,
    first: &Phase,
    cold: &Phase,
) {
    let per = |p: &Phase| p.calls as f64 / tenants as f64;
    let rate = |p: &Phase| tenants as f64 / p.wall.as_secs_f64();
    println!(
        "\n### {name}: {tenants} tenants, {concurrency} at once (key setup {:.1} s)\n",
        setup.as_secs_f64()
    );
    println!("| phase | wall time | tenants/s | KMS calls | calls per tenant |");
    println!("|---|---|---|---|---|");
    for (label, p) in [
        ("first write (check + wrap)", first),
        ("restarted proxy, first read (check + unwrap)", cold),
    ] {
        println!(
            "| {label} | {:.2} s | {:.0} | {} | {:.2} |",
            p.wall.as_secs_f64(),
            rate(p),
            p.calls,
            per(p)
        );
    }
}

/// The `HOLD_KEYS` mode (see the module documentation).
fn hold_keys(dir: &std::path::Path, which: &str, tenants: usize) {
    let prefix = std::env::var("TENANT_PREFIX").unwrap_or_default();
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
    };
    let tenant_lines = |keys: &[String]| -> String {
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                format!(
                    "\"{prefix}{}\": {{provider: {which}, key: \"{key}\"}}\n",
                    i + 1
                )
            })
            .collect()
    };
    // Both live until the end of this function.
    let mut _hsm = None;
    let mut _kmip = None;
    match which {
        "pkcs11" => {
            let hsm = softhsm::SoftHsm::start();
            let labels: Vec<String> = (1..=tenants).map(|i| format!("key-{i}")).collect();
            for l in &labels {
                hsm.create_key(l);
            }
            write("provider.yaml", hsm.provider_yaml());
            write("tenants.yaml", tenant_lines(&labels));
            let conf = std::env::var("SOFTHSM2_CONF").unwrap_or_default();
            write("env", format!("SOFTHSM2_CONF={conf}\n"));
            _hsm = Some(hsm);
        }
        "kmip" => {
            let kmip = pykmip::PyKmip::start();
            let uids = kmip.create_keys(tenants);
            write("provider.yaml", kmip.provider_yaml());
            write("tenants.yaml", tenant_lines(&uids));
            write("env", String::new());
            _kmip = Some(kmip);
        }
        other => panic!("HOLD_KEYS: PROVIDERS must be pkcs11 or kmip, not {other}"),
    }
    write("ready", String::new());
    // Until the benchmark closes our stdin.
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from argv.
    let tenants = env_or("TENANTS", 1000);
    if let Some(dir) = std::env::var_os("HOLD_KEYS") {
        let which = std::env::var("PROVIDERS").unwrap_or_default();
        hold_keys(std::path::Path::new(&dir), &which, tenants);
        return;
    }
    let concurrency = env_or("CONCURRENCY", 16).max(1);
    let which = std::env::var("PROVIDERS").unwrap_or_else(|_| "pkcs11,kmip".into());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!("approval benchmark: TENANTS={tenants} CONCURRENCY={concurrency} PROVIDERS={which}");
    println!(
        "machine: {} CPUs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    if which.contains("pkcs11") {
        let pg = LocalPostgres::start(LocalPostgresOptions::default()).expect("PostgreSQL");
        let hsm = softhsm::SoftHsm::start();
        let started = Instant::now();
        let labels: Vec<String> = (0..tenants).map(|i| format!("key-{i}")).collect();
        for l in &labels {
            hsm.create_key(l);
        }
        let setup = started.elapsed();
        let provider = ProviderConfig::Pkcs11 {
            module: softhsm::MODULE.into(),
            token: softhsm::TOKEN.into(),
            pin_file: Some(hsm.pin_file()),
            pin_env: None,
            sessions: Some(concurrency),
        };
        let (policy, names) = policy_for(&pg, provider, &labels);
        let (first, ids) = rt.block_on(approve_all(&policy, &names, concurrency, None));
        let (cold, _) = rt.block_on(approve_all(&policy, &names, concurrency, Some(&ids)));
        report(
            "PKCS#11, SoftHSM2 2.6",
            tenants,
            concurrency,
            setup,
            &first,
            &cold,
        );
    }
    if which.contains("kmip") {
        let pg = LocalPostgres::start(LocalPostgresOptions::default()).expect("PostgreSQL");
        let kmip = pykmip::PyKmip::start();
        let started = Instant::now();
        let uids = kmip.create_keys(tenants);
        assert_eq!(uids.len(), tenants);
        let setup = started.elapsed();
        let provider = ProviderConfig::Kmip {
            endpoint: kmip.endpoint(),
            ca: kmip.file("ca.pem"),
            client_cert: kmip.file("client.pem"),
            client_key: kmip.file("client.key"),
            server_name: None,
        };
        let (policy, names) = policy_for(&pg, provider, &uids);
        let (first, ids) = rt.block_on(approve_all(&policy, &names, concurrency, None));
        let (cold, _) = rt.block_on(approve_all(&policy, &names, concurrency, Some(&ids)));
        report(
            "KMIP, PyKMIP 0.10 server",
            tenants,
            concurrency,
            setup,
            &first,
            &cold,
        );
    }
}
