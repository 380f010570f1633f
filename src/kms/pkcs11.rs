//! The PKCS#11 provider (HSMs: Thales Luna, Entrust nShield, CloudHSM,
//! YubiHSM, SoftHSM2): DEKs are sealed with AES-GCM inside the token under
//! the tenant's AES key, with the tenant id and DEK id as associated data.
//! A key is usable while it exists and has CKA_ENCRYPT and CKA_DECRYPT set;
//! the tenant revokes by clearing CKA_DECRYPT (or CKA_ENCRYPT) or deleting it.
//!
//! Cryptoki calls block, so every call runs on tokio's blocking pool with a
//! session taken from a bounded pool; a call that outlives its deadline is
//! reported as unavailable, never waited on by a client session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};
use crate::crypto::Dek;

/// Deadline of one token call, queueing for a session included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Sessions opened at most when the policy does not say.
const DEFAULT_SESSIONS: usize = 8;
/// First byte of an EDEK sealed by this provider (AES-GCM, 96-bit IV).
const FORMAT_GCM: u8 = 1;
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
/// Separates this provider's AAD from any other use of the tenant's key.
const AAD_LABEL: &[u8] = b"cmk-proxy/pkcs11/v1";

/// Where the token's user PIN comes from (never the policy file itself).
#[derive(Debug, Clone)]
pub enum PinSource {
    /// A file holding the PIN (trailing newline ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    fn read(&self) -> Result<AuthPin, KmsError> {
        let text = match self {
            PinSource::File(path) => {
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    KmsError::Config(format!("pkcs11 pin_file {}: {e}", path.display()))
                })?)
            }
            PinSource::Env(var) => Zeroizing::new(
                std::env::var(var)
                    .map_err(|_| KmsError::Config(format!("pkcs11 pin_env: ${var} is not set")))?,
            ),
        };
        let pin = text.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(KmsError::Config("pkcs11 PIN is empty".to_owned()));
        }
        Ok(AuthPin::from(pin.to_owned()))
    }
}

/// Loaded modules, one initialised context per library path: PKCS#11 allows
/// one `C_Initialize` per process, and a second context would finalise the
/// first one's sessions.
pub fn load_module(module: &Path) -> Result<Pkcs11, KmsError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut loaded = MODULES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| KmsError::Config("pkcs11 module table poisoned".to_owned()))?;
    if let Some(ctx) = loaded.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| KmsError::Config(format!("pkcs11 module {}: {e}", module.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KmsError::Config(format!(
                "pkcs11 module {}: C_Initialize: {e}",
                module.display()
            )))
        }
    }
    loaded.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

/// Opens a read-write session on `slot` and logs the user in (PKCS#11
/// login is per token and application, so a second login is a no-op).
pub fn open_user_session(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &AuthPin,
) -> cryptoki::error::Result<Session> {
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e),
    }
}

/// The slot holding the token labelled `token`.
pub fn find_token(ctx: &Pkcs11, token: &str) -> Result<Slot, KmsError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| KmsError::Config(format!("pkcs11 C_GetSlotList: {e}")))?;
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| KmsError::Config(format!("pkcs11 C_GetTokenInfo: {e}")))?;
        if info.label().trim_end() == token {
            return Ok(slot);
        }
    }
    Err(KmsError::Config(format!(
        "pkcs11: no initialised token labelled '{token}'"
    )))
}

/// The pool's shared state: the module, the token's slot, the PIN and the
/// idle sessions.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    idle: Mutex<Vec<Session>>,
    /// One permit per session that may be open at once.
    permits: Arc<Semaphore>,
    handles: Handles,
}

impl Token {
    fn take_session(&self) -> cryptoki::error::Result<Session> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(session) => Ok(session),
            None => open_user_session(&self.ctx, self.slot, &self.pin),
        }
    }

    fn give_back(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
    }
}

/// `KeyProvider` over a PKCS#11 token.
#[derive(Clone)]
pub struct Pkcs11Provider {
    token: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("slot", &self.token.slot.id())
            .field("pin", &"<redacted>")
            .finish()
    }
}

