//! The approval cache against a real PostgreSQL, the local keyring and a
//! real moto server: single flight, the revocation bound, KMS outages and the
//! max_stale grace, and crypto-shredding.

use crate::support::moto;
use crate::support::pg as support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmk_proxy::audit::Audit;
use cmk_proxy::config::Policy;
use cmk_proxy::crypto::{CellAad, Dek};
use cmk_proxy::keys::{migrate, KeyError, KeyService, Registry};
use cmk_proxy::kms::{
    AwsKmsProvider, Edek, KeyContext, KeyProvider, KmsError, LocalProvider, Providers,
};
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

fn aad(tenant: &str) -> CellAad<'_> {
    CellAad {
        tenant_id: tenant,
        table: "public.patients",
        column: "notes",
    }
}

/// The real local provider, counting each operation.
#[derive(Default)]
struct Counts {
    wrap: AtomicU64,
    unwrap: AtomicU64,
    check: AtomicU64,
}

struct Counting {
    inner: Arc<dyn KeyProvider>,
    counts: Arc<Counts>,
}

#[async_trait::async_trait]
impl KeyProvider for Counting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        self.counts.wrap.fetch_add(1, Ordering::SeqCst);
        self.inner.wrap(key_ref, ctx, dek).await
    }
    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        self.counts.unwrap.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(key_ref, ctx, edek).await
    }
    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.counts.check.fetch_add(1, Ordering::SeqCst);
        self.inner.check_key(key_ref).await
    }
}

/// A key service with explicit providers: migrates and adds `tenants`
/// (tenant, provider, key_ref) first.
async fn service(
    policy: &Policy,
    providers: Providers,
    tenants: &[(&str, &str, &str)],
) -> KeyService {
    let registry = Registry::new(policy).unwrap();
    migrate(&registry.connect_dedicated().await.unwrap())
        .await
        .unwrap();
    for (t, p, k) in tenants {
        registry.add_tenant(t, p, k, None).await.unwrap();
    }
    KeyService::from_parts(registry, providers, &policy.keys, Audit::disabled())
}

fn local(env: &KeyEnv) -> Arc<dyn KeyProvider> {
    Arc::new(LocalProvider::open(&env.keyring).unwrap())
}

