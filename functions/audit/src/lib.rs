//! rx-fn-audit: the verification side of the audit trail, and the auditor's reads.
//!
//! * [`verify_trail`]: hash chain and signed checkpoints, in one constant-memory walk.

mod error;
mod verify;

pub use error::{AuditError, Result};
pub use verify::{verify_trail, Break, BreakKind, TrailReport, PAGE};
