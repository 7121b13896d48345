//! Test keys and token helpers shared by the JWT test files: real RSA, P-256 and Ed25519 key
//! pairs generated with aws-lc-rs, their public JWKs, and raw token surgery for the attack suite.
#![allow(dead_code)]

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const ISS: &str = "https://idp.example.test";
pub const AUD: &str = "rxflow-api";

/// A signing key with its public JWK and the raw public key bytes (for HMAC-confusion attacks).
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    pub public_bytes: Vec<u8>,
}

fn with_kid(mut jwk: Jwk, kid: &str) -> Jwk {
    jwk.common.key_id = Some(kid.to_string());
    jwk
}

pub fn rsa_key(kid: &str) -> TestKey {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen");
    let der: Pkcs8V1Der = pair.as_der().expect("pkcs8");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(der.as_ref())
    );
    let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem");
    let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("rsa jwk");
    TestKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        jwk: with_kid(jwk, kid),
        encoding,
        public_bytes: pair.public_key().as_ref().to_vec(),
    }
}

pub fn ec_key(kid: &str) -> TestKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen");
    let doc = pair.to_pkcs8v1().expect("pkcs8");
    let encoding = EncodingKey::from_ec_der(doc.as_ref());
    let jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).expect("ec jwk");
    TestKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        jwk: with_kid(jwk, kid),
        encoding,
        public_bytes: pair.public_key().as_ref().to_vec(),
    }
}

pub fn ed_key(kid: &str) -> TestKey {
    let pair = Ed25519KeyPair::generate().expect("ed keygen");
    let doc = pair.to_pkcs8().expect("pkcs8");
    let public = pair.public_key().as_ref().to_vec();
    let jwk = Jwk {
        common: CommonParameters {
            key_algorithm: Some(KeyAlgorithm::EdDSA),
            key_id: Some(kid.to_string()),
            ..Default::default()
        },
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: URL_SAFE_NO_PAD.encode(&public),
        }),
    };
    TestKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(doc.as_ref()),
        jwk,
        public_bytes: public,
    }
}

pub fn jwks(keys: &[&TestKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Valid claims for a pharmacist of tenant `acme`.
pub fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "pharm-ana",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "role": "pharmacist",
        "tenant": "acme",
        "amr": ["pwd", "otp"],
    })
}

pub fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.encoding).expect("sign")
}

pub fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

/// Splits a compact JWS into its three parts.
pub fn parts(token: &str) -> (String, String, String) {
    let mut it = token.split('.');
    let h = it.next().expect("header").to_string();
    let p = it.next().expect("payload").to_string();
    let s = it.next().expect("signature").to_string();
    (h, p, s)
}

pub fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64")).expect("json")
}
