//! The local keyring provider: master keys in a JSON file (mode 0600), for
//! development, tests and the `cmk-proxy keyring` tenant simulator. The file
//! is re-read whenever it changes, so another process can revoke a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aes_gcm_siv::aead::AeadInPlace;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit, Nonce, Tag};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::crypto::{Dek, DEK_LEN};

const FILE_VERSION: u32 = 1;
const EDEK_MAGIC: &[u8; 4] = b"CMKL";
const EDEK_FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const EDEK_HEADER_LEN: usize = EDEK_MAGIC.len() + 1 + 4 + NONCE_LEN;
const EDEK_LEN: usize = EDEK_HEADER_LEN + DEK_LEN + TAG_LEN;
const WRAP_LABEL: &[u8] = b"cmk-proxy local wrap v1";

/// Lifecycle state of a keyring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyringState {
    /// Usable for wrap and unwrap.
    Enabled,
    /// Refused until enabled again.
    Disabled,
    /// Material wiped; refused forever.
    Destroyed,
}

impl KeyringState {
    /// `enabled`, `disabled` or `destroyed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Destroyed => "destroyed",
        }
    }
}

/// One version of a master key: 32 bytes, base64 in the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyVersion {
    id: u32,
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
    material: Zeroizing<String>,
}

fn ser_secret<S: Serializer>(value: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

fn de_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// A named master key with its versions (newest last).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringEntry {
    state: KeyringState,
    versions: Vec<KeyVersion>,
}

impl KeyringEntry {
    /// Current lifecycle state.
    pub fn state(&self) -> KeyringState {
        self.state
    }

    /// Ids of the stored versions, oldest first (empty once destroyed).
    pub fn version_ids(&self) -> Vec<u32> {
        self.versions.iter().map(|v| v.id).collect()
    }

    /// The version new wraps use.
    fn current(&self) -> Option<&KeyVersion> {
        self.versions.last()
    }

    fn version(&self, id: u32) -> Option<&KeyVersion> {
        self.versions.iter().find(|v| v.id == id)
    }
}

impl std::fmt::Debug for KeyringEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringEntry")
            .field("state", &self.state)
            .field("versions", &self.version_ids())
            .field("material", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    version: u32,
    keys: BTreeMap<String, KeyringEntry>,
}

/// A keyring file in memory. Loading checks the file mode and every entry;
/// saving writes a temporary file (0600) and renames it over the original.
#[derive(Debug)]
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<String, KeyringEntry>,
}

