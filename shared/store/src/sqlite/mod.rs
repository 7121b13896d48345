//! The embedded adapter: one SQLite file (WAL) holding every table, the transitions, the
//! hash-chained audit trail and the checkpoints.
//!
//! One [`rusqlite::Connection`] sits behind a [`std::sync::Mutex`]; every method takes the lock,
//! does its work synchronously and lets go before returning, so no lock is held across an
//! `.await`. A change set is one transaction, or, inside a batch ([`SqliteStore::begin_batch`]),
//! one savepoint of the batch's long transaction: a failed change set leaves nothing behind and
//! the rest of the batch stands. Inside a batch, writes become durable at
//! [`SqliteStore::end_batch`]; a single audit event is one INSERT, atomic by itself, with no
//! savepoint of its own. A server runs in group commit ([`SqliteStore::group_commit`]): change
//! sets join an open batch that [`SqliteStore::sync`] commits, and every answer waits for it
//! (`rx_platform::http::durable_before_answer`), so concurrent requests and the pipeline share
//! commits instead of each writing the same index pages again.
//!
//! The audit, transitions and checkpoints tables are append-only: triggers refuse UPDATE and
//! DELETE. Each audit event is chained to the one before it, read from the table inside the same
//! transaction; inside a batch (which holds the write lock throughout) the head the last
//! successful append left is kept, and dropped whenever a change set rolls back, so a
//! rolled-back change set cannot leave a gap.

mod checkpoint;
mod columns;
mod error;
mod schema;
mod thread;

pub use checkpoint::{Checkpointer, Round};
pub use thread::{Spin, StoreThread};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::{Type, Value};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use rx_guard::audit::{chain, AuditEvent, AuditQuery, AuditSink, ChainedEvent};
use rx_guard::GuardError;

use crate::port::{
    Changes, CheckpointRow, RecordStore, Row, RowFault, StoreError, StoreResult, Table,
    TransitionRow, Write,
};
use error::map;
use schema::{table_slot, TableSql};

/// How long a statement waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Enough for every per-table statement, the fixed ones and the audit search variants.
const STATEMENT_CACHE: usize = 256;

/// The SQLite record store and audit sink.
pub struct SqliteStore {
    path: PathBuf,
    /// Device and inode of the file when it was opened: a store file removed or replaced under
    /// an open store (SQLite would carry on writing to the unlinked file) is caught at commit.
    identity: Option<(u64, u64)>,
    inner: Mutex<Inner>,
    /// Who has the connection next: first come, first served (see [`Turns`]).
    turns: Turns,
    /// Batches whose COMMIT failed (their change sets are lost).
    lost_commits: AtomicU64,
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).ok().map(|_| (0, 0))
    }
}

struct Inner {
    conn: Connection,
    tables: [TableSql; 5],
    /// A batch transaction is open.
    in_batch: bool,
    /// A change set (transaction or savepoint) is open: only true while a method runs, so it is
    /// seen true only after a panic poisoned the lock.
    in_unit: bool,
    /// The audit chain's head as the open batch's last successful statement left it. Only kept
    /// while a batch holds the write lock (no other connection can append meanwhile), dropped
    /// whenever a change set rolls back; outside a batch the head is read from the table.
    head: Option<Head>,
    /// Group commit ([`SqliteStore::group_commit`]): a change set outside a batch opens one.
    group: bool,
    /// Why the open batch was lost, when SQLite rolled its whole transaction back after a
    /// failed statement (it does on a full disk, an I/O error, running out of memory). Until
    /// the batch is ended, which reports it, every change set is refused: one committed on its
    /// own would survive while the batch's earlier ones are gone.
    batch_lost: Option<String>,
}

/// First come, first served access to the one connection. A plain mutex lets the thread that
/// just let go take it again before a woken waiter runs, so a server's pipeline thread, going
/// from one short change set to the next, could keep an intake request waiting through a whole
/// backlog; with turns a caller waits at most for those who came before it.
///
/// A waiter sleeps on the condition variable of its ticket's slot, so a turn passing on wakes
/// the next ticket's holder only (with one condition variable for all, every hand-over woke
/// every waiter: under load that was a third more context switches). Two waiters share a slot
/// only when more than [`SLOTS`] wait; one woken before its turn sleeps again.
struct Turns {
    /// (next ticket to hand out, ticket being served)
    queue: Mutex<(u64, u64)>,
    moved: [Condvar; SLOTS],
}

/// Condition variables a [`Turns`] spreads its waiters over.
const SLOTS: usize = 64;

impl Default for Turns {
    fn default() -> Self {
        Turns {
            queue: Mutex::new((0, 0)),
            moved: std::array::from_fn(|_| Condvar::new()),
        }
    }
}

impl Turns {
    fn slot(&self, ticket: u64) -> &Condvar {
        &self.moved[(ticket % SLOTS as u64) as usize]
    }

