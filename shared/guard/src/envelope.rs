//! Envelope encryption of records: AES-256-GCM under a data key from a [`KeyProvider`], with
//! associated data that binds each ciphertext to its tenant, table, record id and field.
//!
//! Byte format v1 (written down in `docs/envelope-format.md`):
//!
//! ```text
//! "RXE" 0x01 | wrapped-key length (u16 BE) | wrapped data key | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! The GCM associated data is `"rxflow-envelope/v1"`, then tenant, table, record id and field
//! (each u32-BE length-prefixed), then the header bytes (magic through wrapped key). A ciphertext
//! copied into another record, field, table or tenant therefore fails to open, and so does one
//! whose wrapped key was swapped.
//!
//! Data keys are cached, as the AWS Encryption SDK's caching materials manager does, so the key
//! service is not called per record: a sealing key is reused for at most
//! [`CacheLimits::max_age`] and [`CacheLimits::max_uses`] records (far below the 2^32 random-nonce
//! limit of GCM), and unwrapped keys for opening are kept for at most `max_age`, at most
//! `max_open_entries` of them.
//!
//! Nonces are deterministic per data key (NIST SP 800-38D 8.2.1, as TLS 1.3 does): a random
//! 96-bit base drawn when the key is made, XOR the key's use count. A data key seals only in the
//! process that made it, and its count only goes up, so no nonce repeats under a key, and a
//! seal costs no call to the random generator.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{self, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::Zeroizing;

use crate::keys::{EncryptionContext, KeyProvider};
use crate::{GuardError, Result};

/// Magic and version of the v1 format.
pub const MAGIC_V1: [u8; 4] = *b"RXE\x01";
const TAG_LEN: usize = 16;
const AAD_DOMAIN: &[u8] = b"rxflow-envelope/v1";

/// Where a sealed value belongs. Every part is bound into the ciphertext.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    pub tenant: &'a str,
    pub table: &'a str,
    pub record_id: &'a str,
    pub field: &'a str,
}

impl Aad<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(AAD_DOMAIN);
        for part in [self.tenant, self.table, self.record_id, self.field] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }

    fn describe(&self) -> String {
        format!("{}/{}/{}", self.table, self.record_id, self.field)
    }
}

/// Hard limits on data-key reuse.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// A cached key is not used after this age.
    pub max_age: Duration,
    /// A sealing key seals at most this many values.
    pub max_uses: u64,
    /// Unwrapped keys kept for opening.
    pub max_open_entries: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_age: Duration::from_secs(300),
            max_uses: 1 << 20,
            max_open_entries: 1024,
        }
    }
}

impl CacheLimits {
    /// No caching: every seal asks the provider for a new data key, every open unwraps.
    pub fn none() -> Self {
        CacheLimits {
            max_age: Duration::ZERO,
            max_uses: 0,
            max_open_entries: 0,
        }
    }
}

struct SealKey {
    key: Arc<LessSafeKey>,
    wrapped: Arc<[u8]>,
    /// Random when the key was made; each seal's nonce is this XOR its use number.
    nonce_base: [u8; NONCE_LEN],
    born: Instant,
    uses: u64,
}

/// A data key for one seal, with the nonce that seal uses.
struct SealWith {
    key: Arc<LessSafeKey>,
    wrapped: Arc<[u8]>,
    nonce: [u8; NONCE_LEN],
}

/// `base` XOR `n` (big-endian, in the low 8 bytes).
fn nth_nonce(base: &[u8; NONCE_LEN], n: u64) -> [u8; NONCE_LEN] {
    let mut nonce = *base;
    for (b, c) in nonce[NONCE_LEN - 8..].iter_mut().zip(n.to_be_bytes()) {
        *b ^= c;
    }
    nonce
}

fn random_nonce_base() -> Result<[u8; NONCE_LEN]> {
    let mut base = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut base)
        .map_err(|_| GuardError::KeyUnavailable("the system random generator failed".into()))?;
    Ok(base)
}

struct OpenKey {
    key: Arc<LessSafeKey>,
    born: Instant,
}

/// Seals and opens values. Cheap to share (`Arc<Sealer>`).
pub struct Sealer {
    provider: Arc<dyn KeyProvider>,
    limits: CacheLimits,
    sealing: Mutex<HashMap<String, SealKey>>,
    opening: Mutex<HashMap<Vec<u8>, OpenKey>>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    seals: AtomicU64,
    opens: AtomicU64,
    nanos: AtomicU64,
}

