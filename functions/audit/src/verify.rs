//! `rxflow audit verify`: walk the whole trail once, in pages (constant memory), and check the
//! hash chain and every signed checkpoint against it.

use rx_guard::audit::chain::{ChainBreak, Verifier};
use rx_guard::audit::ChainedEvent;
use rx_guard::merkle::{checkpoint_hash, Checkpoint, TreeBuilder};
use rx_store::{CheckpointRow, RecordStore};
use serde::{Deserialize, Serialize};

use crate::{AuditError, Result};

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

/// Verifies the whole trail in one pass over the events, in pages (constant memory):
///
/// * every event's chain link ([`Verifier`]);
/// * every checkpoint, when the walk reaches its first event: its body parses and agrees with
///   its row, its signature verifies with `trusted_public_key` (skipped when `None`:
///   [`TrailReport::signatures_checked`] says so), its number and range follow the previous
///   checkpoint's, and its `prev_checkpoint_hash` is the hash of the previous stored checkpoint;
/// * at its last event: its root recomputes from the events and its `chain_head` is that event's
///   hash;
/// * a checkpoint covering events the trail no longer has means the end was cut off.
///
/// Stops at the first break and reports it; `Err` only when the store cannot be read.
pub async fn verify_trail(
    store: &dyn RecordStore,
    trusted_public_key: Option<&[u8]>,
) -> Result<TrailReport> {
    let rows = store.checkpoints().await?;
    let mut report = TrailReport {
        events: 0,
        checkpoints: rows.len() as u64,
        events_sealed: 0,
        signatures_checked: trusted_public_key.is_some(),
        first_break: None,
        ok: false,
    };
    let walker = Box::new(Walker {
        chain: Verifier::new(),
        sealing: Sealing::new(rows, trusted_public_key.map(<[u8]>::to_vec)),
    });
    let (walker, found) = walk(store, walker).await?;
    report.events = walker.chain.len();
    report.events_sealed = walker.sealing.sealed;
    report.ok = found.is_none();
    report.first_break = found;
    Ok(report)
}

/// The checking state, moved to a blocking thread for each page so the store reads the next
/// page while this one is hashed.
struct Walker {
    chain: Verifier,
    sealing: Sealing,
}

impl Walker {
    fn page(&mut self, page: &[ChainedEvent]) -> Option<Break> {
        for ev in page {
            if let Err(b) = self.chain.push(ev) {
                return Some(Break::from_chain(&b));
            }
            if let Err(b) = self.sealing.push(ev) {
                return Some(b);
            }
        }
        None
    }
}

/// Where the walker is: here, or hashing a page on a blocking thread.
enum Slot {
    Here(Box<Walker>),
    Away(tokio::task::JoinHandle<(Box<Walker>, Option<Break>)>),
}

/// The walk itself: `Ok(Some(break))` at the first break. Under a Tokio runtime, reading page
/// k + 1 overlaps hashing page k; elsewhere the pages are checked inline.
async fn walk(
    store: &dyn RecordStore,
    walker: Box<Walker>,
) -> Result<(Box<Walker>, Option<Break>)> {
    let runtime = tokio::runtime::Handle::try_current().ok();
    let mut slot = Slot::Here(walker);
    let mut next = 1u64;
    let mut w = loop {
        let page = store.audit_range(next, PAGE).await;
        let mut w = match slot {
            Slot::Here(w) => w,
            Slot::Away(task) => {
                let (w, found) = task.await.map_err(|e| {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                    AuditError::Interrupted
                })?;
                if found.is_some() {
                    return Ok((w, found));
                }
                w
            }
        };
        let page = page?;
        let Some(last) = page.last() else { break w };
        next = last.seq.saturating_add(1);
        slot = match &runtime {
            Some(rt) => Slot::Away(rt.spawn_blocking(move || {
                let found = w.page(&page);
                (w, found)
            })),
            None => match w.page(&page) {
                Some(found) => return Ok((w, Some(found))),
                None => Slot::Here(w),
            },
        };
    };
    let len = w.chain.len();
    let found = w.sealing.finish(len).err();
    Ok((w, found))
}

/// The checkpoint being recomputed while the events stream past.
struct Open {
    cp: Checkpoint,
    tree: TreeBuilder,
}

/// Checks the checkpoints in order against the event stream.
struct Sealing {
    rows: Vec<CheckpointRow>,
    key: Option<Vec<u8>>,
    /// Index of the next checkpoint to open.
    next: usize,
    open: Option<Open>,
    /// Events covered by checkpoints that fully verified.
    sealed: u64,
}

