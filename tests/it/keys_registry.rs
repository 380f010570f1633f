//! The DEK registry against a real PostgreSQL and the local keyring: replicas
//! agree on one DEK, rotation, rollover, rewrap, TLS to the registry, and
//! the tenant/key CLI.

use crate::support::pg as support;

use std::process::Command;
use std::time::{Duration, Instant};

use cmk_proxy::audit::Audit;
use cmk_proxy::config::{Policy, TenantSeed, UpstreamTlsMode};
use cmk_proxy::crypto::CellAad;
use cmk_proxy::keys::{KeyError, KeyService};
use support::*;

fn seed(policy: &mut Policy, tenant: &str, key: &str) {
    policy.tenants.insert(
        tenant.to_owned(),
        TenantSeed {
            provider: "local".to_owned(),
            key: key.to_owned(),
            audit_sink: None,
        },
    );
}

fn aad(tenant: &str) -> CellAad<'_> {
    CellAad {
        tenant_id: tenant,
        table: "public.patients",
        column: "ssn",
    }
}

async fn data_key_rows(
    pg: &cmk_proxy::localpg::LocalPostgres,
    tenant: &str,
) -> Vec<(uuid::Uuid, i32, bool, Vec<u8>, String)> {
    admin(pg, "app")
        .await
        .query(
            "SELECT dek_id, epoch, retired_at IS NOT NULL, edek, key_ref FROM cmk.data_keys WHERE tenant_id = $1 ORDER BY epoch",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test]
async fn two_replicas_racing_the_first_write_end_with_one_dek() {
    let mut env = key_env(&["t1", "t2", "t3", "t4"], Duration::from_secs(60));
    for t in ["t1", "t2", "t3", "t4"] {
        seed(&mut env.policy, t, t);
    }
    let (a, b) = tokio::join!(
        KeyService::connect(&env.policy, Audit::disabled()),
        KeyService::connect(&env.policy, Audit::disabled())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut raced = 0;
    for t in ["t1", "t2", "t3", "t4"] {
        let calls = a.kms_calls() + b.kms_calls();
        let (ka, kb) = tokio::join!(a.write_key(t), b.write_key(t));
        // check + wrap on both sides, and an unwrap of the winner's EDEK by
        // the loser, means both really claimed the epoch at once.
        if a.kms_calls() + b.kms_calls() - calls == 5 {
            raced += 1;
        }
        let (ka, kb) = (ka.unwrap(), kb.unwrap());
        assert_eq!(ka.dek.dek_id, kb.dek.dek_id, "replicas disagree for {t}");
        assert_eq!(ka.edek, kb.edek);
        let rows = data_key_rows(&env.pg, t).await;
        assert_eq!(rows.len(), 1, "{t}: {rows:?}");
        assert_eq!(rows[0].0, ka.dek.dek_id);
        // Both hold the same key: a cell sealed by one opens with the other.
        let cell = ka.dek.seal(&aad(t), b"123-45-6789");
        assert_eq!(kb.dek.open(&aad(t), &cell).unwrap(), b"123-45-6789");
    }
    eprintln!("{raced} of 4 first writes raced for the epoch");
}

#[tokio::test]
async fn rotate_moves_writes_to_a_new_epoch_and_old_cells_stay_readable() {
    let mut env = key_env(&["acme"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w1 = keys.write_key("acme").await.unwrap();
    let old_cell = w1.dek.seal(&aad("acme"), b"old");
    let out = keys.rotate("acme").await.unwrap();
    assert_eq!(out.retired, Some(w1.dek.dek_id));
    assert_eq!(out.epoch, 2);
    let w2 = keys.write_key("acme").await.unwrap();
    assert_eq!(w2.dek.dek_id, out.dek_id);
    assert_ne!(w2.dek.dek_id, w1.dek.dek_id);
    let rows = data_key_rows(&env.pg, "acme").await;
    assert_eq!(
        rows.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
    // A fresh replica reads the old cell and writes with the new epoch.
    let fresh = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let dek = fresh
        .read_key("acme", w1.dek.dek_id, Some(&w1.edek))
        .await
        .unwrap();
    assert_eq!(dek.open(&aad("acme"), &old_cell).unwrap(), b"old");
    assert_eq!(
        fresh.write_key("acme").await.unwrap().dek.dek_id,
        out.dek_id
    );
}

#[tokio::test]
async fn a_replica_notices_a_rotation_by_another_within_the_approval_ttl() {
    let mut env = key_env(&["acme"], Duration::from_millis(800));
    seed(&mut env.policy, "acme", "acme");
    let a = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let b = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let first = a.write_key("acme").await.unwrap().dek.dek_id;
    let rotated = b.rotate("acme").await.unwrap().dek_id;
    assert_ne!(first, rotated);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if a.write_key("acme").await.unwrap().dek.dek_id == rotated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica a never switched to the rotated DEK"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dek_max_cells_rolls_the_next_write_to_a_new_epoch() {
    let mut env = key_env(&["acme"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    env.policy.keys.dek_max_cells = 3;
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w1 = keys.write_key("acme").await.unwrap();
    for _ in 0..2 {
        w1.dek.seal(&aad("acme"), b"x");
    }
    assert_eq!(
        keys.write_key("acme").await.unwrap().dek.dek_id,
        w1.dek.dek_id,
        "2 < 3 cells"
    );
    w1.dek.seal(&aad("acme"), b"x");
    let w2 = keys.write_key("acme").await.unwrap();
    assert_ne!(
        w2.dek.dek_id, w1.dek.dek_id,
        "3 cells sealed: next write must roll"
    );
    let rows = data_key_rows(&env.pg, "acme").await;
    assert_eq!(
        rows.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
}

#[tokio::test]
async fn dek_max_age_rolls_an_old_dek() {
    let mut env = key_env(&["acme"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w1 = keys.write_key("acme").await.unwrap();
    admin(&env.pg, "app")
        .await
        .execute(
            "UPDATE cmk.data_keys SET created_at = now() - interval '400 days'",
            &[],
        )
        .await
        .unwrap();
    // A fresh replica sees the registry's created_at and rolls.
    let fresh = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w2 = fresh.write_key("acme").await.unwrap();
    assert_ne!(w2.dek.dek_id, w1.dek.dek_id);
    assert_eq!(data_key_rows(&env.pg, "acme").await.len(), 2);
}

#[tokio::test]
async fn rewrap_changes_the_edeks_and_key_ref_but_not_the_cells() {
    let mut env = key_env(&["acme", "acme-2027"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let db = admin(&env.pg, "app").await;
    db.batch_execute("CREATE TABLE cells (id int, c bytea)")
        .await
        .unwrap();
    let w1 = keys.write_key("acme").await.unwrap();
    let c1 = w1.dek.seal(&aad("acme"), b"first");
    keys.rotate("acme").await.unwrap();
    let w2 = keys.write_key("acme").await.unwrap();
    let c2 = w2.dek.seal(&aad("acme"), b"second");
    db.execute("INSERT INTO cells VALUES (1, $1), (2, $2)", &[&c1, &c2])
        .await
        .unwrap();
    let before = data_key_rows(&env.pg, "acme").await;

    assert_eq!(keys.rewrap("acme", Some("acme-2027")).await.unwrap(), 2);

    let after = data_key_rows(&env.pg, "acme").await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.0, a.0);
        assert_ne!(b.3, a.3, "EDEK bytes must change");
        assert_eq!(a.4, "acme-2027");
    }
    let key_ref: String = db
        .query_one(
            "SELECT key_ref FROM cmk.tenants WHERE tenant_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key_ref, "acme-2027");
    let cells: Vec<Vec<u8>> = db
        .query("SELECT c FROM cells ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cells, [c1.clone(), c2.clone()], "cell bytes untouched");
    // Retire the old master key entirely: the cells still open via the new one.
    edit_keyring(&env.keyring, |r| r.destroy("acme").unwrap());
    env.policy.tenants.clear();
    let fresh = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    for (cell, id, pt) in [
        (&c1, w1.dek.dek_id, &b"first"[..]),
        (&c2, w2.dek.dek_id, &b"second"[..]),
    ] {
        let dek = fresh.read_key("acme", id, None).await.unwrap();
        assert_eq!(dek.open(&aad("acme"), cell).unwrap(), pt);
    }
}

#[tokio::test]
async fn rewrap_under_a_new_master_key_version_keeps_cells_readable() {
    let mut env = key_env(&["acme"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w = keys.write_key("acme").await.unwrap();
    let cell = w.dek.seal(&aad("acme"), b"v");
    let before = data_key_rows(&env.pg, "acme").await;
    edit_keyring(&env.keyring, |r| {
        assert_eq!(r.create_key("acme").unwrap(), 2);
    });
    assert_eq!(keys.rewrap("acme", None).await.unwrap(), 1);
    let after = data_key_rows(&env.pg, "acme").await;
    assert_ne!(before[0].3, after[0].3);
    let fresh = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let dek = fresh.read_key("acme", w.dek.dek_id, None).await.unwrap();
    assert_eq!(dek.open(&aad("acme"), &cell).unwrap(), b"v");
}

#[tokio::test]
async fn unknown_tenant_is_rejected_with_km004() {
    let env = key_env(&["acme"], Duration::from_secs(60));
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let err = keys.write_key("nobody").await.unwrap_err();
    assert!(matches!(err, KeyError::UnknownTenant { .. }), "{err}");
    assert_eq!(err.sqlstate(), "KM004");
    let err = keys
        .read_key("nobody", uuid::Uuid::new_v4(), None)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), "KM004");
}

#[tokio::test]
async fn a_dek_of_another_tenant_is_an_integrity_error_not_a_revocation() {
    let mut env = key_env(&["a", "b"], Duration::from_secs(60));
    seed(&mut env.policy, "a", "a");
    seed(&mut env.policy, "b", "b");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let wa = keys.write_key("a").await.unwrap();
    keys.write_key("b").await.unwrap();
    let err = keys
        .read_key("b", wa.dek.dek_id, Some(&wa.edek))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), "KM005", "{err}");
    // b is not revoked by that.
    keys.write_key("b").await.unwrap();
}

#[tokio::test]
async fn registry_over_verify_full_tls_checks_the_ca() {
    let mut env = key_env_with(&["acme"], Duration::from_secs(60), true);
    seed(&mut env.policy, "acme", "acme");
    env.policy.tls.upstream.mode = UpstreamTlsMode::VerifyFull;
    env.policy.tls.upstream.ca = env.pg.ca_cert_path().map(|p| p.to_owned());
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    keys.write_key("acme").await.unwrap();
    let ssl: bool = keys
        .registry()
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // A CA that did not sign the server certificate is refused.
    let other =
        cmk_proxy::localpg::write_ca_and_server_cert(&env.dir.path().join("other"), &["127.0.0.1"])
            .or_else(|_| {
                std::fs::create_dir_all(env.dir.path().join("other")).unwrap();
                cmk_proxy::localpg::write_ca_and_server_cert(
                    &env.dir.path().join("other"),
                    &["127.0.0.1"],
                )
            })
            .unwrap();
    env.policy.tls.upstream.ca = Some(other.ca_cert);
    let err = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::Registry(_)), "{err}");
    // require: encrypted, not verified.
    env.policy.tls.upstream.mode = UpstreamTlsMode::Require;
    KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

async fn poll_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tenant_and_key_cli_add_list_disable_enable_rotate_rewrap() {
    let env = key_env(&["acme", "acme-2027"], Duration::from_secs(1));
    let config = write_policy_yaml(&env);
    let config = config.to_str().unwrap();
    let sink = env.dir.path().join("acme-audit.jsonl");
    let sink = sink.to_str().unwrap();
    let (code, out) = cli(&[
        "tenants",
        "add",
        "acme",
        "--provider",
        "local",
        "--key",
        "acme",
        "--audit-sink",
        sink,
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&[
        "tenants",
        "add",
        "acme",
        "--provider",
        "local",
        "--key",
        "acme",
        "--config",
        config,
    ]);
    assert_eq!(code, 1, "second add must fail: {out}");
    let (code, out) = cli(&[
        "tenants",
        "add",
        "ghost",
        "--provider",
        "local",
        "--key",
        "no-such-key",
        "--config",
        config,
    ]);
    assert_eq!(code, 1, "missing key must be refused: {out}");
    let (code, out) = cli(&[
        "tenants",
        "add",
        "x",
        "--provider",
        "nope",
        "--key",
        "acme",
        "--config",
        config,
    ]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = cli(&["tenants", "list", "--config", config]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("acme ") && l.contains("active")),
        "{out}"
    );
    assert!(!out.contains("ghost"), "{out}");

    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w = keys.write_key("acme").await.unwrap();
    let cell = w.dek.seal(&aad("acme"), b"secret");
    let id = w.dek.dek_id;

    let (code, out) = cli(&["tenants", "disable", "acme", "--config", config]);
    assert_eq!(code, 0, "{out}");
    poll_until("disabled tenant is revoked", || async {
        matches!(
            keys.read_key("acme", id, None).await,
            Err(KeyError::Revoked { .. })
        )
    })
    .await;
    assert_eq!(keys.cached_deks("acme"), 0);
    assert_eq!(
        keys.write_key("acme").await.unwrap_err().sqlstate(),
        "KM001"
    );
    let (code, out) = cli(&["tenants", "list", "--config", config]);
    assert!(code == 0 && out.contains("disabled"), "{out}");

    let (code, out) = cli(&["tenants", "enable", "acme", "--config", config]);
    assert_eq!(code, 0, "{out}");
    poll_until("enabled tenant works again", || async {
        keys.read_key("acme", id, None).await.is_ok()
    })
    .await;
    let dek = keys.read_key("acme", id, None).await.unwrap();
    assert_eq!(dek.open(&aad("acme"), &cell).unwrap(), b"secret");

    let (code, out) = cli(&["keys", "rotate", "--tenant", "acme", "--config", config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("epoch 2"), "{out}");
    let (code, out) = cli(&[
        "rewrap",
        "--tenant",
        "acme",
        "--to-key",
        "acme-2027",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("re-wrapped 2 data keys"), "{out}");
    let (code, out) = cli(&["keys", "rotate", "--tenant", "nobody", "--config", config]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = cli(&["tenants", "disable", "nobody", "--config", config]);
    assert_eq!(code, 1, "{out}");

    // The tenant's own audit stream saw its KMS calls made by the CLI.
    let audit = std::fs::read_to_string(sink).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"kms_call\"") && l.contains("acme")),
        "{audit}"
    );
    // The policy's main sink got them too; no key material anywhere.
    let (code, help) = cli(&["tenants", "add", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("--audit-sink"), "{help}");
}

#[tokio::test]
async fn concurrent_epoch_claims_leave_exactly_one_current_dek() {
    let mut env = key_env(&["acme"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let r1 = cmk_proxy::keys::Registry::new(&env.policy).unwrap();
    let r2 = cmk_proxy::keys::Registry::new(&env.policy).unwrap();
    for round in 1..=20 {
        let (id1, id2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (a, b) = tokio::join!(
            r1.insert_data_key(id1, "acme", "local", "acme", b"e1"),
            r2.insert_data_key(id2, "acme", "local", "acme", b"e2")
        );
        let claimed: Vec<i32> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
        assert_eq!(claimed, [round], "round {round}");
        let current = r1.current_data_key("acme").await.unwrap().unwrap();
        assert_eq!(current.epoch, round);
        // With a current DEK nobody claims another epoch.
        assert_eq!(
            r2.insert_data_key(uuid::Uuid::new_v4(), "acme", "local", "acme", b"e3")
                .await
                .unwrap(),
            None
        );
        assert!(r1.retire_data_key(current.dek_id).await.unwrap());
        assert!(
            !r2.retire_data_key(current.dek_id).await.unwrap(),
            "retired twice"
        );
    }
    drop(keys);
}

#[tokio::test]
async fn blind_index_key_is_stable_across_rotation_and_replicas_and_follows_revocation() {
    let mut env = key_env(&["acme", "globex"], Duration::from_secs(1));
    seed(&mut env.policy, "acme", "acme");
    seed(&mut env.policy, "globex", "globex");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let index =
        |k: &cmk_proxy::crypto::BlindIndexKey| cmk_proxy::crypto::blind_index(k, b"123-45-6789");
    let before = index(&keys.blind_index_key("acme").await.unwrap());
    keys.rotate("acme").await.unwrap();
    keys.rotate("acme").await.unwrap();
    let fresh = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    assert_eq!(index(&fresh.blind_index_key("acme").await.unwrap()), before);
    assert_eq!(index(&keys.blind_index_key("acme").await.unwrap()), before);
    assert_ne!(
        index(&keys.blind_index_key("globex").await.unwrap()),
        before,
        "per tenant"
    );
    edit_keyring(&env.keyring, |r| r.set_enabled("acme", false).unwrap());
    poll_until("index key revoked", || async {
        matches!(
            keys.blind_index_key("acme").await,
            Err(KeyError::Revoked { .. })
        )
    })
    .await;
}

#[tokio::test]
async fn registry_reconnects_after_a_postgres_restart() {
    let mut env = key_env(&["acme", "globex"], Duration::from_secs(60));
    seed(&mut env.policy, "acme", "acme");
    seed(&mut env.policy, "globex", "globex");
    let keys = KeyService::connect(&env.policy, Audit::disabled())
        .await
        .unwrap();
    let w = keys.write_key("acme").await.unwrap();
    env.pg.stop().unwrap();
    // Cached keys keep working while the registry is down.
    keys.read_key("acme", w.dek.dek_id, None).await.unwrap();
    let err = keys.write_key("globex").await.unwrap_err();
    assert!(matches!(err, KeyError::Registry(_)), "{err}");
    env.pg.start_again().unwrap();
    let g = keys
        .write_key("globex")
        .await
        .expect("reconnected on the first use after the restart");
    assert_eq!(data_key_rows(&env.pg, "globex").await[0].0, g.dek.dek_id);
}