    fn take(&self) -> Turn<'_> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mine = q.0;
        q.0 += 1;
        while q.1 != mine {
            q = self.slot(mine).wait(q).unwrap_or_else(|p| p.into_inner());
        }
        Turn {
            turns: self,
            ticket: mine,
        }
    }
}

/// A caller's turn; the next caller's begins when it is dropped (also when unwinding).
struct Turn<'a> {
    turns: &'a Turns,
    #[cfg_attr(not(test), allow(dead_code))]
    ticket: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut q = self.turns.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.1 += 1;
        // Someone holds a later ticket: wake the next one's slot (none waiting: no wake-up).
        let next = (q.0 > q.1).then_some(q.1);
        drop(q);
        if let Some(next) = next {
            self.turns.slot(next).notify_all();
        }
    }
}

/// The connection, held in turn. The guard is dropped before the turn passes on.
struct Held<'a> {
    guard: MutexGuard<'a, Inner>,
    _turn: Turn<'a>,
}

impl std::ops::Deref for Held<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

/// The last audit event's sequence number and hash.
type Head = (i64, [u8; 32]);

impl SqliteStore {
    /// Opens the store at `path`, creating the file (mode 0600) and the schema on first use.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|_| {
                StoreError::Unavailable(format!(
                    "cannot create the data directory {}; check its parent exists and is writable",
                    dir.display()
                ))
            })?;
        }
        create_private_file(path)?;
        let what = "opening the store";
        let conn = Connection::open(path).map_err(|e| map(what, e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| map(what, e))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| map(what, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "{what}: the file system refused write-ahead logging (journal mode {mode}); put \
                 the data directory on a local disk"
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| map(what, e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| map(what, e))?;
        conn.pragma_update(None, "cache_size", -16_384)
            .map_err(|e| map(what, e))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // (Index builds here sort through temporary files: see resume_audit_search.)
        ensure_schema(&conn)?;
        // Each change set inside a batch is a savepoint; its statement journal stays in memory
        // rather than in a temporary file (most of a bulk run's time otherwise), and the page
        // cache is large enough that a batch does not spill mid-way.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| map(what, e))?;
        Ok(SqliteStore {
            identity: file_identity(path),
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                conn,
                tables: schema::all_table_sql(),
                in_batch: false,
                in_unit: false,
                head: None,
                group: false,
                batch_lost: None,
            }),
            lost_commits: AtomicU64::new(0),
            turns: Turns::default(),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails when the store file is no longer the one opened (deleted, moved, replaced): what
    /// is committed after that would be lost with the unlinked file.
    fn check_file(&self) -> StoreResult<()> {
        if file_identity(&self.path) == self.identity {
            return Ok(());
        }
        tracing::error!(store = %self.path.display(), "the store file was removed or replaced while open");
        Err(StoreError::Unavailable(format!(
            "the store file {} was removed or replaced while rxflow had it open; nothing more \
             is written: restore the file (or use a new data directory) and run again",
            self.path.display()
        )))
    }

    /// The check value stored under `name`, storing `value` if there is none yet. Returns what
    /// was stored before (so the caller can compare), `None` on first use.
    pub fn check_value(&self, name: &str, value: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        // Every open after the first finds it: read without the write lock, so that a command
        // that only reads (`rxflow audit events`, `verify`) does not queue behind the writer of
        // a busy server.
        let stored = self.read(
            |conn, _| stored_check_value(conn, name),
            "reading a key check value",
        )?;
        if stored.is_some() {
            return Ok(stored);
        }
        self.unit("recording a key check value", |conn, _, _| {
            // Another process may have recorded it since the read above.
            let found =
                stored_check_value(conn, name).map_err(|e| map("reading a key check value", e))?;
            if found.is_none() {
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES (?1, ?2)",
                    params![name, value],
                )
                .map_err(|e| map("recording a key check value", e))?;
            }
            Ok(found)
        })
    }

    /// Whether the store holds anything at all (every record's creation is in the audit trail).
    pub fn holds_records(&self) -> StoreResult<bool> {
        self.read(
            |conn, _| conn.query_row("SELECT EXISTS (SELECT 1 FROM audit)", [], |r| r.get(0)),
            "looking for records",
        )
    }

    /// For a bulk run that will at least double the trail: drops the audit search indexes, so
    /// each appended event updates the table alone. [`SqliteStore::resume_audit_search`] builds
    /// them again in one sorted pass (and any open does, if the run is stopped first). Searches
    /// in between still answer, by scanning. Returns whether they were set aside.
    pub fn suspend_audit_search(&self, events_to_come: u64) -> StoreResult<bool> {
        let what = "setting the audit search indexes aside";
        let inner = self.lock();
        let held: i64 = inner
            .conn
            .query_row(schema::AUDIT_LEN, [], |r| r.get(0))
            .map_err(|e| map(what, e))?;
        if events_to_come < u64::try_from(held).unwrap_or(u64::MAX).max(1) {
            return Ok(false);
        }
        schema::drop_audit_search(&inner.conn).map_err(|e| map(what, e))?;
        Ok(true)
    }

    /// Builds the audit search indexes that are missing (after [`SqliteStore::suspend_audit_search`]).
    pub fn resume_audit_search(&self) -> StoreResult<()> {
        let what = "building the audit search indexes";
        let inner = self.lock();
        // The sort behind each index spills to a temporary file rather than to memory: the
        // sort of a large trail would otherwise be held whole in memory.
        inner
            .conn
            .pragma_update(None, "temp_store", "FILE")
            .map_err(|e| map(what, e))?;
        let built = schema::create_audit_search(&inner.conn).map_err(|e| map(what, e));
        let back = inner
            .conn
            .pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| map(what, e));
        built.and(back)
    }

    /// Opens one long transaction: every later [`RecordStore::commit`] and
    /// [`AuditSink::append`] becomes a savepoint inside it, until [`SqliteStore::end_batch`].
    pub fn begin_batch(&self) -> StoreResult<()> {
        self.check_file()?;
        let mut inner = self.lock();
        if inner.in_batch {
            return Err(StoreError::Unavailable(
                "a batch is already open on this store; end it before beginning another".into(),
            ));
        }
        open_batch(&mut inner, "beginning a batch")
    }

    /// Commits the open batch: everything committed inside it becomes durable.
    pub fn end_batch(&self) -> StoreResult<()> {
        let mut inner = self.lock();
        if let Some(why) = inner.batch_lost.take() {
            return Err(lost_batch(&why));
        }
        if !inner.in_batch {
            return Err(StoreError::Unavailable(
                "no batch is open on this store; call begin_batch first".into(),
            ));
        }
        self.commit_batch(&mut inner)
    }

    /// Caps the database file at `pages` pages (`PRAGMA max_page_count`) on this connection:
    /// a write past it fails as on a full disk ("database or disk is full"), and SQLite rolls
    /// the open transaction back. For operators who bound the store, and for tests of that path.
    pub fn limit_pages(&self, pages: u64) -> StoreResult<()> {
        let inner = self.lock();
        inner
            .conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(|e| map("limiting the store's size", e))
    }

    /// The store's size in pages (`PRAGMA page_count`).
    pub fn page_count(&self) -> StoreResult<u64> {
        let inner = self.lock();
        inner
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| map("reading the store's size", e))
    }

    /// Group commit, for a server: while on, a change set outside a batch opens one (and
    /// becomes a savepoint of it), so many change sets share one commit and one write of the
    /// pages they touch. They are durable only after [`SqliteStore::sync`]: whoever answers a
    /// caller syncs first; a background task syncs the rest.
    pub fn group_commit(&self, on: bool) {
        self.lock().group = on;
    }

    /// Makes every change set so far durable (commits the open batch, if any). On failure the
    /// batch's change sets are lost and [`RecordStore::lost_commits`] counts it.
    pub fn sync(&self) -> StoreResult<()> {
        let mut inner = self.lock();
        if let Some(why) = inner.batch_lost.take() {
            return Err(lost_batch(&why));
        }
        if !inner.in_batch {
            return Ok(());
        }
        self.commit_batch(&mut inner)
    }

    fn commit_batch(&self, inner: &mut Inner) -> StoreResult<()> {
        inner.in_batch = false;
        inner.head = None;
        let committed = self.check_file().and_then(|()| {
            exec(&inner.conn, "COMMIT")
                .map_err(|e| map("committing a batch (its change sets are lost)", e))
        });
        if committed.is_err() {
            rollback_if_open(&inner.conn);
            self.lost_commits.fetch_add(1, Ordering::SeqCst);
        }
        committed
    }

    /// In group-commit mode, opens the batch a change set joins.
    fn join_group(&self, inner: &mut Inner, what: &str) -> StoreResult<()> {
        if let Some(why) = &inner.batch_lost {
            return Err(StoreError::Unavailable(format!(
                "{what}: the open batch was lost ({why}) and has not been ended yet; nothing \
                 more is written until it is"
            )));
        }
        if inner.group && !inner.in_batch {
            self.check_file()?;
            open_batch(inner, what)?;
        }
        Ok(())
    }

    /// Takes the lock. If a task panicked while holding it, undo the change set it left open
    /// (only that one: the batch's earlier change sets stand) and carry on.
    fn lock(&self) -> Held<'_> {
        let turn = self.turns.take();
        let guard = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                guard.head = None;
                if guard.in_unit {
                    if guard.in_batch {
                        let _ = guard
                            .conn
                            .execute_batch("ROLLBACK TO change_set; RELEASE change_set");
                    } else {
                        rollback_if_open(&guard.conn);
                    }
                    guard.in_unit = false;
                }
                self.inner.clear_poison();
                guard
            }
        };
        Held { guard, _turn: turn }
    }

    /// Runs `f` as one change set: all of its writes or none. `f` gets the connection, the
    /// table statements and the audit chain head cache (see [`Inner::head`]).
    fn unit<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Connection, &[TableSql; 5], &mut Option<Head>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.join_group(inner, what)?;
        let batch = inner.in_batch;
        if !batch {
            self.check_file()?;
        }
        let (begin, end) = if batch {
            ("SAVEPOINT change_set", "RELEASE change_set")
        } else {
            ("BEGIN IMMEDIATE", "COMMIT")
        };
        exec(&inner.conn, begin).map_err(|e| map(what, e))?;
        inner.in_unit = true;
        // The chain head is kept across change sets only inside a batch (which holds the write
        // lock throughout); a transaction of its own reads it from the table.
        let mut own_head = None;
        let head = if batch {
            &mut inner.head
        } else {
            &mut own_head
        };
        let result = f(&inner.conn, &inner.tables, head)
            .and_then(|v| exec(&inner.conn, end).map(|()| v).map_err(|e| map(what, e)));
        if let Err(e) = &result {
            inner.head = None;
            if batch {
                let _ = exec(&inner.conn, "ROLLBACK TO change_set");
                let _ = exec(&inner.conn, "RELEASE change_set");
                self.note_batch_loss(inner, e);
            } else {
                rollback_if_open(&inner.conn);
            }
        }
        inner.in_unit = false;
        result
    }

    /// After a statement inside the batch failed: if SQLite rolled the whole transaction back,
    /// the batch is gone (see [`Inner::batch_lost`]).
    fn note_batch_loss(&self, inner: &mut Inner, e: &StoreError) {
        if inner.in_batch && inner.conn.is_autocommit() {
            inner.in_batch = false;
            inner.head = None;
            inner.batch_lost = Some(e.to_string());
            self.lost_commits.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Appends audit events on their own. Inside a batch one event is one INSERT, atomic by
    /// itself, so it needs no savepoint of its own (several still get one).
    fn append_alone(&self, events: &[AuditEvent]) -> StoreResult<()> {
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            self.join_group(inner, "appending audit events")?;
            if inner.in_batch && events.len() == 1 {
                let result = append_events(&inner.conn, events, &mut inner.head);
                if let Err(e) = &result {
                    inner.head = None;
                    self.note_batch_loss(inner, e);
                }
                return result;
            }
        }
        self.unit("appending audit events", |conn, _, head| {
            append_events(conn, events, head)
        })
    }

    /// Runs a read-only query.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection, &[TableSql; 5]) -> rusqlite::Result<T>,
        what: &str,
    ) -> StoreResult<T> {
        let inner = self.lock();
        f(&inner.conn, &inner.tables).map_err(|e| map(what, e))
    }
}