impl Pkcs11Provider {
    /// Loads `module`, finds the token labelled `token`, logs in with the
    /// PIN and checks that the token offers AES-GCM.
    pub fn open(
        module: &Path,
        token: &str,
        pin: &PinSource,
        sessions: Option<usize>,
    ) -> Result<Pkcs11Provider, KmsError> {
        let pin = pin.read()?;
        let ctx = load_module(module)?;
        let slot = find_token(&ctx, token)?;
        let mechanisms = ctx
            .get_mechanism_list(slot)
            .map_err(|e| KmsError::Config(format!("pkcs11 C_GetMechanismList: {e}")))?;
        if !mechanisms.contains(&MechanismType::AES_GCM) {
            return Err(KmsError::Config(format!(
                "pkcs11 token '{token}' does not offer CKM_AES_GCM"
            )));
        }
        // Logging in now reports a wrong PIN at start-up, and this first
        // session stays in the pool so the login outlives idle periods.
        let first = open_user_session(&ctx, slot, &pin)
            .map_err(|e| KmsError::Config(format!("pkcs11 login to token '{token}': {e}")))?;
        let sessions = sessions.unwrap_or(DEFAULT_SESSIONS).max(1);
        Ok(Pkcs11Provider {
            token: Arc::new(Token {
                ctx,
                slot,
                pin,
                idle: Mutex::new(vec![first]),
                permits: Arc::new(Semaphore::new(sessions)),
                handles: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Runs `op` with a pooled session on the blocking pool. A session that
    /// saw a device or session error is closed rather than reused.
    async fn call<T, F>(&self, key_ref: &str, op: F) -> Result<T, KmsError>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &Handles, &str) -> Result<T, KmsError> + Send + 'static,
    {
        let token = Arc::clone(&self.token);
        let owned_ref = key_ref.to_owned();
        let join_ref = key_ref.to_owned();
        let work = async move {
            let permit = Arc::clone(&token.permits)
                .acquire_owned()
                .await
                .map_err(|_| transient(&owned_ref, "session pool closed"))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let session = token
                    .take_session()
                    .map_err(|e| map_ck_error(&owned_ref, "C_OpenSession/C_Login", e))?;
                let result = op(&session, &token.handles, &owned_ref);
                if !matches!(result, Err(KmsError::Transient { .. })) {
                    token.give_back(session);
                }
                result
            })
            .await
            .map_err(|e| transient(&join_ref, &format!("call failed: {e}")))?
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(transient(key_ref, "token did not answer in time")))
    }
}

fn transient(key_ref: &str, detail: &str) -> KmsError {
    KmsError::Transient {
        key_ref: key_ref.to_owned(),
        detail: format!("pkcs11: {detail}"),
    }
}

fn denied(key_ref: &str, reason: DenialReason, detail: String) -> KmsError {
    KmsError::Denied {
        key_ref: key_ref.to_owned(),
        reason,
        detail,
    }
}

/// The search template of a key reference: `id:HEX` for CKA_ID, otherwise
/// the key's CKA_LABEL.
fn key_template(key_ref: &str) -> Result<Vec<Attribute>, KmsError> {
    let mut template = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
    match key_ref.strip_prefix("id:") {
        Some(hex) => {
            let mut id = vec![0u8; hex.len() / 2];
            faster_hex::hex_decode(hex.as_bytes(), &mut id)
                .map_err(|_| KmsError::Config(format!("pkcs11 key ref '{key_ref}': bad hex id")))?;
            template.push(Attribute::Id(id));
        }
        None => template.push(Attribute::Label(key_ref.as_bytes().to_vec())),
    }
    Ok(template)
}

/// Object handles of keys already found, by key ref: `C_FindObjects`
/// scans the whole token on some HSMs (SoftHSM2 re-reads every object
/// file), so it runs once per key, not once per call.
type Handles = Mutex<HashMap<String, ObjectHandle>>;

/// Finds the tenant's key and confirms it may still encrypt and decrypt.
/// A remembered handle is used only while it still names an object with
/// this key's label or id; otherwise the key is looked up again.
fn usable_key(
    session: &Session,
    handles: &Handles,
    key_ref: &str,
) -> Result<ObjectHandle, KmsError> {
    let template = key_template(key_ref)?;
    let remembered = handles.lock().ok().and_then(|h| h.get(key_ref).copied());
    if let Some(key) = remembered {
        match key_attributes(session, key) {
            Ok(attrs) if names_key(&attrs, &template) => {
                key_state_outcome(key_ref, &attrs)?;
                return Ok(key);
            }
            Ok(_)
            | Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) => {
                if let Ok(mut h) = handles.lock() {
                    h.remove(key_ref);
                }
            }
            Err(e) => return Err(map_ck_error(key_ref, "C_GetAttributeValue", e)),
        }
    }
    let found = session
        .find_objects(&template)
        .map_err(|e| map_ck_error(key_ref, "C_FindObjects", e))?;
    let key = match found.as_slice() {
        [one] => *one,
        [] => {
            return Err(denied(
                key_ref,
                DenialReason::NotFound,
                "no secret key with this reference in the token".to_owned(),
            ))
        }
        many => {
            return Err(denied(
                key_ref,
                DenialReason::NotFound,
                format!("{} secret keys share this reference", many.len()),
            ))
        }
    };
    let attrs = key_attributes(session, key)
        .map_err(|e| map_ck_error(key_ref, "C_GetAttributeValue", e))?;
    key_state_outcome(key_ref, &attrs)?;
    if let Ok(mut h) = handles.lock() {
        h.insert(key_ref.to_owned(), key);
    }
    Ok(key)
}

fn key_attributes(session: &Session, key: ObjectHandle) -> cryptoki::error::Result<Vec<Attribute>> {
    session.get_attributes(
        key,
        &[
            AttributeType::Class,
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::KeyType,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
        ],
    )
}

/// True when `attrs` carry every attribute of the search `template`.
fn names_key(attrs: &[Attribute], template: &[Attribute]) -> bool {
    template.iter().all(|want| attrs.contains(want))
}

/// Usable only as an AES key with CKA_ENCRYPT and CKA_DECRYPT both true; an
/// attribute the token does not report counts as false.
fn key_state_outcome(key_ref: &str, attrs: &[Attribute]) -> Result<(), KmsError> {
    let (mut aes, mut encrypt, mut decrypt) = (false, false, false);
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) => aes = *t == KeyType::AES,
            Attribute::Encrypt(b) => encrypt = *b,
            Attribute::Decrypt(b) => decrypt = *b,
            _ => {}
        }
    }
    if !aes {
        return Err(denied(
            key_ref,
            DenialReason::AccessDenied,
            "not an AES key".to_owned(),
        ));
    }
    if !(encrypt && decrypt) {
        return Err(denied(
            key_ref,
            DenialReason::Disabled,
            format!("key has CKA_ENCRYPT={encrypt}, CKA_DECRYPT={decrypt}"),
        ));
    }
    Ok(())
}

