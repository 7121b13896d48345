//! Inclusion proofs: built from a real SQLite trail, checked with the public key alone.

mod support;

use rx_fn_audit::{prove, verify_proof, AuditError, InclusionProof};
use rx_guard::merkle::{CheckpointSigner, LocalSigner};
use support::*;

async fn proof_for(t: &Trail, seq: u64) -> InclusionProof {
    prove(&t.store, &event_id(t, seq).await).await.unwrap()
}

async fn event_id(t: &Trail, seq: u64) -> String {
    use rx_store::RecordStore;
    let ev = &t.store.audit_range(seq, 1).await.unwrap()[0];
    serde_json::from_slice::<rx_guard::audit::AuditEvent>(&ev.body)
        .unwrap()
        .id
}

#[tokio::test]
async fn a_proof_for_every_real_event_verifies_with_the_public_key_alone() {
    let t = trail(45, 15).await;
    for seq in 1..=45 {
        let proof = proof_for(&t, seq).await;
        assert_eq!(proof.seq, seq);
        assert_eq!(proof.checkpoint.number, (seq - 1) / 15 + 1);
        // Through JSON and back, as an outside party gets it.
        let json = serde_json::to_string_pretty(&proof).unwrap();
        let back: InclusionProof = serde_json::from_str(&json).unwrap();
        assert_eq!(back, proof);
        verify_proof(&back, &t.key()).unwrap();
    }
}

#[tokio::test]
async fn a_single_event_checkpoint_proves_with_an_empty_path() {
    let t = trail(1, 1).await;
    let proof = proof_for(&t, 1).await;
    assert!(proof.audit_path.is_empty());
    verify_proof(&proof, &t.key()).unwrap();
}

fn invalid(r: rx_fn_audit::Result<()>) -> String {
    match r {
        Err(AuditError::ProofInvalid(why)) => why,
        other => panic!("expected an invalid proof, got {other:?}"),
    }
}

#[tokio::test]
async fn an_altered_proof_fails() {
    let t = trail(40, 20).await;
    let proof = proof_for(&t, 27).await;
    let key = t.key();

    let mut p = proof.clone();
    p.body = p.body.replace("\"read\"", "\"create\"");
    assert!(invalid(verify_proof(&p, &key)).contains("altered"));

    let mut p = proof.clone();
    p.audit_path[2][5] ^= 1;
    assert!(invalid(verify_proof(&p, &key)).contains("root"));

    let mut p = proof.clone();
    p.leaf_index += 1;
    invalid(verify_proof(&p, &key));

    let mut p = proof.clone();
    p.checkpoint.root[0] ^= 1;
    assert!(invalid(verify_proof(&p, &key)).contains("root"));

    let mut p = proof.clone();
    p.event_id = "019ae000-0000-7000-8000-000000000009".into();
    invalid(verify_proof(&p, &key));

    // A checkpoint re-signed by another key does not verify with the trusted one.
    let dir = tempfile::tempdir().unwrap();
    let rogue = LocalSigner::open_or_create(&dir.path().join("rogue.pk8")).unwrap();
    let mut p = proof.clone();
    p.checkpoint.signature = rogue.sign(&p.checkpoint.signing_input()).await.unwrap();
    assert!(invalid(verify_proof(&p, &key)).contains("signature"));
    assert!(invalid(verify_proof(&proof, &rogue.public_key())).contains("signature"));

    verify_proof(&proof, &key).unwrap();
}

#[tokio::test]
async fn unsealed_and_unknown_events_say_what_to_do() {
    let t = trail(25, 20).await;
    let id = event_id(&t, 23).await;
    match prove(&t.store, &id).await {
        Err(e @ AuditError::NotSealed { seq: 23, .. }) => {
            assert!(e.to_string().contains("rxflow audit seal"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        prove(&t.store, "019ae000-0000-7000-8000-00000000abcd").await,
        Err(AuditError::EventNotFound(_))
    ));
}

#[tokio::test]
async fn no_proof_is_built_from_a_tampered_checkpoint_range() {
    let t = trail(40, 20).await;
    let id = event_id(&t, 5).await;
    let db = attacker(&t.db());
    let edited = String::from_utf8(body(&db, 12))
        .unwrap()
        .replace("\"read\"", "\"create\"");
    set_body(&db, 12, edited.as_bytes());
    rechain(&db);
    assert!(matches!(
        prove(&t.reopen(), &id).await,
        Err(AuditError::Inconsistent(_))
    ));
}

/// The docs are enough: an independent Python verifier (hashlib + cryptography) written from
/// `docs/audit-trail.md` accepts a real proof with the `.pub` file, and rejects an altered one.
#[tokio::test]
async fn an_outside_verifier_checks_a_proof_with_the_public_key_file_alone() {
    let script = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("tests/verify_proof.py");
    let python = std::env::var("RXFLOW_PY").unwrap_or_else(|_| "python3".into());
    let ready = std::process::Command::new(&python)
        .args(["-c", "import cryptography"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ready {
        assert!(
            std::env::var_os("RXFLOW_STRICT").is_none(),
            "RXFLOW_STRICT is set but {python} cannot import cryptography; run .ci/run's install step"
        );
        eprintln!(
            "skipped: needs python3 with the cryptography package (pip install cryptography)"
        );
        return;
    }
    let t = trail(45, 15).await;
    let pub_file = t.signer.public_key_path().to_path_buf();
    let run = |proof: &InclusionProof| {
        let path = t.dir.path().join("proof.json");
        std::fs::write(&path, serde_json::to_vec_pretty(proof).unwrap()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg(&path)
            .arg(&pub_file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    for seq in [1, 16, 29, 45] {
        let proof = proof_for(&t, seq).await;
        let (code, out) = run(&proof);
        assert_eq!(code, Some(0), "seq {seq}: {out}");
    }
    let mut altered = proof_for(&t, 29).await;
    altered.body = altered.body.replace("rx-29", "rx-92");
    assert_eq!(run(&altered).0, Some(1));
    let mut altered = proof_for(&t, 29).await;
    altered.checkpoint.signed_at += chrono::Duration::seconds(1);
    let (code, out) = run(&altered);
    assert_eq!(code, Some(1));
    assert!(out.contains("signature"), "{out}");
}

#[tokio::test]
async fn the_public_key_file_the_signer_wrote_is_read_back_as_the_trusted_key() {
    let t = trail(3, 3).await;
    let key = rx_fn_audit::read_public_key(t.signer.public_key_path()).unwrap();
    assert_eq!(key, t.key());
    let missing = rx_fn_audit::read_public_key(&t.dir.path().join("nope.pub"));
    assert!(matches!(missing, Err(AuditError::PublicKey(_))));
}