impl Sealing {
    fn new(rows: Vec<CheckpointRow>, key: Option<Vec<u8>>) -> Self {
        Sealing {
            rows,
            key,
            next: 0,
            open: None,
            sealed: 0,
        }
    }

    /// The static checks of checkpoint `i`: readable, signed, numbered, contiguous, linked.
    fn check(&self, i: usize) -> std::result::Result<Checkpoint, Break> {
        let row = &self.rows[i];
        let n = row.number;
        let cp = Checkpoint::from_json(&row.body).map_err(|e| {
            Break::checkpoint(
                n,
                BreakKind::CheckpointUnreadable,
                format!("checkpoint {n}: {e}"),
            )
        })?;
        if let Some(key) = self.key.as_deref() {
            cp.verify_signature(key)
                .map_err(|e| Break::checkpoint(n, BreakKind::CheckpointSignature, e.to_string()))?;
        }
        if (cp.number, cp.first_seq, cp.last_seq) != (row.number, row.first_seq, row.last_seq) {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointUnreadable,
                format!(
                    "checkpoint row {n} says events {}..={}, its signed body says checkpoint {} \
                     over events {}..={}: the row was altered",
                    row.first_seq, row.last_seq, cp.number, cp.first_seq, cp.last_seq
                ),
            ));
        }
        let (want_number, want_first, want_prev) = match i.checked_sub(1) {
            None => (1, 1, [0u8; 32]),
            Some(p) => {
                let prev = &self.rows[p];
                (
                    prev.number + 1,
                    prev.last_seq + 1,
                    checkpoint_hash(&prev.body),
                )
            }
        };
        if cp.number != want_number {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointRange,
                format!(
                    "checkpoint {} is stored where checkpoint {want_number} belongs: a \
                     checkpoint was removed, added or moved",
                    cp.number
                ),
            ));
        }
        if cp.first_seq != want_first
            || cp.last_seq < cp.first_seq
            || cp.tree_size != cp.last_seq - cp.first_seq + 1
        {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointRange,
                format!(
                    "checkpoint {n} covers events {}..={} ({} leaves) but should start at event \
                     {want_first} and have one leaf per event: the checkpoints do not cover the \
                     trail contiguously",
                    cp.first_seq, cp.last_seq, cp.tree_size
                ),
            ));
        }
        if cp.prev_checkpoint_hash != want_prev {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointUnlinked,
                format!(
                    "checkpoint {n} does not chain to checkpoint {}: one of them was replaced or \
                     altered",
                    n.saturating_sub(1)
                ),
            ));
        }
        Ok(cp)
    }

    fn push(&mut self, ev: &ChainedEvent) -> std::result::Result<(), Break> {
        if self.open.is_none() && self.next < self.rows.len() {
            // Checkpoints are contiguous from 1 (checked), so the next one starts here.
            let cp = self.check(self.next)?;
            self.next += 1;
            self.open = Some(Open {
                cp,
                tree: TreeBuilder::new(),
            });
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(()); // after the last checkpoint: not sealed yet
        };
        open.tree.push_event(&ev.hash);
        if ev.seq < open.cp.last_seq {
            return Ok(());
        }
        let cp = &open.cp;
        let n = cp.number;
        if open.tree.root() != cp.root {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointRoot,
                format!(
                    "the events {}..={} no longer give the root checkpoint {n} signed: an event \
                     in that range was altered, deleted, inserted or reordered (and the chain \
                     recomputed)",
                    cp.first_seq, cp.last_seq
                ),
            ));
        }
        if ev.hash != cp.chain_head {
            return Err(Break::checkpoint(
                n,
                BreakKind::CheckpointChainHead,
                format!(
                    "event {} is not the event checkpoint {n} sealed as its last: the trail was \
                     rewritten",
                    ev.seq
                ),
            ));
        }
        self.sealed = cp.last_seq;
        self.open = None;
        Ok(())
    }

    /// After the last event (`len`): any checkpoint left over covers events that are gone.
    fn finish(&mut self, len: u64) -> std::result::Result<(), Break> {
        let cp = match self.open.take() {
            Some(open) => open.cp,
            None if self.next < self.rows.len() => self.check(self.next)?,
            None => return Ok(()),
        };
        Err(Break::checkpoint(
            cp.number,
            BreakKind::Truncated,
            format!(
                "checkpoint {} covers events up to {} but the trail ends at event {len}: events \
                 were removed from the end of the trail",
                cp.number, cp.last_seq
            ),
        ))
    }
}