impl Drop for SqliteStore {
    /// A batch still open is committed: each of its change sets is complete on its own.
    fn drop(&mut self) {
        let inner = match self.inner.get_mut() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        if inner.in_batch && !inner.in_unit && inner.conn.execute_batch("COMMIT").is_err() {
            tracing::error!(
                store = %self.path.display(),
                "the open batch could not be committed when the store was closed"
            );
        }
    }
}

/// The check value stored under `name`, if any.
fn stored_check_value(conn: &Connection, name: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(_) => Err(StoreError::Unavailable(format!(
            "cannot create the store file {}; check the data directory is writable",
            path.display()
        ))),
    }
}

#[cfg(not(unix))]
fn create_private_file(_path: &Path) -> StoreResult<()> {
    Ok(())
}

/// Creates or migrates the schema, refusing a file written by a newer version.
fn ensure_schema(conn: &Connection) -> StoreResult<()> {
    let what = "preparing the store schema";
    let version = |c: &Connection| -> StoreResult<i64> {
        c.pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| map(what, e))
    };
    let found = version(conn)?;
    if found == schema::SCHEMA_VERSION {
        // A bulk run that was stopped before it rebuilt the audit search indexes.
        if !schema::has_audit_search(conn).map_err(|e| map(what, e))? {
            tracing::info!("rebuilding the audit search indexes a stopped bulk run left out");
            schema::create_audit_search(conn).map_err(|e| map(what, e))?;
        }
        return Ok(());
    }
    if found > schema::SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the store was written by a newer rxflow (schema {found}, this build reads up to {}); \
             upgrade rxflow",
            schema::SCHEMA_VERSION
        )));
    }
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| map(what, e))?;
    // Another process may have migrated it while we waited for the lock.
    let result = version(conn).and_then(|now| {
        if now < schema::SCHEMA_VERSION {
            schema::migrate(conn, now).map_err(|e| map(what, e))?;
        }
        conn.execute_batch("COMMIT").map_err(|e| map(what, e))
    });
    if result.is_err() {
        rollback_if_open(conn);
    }
    result
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Opens the batch transaction on `inner`'s connection (the chain head is read afresh in it).
fn open_batch(inner: &mut Inner, what: &str) -> StoreResult<()> {
    exec(&inner.conn, "BEGIN IMMEDIATE").map_err(|e| map(what, e))?;
    inner.in_batch = true;
    inner.head = None;
    Ok(())
}

