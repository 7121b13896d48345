//! JWT verification: accepted tokens for each supported algorithm, and the attack suite (each
//! rejection the issue names), all against real keys.

mod jwt_support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use jwt_support::*;
use rx_guard::access::{JwtConfig, JwtVerifier, Role};
use rx_guard::GuardError;
use serde_json::{json, Value};

struct Suite {
    rsa: TestKey,
    ec: TestKey,
    ed: TestKey,
    verifier: JwtVerifier,
}

fn suite() -> Suite {
    let rsa = rsa_key("rsa-1");
    let ec = ec_key("ec-1");
    let ed = ed_key("ed-1");
    let verifier = JwtVerifier::from_jwks(JwtConfig::new(ISS, AUD), jwks(&[&rsa, &ec, &ed]));
    Suite {
        rsa,
        ec,
        ed,
        verifier,
    }
}

/// Asserts the token is refused as unauthenticated, with a reason that echoes nothing of it.
async fn refused(v: &JwtVerifier, token: &str, reason_part: &str) {
    match v.verify(token).await {
        Err(GuardError::Unauthenticated(reason)) => {
            assert!(
                reason.contains(reason_part),
                "reason `{reason}` should mention `{reason_part}`"
            );
            for leaked in ["pharm-ana", "acme", "mallory"] {
                assert!(
                    !reason.contains(leaked),
                    "reason echoes token content: {reason}"
                );
            }
            if token.len() > 8 {
                assert!(!reason.contains(token), "reason echoes the token: {reason}");
            }
        }
        other => panic!("expected Unauthenticated({reason_part}), got {other:?}"),
    }
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn without(mut c: Value, key: &str) -> Value {
    c.as_object_mut().expect("object").remove(key);
    c
}

#[tokio::test]
async fn valid_tokens_for_rs256_es256_and_eddsa_are_accepted() {
    let s = suite();
    for key in [&s.rsa, &s.ec, &s.ed] {
        let p = s
            .verifier
            .verify(&sign(key, &claims()))
            .await
            .expect("valid token");
        assert_eq!(p.subject, "pharm-ana");
        assert_eq!(p.role, Role::Pharmacist);
        assert_eq!(p.tenant, "acme");
        assert!(p.mfa, "amr otp counts as MFA");
        assert_eq!(p.npi, None);
        assert_eq!(p.break_glass, None);
    }
}

#[tokio::test]
async fn claims_map_to_principal_role_mfa_and_npi() {
    let s = suite();
    let c = with(claims(), "role", json!("Prescriber"));
    let c = with(c, "npi", json!("1234567893"));
    let c = with(c, "amr", json!(["pwd"]));
    let p = s.verifier.verify(&sign(&s.ed, &c)).await.expect("valid");
    assert_eq!(p.role, Role::Prescriber);
    assert_eq!(p.npi.as_deref(), Some("1234567893"));
    assert!(!p.mfa, "password alone is not MFA");

    // roles array: the first recognized entry wins; npi is dropped for non-prescribers.
    let c = without(claims(), "role");
    let c = with(c, "roles", json!(["offline_access", "technician", "admin"]));
    let c = with(c, "npi", json!("1234567893"));
    let c = with(c, "amr", json!(["hwk"]));
    let p = s.verifier.verify(&sign(&s.ed, &c)).await.expect("valid");
    assert_eq!(p.role, Role::Technician);
    assert_eq!(p.npi, None);
    assert!(p.mfa, "hardware key counts as MFA");
    assert_eq!(p.actor().role, "technician");
    assert_eq!(p.actor().tenant, "acme");
}

#[tokio::test]
async fn alg_none_token_is_rejected() {
    let s = suite();
    let header = json!({"alg": "none", "typ": "JWT", "kid": "ed-1"});
    let token = format!("{}.{}.", b64(&header), b64(&claims()));
    refused(&s.verifier, &token, "algorithm").await;
    let header = json!({"alg": "None", "kid": "ed-1"});
    let token = format!("{}.{}.", b64(&header), b64(&claims()));
    refused(&s.verifier, &token, "algorithm").await;
}

#[tokio::test]
async fn hs256_token_signed_with_the_public_key_bytes_is_rejected() {
    let s = suite();
    for key in [&s.rsa, &s.ec, &s.ed] {
        for secret in [
            key.public_bytes.clone(),
            serde_json::to_vec(&key.jwk).expect("jwk"),
        ] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(key.kid.clone());
            let token =
                encode(&header, &claims(), &EncodingKey::from_secret(&secret)).expect("sign");
            refused(&s.verifier, &token, "HMAC").await;
        }
    }
}

