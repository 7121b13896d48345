//! rx-guard: the one security boundary every function links.
//!
//! * [`keys`]: the [`keys::KeyProvider`] port (data keys for envelope encryption) and the local
//!   key-encryption-key provider (a 0600 file).
//! * [`envelope`]: AES-256-GCM sealing of records with per-record associated data, data-key cache.
//! * [`blind`]: keyed HMAC blind index, to find records by identifier without storing it.
//! * [`audit`]: the one audit event type, the [`audit::AuditSink`] port, the hash chain.
//! * [`merkle`]: Merkle trees, signed checkpoints and inclusion proofs over the audit trail.
//! * [`access`]: principals from verified JWTs, the role × action policy, break-glass.

pub mod access;
pub mod audit;
pub mod blind;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod merkle;

pub use error::{GuardError, Result};