/// Maps a Cryptoki error: the key's own refusals are denials, token and
/// session trouble (and the proxy's own PIN) are transient.
fn map_ck_error(key_ref: &str, function: &str, err: CkError) -> KmsError {
    let detail = format!("{function}: {err}");
    let CkError::Pkcs11(rv, _) = err else {
        return transient(key_ref, &detail);
    };
    match rv {
        RvError::KeyFunctionNotPermitted => denied(key_ref, DenialReason::Disabled, detail),
        RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => {
            denied(key_ref, DenialReason::NotFound, detail)
        }
        RvError::KeyTypeInconsistent | RvError::KeySizeRange | RvError::MechanismInvalid => {
            denied(key_ref, DenialReason::AccessDenied, detail)
        }
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
            denied(key_ref, DenialReason::InvalidCiphertext, detail)
        }
        _ => transient(key_ref, &detail),
    }
}

fn seal(
    session: &Session,
    handles: &Handles,
    key_ref: &str,
    aad: &[u8],
    dek: &[u8],
) -> Result<Vec<u8>, KmsError> {
    let key = usable_key(session, handles, key_ref)?;
    let mut iv = [0u8; IV_LEN];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let sealed = {
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
            .map_err(|e| map_ck_error(key_ref, "GCM parameters", e))?;
        session
            .encrypt(&Mechanism::AesGcm(params), key, dek)
            .map_err(|e| map_ck_error(key_ref, "C_Encrypt", e))?
    };
    let mut edek = Vec::with_capacity(1 + IV_LEN + sealed.len());
    edek.push(FORMAT_GCM);
    edek.extend_from_slice(&iv);
    edek.extend_from_slice(&sealed);
    Ok(edek)
}

