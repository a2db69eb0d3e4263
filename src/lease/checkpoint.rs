//! When the lease store's write-ahead log is copied into the database file.
//!
//! Owns: the WAL checkpoint policy of the store writer. SQLite's automatic checkpoint runs
//! inside the commit that takes the log past 1,000 frames. Under load that commit copied the
//! log's pages into the database and fsync'd it: 2.6 ms at the median, 5.7 ms at the p90 and
//! up to 13 ms on the bench VM, about every 100 commits, and every credential waiting for that
//! commit waited for the copy too. Here the writer checkpoints when it has nothing to commit:
//! at the first idle moment after the log reached [`CHECKPOINT_FRAMES`], and inside a commit
//! only when it never idled before the log reached [`WAL_MAX_FRAMES`].
//!
//! The checkpoint stays on the writer's thread on purpose. SQLite rewinds the log to its start
//! only when a write transaction begins after every frame was copied, so a checkpoint on
//! another thread, racing the commits, leaves the writer to copy what was appended meanwhile
//! anyway; and measured on the bench VM it did not lower the half-load p99, as its copies and
//! fsyncs compete with the commits' fsyncs for the same disk. Durability does not change:
//! every commit is fsync'd in the WAL before anyone is answered, whenever the copy happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

/// WAL frames (pages) after which the writer checkpoints at its next idle moment: SQLite's
/// own threshold for its automatic checkpoint.
pub const CHECKPOINT_FRAMES: i32 = 1000;

/// WAL frames at which the writer checkpoints after a commit, idle or not, bounding the log
/// (16 MB at 4 KiB pages) when commits never stop.
pub const WAL_MAX_FRAMES: i32 = 4 * CHECKPOINT_FRAMES;

/// The writer's checkpoint policy: call [`Self::committed`] after each commit and
/// [`Self::idle`] before waiting for the next batch.
#[derive(Debug)]
pub struct WalKeeper {
    /// Frames in the WAL after the last commit, from SQLite's WAL hook.
    frames: Arc<AtomicI32>,
    last_frames: i32,
    /// Frames at the last checkpoint, 0 once the log restarted. A checkpoint that did not
    /// restart it (a reader on an old snapshot keeps the frames it may still read) is not
    /// tried again before the log grows.
    tried_at: i32,
    /// Checkpoint after a commit once the log holds this many frames.
    force_at: i32,
    /// Checkpoints run so far.
    checkpoints: u64,
}

