//! JWKS sources: a file, a real HTTP server on 127.0.0.1 (with key rotation by kid and the
//! re-read rate limit), and the dev issuer's key files.

mod jwt_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jwt_support::*;
use rx_guard::access::{DevClaims, DevIssuer, JwksSource, JwtConfig, JwtVerifier, Role};
use rx_guard::GuardError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A minimal HTTP/1.1 server that answers every request with the current JWKS document.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(initial: &jsonwebtoken::jwk::JwkSet) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(
            serde_json::to_string(initial).expect("jwks json"),
        ));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let doc = b.lock().expect("body").clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        doc.len(),
                        doc
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        JwksServer {
            url: format!("http://{addr}/.well-known/jwks.json"),
            body,
            hits,
            task,
        }
    }

    fn publish(&self, set: &jsonwebtoken::jwk::JwkSet) {
        *self.body.lock().expect("body") = serde_json::to_string(set).expect("jwks json");
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn url_source_fetches_the_jwks_over_http_and_follows_rotation_by_kid() {
    let old = ec_key("2025-01");
    let new = ed_key("2025-02");
    let server = JwksServer::start(&jwks(&[&old])).await;
    let v = JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::Url(server.url.clone()),
    )
    .expect("verifier")
    .with_refresh_interval(Duration::ZERO);
    assert_eq!(server.hits(), 0, "a URL source is fetched lazily");

    let p = v
        .verify(&sign(&old, &claims()))
        .await
        .expect("old key trusted");
    assert_eq!(p.subject, "pharm-ana");
    assert_eq!(server.hits(), 1);
    v.verify(&sign(&old, &claims())).await.expect("cached");
    assert_eq!(server.hits(), 1, "a known kid needs no fetch");

    // The issuer rotates: publishes the new key and withdraws the old one.
    server.publish(&jwks(&[&new]));
    v.verify(&sign(&new, &claims()))
        .await
        .expect("new kid triggers a re-read");
    assert_eq!(server.hits(), 2);
    assert_eq!(v.trusted_kids(), vec!["2025-02".to_string()]);
    match v.verify(&sign(&old, &claims())).await {
        Err(GuardError::Unauthenticated(r)) => assert!(r.contains("kid"), "{r}"),
        other => panic!("withdrawn key must not verify: {other:?}"),
    }
}

#[tokio::test]
async fn unknown_kid_rereads_the_source_at_most_once_per_interval() {
    let key = ed_key("k1");
    let server = JwksServer::start(&jwks(&[&key])).await;
    let v = JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::Url(server.url.clone()),
    )
    .expect("verifier");
    v.verify(&sign(&key, &claims())).await.expect("first fetch");
    assert_eq!(server.hits(), 1);
    let rotated = ed_key("k2");
    server.publish(&jwks(&[&key, &rotated]));
    for _ in 0..5 {
        let r = v.verify(&sign(&ed_key("junk"), &claims())).await;
        assert!(matches!(r, Err(GuardError::Unauthenticated(_))));
    }
    assert!(v.verify(&sign(&rotated, &claims())).await.is_err());
    assert_eq!(
        server.hits(),
        1,
        "unknown kids inside the 30 s interval must not hammer the issuer"
    );
}

#[tokio::test]
async fn unreachable_jwks_url_fails_closed_as_key_unavailable() {
    // Bind then drop a listener: nothing listens on that port any more.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let v = JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::Url(format!("http://{addr}/jwks.json")),
    )
    .expect("verifier");
    let r = v.verify(&sign(&ed_key("k"), &claims())).await;
    assert!(matches!(r, Err(GuardError::KeyUnavailable(_))), "{r:?}");
}

#[test]
fn plain_http_jwks_url_to_a_remote_host_is_refused() {
    let r = JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::Url("http://idp.example.test/jwks.json".into()),
    );
    assert!(matches!(r, Err(GuardError::Config(m)) if m.contains("https")));
    assert!(JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::Url("https://idp.example.test/jwks.json".into())
    )
    .is_ok());
}

#[tokio::test]
async fn file_source_is_reread_when_a_new_kid_appears() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("jwks.json");
    let a = rsa_key("a");
    let b = ec_key("b");
    std::fs::write(&path, serde_json::to_vec(&jwks(&[&a])).expect("json")).expect("write");
    let v = JwtVerifier::new(JwtConfig::new(ISS, AUD), JwksSource::File(path.clone()))
        .expect("verifier")
        .with_refresh_interval(Duration::ZERO);
    v.verify(&sign(&a, &claims())).await.expect("a");
    assert!(v.verify(&sign(&b, &claims())).await.is_err());
    std::fs::write(&path, serde_json::to_vec(&jwks(&[&a, &b])).expect("json")).expect("write");
    v.verify(&sign(&b, &claims()))
        .await
        .expect("b after rotation");
}