fn lost_batch(why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the batch was lost: {why}; SQLite rolled it back, so none of its change sets is \
         stored; run the same work again once the cause is fixed"
    ))
}

fn rollback_if_open(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// Fixed-width RFC 3339 (nanoseconds, `Z`), so text order is time order.
fn ts(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn parse_ts(col: usize, text: String) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(col, Type::Text, Box::new(e)))
}

fn to_i64(n: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(n).map_err(|_| {
        StoreError::Conflict(format!(
            "{what} {n} is beyond what the store can hold; check the caller"
        ))
    })
}

fn to_u64(col: usize, n: i64) -> rusqlite::Result<u64> {
    u64::try_from(n).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(col, n))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn hash32(col: usize, bytes: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            col,
            Type::Blob,
            format!("expected a 32-byte hash, found {len} bytes").into(),
        )
    })
}

fn read_row(table: Table, r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        table,
        id: r.get(0)?,
        tenant: r.get(1)?,
        status: r.get(2)?,
        version: to_u64(3, r.get(3)?)?,
        created_at: parse_ts(4, r.get(4)?)?,
        updated_at: parse_ts(5, r.get(5)?)?,
        index: r.get(6)?,
        key: r.get(7)?,
        sealed: r.get(8)?,
    })
}

/// What a read of a row's chain columns found when they do not hold what this version wrote:
/// the column and the type or size found (never the value). `None` for other errors.
fn retyped(e: &rusqlite::Error) -> Option<String> {
    const COLUMNS: [&str; 4] = ["seq", "body", "prev", "hash"];
    let name = |i: usize| COLUMNS.get(i).copied().unwrap_or("another");
    match e {
        rusqlite::Error::InvalidColumnType(i, _, found) => Some(format!(
            "its {} column holds {found} where a blob was written",
            name(*i)
        )),
        rusqlite::Error::FromSqlConversionFailure(i, _, why) => {
            Some(format!("its {} column: {why}", name(*i)))
        }
        _ => None,
    }
}