impl Keyring {
    /// Loads an existing keyring; refuses a file accessible by group or others.
    pub fn load(path: &Path) -> Result<Keyring, KmsError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| KmsError::Config(format!("keyring {}: {e}", path.display())))?;
        check_mode(path, &meta)?;
        let raw = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| KmsError::Config(format!("keyring {}: {e}", path.display())))?,
        );
        Self::parse(path, &raw)
    }

    /// Loads the keyring, or an empty one if the file does not exist yet.
    pub fn load_or_empty(path: &Path) -> Result<Keyring, KmsError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Keyring {
                path: path.to_path_buf(),
                keys: BTreeMap::new(),
            }),
            _ => Self::load(path),
        }
    }

    fn parse(path: &Path, raw: &[u8]) -> Result<Keyring, KmsError> {
        let file: KeyringFile = serde_json::from_slice(raw).map_err(|e| {
            KmsError::Config(format!("keyring {} is not valid: {e}", path.display()))
        })?;
        if file.version != FILE_VERSION {
            return Err(KmsError::Config(format!(
                "keyring {} has version {}, this build reads version {FILE_VERSION}",
                path.display(),
                file.version
            )));
        }
        for (name, entry) in &file.keys {
            let mut last = 0;
            for v in &entry.versions {
                if v.id <= last {
                    return Err(KmsError::Config(format!(
                        "keyring {}: key {name:?} has version ids out of order",
                        path.display()
                    )));
                }
                last = v.id;
                if entry.state != KeyringState::Destroyed && decode_material(&v.material).is_none()
                {
                    return Err(KmsError::Config(format!(
                        "keyring {}: key {name:?} version {} is not 32 bytes of base64",
                        path.display(),
                        v.id
                    )));
                }
            }
            if entry.state != KeyringState::Destroyed && entry.versions.is_empty() {
                return Err(KmsError::Config(format!(
                    "keyring {}: key {name:?} has no versions",
                    path.display()
                )));
            }
        }
        Ok(Keyring {
            path: path.to_path_buf(),
            keys: file.keys,
        })
    }

    /// Loads (or starts empty when `create` and the file is missing), applies
    /// `change` and saves, all under an exclusive `flock` on `<path>.lock`,
    /// so concurrent `cmk-proxy keyring` runs cannot lose each other's edits.
    /// Readers need no lock: they only ever see whole files (rename).
    pub fn update<T>(
        path: &Path,
        create: bool,
        change: impl FnOnce(&mut Keyring) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let io = |e: std::io::Error| {
            KmsError::Config(format!("locking keyring {}: {e}", path.display()))
        };
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io)?;
        let _guard = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io(std::io::Error::from(errno)))?;
        let mut ring = if create {
            Self::load_or_empty(path)?
        } else {
            Self::load(path)?
        };
        let out = change(&mut ring)?;
        ring.save()?;
        Ok(out)
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &KeyringEntry)> {
        self.keys.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One entry.
    pub fn get(&self, name: &str) -> Option<&KeyringEntry> {
        self.keys.get(name)
    }

    /// Adds a fresh random master key `name` (version 1), or, if `name` is
    /// enabled already, a new version (master-key rotation: old EDEKs stay
    /// unwrappable). Returns the new version id. Refused for disabled and
    /// destroyed entries.
    pub fn create_key(&mut self, name: &str) -> Result<u32, KmsError> {
        if name.is_empty() {
            return Err(KmsError::Config("key name must not be empty".to_owned()));
        }
        let mut material = Zeroizing::new([0u8; DEK_LEN]);
        rand::rngs::OsRng.fill_bytes(material.as_mut());
        let encoded = Zeroizing::new(B64.encode(material.as_slice()));
        match self.keys.get_mut(name) {
            None => {
                self.keys.insert(
                    name.to_owned(),
                    KeyringEntry {
                        state: KeyringState::Enabled,
                        versions: vec![KeyVersion {
                            id: 1,
                            material: encoded,
                        }],
                    },
                );
                Ok(1)
            }
            Some(entry) => match entry.state {
                KeyringState::Enabled => {
                    let id = entry.current().map_or(0, |v| v.id).saturating_add(1);
                    entry.versions.push(KeyVersion {
                        id,
                        material: encoded,
                    });
                    Ok(id)
                }
                KeyringState::Disabled => Err(KmsError::Config(format!(
                    "key {name:?} is disabled; enable it before adding a version"
                ))),
                KeyringState::Destroyed => Err(KmsError::Config(format!(
                    "key {name:?} is destroyed; a destroyed key cannot be recreated"
                ))),
            },
        }
    }

    /// Enables or disables `name`. Destroyed keys stay destroyed.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<(), KmsError> {
        let entry = self.entry_mut(name)?;
        if entry.state == KeyringState::Destroyed {
            return Err(KmsError::Config(format!(
                "key {name:?} is destroyed and cannot be {}",
                if enabled { "enabled" } else { "disabled" }
            )));
        }
        entry.state = if enabled {
            KeyringState::Enabled
        } else {
            KeyringState::Disabled
        };
        Ok(())
    }

    /// Destroys `name`: wipes every version's material (in memory now, in
    /// the file on `save`). Irreversible.
    pub fn destroy(&mut self, name: &str) -> Result<(), KmsError> {
        let entry = self.entry_mut(name)?;
        entry.state = KeyringState::Destroyed;
        entry.versions.clear();
        Ok(())
    }

    fn entry_mut(&mut self, name: &str) -> Result<&mut KeyringEntry, KmsError> {
        let path = self.path.display().to_string();
        self.keys
            .get_mut(name)
            .ok_or_else(|| KmsError::Config(format!("no key named {name:?} in keyring {path}")))
    }

    /// Writes the keyring atomically: a 0600 temporary file in the same
    /// directory, fsync, rename over the target.
    pub fn save(&self) -> Result<(), KmsError> {
        let io = |e: std::io::Error| {
            KmsError::Config(format!("writing keyring {}: {e}", self.path.display()))
        };
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Serialize through a borrowed view to avoid cloning key material.
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&KeyringFileRef {
                version: FILE_VERSION,
                keys: &self.keys,
            })
            .map_err(|e| KmsError::Config(format!("encoding keyring: {e}")))?,
        );
        let mut tmp = tempfile::Builder::new()
            .prefix(".keyring-")
            .tempfile_in(&dir)
            .map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        tmp.write_all(&json).map_err(io)?;
        tmp.write_all(b"\n").map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct KeyringFileRef<'a> {
    version: u32,
    keys: &'a BTreeMap<String, KeyringEntry>,
}

fn decode_material(material: &str) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = Zeroizing::new(B64.decode(material.as_bytes()).ok()?);
    (bytes.len() == DEK_LEN).then_some(bytes)
}

fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), KmsError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KmsError::Config(format!(
            "keyring file {} has mode {mode:04o}: it must not be accessible by group or others (chmod 600 {})",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Identity of a file version: a rename gives a new inode, a rewrite a new mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            len: meta.len(),
        }
    }
}

/// `KeyProvider` over a keyring file; key_ref = entry name.
#[derive(Debug)]
pub struct LocalProvider {
    path: PathBuf,
    cache: Mutex<Option<(Stamp, Arc<Keyring>)>>,
}

