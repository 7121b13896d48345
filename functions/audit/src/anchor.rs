//! A trust anchor: the latest checkpoint, named by its number and the hash of its stored bytes,
//! for the operator to keep outside the data directory (as CloudTrail delivers its digest files
//! to another bucket).
//!
//! Whoever can write the data directory can delete the newest checkpoints together with the
//! events they cover, or every checkpoint, and leave a shorter trail that verifies on its own.
//! [`crate::verify_trail_anchored`] fails unless the trail still holds the anchored checkpoint
//! byte for byte, so everything up to it (earlier checkpoints chain into it, events into their
//! roots) is as it was when the anchor was taken.

use rx_guard::merkle::{checkpoint_hash, Checkpoint, Hash};
use rx_store::{CheckpointRow, RecordStore};
use serde::{Deserialize, Serialize};

use crate::verify::{Break, BreakKind};
use crate::{AuditError, Result};

/// The `version` this build writes and reads.
pub const ANCHOR_VERSION: u32 = 1;

/// What `rxflow audit anchor` prints. Hashes are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// Always [`ANCHOR_VERSION`].
    pub version: u32,
    /// The checkpoint's number.
    pub checkpoint: u64,
    /// SHA-256 of the checkpoint's stored bytes, signature included (what the next checkpoint's
    /// `prev_checkpoint_hash` holds).
    #[serde(with = "hex32")]
    pub checkpoint_hash: Hash,
    /// The last event the checkpoint covers.
    pub last_seq: u64,
    /// That event's chain hash.
    #[serde(with = "hex32")]
    pub chain_head: Hash,
    /// The key that signed the checkpoint.
    pub key_id: String,
}

impl Anchor {
    /// The anchor of one stored checkpoint.
    pub fn of(row: &CheckpointRow) -> Result<Anchor> {
        let cp =
            Checkpoint::from_json(&row.body).map_err(|e| AuditError::UnreadableCheckpoint {
                number: row.number,
                reason: e.to_string(),
            })?;
        Ok(Anchor {
            version: ANCHOR_VERSION,
            checkpoint: cp.number,
            checkpoint_hash: checkpoint_hash(&row.body),
            last_seq: cp.last_seq,
            chain_head: cp.chain_head,
            key_id: cp.key_id,
        })
    }

    /// Reads an anchor file's text.
    pub fn from_json(text: &str) -> Result<Anchor> {
        let a: Anchor =
            serde_json::from_str(text).map_err(|e| AuditError::AnchorUnreadable(e.to_string()))?;
        if a.version != ANCHOR_VERSION {
            return Err(AuditError::AnchorUnreadable(format!(
                "version {} (this build reads version {ANCHOR_VERSION})",
                a.version
            )));
        }
        Ok(a)
    }
}

/// The anchor of the latest stored checkpoint; `None` when nothing was sealed yet.
pub async fn latest_anchor(store: &dyn RecordStore) -> Result<Option<Anchor>> {
    match store.checkpoints().await?.last() {
        Some(row) => Anchor::of(row).map(Some),
        None => Ok(None),
    }
}

/// Whether the stored checkpoints still hold `anchor`'s checkpoint unchanged. That its events are
/// all there is left to the walk, which checks the checkpoint's root and `chain_head`.
pub(crate) fn check(anchor: &Anchor, rows: &[CheckpointRow]) -> Option<Break> {
    let n = anchor.checkpoint;
    let Some(row) = rows.iter().find(|r| r.number == n) else {
        let held = match rows.last() {
            Some(last) => format!("its checkpoints end at checkpoint {}", last.number),
            None => "it has no checkpoint at all".to_string(),
        };
        return Some(Break::checkpoint(
            n,
            BreakKind::AnchorMismatch,
            format!(
                "the anchor records checkpoint {n} (events up to {}) but {held}: checkpoints \
                 were removed, with the events they covered",
                anchor.last_seq
            ),
        ));
    };
    if checkpoint_hash(&row.body) != anchor.checkpoint_hash {
        return Some(Break::checkpoint(
            n,
            BreakKind::AnchorMismatch,
            format!(
                "checkpoint {n} is not the one the anchor recorded (its hash differs): it was \
                 replaced or re-signed, and the trail before it may have been rewritten"
            ),
        ));
    }
    // Same bytes, so the same fields, unless the anchor file itself was edited.
    let same = Anchor::of(row).is_ok_and(|a| a == *anchor);
    if !same {
        return Some(Break::checkpoint(
            n,
            BreakKind::AnchorMismatch,
            format!(
                "the anchor's hash matches checkpoint {n} but its other fields do not: the \
                 anchor file was edited; take a new one from a trail that verifies"
            ),
        ));
    }
    None
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 64 hex digits (a SHA-256 hash)"))?;
        Ok(out)
    }
}
