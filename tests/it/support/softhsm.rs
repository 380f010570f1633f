//! A real SoftHSM2 token for the PKCS#11 tests: a fresh token directory and
//! `SOFTHSM2_CONF` per test process, the token initialised with
//! `softhsm2-util`, and the tenant's side (create, restrict, delete keys)
//! done through the same Cryptoki module the provider loads.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cmk_proxy::kms::pkcs11::{find_token, load_module, open_user_session};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;

/// Debian's SoftHSM2 module (package `softhsm2`).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Label of the token the tests create.
pub const TOKEN: &str = "cmk";
/// The token's user PIN.
pub const PIN: &str = "4711-user";

/// A SoftHSM2 token in a temp dir, with the PIN in a file.
pub struct SoftHsm {
    dir: tempfile::TempDir,
}

impl SoftHsm {
    /// Creates the token. Sets `SOFTHSM2_CONF` for this process and the
    /// proxies it starts; call before loading the module. Panics (the test
    /// fails, it is never skipped) when SoftHSM2 is not installed.
    pub fn start() -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: run scripts/install-deps.sh (Debian package softhsm2)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN, "--pin", PIN])
            .args(["--so-pin", "4711-so"])
            .output()
            .expect("softhsm2-util (Debian package softhsm2)");
        assert!(out.status.success(), "softhsm2-util: {out:?}");
        std::fs::write(dir.path().join("hsm.pin"), format!("{PIN}\n")).unwrap();
        SoftHsm { dir }
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("hsm.pin")
    }

    /// A `keys.providers` entry for this token.
    pub fn provider_yaml(&self) -> String {
        format!(
            "{{kind: pkcs11, module: {MODULE}, token: {TOKEN}, pin_file: \"{}\"}}",
            self.pin_file().display()
        )
    }

    /// A logged-in session, as the tenant's HSM administrator.
    pub fn admin(&self) -> Session {
        let ctx = load_module(Path::new(MODULE)).unwrap();
        let slot = find_token(&ctx, TOKEN).unwrap();
        open_user_session(&ctx, slot, &AuthPin::from(PIN.to_owned())).unwrap()
    }

    /// Generates a 256-bit AES key labelled `label` that may encrypt and decrypt.
    pub fn create_key(&self, label: &str) {
        self.admin()
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
    }

    fn key(session: &Session, label: &str) -> ObjectHandle {
        let found = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap();
        assert_eq!(found.len(), 1, "key {label}");
        found[0]
    }

    /// Sets the key's CKA_DECRYPT (the tenant's revocation switch).
    pub fn set_decrypt(&self, label: &str, allowed: bool) {
        let session = self.admin();
        let key = Self::key(&session, label);
        session
            .update_attributes(key, &[Attribute::Decrypt(allowed)])
            .unwrap();
    }

    /// Destroys the key.
    pub fn delete_key(&self, label: &str) {
        let session = self.admin();
        let key = Self::key(&session, label);
        session.destroy_object(key).unwrap();
    }
}
