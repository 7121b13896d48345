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
//!
//! Inside a batch opened here ([`StoreThread::begin_batch`]) the rows read and written are also
//! kept on the caller's side, sealed as stored, and a read of one by id or key is answered from
//! there without a trip to the thread (the step still opens it and audits the read). The batch
//! is one `BEGIN IMMEDIATE` transaction: it holds the store's write lock, so no other
//! connection changes a row until it ends, and every change of this one comes through here. The
//! rows are dropped when the batch ends and whenever a change set fails.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::channel::oneshot;
use futures::executor::block_on;
use rx_guard::audit::{AuditEvent, AuditQuery, AuditSink, ChainedEvent};
use rx_guard::GuardError;

use super::schema::table_slot;
use super::SqliteStore;
use crate::port::{
    AuditPage, Changes, CheckpointRow, RecordStore, Row, StoreError, StoreResult, Table,
    TransitionRow, Write,
};

type Job = Box<dyn FnOnce(&SqliteStore) + Send>;

/// A [`SqliteStore`] whose calls run on a dedicated thread (see the module docs).
pub struct StoreThread {
    store: Arc<SqliteStore>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    rows: Mutex<Rows>,
}

/// Rows kept while a batch opened through the front is open (see the module docs).
#[derive(Default)]
struct Rows {
    /// The batch the kept rows belong to, while one is open.
    open: Option<u64>,
    /// Counts the batches, and every time the kept rows stopped being trusted: an answer is
    /// kept only if it was asked for in the same epoch as it arrives in.
    epoch: u64,
    /// By table slot, then id (ids are unique within a table).
    by_id: [HashMap<String, Row>; 5],
    /// By table slot, then tenant and key (`tenant \0 key`): the row's id.
    by_key: [HashMap<Vec<u8>, String>; 5],
}

/// Rows kept at most; past it they are dropped and kept again as they come.
const KEPT_ROWS: usize = 8_192;

fn tenant_key(tenant: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + key.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

impl Rows {
    /// The epoch a call is asked in, if its answer may be kept.
    fn ticket(&self) -> Option<u64> {
        self.open.map(|_| self.epoch)
    }

    fn get(&self, table: Table, tenant: &str, id: &str) -> Option<Row> {
        self.open?;
        let row = self.by_id[table_slot(table)].get(id)?;
        (row.tenant == tenant).then(|| row.clone())
    }

    fn get_by_key(&self, table: Table, tenant: &str, key: &[u8]) -> Option<Row> {
        self.open?;
        let id = self.by_key[table_slot(table)].get(&tenant_key(tenant, key))?;
        let row = self.by_id[table_slot(table)].get(id)?;
        (row.tenant == tenant && row.key.as_deref() == Some(key)).then(|| row.clone())
    }

    /// Keeps `row`, answered to a call asked with `ticket`, unless the batch or the epoch
    /// changed since or a later version of it is kept already (an answer read before a change
    /// can reach the caller after it).
    fn keep(&mut self, ticket: Option<u64>, row: &Row) {
        if ticket.is_none() || ticket != self.ticket() {
            return;
        }
        let slot = table_slot(row.table);
        if let Some(kept) = self.by_id[slot].get(&row.id) {
            if kept.version > row.version {
                return;
            }
        }
        if self.by_id.iter().map(HashMap::len).sum::<usize>() >= KEPT_ROWS {
            self.clear();
        }
        if let Some(key) = &row.key {
            self.by_key[slot].insert(tenant_key(&row.tenant, key), row.id.clone());
        }
        self.by_id[slot].insert(row.id.clone(), row.clone());
    }

    fn clear(&mut self) {
        self.by_id.iter_mut().for_each(HashMap::clear);
        self.by_key.iter_mut().for_each(HashMap::clear);
    }

    /// Drops the kept rows and every answer still on its way.
    fn forget(&mut self) {
        self.clear();
        self.epoch = self.epoch.wrapping_add(1);
    }

    fn open(&mut self) {
        self.forget();
        self.open = Some(self.epoch);
    }

    fn close(&mut self) {
        self.forget();
        self.open = None;
    }
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
            rows: Mutex::new(Rows::default()),
        })
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, Rows> {
        match self.rows.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                g.forget();
                g
            }
        }
    }

    /// Opens a batch ([`SqliteStore::begin_batch`]) on the thread; the rows it reads and writes
    /// are kept until it ends.
    pub async fn begin_batch(&self) -> StoreResult<()> {
        self.call(|s| s.begin_batch()).await??;
        self.rows().open();
        Ok(())
    }

    /// Commits the batch ([`SqliteStore::end_batch`]) on the thread and drops the kept rows.
    pub async fn end_batch(&self) -> StoreResult<()> {
        self.rows().close();
        self.call(|s| s.end_batch()).await?
    }

    /// A read of one row: from the kept rows when `kept` finds it there, else `read` on the
    /// thread (its answer kept if the batch still allows).
    async fn read_row<F>(
        &self,
        kept: impl FnOnce(&Rows) -> Option<Row>,
        read: F,
    ) -> StoreResult<Option<Row>>
    where
        F: FnOnce(&SqliteStore) -> StoreResult<Option<Row>> + Send + 'static,
    {
        let ticket = {
            let rows = self.rows();
            if let Some(row) = kept(&rows) {
                return Ok(Some(row));
            }
            rows.ticket()
        };
        let got = self.call(read).await??;
        if let Some(row) = &got {
            self.rows().keep(ticket, row);
        }
        Ok(got)
    }

    /// The store the thread works on.
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.store
    }

    /// Runs `f` on the store's thread, after every job sent before it, and returns its answer.
    /// `f` may change rows behind the kept ones' back, so they are dropped once it has run.
    pub async fn run<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&SqliteStore) -> R + Send + 'static,
    {
        let answer = self.call(f).await;
        self.rows().forget();
        answer
    }

    /// [`StoreThread::run`] for the calls whose changes the kept rows follow.
    async fn call<R, F>(&self, f: F) -> StoreResult<R>
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
        self.rows().close();
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

