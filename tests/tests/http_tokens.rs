//! `rxflow token` and the verifier `serve` trusts: a token minted on a data directory is accepted
//! by the server on that directory (key file 0600); with RXFLOW_JWKS the server trusts that key
//! set instead, and the dev key no longer.

mod http_support;

use std::path::Path;

use http_support::*;
use rx_guard::access::{DevClaims, DevIssuer, Role};
use rxflow::serve::verifier_from_env;
use rxflow::token::{issuer_dir, mint, TokenArgs};

fn args(data_dir: &Path) -> TokenArgs {
    TokenArgs {
        role: Role::Pharmacist,
        sub: "rph-cli".into(),
        tenant: TENANT.into(),
        mfa: true,
        npi: None,
        ttl_minutes: 5,
        data_dir: data_dir.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_token_is_trusted_by_the_server_on_the_same_data_dir() {
    let s = TestServer::start().await;
    let data_dir = s.data_dir();
    let token = mint(&args(&data_dir)).expect("token");
    let r = s.call("GET", "/queue", Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = issuer_dir(&data_dir).join("dev-signing.pk8");
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    s.stop().await;
}

#[test]
fn minting_on_a_new_data_dir_creates_it_private() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("fresh");
    mint(&args(&data)).expect("token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [data.clone(), issuer_dir(&data)] {
            let mode = std::fs::metadata(&d).expect("dir").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {:o}", d.display(), mode);
        }
    }
    let bad = TokenArgs {
        ttl_minutes: 0,
        ..args(&data)
    };
    assert!(mint(&bad).is_err());
}

#[tokio::test]
async fn with_rxflow_jwks_the_server_trusts_that_issuer_and_not_the_dev_key() {
    let dir = tempfile::tempdir().expect("dir");
    let idp = DevIssuer::open_or_create(&dir.path().join("idp")).expect("idp");
    let data = dir.path().join("data");
    let dev = DevIssuer::open_or_create(&issuer_dir(&data)).expect("dev");
    let jwks = idp.jwks_path().display().to_string();
    let env = |k: &str| match k {
        "RXFLOW_JWKS" => Some(jwks.clone()),
        "RXFLOW_JWT_ISSUER" => Some(idp.issuer().to_string()),
        "RXFLOW_JWT_AUDIENCE" => Some(idp.audience().to_string()),
        _ => None,
    };
    let verifier = verifier_from_env(&data, env).expect("verifier");
    let claims = DevClaims {
        subject: "rph-idp".into(),
        role: Role::Pharmacist,
        tenant: TENANT.into(),
        mfa: true,
        npi: None,
    };
    let ttl = std::time::Duration::from_secs(60);
    let p = verifier
        .verify(&idp.issue(&claims, ttl).expect("token"))
        .await
        .expect("the IdP's token verifies");
    assert_eq!(p.subject, "rph-idp");
    assert!(verifier
        .verify(&dev.issue(&claims, ttl).expect("token"))
        .await
        .is_err());

    let incomplete = |k: &str| (k == "RXFLOW_JWKS").then(|| jwks.clone());
    let err = verifier_from_env(&data, incomplete).expect_err("issuer and audience are required");
    assert!(err.to_string().contains("RXFLOW_JWT_ISSUER"), "{err}");
}
