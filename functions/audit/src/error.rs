//! The one error type of rx-fn-audit. Messages name events by seq or id and checkpoints by
//! number, never PHI, and say what to do next.

use rx_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store could not be read.
    #[error("reading the audit trail failed: {0}; check the data directory and retry")]
    Store(#[from] StoreError),
    /// A stored event body is not an audit event this version reads.
    #[error(
        "audit event {seq} is not a readable audit event ({reason}); run `rxflow audit verify` \
         to find where the trail was altered"
    )]
    UnreadableEvent { seq: u64, reason: String },
    /// A stored checkpoint body is not a checkpoint this version reads.
    #[error(
        "checkpoint {number} is not a readable checkpoint ({reason}); run `rxflow audit verify` \
         to check the checkpoints"
    )]
    UnreadableCheckpoint { number: u64, reason: String },
    /// No event has this id.
    #[error("no audit event has the id {0}; check the id (find it with `rxflow audit events`)")]
    EventNotFound(String),
    /// The event exists but no checkpoint covers it yet.
    #[error(
        "audit event {event_id} (seq {seq}) is not sealed in a checkpoint yet; run \
         `rxflow audit seal` and ask for the proof again"
    )]
    NotSealed { event_id: String, seq: u64 },
    /// The trail does not match its checkpoints, so no proof can be built from it.
    #[error("cannot build a proof: {0}")]
    Inconsistent(String),
    /// An inclusion proof does not verify.
    #[error("the inclusion proof does not verify: {0}")]
    ProofInvalid(String),
    /// The trusted public key could not be read.
    #[error("the trusted public key is not usable: {0}")]
    PublicKey(String),
    /// An anchor file is not an anchor this version reads.
    #[error(
        "the anchor file is not an rxflow audit anchor ({0}); give the file `rxflow audit anchor` \
         printed"
    )]
    AnchorUnreadable(String),
    /// There is no checkpoint to anchor.
    #[error(
        "the trail has no checkpoint to anchor yet: it is empty; anchor it after some activity"
    )]
    NothingToAnchor,
    /// The runtime shut down while the trail was being checked.
    #[error("the check was interrupted (the process is shutting down); run it again")]
    Interrupted,
    /// Writing an export failed.
    #[error("writing the export failed: {0}; check the destination has space and is writable")]
    Write(#[from] std::io::Error),
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

impl From<rx_platform::pages::Interrupted> for AuditError {
    fn from(_: rx_platform::pages::Interrupted) -> Self {
        AuditError::Interrupted
    }
}