fn read_chained(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChainedEvent> {
    Ok(ChainedEvent {
        seq: to_u64(0, r.get(0)?)?,
        body: r.get(1)?,
        prev_hash: hash32(2, r.get(2)?)?,
        hash: hash32(3, r.get(3)?)?,
    })
}

fn apply_write(conn: &Connection, tables: &[TableSql; 5], write: &Write) -> StoreResult<()> {
    match write {
        Write::Insert(row) => {
            let t = row.table.as_str();
            let what = "inserting a record";
            let version = to_i64(row.version, "version")?;
            let changed = conn
                .prepare_cached(&tables[table_slot(row.table)].insert)
                .and_then(|mut s| {
                    s.execute(params![
                        row.id,
                        row.tenant,
                        row.status,
                        version,
                        ts(&row.created_at),
                        ts(&row.updated_at),
                        row.index,
                        row.key,
                        row.sealed,
                    ])
                })
                .map_err(|e| map(what, e))?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!(
                    "{t} record {} or its source key already exists in tenant {}; read the \
                     existing record instead of creating it again",
                    row.id, row.tenant
                )));
            }
            Ok(())
        }
        Write::Update {
            row,
            expected_version,
        } => {
            let t = row.table.as_str();
            if expected_version.checked_add(1) != Some(row.version) {
                return Err(StoreError::Conflict(format!(
                    "{t} record {}: an update from version {expected_version} must write version \
                     {}, not {}; fix the caller",
                    row.id,
                    expected_version.saturating_add(1),
                    row.version
                )));
            }
            let version = to_i64(row.version, "version")?;
            let expected = to_i64(*expected_version, "version")?;
            let sql = &tables[table_slot(row.table)];
            let run = |statement: &str| {
                conn.prepare_cached(statement)
                    .and_then(|mut s| {
                        s.execute(params![
                            row.id,
                            row.tenant,
                            row.status,
                            version,
                            ts(&row.updated_at),
                            row.index,
                            row.key,
                            row.sealed,
                            expected,
                        ])
                    })
                    .map_err(|e| map("updating a record", e))
            };
            // Most updates keep the blind index and source key: try that first, and on no match
            // (the keys changed, or the version did) the full update says which.
            let mut changed = run(&sql.update_same_keys)?;
            if changed == 0 {
                changed = run(&sql.update)?;
            }
            if changed != 1 {
                return Err(StoreError::Conflict(format!(
                    "{t} record {} in tenant {} is no longer at version {expected_version} (or \
                     does not exist)",
                    row.id, row.tenant
                )));
            }
            Ok(())
        }
    }
}

