//! `rxflow audit verify`: walk the whole trail once, in pages (constant memory), and check the
//! hash chain, each event's searchable columns and every signed checkpoint against it; then that
//! the records the store holds are accounted for by the trail, and the trail still holds an
//! anchor kept elsewhere.

use chrono::{DateTime, Utc};
use rx_guard::audit::chain::{ChainBreak, Verifier};
use rx_guard::audit::{AuditEvent, ChainedEvent};
use rx_guard::merkle::{checkpoint_hash, Checkpoint, TreeBuilder};
use rx_store::{AuditPage, CheckpointRow, RecordStore, RowFault, Table};
use serde::{Deserialize, Serialize};

use crate::anchor::Anchor;
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
    /// An event's searchable column (subject, patient, action …) no longer holds what its hashed
    /// body says: searches by that column miss or misplace the event.
    EventIndexMismatch,
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
    /// The store holds prescriptions or patients changed after the trail's last event (or the
    /// trail is empty): the events recording those changes are gone.
    RecordsWithoutEvents,
    /// The trail no longer holds the checkpoint an anchor kept outside the data recorded.
    AnchorMismatch,
    /// The data directory sealed more checkpoints than the trail now holds (its
    /// `keys/audit-sealed` record, outside the database): checkpoints were deleted.
    CheckpointsMissing,
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

    fn from_row(f: &RowFault) -> Self {
        match f {
            RowFault::Mismatch { seq, column } => Break::event(
                *seq,
                BreakKind::EventIndexMismatch,
                format!(
                    "the {column} column of audit event {seq} does not hold what the event's \
                     hashed body says: the column was edited, so searches by {column} miss or \
                     misplace this event"
                ),
            ),
            RowFault::Unreadable { seq, reason } => Break::event(
                *seq,
                BreakKind::EventUnreadable,
                format!(
                    "audit event {seq} is not a readable audit event ({reason}): it was \
                     rewritten, and its searchable columns cannot be checked"
                ),
            ),
        }
    }

    /// A break of the trail as a whole, not of one event or checkpoint.
    pub(crate) fn trail(kind: BreakKind, sentence: impl Into<String>) -> Self {
        Break {
            seq: None,
            checkpoint: None,
            kind,
            sentence: sentence.into(),
        }
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
    /// The checkpoint an anchor recorded, found unchanged ([`verify_trail_anchored`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchored_checkpoint: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_break: Option<Break>,
    pub ok: bool,
}

/// Verifies the whole trail in one pass over the events, in pages (constant memory):
///
/// * every event's chain link ([`Verifier`]), then that its searchable columns hold what its body
///   says ([`RecordStore::audit_range_checked`]);
/// * every checkpoint, when the walk reaches its first event: its body parses and agrees with
///   its row, its signature verifies with `trusted_public_key` (skipped when `None`:
///   [`TrailReport::signatures_checked`] says so), its number and range follow the previous
///   checkpoint's, and its `prev_checkpoint_hash` is the hash of the previous stored checkpoint;
/// * at its last event: its root recomputes from the events and its `chain_head` is that event's
///   hash;
/// * a checkpoint covering events the trail no longer has means the end was cut off;
/// * after the walk: no prescription or patient record changed after the last event (or
///   exists at all when the trail is empty): every change commits with its event, so such a record
///   means the end of the trail was cut off, checkpoints and all.
///
/// Stops at the first break and reports it; `Err` only when the store cannot be read.
pub async fn verify_trail(
    store: &dyn RecordStore,
    trusted_public_key: Option<&[u8]>,
) -> Result<TrailReport> {
    verify(store, trusted_public_key, None).await
}

/// [`verify_trail`], and then that the trail still holds the checkpoint `anchor` recorded,
/// byte for byte, and at least the events it covers: a trail cut back behind an anchor kept
/// outside the data directory (newest checkpoints deleted with their events) is detected.
pub async fn verify_trail_anchored(
    store: &dyn RecordStore,
    trusted_public_key: Option<&[u8]>,
    anchor: &Anchor,
) -> Result<TrailReport> {
    verify(store, trusted_public_key, Some(anchor)).await
}

async fn verify(
    store: &dyn RecordStore,
    trusted_public_key: Option<&[u8]>,
    anchor: Option<&Anchor>,
) -> Result<TrailReport> {
    // Before the walk: a record written while it runs commits with its event, which the walk
    // then sees, so it cannot look unaccounted for.
    let records = latest_records(store).await?;
    let rows = store.checkpoints().await?;
    let mut report = TrailReport {
        events: 0,
        checkpoints: rows.len() as u64,
        events_sealed: 0,
        signatures_checked: trusted_public_key.is_some(),
        anchored_checkpoint: None,
        first_break: None,
        ok: false,
    };
    let anchor_break = anchor.and_then(|a| crate::anchor::check(a, &rows));
    let walker = Box::new(Walker {
        chain: Verifier::new(),
        sealing: Sealing::new(rows, trusted_public_key.map(<[u8]>::to_vec)),
    });
    // A row numbered below the first event lies outside the chain the walk follows (from 1).
    let stray = match store.audit_lowest_seq().await? {
        Some(low) if low < 1 => Some(Break::trail(
            BreakKind::SequenceGap,
            format!(
                "the trail holds an audit row numbered {low}, before its first event (1): a row \
                 was inserted outside the chain"
            ),
        )),
        _ => None,
    };
    let (walker, walked) = walk(store, walker).await?;
    let mut found = stray.or(walked);
    report.events = walker.chain.len();
    report.events_sealed = walker.sealing.sealed;
    if found.is_none() {
        found = anchor_break;
        report.anchored_checkpoint = anchor.filter(|_| found.is_none()).map(|a| a.checkpoint);
    }
    if found.is_none() {
        found = unaccounted_records(store, &records, report.events).await?;
    }
    report.ok = found.is_none();
    report.first_break = found;
    Ok(report)
}

