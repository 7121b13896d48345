//! The store port. Adapters: [`crate::sqlite::SqliteStore`] (embedded), DynamoDB (AWS issue).
//!
//! A [`Row`] keeps the workflow columns (tenant, status, version, timestamps) in clear and the
//! rest of the record as one sealed blob. Blind indexes (keyed hashes) let a row be found by a
//! patient or a source identifier without that identifier being stored.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rx_guard::audit::{AuditEvent, AuditQuery, AuditSink, ChainedEvent};
use serde::{Deserialize, Serialize};

/// The kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    Prescriptions,
    Patients,
    Prescribers,
    /// Inputs that could not be processed, sealed, kept for follow-up (nothing is lost).
    Inputs,
    /// Break-glass sessions.
    BreakGlass,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Prescriptions,
        Table::Patients,
        Table::Prescribers,
        Table::Inputs,
        Table::BreakGlass,
    ];

    /// The table name, also bound into each sealed value's associated data.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Prescriptions => "prescriptions",
            Table::Patients => "patients",
            Table::Prescribers => "prescribers",
            Table::Inputs => "inputs",
            Table::BreakGlass => "break_glass",
        }
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub table: Table,
    /// rxflow's own id (UUIDv7), never a source identifier.
    pub id: String,
    pub tenant: String,
    /// Workflow status (a `rx_domain::Status` name for prescriptions; free for other tables).
    pub status: String,
    /// Starts at 1; each update must name the version it read.
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Blind index of the owning patient (prescriptions, patients) or of the NPI (prescribers).
    /// Not unique.
    pub index: Option<Vec<u8>>,
    /// Blind index of the source identifier: unique per (table, tenant). Used for idempotent
    /// intake and for lookups by source id.
    pub key: Option<Vec<u8>>,
    /// The sealed body (rx-guard envelope format).
    pub sealed: Vec<u8>,
}

/// A write in a change set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Fails with [`StoreError::Conflict`] if the id or the key already exists.
    Insert(Row),
    /// Fails with [`StoreError::Conflict`] unless the stored version equals `expected_version`;
    /// `row.version` must be `expected_version + 1`.
    Update { row: Row, expected_version: u64 },
}

/// One recorded change of a prescription's status. PHI-free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRow {
    pub rx_id: String,
    pub tenant: String,
    /// The version the transition produced.
    pub version: u64,
    pub from: Option<String>,
    pub to: String,
    pub at: DateTime<Utc>,
    /// Who caused it (JWT subject or `system:<function>`).
    pub actor: String,
    pub function: String,
}

/// Everything one handler invocation writes, committed atomically: either all of it (rows,
/// transitions and their audit events) is stored, or none of it.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub writes: Vec<Write>,
    pub transitions: Vec<TransitionRow>,
    pub audit: Vec<AuditEvent>,
}

impl Changes {
    /// One write and its audit event.
    pub fn single(write: Write, event: AuditEvent) -> Self {
        Changes {
            writes: vec![write],
            transitions: Vec::new(),
            audit: vec![event],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.transitions.is_empty() && self.audit.is_empty()
    }
}

/// A stored, signed audit checkpoint (the body is rx-guard's checkpoint JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// 1-based, consecutive.
    pub number: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub body: Vec<u8>,
}

/// Audit events read for verification ([`RecordStore::audit_range_checked`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditPage {
    pub events: Vec<ChainedEvent>,
    /// The first event of the page whose searchable columns do not hold what its hashed body
    /// says.
    pub fault: Option<RowFault>,
}

/// How a stored audit row's searchable columns (the ones [`RecordStore::audit_search`] filters
/// on) fail to match its hashed body. Names the column, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowFault {
    /// Column `column` of event `seq` disagrees with the event's body.
    Mismatch { seq: u64, column: &'static str },
    /// The body of event `seq` is not JSON this version reads, so its columns cannot be checked.
    Unreadable { seq: u64, reason: String },
}

impl RowFault {
    pub fn seq(&self) -> u64 {
        match self {
            RowFault::Mismatch { seq, .. } | RowFault::Unreadable { seq, .. } => *seq,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: the record changed since it was read, or already exists.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store cannot be reached or refused the operation: fail closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is not what this version expects.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Persistence for records, transitions, the audit trail and checkpoints.
#[async_trait]
pub trait RecordStore: AuditSink + Send + Sync {
    async fn get(&self, table: Table, tenant: &str, id: &str) -> StoreResult<Option<Row>>;
    async fn get_by_key(&self, table: Table, tenant: &str, key: &[u8]) -> StoreResult<Option<Row>>;
    /// All rows of `table` in `tenant` whose blind index equals `index`, oldest first.
    async fn find_by_index(
        &self,
        table: Table,
        tenant: &str,
        index: &[u8],
    ) -> StoreResult<Vec<Row>>;
    /// Rows of `table` in `tenant` (optionally only those in `status`), ordered by id, after the
    /// id `after` (for paging), at most `limit`.
    async fn list(
        &self,
        table: Table,
        tenant: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Row>>;
    /// Count rows per status in `table` across all tenants.
    async fn count_by_status(&self, table: Table) -> StoreResult<Vec<(String, u64)>>;
    /// The tenants with at least one row in `table`, in order (what holds orders of a
    /// deployment serving several pharmacies from one store).
    async fn tenants(&self, table: Table) -> StoreResult<Vec<String>>;
    /// The latest `updated_at` of any row in `table`, across tenants; `None` when it is empty.
    async fn last_updated(&self, table: Table) -> StoreResult<Option<DateTime<Utc>>>;
    /// Atomically apply a change set (see [`Changes`]).
    async fn commit(&self, changes: Changes) -> StoreResult<()>;
    /// Makes every change set committed so far durable. A store whose commits are durable when
    /// they return (DynamoDB; SQLite outside group commit) has nothing to do.
    async fn durable(&self) -> StoreResult<()> {
        Ok(())
    }
    /// How many group commits have failed so far: a caller that saw this number change while
    /// it worked cannot tell whether its change sets survived, and must fail.
    fn lost_commits(&self) -> u64 {
        0
    }
    /// The transitions of one prescription, in order.
    async fn transitions(&self, tenant: &str, rx_id: &str) -> StoreResult<Vec<TransitionRow>>;

    /// Number of audit events in the trail (the last seq).
    async fn audit_len(&self) -> StoreResult<u64>;
    /// The lowest sequence number stored, if any row is: a trail starts at 1, so anything lower
    /// is a row put there outside the chain.
    async fn audit_lowest_seq(&self) -> StoreResult<Option<i64>>;
    /// Audit events with `seq >= from_seq`, in order, at most `limit`.
    async fn audit_range(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<ChainedEvent>>;
    /// [`RecordStore::audit_range`] for verification: also checks that each event's searchable
    /// columns hold the values of its hashed body (a search by a column that was edited would
    /// silently miss the event), and reports the first that does not.
    async fn audit_range_checked(&self, from_seq: u64, limit: usize) -> StoreResult<AuditPage>;
    /// Audit events matching `query`, in order.
    async fn audit_search(&self, query: &AuditQuery) -> StoreResult<Vec<ChainedEvent>>;

    async fn put_checkpoint(&self, cp: &CheckpointRow) -> StoreResult<()>;
    async fn checkpoints(&self) -> StoreResult<Vec<CheckpointRow>>;
}
