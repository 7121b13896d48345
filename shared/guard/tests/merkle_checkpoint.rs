//! Signed checkpoints: the local Ed25519 key file, the public key file, the canonical JSON and
//! its signature.

use chrono::{TimeZone, Utc};
use rx_guard::merkle::{
    checkpoint_hash, parse_public_key, Checkpoint, CheckpointError, CheckpointSigner, LocalSigner,
    CHECKPOINT_VERSION, ED25519, SIGNING_INPUT_PREFIX,
};

async fn signed(signer: &dyn CheckpointSigner) -> Checkpoint {
    let mut cp = Checkpoint {
        version: CHECKPOINT_VERSION,
        number: 2,
        first_seq: 11,
        last_seq: 20,
        tree_size: 10,
        root: [7u8; 32],
        prev_checkpoint_hash: checkpoint_hash(b"previous"),
        chain_head: [9u8; 32],
        signed_at: Utc.with_ymd_and_hms(2026, 12, 4, 5, 0, 0).unwrap(),
        key_id: signer.key_id().to_string(),
        algorithm: signer.algorithm().to_string(),
        signature: vec![],
    };
    cp.signature = signer.sign(&cp.signing_input()).await.unwrap();
    cp
}

#[tokio::test]
async fn signing_key_is_created_private_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys").join("audit-signing.pk8");
    let first = LocalSigner::open_or_create(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let again = LocalSigner::open_or_create(&path).unwrap();
    assert_eq!(first.public_key(), again.public_key());
    assert_eq!(first.key_id(), again.key_id());
    assert!(first.key_id().starts_with("local-ed25519:"));
    assert_eq!(first.algorithm(), ED25519);
}

#[tokio::test]
async fn public_key_file_alone_verifies_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let signer = LocalSigner::open_or_create(&dir.path().join("audit-signing.pk8")).unwrap();
    let pub_path = dir.path().join("audit-signing.pub");
    assert_eq!(signer.public_key_path(), pub_path);
    let text = std::fs::read_to_string(&pub_path).unwrap();
    assert!(text.contains("-----BEGIN PUBLIC KEY-----"));
    let key = parse_public_key(&text).unwrap();
    assert_eq!(key, signer.public_key());
    // Either half of the file works on its own.
    let pem = &text[text.find("-----BEGIN").unwrap()..];
    assert_eq!(parse_public_key(pem).unwrap(), key);
    assert_eq!(parse_public_key(&hex::encode(&key)).unwrap(), key);

    let cp = signed(&signer).await;
    let stored = cp.to_json();
    let back = Checkpoint::from_json(&stored).unwrap();
    assert_eq!(back, cp);
    assert_eq!(
        back.to_json(),
        stored,
        "canonical JSON round-trips byte for byte"
    );
    back.verify_signature(&key).unwrap();
}

#[tokio::test]
async fn signing_input_is_prefix_and_json_without_signature() {
    let dir = tempfile::tempdir().unwrap();
    let signer = LocalSigner::open_or_create(&dir.path().join("k.pk8")).unwrap();
    let cp = signed(&signer).await;
    let input = cp.signing_input();
    assert!(input.starts_with(SIGNING_INPUT_PREFIX));
    let json: serde_json::Value =
        serde_json::from_slice(&input[SIGNING_INPUT_PREFIX.len()..]).unwrap();
    let mut full: serde_json::Value = serde_json::from_slice(&cp.to_json()).unwrap();
    full.as_object_mut().unwrap().remove("signature");
    assert_eq!(json, full);
    let keys: Vec<_> =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&cp.to_json())
            .unwrap()
            .keys()
            .cloned()
            .collect();
    assert_eq!(keys.len(), 12);
}

#[tokio::test]
async fn any_changed_field_or_another_key_fails_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let signer = LocalSigner::open_or_create(&dir.path().join("a.pk8")).unwrap();
    let other = LocalSigner::open_or_create(&dir.path().join("b.pk8")).unwrap();
    let cp = signed(&signer).await;
    let key = signer.public_key();

    let mut changed = cp.clone();
    changed.last_seq += 1;
    assert_eq!(
        changed.verify_signature(&key),
        Err(CheckpointError::BadSignature { number: 2 })
    );
    let mut changed = cp.clone();
    changed.root[0] ^= 1;
    assert!(changed.verify_signature(&key).is_err());

    // Re-signed by another key (key id and all): fails against the trusted key.
    let mut resigned = cp.clone();
    resigned.key_id = other.key_id().to_string();
    resigned.signature = other.sign(&resigned.signing_input()).await.unwrap();
    resigned.verify_signature(&other.public_key()).unwrap();
    assert_eq!(
        resigned.verify_signature(&key),
        Err(CheckpointError::BadSignature { number: 2 })
    );
}

#[test]
fn malformed_or_unknown_checkpoints_are_refused() {
    assert!(matches!(
        Checkpoint::from_json(b"{\"number\":1}"),
        Err(CheckpointError::Malformed(_))
    ));
    assert!(parse_public_key("not a key").is_err());
    assert!(parse_public_key(&"ab".repeat(31)).is_err());
}