async fn poll_until<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_cold_reads_make_one_unwrap_call() {
    let env = key_env(&["acme"], Duration::from_secs(60));
    let writer = service(
        &env.policy,
        Providers::from([("local".to_owned(), local(&env))]),
        &[("acme", "local", "acme")],
    )
    .await;
    let w = writer.write_key("acme").await.unwrap();
    let cell = w.dek.seal(&aad("acme"), b"hello");
    let counts = Arc::new(Counts::default());
    let counting: Arc<dyn KeyProvider> = Arc::new(Counting {
        inner: local(&env),
        counts: counts.clone(),
    });
    let cold = service(
        &env.policy,
        Providers::from([("local".to_owned(), counting)]),
        &[],
    )
    .await;
    let mut tasks = JoinSet::new();
    for _ in 0..1000 {
        let (keys, edek, id) = (cold.clone(), w.edek.clone(), w.dek.dek_id);
        tasks.spawn(async move { keys.read_key("acme", id, Some(&edek)).await });
    }
    while let Some(r) = tasks.join_next().await {
        let dek = r.unwrap().unwrap();
        assert_eq!(dek.open(&aad("acme"), &cell).unwrap(), b"hello");
    }
    assert_eq!(counts.unwrap.load(Ordering::SeqCst), 1, "single flight");
    assert_eq!(
        counts.check.load(Ordering::SeqCst),
        1,
        "one approval for the tenant"
    );
    assert_eq!(cold.kms_calls(), 2);
    // Hits make no KMS call at all.
    for _ in 0..100 {
        cold.read_key("acme", w.dek.dek_id, None).await.unwrap();
    }
    assert_eq!(cold.kms_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_first_writes_create_one_dek_with_one_wrap_call() {
    let env = key_env(&["acme"], Duration::from_secs(60));
    let counts = Arc::new(Counts::default());
    let counting: Arc<dyn KeyProvider> = Arc::new(Counting {
        inner: local(&env),
        counts: counts.clone(),
    });
    let keys = service(
        &env.policy,
        Providers::from([("local".to_owned(), counting)]),
        &[("acme", "local", "acme")],
    )
    .await;
    let mut tasks = JoinSet::new();
    for _ in 0..1000 {
        let keys = keys.clone();
        tasks.spawn(async move { keys.write_key("acme").await.map(|w| w.dek.dek_id) });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = tasks.join_next().await {
        ids.insert(r.unwrap().unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(counts.wrap.load(Ordering::SeqCst), 1);
    assert_eq!(
        counts.unwrap.load(Ordering::SeqCst),
        0,
        "the creator keeps its DEK"
    );
    assert_eq!(counts.check.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_key_disabled_is_revoked_within_ttl_and_other_tenants_keep_working() {
    let ttl = Duration::from_secs(1);
    let env = key_env(&["acme", "globex"], ttl);
    let keys = service(
        &env.policy,
        Providers::from([("local".to_owned(), local(&env))]),
        &[("acme", "local", "acme"), ("globex", "local", "globex")],
    )
    .await;
    let a = keys.write_key("acme").await.unwrap();
    let g = keys.write_key("globex").await.unwrap();
    let cell = a.dek.seal(&aad("acme"), b"a");
    drop(a.dek);
    edit_keyring(&env.keyring, |r| r.set_enabled("acme", false).unwrap());
    // The bound, without a timed assertion: once approval_ttl + 1 s have
    // passed, no read may succeed (a slower machine only makes this later).
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    match keys
        .read_key("acme", a_id(&a.edek, &keys).await, None)
        .await
    {
        Err(KeyError::Revoked { .. }) => {}
        Ok(_) => panic!("acme still readable after approval_ttl + 1 s"),
        Err(e) => panic!("expected Revoked, got {e}"),
    }
    assert_eq!(keys.cached_deks("acme"), 0, "revoked DEKs are purged");
    let err = keys.write_key("acme").await.unwrap_err();
    assert_eq!(err.sqlstate(), "KM001");
    // globex is unaffected.
    assert_eq!(
        keys.write_key("globex").await.unwrap().dek.dek_id,
        g.dek.dek_id
    );
    keys.read_key("globex", g.dek.dek_id, None).await.unwrap();
    // The tenant enables its key again: reads work again.
    edit_keyring(&env.keyring, |r| r.set_enabled("acme", true).unwrap());
    poll_until("acme enabled again", Duration::from_secs(30), || async {
        keys.write_key("acme").await.is_ok()
    })
    .await;
    let id = keys.write_key("acme").await.unwrap().dek.dek_id;
    let dek = keys.read_key("acme", id, None).await.unwrap();
    assert_eq!(dek.open(&aad("acme"), &cell).unwrap(), b"a");
}

/// The dek_id of a tenant's only DEK, from the registry (keeps the test
/// from holding an `Arc` of the DEK itself).
async fn a_id(_edek: &Edek, keys: &KeyService) -> uuid::Uuid {
    keys.registry()
        .current_data_key("acme")
        .await
        .unwrap()
        .unwrap()
        .dek_id
}

#[tokio::test]
async fn destroyed_key_shreds_the_tenant_for_good() {
    let env = key_env(&["acme", "globex"], Duration::from_secs(1));
    let providers = || Providers::from([("local".to_owned(), local(&env))]);
    let keys = service(
        &env.policy,
        providers(),
        &[("acme", "local", "acme"), ("globex", "local", "globex")],
    )
    .await;
    let w = keys.write_key("acme").await.unwrap();
    let id = w.dek.dek_id;
    let cell = w.dek.seal(&aad("acme"), b"gone");
    drop(w);
    edit_keyring(&env.keyring, |r| r.destroy("acme").unwrap());
    poll_until("acme shredded", Duration::from_secs(30), || async {
        matches!(
            keys.read_key("acme", id, None).await,
            Err(KeyError::Revoked { .. })
        )
    })
    .await;
    // A fresh replica cannot read it either, not even with the row's EDEK.
    let fresh = service(&env.policy, providers(), &[]).await;
    let err = fresh.read_key("acme", id, None).await.unwrap_err();
    assert!(matches!(err, KeyError::Revoked { .. }), "{err}");
    assert!(err.to_string().contains("destroyed"), "{err}");
    // And the key cannot come back.
    let mut ring = cmk_proxy::kms::Keyring::load(&env.keyring).unwrap();
    assert!(ring.set_enabled("acme", true).is_err());
    assert!(ring.create_key("acme").is_err());
    assert_eq!(fresh.cached_deks("acme"), 0);
    assert!(!cell.is_empty());
    fresh.write_key("globex").await.unwrap();
}

async fn aws(endpoint: &str) -> AwsKmsProvider {
    AwsKmsProvider::with_static_credentials(Some("us-east-1"), Some(endpoint), "test", "test")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_key_disabled_in_moto_is_revoked_within_ttl_and_enable_restores() {
    let moto = moto::Moto::start();
    let ttl = Duration::from_secs(1);
    let env = key_env(&["globex"], ttl);
    let admin_kms = aws(&moto.endpoint()).await;
    let key_id = admin_kms
        .client()
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();
    let keys = service(
        &env.policy,
        Providers::from([
            (
                "aws".to_owned(),
                Arc::new(aws(&moto.endpoint()).await) as Arc<dyn KeyProvider>,
            ),
            ("local".to_owned(), local(&env)),
        ]),
        &[("acme", "aws", &key_id), ("globex", "local", "globex")],
    )
    .await;
    let w = keys.write_key("acme").await.unwrap();
    let (id, edek) = (w.dek.dek_id, w.edek.clone());
    let cell = w.dek.seal(&aad("acme"), b"aws");
    drop(w);
    keys.write_key("globex").await.unwrap();
    admin_kms
        .client()
        .disable_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    match keys.read_key("acme", id, Some(&edek)).await {
        Err(KeyError::Revoked { .. }) => {}
        Ok(_) => panic!("acme still readable through moto after approval_ttl + 1 s"),
        Err(e) => panic!("expected Revoked, got {e}"),
    }
    assert_eq!(keys.cached_deks("acme"), 0);
    keys.write_key("globex").await.unwrap();
    admin_kms
        .client()
        .enable_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap();
    poll_until("acme enabled again", Duration::from_secs(30), || async {
        keys.read_key("acme", id, Some(&edek)).await.is_ok()
    })
    .await;
    let dek = keys.read_key("acme", id, None).await.unwrap();
    assert_eq!(dek.open(&aad("acme"), &cell).unwrap(), b"aws");
}

/// A TCP relay in front of moto that can be cut and restored on the same
/// port: the KMS becomes really unreachable (connections refused, open
/// ones reset), then reachable again.
struct Link {
    port: u16,
    target: u16,
    tasks: Option<JoinSet<()>>,
}

impl Link {
    async fn new(target: u16) -> Link {
        let port = moto::free_port();
        let mut link = Link {
            port,
            target,
            tasks: None,
        };
        link.up().await;
        link
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let target = self.target;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }

    async fn down(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

fn moto_port(moto: &moto::Moto) -> u16 {
    moto.endpoint().rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kms_is_unavailable_after_ttl_and_recovers() {
    let moto = moto::Moto::start();
    let mut link = Link::new(moto_port(&moto)).await;
    let ttl = Duration::from_secs(1);
    let env = key_env(&[], ttl);
    let admin_kms = aws(&moto.endpoint()).await;
    let key_id = admin_kms
        .client()
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();
    let keys = service(
        &env.policy,
        Providers::from([(
            "aws".to_owned(),
            Arc::new(aws(&link.endpoint()).await) as Arc<dyn KeyProvider>,
        )]),
        &[("acme", "aws", &key_id), ("cold", "aws", &key_id)],
    )
    .await;
    let w = keys.write_key("acme").await.unwrap();
    let id = w.dek.dek_id;
    drop(w);
    link.down().await;
    // max_stale = 0: once the approval lapses, the DEK is not served.
    poll_until("acme unavailable", Duration::from_secs(30), || async {
        match keys.read_key("acme", id, None).await {
            Err(KeyError::Unavailable { .. }) => true,
            Ok(_) => false,
            Err(e) => panic!("expected Unavailable, got {e}"),
        }
    })
    .await;
    let err = keys.write_key("cold").await.unwrap_err();
    assert_eq!(err.sqlstate(), "KM002", "{err}");
    link.up().await;
    poll_until("acme back", Duration::from_secs(30), || async {
        keys.read_key("acme", id, None).await.is_ok()
    })
    .await;
    keys.write_key("cold").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stale_serves_cached_keys_through_an_outage_then_stops() {
    let moto = moto::Moto::start();
    let mut link = Link::new(moto_port(&moto)).await;
    let ttl = Duration::from_millis(500);
    let mut env = key_env(&[], ttl);
    env.policy.keys.max_stale = Duration::from_secs(3);
    let admin_kms = aws(&moto.endpoint()).await;
    let key_id = admin_kms
        .client()
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();
    let keys = service(
        &env.policy,
        Providers::from([(
            "aws".to_owned(),
            Arc::new(aws(&link.endpoint()).await) as Arc<dyn KeyProvider>,
        )]),
        &[("acme", "aws", &key_id)],
    )
    .await;
    let w = keys.write_key("acme").await.unwrap();
    let id = w.dek.dek_id;
    drop(w);
    let calls_before = keys.kms_calls();
    link.down().await;
    // Keep using the tenant until a re-approval has failed and the approval
    // has lapsed: the cached DEK is still served (grace).
    let lapse = Instant::now() + ttl * 2;
    while Instant::now() < lapse || keys.kms_calls() == calls_before {
        keys.read_key("acme", id, None)
            .await
            .expect("served from the max_stale grace");
        keys.write_key("acme")
            .await
            .expect("write key served from the grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... but not beyond expiry + max_stale.
    poll_until("grace ends", Duration::from_secs(30), || async {
        matches!(
            keys.read_key("acme", id, None).await,
            Err(KeyError::Unavailable { .. })
        )
    })
    .await;
    assert_eq!(keys.cached_deks("acme"), 0, "keys dropped after the grace");
    link.up().await;
    poll_until("acme back", Duration::from_secs(30), || async {
        keys.read_key("acme", id, None).await.is_ok()
    })
    .await;
}
