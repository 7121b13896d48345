//! Data keys for envelope encryption: the [`KeyProvider`] port and the local provider.
//!
//! A provider hands out 256-bit data keys together with a *wrapped* copy (encrypted under a
//! key-encryption key the provider keeps). The wrapped copy travels with every sealed value; the
//! plaintext copy lives only in memory. The AWS adapter maps this port onto KMS
//! `GenerateDataKey` / `Decrypt` with the same encryption context; [`LocalKeyProvider`] keeps the
//! key-encryption key in a 0600 file for the embedded default.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::digest;
use zeroize::Zeroizing;

use crate::{GuardError, Result};

/// The encryption context bound to a data key (KMS `EncryptionContext`). A wrapped key only
/// unwraps under the exact same context, so a tenant's keys are useless for another tenant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncryptionContext(pub BTreeMap<String, String>);

impl EncryptionContext {
    /// `{"app": "rxflow", "tenant": <tenant>}`.
    pub fn for_tenant(tenant: &str) -> Self {
        let mut map = BTreeMap::new();
        map.insert("app".to_string(), "rxflow".to_string());
        map.insert("tenant".to_string(), tenant.to_string());
        EncryptionContext(map)
    }

    /// Unambiguous bytes of the context (length-prefixed pairs in key order), used as AAD.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"rxflow-encryption-context/v1");
        for (k, v) in &self.0 {
            push_len_prefixed(&mut out, k.as_bytes());
            push_len_prefixed(&mut out, v.as_bytes());
        }
        out
    }
}

fn push_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A fresh data key: use `plaintext` to encrypt, store `wrapped` beside the ciphertext.
pub struct DataKey {
    pub plaintext: Zeroizing<[u8; 32]>,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"<redacted>")
            .field("wrapped_len", &self.wrapped.len())
            .finish()
    }
}

/// Where data keys come from (KMS in the cloud, a local key file embedded).
///
/// Errors: [`GuardError::KeyUnavailable`] when the service cannot be reached or refuses;
/// [`GuardError::Integrity`] when a wrapped key does not unwrap under the given context
/// (altered, or belonging to another tenant).
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Which key-encryption key this provider uses (KMS key ARN, `local:<fingerprint>`).
    fn key_id(&self) -> &str;
    async fn generate_data_key(&self, ctx: &EncryptionContext) -> Result<DataKey>;
    async fn decrypt_data_key(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Zeroizing<[u8; 32]>>;
}

/// Format byte of a data key wrapped by [`LocalKeyProvider`].
const LOCAL_WRAP_V1: u8 = 0x01;
/// Bytes of the key-encryption-key fingerprint carried in a wrapped key.
const KEK_ID_LEN: usize = 8;
/// version + kek id + nonce + key + tag
const LOCAL_WRAPPED_LEN: usize = 1 + KEK_ID_LEN + NONCE_LEN + 32 + 16;

/// Key-encryption key in `<dir>/kek.key` (32 random bytes, mode 0600). Data keys are random
/// 256-bit keys wrapped with AES-256-GCM under the key-encryption key, with the encryption
/// context as associated data.
///
/// Wrapped layout (69 bytes): `0x01 | kek fingerprint (8) | nonce (12) | encrypted key (32) | tag (16)`.
pub struct LocalKeyProvider {
    kek: LessSafeKey,
    kek_fingerprint: [u8; KEK_ID_LEN],
    key_id: String,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyProvider")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl LocalKeyProvider {
    /// File name of the key-encryption key inside the key directory.
    pub const KEK_FILE: &'static str = "kek.key";