impl WalKeeper {
    /// Turns SQLite's automatic checkpoint off on `conn`, the writer's connection, and
    /// watches the log's size instead.
    pub fn start(conn: &mut Connection) -> rusqlite::Result<Self> {
        conn.execute_batch("PRAGMA wal_autocheckpoint=0;")?;
        let frames = Arc::new(AtomicI32::new(0));
        let seen = Arc::clone(&frames);
        // SQLite calls this after every commit with the log's size in frames (its automatic
        // checkpoint is this same hook, which the pragma above removed).
        let hooked = conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
            seen.store(pages, Ordering::Release);
            Ok(())
        }));
        if let Err(e) = hooked {
            // Unwatched, the log must not go without checkpoints.
            conn.execute_batch(&format!("PRAGMA wal_autocheckpoint={CHECKPOINT_FRAMES};"))?;
            return Err(e);
        }
        Ok(Self {
            frames,
            last_frames: 0,
            tried_at: 0,
            force_at: WAL_MAX_FRAMES,
            checkpoints: 0,
        })
    }

    /// After a commit: checkpoints only when the log reached [`WAL_MAX_FRAMES`].
    pub fn committed(&mut self, conn: &Connection) {
        let frames = self.frames.load(Ordering::Acquire);
        if frames < self.last_frames {
            // The log restarted from its beginning.
            self.tried_at = 0;
            self.force_at = WAL_MAX_FRAMES;
        }
        self.last_frames = frames;
        if frames >= self.force_at {
            self.checkpoint(conn);
            self.force_at = frames + CHECKPOINT_FRAMES;
        }
    }

    /// Before the writer waits for work: checkpoints once the log reached
    /// [`CHECKPOINT_FRAMES`], so that the next commit starts it from the beginning.
    pub fn idle(&mut self, conn: &Connection) {
        if self.last_frames >= CHECKPOINT_FRAMES && self.last_frames > self.tried_at {
            self.checkpoint(conn);
        }
    }

    fn checkpoint(&mut self, conn: &Connection) {
        self.tried_at = self.last_frames;
        self.checkpoints += 1;
        let started = std::time::Instant::now();
        // Passive: never waits for a reader, whose snapshot's frames stay for later.
        match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
            Ok((log, copied)) => tracing::debug!(
                log,
                copied,
                checkpoints = self.checkpoints,
                us = started.elapsed().as_micros() as u64,
                "lease store checkpoint"
            ),
            Err(e) => tracing::warn!(error = %e, "lease store checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A WAL database with one table, its writer connection and the keeper on it.
    fn setup() -> (tempfile::TempDir, PathBuf, Connection, WalKeeper) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        let mut c = Connection::open(&p).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .unwrap();
        let k = WalKeeper::start(&mut c).unwrap();
        (d, p, c, k)
    }

    /// Commits `rows` rows of ~3 KB, about a frame each.
    fn commit(c: &mut Connection, k: &mut WalKeeper, rows: usize) -> i32 {
        let tx = c.transaction().unwrap();
        for _ in 0..rows {
            tx.execute("INSERT INTO t(v) VALUES(zeroblob(3000))", [])
                .unwrap();
        }
        tx.commit().unwrap();
        k.committed(c);
        k.frames.load(Ordering::Acquire)
    }

    #[test]
    fn commits_leave_the_copy_to_an_idle_moment() {
        let (_d, _, mut c, mut k) = setup();
        let mut frames = 0;
        while frames < CHECKPOINT_FRAMES / 2 {
            frames = commit(&mut c, &mut k, 10);
        }
        // Below the threshold an idle moment copies nothing: the log keeps growing.
        k.idle(&c);
        let grown = commit(&mut c, &mut k, 1);
        assert!(grown > frames, "{grown} frames after {frames}");
        while frames < CHECKPOINT_FRAMES + 100 {
            frames = commit(&mut c, &mut k, 10);
        }
        // Past it, commits alone did not checkpoint (SQLite's automatic checkpoint would
        // have restarted the log at 1,000)...
        assert!(frames > CHECKPOINT_FRAMES, "{frames}");
        // ...the idle moment does, and the next commit starts the log from its beginning.
        k.idle(&c);
        let after = commit(&mut c, &mut k, 1);
        assert!(
            after < 10,
            "the log holds {after} frames after the idle checkpoint"
        );
    }

    #[test]
    fn a_writer_that_is_never_idle_still_bounds_the_log() {
        let (d, p, mut c, mut k) = setup();
        // ~3 frames a commit: without a checkpoint the log would reach ~12,000 frames.
        let mut largest = 0;
        for _ in 0..4_000 {
            largest = largest.max(commit(&mut c, &mut k, 2));
        }
        assert!(
            largest <= WAL_MAX_FRAMES + 10,
            "the log reached {largest} frames"
        );
        let wal = std::fs::metadata(d.path().join("t.db-wal")).unwrap().len();
        assert!(
            wal <= (WAL_MAX_FRAMES as u64 + 10) * (4096 + 24) + 32,
            "{wal} bytes"
        );
        let rows: i64 = Connection::open(&p)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 8_000);
    }

    #[test]
    fn a_reader_holding_old_frames_is_not_retried_at_every_idle_moment() {
        let (_d, p, mut c, mut k) = setup();
        commit(&mut c, &mut k, 1);
        let mut r = Connection::open(&p).unwrap();
        let snapshot = r.transaction().unwrap();
        let _: i64 = snapshot
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let mut frames = 0;
        while frames < CHECKPOINT_FRAMES {
            frames = commit(&mut c, &mut k, 10);
        }
        k.idle(&c);
        assert_eq!(k.checkpoints, 1);
        // The reader kept the log from restarting; until new frames come, no retry.
        k.idle(&c);
        k.idle(&c);
        assert_eq!(k.checkpoints, 1, "retried with nothing new to copy");
        snapshot.commit().unwrap();
        let more = commit(&mut c, &mut k, 1);
        assert!(more > frames);
        k.idle(&c);
        assert_eq!(k.checkpoints, 2, "new frames are worth another try");
        assert!(
            commit(&mut c, &mut k, 1) < 10,
            "the reader is gone: restarted"
        );
    }
}