fn insert_transition(conn: &Connection, tr: &TransitionRow) -> StoreResult<()> {
    let version = to_i64(tr.version, "transition version")?;
    conn.prepare_cached(schema::INSERT_TRANSITION)
        .and_then(|mut s| {
            s.execute(params![
                tr.rx_id,
                tr.tenant,
                version,
                tr.from,
                tr.to,
                ts(&tr.at),
                tr.actor,
                tr.function,
            ])
        })
        .map(|_| ())
        .map_err(|e| map("recording a transition", e))
}

/// Appends `events` to the chain, reading its head from the table inside the open transaction.
/// Appends `events` to the chain. `cached` is the head the open batch last left (used when set,
/// else read from the table) and is set to the new head; the caller drops it if the statement's
/// change set rolls back.
fn append_events(
    conn: &Connection,
    events: &[AuditEvent],
    cached: &mut Option<Head>,
) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let what = "appending audit events";
    let head = match cached.take() {
        Some(h) => Some(h),
        None => conn
            .prepare_cached(schema::AUDIT_HEAD)
            .and_then(|mut s| {
                s.query_row([], |r| Ok((r.get::<_, i64>(0)?, hash32(1, r.get(1)?)?)))
                    .optional()
            })
            .map_err(|e| map(what, e))?,
    };
    let (mut seq, mut prev) = head.unwrap_or((0, chain::GENESIS));
    let mut insert = conn
        .prepare_cached(schema::INSERT_AUDIT)
        .map_err(|e| map(what, e))?;
    for event in events {
        let body = event.canonical_bytes();
        let hash = chain::link(&prev, &body);
        seq += 1;
        insert
            .execute(params![
                seq,
                event.id,
                ts(&event.at),
                event.actor.subject,
                event.action.as_str(),
                event.resource.id,
                event.patient,
                event.break_glass,
                body,
                &prev[..],
                &hash[..],
            ])
            .map_err(|e| map(what, e))?;
        prev = hash;
    }
    *cached = Some((seq, prev));
    Ok(())
}

#[async_trait]
impl AuditSink for SqliteStore {
    async fn append(&self, events: &[AuditEvent]) -> rx_guard::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.append_alone(events)
            .map_err(|e| GuardError::AuditUnavailable(e.to_string()))
    }
}

#[async_trait]
impl RecordStore for SqliteStore {
    async fn get(&self, table: Table, tenant: &str, id: &str) -> StoreResult<Option<Row>> {
        self.read(
            |conn, tables| {
                conn.prepare_cached(&tables[table_slot(table)].get)?
                    .query_row(params![id, tenant], |r| read_row(table, r))
                    .optional()
            },
            "reading a record",
        )
    }

    async fn get_by_key(&self, table: Table, tenant: &str, key: &[u8]) -> StoreResult<Option<Row>> {
        self.read(
            |conn, tables| {
                conn.prepare_cached(&tables[table_slot(table)].get_by_key)?
                    .query_row(params![tenant, key], |r| read_row(table, r))
                    .optional()
            },
            "reading a record by source key",
        )
    }

    async fn find_by_index(
        &self,
        table: Table,
        tenant: &str,
        index: &[u8],
    ) -> StoreResult<Vec<Row>> {
        self.read(
            |conn, tables| {
                conn.prepare_cached(&tables[table_slot(table)].find_by_index)?
                    .query_map(params![tenant, index], |r| read_row(table, r))?
                    .collect()
            },
            "finding records by blind index",
        )
    }

    async fn list(
        &self,
        table: Table,
        tenant: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit_rows: usize,
    ) -> StoreResult<Vec<Row>> {
        let n = limit(limit_rows);
        self.read(
            |conn, tables| {
                let sql = &tables[table_slot(table)];
                let map_row = |r: &rusqlite::Row<'_>| read_row(table, r);
                match (status, after) {
                    (None, None) => conn
                        .prepare_cached(&sql.list)?
                        .query_map(params![tenant, n], map_row)?
                        .collect(),
                    (None, Some(a)) => conn
                        .prepare_cached(&sql.list_after)?
                        .query_map(params![tenant, n, a], map_row)?
                        .collect(),
                    (Some(s), None) => conn
                        .prepare_cached(&sql.list_status)?
                        .query_map(params![tenant, n, s], map_row)?
                        .collect(),
                    (Some(s), Some(a)) => conn
                        .prepare_cached(&sql.list_status_after)?
                        .query_map(params![tenant, n, s, a], map_row)?
                        .collect(),
                }
            },
            "listing records",
        )
    }

