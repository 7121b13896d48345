//! Bearer-token verification against the issuer's JWKS.
//!
//! The algorithm of a token is fixed by the key its `kid` names (RSA → RS256, P-256 → ES256,
//! Ed25519 → EdDSA), never by the token alone; symmetric keys in a JWKS are ignored and HMAC
//! tokens are always refused, since rxflow trusts only public keys. Keys the token carries in
//! its own header (`jwk`, `jku`, `x5u`) are never used.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{decode, decode_header, Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use super::{Principal, Role};
use crate::{GuardError, Result};

/// At most one JWKS re-read per this interval when a token names an unknown `kid`.
pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a token must say to be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud` (the token's `aud` may be a list containing it).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl JwtConfig {
    /// Issuer and audience with the default 60 s leeway.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> JwtConfig {
        JwtConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_secs: 60,
        }
    }
}

/// Where the issuer's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS JSON file (e.g. the dev issuer's `jwks.json`).
    File(PathBuf),
    /// An `https://` URL (plain `http://` only to a loopback host).
    Url(String),
}

/// One trusted verification key with the only algorithm it verifies.
struct TrustedKey {
    alg: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Arc<TrustedKey>>,
    /// When the source was last read (successfully or not).
    last_load: Option<Instant>,
}

/// Verifies bearer tokens and turns them into [`Principal`]s. Cheap to share (`Arc`) across
/// requests; key look-ups take a read lock, re-reads of the JWKS are serialized and rate-limited.
pub struct JwtVerifier {
    cfg: JwtConfig,
    source: Option<JwksSource>,
    http: Option<reqwest::Client>,
    cache: RwLock<KeyCache>,
    reload: tokio::sync::Mutex<()>,
    refresh_interval: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("cfg", &self.cfg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn unauthenticated(reason: &str) -> GuardError {
    GuardError::Unauthenticated(reason.to_string())
}

/// Claims rxflow reads beyond the registered ones (which `jsonwebtoken` validates).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    role: Option<serde_json::Value>,
    #[serde(default)]
    roles: Option<serde_json::Value>,
    #[serde(default)]
    amr: Option<serde_json::Value>,
    #[serde(default)]
    npi: Option<serde_json::Value>,
}

fn strings(v: &Option<serde_json::Value>) -> Vec<&str> {
    match v {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|i| i.as_str()).collect(),
        _ => Vec::new(),
    }
}

impl Claims {
    fn into_principal(self) -> Result<Principal> {
        let subject = self
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| unauthenticated("the token has no subject (sub claim)"))?;
        let tenant = self
            .tenant
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                unauthenticated("the token has no tenant claim naming the pharmacy organisation")
            })?;
        let role = strings(&self.role)
            .into_iter()
            .chain(strings(&self.roles))
            .find_map(Role::parse)
            .ok_or_else(|| {
                unauthenticated(
                    "the token names no rxflow role (role or roles claim: prescriber, pharmacist, technician, auditor, admin or service)",
                )
            })?;
        let mfa = strings(&self.amr)
            .iter()
            .any(|m| matches!(*m, "mfa" | "otp" | "hwk"));
        let npi = match (role, self.npi) {
            (Role::Prescriber, Some(serde_json::Value::String(n))) if !n.trim().is_empty() => {
                Some(n.trim().to_string())
            }
            _ => None,
        };
        Ok(Principal {
            subject,
            role,
            tenant,
            mfa,
            npi,
            break_glass: None,
        })
    }
}

/// The one algorithm a JWK may verify, or `None` for keys rxflow does not trust.
fn trusted_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let (alg, key_alg) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        // Symmetric keys and other curves: never.
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(alg),
        Some(named) if named == key_alg => Some(alg),
        Some(_) => None,
    }
}

