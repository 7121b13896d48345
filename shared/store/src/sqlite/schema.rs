//! The SQLite schema, its version in `PRAGMA user_version`, and the SQL text of every statement
//! the store runs (built once at open, so the hot path only looks statements up in the cache).

use rusqlite::Connection;

use crate::port::Table;

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// The message of the append-only triggers (also matched when mapping errors).
pub(crate) const APPEND_ONLY: &str = "audit trail is append-only";

/// Brings the schema from `from` up to [`SCHEMA_VERSION`], one step at a time, inside the caller's
/// transaction. A future version adds an arm `n => migrate_n_to_n_plus_1(conn)`.
pub(crate) fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    let mut version = from;
    while version < SCHEMA_VERSION {
        match version {
            0 => create_v1(conn)?,
            1 => create_v2(conn)?,
            _ => break,
        }
        version += 1;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// v2: facts about the data directory the store belongs to (key check values), so a key file
/// replaced under a store is refused instead of used.
fn create_v2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);")
}

/// The audit trail's search indexes (patient, user, action, resource, time). They are derived
/// from the table's columns, so a bulk run may set them aside while it appends and build them
/// again in one sorted pass at its end ([`crate::sqlite::SqliteStore::suspend_audit_search`]);
/// every open builds any that are missing (a bulk run that was killed).
const AUDIT_SEARCH_INDEXES: [(&str, &str); 5] = [
    (
        "audit_patient",
        "audit(patient, seq) WHERE patient IS NOT NULL",
    ),
    ("audit_subject", "audit(subject, seq)"),
    ("audit_action", "audit(action, seq)"),
    ("audit_resource", "audit(resource_id, seq)"),
    ("audit_at", "audit(at)"),
];

/// Builds the audit search indexes that are missing.
pub(crate) fn create_audit_search(conn: &Connection) -> rusqlite::Result<()> {
    for (name, on) in AUDIT_SEARCH_INDEXES {
        conn.execute_batch(&format!("CREATE INDEX IF NOT EXISTS {name} ON {on};"))?;
    }
    Ok(())
}

/// Drops the audit search indexes (see [`AUDIT_SEARCH_INDEXES`]).
pub(crate) fn drop_audit_search(conn: &Connection) -> rusqlite::Result<()> {
    for (name, _) in AUDIT_SEARCH_INDEXES {
        conn.execute_batch(&format!("DROP INDEX IF EXISTS {name};"))?;
    }
    Ok(())
}

/// Whether every audit search index is there.
pub(crate) fn has_audit_search(conn: &Connection) -> rusqlite::Result<bool> {
    let mut q = conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?1")?;
    for (name, _) in AUDIT_SEARCH_INDEXES {
        if !q.exists([name])? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn create_v1(conn: &Connection) -> rusqlite::Result<()> {
    let mut ddl = String::new();
    for table in Table::ALL {
        let t = table.as_str();
        ddl.push_str(&format!(
            "CREATE TABLE {t} (
                id TEXT PRIMARY KEY NOT NULL,
                tenant TEXT NOT NULL,
                status TEXT NOT NULL,
                version INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                idx BLOB,
                \"key\" BLOB,
                sealed BLOB NOT NULL
             );
             CREATE UNIQUE INDEX {t}_tenant_key ON {t}(tenant, \"key\") WHERE \"key\" IS NOT NULL;
             CREATE INDEX {t}_tenant_idx ON {t}(tenant, idx) WHERE idx IS NOT NULL;
             CREATE INDEX {t}_tenant_status ON {t}(tenant, status, id);
            "
        ));
    }
    ddl.push_str(
        "CREATE TABLE transitions (
            seq INTEGER PRIMARY KEY,
            rx_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            version INTEGER NOT NULL,
            from_status TEXT,
            to_status TEXT NOT NULL,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            function TEXT NOT NULL
         );
         CREATE INDEX transitions_rx ON transitions(tenant, rx_id, seq);

         CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            at TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            patient TEXT,
            break_glass INTEGER NOT NULL,
            body BLOB NOT NULL,
            prev BLOB NOT NULL,
            hash BLOB NOT NULL
         );
         CREATE INDEX audit_break_glass ON audit(seq) WHERE break_glass = 1;

         CREATE TABLE checkpoints (
            number INTEGER PRIMARY KEY,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            body BLOB NOT NULL
         );
        ",
    );
    for t in ["audit", "transitions", "checkpoints"] {
        for op in ["UPDATE", "DELETE"] {
            let lower = op.to_ascii_lowercase();
            ddl.push_str(&format!(
                "CREATE TRIGGER {t}_no_{lower} BEFORE {op} ON {t}
                 BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;\n"
            ));
        }
    }
    conn.execute_batch(&ddl)?;
    create_audit_search(conn)
}

