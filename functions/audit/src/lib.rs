//! rx-fn-audit: the verification side of the audit trail, and the auditor's reads
//! (`rxflow audit …`, `GET /audit/...`).
//!
//! * [`verify_trail`]: hash chain, searchable columns and signed checkpoints, in one
//!   constant-memory walk; records the trail does not account for.
//! * [`Anchor`] / [`verify_trail_anchored`]: the latest checkpoint, kept outside the data
//!   directory, and the check that the trail still holds it.
//! * [`prove`] / [`verify_proof`]: one event's inclusion proof, checkable with the public key
//!   alone.
//! * [`search`], [`disclosures`] (accounting of disclosures, 45 CFR 164.528),
//!   [`export_fhir_ndjson`], [`break_glass_sessions`].
//!
//! The byte formats are in `docs/audit-trail.md`.

mod anchor;
mod error;
mod prove;
mod reads;
mod verify;

pub use anchor::{latest_anchor, Anchor, ANCHOR_VERSION};
pub use error::{AuditError, Result};
pub use prove::{prove, verify_proof, InclusionProof};
pub use reads::{
    break_glass_sessions, disclosures, export_fhir_ndjson, search, BreakGlassSession, Disclosure,
    Entry, Touch,
};
pub use verify::{verify_trail, verify_trail_anchored, Break, BreakKind, TrailReport, PAGE};

/// Reads a trusted public key from a file: the `keys/audit-signing.pub` the signer wrote (or a
/// copy kept apart from the data), a PEM SubjectPublicKeyInfo, or 64 hex digits.
pub fn read_public_key(path: &std::path::Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuditError::PublicKey(format!("cannot read {}: {e}", path.display())))?;
    rx_guard::merkle::parse_public_key(&text)
        .map_err(|e| AuditError::PublicKey(format!("{}: {e}", path.display())))
}
