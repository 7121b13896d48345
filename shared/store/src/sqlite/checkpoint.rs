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
//! pages.

use std::path::Path;
use std::sync::{Arc, Weak};

use rusqlite::Connection;

use super::error::map;
use super::{SqliteStore, BUSY_TIMEOUT};
use crate::port::{StoreError, StoreResult};

/// What a round found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Frames in the log when the round ended.
    pub log_frames: u64,
    /// Whether every committed frame is now in the database file (the next write restarts the
    /// log).
    pub caught_up: bool,
    /// Whether the round had to hold the store's connection to catch up.
    pub held_writers: bool,
}

/// Runs the checkpoints of one [`SqliteStore`] (see the module documentation).
pub struct Checkpointer {
    conn: Connection,
    store: Weak<SqliteStore>,
    /// Log length, in frames, past which a round holds the writers to catch up.
    restart_at: u64,
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
        Ok(Checkpointer {
            conn,
            store: Arc::downgrade(self),
            restart_at: restart_at.max(1),
        })
    }
}

impl Checkpointer {
    /// Copies the committed log into the database file beside the writers. When that leaves
    /// frames behind and the log holds `restart_at` frames or more, it commits the store's open
    /// group and copies the rest while holding the store's turn. `Ok(None)` once the store is
    /// closed.
    pub fn round(&self) -> StoreResult<Option<Round>> {
        let Some(store) = self.store.upgrade() else {
            return Ok(None);
        };
        let (log, done) = passive(&self.conn).map_err(|e| map("checkpointing the log", e))?;
        if log < self.restart_at {
            return Ok(Some(Round {
                log_frames: log,
                caught_up: done >= log,
                held_writers: false,
            }));
        }
        let what = "checkpointing the log with the writers held";
        let mut inner = store.lock();
        if inner.in_batch {
            store.commit_batch(&mut inner)?;
        }
        let (log, done) = passive(&inner.conn).map_err(|e| map(what, e))?;
        if done < log {
            return Err(StoreError::Unavailable(format!(
                "{what}: {} of {log} frames could not be copied (a reader holds them)",
                log - done
            )));
        }
        Ok(Some(Round {
            log_frames: log,
            caught_up: true,
            held_writers: true,
        }))
    }
}

/// A PASSIVE checkpoint: (frames in the log, frames copied into the database file).
fn passive(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let log: i64 = r.get(1)?;
        let done: i64 = r.get(2)?;
        Ok((log.max(0) as u64, done.max(0) as u64))
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
