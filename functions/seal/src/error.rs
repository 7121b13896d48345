//! The one error type of rx-fn-seal.

use rx_guard::GuardError;
use rx_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The store could not be read or refused the checkpoint (a concurrent seal stored the same
    /// number first: seal again).
    #[error("sealing failed at the store: {0}; check the data directory and seal again")]
    Store(#[from] StoreError),
    /// The signer (local key file, KMS) failed.
    #[error(
        "signing the checkpoint failed: {0}; check the signing key is reachable and seal again"
    )]
    Signer(#[source] GuardError),
    /// The events to seal do not chain: sealing them would vouch for a broken trail.
    #[error(
        "refusing to seal: {0}; run `rxflow audit verify` and investigate the trail before sealing"
    )]
    ChainBroken(String),
    /// The runtime shut down while sealing.
    #[error("sealing was interrupted (the process is shutting down); seal again")]
    Interrupted,
    /// The last checkpoint cannot be read, so the next one cannot chain to it.
    #[error(
        "refusing to seal: checkpoint {number} is not readable ({reason}); run `rxflow audit \
         verify` and investigate the checkpoints before sealing"
    )]
    UnreadableCheckpoint { number: u64, reason: String },
}

pub type Result<T, E = SealError> = std::result::Result<T, E>;

impl From<rx_platform::pages::Interrupted> for SealError {
    fn from(_: rx_platform::pages::Interrupted) -> Self {
        SealError::Interrupted
    }
}