/// The usable keys of a JWKS, by kid. Entries rxflow cannot or will not use are skipped.
fn trusted_keys(jwks: &JwkSet) -> HashMap<String, Arc<TrustedKey>> {
    jwks.keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let alg = trusted_algorithm(jwk)?;
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((kid, Arc::new(TrustedKey { alg, key })))
        })
        .collect()
}

/// Parses a JWKS document key by key, so one odd entry does not hide the others.
fn parse_jwks(bytes: &[u8]) -> Result<JwkSet> {
    #[derive(Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| {
        GuardError::Config(format!(
            "the JWKS is not a JSON object with a `keys` array: {e}"
        ))
    })?;
    Ok(JwkSet {
        keys: raw
            .keys
            .into_iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
            .collect(),
    })
}

fn check_url(url: &str) -> Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| GuardError::Config(format!("JWKS URL is not a valid URL: {e}")))?;
    let loopback = matches!(
        parsed.host_str(),
        Some("127.0.0.1") | Some("localhost") | Some("[::1]")
    );
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        _ => Err(GuardError::Config(
            "JWKS URL must use https:// (plain http:// is accepted only for a loopback host)"
                .to_string(),
        )),
    }
}

fn map_jwt_error(kind: &ErrorKind) -> GuardError {
    let reason = match kind {
        ErrorKind::ExpiredSignature => "the token has expired; sign in again",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf is in the future)",
        ErrorKind::InvalidIssuer => "the token was issued by an issuer this service does not trust",
        ErrorKind::InvalidAudience => "the token is meant for another service (aud)",
        ErrorKind::InvalidSignature => "the token signature does not verify",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "the token algorithm does not match its signing key"
        }
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "the token has no expiry (exp claim)",
            "iss" => "the token has no issuer (iss claim)",
            "aud" => "the token has no audience (aud claim)",
            "sub" => "the token has no subject (sub claim)",
            _ => "the token lacks a required claim",
        },
        ErrorKind::InvalidClaimFormat(_) => "a registered claim of the token has the wrong type",
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "the token is malformed",
        _ => "the token could not be verified",
    };
    unauthenticated(reason)
}