/// Looking again for a while (4,096 pauses, about 40 µs on this project's machine) before
/// sleeping, between two threads that hand each other work every few microseconds: a sleep
/// costs the other side a system call to wake it, and the switches were a ninth of the run.
/// Measured with the demo of 10,000 orders: 3,037–3,129 orders/s looking 64 or 512 times,
/// 3,511–3,784 with 4,096 (16,384: the same); with two other processes keeping both cores busy,
/// 1,478–1,703 against 1,584–1,629, no loss. (Earlier, with the system allocator, spinning or
/// yielding for 50 µs to 2 ms lost three quarters under that load.)
#[derive(Default)]
pub struct Spin {
    tries: u32,
}

/// Tries before sleeping.
const PAUSES: u32 = 4_096;

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
        let done = self
            .call(move |s| block_on(s.append(&events)))
            .await
            .map_err(|e| GuardError::AuditUnavailable(e.to_string()))
            .and_then(|r| r);
        if done.is_err() {
            // The failure may have cost the batch its rows (see `commit`).
            self.rows().forget();
        }
        done
    }
}

#[async_trait]
impl RecordStore for StoreThread {
    async fn get(&self, table: Table, tenant: &str, id: &str) -> StoreResult<Option<Row>> {
        let (owned_tenant, owned_id) = (tenant.to_string(), id.to_string());
        self.read_row(
            |rows| rows.get(table, tenant, id),
            move |s| block_on(s.get(table, &owned_tenant, &owned_id)),
        )
        .await
    }

    async fn get_by_key(&self, table: Table, tenant: &str, key: &[u8]) -> StoreResult<Option<Row>> {
        let (owned_tenant, owned_key) = (tenant.to_string(), key.to_vec());
        self.read_row(
            |rows| rows.get_by_key(table, tenant, key),
            move |s| block_on(s.get_by_key(table, &owned_tenant, &owned_key)),
        )
        .await
    }

    async fn find_by_index(
        &self,
        table: Table,
        tenant: &str,
        index: &[u8],
    ) -> StoreResult<Vec<Row>> {
        let (tenant, index) = (tenant.to_string(), index.to_vec());
        self.call(move |s| block_on(s.find_by_index(table, &tenant, &index)))
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
        self.call(move |s| {
            block_on(s.list(table, &tenant, status.as_deref(), after.as_deref(), limit))
        })
        .await?
    }

    async fn count_by_status(&self, table: Table) -> StoreResult<Vec<(String, u64)>> {
        self.call(move |s| block_on(s.count_by_status(table)))
            .await?
    }

    async fn tenants(&self, table: Table) -> StoreResult<Vec<String>> {
        self.call(move |s| block_on(s.tenants(table))).await?
    }

    async fn last_updated(&self, table: Table) -> StoreResult<Option<DateTime<Utc>>> {
        self.call(move |s| block_on(s.last_updated(table))).await?
    }