/// What a sealer has done so far: how many values it sealed and opened, and the wall time spent
/// inside [`Sealer::seal`] and [`Sealer::open`] (key service calls included). Reports use it to
/// give the share of a run spent in encryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealStats {
    pub seals: u64,
    pub opens: u64,
    pub nanos: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.provider.key_id())
            .field("limits", &self.limits)
            .finish()
    }
}

fn aead_key(bytes: &[u8; 32]) -> Result<Arc<LessSafeKey>> {
    let unbound = UnboundKey::new(&AES_256_GCM, bytes)
        .map_err(|_| GuardError::KeyUnavailable("data key is not an AES-256 key".into()))?;
    Ok(Arc::new(LessSafeKey::new(unbound)))
}

impl Sealer {
    pub fn new(provider: Arc<dyn KeyProvider>, limits: CacheLimits) -> Self {
        // The random generator sets up its entropy source on first use (tens of milliseconds,
        // once per process): here, when the service starts, not inside the first seal.
        let _ = random_nonce_base();
        Sealer {
            provider,
            limits,
            sealing: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            stats: Counters::default(),
        }
    }

    /// Counts and time so far.
    pub fn stats(&self) -> SealStats {
        SealStats {
            seals: self.stats.seals.load(Ordering::Relaxed),
            opens: self.stats.opens.load(Ordering::Relaxed),
            nanos: self.stats.nanos.load(Ordering::Relaxed),
        }
    }

