//! The local keyring provider against real files, and the `cmk-proxy
//! keyring` CLI driven as a subprocess.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cmk_proxy::config::{KeysConfig, ProviderConfig};
use cmk_proxy::crypto::Dek;
use cmk_proxy::kms::{
    build_providers, DenialReason, Edek, KeyContext, KeyProvider, Keyring, KmsError, LocalProvider,
};
use uuid::Uuid;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn keyring_with(names: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let mut ring = Keyring::load_or_empty(&path).unwrap();
    for name in names {
        ring.create_key(name).unwrap();
    }
    ring.save().unwrap();
    Fixture { _dir: dir, path }
}

fn edit(path: &Path, change: impl FnOnce(&mut Keyring)) {
    let mut ring = Keyring::load(path).unwrap();
    change(&mut ring);
    ring.save().unwrap();
}

fn ctx(tenant: &str, dek_id: Uuid) -> KeyContext<'_> {
    KeyContext {
        tenant_id: tenant,
        dek_id,
    }
}

fn reason(err: KmsError) -> DenialReason {
    err.denial_reason()
        .unwrap_or_else(|| panic!("expected a denial, got {err}"))
}

#[tokio::test]
async fn wrap_unwrap_round_trips_and_edek_hides_the_dek() {
    let f = keyring_with(&["acme"]);
    let p = LocalProvider::open(&f.path).unwrap();
    assert_eq!(p.kind(), "local");
    let dek = Dek::generate();
    let id = Uuid::new_v4();
    let edek = p.wrap("acme", &ctx("acme", id), &dek).await.unwrap();
    assert!(!edek.0.windows(32).any(|w| w == dek.expose_bytes()));
    let back = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap();
    assert_eq!(back.expose_bytes(), dek.expose_bytes());
    p.check_key("acme").await.unwrap();
}

#[tokio::test]
async fn edek_is_bound_to_tenant_dek_id_and_key() {
    let f = keyring_with(&["acme", "globex"]);
    let p = LocalProvider::open(&f.path).unwrap();
    let id = Uuid::new_v4();
    let edek = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();
    for (key_ref, tenant, dek_id) in [
        ("acme", "globex", id),
        ("acme", "acme", Uuid::new_v4()),
        ("globex", "acme", id),
    ] {
        let err = p
            .unwrap(key_ref, &ctx(tenant, dek_id), &edek)
            .await
            .unwrap_err();
        assert_eq!(
            reason(err),
            DenialReason::InvalidCiphertext,
            "{key_ref}/{tenant}"
        );
    }
    let mut tampered = edek.clone();
    let last = tampered.0.len() - 1;
    tampered.0[last] ^= 1;
    let err = p
        .unwrap("acme", &ctx("acme", id), &tampered)
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::InvalidCiphertext);
    let err = p
        .unwrap("acme", &ctx("acme", id), &Edek(b"garbage".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::InvalidCiphertext);
}

#[tokio::test]
async fn disable_denies_and_enable_restores() {
    let f = keyring_with(&["acme"]);
    let p = LocalProvider::open(&f.path).unwrap();
    let id = Uuid::new_v4();
    let edek = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();

    edit(&f.path, |r| r.set_enabled("acme", false).unwrap());
    let err = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap_err();
    assert!(err.is_denial());
    assert_eq!(reason(err), DenialReason::Disabled);
    assert_eq!(
        reason(p.check_key("acme").await.unwrap_err()),
        DenialReason::Disabled
    );
    let err = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::Disabled);

    edit(&f.path, |r| r.set_enabled("acme", true).unwrap());
    p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap();
    p.check_key("acme").await.unwrap();
}

#[tokio::test]
async fn destroy_denies_forever_and_wipes_material_from_the_file() {
    let f = keyring_with(&["acme", "globex"]);
    let before = std::fs::read_to_string(&f.path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&before).unwrap();
    let material = json["keys"]["acme"]["versions"][0]["material"]
        .as_str()
        .unwrap()
        .to_owned();
    let p = LocalProvider::open(&f.path).unwrap();
    let id = Uuid::new_v4();
    let edek = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();

    edit(&f.path, |r| r.destroy("acme").unwrap());
    let after = std::fs::read_to_string(&f.path).unwrap();
    assert!(
        !after.contains(&material),
        "material must be gone from the file"
    );
    let err = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::Destroyed);
    assert_eq!(
        reason(p.check_key("acme").await.unwrap_err()),
        DenialReason::Destroyed
    );

    let mut ring = Keyring::load(&f.path).unwrap();
    assert!(ring.set_enabled("acme", true).is_err());
    assert!(
        ring.create_key("acme").is_err(),
        "a destroyed key cannot be recreated"
    );
    // Other keys are untouched.
    p.check_key("globex").await.unwrap();
}

#[tokio::test]
async fn missing_entry_is_not_found() {
    let f = keyring_with(&["acme"]);
    let p = LocalProvider::open(&f.path).unwrap();
    let err = p.check_key("nobody").await.unwrap_err();
    assert_eq!(reason(err), DenialReason::NotFound);
    let err = p
        .wrap("nobody", &ctx("nobody", Uuid::new_v4()), &Dek::generate())
        .await
        .unwrap_err();
    assert_eq!(reason(err), DenialReason::NotFound);
}