fn open(
    session: &Session,
    handles: &Handles,
    key_ref: &str,
    aad: &[u8],
    edek: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let bad = || {
        denied(
            key_ref,
            DenialReason::InvalidCiphertext,
            "not an EDEK of the pkcs11 provider".to_owned(),
        )
    };
    let (format, rest) = edek.split_first().ok_or_else(bad)?;
    if *format != FORMAT_GCM || rest.len() <= IV_LEN {
        return Err(bad());
    }
    let (iv, sealed) = rest.split_at(IV_LEN);
    let mut iv: [u8; IV_LEN] = iv.try_into().map_err(|_| bad())?;
    let key = usable_key(session, handles, key_ref)?;
    match gcm_decrypt(session, key, &mut iv, aad, sealed) {
        Ok(plain) => Ok(plain),
        // SoftHSM2 (and others) answer a failed tag check with
        // CKR_GENERAL_ERROR, which also means a sick token: a round trip of
        // a probe under the same key tells which.
        Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _))
            if probe_round_trip(session, key) =>
        {
            Err(bad())
        }
        Err(e) => Err(map_ck_error(key_ref, "C_Decrypt", e)),
    }
}

fn gcm_decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &mut [u8; IV_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> cryptoki::error::Result<Zeroizing<Vec<u8>>> {
    let params = GcmParams::new(iv, aad, TAG_BITS.into())?;
    session
        .decrypt(&Mechanism::AesGcm(params), key, sealed)
        .map(Zeroizing::new)
}

/// True when the token seals and opens a probe under `key`: it is healthy.
fn probe_round_trip(session: &Session, key: ObjectHandle) -> bool {
    let probe = b"cmk-proxy probe";
    let mut iv = [0u8; IV_LEN];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let sealed = GcmParams::new(&mut iv, AAD_LABEL, TAG_BITS.into())
        .and_then(|params| session.encrypt(&Mechanism::AesGcm(params), key, probe));
    match sealed {
        Ok(sealed) => gcm_decrypt(session, key, &mut iv, AAD_LABEL, &sealed)
            .is_ok_and(|plain| plain.as_slice() == probe),
        Err(_) => false,
    }
}

#[async_trait::async_trait]
impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    async fn wrap(&self, key_ref: &str, ctx: &KeyContext<'_>, dek: &Dek) -> Result<Edek, KmsError> {
        let aad = ctx.associated_data(AAD_LABEL)?;
        let plain = Zeroizing::new(dek.expose_bytes().to_vec());
        let sealed = self
            .call(key_ref, move |session, handles, key_ref| {
                seal(session, handles, key_ref, &aad, &plain)
            })
            .await?;
        Ok(Edek(sealed))
    }

    async fn unwrap(
        &self,
        key_ref: &str,
        ctx: &KeyContext<'_>,
        edek: &Edek,
    ) -> Result<Dek, KmsError> {
        let aad = ctx.associated_data(AAD_LABEL)?;
        let sealed = edek.0.clone();
        let plain = self
            .call(key_ref, move |session, handles, key_ref| {
                open(session, handles, key_ref, &aad, &sealed)
            })
            .await?;
        Dek::from_bytes(plain).map_err(|_| {
            denied(
                key_ref,
                DenialReason::InvalidCiphertext,
                "C_Decrypt returned a key of the wrong length".to_owned(),
            )
        })
    }

    async fn check_key(&self, key_ref: &str) -> Result<(), KmsError> {
        self.call(key_ref, |session, handles, key_ref| {
            usable_key(session, handles, key_ref).map(|_| ())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_attributes_map_to_denials() {
        let attrs = |aes, enc, dec| {
            vec![
                Attribute::KeyType(if aes { KeyType::AES } else { KeyType::DES3 }),
                Attribute::Encrypt(enc),
                Attribute::Decrypt(dec),
            ]
        };
        assert!(key_state_outcome("k", &attrs(true, true, true)).is_ok());
        for (a, reason) in [
            (attrs(true, true, false), DenialReason::Disabled),
            (attrs(true, false, true), DenialReason::Disabled),
            (attrs(false, true, true), DenialReason::AccessDenied),
            (vec![], DenialReason::AccessDenied),
        ] {
            let err = key_state_outcome("k", &a).unwrap_err();
            assert_eq!(err.denial_reason(), Some(reason));
        }
    }

    #[test]
    fn key_refs_search_by_label_or_hex_id() {
        assert!(key_template("acme")
            .unwrap()
            .contains(&Attribute::Label(b"acme".to_vec())));
        assert!(key_template("id:0a0b")
            .unwrap()
            .contains(&Attribute::Id(vec![10, 11])));
        assert!(key_template("id:zz").is_err());
    }
}
