//! rx-fn-audit: the verification side of the audit trail, and the auditor's reads
//! (`rxflow audit …`, `GET /audit/...`).
//!
//! * [`verify_trail`]: hash chain and signed checkpoints, in one constant-memory walk.
//! * [`prove`] / [`verify_proof`]: one event's inclusion proof, checkable with the public key
//!   alone.
//! * [`search`], [`disclosures`] (accounting of disclosures, 45 CFR 164.528),
//!   [`export_fhir_ndjson`], [`break_glass_sessions`].
//!
//! The byte formats are in `docs/audit-trail.md`.

mod error;
mod prove;
mod reads;
mod verify;

pub use error::{AuditError, Result};
pub use prove::{prove, verify_proof, InclusionProof};
pub use reads::{
    break_glass_sessions, disclosures, export_fhir_ndjson, search, BreakGlassSession, Disclosure,
    Entry, Touch,
};
pub use verify::{verify_trail, Break, BreakKind, TrailReport, PAGE};
