//! WAL checkpoints off the commit path, for a server.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that pushes the log past its threshold:
//! it syncs the log, copies its pages into the database file and syncs that, two fsyncs of a few
//! milliseconds each, while the store's connection is held and every request waits its turn.
//! Under `rxflow serve` at 1,000 orders/s that was some 30 COMMITs a second taking 7 ms on
//! average: the latency tail. A [`Checkpointer`] does that work on a connection of its own,
//! which a checkpoint in PASSIVE mode lets run beside the writer. Only when the log has grown
//! past a bound without the copy ever catching up (writes never paused long enough) does it take
//! the store's turn, briefly, to copy the few frames left, so that the next write starts the log
//! again from its beginning: one short wait per bound's worth of log instead of one per 1,000
//! pages. As with SQLite's own checkpoints, a reader in the middle of a read keeps the frames
//! its snapshot needs from being copied, and the log from starting again, until it is done.

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, Weak};

use rusqlite::Connection;

use super::error::map;
use super::{SqliteStore, BUSY_TIMEOUT};
use crate::port::StoreResult;

/// What a round found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Frames in the log when the round ended.
    pub log_frames: u64,
    /// Of those, the frames not yet copied into the database file: a reader's snapshot still
    /// needs them (or they were committed while the round ran).
    pub behind: u64,
    /// Whether the round held the store's connection to copy the last frames.
    pub held_writers: bool,
}

impl Round {
    /// Every committed frame is in the database file: the next write starts the log again.
    pub fn caught_up(&self) -> bool {
        self.behind == 0
    }
}

/// The most frames a round copies while it holds the writers (4 MiB of 4 KiB pages, a few
/// milliseconds). A log further behind than that (a reader held its frames) is copied beside
/// the writers first, never with them waiting.
const HELD_COPY_MAX: u64 = 1_024;

/// Runs the checkpoints of one [`SqliteStore`] (see the module documentation).
pub struct Checkpointer {
    conn: Connection,
    store: Weak<SqliteStore>,
    /// Log length, in frames, past which a round holds the writers to catch up.
    restart_at: u64,
    /// What the last checkpoint that ran found: a round that could not start (another
    /// connection was checkpointing) reports it again.
    last: Cell<Round>,
}

impl SqliteStore {
    /// Stops checkpoints from running inside COMMIT and returns the [`Checkpointer`] that is to
    /// run them instead (call [`Checkpointer::round`] often: nothing else copies the log into
    /// the database file while the store is open). `restart_at` bounds the log, in frames of
    /// one page.
    pub fn checkpoint_separately(self: &Arc<Self>, restart_at: u64) -> StoreResult<Checkpointer> {
        let what = "moving checkpoints off the commit path";
        let conn = open_side_connection(&self.path).map_err(|e| map(what, e))?;
        let inner = self.lock();
        inner
            .conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| map(what, e))?;
        // A log file grown past twice the bound (a reader held the log open for a while) is
        // cut back when the log starts again; one within it is reused as it is.
        let page: i64 = inner
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|e| map(what, e))?;
        let limit = i64::try_from(restart_at.saturating_mul(2))
            .unwrap_or(i64::MAX)
            .saturating_mul(page);
        inner
            .conn
            .pragma_update(None, "journal_size_limit", limit)
            .map_err(|e| map(what, e))?;
        Ok(Checkpointer {
            conn,
            store: Arc::downgrade(self),
            restart_at: restart_at.max(1),
            last: Cell::new(Round {
                log_frames: 0,
                behind: 0,
                held_writers: false,
            }),
        })
    }
}

impl Checkpointer {
    /// Copies the committed log into the database file beside the writers. When the log holds
    /// `restart_at` frames or more and that copy left at most a few frames behind, it commits
    /// the store's open group and copies the rest while holding the store's turn, so that the
    /// next write starts the log again. A reader's snapshot can keep frames from being copied
    /// (and so the log from starting again) until it ends; the round then reports how far
    /// behind the copy is. `Ok(None)` once the store is closed.
    pub fn round(&self) -> StoreResult<Option<Round>> {
        let Some(store) = self.store.upgrade() else {
            return Ok(None);
        };
        let Some(copied) = passive(&self.conn).map_err(|e| map("checkpointing the log", e))? else {
            return Ok(Some(Round {
                held_writers: false,
                ..self.last.get()
            }));
        };
        let round = self.record(copied, false);
        if round.log_frames < self.restart_at || round.behind > HELD_COPY_MAX {
            return Ok(Some(round));
        }
        let what = "checkpointing the log with the writers held";
        let mut inner = store.lock();
        if inner.in_batch {
            store.commit_batch(&mut inner)?;
        }
        Ok(Some(
            match passive(&inner.conn).map_err(|e| map(what, e))? {
                Some(copied) => self.record(copied, true),
                None => round,
            },
        ))
    }

    /// The round a checkpoint's (log, copied) figures make, kept as the last one seen.
    fn record(&self, (log, done): (u64, u64), held_writers: bool) -> Round {
        let round = Round {
            log_frames: log,
            behind: log.saturating_sub(done),
            held_writers,
        };
        self.last.set(round);
        round
    }
}

/// A PASSIVE checkpoint: (frames in the log, frames copied into the database file), or `None`
/// when it could not start (another connection held the checkpoint lock, as one closing does).
fn passive(conn: &Connection) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let log: i64 = r.get(1)?;
        let done: i64 = r.get(2)?;
        Ok(u64::try_from(log)
            .ok()
            .map(|log| (log, u64::try_from(done).unwrap_or(0))))
    })
}

fn open_side_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The checkpoint's own syncs follow this setting: the log is synced before its pages are
    // copied and the database file after, so a power cut cannot leave a restarted log over
    // pages the file never got.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}