#[test]
fn missing_jwks_file_is_a_config_error_at_startup() {
    let dir = tempfile::tempdir().expect("tmp");
    let r = JwtVerifier::new(
        JwtConfig::new(ISS, AUD),
        JwksSource::File(dir.path().join("absent.json")),
    );
    assert!(matches!(r, Err(GuardError::Io { .. })), "{r:?}");
}

fn pharmacist() -> DevClaims {
    DevClaims {
        subject: "pharm-ana".into(),
        role: Role::Pharmacist,
        tenant: "acme".into(),
        mfa: true,
        npi: None,
    }
}

#[tokio::test]
async fn dev_issuer_tokens_verify_against_its_jwks_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let issuer = DevIssuer::open_or_create(dir.path()).expect("issuer");
    assert_eq!(issuer.issuer(), "rxflow-dev");
    assert_eq!(issuer.audience(), "rxflow");
    let token = issuer
        .issue(&pharmacist(), Duration::from_secs(600))
        .expect("token");
    let v = JwtVerifier::new(
        JwtConfig::new("rxflow-dev", "rxflow"),
        JwksSource::File(issuer.jwks_path()),
    )
    .expect("verifier");
    let p = v.verify(&token).await.expect("dev token verifies");
    assert_eq!(
        (p.subject.as_str(), p.role, p.tenant.as_str(), p.mfa),
        ("pharm-ana", Role::Pharmacist, "acme", true)
    );

    let prescriber = DevClaims {
        subject: "dr-who".into(),
        role: Role::Prescriber,
        mfa: false,
        npi: Some("1234567893".into()),
        ..pharmacist()
    };
    let p = issuer
        .verifier()
        .expect("verifier")
        .verify(
            &issuer
                .issue(&prescriber, Duration::from_secs(60))
                .expect("token"),
        )
        .await
        .expect("verifies");
    assert_eq!(p.npi.as_deref(), Some("1234567893"));
    assert!(!p.mfa);

    // Another audience does not accept dev tokens.
    let strict = JwtVerifier::from_jwks(JwtConfig::new("rxflow-dev", "other"), issuer.jwks());
    assert!(strict.verify(&token).await.is_err());
}

#[tokio::test]
async fn dev_issuer_expired_token_is_rejected() {
    let dir = tempfile::tempdir().expect("tmp");
    let issuer = DevIssuer::open_or_create(dir.path()).expect("issuer");
    let now = chrono::Utc::now().timestamp();
    let token = issuer
        .sign_json(&serde_json::json!({
            "iss": "rxflow-dev", "aud": "rxflow", "sub": "x", "exp": now - 3600,
            "role": "pharmacist", "tenant": "acme"
        }))
        .expect("token");
    let r = issuer.verifier().expect("verifier").verify(&token).await;
    assert!(matches!(r, Err(GuardError::Unauthenticated(m)) if m.contains("expired")));
}

#[cfg(unix)]
#[test]
fn dev_key_is_created_0600_kept_across_opens_and_jwks_has_no_private_part() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let first = DevIssuer::open_or_create(dir.path()).expect("create");
    let key_path = dir.path().join("dev-signing.pk8");
    let mode = std::fs::metadata(&key_path)
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = DevIssuer::open_or_create(dir.path()).expect("reopen");
    assert_eq!(first.kid(), again.kid(), "the same key is reused");
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("jwks.json")).expect("jwks"))
            .expect("json");
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["kid"], first.kid());
    assert!(key.get("d").is_none(), "no private key in the JWKS");
}

#[cfg(unix)]
#[test]
fn dev_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    DevIssuer::open_or_create(dir.path()).expect("create");
    let key_path = dir.path().join("dev-signing.pk8");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = DevIssuer::open_or_create(dir.path()).expect_err("loose key refused");
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[tokio::test]
async fn token_from_another_dev_key_is_rejected() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let ia = DevIssuer::open_or_create(a.path()).expect("a");
    let ib = DevIssuer::open_or_create(b.path()).expect("b");
    let token = ib
        .issue(&pharmacist(), Duration::from_secs(60))
        .expect("token");
    assert!(ia
        .verifier()
        .expect("verifier")
        .verify(&token)
        .await
        .is_err());
}