#[tokio::test]
async fn rotation_adds_a_version_and_old_edeks_stay_unwrappable() {
    let f = keyring_with(&["acme"]);
    let p = LocalProvider::open(&f.path).unwrap();
    let id = Uuid::new_v4();
    let dek = Dek::generate();
    let old = p.wrap("acme", &ctx("acme", id), &dek).await.unwrap();
    edit(&f.path, |r| assert_eq!(r.create_key("acme").unwrap(), 2));
    let new = p.wrap("acme", &ctx("acme", id), &dek).await.unwrap();
    assert_ne!(old.0[5..9], new.0[5..9], "new wraps name the new version");
    for edek in [old, new] {
        let back = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap();
        assert_eq!(back.expose_bytes(), dek.expose_bytes());
    }
}

#[tokio::test]
async fn group_or_world_accessible_keyring_is_refused() {
    let f = keyring_with(&["acme"]);
    assert_eq!(
        std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let p = LocalProvider::open(&f.path).unwrap();
    for mode in [0o640, 0o604, 0o660, 0o644] {
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = LocalProvider::open(&f.path).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, KmsError::Config(_)), "{text}");
        assert!(text.contains(&f.path.display().to_string()), "{text}");
        assert!(text.contains(&format!("{mode:04o}")), "{text}");
        // A running provider refuses too, on its next call.
        let err = p.check_key("acme").await.unwrap_err();
        assert!(matches!(err, KmsError::Config(_)), "{err}");
    }
    std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.check_key("acme").await.unwrap();
}

#[tokio::test]
async fn missing_or_corrupt_keyring_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let err = LocalProvider::open(&missing).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
    let corrupt = dir.path().join("bad.json");
    std::fs::write(&corrupt, b"{\"version\":1,\"keys\":{\"a\":{\"state\":\"enabled\",\"versions\":[{\"id\":1,\"material\":\"c2hvcnQ=\"}]}}}").unwrap();
    std::fs::set_permissions(&corrupt, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = LocalProvider::open(&corrupt).unwrap_err();
    assert!(err.to_string().contains("not 32 bytes"), "{err}");
}

#[tokio::test]
async fn build_providers_makes_local_providers() {
    let f = keyring_with(&["acme"]);
    let mut providers = BTreeMap::new();
    providers.insert(
        "local".to_owned(),
        ProviderConfig::Local {
            path: f.path.clone(),
        },
    );
    let cfg = KeysConfig {
        providers,
        ..KeysConfig::default()
    };
    let built = build_providers(&cfg).await.unwrap();
    let p = built.get("local").unwrap();
    assert_eq!(p.kind(), "local");
    p.check_key("acme").await.unwrap();
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .env_remove("CMK_KEYRING")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn keyring_cli_plays_the_tenant_against_a_live_provider() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring.json");
    let file = path.to_str().unwrap();

    let (code, out, err) = cli(&["keyring", "create", "acme", "--keyring", file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created key \"acme\""), "{out}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let p = LocalProvider::open(&path).unwrap();
    let id = Uuid::new_v4();
    let edek = p
        .wrap("acme", &ctx("acme", id), &Dek::generate())
        .await
        .unwrap();

    let (code, out, _) = cli(&["keyring", "create", "acme", "--keyring", file]);
    assert_eq!(code, 0);
    assert!(out.contains("new version 2"), "{out}");

    let (code, _, _) = cli(&["keyring", "disable", "acme", "--keyring", file]);
    assert_eq!(code, 0);
    let err = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::Disabled);

    let (code, out, _) = cli(&["keyring", "list", "--keyring", file]);
    assert_eq!(code, 0);
    assert!(out.contains("acme\tdisabled\tversions 1,2"), "{out}");

    let (code, _, _) = cli(&["keyring", "enable", "acme", "--keyring", file]);
    assert_eq!(code, 0);
    p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap();

    let (code, out, _) = cli(&["keyring", "destroy", "acme", "--keyring", file]);
    assert_eq!(code, 0);
    assert!(out.contains("material wiped"), "{out}");
    let err = p.unwrap("acme", &ctx("acme", id), &edek).await.unwrap_err();
    assert_eq!(reason(err), DenialReason::Destroyed);

    let (code, _, err) = cli(&["keyring", "enable", "acme", "--keyring", file]);
    assert_eq!(code, 1);
    assert!(err.contains("destroyed"), "{err}");
    let (code, _, err) = cli(&["keyring", "disable", "ghost", "--keyring", file]);
    assert_eq!(code, 1);
    assert!(err.contains("no key named \"ghost\""), "{err}");

    let listed = cli(&["keyring", "list", "--keyring", file]).1;
    assert!(listed.contains("acme\tdestroyed\tversions -"), "{listed}");
    let content = std::fs::read_to_string(&path).unwrap();
    assert!(!content.contains("material\": \""), "{content}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = cli(&["keyring", "list", "--keyring", file]);
    assert_eq!(code, 1);
    assert!(err.contains("mode 0644"), "{err}");

    for sub in ["create", "disable", "enable", "destroy", "list"] {
        let (code, out, _) = cli(&["keyring", sub, "--help"]);
        assert_eq!(code, 0, "{sub}");
        assert!(out.contains("--keyring"), "{sub}: {out}");
    }
}

#[test]
fn concurrent_keyring_cli_runs_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring.json");
    let file = path.to_str().unwrap().to_owned();
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
                .args([
                    "keyring",
                    "create",
                    &format!("tenant-{i}"),
                    "--keyring",
                    &file,
                ])
                .env_remove("CMK_KEYRING")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let ring = Keyring::load(&path).unwrap();
    assert_eq!(ring.entries().count(), 8);
}