    async fn count_by_status(&self, table: Table) -> StoreResult<Vec<(String, u64)>> {
        self.read(
            |conn, tables| {
                conn.prepare_cached(&tables[table_slot(table)].count_by_status)?
                    .query_map([], |r| Ok((r.get(0)?, to_u64(1, r.get(1)?)?)))?
                    .collect()
            },
            "counting records by status",
        )
    }

    async fn tenants(&self, table: Table) -> StoreResult<Vec<String>> {
        self.read(
            |conn, tables| {
                conn.prepare_cached(&tables[table_slot(table)].tenants)?
                    .query_map([], |r| r.get(0))?
                    .collect()
            },
            "listing the tenants",
        )
    }

    async fn last_updated(&self, table: Table) -> StoreResult<Option<DateTime<Utc>>> {
        // Fixed-width timestamps: the text maximum is the latest.
        let sql = format!("SELECT MAX(updated_at) FROM {}", table.as_str());
        self.read(
            |conn, _| {
                conn.prepare_cached(&sql)?
                    .query_row([], |r| r.get::<_, Option<String>>(0))?
                    .map(|t| parse_ts(0, t))
                    .transpose()
            },
            "reading when records last changed",
        )
    }

    async fn durable(&self) -> StoreResult<()> {
        self.sync()
    }

    fn lost_commits(&self) -> u64 {
        self.lost_commits.load(Ordering::SeqCst)
    }

