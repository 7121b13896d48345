//! Who signs checkpoints: the [`CheckpointSigner`] port, and the local Ed25519 key file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use zeroize::Zeroizing;

use super::sha256;
use crate::keys::load_or_create_key_file;
use crate::{GuardError, Result};

/// The `algorithm` of an Ed25519 signature (RFC 8032, pure Ed25519).
pub const ED25519: &str = "ed25519";

/// The bytes a checkpoint signature input starts with (domain separation and format version).
pub const SIGNING_INPUT_PREFIX: &[u8] = b"rxflow-audit-checkpoint/v1\n";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Signs checkpoints. The AWS adapter maps this onto KMS `Sign` with an asymmetric key.
///
/// Errors: [`GuardError::KeyUnavailable`] when the key cannot be reached or refuses to sign.
#[async_trait]
pub trait CheckpointSigner: Send + Sync {
    /// Which key signs (`local-ed25519:<fingerprint>`, a KMS key ARN); written into checkpoints.
    fn key_id(&self) -> &str;
    /// The signature algorithm written into checkpoints ([`ED25519`]).
    fn algorithm(&self) -> &str;
    /// The public key, in the form the algorithm's verifier takes (raw 32 bytes for Ed25519).
    fn public_key(&self) -> Vec<u8>;
    /// Signs `msg` (a checkpoint's signing input).
    async fn sign(&self, msg: &[u8]) -> Result<Vec<u8>>;
}

/// An Ed25519 key in a PKCS#8 file (mode 0600), created on first use, with its public key
/// written beside it (`<name>.pub`, PEM with the hex in a comment) for outside verifiers.
pub struct LocalSigner {
    key: Ed25519KeyPair,
    key_id: String,
    public_path: PathBuf,
}

impl std::fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSigner")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl LocalSigner {
    /// Loads the PKCS#8 key at `path` (`keys/audit-signing.pk8` in a data directory), creating
    /// it on first use, and (re)writes the public key file beside it.
    pub fn open_or_create(path: &Path) -> Result<Self> {
        let pkcs8 = load_or_create_key_file(path, || {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| {
                GuardError::KeyUnavailable("the system random generator failed".into())
            })?;
            Ok(Zeroizing::new(doc.as_ref().to_vec()))
        })?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
            GuardError::Config(format!(
                "key file {} does not hold an Ed25519 PKCS#8 key ({e}); restore the original \
                 signing key, or move it away to start a new one (older checkpoints stay \
                 verifiable with the old public key only)",
                path.display()
            ))
        })?;
        let public = key.public_key().as_ref().to_vec();
        let signer = LocalSigner {
            key_id: format!("local-ed25519:{}", hex::encode(&sha256(&[&public])[..8])),
            public_path: path.with_extension("pub"),
            key,
        };
        signer.write_public_key()?;
        Ok(signer)
    }

    /// Where the public key file is.
    pub fn public_key_path(&self) -> &Path {
        &self.public_path
    }

    /// The public key file's text: a comment with the key id and hex, then the PEM.
    pub fn public_key_file_text(&self) -> String {
        let raw = self.key.public_key().as_ref();
        format!(
            "# rxflow audit checkpoint signing key, {ED25519}, key id {}\n# hex: {}\n{}",
            self.key_id,
            hex::encode(raw),
            ed25519_public_key_pem(raw)
        )
    }

    fn write_public_key(&self) -> Result<()> {
        let text = self.public_key_file_text();
        if fs::read_to_string(&self.public_path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let io = |e| GuardError::Io {
            path: self.public_path.display().to_string(),
            source: e,
        };
        let tmp = self
            .public_path
            .with_extension(format!("pub.{}.tmp", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.public_path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

#[async_trait]
impl CheckpointSigner for LocalSigner {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn algorithm(&self) -> &str {
        ED25519
    }

    fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    async fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        Ok(self.key.sign(msg).as_ref().to_vec())
    }
}

/// An Ed25519 public key as a PEM SubjectPublicKeyInfo (`openssl pkey -pubin` reads it).
pub fn ed25519_public_key_pem(raw: &[u8]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

/// Reads an Ed25519 public key given as 64 hex digits, as a PEM SubjectPublicKeyInfo, or as
/// the text of a `.pub` file [`LocalSigner`] wrote. Returns the raw 32 bytes.
pub fn parse_public_key(text: &str) -> Result<Vec<u8>> {
    let bad = |why: &str| {
        GuardError::Config(format!(
            "the public key is not usable ({why}); give the 64 hex digits of an Ed25519 key or \
             its PEM (the keys/audit-signing.pub file)"
        ))
    };
    if let Some(start) = text.find("-----BEGIN PUBLIC KEY-----") {
        let body = &text[start + "-----BEGIN PUBLIC KEY-----".len()..];
        let end = body
            .find("-----END PUBLIC KEY-----")
            .ok_or_else(|| bad("the PEM has no END line"))?;
        let b64: String = body[..end].split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("the PEM is not base64"))?;
        return match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == 32 => Ok(raw.to_vec()),
            _ => Err(bad("the PEM does not hold an Ed25519 public key")),
        };
    }
    let hex_text: String = text
        .lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("# hex:").map(str::trim).unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let raw = hex::decode(hex_text.trim()).map_err(|_| bad("not hex"))?;
    if raw.len() != 32 {
        return Err(bad("an Ed25519 public key has 32 bytes"));
    }
    Ok(raw)
}