    fn count(&self, which: &AtomicU64, since: Instant) {
        which.fetch_add(1, Ordering::Relaxed);
        self.stats
            .nanos
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The key-encryption key behind this sealer.
    pub fn key_id(&self) -> &str {
        self.provider.key_id()
    }

    /// A data key for sealing in `tenant` and the nonce to use: the cached key while within
    /// limits (its next nonce), else a new key.
    async fn sealing_key(&self, tenant: &str) -> Result<SealWith> {
        {
            let mut cache = lock(&self.sealing);
            if let Some(k) = cache.get_mut(tenant) {
                if k.uses < self.limits.max_uses && k.born.elapsed() < self.limits.max_age {
                    let nonce = nth_nonce(&k.nonce_base, k.uses);
                    k.uses += 1;
                    return Ok(SealWith {
                        key: k.key.clone(),
                        wrapped: k.wrapped.clone(),
                        nonce,
                    });
                }
                cache.remove(tenant);
            }
        }
        let dk = self
            .provider
            .generate_data_key(&EncryptionContext::for_tenant(tenant))
            .await?;
        let key = aead_key(&dk.plaintext)?;
        let wrapped: Arc<[u8]> = dk.wrapped.into();
        let nonce_base = random_nonce_base()?;
        if self.limits.max_uses > 0 && !self.limits.max_age.is_zero() {
            lock(&self.sealing).insert(
                tenant.to_string(),
                SealKey {
                    key: key.clone(),
                    wrapped: wrapped.clone(),
                    nonce_base,
                    born: Instant::now(),
                    uses: 1,
                },
            );
            self.remember_open(&wrapped, &key);
        }
        Ok(SealWith {
            key,
            wrapped,
            nonce: nth_nonce(&nonce_base, 0),
        })
    }

    fn remember_open(&self, wrapped: &[u8], key: &Arc<LessSafeKey>) {
        if self.limits.max_open_entries == 0 || self.limits.max_age.is_zero() {
            return;
        }
        let mut cache = lock(&self.opening);
        if cache.len() >= self.limits.max_open_entries {
            let max_age = self.limits.max_age;
            cache.retain(|_, k| k.born.elapsed() < max_age);
            if cache.len() >= self.limits.max_open_entries {
                cache.clear();
            }
        }
        cache.insert(
            wrapped.to_vec(),
            OpenKey {
                key: key.clone(),
                born: Instant::now(),
            },
        );
    }

    async fn opening_key(&self, tenant: &str, wrapped: &[u8]) -> Result<Arc<LessSafeKey>> {
        {
            let mut cache = lock(&self.opening);
            if let Some(k) = cache.get(wrapped) {
                if k.born.elapsed() < self.limits.max_age {
                    return Ok(k.key.clone());
                }
                cache.remove(wrapped);
            }
        }
        let plain = self
            .provider
            .decrypt_data_key(wrapped, &EncryptionContext::for_tenant(tenant))
            .await?;
        let key = aead_key(&plain)?;
        self.remember_open(wrapped, &key);
        Ok(key)
    }

    /// Seal `plaintext` for the place `aad` names.
    pub async fn seal(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let t = Instant::now();
        let out = self.seal_inner(aad, plaintext).await;
        self.count(&self.stats.seals, t);
        out
    }

    async fn seal_inner(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let SealWith {
            key,
            wrapped,
            nonce,
        } = self.sealing_key(aad.tenant).await?;
        let wrapped_len = u16::try_from(wrapped.len())
            .map_err(|_| GuardError::KeyUnavailable("wrapped data key is too long".into()))?;
        let header_len = MAGIC_V1.len() + 2 + wrapped.len();
        let mut out = Vec::with_capacity(header_len + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&MAGIC_V1);
        out.extend_from_slice(&wrapped_len.to_be_bytes());
        out.extend_from_slice(&wrapped);
        let mut ad = Vec::with_capacity(AAD_DOMAIN.len() + 64 + header_len);
        aad.write(&mut ad);
        ad.extend_from_slice(&out);
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&ad[..]),
                &mut out[body_at..],
            )
            .map_err(|_| GuardError::KeyUnavailable("sealing failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Open a value sealed for the place `aad` names. Fails with [`GuardError::Integrity`] if it
    /// was altered or belongs elsewhere, [`GuardError::Format`] if it is not a v1 envelope.
    pub async fn open(&self, aad: &Aad<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let t = Instant::now();
        let out = self.open_inner(aad, sealed).await;
        self.count(&self.stats.opens, t);
        out
    }

    async fn open_inner(&self, aad: &Aad<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let parts = parse(sealed).ok_or_else(|| {
            GuardError::Format(format!(
                "{}: not an rxflow v1 envelope ({} bytes)",
                aad.describe(),
                sealed.len()
            ))
        })?;
        let key = self.opening_key(aad.tenant, parts.wrapped).await?;
        let mut ad = Vec::with_capacity(AAD_DOMAIN.len() + 64 + parts.header.len());
        aad.write(&mut ad);
        ad.extend_from_slice(parts.header);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(parts.nonce);
        let mut buf = Zeroizing::new(parts.body.to_vec());
        let len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&ad[..]),
                &mut buf,
            )
            .map_err(|_| GuardError::Integrity(aad.describe()))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

struct Parts<'a> {
    header: &'a [u8],
    wrapped: &'a [u8],
    nonce: &'a [u8],
    /// ciphertext and tag
    body: &'a [u8],
}

fn parse(sealed: &[u8]) -> Option<Parts<'_>> {
    if sealed.len() < MAGIC_V1.len() + 2 || sealed[..4] != MAGIC_V1 {
        return None;
    }
    let wrapped_len = u16::from_be_bytes([sealed[4], sealed[5]]) as usize;
    let header_len = 6 + wrapped_len;
    if sealed.len() < header_len + NONCE_LEN + TAG_LEN {
        return None;
    }
    Some(Parts {
        header: &sealed[..header_len],
        wrapped: &sealed[6..header_len],
        nonce: &sealed[header_len..header_len + NONCE_LEN],
        body: &sealed[header_len + NONCE_LEN..],
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::LocalKeyProvider;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts calls to the real local provider.
    struct Counting {
        inner: LocalKeyProvider,
        generated: AtomicU64,
        decrypted: AtomicU64,
    }

    #[async_trait::async_trait]
    impl KeyProvider for Counting {
        fn key_id(&self) -> &str {
            self.inner.key_id()
        }
        async fn generate_data_key(&self, ctx: &EncryptionContext) -> Result<crate::keys::DataKey> {
            self.generated.fetch_add(1, Ordering::SeqCst);
            self.inner.generate_data_key(ctx).await
        }
        async fn decrypt_data_key(
            &self,
            wrapped: &[u8],
            ctx: &EncryptionContext,
        ) -> Result<Zeroizing<[u8; 32]>> {
            self.decrypted.fetch_add(1, Ordering::SeqCst);
            self.inner.decrypt_data_key(wrapped, ctx).await
        }
    }

    fn provider(dir: &std::path::Path) -> Arc<Counting> {
        Arc::new(Counting {
            inner: LocalKeyProvider::open_or_create(dir).unwrap(),
            generated: AtomicU64::new(0),
            decrypted: AtomicU64::new(0),
        })
    }

    const HERE: Aad<'static> = Aad {
        tenant: "pharmacy-a",
        table: "prescriptions",
        record_id: "rx-1",
        field: "body",
    };

    #[tokio::test]
    async fn sealed_value_opens_in_its_own_place_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::new(provider(dir.path()), CacheLimits::default());
        let sealed = s.seal(&HERE, b"Jane Doe, 1970-01-01").await.unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"Jane Doe"));
        assert_eq!(
            &s.open(&HERE, &sealed).await.unwrap()[..],
            b"Jane Doe, 1970-01-01"
        );
        for other in [
            Aad {
                record_id: "rx-2",
                ..HERE
            },
            Aad {
                field: "notes",
                ..HERE
            },
            Aad {
                table: "patients",
                ..HERE
            },
        ] {
            let e = s.open(&other, &sealed).await.unwrap_err();
            assert!(matches!(e, GuardError::Integrity(_)), "{other:?}: {e}");
        }
        // Another tenant: the data key itself refuses to unwrap under its context.
        let fresh = Sealer::new(provider(dir.path()), CacheLimits::default());
        let e = fresh
            .open(
                &Aad {
                    tenant: "pharmacy-b",
                    ..HERE
                },
                &sealed,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, GuardError::Integrity(_)), "{e}");
    }

    #[tokio::test]
    async fn any_flipped_byte_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::new(provider(dir.path()), CacheLimits::none());
        let sealed = s.seal(&HERE, b"payload").await.unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                s.open(&HERE, &bad).await.is_err(),
                "byte {i} flipped opened"
            );
        }
        assert!(matches!(
            s.open(&HERE, &sealed[..10]).await.unwrap_err(),
            GuardError::Format(_)
        ));
    }

    #[tokio::test]
    async fn cache_limits_bound_data_key_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        let limits = CacheLimits {
            max_uses: 3,
            ..CacheLimits::default()
        };
        let s = Sealer::new(p.clone(), limits);
        let mut sealed = Vec::new();
        for _ in 0..7 {
            sealed.push(s.seal(&HERE, b"x").await.unwrap());
        }
        assert_eq!(
            p.generated.load(Ordering::SeqCst),
            3,
            "7 seals, 3 uses per key"
        );
        for v in &sealed {
            s.open(&HERE, v).await.unwrap();
        }
        assert_eq!(
            p.decrypted.load(Ordering::SeqCst),
            0,
            "own keys are cached for opening"
        );

        let uncached = Sealer::new(p.clone(), CacheLimits::none());
        uncached.seal(&HERE, b"x").await.unwrap();
        uncached.seal(&HERE, b"x").await.unwrap();
        assert_eq!(p.generated.load(Ordering::SeqCst), 5);
        uncached.open(&HERE, &sealed[0]).await.unwrap();
        uncached.open(&HERE, &sealed[0]).await.unwrap();
        assert_eq!(p.decrypted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nonces_never_repeat_under_a_data_key_and_differ_between_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        let limits = CacheLimits {
            max_uses: 500,
            ..CacheLimits::default()
        };
        let s = Sealer::new(p.clone(), limits);
        let mut seen = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for i in 0..1200u32 {
            let sealed = s.seal(&HERE, &i.to_be_bytes()).await.unwrap();
            let parts = parse(&sealed).unwrap();
            keys.insert(parts.wrapped.to_vec());
            assert!(
                seen.insert((parts.wrapped.to_vec(), parts.nonce.to_vec())),
                "seal {i} repeated a nonce under its key"
            );
            assert_eq!(&s.open(&HERE, &sealed).await.unwrap()[..], &i.to_be_bytes());
        }
        assert_eq!(keys.len(), 3, "1,200 seals at 500 uses a key");
        assert_eq!(p.generated.load(Ordering::SeqCst), 3);
        // The count only reaches the low 8 bytes: the high 4 are each key's own random base.
        let bases: std::collections::HashSet<Vec<u8>> =
            seen.iter().map(|(_, n)| n[..4].to_vec()).collect();
        assert_eq!(bases.len(), 3, "every key has its own nonce base");
    }

    #[tokio::test]
    async fn expired_cache_entries_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        let s = Sealer::new(
            p.clone(),
            CacheLimits {
                max_age: Duration::from_millis(1),
                ..CacheLimits::default()
            },
        );
        s.seal(&HERE, b"x").await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.seal(&HERE, b"x").await.unwrap();
        assert_eq!(p.generated.load(Ordering::SeqCst), 2);
    }
}
