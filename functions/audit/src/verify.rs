//! `rxflow audit verify`: walk the whole trail once, in pages (constant memory), and check the
//! hash chain and every signed checkpoint against it.

use rx_guard::audit::chain::{ChainBreak, Verifier};
use rx_store::RecordStore;
use serde::{Deserialize, Serialize};

use crate::Result;

/// Events read per page while walking the trail.
pub const PAGE: usize = 4096;

/// What kind of break was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakKind {
    /// An event's body no longer matches its hash.
    EventAltered,
    /// An event does not follow the one before it (deleted, inserted or moved).
    EventUnlinked,
    /// Sequence numbers skip or repeat.
    SequenceGap,
    /// A stored event body is not a readable event.
    EventUnreadable,
    /// A checkpoint body does not parse, or disagrees with its row.
    CheckpointUnreadable,
    /// Checkpoint numbers or ranges are not contiguous.
    CheckpointRange,
    /// A checkpoint's `prev_checkpoint_hash` does not match the checkpoint before it.
    CheckpointUnlinked,
    /// A checkpoint's signature does not verify with the trusted public key.
    CheckpointSignature,
    /// A checkpoint's Merkle root does not recompute from the events it covers.
    CheckpointRoot,
    /// A checkpoint's `chain_head` is not the hash of the last event it covers.
    CheckpointChainHead,
    /// A checkpoint covers events the trail no longer has: the end was cut off.
    Truncated,
}

/// The first place the trail fails to verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Break {
    /// The event at which the break was found, if it is an event's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The checkpoint that failed, if it is a checkpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    pub kind: BreakKind,
    /// What is wrong, in a sentence an auditor can act on.
    pub sentence: String,
}

impl Break {
    pub(crate) fn event(seq: u64, kind: BreakKind, sentence: impl Into<String>) -> Self {
        Break {
            seq: Some(seq),
            checkpoint: None,
            kind,
            sentence: sentence.into(),
        }
    }

    pub(crate) fn checkpoint(number: u64, kind: BreakKind, sentence: impl Into<String>) -> Self {
        Break {
            seq: None,
            checkpoint: Some(number),
            kind,
            sentence: sentence.into(),
        }
    }

    fn from_chain(b: &ChainBreak) -> Self {
        let kind = match b {
            ChainBreak::Altered { .. } => BreakKind::EventAltered,
            ChainBreak::Unlinked { .. } => BreakKind::EventUnlinked,
            ChainBreak::Gap { .. } => BreakKind::SequenceGap,
        };
        Break::event(b.seq(), kind, b.to_string())
    }
}

/// The outcome of [`verify_trail`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailReport {
    /// Events whose chain link was checked (all of them when `ok`).
    pub events: u64,
    /// Checkpoints stored.
    pub checkpoints: u64,
    /// Events covered by checkpoints that fully verified.
    pub events_sealed: u64,
    /// Whether signatures were checked (a trusted public key was given).
    pub signatures_checked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_break: Option<Break>,
    pub ok: bool,
}

/// Verifies the whole trail: the hash chain of every event, then each checkpoint (see the
/// module docs). Stops at the first break and reports it; `Err` only when the store cannot be
/// read.
pub async fn verify_trail(
    store: &dyn RecordStore,
    trusted_public_key: Option<&[u8]>,
) -> Result<TrailReport> {
    let checkpoints = store.checkpoints().await?;
    let mut report = TrailReport {
        events: 0,
        checkpoints: checkpoints.len() as u64,
        events_sealed: 0,
        signatures_checked: trusted_public_key.is_some(),
        first_break: None,
        ok: false,
    };
    let mut chain = Verifier::new();
    let mut next = 1u64;
    loop {
        let page = store.audit_range(next, PAGE).await?;
        let Some(last) = page.last() else { break };
        next = last.seq.saturating_add(1);
        for ev in &page {
            if let Err(b) = chain.push(ev) {
                report.events = chain.len();
                report.first_break = Some(Break::from_chain(&b));
                return Ok(report);
            }
        }
    }
    report.events = chain.len();
    report.ok = report.first_break.is_none();
    Ok(report)
}
