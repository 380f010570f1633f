//! Approval-cache hit latency: `KeyService::read_key` / `write_key` for a
//! tenant whose DEK is cached and approved (the per-cell hot path), against
//! a real registry in a throwaway PostgreSQL and the local keyring.
//! Run: `cargo bench --bench approval`.

use std::time::Duration;

use cmk_proxy::audit::Audit;
use cmk_proxy::config::{Policy, ProviderConfig, TenantSeed, UpstreamTlsMode};
use cmk_proxy::keys::KeyService;
use cmk_proxy::kms::Keyring;
use cmk_proxy::localpg::{LocalPostgres, LocalPostgresOptions};
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;

const TENANTS: usize = 1000;

fn bench(c: &mut Criterion) {
    let pg = LocalPostgres::start(LocalPostgresOptions {
        tls: false,
        ..LocalPostgresOptions::default()
    })
    .expect("start PostgreSQL");
    let dir = tempfile::tempdir().expect("temp dir");
    let keyring = dir.path().join("keyring.json");
    let mut ring = Keyring::load_or_empty(&keyring).expect("keyring");
    let mut policy = Policy {
        upstream: pg.url("scram_user", "scram_pw", "app"),
        ..Policy::default()
    };
    policy.tls.upstream.mode = UpstreamTlsMode::Disable;
    policy.keys.approval_ttl = Duration::from_secs(3600);
    policy.keys.providers.insert(
        "local".into(),
        ProviderConfig::Local {
            path: keyring.clone(),
        },
    );
    for i in 0..TENANTS {
        let t = format!("tenant-{i}");
        ring.create_key(&t).expect("create key");
        policy.tenants.insert(
            t.clone(),
            TenantSeed {
                provider: "local".into(),
                key: t,
                audit_sink: None,
            },
        );
    }
    ring.save().expect("save keyring");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (keys, ids) = rt.block_on(async {
        let keys = KeyService::connect(&policy, Audit::disabled())
            .await
            .expect("connect");
        let mut ids = Vec::new();
        for i in 0..TENANTS {
            let w = keys
                .write_key(&format!("tenant-{i}"))
                .await
                .expect("write key");
            ids.push(w.dek.dek_id);
        }
        (keys, ids)
    });
    let calls = keys.kms_calls();
    let _guard = rt.enter();

    let mut g = c.benchmark_group("approval_cache_hit");
    g.bench_function("read_key", |b| {
        b.iter(|| {
            keys.read_key("tenant-7", ids[7], None)
                .now_or_never()
                .expect("a hit completes without waiting")
                .expect("approved")
        })
    });
    let names: Vec<String> = (0..TENANTS).map(|i| format!("tenant-{i}")).collect();
    let mut i = 0usize;
    g.bench_function("read_key_1000_tenants_round_robin", |b| {
        b.iter(|| {
            i = (i + 1) % TENANTS;
            keys.read_key(&names[i], ids[i], None)
                .now_or_never()
                .expect("a hit completes without waiting")
                .expect("approved")
        })
    });
    g.bench_function("write_key", |b| {
        b.iter(|| {
            keys.write_key("tenant-7")
                .now_or_never()
                .expect("a hit completes without waiting")
                .expect("approved")
        })
    });
    g.finish();
    assert_eq!(keys.kms_calls(), calls, "hits must not call the KMS");
}

criterion_group!(benches, bench);
criterion_main!(benches);