#[tokio::test]
async fn hmac_key_published_in_the_jwks_is_never_trusted() {
    let ed = ed_key("ed-1");
    let mut set = jwks(&[&ed]);
    let oct: jsonwebtoken::jwk::Jwk = serde_json::from_value(json!({
        "kty": "oct", "kid": "shared", "k": URL_SAFE_NO_PAD.encode(b"0123456789abcdef0123456789abcdef")
    }))
    .expect("oct jwk");
    set.keys.push(oct);
    let v = JwtVerifier::from_jwks(JwtConfig::new(ISS, AUD), set);
    assert_eq!(v.trusted_kids(), vec!["ed-1".to_string()]);
    let mut header = Header::new(Algorithm::HS512);
    header.kid = Some("shared".into());
    let token = encode(
        &header,
        &claims(),
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .expect("sign");
    refused(&v, &token, "HMAC").await;
}

#[tokio::test]
async fn unknown_kid_is_rejected() {
    let s = suite();
    let stranger = ed_key("ed-unknown");
    refused(&s.verifier, &sign(&stranger, &claims()), "kid").await;
}

#[tokio::test]
async fn token_without_kid_is_rejected() {
    let s = suite();
    let token = encode(&Header::new(Algorithm::EdDSA), &claims(), &s.ed.encoding).expect("sign");
    refused(&s.verifier, &token, "kid").await;
}

#[tokio::test]
async fn token_signed_by_another_key_with_a_trusted_kid_is_rejected() {
    let s = suite();
    for (trusted, impostor) in [
        (&s.ed, ed_key("ed-1")),
        (&s.ec, ec_key("ec-1")),
        (&s.rsa, rsa_key("rsa-1")),
    ] {
        assert_eq!(trusted.kid, impostor.kid);
        refused(&s.verifier, &sign(&impostor, &claims()), "signature").await;
    }
}

#[tokio::test]
async fn header_algorithm_other_than_the_keys_is_rejected() {
    let s = suite();
    // An ES256 token presented under the RSA key's kid.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(s.rsa.kid.clone());
    let token = encode(&header, &claims(), &s.ec.encoding).expect("sign");
    refused(&s.verifier, &token, "algorithm does not match").await;
    // RS512 under the RSA key: RSA keys verify RS256 only.
    let mut header = Header::new(Algorithm::RS512);
    header.kid = Some(s.rsa.kid.clone());
    let token = encode(&header, &claims(), &s.rsa.encoding).expect("sign");
    refused(&s.verifier, &token, "algorithm does not match").await;
}

#[tokio::test]
async fn key_embedded_in_the_token_header_is_ignored() {
    let s = suite();
    let attacker = ed_key("ed-1");
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    header.jwk = Some(attacker.jwk.clone());
    let token = encode(&header, &claims(), &attacker.encoding).expect("sign");
    refused(&s.verifier, &token, "signature").await;
}

#[tokio::test]
async fn expired_token_is_rejected_beyond_the_leeway_only() {
    let s = suite();
    let c = with(claims(), "exp", json!(now() - 120));
    refused(&s.verifier, &sign(&s.ed, &c), "expired").await;
    let c = with(claims(), "exp", json!(now() - 20));
    s.verifier
        .verify(&sign(&s.ed, &c))
        .await
        .expect("20 s past exp is inside the 60 s leeway");
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected_beyond_the_leeway_only() {
    let s = suite();
    let c = with(claims(), "nbf", json!(now() + 300));
    refused(&s.verifier, &sign(&s.rsa, &c), "not valid yet").await;
    let c = with(claims(), "nbf", json!(now() + 20));
    s.verifier
        .verify(&sign(&s.rsa, &c))
        .await
        .expect("nbf 20 s ahead is inside the 60 s leeway");
}

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let s = suite();
    let c = with(claims(), "iss", json!("https://evil.example.test"));
    refused(&s.verifier, &sign(&s.ec, &c), "issuer").await;
}

#[tokio::test]
async fn wrong_audience_is_rejected_and_a_list_containing_ours_is_accepted() {
    let s = suite();
    let c = with(claims(), "aud", json!("some-other-api"));
    refused(&s.verifier, &sign(&s.ec, &c), "another service").await;
    let c = with(claims(), "aud", json!(["some-other-api", AUD]));
    s.verifier
        .verify(&sign(&s.ec, &c))
        .await
        .expect("aud list containing ours");
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let s = suite();
    for key in [&s.rsa, &s.ec, &s.ed] {
        let (h, p, sig) = parts(&sign(key, &claims()));
        let mut payload = decode_part(&p);
        payload["role"] = json!("admin");
        payload["tenant"] = json!("mallory");
        let token = format!("{h}.{}.{sig}", b64(&payload));
        refused(&s.verifier, &token, "signature").await;
    }
}

#[tokio::test]
async fn tampered_signature_is_rejected() {
    let s = suite();
    for key in [&s.rsa, &s.ec, &s.ed] {
        let (h, p, sig) = parts(&sign(key, &claims()));
        let mut raw = URL_SAFE_NO_PAD.decode(&sig).expect("sig");
        raw[5] ^= 0x01;
        let token = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(raw));
        refused(&s.verifier, &token, "signature").await;
        refused(&s.verifier, &format!("{h}.{p}."), "signature").await;
    }
}

#[tokio::test]
async fn missing_required_claims_are_rejected() {
    let s = suite();
    for (claim, reason) in [
        ("exp", "expiry"),
        ("iss", "issuer"),
        ("aud", "audience"),
        ("sub", "subject"),
        ("tenant", "tenant"),
        ("role", "role"),
    ] {
        let token = sign(&s.ed, &without(claims(), claim));
        refused(&s.verifier, &token, reason).await;
    }
    let token = sign(&s.ed, &with(claims(), "role", json!("superuser")));
    refused(&s.verifier, &token, "role").await;
    let token = sign(&s.ed, &with(claims(), "sub", json!("  ")));
    refused(&s.verifier, &token, "subject").await;
}

#[tokio::test]
async fn malformed_and_empty_tokens_are_rejected() {
    let s = suite();
    refused(&s.verifier, "", "no bearer token").await;
    refused(&s.verifier, "not-a-jwt", "malformed").await;
    refused(&s.verifier, "a.b", "malformed").await;
    refused(&s.verifier, &"x".repeat(20_000), "too large").await;
    let (h, _, sig) = parts(&sign(&s.ed, &claims()));
    refused(&s.verifier, &format!("{h}.!!!.{sig}"), "").await;
}

#[tokio::test]
async fn critical_header_extensions_are_rejected() {
    let s = suite();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    header.crit = Some(vec!["b64".into()]);
    let token = encode(&header, &claims(), &s.ed.encoding).expect("sign");
    refused(&s.verifier, &token, "critical").await;
}
