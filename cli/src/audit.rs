//! `rxflow audit …`: the compliance officer's commands over the embedded trail.

use rx_fn_audit::{verify_trail, AuditError, TrailReport};
use rx_platform::services::Embedded;

/// Check the whole trail: every event's chain link and every signed checkpoint.
pub async fn verify(emb: &Embedded) -> Result<TrailReport, AuditError> {
    verify_trail(emb.store.as_ref(), None).await
}