impl JwtVerifier {
    /// A verifier reading keys from `source`. A file source is read now (a bad file fails
    /// here); a URL source is fetched on the first token.
    pub fn new(cfg: JwtConfig, source: JwksSource) -> Result<Self> {
        let mut cache = KeyCache::default();
        let mut http = None;
        match &source {
            JwksSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| GuardError::Io {
                    path: path.display().to_string(),
                    source: e,
                })?;
                cache.keys = trusted_keys(&parse_jwks(&bytes)?);
                cache.last_load = Some(Instant::now());
            }
            JwksSource::Url(url) => {
                check_url(url)?;
                http = Some(
                    reqwest::Client::builder()
                        .timeout(JWKS_FETCH_TIMEOUT)
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .map_err(|e| {
                            GuardError::Config(format!(
                                "cannot build the HTTP client for the JWKS: {e}"
                            ))
                        })?,
                );
            }
        }
        Ok(JwtVerifier {
            cfg,
            source: Some(source),
            http,
            cache: RwLock::new(cache),
            reload: tokio::sync::Mutex::new(()),
            refresh_interval: DEFAULT_JWKS_REFRESH_INTERVAL,
        })
    }

    /// A verifier over a fixed key set (no source to re-read).
    pub fn from_jwks(cfg: JwtConfig, jwks: JwkSet) -> Self {
        JwtVerifier {
            cfg,
            source: None,
            http: None,
            cache: RwLock::new(KeyCache {
                keys: trusted_keys(&jwks),
                last_load: Some(Instant::now()),
            }),
            reload: tokio::sync::Mutex::new(()),
            refresh_interval: DEFAULT_JWKS_REFRESH_INTERVAL,
        }
    }

    /// Changes how often an unknown `kid` may trigger a re-read of the source.
    pub fn with_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    /// The kids currently trusted (sorted).
    pub fn trusted_kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = match self.cache.read() {
            Ok(c) => c.keys.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        kids.sort();
        kids
    }

    /// Verifies `token` (signature, `iss`, `aud`, `exp`, `nbf`) and reads its principal.
    /// Every refusal is [`GuardError::Unauthenticated`] with a reason that echoes nothing of the
    /// token; a JWKS that cannot be loaded is [`GuardError::KeyUnavailable`].
    pub async fn verify(&self, token: &str) -> Result<Principal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(unauthenticated("no bearer token was given"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(unauthenticated("the token is too large"));
        }
        let header = decode_header(token).map_err(|_| {
            unauthenticated(
                "the token header is malformed or names an algorithm rxflow does not accept (RS256, ES256, EdDSA)",
            )
        })?;
        if header.alg.family() == AlgorithmFamily::Hmac {
            return Err(unauthenticated(
                "HMAC-signed tokens are never accepted; use a token signed with the issuer's public-key algorithm (RS256, ES256 or EdDSA)",
            ));
        }
        if header.crit.is_some() {
            return Err(unauthenticated(
                "the token header has critical extensions rxflow does not understand",
            ));
        }
        let kid = header
            .kid
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| unauthenticated("the token header has no key id (kid)"))?;
        let trusted = self.key(kid).await?;
        if header.alg != trusted.alg {
            return Err(unauthenticated(
                "the token algorithm does not match its signing key",
            ));
        }
        let mut validation = Validation::new(trusted.alg);
        validation.set_issuer(&[self.cfg.issuer.as_str()]);
        validation.set_audience(&[self.cfg.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        let data = decode::<Claims>(token, &trusted.key, &validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        data.claims.into_principal()
    }

    fn cached(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        self.cache.read().ok()?.keys.get(kid).cloned()
    }

    /// The key for `kid`, re-reading the source (at most once per refresh interval) when unknown.
    async fn key(&self, kid: &str) -> Result<Arc<TrustedKey>> {
        if let Some(k) = self.cached(kid) {
            return Ok(k);
        }
        let unknown =
            || unauthenticated("the token's signing key (kid) is not in the issuer's key set");
        let Some(source) = &self.source else {
            return Err(unknown());
        };
        let _one_at_a_time = self.reload.lock().await;
        // Another request may have re-read the source while this one waited.
        if let Some(k) = self.cached(kid) {
            return Ok(k);
        }
        let last_load = self.cache.read().ok().and_then(|c| c.last_load);
        if last_load.is_some_and(|t| t.elapsed() < self.refresh_interval) {
            return Err(unknown());
        }
        let loaded = self.load(source).await;
        let mut cache = self
            .cache
            .write()
            .map_err(|_| GuardError::KeyUnavailable("the JWKS cache is unusable".to_string()))?;
        cache.last_load = Some(Instant::now());
        match loaded {
            Ok(keys) => {
                // Replace, not merge: a key the issuer withdrew stops being trusted.
                cache.keys = keys;
                cache.keys.get(kid).cloned().ok_or_else(unknown)
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS reload failed");
                Err(e)
            }
        }
    }

    async fn load(&self, source: &JwksSource) -> Result<HashMap<String, Arc<TrustedKey>>> {
        let bytes = match source {
            JwksSource::File(path) => tokio::fs::read(path).await.map_err(|e| GuardError::Io {
                path: path.display().to_string(),
                source: e,
            })?,
            JwksSource::Url(url) => self.fetch(url).await?,
        };
        Ok(trusted_keys(&parse_jwks(&bytes)?))
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>> {
        let unavailable = |what: String| {
            GuardError::KeyUnavailable(format!("the issuer's JWKS could not be fetched: {what}"))
        };
        let http = self
            .http
            .as_ref()
            .ok_or_else(|| unavailable("no HTTP client".to_string()))?;
        let url = check_url(url)?;
        let mut resp = http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("HTTP status {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(unavailable("the document exceeds 1 MiB".to_string()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}