    /// Load `<dir>/kek.key`, creating the directory and a new random key (0600) on first use.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::KEK_FILE);
        let kek = load_or_create_secret(&path)?;
        let unbound = UnboundKey::new(&AES_256_GCM, kek.as_ref()).map_err(|_| {
            GuardError::Config(format!(
                "key file {} does not hold an AES-256 key",
                path.display()
            ))
        })?;
        // A fingerprint of the key (never the key): tells "wrapped by another key file" apart
        // from "altered" when unwrapping.
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"rxflow-kek-fingerprint/v1");
        ctx.update(kek.as_ref());
        let fp = ctx.finish();
        let mut kek_fingerprint = [0u8; KEK_ID_LEN];
        kek_fingerprint.copy_from_slice(&fp.as_ref()[..KEK_ID_LEN]);
        Ok(LocalKeyProvider {
            kek: LessSafeKey::new(unbound),
            key_id: format!("local:{}", hex::encode(kek_fingerprint)),
            kek_fingerprint,
        })
    }
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn generate_data_key(&self, ctx: &EncryptionContext) -> Result<DataKey> {
        let mut plaintext = Zeroizing::new([0u8; 32]);
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(plaintext.as_mut())
            .and_then(|_| aws_lc_rs::rand::fill(&mut nonce))
            .map_err(|_| GuardError::KeyUnavailable("the system random generator failed".into()))?;
        let mut wrapped = Vec::with_capacity(LOCAL_WRAPPED_LEN);
        wrapped.push(LOCAL_WRAP_V1);
        wrapped.extend_from_slice(&self.kek_fingerprint);
        wrapped.extend_from_slice(&nonce);
        let body_at = wrapped.len();
        wrapped.extend_from_slice(plaintext.as_ref());
        let aad = ctx.canonical_bytes();
        let tag = self
            .kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut wrapped[body_at..],
            )
            .map_err(|_| GuardError::KeyUnavailable("wrapping a data key failed".into()))?;
        wrapped.extend_from_slice(tag.as_ref());
        Ok(DataKey { plaintext, wrapped })
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Zeroizing<[u8; 32]>> {
        if wrapped.len() != LOCAL_WRAPPED_LEN || wrapped[0] != LOCAL_WRAP_V1 {
            return Err(GuardError::Format(format!(
                "wrapped data key is not a local v1 key ({} bytes)",
                wrapped.len()
            )));
        }
        let fp = &wrapped[1..1 + KEK_ID_LEN];
        if fp != self.kek_fingerprint {
            return Err(GuardError::KeyUnavailable(format!(
                "data key was wrapped by key local:{}, but this key directory holds {}; \
                 point the data directory at the key file that sealed the data",
                hex::encode(fp),
                self.key_id
            )));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[1 + KEK_ID_LEN..1 + KEK_ID_LEN + NONCE_LEN]);
        let mut buf = Zeroizing::new([0u8; 48]);
        buf.copy_from_slice(&wrapped[1 + KEK_ID_LEN + NONCE_LEN..]);
        let aad = ctx.canonical_bytes();
        let opened = self
            .kek
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                buf.as_mut(),
            )
            .map_err(|_| GuardError::Integrity("wrapped data key".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(opened);
        Ok(key)
    }
}

/// Load a 32-byte secret from `path`, or create it (32 random bytes, mode 0600) if absent.
/// Used for the key-encryption key and the blind-index key. A file readable by group or
/// others is refused.
pub fn load_or_create_secret(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let bytes = load_or_create_key_file(path, || {
        let mut k = Zeroizing::new(vec![0u8; 32]);
        aws_lc_rs::rand::fill(&mut k[..])
            .map_err(|_| GuardError::KeyUnavailable("the system random generator failed".into()))?;
        Ok(k)
    })?;
    if bytes.len() != 32 {
        return Err(GuardError::Config(format!(
            "key file {} holds {} bytes, expected 32; restore the original file \
             (a new key cannot open data sealed with the old one)",
            path.display(),
            bytes.len()
        )));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn io_err(path: &Path, source: std::io::Error) -> GuardError {
    GuardError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Read a key file with 0600 checks, or create it atomically with the bytes `generate` gives.
///
/// Creation writes a private temporary file and hard-links it into place, so two processes
/// starting together never see a half-written key and never overwrite each other's key.
pub(crate) fn load_or_create_key_file(
    path: &Path,
    generate: impl FnOnce() -> Result<Zeroizing<Vec<u8>>>,
) -> Result<Zeroizing<Vec<u8>>> {
    match read_key_file(path) {
        Ok(bytes) => return Ok(bytes),
        Err(GuardError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    let bytes = generate()?;
    let tmp = temp_path(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = private_create_new(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp, e));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(bytes),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(io_err(path, e)),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut nonce = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut nonce);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".into());
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        hex::encode(nonce)
    ))
}

/// A digest (SHA-256) of a key file as it is now, to tell later whether it was replaced; the
/// file is only read, never created.
pub fn key_file_print(path: &Path) -> Result<[u8; 32]> {
    let bytes = read_key_file(path)?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    check_private(path, &meta)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    f.read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    Ok(bytes)
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(GuardError::Config(format!(
            "key file {} is readable by group or others (mode {:o}); run `chmod 600 {}` and retry",
            path.display(),
            mode,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: &fs::Metadata) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn private_create_new(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_create_new(path: &Path) -> std::io::Result<fs::File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))
}
