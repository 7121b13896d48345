//! rx-store: persistence ports and adapters.
//!
//! * [`port`]: the [`port::RecordStore`] port: rows with workflow columns in clear and a sealed
//!   body, conditional writes on the version, atomic change sets (rows + transitions + audit).
//! * [`sqlite`]: the embedded adapter (one SQLite file, WAL, append-only audit table).
//! * [`repo`]: typed, sealed, audited access to prescriptions, patients and prescribers: the only
//!   way a function touches PHI.

pub mod port;
pub mod repo;
pub mod sqlite;

pub use port::*;