    async fn commit(&self, changes: Changes) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.unit("committing a change set", |conn, tables, head| {
            for write in &changes.writes {
                apply_write(conn, tables, write)?;
            }
            for tr in &changes.transitions {
                insert_transition(conn, tr)?;
            }
            append_events(conn, &changes.audit, head)
        })
    }

    async fn transitions(&self, tenant: &str, rx_id: &str) -> StoreResult<Vec<TransitionRow>> {
        self.read(
            |conn, _| {
                conn.prepare_cached(schema::SELECT_TRANSITIONS)?
                    .query_map(params![tenant, rx_id], |r| {
                        Ok(TransitionRow {
                            rx_id: r.get(0)?,
                            tenant: r.get(1)?,
                            version: to_u64(2, r.get(2)?)?,
                            from: r.get(3)?,
                            to: r.get(4)?,
                            at: parse_ts(5, r.get(5)?)?,
                            actor: r.get(6)?,
                            function: r.get(7)?,
                        })
                    })?
                    .collect()
            },
            "reading transitions",
        )
    }

    async fn audit_len(&self) -> StoreResult<u64> {
        self.read(
            |conn, _| {
                conn.prepare_cached(schema::AUDIT_LEN)?
                    .query_row([], |r| to_u64(0, r.get(0)?))
            },
            "counting audit events",
        )
    }

    async fn audit_lowest_seq(&self) -> StoreResult<Option<i64>> {
        self.read(
            |conn, _| {
                conn.prepare_cached(schema::AUDIT_LOWEST_SEQ)?
                    .query_row([], |r| r.get(0))
            },
            "reading the first audit event's number",
        )
    }

    async fn audit_range(
        &self,
        from_seq: u64,
        limit_rows: usize,
    ) -> StoreResult<Vec<ChainedEvent>> {
        let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
        let n = limit(limit_rows);
        self.read(
            |conn, _| {
                conn.prepare_cached(schema::AUDIT_RANGE)?
                    .query_map(params![from, n], read_chained)?
                    .collect()
            },
            "reading audit events",
        )
    }

    async fn audit_range_checked(
        &self,
        from_seq: u64,
        limit_rows: usize,
    ) -> StoreResult<crate::port::AuditPage> {
        let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
        let n = limit(limit_rows);
        self.read(
            |conn, _| {
                let mut page = crate::port::AuditPage {
                    events: Vec::with_capacity(limit_rows.min(8192)),
                    fault: None,
                };
                let mut stmt = conn.prepare_cached(columns::AUDIT_RANGE_CHECKED)?;
                let mut rows = stmt.query(params![from, n])?;
                while let Some(r) = rows.next()? {
                    let ev = match read_chained(r) {
                        Ok(ev) => ev,
                        // A row whose chain columns were rewritten with another type or length
                        // is a break at its seq (the events before it are still checked),
                        // not a failure of the whole read. The page ends there.
                        Err(e) => {
                            let Some(reason) = retyped(&e) else {
                                return Err(e);
                            };
                            let seq = to_u64(0, r.get(0)?)?;
                            page.fault
                                .get_or_insert(RowFault::Unreadable { seq, reason });
                            break;
                        }
                    };
                    if page.fault.is_none() {
                        page.fault = columns::fault(r, &ev)?;
                    }
                    page.events.push(ev);
                }
                Ok(page)
            },
            "reading audit events",
        )
    }

    /// Criteria are ANDed; `from` and `to` are inclusive; a `limit` of 0 means no limit.
    async fn audit_search(&self, query: &AuditQuery) -> StoreResult<Vec<ChainedEvent>> {
        let mut sql = String::from("SELECT seq, body, prev, hash FROM audit WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        let mut text = |sql: &mut String, column: &str, value: String| {
            sql.push_str(&format!(" AND {column} ?"));
            args.push(Value::Text(value));
        };
        if let Some(p) = &query.patient {
            text(&mut sql, "patient =", p.clone());
        }
        if let Some(s) = &query.subject {
            text(&mut sql, "subject =", s.clone());
        }
        if let Some(a) = query.action {
            text(&mut sql, "action =", a.as_str().to_string());
        }
        if let Some(r) = &query.resource_id {
            text(&mut sql, "resource_id =", r.clone());
        }
        if let Some(from) = &query.from {
            text(&mut sql, "at >=", ts(from));
        }
        if let Some(to) = &query.to {
            text(&mut sql, "at <=", ts(to));
        }
        if query.break_glass_only {
            sql.push_str(" AND break_glass = 1");
        }
        if let Some(after) = query.after_seq {
            sql.push_str(" AND seq > ?");
            args.push(Value::Integer(i64::try_from(after).unwrap_or(i64::MAX)));
        }
        sql.push_str(" ORDER BY seq");
        if query.limit > 0 {
            sql.push_str(" LIMIT ?");
            args.push(Value::Integer(limit(query.limit)));
        }
        self.read(
            |conn, _| {
                conn.prepare_cached(&sql)?
                    .query_map(params_from_iter(args.iter()), read_chained)?
                    .collect()
            },
            "searching audit events",
        )
    }

    /// Checkpoints are numbered 1, 2, 3 ...: one that does not follow the last is a conflict.
    async fn put_checkpoint(&self, cp: &CheckpointRow) -> StoreResult<()> {
        let number = to_i64(cp.number, "checkpoint number")?;
        let first = to_i64(cp.first_seq, "checkpoint first_seq")?;
        let last_seq = to_i64(cp.last_seq, "checkpoint last_seq")?;
        self.unit("storing a checkpoint", |conn, _, _| {
            let last: i64 = conn
                .prepare_cached(schema::LAST_CHECKPOINT)
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(|e| map("storing a checkpoint", e))?;
            if number != last + 1 {
                return Err(StoreError::Conflict(format!(
                    "checkpoint {number} does not follow the last stored checkpoint {last}; \
                     reload the checkpoints and seal again"
                )));
            }
            conn.prepare_cached(schema::INSERT_CHECKPOINT)
                .and_then(|mut s| s.execute(params![number, first, last_seq, cp.body]))
                .map(|_| ())
                .map_err(|e| map("storing a checkpoint", e))
        })
    }

    async fn checkpoints(&self) -> StoreResult<Vec<CheckpointRow>> {
        self.read(
            |conn, _| {
                conn.prepare_cached(schema::SELECT_CHECKPOINTS)?
                    .query_map([], |r| {
                        Ok(CheckpointRow {
                            number: to_u64(0, r.get(0)?)?,
                            first_seq: to_u64(1, r.get(1)?)?,
                            last_seq: to_u64(2, r.get(2)?)?,
                            body: r.get(3)?,
                        })
                    })?
                    .collect()
            },
            "reading checkpoints",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Turns;
    use std::sync::{Arc, Mutex};

    /// More waiters than condition-variable slots: every turn is served, in ticket order (a
    /// waiter woken for a later ticket sharing its slot sleeps again).
    #[test]
    fn turns_are_served_in_ticket_order_with_more_waiters_than_slots() {
        let turns = Arc::new(Turns::default());
        let served = Arc::new(Mutex::new(Vec::new()));
        let first = turns.take();
        let handles: Vec<_> = (0..3 * super::SLOTS)
            .map(|_| {
                let (turns, served) = (turns.clone(), served.clone());
                std::thread::spawn(move || {
                    let turn = turns.take();
                    served.lock().unwrap().push(turn.ticket);
                })
            })
            .collect();
        // Let every thread take its ticket and wait behind the first turn.
        while turns.queue.lock().unwrap().0 < 1 + 3 * super::SLOTS as u64 {
            std::thread::yield_now();
        }
        drop(first);
        for h in handles {
            h.join().unwrap();
        }
        let served = served.lock().unwrap().clone();
        let expected: Vec<u64> = (1..=3 * super::SLOTS as u64).collect();
        assert_eq!(served, expected);
    }
}
