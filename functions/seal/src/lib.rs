//! rx-fn-seal: the scheduled step that seals new audit events into a signed Merkle checkpoint.
//!
//! Each run takes the events after the last checkpoint (paging through the trail, memory
//! O(page + log n)), checks they chain from the last checkpoint's `chain_head`, computes the
//! RFC 6962 root over their chain hashes, signs the checkpoint and stores it, chained to the
//! previous one by the hash of its stored bytes. The formats are in `docs/audit-trail.md`.

mod error;

pub use error::{Result, SealError};

use std::path::Path;

use chrono::{SubsecRound, Utc};
use rx_guard::audit::chain::{self, GENESIS};
use rx_guard::audit::ChainedEvent;
use rx_guard::merkle::{
    checkpoint_hash, Checkpoint, CheckpointSigner, Hash, LocalSigner, TreeBuilder,
    CHECKPOINT_VERSION,
};
use rx_platform::services::DataDir;
use rx_store::{CheckpointRow, RecordStore};

/// Events read per page.
pub const PAGE: usize = 8192;

/// The embedded signer: the Ed25519 key `keys/audit-signing.pk8` in the data directory, created
/// (mode 0600) on first use, with `keys/audit-signing.pub` beside it for outside verifiers.
pub fn local_signer(data_dir: &Path) -> Result<LocalSigner> {
    LocalSigner::open_or_create(&DataDir(data_dir).audit_signing_key()).map_err(SealError::Signer)
}

/// Seals the events appended since the last checkpoint into the next checkpoint and stores it.
/// Returns `None` when there is nothing new to seal.
pub async fn seal(
    store: &dyn RecordStore,
    signer: &dyn CheckpointSigner,
) -> Result<Option<Checkpoint>> {
    seal_from(store, store, signer).await
}

/// [`seal`], reading the events through `events` and the checkpoints through (and storing the
/// new one with) `store`. A server whose store groups change sets into commits passes a second
/// connection for `events`, which sees committed events only: a checkpoint never covers an
/// event whose commit could still fail.
pub async fn seal_from(
    events: &dyn RecordStore,
    store: &dyn RecordStore,
    signer: &dyn CheckpointSigner,
) -> Result<Option<Checkpoint>> {
    let rows = store.checkpoints().await?;
    let (number, first_seq, prev_checkpoint_hash, head) = match rows.last() {
        None => (1, 1, [0u8; 32], GENESIS),
        Some(row) => {
            let last =
                Checkpoint::from_json(&row.body).map_err(|e| SealError::UnreadableCheckpoint {
                    number: row.number,
                    reason: e.to_string(),
                })?;
            if (last.number, last.first_seq, last.last_seq)
                != (row.number, row.first_seq, row.last_seq)
            {
                return Err(SealError::UnreadableCheckpoint {
                    number: row.number,
                    reason: "its body disagrees with its row".into(),
                });
            }
            (
                last.number + 1,
                last.last_seq + 1,
                checkpoint_hash(&row.body),
                last.chain_head,
            )
        }
    };

    let run = Run {
        tree: TreeBuilder::new(),
        head,
        next: first_seq,
    };
    let Run { tree, head, next } = read_and_hash(events, run).await?;
    if tree.size() == 0 {
        let len = events.audit_len().await?;
        if len + 1 < first_seq {
            return Err(SealError::ChainBroken(format!(
                "checkpoint {} covers events up to {} but the trail ends at {len}: events were \
                 removed from the end",
                number - 1,
                first_seq - 1
            )));
        }
        return Ok(None);
    }

    let mut cp = Checkpoint {
        version: CHECKPOINT_VERSION,
        number,
        first_seq,
        last_seq: next - 1,
        tree_size: tree.size(),
        root: tree.root(),
        prev_checkpoint_hash,
        chain_head: head,
        signed_at: Utc::now().trunc_subsecs(3),
        key_id: signer.key_id().to_string(),
        algorithm: signer.algorithm().to_string(),
        signature: Vec::new(),
    };
    cp.signature = signer
        .sign(&cp.signing_input())
        .await
        .map_err(SealError::Signer)?;
    store
        .put_checkpoint(&CheckpointRow {
            number: cp.number,
            first_seq: cp.first_seq,
            last_seq: cp.last_seq,
            body: cp.to_json(),
        })
        .await?;
    tracing::info!(
        checkpoint = cp.number,
        first_seq = cp.first_seq,
        last_seq = cp.last_seq,
        key_id = %cp.key_id,
        "audit checkpoint sealed"
    );
    Ok(Some(cp))
}

/// The tree being built, the chain head and the next expected seq.
struct Run {
    tree: TreeBuilder,
    head: Hash,
    next: u64,
}

impl Run {
    /// Checks a page chains on from the events before it and adds its leaves.
    fn page(&mut self, page: &[ChainedEvent]) -> Result<()> {
        for ev in page {
            if ev.seq != self.next {
                return Err(SealError::ChainBroken(format!(
                    "audit sequence jumps from {} to {}",
                    self.next - 1,
                    ev.seq
                )));
            }
            if ev.prev_hash != self.head || chain::link(&ev.prev_hash, &ev.body) != ev.hash {
                return Err(SealError::ChainBroken(format!(
                    "audit event {} does not chain from the event before it",
                    ev.seq
                )));
            }
            self.tree.push_event(&ev.hash);
            self.head = ev.hash;
            self.next += 1;
        }
        Ok(())
    }
}

/// Pages through the events from `run.next` to the end, reading a page while the one before it
/// is hashed ([`rx_platform::pages::walk`]).
async fn read_and_hash(store: &dyn RecordStore, run: Run) -> Result<Run> {
    #[allow(clippy::ptr_arg)] // the page type is `Vec`: a fn over `&P`
    fn next_from(page: &Vec<ChainedEvent>) -> Option<u64> {
        page.last().map(|last| last.seq.saturating_add(1))
    }
    #[allow(clippy::ptr_arg)] // the page type is `Vec`: a fn over `&P`
    fn check(run: &mut Run, page: &Vec<ChainedEvent>) -> Option<SealError> {
        run.page(page).err()
    }
    let from = run.next;
    let read = |from| async move { store.audit_range(from, PAGE).await.map_err(SealError::from) };
    match rx_platform::pages::walk(run, from, read, next_from, check).await? {
        (_, Some(e)) => Err(e),
        (run, None) => Ok(run),
    }
}
