//! Faults under encrypted traffic (issue 17, test 3): PostgreSQL restarted
//! while sessions write protected rows (they get 57P01/08006, new sessions
//! encrypt again, the key registry and catalog connections recover without
//! restarting the proxy), and 500 concurrent clients writing and reading
//! protected values through one proxy, none failing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

use cmk_proxy::localpg::LocalPostgresOptions;
use common::encryption::{count, EncryptedSetup};

const SCHEMA: &str = "CREATE TABLE patients (id bigserial PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, notes bytea, cmk_edek jsonb)";

const COLUMNS: &[&str] = &["ssn: {type: text}", "notes: {type: text}"];

const PLAINTEXT_AT_REST: &str = "SELECT count(*) FROM patients WHERE \
    (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) OR \
    (notes IS NOT NULL AND substr(notes, 1, 4) <> '\\x434d4b01'::bytea) OR cmk_edek IS NULL";

/// What the writers saw.
#[derive(Default)]
struct Tally {
    writes: AtomicU64,
    codes: Mutex<Vec<String>>,
}

/// Writes and reads back protected rows as `tenant` until `stop`, opening a
/// new session after each error (recording its SQLSTATE, or "closed").
async fn writer(url: String, tenant: &'static str, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let Ok((client, _h)) = common::try_connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            n += 1;
            let ssn = format!("{tenant}-{n}");
            let result = async {
                let row = client
                    .query_one(
                        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ($1, $2, 'note') RETURNING id",
                        &[&tenant, &ssn],
                    )
                    .await?;
                let id: i64 = row.get(0);
                let back = client
                    .query_one("SELECT ssn FROM patients WHERE id = $1", &[&id])
                    .await?;
                Ok::<_, tokio_postgres::Error>(back.get::<_, String>(0))
            }
            .await;
            match result {
                Ok(back) => {
                    assert_eq!(back, ssn, "a row read back as another value");
                    tally.writes.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    let code = common::sqlstate(&e).unwrap_or_else(|| "closed".to_owned());
                    if let Ok(mut codes) = tally.codes.lock() {
                        codes.push(code);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
}

/// Waits until `tally` has counted `more` writes beyond `from`.
async fn writes_go_on(tally: &Tally, from: u64, more: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.writes.load(Ordering::Acquire) < from + more {
        assert!(Instant::now() < deadline, "{what}: writes did not go on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_encrypted_load_and_new_sessions_encrypt_again() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let url = setup.proxy.url("postgres", "", "app");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let writers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(writer(url.clone(), "acme", stop.clone(), tally.clone())))
        .collect();
    writes_go_on(&tally, 0, 50, "before the restart").await;

    setup.pg.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.pg.start_again().unwrap();
    let after_restart = tally.writes.load(Ordering::Acquire);
    writes_go_on(&tally, after_restart, 50, "after the restart").await;

    // A tenant's first write after the restart creates its DEK: the key
    // registry's connection came back too.
    let new_tenant = Arc::new(Tally::default());
    let globex = tokio::spawn(writer(
        url.clone(),
        "globex",
        stop.clone(),
        new_tenant.clone(),
    ));
    writes_go_on(&new_tenant, 0, 20, "a new tenant").await;
    stop.store(true, Ordering::Release);
    for w in writers.into_iter().chain([globex]) {
        w.await.unwrap();
    }

    let mut codes = tally.codes.lock().map(|c| c.clone()).unwrap_or_default();
    codes.extend(
        new_tenant
            .codes
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default(),
    );
    assert!(!codes.is_empty(), "the restart went unnoticed");
    // KM002: the key registry lives in the PostgreSQL that went away; with
    // the test's 1 s approval_ttl a tenant's approval can lapse while the
    // server is down (a slow restart on a loaded machine), and the proxy
    // then fails closed with KM002, "try again", rather than write unchecked.
    let allowed = ["57P01", "08006", "08001", "57P03", "closed", "KM002"];
    assert!(
        codes.iter().all(|c| allowed.contains(&c.as_str())),
        "sessions saw other errors than the server going away: {codes:?}"
    );
    let (direct, _h) = common::connect(&setup.pg.admin_url("app")).await;
    assert_eq!(count(&direct, PLAINTEXT_AT_REST).await, 0);
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM cmk.data_keys WHERE tenant_id = 'globex'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_clients_write_and_read_protected_values() {
    let pg = common::pg_with(LocalPostgresOptions {
        max_connections: 600,
        ..Default::default()
    });
    let setup = EncryptedSetup::start_on(pg, SCHEMA, "public.patients", COLUMNS, "", "", "").await;
    let url = setup.proxy.url("postgres", "", "app");
    let tasks: Vec<_> = (0..500i64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let (client, _h) = common::try_connect(&url).await?;
                let tenant = if i % 2 == 0 { "acme" } else { "globex" };
                let ssn = format!("ssn-{i}");
                let id: i64 = client
                    .query_one(
                        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ($1, $2, $3) RETURNING id",
                        &[&tenant, &ssn, &format!("note {i}")],
                    )
                    .await?
                    .get(0);
                // Hold the session until everyone has written.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let back: String = client
                    .query_one("SELECT ssn FROM patients WHERE id = $1", &[&id])
                    .await?
                    .get(0);
                Ok::<_, tokio_postgres::Error>((ssn, back))
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok((ssn, back)) => assert_eq!(ssn, back, "client {i}"),
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        500
    );
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
}
