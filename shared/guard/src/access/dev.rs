//! A local token issuer for development, `rxflow token` and tests.
//!
//! It keeps an Ed25519 key in `<dir>/dev-signing.pk8` (PKCS#8, mode 0600, created on first use)
//! and publishes the public half as `<dir>/jwks.json`, so a server started on the same data dir
//! with [`JwksSource::File`](super::JwksSource::File) trusts its tokens. Never point a production
//! verifier at it: anyone who can read the data dir can mint tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use zeroize::Zeroizing;

use super::{JwksSource, JwtConfig, JwtVerifier, Role};
use crate::{GuardError, Result};

/// `iss` of dev tokens.
pub const DEV_ISSUER: &str = "rxflow-dev";
/// `aud` of dev tokens.
pub const DEV_AUDIENCE: &str = "rxflow";
const KEY_FILE: &str = "dev-signing.pk8";
const JWKS_FILE: &str = "jwks.json";

/// Who a dev token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevClaims {
    pub subject: String,
    pub role: Role,
    pub tenant: String,
    /// Adds `mfa` to `amr`.
    pub mfa: bool,
    pub npi: Option<String>,
}

/// The local dev token issuer.
pub struct DevIssuer {
    dir: PathBuf,
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("dir", &self.dir)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuardError + '_ {
    move |source| GuardError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a new secret file readable by its owner only; fails if it exists.
fn create_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(GuardError::Config(format!(
            "{} is readable by other users (mode {:o}); run `chmod 600` on it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<()> {
    Ok(())
}

impl DevIssuer {
    /// Opens the dev key in `dir`, creating the directory, the key (0600) and `jwks.json` on
    /// first use. `jwks.json` is rewritten from the key every time.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            let pair = Ed25519KeyPair::generate()
                .map_err(|_| GuardError::Config("could not generate an Ed25519 key".to_string()))?;
            let doc = pair
                .to_pkcs8()
                .map_err(|_| GuardError::Config("could not encode the Ed25519 key".to_string()))?;
            match create_secret_file(&key_path, doc.as_ref()) {
                Ok(()) => {}
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&key_path)(e)),
            }
        }
        check_private(&key_path)?;
        let pkcs8 = Zeroizing::new(std::fs::read(&key_path).map_err(io_err(&key_path))?);
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
            GuardError::Config(format!(
                "{} is not an Ed25519 PKCS#8 key; delete it to create a new dev key",
                key_path.display()
            ))
        })?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public);
        let kid = format!("rxflow-dev-{}", &hex::encode(digest.as_ref())[..16]);
        let jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::EdDSA),
                key_id: Some(kid.clone()),
                ..Default::default()
            },
            algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: URL_SAFE_NO_PAD.encode(&public),
            }),
        };
        let issuer = DevIssuer {
            dir: dir.to_path_buf(),
            kid,
            encoding: EncodingKey::from_ed_der(&pkcs8),
            jwk,
        };
        let jwks_path = issuer.jwks_path();
        let json = serde_json::to_vec_pretty(&issuer.jwks())
            .map_err(|e| GuardError::Config(format!("could not write the dev JWKS: {e}")))?;
        std::fs::write(&jwks_path, json).map_err(io_err(&jwks_path))?;
        Ok(issuer)
    }

    pub fn issuer(&self) -> &'static str {
        DEV_ISSUER
    }

    pub fn audience(&self) -> &'static str {
        DEV_AUDIENCE
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `<dir>/jwks.json`: point [`JwksSource::File`] at it.
    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join(JWKS_FILE)
    }

    /// The public key set (one Ed25519 key).
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwk.clone()],
        }
    }

    /// The verifier settings that accept this issuer's tokens.
    pub fn config(&self) -> JwtConfig {
        JwtConfig::new(DEV_ISSUER, DEV_AUDIENCE)
    }

    /// A verifier that trusts this issuer (reading its `jwks.json`).
    pub fn verifier(&self) -> Result<JwtVerifier> {
        JwtVerifier::new(self.config(), JwksSource::File(self.jwks_path()))
    }

    /// A token for `claims`, valid from now for `ttl`.
    pub fn issue(&self, claims: &DevClaims, ttl: std::time::Duration) -> Result<String> {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let amr: Vec<&str> = if claims.mfa {
            vec!["pwd", "mfa"]
        } else {
            vec!["pwd"]
        };
        let mut body = serde_json::json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "sub": claims.subject,
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add(ttl),
            "role": claims.role.as_str(),
            "tenant": claims.tenant,
            "amr": amr,
        });
        if let Some(npi) = &claims.npi {
            body["npi"] = serde_json::Value::String(npi.clone());
        }
        self.sign_json(&body)
    }

    /// Signs an arbitrary claim set with the dev key (EdDSA, this issuer's kid). For tests and
    /// tooling that need tokens `issue` does not make (e.g. already expired).
    pub fn sign_json(&self, claims: &serde_json::Value) -> Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding)
            .map_err(|e| GuardError::Config(format!("could not sign a dev token: {e}")))
    }
}
