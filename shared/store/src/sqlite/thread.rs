//! The store's connection on a thread of its own, for a bulk run that keeps several orders in
//! flight: the steps' own work (parsing, rules, review, sealing, JSON) runs on the caller's
//! thread while SQLite runs on this one, so a run uses both cores instead of taking turns on one.
//!
//! Every call is carried to the thread as a job and answered over a oneshot channel. The thread
//! runs jobs one at a time in the order they were sent, so a read sent after a write sees it, and
//! the audit chain is appended in one order. Nothing is queued without a caller waiting for its
//! answer: when a call returns, its change set is in the store exactly as with
//! [`SqliteStore`] itself. If the thread is gone (a job panicked), every call fails closed with
//! [`StoreError::Unavailable`].

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::channel::oneshot;
use futures::executor::block_on;
use rx_guard::audit::{AuditEvent, AuditQuery, AuditSink, ChainedEvent};
use rx_guard::GuardError;

use super::SqliteStore;
use crate::port::{
    AuditPage, Changes, CheckpointRow, RecordStore, Row, StoreError, StoreResult, Table,
    TransitionRow,
};

type Job = Box<dyn FnOnce(&SqliteStore) + Send>;

/// A [`SqliteStore`] whose calls run on a dedicated thread (see the module docs).
pub struct StoreThread {
    store: Arc<SqliteStore>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl StoreThread {
    /// Starts the thread over `store`. The store stays usable directly (for what runs while no
    /// call is in flight: opening and closing batches, the audit tools).
    pub fn spawn(store: Arc<SqliteStore>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let on_thread = store.clone();
        let thread = std::thread::Builder::new()
            .name("rxflow-store".into())
            .spawn(move || {
                while let Some(job) = next_job(&rx) {
                    job(&on_thread);
                }
            })?;
        Ok(StoreThread {
            store,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The store the thread works on.
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.store
    }

    /// Runs `f` on the store's thread, after every job sent before it, and returns its answer.
    pub async fn run<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&SqliteStore) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            // The caller may have stopped waiting; the job has run either way.
            let _ = tx.send(f(store));
        });
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.as_ref().is_some_and(|j| j.send(job).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())
    }

    /// Lets the thread finish the jobs already sent, then joins it. Later calls fail closed.
    pub fn stop(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the store thread ended with a panic");
            }
        }
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The next job, `None` once every sender is gone.
fn next_job(rx: &mpsc::Receiver<Job>) -> Option<Job> {
    let mut spin = Spin::default();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if spin.again() => {}
            Err(mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

/// Looking again a few times (a microsecond or two in all) before sleeping, between two threads
/// that hand each other work every few microseconds: a sleep costs the other side a system call
/// to wake it. Only that long: spinning for longer (tried: 50 µs to 2 ms, spinning or yielding)
/// gained a tenth on an idle machine and lost three quarters when other processes kept both
/// cores busy, as the spinning thread held the core the other one needed.
#[derive(Default)]
pub struct Spin {
    tries: u32,
}

/// Tries before sleeping.
const PAUSES: u32 = 64;

impl Spin {
    /// Whether to look again (after a pause of a few cycles) rather than sleep.
    pub fn again(&mut self) -> bool {
        self.tries += 1;
        std::hint::spin_loop();
        self.tries < PAUSES
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("the store thread has stopped".into())
}

#[async_trait]
impl AuditSink for StoreThread {
    async fn append(&self, events: &[AuditEvent]) -> rx_guard::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.to_vec();
        self.run(move |s| block_on(s.append(&events)))
            .await
            .map_err(|e| GuardError::AuditUnavailable(e.to_string()))?
    }
}

#[async_trait]
impl RecordStore for StoreThread {
    async fn get(&self, table: Table, tenant: &str, id: &str) -> StoreResult<Option<Row>> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.run(move |s| block_on(s.get(table, &tenant, &id)))
            .await?
    }

    async fn get_by_key(&self, table: Table, tenant: &str, key: &[u8]) -> StoreResult<Option<Row>> {
        let (tenant, key) = (tenant.to_string(), key.to_vec());
        self.run(move |s| block_on(s.get_by_key(table, &tenant, &key)))
            .await?
    }

    async fn find_by_index(
        &self,
        table: Table,
        tenant: &str,
        index: &[u8],
    ) -> StoreResult<Vec<Row>> {
        let (tenant, index) = (tenant.to_string(), index.to_vec());
        self.run(move |s| block_on(s.find_by_index(table, &tenant, &index)))
            .await?
    }

    async fn list(
        &self,
        table: Table,
        tenant: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Row>> {
        let tenant = tenant.to_string();
        let status = status.map(str::to_string);
        let after = after.map(str::to_string);
        self.run(move |s| {
            block_on(s.list(table, &tenant, status.as_deref(), after.as_deref(), limit))
        })
        .await?
    }

    async fn count_by_status(&self, table: Table) -> StoreResult<Vec<(String, u64)>> {
        self.run(move |s| block_on(s.count_by_status(table)))
            .await?
    }

    async fn tenants(&self, table: Table) -> StoreResult<Vec<String>> {
        self.run(move |s| block_on(s.tenants(table))).await?
    }

    async fn last_updated(&self, table: Table) -> StoreResult<Option<DateTime<Utc>>> {
        self.run(move |s| block_on(s.last_updated(table))).await?
    }

    async fn commit(&self, changes: Changes) -> StoreResult<()> {
        self.run(move |s| block_on(s.commit(changes))).await?
    }

    async fn durable(&self) -> StoreResult<()> {
        self.run(|s| block_on(s.durable())).await?
    }

    fn lost_commits(&self) -> u64 {
        self.store.lost_commits()
    }

    async fn transitions(&self, tenant: &str, rx_id: &str) -> StoreResult<Vec<TransitionRow>> {
        let (tenant, rx_id) = (tenant.to_string(), rx_id.to_string());
        self.run(move |s| block_on(s.transitions(&tenant, &rx_id)))
            .await?
    }

    async fn audit_len(&self) -> StoreResult<u64> {
        self.run(|s| block_on(s.audit_len())).await?
    }

    async fn audit_range(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<ChainedEvent>> {
        self.run(move |s| block_on(s.audit_range(from_seq, limit)))
            .await?
    }

    async fn audit_range_checked(&self, from_seq: u64, limit: usize) -> StoreResult<AuditPage> {
        self.run(move |s| block_on(s.audit_range_checked(from_seq, limit)))
            .await?
    }

    async fn audit_search(&self, query: &AuditQuery) -> StoreResult<Vec<ChainedEvent>> {
        let query = query.clone();
        self.run(move |s| block_on(s.audit_search(&query))).await?
    }

    async fn put_checkpoint(&self, cp: &CheckpointRow) -> StoreResult<()> {
        let cp = cp.clone();
        self.run(move |s| block_on(s.put_checkpoint(&cp))).await?
    }

    async fn checkpoints(&self) -> StoreResult<Vec<CheckpointRow>> {
        self.run(|s| block_on(s.checkpoints())).await?
    }
}