    async fn commit(&self, changes: Changes) -> StoreResult<()> {
        let ticket = self.rows().ticket();
        let written: Vec<Row> = if ticket.is_some() {
            changes
                .writes
                .iter()
                .map(|w| match w {
                    Write::Insert(row) | Write::Update { row, .. } => row.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let done = self.call(move |s| block_on(s.commit(changes))).await;
        let mut rows = self.rows();
        match done {
            Ok(Ok(())) => {
                written.iter().for_each(|row| rows.keep(ticket, row));
                Ok(())
            }
            Ok(Err(e)) | Err(e) => {
                rows.forget();
                Err(e)
            }
        }
    }

    async fn durable(&self) -> StoreResult<()> {
        self.call(|s| block_on(s.durable())).await?
    }

    fn lost_commits(&self) -> u64 {
        self.store.lost_commits()
    }

    async fn transitions(&self, tenant: &str, rx_id: &str) -> StoreResult<Vec<TransitionRow>> {
        let (tenant, rx_id) = (tenant.to_string(), rx_id.to_string());
        self.call(move |s| block_on(s.transitions(&tenant, &rx_id)))
            .await?
    }

    async fn audit_len(&self) -> StoreResult<u64> {
        self.call(|s| block_on(s.audit_len())).await?
    }

    async fn audit_lowest_seq(&self) -> StoreResult<Option<i64>> {
        self.call(|s| block_on(s.audit_lowest_seq())).await?
    }

    async fn audit_range(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<ChainedEvent>> {
        self.call(move |s| block_on(s.audit_range(from_seq, limit)))
            .await?
    }

    async fn audit_range_checked(&self, from_seq: u64, limit: usize) -> StoreResult<AuditPage> {
        self.call(move |s| block_on(s.audit_range_checked(from_seq, limit)))
            .await?
    }

    async fn audit_search(&self, query: &AuditQuery) -> StoreResult<Vec<ChainedEvent>> {
        let query = query.clone();
        self.call(move |s| block_on(s.audit_search(&query))).await?
    }

    async fn put_checkpoint(&self, cp: &CheckpointRow) -> StoreResult<()> {
        let cp = cp.clone();
        self.call(move |s| block_on(s.put_checkpoint(&cp))).await?
    }

    async fn checkpoints(&self) -> StoreResult<Vec<CheckpointRow>> {
        self.call(|s| block_on(s.checkpoints())).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn row(version: u64) -> Row {
        let t0 = Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap();
        Row {
            table: Table::Prescriptions,
            id: "rx-1".into(),
            tenant: "t1".into(),
            status: format!("v{version}"),
            version,
            created_at: t0,
            updated_at: t0,
            index: None,
            key: Some(b"key-1".to_vec()),
            sealed: format!("sealed-v{version}").into_bytes(),
        }
    }

    /// A read sent before an update is answered with the old version; if that answer reaches
    /// its caller after the update's, the newer version stays the one kept.
    #[tokio::test]
    async fn an_answer_older_than_a_kept_change_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("rx.db")).unwrap());
        let one = Changes {
            writes: vec![Write::Insert(row(1))],
            ..Default::default()
        };
        block_on(store.commit(one)).unwrap();
        let front = StoreThread::spawn(store).unwrap();
        front.begin_batch().await.unwrap();

        // Hold the thread so that the read and the update queue up behind it.
        let (open_gate, gate) = mpsc::channel::<()>();
        let mut held = Box::pin(front.call(move |_| gate.recv()));
        assert!(futures::poll!(held.as_mut()).is_pending());
        let mut read = Box::pin(front.get(Table::Prescriptions, "t1", "rx-1"));
        assert!(futures::poll!(read.as_mut()).is_pending());
        let two = Changes {
            writes: vec![Write::Update {
                row: row(2),
                expected_version: 1,
            }],
            ..Default::default()
        };
        let mut update = Box::pin(front.commit(two));
        assert!(futures::poll!(update.as_mut()).is_pending());
        open_gate.send(()).unwrap();
        held.await.unwrap().unwrap();
        update.await.unwrap();
        assert_eq!(
            read.await.unwrap().unwrap().version,
            1,
            "the read ran first"
        );

        let now = front.get(Table::Prescriptions, "t1", "rx-1").await.unwrap();
        assert_eq!(now, Some(row(2)));
        let now = front
            .get_by_key(Table::Prescriptions, "t1", b"key-1")
            .await
            .unwrap();
        assert_eq!(now, Some(row(2)));
        front.end_batch().await.unwrap();
    }
}
