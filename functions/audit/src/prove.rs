//! `rxflow audit prove`: the inclusion proof of one event in the checkpoint that covers it, and
//! its verification with nothing but the proof and the public key.

use rx_guard::audit::chain::link;
use rx_guard::audit::{AuditEvent, ChainedEvent};
use rx_guard::merkle::{leaf_hash, verify_inclusion, Checkpoint, Hash, PathBuilder};
use rx_store::RecordStore;
use serde::{Deserialize, Serialize};

use crate::verify::PAGE;
use crate::{AuditError, Result};

/// Everything needed to check that one event is in a signed checkpoint. JSON-serializable;
/// hashes are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub event_id: String,
    pub seq: u64,
    /// The event's stored canonical bytes (UTF-8 JSON), exactly as hashed.
    pub body: String,
    /// Chain hash of the event before it (`GENESIS`, all zeros, for the first event).
    #[serde(with = "hex32")]
    pub prev_hash: Hash,
    /// The event's chain hash: `SHA-256("rxflow-audit-v1" | prev_hash | body)`.
    #[serde(with = "hex32")]
    pub hash: Hash,
    /// Position of the event's leaf in the checkpoint's tree (`seq - first_seq`).
    pub leaf_index: u64,
    /// Sibling subtree hashes from the leaf up to the root (RFC 6962 PATH).
    #[serde(with = "hex_path")]
    pub audit_path: Vec<Hash>,
    /// The signed checkpoint that covers the event.
    pub checkpoint: Checkpoint,
}

impl InclusionProof {
    /// The event the proof is about.
    pub fn event(&self) -> Result<AuditEvent> {
        serde_json::from_str(&self.body).map_err(|e| AuditError::UnreadableEvent {
            seq: self.seq,
            reason: e.to_string(),
        })
    }
}

/// Whether the stored body is the event `id` (canonical bodies start with the id).
fn is_event(ev: &ChainedEvent, prefix: &[u8]) -> bool {
    ev.body.starts_with(prefix)
}

/// Builds the inclusion proof of the event `event_id` against the checkpoint that covers it.
///
/// Errors: [`AuditError::EventNotFound`], [`AuditError::NotSealed`] (seal first), and
/// [`AuditError::Inconsistent`] when the stored events no longer give the checkpoint's root
/// (run `rxflow audit verify`).
pub async fn prove(store: &dyn RecordStore, event_id: &str) -> Result<InclusionProof> {
    let prefix = serde_json::to_vec(&serde_json::json!({ "id": event_id }))
        .map_err(|e| AuditError::EventNotFound(format!("{event_id} ({e})")))?;
    // `{"id":"…"}` without its closing brace, then the comma before the next field.
    let mut prefix = prefix[..prefix.len() - 1].to_vec();
    prefix.push(b',');

    let mut found: Option<ChainedEvent> = None;
    let mut next = 1u64;
    'scan: loop {
        let page = store.audit_range(next, PAGE).await?;
        let Some(last) = page.last() else { break };
        next = last.seq.saturating_add(1);
        for ev in page {
            if is_event(&ev, &prefix) {
                found = Some(ev);
                break 'scan;
            }
        }
    }
    let ev = found.ok_or_else(|| AuditError::EventNotFound(event_id.to_string()))?;
    let body = String::from_utf8(ev.body.clone()).map_err(|_| AuditError::UnreadableEvent {
        seq: ev.seq,
        reason: "the body is not UTF-8 JSON".into(),
    })?;

    let rows = store.checkpoints().await?;
    let row = rows
        .iter()
        .find(|r| r.first_seq <= ev.seq && ev.seq <= r.last_seq)
        .ok_or_else(|| AuditError::NotSealed {
            event_id: event_id.to_string(),
            seq: ev.seq,
        })?;
    let checkpoint =
        Checkpoint::from_json(&row.body).map_err(|e| AuditError::UnreadableCheckpoint {
            number: row.number,
            reason: e.to_string(),
        })?;
    let inconsistent = |what: &str| {
        AuditError::Inconsistent(format!(
            "{what} checkpoint {}; run `rxflow audit verify` to find the break",
            checkpoint.number
        ))
    };
    if checkpoint.first_seq > ev.seq || ev.seq > checkpoint.last_seq {
        return Err(inconsistent(
            "the checkpoint row disagrees with the body of",
        ));
    }

    let leaf_index = ev.seq - checkpoint.first_seq;
    let mut path = PathBuilder::new(leaf_index, checkpoint.tree_size);
    let mut expected = checkpoint.first_seq;
    'leaves: while expected <= checkpoint.last_seq {
        let want = (checkpoint.last_seq - expected + 1).min(PAGE as u64) as usize;
        let page = store.audit_range(expected, want).await?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            if e.seq != expected || e.seq > checkpoint.last_seq {
                break 'leaves;
            }
            path.push_event(&e.hash);
            expected += 1;
        }
    }
    let (leaf, audit_path) = path
        .finish()
        .ok_or_else(|| inconsistent("the trail no longer holds every event of"))?;
    if leaf != leaf_hash(&ev.hash)
        || verify_inclusion(
            leaf_index,
            checkpoint.tree_size,
            &leaf,
            &audit_path,
            &checkpoint.root,
        )
        .is_err()
    {
        return Err(inconsistent("the stored events no longer give the root of"));
    }

    Ok(InclusionProof {
        event_id: event_id.to_string(),
        seq: ev.seq,
        body,
        prev_hash: ev.prev_hash,
        hash: ev.hash,
        leaf_index,
        audit_path,
        checkpoint,
    })
}

/// Checks an inclusion proof with nothing else but the signer's public key: the body hashes to
/// the event's chain hash, the event is the one named, its leaf and audit path lead to the
/// checkpoint's root, and the checkpoint's signature verifies.
pub fn verify_proof(proof: &InclusionProof, public_key: &[u8]) -> Result<()> {
    let bad = |why: String| Err(AuditError::ProofInvalid(why));
    let cp = &proof.checkpoint;
    if link(&proof.prev_hash, proof.body.as_bytes()) != proof.hash {
        return bad(format!(
            "the event body does not hash to the chain hash of event {}: the event was altered",
            proof.seq
        ));
    }
    match proof.event() {
        Ok(e) if e.id == proof.event_id => {}
        _ => {
            return bad(format!(
                "the event body is not the event {} the proof names",
                proof.event_id
            ))
        }
    }
    if proof.seq < cp.first_seq
        || proof.seq > cp.last_seq
        || proof.leaf_index != proof.seq - cp.first_seq
        || cp.tree_size != cp.last_seq - cp.first_seq + 1
    {
        return bad(format!(
            "event {} at leaf {} is not inside checkpoint {} (events {}..={})",
            proof.seq, proof.leaf_index, cp.number, cp.first_seq, cp.last_seq
        ));
    }
    if proof.seq == cp.last_seq && proof.hash != cp.chain_head {
        return bad(format!(
            "event {} is the last of checkpoint {} but is not its chain head",
            proof.seq, cp.number
        ));
    }
    if let Err(e) = verify_inclusion(
        proof.leaf_index,
        cp.tree_size,
        &leaf_hash(&proof.hash),
        &proof.audit_path,
        &cp.root,
    ) {
        return bad(format!("{e} (checkpoint {})", cp.number));
    }
    cp.verify_signature(public_key)
        .map_err(|e| AuditError::ProofInvalid(e.to_string()))
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

mod hex_path {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(hex::encode).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map(|_| out)
            })
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}