/// The tables whose every change commits with an audit event naming it.
const AUDITED_TABLES: [Table; 2] = [Table::Prescriptions, Table::Patients];

/// How much later than the last event a record may have changed: its `updated_at` is stamped
/// just after its event (microseconds), and the clock may step back a little between events.
const RECORD_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// What a table's records are called in a sentence.
fn noun(table: Table) -> &'static str {
    match table {
        Table::Prescriptions => "prescription",
        Table::Patients => "patient",
        Table::Prescribers => "prescriber",
        Table::Inputs => "quarantined input",
        Table::BreakGlass => "break-glass",
    }
}

/// When each audited table last changed, for the tables that hold anything.
async fn latest_records(store: &dyn RecordStore) -> Result<Vec<(Table, DateTime<Utc>)>> {
    let mut out = Vec::new();
    for table in AUDITED_TABLES {
        if let Some(at) = store.last_updated(table).await? {
            out.push((table, at));
        }
    }
    Ok(out)
}

/// The record rule, over the `events` the walk verified.
async fn unaccounted_records(
    store: &dyn RecordStore,
    records: &[(Table, DateTime<Utc>)],
    events: u64,
) -> Result<Option<Break>> {
    if records.is_empty() {
        return Ok(None);
    }
    if events == 0 {
        let mut held = Vec::new();
        for (table, _) in records {
            let n: u64 = store
                .count_by_status(*table)
                .await?
                .iter()
                .map(|(_, n)| n)
                .sum();
            held.push(format!("{n} {} records", noun(*table)));
        }
        return Ok(Some(Break::trail(
            BreakKind::RecordsWithoutEvents,
            format!(
                "the store holds {} but the audit trail is empty: the events recording them \
                 (and any checkpoints) were deleted",
                held.join(" and ")
            ),
        )));
    }
    let last = store.audit_range(events, 1).await?;
    let Some(ev) = last.first().filter(|e| e.seq == events) else {
        return Err(AuditError::Inconsistent(format!(
            "audit event {events} vanished while the trail was being checked"
        )));
    };
    let last_at = match serde_json::from_slice::<AuditEvent>(&ev.body) {
        Ok(e) => e.at,
        Err(e) => {
            return Ok(Some(Break::event(
                events,
                BreakKind::EventUnreadable,
                format!(
                    "audit event {events} is not a readable audit event ({:?} error at column \
                     {})",
                    e.classify(),
                    e.column()
                ),
            )))
        }
    };
    let later: Vec<&str> = records
        .iter()
        .filter(|(_, at)| *at > last_at + RECORD_SLACK)
        .map(|(table, _)| noun(*table))
        .collect();
    if later.is_empty() {
        return Ok(None);
    }
    Ok(Some(Break::trail(
        BreakKind::RecordsWithoutEvents,
        format!(
            "{} records were changed after the trail's last audit event (seq {events}): the \
             events recording those changes were removed from the end of the trail",
            later.join(" and ")
        ),
    )))
}

/// The checking state, moved to a blocking thread for each page so the store reads the next
/// page while this one is hashed.
struct Walker {
    chain: Verifier,
    sealing: Sealing,
}

impl Walker {
    fn page(&mut self, page: &AuditPage) -> Option<Break> {
        let fault = page.fault.as_ref().map(|f| (f.seq(), f));
        for ev in &page.events {
            if let Err(b) = self.chain.push(ev) {
                return Some(Break::from_chain(&b));
            }
            // After the chain: an edited body is reported as such, not as its columns.
            if let Some((_, f)) = fault.filter(|(seq, _)| *seq == ev.seq) {
                return Some(Break::from_row(f));
            }
            if let Err(b) = self.sealing.push(ev) {
                return Some(b);
            }
        }
        // A row that could not be read as an event ends its page: it is the break.
        match (fault, page.events.last()) {
            (Some((seq, f)), last) if last.is_none_or(|l| seq > l.seq) => Some(Break::from_row(f)),
            _ => None,
        }
    }
}

/// The walk itself: `Ok(Some(break))` at the first break. Reading page k + 1 overlaps hashing
/// page k ([`rx_platform::pages::walk`]).
async fn walk(
    store: &dyn RecordStore,
    walker: Box<Walker>,
) -> Result<(Box<Walker>, Option<Break>)> {
    fn next_from(page: &AuditPage) -> Option<u64> {
        page.events.last().map(|last| last.seq.saturating_add(1))
    }
    fn check(w: &mut Box<Walker>, page: &AuditPage) -> Option<Break> {
        w.page(page)
    }
    let read = |from| async move {
        store
            .audit_range_checked(from, PAGE)
            .await
            .map_err(AuditError::from)
    };
    let (mut w, found) = rx_platform::pages::walk(walker, 1, read, next_from, check).await?;
    if found.is_some() {
        return Ok((w, found));
    }
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
                 were removed (from the end of the trail, or from inside it with the later ones \
                 renumbered and their chain recomputed)",
                cp.number, cp.last_seq
            ),
        ))
    }
}