/// The per-table statements, indexed by [`table_slot`].
pub(crate) struct TableSql {
    pub insert: String,
    pub update: String,
    /// The update when the blind index and source key stay as they are (the common case): it
    /// leaves their two indexes untouched, where naming them in SET rewrites both entries.
    pub update_same_keys: String,
    pub get: String,
    pub get_by_key: String,
    pub find_by_index: String,
    pub list: String,
    pub list_after: String,
    pub list_status: String,
    pub list_status_after: String,
    pub count_by_status: String,
    pub tenants: String,
}

const COLUMNS: &str = "id, tenant, status, version, created_at, updated_at, idx, \"key\", sealed";

impl TableSql {
    fn new(table: Table) -> Self {
        let t = table.as_str();
        let select = format!("SELECT {COLUMNS} FROM {t}");
        TableSql {
            // DO NOTHING applies to the primary key and the (tenant, key) index alike: a
            // duplicate changes no row, which commit() reports as a conflict.
            insert: format!(
                "INSERT INTO {t} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO NOTHING"
            ),
            update: format!(
                "UPDATE {t} SET status = ?3, version = ?4, updated_at = ?5, idx = ?6, \"key\" = ?7,
                 sealed = ?8 WHERE id = ?1 AND tenant = ?2 AND version = ?9"
            ),
            update_same_keys: format!(
                "UPDATE {t} SET status = ?3, version = ?4, updated_at = ?5, sealed = ?8
                 WHERE id = ?1 AND tenant = ?2 AND version = ?9 AND idx IS ?6 AND \"key\" IS ?7"
            ),
            get: format!("{select} WHERE id = ?1 AND tenant = ?2"),
            get_by_key: format!("{select} WHERE tenant = ?1 AND \"key\" = ?2"),
            find_by_index: format!(
                "{select} WHERE tenant = ?1 AND idx = ?2 ORDER BY created_at, id"
            ),
            list: format!("{select} WHERE tenant = ?1 ORDER BY id LIMIT ?2"),
            list_after: format!("{select} WHERE tenant = ?1 AND id > ?3 ORDER BY id LIMIT ?2"),
            list_status: format!("{select} WHERE tenant = ?1 AND status = ?3 ORDER BY id LIMIT ?2"),
            list_status_after: format!(
                "{select} WHERE tenant = ?1 AND status = ?3 AND id > ?4 ORDER BY id LIMIT ?2"
            ),
            count_by_status: format!(
                "SELECT status, COUNT(*) FROM {t} GROUP BY status ORDER BY status"
            ),
            // One index seek per tenant on (tenant, status, id), not a scan of every row.
            tenants: format!(
                "WITH RECURSIVE t(tenant) AS (
                     SELECT MIN(tenant) FROM {t}
                     UNION ALL
                     SELECT (SELECT MIN(tenant) FROM {t} WHERE tenant > t.tenant) FROM t
                     WHERE t.tenant IS NOT NULL)
                 SELECT tenant FROM t WHERE tenant IS NOT NULL"
            ),
        }
    }
}

pub(crate) fn table_slot(table: Table) -> usize {
    match table {
        Table::Prescriptions => 0,
        Table::Patients => 1,
        Table::Prescribers => 2,
        Table::Inputs => 3,
        Table::BreakGlass => 4,
    }
}

/// The statements of every table, in [`table_slot`] order.
pub(crate) fn all_table_sql() -> [TableSql; 5] {
    [
        Table::Prescriptions,
        Table::Patients,
        Table::Prescribers,
        Table::Inputs,
        Table::BreakGlass,
    ]
    .map(TableSql::new)
}

pub(crate) const INSERT_TRANSITION: &str =
    "INSERT INTO transitions (rx_id, tenant, version, from_status, to_status, at, actor, function)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
pub(crate) const SELECT_TRANSITIONS: &str =
    "SELECT rx_id, tenant, version, from_status, to_status, at, actor, function
     FROM transitions WHERE tenant = ?1 AND rx_id = ?2 ORDER BY seq";

pub(crate) const AUDIT_HEAD: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
pub(crate) const INSERT_AUDIT: &str =
    "INSERT INTO audit (seq, event_id, at, subject, action, resource_id, patient, break_glass,
     body, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
pub(crate) const AUDIT_LEN: &str = "SELECT COALESCE(MAX(seq), 0) FROM audit";
pub(crate) const AUDIT_LOWEST_SEQ: &str = "SELECT MIN(seq) FROM audit";
pub(crate) const AUDIT_RANGE: &str =
    "SELECT seq, body, prev, hash FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2";

pub(crate) const INSERT_CHECKPOINT: &str =
    "INSERT INTO checkpoints (number, first_seq, last_seq, body) VALUES (?1, ?2, ?3, ?4)";
pub(crate) const LAST_CHECKPOINT: &str = "SELECT COALESCE(MAX(number), 0) FROM checkpoints";
pub(crate) const SELECT_CHECKPOINTS: &str =
    "SELECT number, first_seq, last_seq, body FROM checkpoints ORDER BY number";