impl LocalProvider {
    /// Opens the keyring at `path` (it must exist, mode 0600).
    pub fn open(path: &Path) -> Result<LocalProvider, KmsError> {
        let provider = LocalProvider {
            path: path.to_path_buf(),
            cache: Mutex::new(None),
        };
        provider.current()?;
        Ok(provider)
    }

    /// The keyring as it is on disk now, re-read if the file changed.
    fn current(&self) -> Result<Arc<Keyring>, KmsError> {
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| KmsError::Config(format!("keyring {}: {e}", self.path.display())))?;
        check_mode(&self.path, &meta)?;
        let stamp = Stamp::of(&meta);
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| KmsError::Config("keyring cache lock poisoned".to_owned()))?;
        if let Some((cached, ring)) = cache.as_ref() {
            if *cached == stamp {
                return Ok(Arc::clone(ring));
            }
        }
        let ring = Arc::new(Keyring::load(&self.path)?);
        *cache = Some((stamp, Arc::clone(&ring)));
        Ok(ring)
    }

    fn usable_entry<'r>(
        &self,
        ring: &'r Keyring,
        key_ref: &str,
    ) -> Result<&'r KeyringEntry, KmsError> {
        let deny = |reason, detail: &str| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason,
            detail: format!("{detail} in keyring {}", self.path.display()),
        };
        let entry = ring
            .get(key_ref)
            .ok_or_else(|| deny(DenialReason::NotFound, "no such key"))?;
        match entry.state {
            KeyringState::Enabled => Ok(entry),
            KeyringState::Disabled => Err(deny(DenialReason::Disabled, "key is disabled")),
            KeyringState::Destroyed => Err(deny(DenialReason::Destroyed, "key is destroyed")),
        }
    }
}

fn wrap_aad(key_ref: &str, ctx: &KeyContext<'_>, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_LABEL.len() + 32 + ctx.tenant_id.len() + key_ref.len());
    aad.extend_from_slice(WRAP_LABEL);
    for field in [ctx.tenant_id.as_bytes(), key_ref.as_bytes()] {
        aad.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        aad.extend_from_slice(field);
    }
    aad.extend_from_slice(ctx.dek_id.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn master_cipher(key_ref: &str, v: &KeyVersion) -> Result<Aes256GcmSiv, KmsError> {
    let bytes = decode_material(&v.material).ok_or_else(|| {
        KmsError::Config(format!("key {key_ref:?} version {} has bad material", v.id))
    })?;
    Ok(Aes256GcmSiv::new(bytes.as_slice().into()))
}

#[async_trait::async_trait]
impl KeyProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        let ring = self.current()?;
        let entry = self.usable_entry(&ring, key_ref)?;
        let version = entry.current().ok_or_else(|| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::Destroyed,
            detail: "key has no material".to_owned(),
        })?;
        let cipher = master_cipher(key_ref, version)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(EDEK_LEN);
        out.extend_from_slice(EDEK_MAGIC);
        out.push(EDEK_FORMAT);
        out.extend_from_slice(&version.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(dek.expose_bytes());
        let aad = wrap_aad(key_ref, ctx, version.id);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[EDEK_HEADER_LEN..])
            .map_err(|_| KmsError::Config("local wrap failed".to_owned()))?;
        out.extend_from_slice(&tag);
        Ok(Edek(out))
    }

    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        let ring = self.current()?;
        let entry = self.usable_entry(&ring, key_ref)?;
        let invalid = |detail: &str| KmsError::Denied {
            key_ref: key_ref.to_owned(),
            reason: DenialReason::InvalidCiphertext,
            detail: detail.to_owned(),
        };
        let e = &edek.0;
        if e.len() != EDEK_LEN || !e.starts_with(EDEK_MAGIC) || e[EDEK_MAGIC.len()] != EDEK_FORMAT {
            return Err(invalid("not a local-keyring EDEK"));
        }
        let at = EDEK_MAGIC.len() + 1;
        let mut id = [0u8; 4];
        id.copy_from_slice(&e[at..at + 4]);
        let version_id = u32::from_be_bytes(id);
        let version = entry
            .version(version_id)
            .ok_or_else(|| invalid(&format!("key has no version {version_id}")))?;
        let cipher = master_cipher(key_ref, version)?;
        let nonce = Nonce::from_slice(&e[at + 4..EDEK_HEADER_LEN]);
        let mut plain = Zeroizing::new(e[EDEK_HEADER_LEN..EDEK_HEADER_LEN + DEK_LEN].to_vec());
        let tag = Tag::from_slice(&e[EDEK_HEADER_LEN + DEK_LEN..]);
        cipher
            .decrypt_in_place_detached(nonce, &wrap_aad(key_ref, ctx, version_id), &mut plain, tag)
            .map_err(|_| invalid("EDEK does not match this key, tenant and dek_id"))?;
        Dek::from_bytes(plain).map_err(|_| invalid("unwrapped key has the wrong length"))
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        let ring = self.current()?;
        self.usable_entry(&ring, key_ref).map(|_| ())
    }
}
