//! Durable lease store.
//!
//! Owns: what survives a crash. [`Store`] is the interface the issuance path writes through
//! (a PostgreSQL backend can implement it for several replicas); [`SqliteStore`] is the
//! embedded default: SQLite in WAL mode with `synchronous=FULL`, written by one thread that
//! commits everything queued since its last commit in one transaction (group commit), so a
//! sync is shared by every request waiting on it. A submit resolves only after its commit
//! has returned, i.e. after the data is on disk. The bundled SQLite is built with
//! `HAVE_FDATASYNC` (`.cargo/config.toml`): its default, `fsync()`, also made the log's new
//! mtime durable, on a journaled ext4 one more device write and flush per commit. The writer
//! copies the WAL into the database file when it has nothing to commit, not inside a commit
//! ([`super::checkpoint`]).
//!
//! Each audit record is committed in the same transaction as the change it describes (table
//! `audit_pending`), together with the chain head, so one sync makes both durable and a
//! truncated audit tail is detectable. After the commit the records are appended to the audit
//! file before anyone is answered; a sync thread fdatasyncs the file at most every
//! [`AUDIT_SYNC_INTERVAL`] and the rows it covers are then deleted. A crash between the commit
//! and that sync loses nothing: at open, committed records missing from the file are appended.
//! (Syncing the file on the request path doubled the fsyncs per batch; because the file grows,
//! its fdatasync also writes the inode (on ext4 with a journal, a journal commit), which made
//! it the slower and the spikier of the two.)
//!
//! A kill is stored as one row in `kills` rather than an update of every lease it revokes:
//! at load, a lease issued before a kill that covers its identity is revoked. That keeps the
//! kill switch O(1) on disk however many leases the identity holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{oneshot, watch};

use super::checkpoint::WalKeeper;
use super::{Kill, Kind, Lease, LeaseId, Revocation, State, Task};
use crate::audit::{self, AuditWriter, Event};
use crate::metrics::Histogram;

/// Store failures. Issuance maps them to `Unavailable`: nothing is handed out unrecorded.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Database error.
    #[error("lease store: {0}")]
    Db(String),
    /// Audit log error.
    #[error("audit log: {0}")]
    Audit(String),
    /// The writer has stopped (shutdown or a fatal error).
    #[error("lease store is closed")]
    Closed,
    /// `COMMIT` itself failed (an I/O error, a full disk): the change may be on disk or not.
    /// SQLite rolls the transaction back in memory, yet frames it wrote to the WAL can still
    /// be replayed after a crash, so the change was neither made nor refused for sure. The
    /// writer stops, and the daemon with it: at the next start what is on disk is the truth.
    #[error("lease store: a commit failed and its outcome is unknown until restart: {0}")]
    Uncertain(String),
    /// At start-up: the audit log holds committed events the store lacks.
    #[error("{0}")]
    OlderThanAudit(String),
}

/// One durable change.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert a lease.
    PutLease(Lease),
    /// Mark leases revoked.
    Revoke(Vec<LeaseId>, Revocation),
    /// Forget leases (expired).
    Delete(Vec<LeaseId>),
    /// Add to the kill list.
    Kill(Kill),
    /// Take off the kill list.
    Restore {
        /// Identity.
        spiffe_id: String,
        /// Unix ms.
        at_ms: i64,
        /// Actor label.
        by: String,
    },
    /// Create or replace a stored entry (JSON of the entry spec).
    PutEntry {
        /// Entry id.
        id: String,
        /// JSON.
        spec: String,
    },
    /// Delete a stored entry.
    DeleteEntry(String),
    /// A task's first use: it belongs to `agent` from now on.
    PutTask(Task),
    /// Forget task records (past retention, no lease of them held).
    DeleteTasks(Vec<Arc<str>>),
    /// A task was completed: its leases are revoked and it gets no more.
    CompleteTask {
        /// Task id.
        id: String,
        /// Unix ms.
        at_ms: i64,
        /// Actor label.
        by: String,
    },
    /// An entry issued a credential or was reviewed at `at_ms` (inventory idleness).
    EntryActive {
        /// Entry id.
        id: String,
        /// Unix ms.
        at_ms: i64,
    },
    /// Append an audit record.
    Audit(Event),
    /// Once this batch is committed, copy the whole log into the database file and empty it
    /// (the last batch of a clean stop): the database file alone is then the store, so a
    /// copy of it taken without its `-wal` file lacks nothing.
    Checkpoint,
}

/// What [`Store::load`] restores at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// How many leases (not yet expired, kills applied) were handed to the sink.
    pub restored: usize,
    /// Ids of leases found expired (to delete).
    pub expired: Vec<LeaseId>,
    /// The kill list.
    pub kills: Vec<Kill>,
    /// Stored entries `(id, spec JSON)`.
    pub entries: Vec<(String, String)>,
    /// Every stored task record (the task-pruner forgets those past retention).
    pub tasks: Vec<Task>,
    /// Last activity per entry id, Unix ms.
    pub entry_activity: Vec<(String, i64)>,
    /// Audit chain head `(next seq, last hash)` as of the last commit.
    pub audit_head: Option<(u64, String)>,
    /// The `seq` of the latest kill ever recorded ([`super::Lease::kill_epoch`]).
    pub kill_epoch: u32,
}

/// The durability interface of the issuance path.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Queues `ops` to be committed together; the receiver resolves once they are durable.
    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>>;
}

/// Commits `ops` and waits until they are durable.
pub async fn commit(store: &dyn Store, ops: Vec<Op>) -> Result<(), StoreError> {
    store.submit(ops).await.unwrap_or(Err(StoreError::Closed))
}

/// Commits `ops`, which issue the leases `ids`, and waits until they are durable. A caller
/// that goes away while the commit is in flight (hyper drops a handler's future when its
/// client resets the stream) never got the credentials: once the commit lands, their leases
/// are deleted again with an audit record saying why, instead of staying stored as active
/// leases that memory never held and that the next start would bring back.
pub async fn commit_issue(
    store: &Arc<dyn Store>,
    ops: Vec<Op>,
    ids: Vec<LeaseId>,
) -> Result<(), StoreError> {
    let mut pending = Unanswered {
        rx: Some(store.submit(ops)),
        ids,
        store: Arc::clone(store),
    };
    let rx = pending.rx.as_mut().expect("set above");
    let r = rx.await.unwrap_or(Err(StoreError::Closed));
    // No await from here: once answered, dropping the guard does nothing.
    pending.rx = None;
    r
}

/// An issuance commit nobody has waited out yet; see [`commit_issue`].
struct Unanswered {
    rx: Option<oneshot::Receiver<Result<(), StoreError>>>,
    ids: Vec<LeaseId>,
    store: Arc<dyn Store>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(rx) = self.rx.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (ids, store) = (std::mem::take(&mut self.ids), Arc::clone(&self.store));
        rt.spawn(async move {
            if !matches!(rx.await, Ok(Ok(()))) {
                return;
            }
            let ev = Event::now("withdraw", audit::Actor::Daemon)
                .detail(
                    "leases",
                    ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                )
                .reason("the caller went away before the credentials were handed out");
            if let Err(e) = commit(&*store, vec![Op::Delete(ids), Op::Audit(ev)]).await {
                tracing::warn!(error = %e, "cannot withdraw the leases of an unanswered issuance; they stay until they expire");
            }
        });
    }
}

type Job = (Vec<Op>, oneshot::Sender<Result<(), StoreError>>);

/// A store whose commits land when the test says (tests of the store and the issuance path).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) jobs: Mutex<Vec<Job>>,
}

#[cfg(test)]
impl Store for Held {
    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.jobs.lock().unwrap().push((ops, tx));
        rx
    }
}

/// SQLite (WAL) lease store with a single group-committing writer thread.
#[derive(Debug)]
pub struct SqliteStore {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
    commits: Arc<Histogram>,
    failed: watch::Receiver<Option<String>>,
}

/// A hook run at every `COMMIT`; `true` turns it into a failure (tests inject I/O errors).
type CommitHook = Box<dyn FnMut() -> bool + Send + 'static>;

/// A commit (with the checkpoint or audit append that precedes the answers) slower than this
/// is logged: every credential of its batch waited that long.
/// On the bench VM commits take ~0.2 ms; the rare 30-120 ms ones were the disk's flush.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// At most one slow-commit warning per this interval, counting the ones in between, so a
/// failing disk does not flood the log.
const SLOW_COMMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Most operations one transaction takes before committing, so a huge backlog still sees
/// acknowledgements in bounded time.
const MAX_BATCH_OPS: usize = 50_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leases(
  id BLOB PRIMARY KEY, kind INTEGER NOT NULL, spiffe_id TEXT NOT NULL, entry_id TEXT NOT NULL,
  uid INTEGER NOT NULL, pid INTEGER NOT NULL, exe TEXT, task_id TEXT,
  issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, serial BLOB,
  state INTEGER NOT NULL, revoked_at INTEGER, revoked_by TEXT, reason TEXT, kill_epoch INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kills(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, spiffe_id TEXT NOT NULL, killed_at INTEGER NOT NULL,
  killed_by TEXT NOT NULL, reason TEXT NOT NULL, restored_at INTEGER, restored_by TEXT
);
CREATE TABLE IF NOT EXISTS entries(id TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks(
  id TEXT PRIMARY KEY, agent TEXT NOT NULL, created_ms INTEGER NOT NULL,
  completed_ms INTEGER, completed_by TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry_activity(id TEXT PRIMARY KEY, active_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_pending(seq INTEGER PRIMARY KEY, line BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_rejected(
  seq INTEGER NOT NULL, line BLOB NOT NULL, rejected_ms INTEGER NOT NULL
);
";

/// How often the audit file is fdatasync'd in the background. Records are durable in the store
/// from their commit; this only bounds how many wait there to be deleted.
pub const AUDIT_SYNC_INTERVAL: Duration = Duration::from_millis(50);

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A lease row whose `column` holds no value this daemon knows: named, so that an operator can
/// look at it (`sqlite3 tessera.db "SELECT * FROM leases WHERE id = X'…'"`).
fn bad_row(id: LeaseId, column: &str) -> StoreError {
    StoreError::Db(format!(
        "lease {id} (id X'{}') has an unknown {column}; it was written by another version or \
         edited by hand",
        hex::encode(id.0)
    ))
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the checkpoint of a clean stop waits for readers.
const FINAL_CHECKPOINT_WAIT: Duration = Duration::from_millis(500);

fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    // FULL: the WAL is synced at every commit, so an acknowledged lease survives power loss.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;",
    )
    .map_err(db_err)?;
    conn.execute_batch(SCHEMA).map_err(db_err)?;
    // Stores made before kill epochs: their leases keep a NULL epoch, judged by time.
    let has_epoch = conn
        .prepare("SELECT 1 FROM pragma_table_info('leases') WHERE name = 'kill_epoch'")
        .and_then(|mut st| st.exists([]))
        .map_err(db_err)?;
    if !has_epoch {
        conn.execute_batch("ALTER TABLE leases ADD COLUMN kill_epoch INTEGER")
            .map_err(db_err)?;
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    // A store the previous version wrote to since (a rollback and back) has bare ids again.
    let bare = conn
        .prepare("SELECT 1 FROM tasks WHERE instr(id, '/') = 0 LIMIT 1")
        .and_then(|mut st| st.exists([]))
        .map_err(db_err)?;
    if version < 1 || bare {
        // Version 1 names a task `<agent>/task/<id>` (task ids became each agent's own); the
        // version before keyed it by the bare id, which has no '/'. Renamed with the leases
        // of it: a task token's lease names the agent, a task X.509-SVID's is already the
        // full name. A task the previous version recorded beside its full-named record (a
        // rollback) is one task: the two are merged, a completion from either kept, and the
        // load then revokes whatever a completed task still holds.
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             UPDATE leases SET task_id = coalesce(
               (SELECT t.agent || '/task/' || t.id FROM tasks t WHERE t.id = leases.task_id
                  AND leases.spiffe_id IN (t.agent, t.agent || '/task/' || t.id)),
               CASE WHEN substr(spiffe_id, -length('/task/' || task_id)) = '/task/' || task_id
                    THEN spiffe_id ELSE spiffe_id || '/task/' || task_id END)
             WHERE task_id IS NOT NULL AND instr(task_id, '/') = 0;
             UPDATE tasks AS f SET
               completed_ms = coalesce(f.completed_ms, b.completed_ms),
               completed_by = coalesce(f.completed_by, b.completed_by),
               created_ms = min(f.created_ms, b.created_ms)
             FROM tasks AS b
             WHERE instr(b.id, '/') = 0 AND f.id = b.agent || '/task/' || b.id;
             DELETE FROM tasks WHERE instr(id, '/') = 0
               AND agent || '/task/' || id IN (SELECT id FROM tasks);
             UPDATE tasks SET id = agent || '/task/' || id WHERE instr(id, '/') = 0;
             PRAGMA user_version = 1;
             COMMIT;",
        )
        .map_err(db_err)?;
    }
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating, 0600) `dir/tessera.db` and `dir/audit.jsonl`, loads the snapshot, and
    /// starts the writer thread.
    pub fn open(
        dir: &Path,
        audit_max_bytes: u64,
        now_s: i64,
        sink: &mut dyn FnMut(Vec<Lease>),
    ) -> Result<(Self, Snapshot), StoreError> {
        Self::open_with(dir, audit_max_bytes, now_s, sink, None)
    }

    fn open_with(
        dir: &Path,
        audit_max_bytes: u64,
        now_s: i64,
        sink: &mut dyn FnMut(Vec<Lease>),
        commit_hook: Option<CommitHook>,
    ) -> Result<(Self, Snapshot), StoreError> {
        let path = dir.join("tessera.db");
        if !path.exists() {
            // Create with owner-only permissions before SQLite touches it.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(db_err)?;
        }
        let mut conn = open_db(&path)?;
        let mut snapshot = load(&conn, now_s, sink)?;
        let mut audit = AuditWriter::open(&dir.join("audit.jsonl"), audit_max_bytes)
            .map_err(|e| StoreError::Audit(e.to_string()))?;
        recover_audit(&conn, &mut audit, snapshot.audit_head.as_ref())?;
        snapshot.audit_head = Some((audit.head().0, audit.head().1.to_owned()));
        if commit_hook.is_some() {
            conn.commit_hook(commit_hook).map_err(db_err)?;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let commits = Arc::new(Histogram::default());
        let timed = Arc::clone(&commits);
        let (fail, failed) = watch::channel(None);
        std::thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || writer(conn, audit, rx, &timed, &fail))
            .map_err(db_err)?;
        Ok((
            Self {
                tx,
                path,
                commits,
                failed,
            },
            snapshot,
        ))
    }

    /// Becomes `Some(reason)` once the writer has stopped on a commit of unknown outcome
    /// ([`StoreError::Uncertain`]); the daemon must then stop and start again from the disk.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durations of the writer's commits, for the metrics.
    pub fn commit_durations(&self) -> Arc<Histogram> {
        Arc::clone(&self.commits)
    }
}

impl Store for SqliteStore {
    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::SendError((_, done))) = self.tx.send((ops, done)) {
            let _ = done.send(Err(StoreError::Closed));
        }
        rx
    }
}

/// Appends committed audit records that the file lost (the daemon stopped between a commit
/// and the file's sync), syncs, and clears the rows the file now holds.
///
/// Records the file lacks and cannot get back (deleted beyond what the store still holds, or
/// stored rows that no longer continue the chain) are a gap: the chain goes on from the file,
/// an [`audit::GAP_EVENT`] record says what was missing, and the rows that could not be
/// appended move to `audit_rejected`, where later records cannot overwrite them.
fn recover_audit(
    conn: &Connection,
    audit: &mut AuditWriter,
    recorded: Option<&(u64, String)>,
) -> Result<(), StoreError> {
    // Records the file holds but whose sync was never confirmed: after a failed fdatasync the
    // file can lack some while a later sync succeeded. Where it differs from the store, the
    // store's copies are written again (they are the ones committed).
    let unconfirmed: Vec<(u64, Vec<u8>)> = conn
        .prepare("SELECT seq, line FROM audit_pending WHERE seq < ?1 ORDER BY seq")
        .and_then(|mut st| {
            st.query_map(params![audit.head().0 as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get_ref(1)?
                        .as_bytes()
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default(),
                ))
            })?
            .collect()
        })
        .map_err(db_err)?;
    match audit
        .rewrite_unsynced(&unconfirmed)
        .map_err(|e| StoreError::Audit(e.to_string()))?
    {
        audit::Unsynced::Intact => {}
        audit::Unsynced::Rewritten(n) => tracing::warn!(
            records = n,
            "the audit file differed from the store's copies of records whose sync was never \
             confirmed (a failed fdatasync, then a crash); wrote them again from the store"
        ),
        audit::Unsynced::Unchecked(why) => tracing::error!(
            records = unconfirmed.len(),
            why,
            "records whose sync was never confirmed could not be compared with the audit \
             file; `tessera audit verify` tells whether it holds them"
        ),
    }
    let from = audit.head().0;
    let mut st = conn
        .prepare("SELECT seq, line FROM audit_pending WHERE seq >= ?1 ORDER BY seq")
        .map_err(db_err)?;
    let rows = st
        // Bytes whatever the column's type: an edited row must fail the record check, not the
        // start-up.
        .query_map(params![from as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get_ref(1)?
                    .as_bytes()
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(db_err)?;
    let mut appended = 0usize;
    let mut why = Vec::new();
    for (_, line) in &rows {
        if let Err(e) = audit.push_recovered(line) {
            why.push(format!(
                "a record the store committed does not continue the file ({e})"
            ));
            break;
        }
        appended += 1;
    }
    let audit_err = |e: audit::AuditError| StoreError::Audit(e.to_string());
    audit.flush().map_err(audit_err)?;
    if appended > 0 {
        tracing::warn!(
            records = appended,
            "appended committed audit records the file lost in a crash"
        );
    }
    let rejected = &rows[appended..];
    let (file_seq, file_hash) = audit.head();
    if let Some((seq, hash)) = recorded
        && (file_seq < *seq || (file_seq == *seq && file_hash != hash))
    {
        why.push(format!(
            "the file holds {file_seq} records but the store recorded {seq} with a different last record: records were deleted or replaced"
        ));
    } else if let Some((seq, hash)) = recorded
        && file_seq > *seq
        && *seq > 0
        // A record in no file present (its rotated file archived) cannot be compared: the
        // check below, of what the files hold past the head, decides then.
        && audit::hash_of(audit.path(), seq - 1).is_some_and(|h| h != *hash)
    {
        // More records than committed is legitimate only past the committed head; a rewritten
        // history padded beyond it must not be taken over (and its head committed).
        why.push(format!(
            "the file holds {file_seq} records, more than the {seq} the store recorded, but record {} is not the one the store recorded: records were replaced",
            seq - 1
        ));
    }
    let store_seq = recorded.map_or(0, |r| r.0);
    if why.is_empty() && file_seq > store_seq {
        // The file goes on past what the store committed. Records reach the file only after
        // their commit, so past the one gap record written below before its own commit, this
        // is a store older than the log: restored from a copy, or its WAL lost or damaged
        // (SQLite drops a damaged commit and every later one without a word). Serving from it
        // would lift the kills and revocations it lacks.
        let (mut beyond, files) = audit::events_from(audit.path(), store_seq);
        beyond.remove(audit::GAP_EVENT);
        if !beyond.is_empty() {
            let events: Vec<String> = beyond.iter().map(|(e, n)| format!("{n} {e}")).collect();
            let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            return Err(StoreError::OlderThanAudit(format!(
                "the lease store is older than the audit log: the log holds records \
                 {store_seq}..{} that the store never committed ({}); serving from this store \
                 would lift every kill and revocation among them. Put back the store that \
                 wrote them (tessera.db with its tessera.db-wal), or, to start from this store \
                 anyway, move away the audit files that hold them ({}; `tessera audit verify \
                 FILE` still checks each) and repeat those kills and revocations. If nobody \
                 restored the store, the records may have been added to the log by hand: \
                 `tessera audit verify` then reports them as past the committed head",
                file_seq - 1,
                events.join(", "),
                files.join(", ")
            )));
        }
    }
    let tx = conn.unchecked_transaction().map_err(db_err)?;
    if !why.is_empty() {
        let why = why.join("; ");
        tracing::error!(
            recorded = recorded.map(|r| r.0),
            in_file = file_seq,
            rejected = rejected.len(),
            "audit log lacks committed records: {why}; run `tessera audit verify`"
        );
        let ev = Event::now(audit::GAP_EVENT, audit::Actor::Daemon)
            .reason(why)
            .detail("recorded_records", recorded.map(|r| r.0))
            .detail("file_records", file_seq)
            .detail("rejected_records", rejected.len());
        audit.push(&ev);
        audit.flush().map_err(audit_err)?;
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let mut keep = tx
            .prepare("INSERT INTO audit_rejected(seq, line, rejected_ms) VALUES (?1, ?2, ?3)")
            .map_err(db_err)?;
        for (seq, line) in rejected {
            keep.execute(params![seq, line, now_ms as i64])
                .map_err(db_err)?;
        }
        drop(keep);
        tx.execute(
            "DELETE FROM audit_pending WHERE seq >= ?1",
            params![from as i64],
        )
        .map_err(db_err)?;
        let (seq, hash) = audit.head();
        tx.execute(
            "INSERT OR REPLACE INTO meta(key,value) VALUES('audit_head', ?1)",
            params![format!("{seq} {hash}")],
        )
        .map_err(db_err)?;
    }
    tx.execute(
        "DELETE FROM audit_pending WHERE seq < ?1",
        params![audit.head().0 as i64],
    )
    .map_err(db_err)?;
    tx.commit().map_err(db_err)
}

/// Background fdatasync of the audit file: the writer asks for everything it has appended to
/// be synced, and learns from `synced` which records the file now holds durably.
#[derive(Debug, Default)]
struct AuditSync {
    want: Mutex<Option<(Arc<std::fs::File>, u64)>>,
    wake: Condvar,
    /// Every record with a lower `seq` is durable in the audit files.
    synced: AtomicU64,
    /// An fdatasync failed. Linux reports a write-back error once and may drop the pages it
    /// could not write, so a later fdatasync can succeed without them: from the first failure
    /// on, nothing counts as synced, and the store keeps every record for the next start to
    /// write again ([`AuditWriter::rewrite_unsynced`]).
    failed: std::sync::atomic::AtomicBool,
}

impl AuditSync {
    fn request(&self, file: Arc<std::fs::File>, upto: u64) {
        *self.want.lock().unwrap_or_else(|e| e.into_inner()) = Some((file, upto));
        self.wake.notify_one();
    }

    /// Runs until `stop` is set. Requests that arrive while a sync runs or during the
    /// interval after it are merged into one.
    fn run(&self, stop: &std::sync::atomic::AtomicBool) {
        loop {
            let (file, upto) = {
                let mut want = self.want.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(w) = want.take() {
                        break w;
                    }
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    want = self
                        .wake
                        .wait_timeout(want, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            match file.sync_data() {
                Ok(()) if !self.failed.load(Ordering::Acquire) => {
                    self.synced.fetch_max(upto, Ordering::AcqRel);
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(error = %e, "audit log fdatasync failed");
                    self.failed.store(true, Ordering::Release);
                }
            }
            std::thread::sleep(AUDIT_SYNC_INTERVAL);
        }
    }
}

fn writer(
    mut conn: Connection,
    mut audit: AuditWriter,
    rx: mpsc::Receiver<Job>,
    commits: &Histogram,
    fail: &watch::Sender<Option<String>>,
) {
    let sync = Arc::new(AuditSync::default());
    sync.synced.store(audit.head().0, Ordering::Release);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let (sync, stop) = (Arc::clone(&sync), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("tessera-audit-sync".into())
            .spawn(move || sync.run(&stop))
    };
    if let Err(e) = &syncer {
        // Without it records still reach the file and stay in the store until the next start.
        tracing::error!(error = %e, "cannot start the audit sync thread");
    }
    // Without it SQLite's automatic checkpoint stays on, inside the commits.
    let mut wal = WalKeeper::start(&mut conn)
        .map_err(|e| tracing::error!(error = %e, "cannot take over the lease store's checkpoints"))
        .ok();
    let mut cleared = audit.head().0;
    let mut slow = SlowCommits::default();
    // The chain's only anchor is the head in this store, beside the file: whoever can edit
    // both can rewrite history. The head also goes to the daemon's log every few minutes
    // (forwarded off the host by journald or syslog, it is an anchor they cannot edit).
    // Logged at start, at most every few minutes while records come, once more when they
    // stop coming (not only at the next commit), and at a clean stop: records written just
    // before a stop or a quiet spell are anchored too.
    let mut head_log = HeadLog::default();
    head_log.log(&audit);
    let mut uncertain = false;
    loop {
        let first = match rx.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                // Nothing waits for a commit: the moment to copy the log into the database.
                if let Some(w) = &mut wal {
                    w.idle(&conn);
                }
                let next = loop {
                    let Some(wait) = head_log.due_in(&audit) else {
                        break rx.recv().ok();
                    };
                    match rx.recv_timeout(wait) {
                        Ok(job) => break Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => head_log.log(&audit),
                        Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                    }
                };
                let Some(job) = next else { break };
                job
            }
        };
        let mut jobs = vec![first];
        let mut n = jobs[0].0.len();
        while n < MAX_BATCH_OPS {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.0.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let synced = sync.synced.load(Ordering::Acquire);
        let clear = (synced > cleared).then_some(synced);
        // Timed from here to the answers: the commit, a forced checkpoint and the audit
        // append all come before anyone in the batch is answered.
        let started = std::time::Instant::now();
        let mark = audit.mark();
        let result = apply(&mut conn, &mut audit, &jobs, clear);
        if result.is_err() {
            // Rolled back: its records must not reach the file (they would tell of issues,
            // kills and revocations that never happened, and push later, committed records
            // out of line at the next start).
            audit.rollback(mark);
        }
        if let Some(w) = &mut wal {
            w.committed(&conn);
        }
        match &result {
            Ok(()) => cleared = clear.unwrap_or(cleared),
            Err(e) => tracing::error!(error = %e, ops = n, "lease store commit failed"),
        }
        // Committed records reach the file before anyone is answered, so a reader of the
        // file sees every acknowledged event.
        match audit.write() {
            Ok(()) => sync.request(audit.file(), audit.head().0),
            // They stay in the store and are retried with the next batch.
            Err(e) => tracing::error!(error = %e, "audit log append failed"),
        }
        let audit_unsynced = sync.failed.load(Ordering::Acquire) || audit.sync_failed();
        let stopping = jobs
            .iter()
            .any(|(ops, _)| ops.iter().any(|o| matches!(o, Op::Checkpoint)));
        if result.is_ok() && stopping {
            // A reader of the database (a backup, an operator's sqlite3 shell) makes the
            // truncation wait: briefly, well inside the shutdown's drain deadline, then the
            // log is left for the next start to replay.
            let _ = conn.busy_timeout(FINAL_CHECKPOINT_WAIT);
            match conn.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::TRUNCATE) {
                Ok(_) => tracing::debug!("lease store log copied into the database"),
                Err(e) => tracing::info!(
                    error = %e,
                    "lease store: the log was not emptied at stop (a reader holds the \
                     database); the next start replays it"
                ),
            }
            let _ = conn.busy_timeout(BUSY_TIMEOUT);
        }
        let took = started.elapsed();
        commits.observe(took);
        slow.record(took, jobs.len());
        // The daemon's last commit (its shutdown's checkpoint) may be the last thing this
        // thread does before the process exits: the head is logged with it.
        if result.is_ok() && (stopping || head_log.due_in(&audit) == Some(Duration::ZERO)) {
            head_log.log(&audit);
        }
        for (_, done) in jobs {
            let _ = done.send(result.clone());
        }
        if audit_unsynced {
            // The file may now miss records the disk never got, and no later sync can tell.
            // The store keeps them (nothing counts as synced any more); the next start writes
            // them to the file again. Until then no more records are made.
            let e = "the audit log could not be synced to disk (fdatasync failed); the daemon \
                     stops, and at the next start writes the records the file may have lost \
                     again from the lease store"
                .to_owned();
            tracing::error!("{e}");
            uncertain = true;
            fail.send_replace(Some(e));
            break;
        }
        if let Err(StoreError::Uncertain(e)) = result {
            // Memory now holds the change as refused while the disk may hold it as made.
            // Going on would serve from one and restart into the other (a restore reported
            // failed that comes back in force after a crash); nor could a later commit be
            // trusted on a disk that just failed one. Stop taking changes; the daemon stops.
            tracing::error!(
                error = %e,
                "lease store commit failed with an unknown outcome; the store takes no more \
                 changes and the daemon stops, to start again from what the disk holds"
            );
            uncertain = true;
            fail.send_replace(Some(e));
            break;
        }
    }
    // Shutdown: leave the file complete and durable so the store holds nothing for it.
    stop.store(true, Ordering::Release);
    sync.wake.notify_one();
    // After an uncertain commit the database is left as it is for the next start to read;
    // after a failed sync of the audit file, a sync now could succeed without what was lost.
    let unsynced = sync.failed.load(Ordering::Acquire) || audit.sync_failed();
    if !unsynced && audit.flush().is_ok() && !uncertain {
        let _ = conn.execute(
            "DELETE FROM audit_pending WHERE seq < ?1",
            params![audit.head().0 as i64],
        );
        head_log.log(&audit);
    }
}

/// How often, at most, the audit chain head is written to the daemon's log.
const HEAD_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// When the audit chain head was last written to the daemon's log, and which.
#[derive(Default)]
struct HeadLog {
    at: Option<std::time::Instant>,
    records: u64,
}

impl HeadLog {
    /// Writes the head, unless it is the one last written (or the chain is empty).
    fn log(&mut self, audit: &AuditWriter) {
        let (records, hash) = audit.head();
        if records > self.records {
            tracing::info!(records, head = hash, "audit chain head");
            self.records = records;
            self.at = Some(std::time::Instant::now());
        }
    }

    /// How long until a head not yet written is due; `None` when there is none.
    fn due_in(&self, audit: &AuditWriter) -> Option<Duration> {
        (audit.head().0 > self.records).then(|| {
            self.at.map_or(Duration::ZERO, |t| {
                HEAD_LOG_INTERVAL.saturating_sub(t.elapsed())
            })
        })
    }
}

/// Rate-limited warnings about commits slower than [`SLOW_COMMIT`].
#[derive(Default)]
struct SlowCommits {
    last_warned: Option<std::time::Instant>,
    unreported: u64,
}

impl SlowCommits {
    fn record(&mut self, took: Duration, waiting: usize) {
        if took <= SLOW_COMMIT {
            return;
        }
        self.unreported += 1;
        if self
            .last_warned
            .is_some_and(|t| t.elapsed() < SLOW_COMMIT_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            ms = took.as_millis() as u64,
            waiting,
            slow_commits = self.unreported,
            "slow lease store commit: the requests of its batch waited for the disk \
             (slow_commits counts this one and those not reported since the last warning)"
        );
        self.last_warned = Some(std::time::Instant::now());
        self.unreported = 0;
    }
}

/// Commits `jobs` in one transaction with their audit records. `clear_below`: audit records
/// the file now holds durably, to delete from the store.
fn apply(
    conn: &mut Connection,
    audit: &mut AuditWriter,
    jobs: &[Job],
    clear_below: Option<u64>,
) -> Result<(), StoreError> {
    let tx = CachedTx::begin(conn)?;
    let mut audited = false;
    {
        let mut pend = tx
            .prepare_cached("INSERT OR REPLACE INTO audit_pending(seq,line) VALUES(?1,?2)")
            .map_err(db_err)?;
        let mut put = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO leases(id,kind,spiffe_id,entry_id,uid,pid,exe,task_id,issued_at,expires_at,serial,state,revoked_at,revoked_by,reason,kill_epoch)
                 VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
            )
            .map_err(db_err)?;
        let mut revoke = tx
            .prepare_cached("UPDATE leases SET state=?2, revoked_at=?3, revoked_by=?4, reason=?5 WHERE id=?1 AND state=?6")
            .map_err(db_err)?;
        // Not a revoked certificate still within its time kept past expiry: a revocation that
        // committed while the reaper retired the lease at its expiry must stay, for a CRL dated
        // after the expiry to list it (the retirement a day later deletes it).
        let mut delete = tx
            .prepare_cached(
                "DELETE FROM leases WHERE id=?1 \
                 AND NOT (state=?2 AND serial IS NOT NULL AND expires_at + ?3 > ?4)",
            )
            .map_err(db_err)?;
        let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
        for (ops, _) in jobs {
            for op in ops {
                match op {
                    Op::PutLease(l) => {
                        let r = l.revocation.as_deref();
                        put.execute(params![
                            &l.id.0[..],
                            l.kind as u8,
                            &*l.spiffe_id,
                            &*l.entry_id,
                            l.uid,
                            l.pid,
                            l.exe.as_deref(),
                            l.task_id.as_deref(),
                            l.issued_at,
                            l.expires_at,
                            l.serial.as_ref().map(|s| &s[..]),
                            l.state as u8,
                            r.map(|r| r.at_ms),
                            r.map(|r| r.by.as_str()),
                            r.map(|r| r.reason.as_str()),
                            l.kill_epoch,
                        ])
                        .map_err(db_err)?;
                    }
                    Op::Revoke(ids, r) => {
                        for id in ids {
                            revoke
                                .execute(params![
                                    &id.0[..],
                                    State::Revoked as u8,
                                    r.at_ms,
                                    r.by,
                                    r.reason,
                                    State::Active as u8
                                ])
                                .map_err(db_err)?;
                        }
                    }
                    Op::Delete(ids) => {
                        for id in ids {
                            delete
                                .execute(params![
                                    &id.0[..],
                                    State::Revoked as u8,
                                    super::REVOKED_KEPT_AFTER_EXPIRY_S,
                                    now_s
                                ])
                                .map_err(db_err)?;
                        }
                    }
                    Op::Kill(k) => {
                        tx.execute(
                            "INSERT INTO kills(seq,spiffe_id,killed_at,killed_by,reason) VALUES(?1,?2,?3,?4,?5)",
                            params![k.seq, k.spiffe_id, k.at_ms, k.by, k.reason],
                        )
                        .map_err(db_err)?;
                    }
                    Op::Restore {
                        spiffe_id,
                        at_ms,
                        by,
                    } => {
                        tx.execute(
                            "UPDATE kills SET restored_at=?2, restored_by=?3 WHERE spiffe_id=?1 AND restored_at IS NULL",
                            params![spiffe_id, at_ms, by],
                        )
                        .map_err(db_err)?;
                    }
                    Op::PutEntry { id, spec } => {
                        tx.execute(
                            "INSERT OR REPLACE INTO entries(id,spec) VALUES(?1,?2)",
                            params![id, spec],
                        )
                        .map_err(db_err)?;
                    }
                    Op::DeleteEntry(id) => {
                        tx.execute("DELETE FROM entries WHERE id=?1", params![id])
                            .map_err(db_err)?;
                        tx.execute("DELETE FROM entry_activity WHERE id=?1", params![id])
                            .map_err(db_err)?;
                    }
                    Op::PutTask(t) => {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO tasks(id,agent,created_ms) VALUES(?1,?2,?3)",
                        )
                        .and_then(|mut st| st.execute(params![&*t.id, &*t.agent, t.created_ms]))
                        .map_err(db_err)?;
                    }
                    Op::DeleteTasks(ids) => {
                        let mut st = tx
                            .prepare_cached("DELETE FROM tasks WHERE id=?1")
                            .map_err(db_err)?;
                        for id in ids {
                            st.execute(params![&**id]).map_err(db_err)?;
                        }
                    }
                    Op::CompleteTask { id, at_ms, by } => {
                        tx.execute(
                            "UPDATE tasks SET completed_ms=?2, completed_by=?3 WHERE id=?1 AND completed_ms IS NULL",
                            params![id, at_ms, by],
                        )
                        .map_err(db_err)?;
                    }
                    Op::EntryActive { id, at_ms } => {
                        tx.prepare_cached(
                            "INSERT INTO entry_activity(id,active_ms) VALUES(?1,?2)
                             ON CONFLICT(id) DO UPDATE SET active_ms=max(active_ms, excluded.active_ms)",
                        )
                        .and_then(|mut st| st.execute(params![id, at_ms]))
                        .map_err(db_err)?;
                    }
                    Op::Audit(ev) => {
                        let seq = audit.head().0 as i64;
                        pend.execute(params![seq, audit.push(ev)]).map_err(db_err)?;
                        audited = true;
                    }
                    // After the commit, in the writer.
                    Op::Checkpoint => {}
                }
            }
        }
    }
    if let Some(below) = clear_below {
        tx.prepare_cached("DELETE FROM audit_pending WHERE seq < ?1")
            .and_then(|mut st| st.execute(params![below as i64]))
            .map_err(db_err)?;
    }
    if audited {
        let (seq, hash) = audit.head();
        tx.prepare_cached("INSERT OR REPLACE INTO meta(key,value) VALUES('audit_head', ?1)")
            .and_then(|mut st| st.execute(params![format!("{seq} {hash}")]))
            .map_err(db_err)?;
    }
    tx.commit()
}

/// The writer's transaction, with `BEGIN` and `COMMIT` as cached statements: rusqlite's
/// `transaction()` parses both anew for every commit, 1.2% of the daemon's time at full
/// load. Dropped uncommitted, it rolls back.
struct CachedTx<'c>(&'c Connection);

impl<'c> CachedTx<'c> {
    fn begin(conn: &'c Connection) -> Result<Self, StoreError> {
        conn.prepare_cached("BEGIN")
            .and_then(|mut st| st.raw_execute())
            .map_err(db_err)?;
        Ok(Self(conn))
    }

    fn commit(self) -> Result<(), StoreError> {
        self.0
            .prepare_cached("COMMIT")
            .and_then(|mut st| st.raw_execute())
            .map(drop)
            .map_err(|e| StoreError::Uncertain(e.to_string()))
        // A failed COMMIT leaves the transaction open: the drop rolls it back.
    }
}

impl std::ops::Deref for CachedTx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0
    }
}

impl Drop for CachedTx<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

/// One shared allocation per distinct string read at restore.
#[derive(Default)]
struct Interner(std::collections::HashSet<Arc<str>>);

impl Interner {
    /// `last` is the column's previous value: consecutive rows mostly repeat an entry, an
    /// executable and a task, and comparing with it skips hashing the string.
    fn get(&mut self, last: &mut Option<Arc<str>>, s: &str) -> Arc<str> {
        if let Some(a) = last
            && **a == *s
        {
            return Arc::clone(a);
        }
        let a = match self.0.get(s) {
            Some(a) => Arc::clone(a),
            None => {
                let a: Arc<str> = Arc::from(s);
                self.0.insert(Arc::clone(&a));
                a
            }
        };
        *last = Some(Arc::clone(&a));
        a
    }
}

/// Leases go to `sink` in chunks as they are read, so the caller can index one chunk while
/// the next is read.
fn load(
    conn: &Connection,
    now_s: i64,
    sink: &mut dyn FnMut(Vec<Lease>),
) -> Result<Snapshot, StoreError> {
    const CHUNK: usize = 32_768;
    let mut chunk: Vec<Lease> = Vec::with_capacity(CHUNK);
    let mut snap = Snapshot::default();
    // Kill history, oldest first: (seq, identity, killed_at ms, by, reason, still active).
    let mut history: Vec<(u32, String, i64, String, String, bool)> = Vec::new();
    {
        let mut st = conn
            .prepare("SELECT seq, spiffe_id, killed_at, killed_by, reason, restored_at IS NULL FROM kills ORDER BY seq")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .map_err(db_err)?;
        for r in rows {
            history.push(r.map_err(db_err)?);
        }
    }
    for (seq, id, at, by, reason, active) in &history {
        if *active {
            snap.kills.push(Kill {
                seq: *seq,
                spiffe_id: id.clone(),
                at_ms: *at,
                by: by.clone(),
                reason: reason.clone(),
            });
        }
    }
    // Every kill ever recorded, pruned ones included: new leases are stamped with it.
    snap.kill_epoch = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'kills'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .unwrap_or(0);
    // Each lease looks up its identity and the identities above it, instead of walking the
    // whole history: a start costs O(leases × path depth) however many kills were ever made.
    let mut kills_of: std::collections::HashMap<&str, Vec<(u32, i64, &str, &str)>> =
        std::collections::HashMap::new();
    for (seq, id, at, by, reason, _) in &history {
        kills_of
            .entry(id.as_str())
            .or_default()
            .push((*seq, *at, by.as_str(), reason.as_str()));
    }
    // The first kill of `spiffe_id` or an identity above it that came after the lease: by
    // kill epoch (exact, whatever the clocks did), or for a lease stored before epochs by
    // time (same second included: fails safe).
    let covering = |spiffe_id: &str, issued_at: i64, epoch: Option<u32>| {
        // "spiffe://td/a/b" is covered by kills of itself, "spiffe://td/a" and "spiffe://td".
        let above = spiffe_id
            .match_indices('/')
            .map(|(i, _)| i)
            .filter(|&i| i > "spiffe://".len())
            .map(|i| &spiffe_id[..i]);
        std::iter::once(spiffe_id)
            .chain(above)
            .filter_map(|k| {
                let v = kills_of.get(k)?;
                match epoch {
                    // In seq order: the first after the epoch.
                    Some(e) => v.get(v.partition_point(|k| k.0 <= e)),
                    None => v.iter().find(|k| k.1.div_euclid(1000) >= issued_at),
                }
            })
            .min_by_key(|k| k.0)
            .copied()
    };
    // A completed task keeps no active lease, even one whose revocation did not reach the
    // store (its commit is the task's completion and the revocations together; this only
    // backs that up).
    let completed: std::collections::HashMap<String, (i64, String)> = conn
        .prepare("SELECT id, completed_ms, coalesce(completed_by, '') FROM tasks WHERE completed_ms IS NOT NULL")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
                .collect()
        })
        .map_err(db_err)?;
    // The lowest kill epoch of any stored lease, and the earliest issue time of any stored
    // before epochs: a restored kill no stored lease precedes covers nothing stored, nor
    // anything issued later, so it is pruned.
    let mut min_epoch = u32::MAX;
    let mut min_issued_unstamped = i64::MAX;
    // Thousands of rows share an identity, entry and executable: intern from the borrowed
    // column text so that loading allocates each distinct string once.
    let mut interned = Interner::default();
    let [mut last_id, mut last_entry, mut last_exe, mut last_task] = [None, None, None, None];
    let mut st = conn
        .prepare(
            "SELECT id,kind,spiffe_id,entry_id,uid,pid,exe,task_id,issued_at,expires_at,serial,state,revoked_at,revoked_by,reason,kill_epoch FROM leases",
        )
        .map_err(db_err)?;
    let mut rows = st.query([]).map_err(db_err)?;
    while let Some(r) = rows.next().map_err(db_err)? {
        // Read in place: a Vec for the id cost an allocation and a free a row.
        let Ok(id) = <[u8; 16]>::try_from(r.get_ref(0).map_err(db_err)?.as_blob().map_err(db_err)?)
        else {
            continue;
        };
        let id = LeaseId(id);
        let issued_at: i64 = r.get(8).map_err(db_err)?;
        let epoch: Option<u32> = r.get(15).map_err(db_err)?;
        match epoch {
            Some(e) => min_epoch = min_epoch.min(e),
            None => min_issued_unstamped = min_issued_unstamped.min(issued_at),
        }
        let expires_at: i64 = r.get(9).map_err(db_err)?;
        if expires_at + super::REVOKED_KEPT_AFTER_EXPIRY_S <= now_s {
            snap.expired.push(id);
            continue;
        }
        let kind = Kind::from_u8(r.get(1).map_err(db_err)?).ok_or_else(|| bad_row(id, "kind"))?;
        let mut state =
            State::from_u8(r.get(11).map_err(db_err)?).ok_or_else(|| bad_row(id, "state"))?;
        let spiffe_id: &str = r.get_ref(2).map_err(db_err)?.as_str().map_err(db_err)?;
        let task_id = r
            .get_ref(7)
            .map_err(db_err)?
            .as_str_or_null()
            .map_err(db_err)?;
        let mut revocation = match r.get::<_, Option<i64>>(12).map_err(db_err)? {
            Some(at_ms) => Some(Arc::new(Revocation {
                at_ms,
                by: r
                    .get::<_, Option<String>>(13)
                    .map_err(db_err)?
                    .unwrap_or_default(),
                reason: r
                    .get::<_, Option<String>>(14)
                    .map_err(db_err)?
                    .unwrap_or_default(),
            })),
            None => None,
        };
        if state == State::Active
            && let Some((_, at, by, reason)) = covering(spiffe_id, issued_at, epoch)
        {
            state = State::Revoked;
            revocation = Some(Arc::new(Revocation {
                at_ms: at,
                by: format!("kill by {by}"),
                reason: reason.to_owned(),
            }));
        }
        if state == State::Active
            && let Some((at_ms, by)) = task_id.and_then(|t| completed.get(t))
        {
            state = State::Revoked;
            revocation = Some(Arc::new(Revocation {
                at_ms: *at_ms,
                by: by.clone(),
                reason: "task completed".into(),
            }));
        }
        let serial = r
            .get_ref(10)
            .map_err(db_err)?
            .as_blob_or_null()
            .map_err(db_err)?
            .and_then(|s| <[u8; 16]>::try_from(s).ok());
        // An expired certificate's lease is kept a day past its expiry if it was revoked
        // (see `REVOKED_KEPT_AFTER_EXPIRY_S`); anything else expired is gone.
        if expires_at <= now_s && (state == State::Active || serial.is_none()) {
            snap.expired.push(id);
            continue;
        }
        snap.restored += 1;
        chunk.push(Lease {
            id,
            kind,
            state,
            uid: r.get(4).map_err(db_err)?,
            pid: r.get(5).map_err(db_err)?,
            issued_at,
            expires_at,
            spiffe_id: interned.get(&mut last_id, spiffe_id),
            entry_id: interned.get(
                &mut last_entry,
                r.get_ref(3).map_err(db_err)?.as_str().map_err(db_err)?,
            ),
            exe: r
                .get_ref(6)
                .map_err(db_err)?
                .as_str_or_null()
                .map_err(db_err)?
                .map(|s| interned.get(&mut last_exe, s)),
            task_id: task_id.map(|s| interned.get(&mut last_task, s)),
            serial: serial.map(Box::new),
            revocation,
            kill_epoch: epoch.unwrap_or(0),
        });
        if chunk.len() == CHUNK {
            sink(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
        }
    }
    drop(rows);
    drop(st);
    if !chunk.is_empty() {
        sink(chunk);
    }
    let before_ms = min_issued_unstamped.saturating_mul(1000);
    if history
        .iter()
        .any(|(seq, _, at, _, _, active)| !active && *seq <= min_epoch && *at < before_ms)
    {
        conn.execute(
            "DELETE FROM kills WHERE restored_at IS NOT NULL AND seq <= ?1 AND killed_at < ?2",
            params![min_epoch, before_ms],
        )
        .map_err(db_err)?;
    }
    let mut st = conn
        .prepare("SELECT id, spec FROM entries ORDER BY rowid")
        .map_err(db_err)?;
    snap.entries = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    let mut st = conn
        .prepare("SELECT id, agent, created_ms, completed_ms FROM tasks")
        .map_err(db_err)?;
    snap.tasks = st
        .query_map([], |r| {
            Ok(Task {
                id: r.get::<_, String>(0)?.into(),
                agent: r.get::<_, String>(1)?.into(),
                created_ms: r.get(2)?,
                completed_ms: r.get(3)?,
            })
        })
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    let mut st = conn
        .prepare("SELECT id, active_ms FROM entry_activity")
        .map_err(db_err)?;
    snap.entry_activity = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    snap.audit_head = conn
        .query_row("SELECT value FROM meta WHERE key='audit_head'", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .map_err(db_err)?
        .and_then(|v| {
            let (s, h) = v.split_once(' ')?;
            Some((s.parse().ok()?, h.to_owned()))
        });
    Ok(snap)
}

/// Reads the recorded audit chain head of the store in `dir` without starting a writer
/// (for `tessera audit verify`).
pub fn recorded_audit_head(dir: &Path) -> Result<Option<(u64, String)>, String> {
    let db = dir.join("tessera.db");
    let conn = Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let v = match conn.query_row("SELECT value FROM meta WHERE key='audit_head'", [], |r| {
        r.get::<_, String>(0)
    }) {
        Ok(v) => v,
        Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", db.display())),
    };
    v.split_once(' ')
        .and_then(|(s, h)| Some((s.parse().ok()?, h.to_owned())))
        .map(Some)
        .ok_or_else(|| format!("{}: the recorded chain head is malformed", db.display()))
}

/// Whether the store in `dir` still holds audit record `seq` for the file (for
/// `tessera audit verify`, to tell a crash's unsynced tail from a deleted one).
pub fn holds_audit_record(dir: &Path, seq: u64) -> bool {
    Connection::open_with_flags(
        dir.join("tessera.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .and_then(|c| {
        c.query_row(
            "SELECT count(*) FROM audit_pending WHERE seq = ?1",
            params![seq as i64],
            |r| r.get::<_, i64>(0),
        )
    })
    .is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;
    use crate::lease::task_id_of;

    #[test]
    fn slow_commits_are_warned_about_at_most_once_per_interval() {
        let mut s = SlowCommits::default();
        s.record(Duration::from_millis(5), 3);
        assert_eq!((s.unreported, s.last_warned.is_none()), (0, true));
        s.record(Duration::from_millis(150), 3);
        let warned = s.last_warned.expect("the first slow commit is reported");
        assert_eq!(s.unreported, 0);
        // Within the interval they are counted for the next warning instead.
        s.record(Duration::from_millis(120), 1);
        s.record(Duration::from_millis(300), 7);
        assert_eq!((s.unreported, s.last_warned), (2, Some(warned)));
        // Exactly at the threshold is not slow.
        s.record(SLOW_COMMIT, 2);
        assert_eq!(s.unreported, 2);
        // Once the interval has passed, the next one is warned about with the count.
        if let Some(earlier) = warned.checked_sub(SLOW_COMMIT_LOG_EVERY) {
            s.last_warned = Some(earlier);
            s.record(SLOW_COMMIT * 2, 2);
            assert_eq!(s.unreported, 0);
            assert!(s.last_warned.unwrap() > warned);
        }
    }

    #[test]
    fn cached_transaction_commits_once_and_rolls_back_when_dropped() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY)")
            .unwrap();
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap()
        };
        // Twice: the second round runs the cached BEGIN and COMMIT again.
        for x in [1, 2] {
            let tx = CachedTx::begin(&c).unwrap();
            tx.execute("INSERT INTO t VALUES(?1)", [x]).unwrap();
            tx.commit().unwrap();
            assert!(c.is_autocommit());
        }
        {
            let tx = CachedTx::begin(&c).unwrap();
            tx.execute("INSERT INTO t VALUES(3)", []).unwrap();
            // A failed statement ends the batch without a commit.
            assert!(tx.execute("INSERT INTO t VALUES(1)", []).is_err());
        }
        assert!(c.is_autocommit(), "the dropped transaction is still open");
        assert_eq!(count(&c), 2);
    }

    fn lease(id: &str, issued: i64, exp: i64) -> Lease {
        Lease {
            id: LeaseId::random(),
            kind: Kind::Jwt,
            state: State::Active,
            uid: 1,
            pid: 2,
            issued_at: issued,
            expires_at: exp,
            spiffe_id: id.into(),
            entry_id: "e".into(),
            exe: Some("/bin/x".into()),
            task_id: None,
            serial: None,
            revocation: None,
            kill_epoch: 0,
        }
    }

    use super::Held;

    #[tokio::test]
    async fn an_issuance_whose_caller_went_away_is_withdrawn_once_it_lands() {
        let held = Arc::new(Held::default());
        let store: Arc<dyn Store> = held.clone();
        let l = lease("spiffe://td/a", 100, 1000);
        // Answered: nothing more is written.
        let answered = tokio::spawn({
            let store = Arc::clone(&store);
            async move { commit_issue(&store, vec![Op::PutLease(l.clone())], vec![l.id]).await }
        });
        tokio::task::yield_now().await;
        let (_, tx) = held.jobs.lock().unwrap().pop().unwrap();
        tx.send(Ok(())).unwrap();
        answered.await.unwrap().unwrap();
        // The caller goes away while its commit is in flight; the commit then lands.
        let gone = lease("spiffe://td/b", 100, 1000);
        let caller = tokio::spawn({
            let (store, gone) = (Arc::clone(&store), gone.clone());
            async move { commit_issue(&store, vec![Op::PutLease(gone.clone())], vec![gone.id]).await }
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        let (_, tx) = held.jobs.lock().unwrap().pop().unwrap();
        tx.send(Ok(())).unwrap();
        for _ in 0..200 {
            if let Some((ops, _)) = held.jobs.lock().unwrap().first() {
                assert!(
                    matches!(&ops[0], Op::Delete(ids) if ids == &[gone.id]),
                    "{ops:?}"
                );
                assert!(
                    matches!(&ops[1], Op::Audit(e) if e.event == "withdraw"),
                    "{ops:?}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the unanswered issuance's lease was not withdrawn");
    }

    fn kill(seq: u32, id: &str, at_ms: i64) -> Op {
        Op::Kill(Kill {
            seq,
            spiffe_id: id.into(),
            at_ms,
            by: "op".into(),
            reason: format!("k{at_ms}"),
        })
    }

    /// The rows `sql` selects from the store in `d`, read by `row`.
    fn rows<T>(
        d: &Path,
        sql: &str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        let c = Connection::open(d.join("tessera.db")).unwrap();
        let mut st = c.prepare(sql).unwrap();
        st.query_map([], row)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn kill_rows(d: &Path) -> Vec<(String, i64)> {
        rows(
            d,
            "SELECT spiffe_id, killed_at FROM kills ORDER BY seq",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    #[tokio::test]
    async fn a_store_from_before_per_agent_task_ids_is_renamed_and_again_after_a_rollback() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let in_task = |spiffe_id: &str, task: &str| Lease {
            task_id: Some(task.into()),
            ..lease(spiffe_id, 200, 1000)
        };
        // A task token, its task X.509-SVID, a lease of a completed task and one whose task
        // record is gone: keyed by bare ids, as before.
        let token = in_task("spiffe://td/a", "T-1");
        let svid = Lease {
            kind: Kind::X509,
            serial: Some(Box::new([7; 16])),
            ..in_task("spiffe://td/a/task/T-1", "T-1")
        };
        let completed = in_task("spiffe://td/b", "T-1x");
        let orphan = in_task("spiffe://td/c", "lost");
        let task = |id: &str, agent: &str| {
            Op::PutTask(Task {
                id: id.into(),
                agent: agent.into(),
                created_ms: 150_000,
                completed_ms: None,
            })
        };
        let mut ops: Vec<Op> = [&token, &svid, &completed, &orphan]
            .into_iter()
            .map(|l| Op::PutLease(l.clone()))
            .collect();
        ops.extend([
            task("T-1", "spiffe://td/a"),
            task("T-1x", "spiffe://td/b"),
            Op::CompleteTask {
                id: "T-1x".into(),
                at_ms: 250_000,
                by: "agent".into(),
            },
        ]);
        commit(&s, ops).await.unwrap();
        drop(s);
        let db = d.path().join("tessera.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch("PRAGMA user_version = 0")
            .unwrap();
        let mut leases = Vec::new();
        let (s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 500, &mut |c| leases.extend(c)).unwrap();
        let task_of = |id: LeaseId| {
            let l = leases.iter().find(|l| l.id == id).unwrap();
            (l.task_id.as_deref().unwrap().to_owned(), l.state)
        };
        assert_eq!(
            task_of(token.id),
            ("spiffe://td/a/task/T-1".into(), State::Active)
        );
        assert_eq!(
            task_of(svid.id),
            ("spiffe://td/a/task/T-1".into(), State::Active)
        );
        assert_eq!(
            task_of(completed.id),
            ("spiffe://td/b/task/T-1x".into(), State::Revoked),
            "the completion still applies to its lease"
        );
        assert_eq!(task_of(orphan.id).0, "spiffe://td/c/task/lost");
        let mut names: Vec<(&str, bool)> = snap
            .tasks
            .iter()
            .map(|t| (&*t.id, t.completed_ms.is_some()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("spiffe://td/a/task/T-1", false),
                ("spiffe://td/b/task/T-1x", true)
            ]
        );
        // The previous version run again on this store (a rollback) keys by bare ids again:
        // here it issued a token for a:T-1 and completed it. Back on this version, that is
        // the one task a:T-1, complete, and the token's lease is revoked at load.
        let rollback_token = in_task("spiffe://td/a", "T-1");
        commit(
            &s,
            vec![
                Op::PutLease(rollback_token.clone()),
                task("T-1", "spiffe://td/a"),
                Op::CompleteTask {
                    id: "T-1".into(),
                    at_ms: 400_000,
                    by: "agent".into(),
                },
            ],
        )
        .await
        .unwrap();
        drop(s);
        let mut leases = Vec::new();
        let (_s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 500, &mut |c| leases.extend(c)).unwrap();
        let t1: Vec<_> = snap
            .tasks
            .iter()
            .filter(|t| task_id_of(&t.id) == "T-1")
            .collect();
        assert_eq!(t1.len(), 1, "{t1:?}");
        assert_eq!(&*t1[0].id, "spiffe://td/a/task/T-1");
        assert_eq!(t1[0].created_ms, 150_000, "the earlier first use");
        assert_eq!(t1[0].completed_ms, Some(400_000));
        for id in [token.id, rollback_token.id] {
            let l = leases.iter().find(|l| l.id == id).unwrap();
            assert_eq!(l.state, State::Revoked, "{id}");
            assert_eq!(l.task_id.as_deref(), Some("spiffe://td/a/task/T-1"));
        }
    }

    #[tokio::test]
    async fn kills_and_completed_tasks_revoke_at_load_and_spent_kills_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        // Kills 1 (spiffe://td, restored), 2 (td/a, restored) and 3 (td/a/b, in force);
        // leases issued between kills 1 and 2 (epoch 1) and after kill 3 (epoch 3).
        let after_first = |id: &str| Lease {
            kill_epoch: 1,
            ..lease(id, 200, 1000)
        };
        let deep = after_first("spiffe://td/a/b/c");
        let sibling = after_first("spiffe://td/ab");
        let late = Lease {
            kill_epoch: 3,
            // Stamped by a clock that had stepped back: the epoch decides, not the time.
            ..lease("spiffe://td/a/b", 100, 1000)
        };
        let in_task = Lease {
            task_id: Some("job".into()),
            ..after_first("spiffe://td/t")
        };
        let other_task = Lease {
            task_id: Some("open".into()),
            ..after_first("spiffe://td/t")
        };
        // Stored before kill epochs (NULL below): judged by time.
        let unstamped = lease("spiffe://td/a/x", 250, 1000);
        let task = |id: &str| {
            Op::PutTask(Task {
                id: id.into(),
                agent: "spiffe://td/t".into(),
                created_ms: 199_000,
                completed_ms: None,
            })
        };
        let restore = |id: &str, at_ms| Op::Restore {
            spiffe_id: id.into(),
            at_ms,
            by: "op".into(),
        };
        commit(
            &s,
            vec![
                kill(1, "spiffe://td", 100_000),
                restore("spiffe://td", 101_000),
                Op::PutLease(deep.clone()),
                Op::PutLease(sibling.clone()),
                Op::PutLease(in_task.clone()),
                Op::PutLease(other_task.clone()),
                Op::PutLease(unstamped.clone()),
                task("job"),
                task("open"),
                kill(2, "spiffe://td/a", 300_000),
                restore("spiffe://td/a", 301_000),
                kill(3, "spiffe://td/a/b", 350_000),
                Op::PutLease(late.clone()),
                // Completed on disk, its lease's revocation lost (as when the commit of
                // revocations and completion is all that reached the store).
                Op::CompleteTask {
                    id: "job".into(),
                    at_ms: 250_000,
                    by: "agent".into(),
                },
            ],
        )
        .await
        .unwrap();
        drop(s);
        Connection::open(d.path().join("tessera.db"))
            .unwrap()
            .execute(
                "UPDATE leases SET kill_epoch = NULL WHERE id = ?1",
                params![&unstamped.id.0[..]],
            )
            .unwrap();
        let mut leases = Vec::new();
        let (_s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 500, &mut |c| leases.extend(c)).unwrap();
        let get = |id: LeaseId| leases.iter().find(|l| l.id == id).unwrap().clone();
        let revoked_by = |id: LeaseId| {
            let l = get(id);
            (l.state, l.revocation.map(|r| (r.at_ms, r.reason.clone())))
        };
        let by_kill_2 = (State::Revoked, Some((300_000, "k300000".into())));
        assert_eq!(
            revoked_by(deep.id),
            by_kill_2,
            "the first kill above it after its epoch"
        );
        assert_eq!(
            revoked_by(sibling.id),
            (State::Active, None),
            "td/a is not above td/ab, and kill 1 came before it"
        );
        assert_eq!(
            revoked_by(late.id),
            (State::Active, None),
            "issued after every kill"
        );
        assert_eq!(
            revoked_by(unstamped.id),
            by_kill_2,
            "by time: killed at 300 s"
        );
        assert_eq!(
            revoked_by(in_task.id),
            (State::Revoked, Some((250_000, "task completed".into())))
        );
        assert_eq!(revoked_by(other_task.id), (State::Active, None));
        assert_eq!(snap.kills.len(), 1, "the kill in force");
        assert_eq!(snap.kill_epoch, 3);
        // Kill 1 precedes every stored lease and is gone; kill 2 still revokes stored leases.
        assert_eq!(
            kill_rows(d.path()),
            [
                ("spiffe://td/a".to_owned(), 300_000),
                ("spiffe://td/a/b".to_owned(), 350_000)
            ]
        );
        // Pruned or not, the epoch goes on from the latest kill ever recorded.
        drop(_s);
        let (_s, snap) = SqliteStore::open(d.path(), u64::MAX, 500, &mut |_| {}).unwrap();
        assert_eq!(snap.kill_epoch, 3);
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_kept_a_day_past_its_expiry() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let cert = || {
            let mut l = lease("spiffe://td/a", 100, 1_000);
            l.kind = Kind::X509;
            l.serial = Some(Box::new([9; 16]));
            l
        };
        let (revoked, live, token) = (cert(), cert(), lease("spiffe://td/a", 100, 1_000));
        let r = Revocation {
            at_ms: 150_000,
            by: "op".into(),
            reason: "leaked".into(),
        };
        commit(
            &s,
            vec![
                Op::PutLease(revoked.clone()),
                Op::PutLease(live.clone()),
                Op::PutLease(token.clone()),
                Op::Revoke(vec![revoked.id, token.id], r),
            ],
        )
        .await
        .unwrap();
        drop(s);
        let sorted = |mut v: Vec<LeaseId>| {
            v.sort();
            v
        };
        // A start an hour past their expiry (a clock ahead): the revoked certificate stays,
        // for the CRL to list it again once the clock is back.
        let mut leases = Vec::new();
        let (s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 4_600, &mut |c| leases.extend(c)).unwrap();
        assert_eq!(sorted(snap.expired), sorted(vec![live.id, token.id]));
        assert_eq!(leases.len(), 1);
        assert_eq!(
            (leases[0].id, leases[0].state),
            (revoked.id, State::Revoked)
        );
        drop(s);
        // A day past its expiry it goes as well.
        let (_s, snap) = SqliteStore::open(
            d.path(),
            u64::MAX,
            1_000 + super::super::REVOKED_KEPT_AFTER_EXPIRY_S,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            sorted(snap.expired),
            sorted(vec![revoked.id, live.id, token.id])
        );
    }

    #[tokio::test]
    async fn committed_leases_kills_and_revocations_come_back() {
        let d = tempfile::tempdir().unwrap();
        let (s, snap) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_eq!(snap.restored, 0);
        let a = lease("spiffe://td/a", 100, 1000);
        let b = lease("spiffe://td/a/task/1", 100, 1000);
        let c = lease("spiffe://td/a2", 100, 1000);
        let old = lease("spiffe://td/z", 10, 50);
        let r = Revocation {
            at_ms: 150_000,
            by: "op".into(),
            reason: "why".into(),
        };
        commit(
            &s,
            vec![
                Op::PutLease(a.clone()),
                Op::PutLease(b.clone()),
                Op::PutLease(c.clone()),
                Op::PutLease(old.clone()),
            ],
        )
        .await
        .unwrap();
        commit(
            &s,
            vec![
                Op::Revoke(vec![c.id], r.clone()),
                Op::Audit(Event::now("revoke", Actor::Daemon)),
            ],
        )
        .await
        .unwrap();
        commit(
            &s,
            vec![Op::Kill(Kill {
                seq: 1,
                spiffe_id: "spiffe://td/a".into(),
                at_ms: 200_000,
                by: "op".into(),
                reason: "k".into(),
            })],
        )
        .await
        .unwrap();
        drop(s);
        let mut leases = Vec::new();
        let (_s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 300, &mut |c| leases.extend(c)).unwrap();
        assert_eq!(snap.expired, vec![old.id]);
        let get = |id: LeaseId| leases.iter().find(|l| l.id == id).unwrap().clone();
        assert_eq!(get(a.id).state, State::Revoked, "killed after issue");
        assert_eq!(get(b.id).state, State::Revoked, "under the killed path");
        assert_eq!(get(c.id).state, State::Revoked);
        assert_eq!(get(c.id).revocation.as_deref(), Some(&r));
        assert_eq!(snap.kills.len(), 1);
        assert_eq!(snap.audit_head.unwrap().0, 1);
    }

    #[tokio::test]
    async fn every_field_comes_back_and_repeated_strings_share_one_allocation() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        // Alternating identities and tasks, so that the restore meets each string again
        // after a different one; serials, executables and tasks present and absent.
        let leases: Vec<Lease> = (0..40)
            .map(|i| {
                let mut l = lease(
                    ["spiffe://td/a", "spiffe://td/b"][i % 2],
                    100,
                    1000 + i as i64,
                );
                l.kind = if i % 3 == 0 { Kind::X509 } else { Kind::Jwt };
                l.serial = (i % 3 == 0).then(|| Box::new([i as u8; 16]));
                l.exe = (i % 4 != 0).then(|| Arc::from(["/bin/x", "/bin/y"][i % 2]));
                l.task_id = (i % 5 != 0).then(|| Arc::from(format!("t{}", i % 3)));
                l.uid = i as u32;
                l.pid = 7 * i as i32;
                l
            })
            .collect();
        commit(&s, leases.iter().cloned().map(Op::PutLease).collect())
            .await
            .unwrap();
        drop(s);
        let mut back = Vec::new();
        let (_s, snap) =
            SqliteStore::open(d.path(), u64::MAX, 300, &mut |c| back.extend(c)).unwrap();
        assert_eq!(snap.restored, 40);
        back.sort_by_key(|l| l.expires_at);
        assert_eq!(back, leases);
        let shared = |f: fn(&Lease) -> Option<&Arc<str>>| {
            let mut seen: Vec<&Arc<str>> = Vec::new();
            for s in back.iter().filter_map(f) {
                match seen.iter().find(|x| ***x == *s) {
                    Some(x) => assert!(Arc::ptr_eq(x, s), "{s} read twice into two copies"),
                    None => seen.push(s),
                }
            }
            seen.len()
        };
        assert_eq!(shared(|l| Some(&l.spiffe_id)), 2);
        assert_eq!(shared(|l| Some(&l.entry_id)), 1);
        assert_eq!(shared(|l| l.exe.as_ref()), 2);
        assert_eq!(shared(|l| l.task_id.as_ref()), 3);
    }

    fn pending(d: &Path) -> Vec<i64> {
        rows(d, "SELECT seq FROM audit_pending ORDER BY seq", |r| {
            r.get(0)
        })
    }

    /// A store with `n` audit records committed one batch each, and the audit file's text.
    async fn audited(n: usize) -> (tempfile::TempDir, SqliteStore, String) {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        for i in 0..n {
            let ev = Event::now("issue", Actor::Daemon).lease(format!("l{i}"));
            commit(&s, vec![Op::Audit(ev)]).await.unwrap();
        }
        let full = std::fs::read_to_string(d.path().join("audit.jsonl")).unwrap();
        (d, s, full)
    }

    /// What a power loss leaves while `d`'s store is open: the database as committed and an
    /// audit file holding only its first `keep` records.
    fn power_loss(d: &Path, full: &str, keep: usize) -> tempfile::TempDir {
        let crashed = store_copy(d);
        let kept: String = full.lines().take(keep).map(|l| format!("{l}\n")).collect();
        std::fs::write(crashed.path().join("audit.jsonl"), kept).unwrap();
        crashed
    }

    #[tokio::test]
    async fn audit_records_committed_but_lost_from_the_file_are_appended_at_open() {
        let (d, s, full) = audited(5).await;
        // Acknowledged means in the file (not yet necessarily synced) and in the store.
        assert_eq!(full.lines().count(), 5);
        let kept = pending(d.path());
        assert!(kept.contains(&4), "the last batch is always kept: {kept:?}");

        let lost_from = kept[0] as usize;
        let crashed = power_loss(d.path(), &full, lost_from);
        let file = crashed.path().join("audit.jsonl");
        let recorded = recorded_audit_head(crashed.path()).unwrap().unwrap();
        assert_eq!(recorded.0, 5);
        let e = crate::audit::verify(&file, Some((recorded.0, &recorded.1))).unwrap_err();
        assert_eq!(e.missing_from, Some(lost_from as u64));

        let (_s2, snap) = SqliteStore::open(crashed.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_eq!(snap.audit_head.as_ref().unwrap().0, 5);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            full,
            "the lost records come back byte for byte"
        );
        crate::audit::verify(&file, Some((recorded.0, &recorded.1))).unwrap();
        assert!(pending(crashed.path()).is_empty());

        // A later batch deletes the records the background sync has made durable.
        std::thread::sleep(AUDIT_SYNC_INTERVAL * 3);
        commit(&s, vec![Op::Audit(Event::now("revoke", Actor::Daemon))])
            .await
            .unwrap();
        assert_eq!(pending(d.path()), vec![5]);
    }

    /// A copy of `d`'s store as a failed fdatasync leaves it: records 2.. of `full` kept
    /// (none counts as synced), and the audit file as `file` gives it.
    fn unconfirmed_from_2(d: &Path, full: &str, file: &[u8]) -> tempfile::TempDir {
        let copy = store_copy(d);
        let c = Connection::open(copy.path().join("tessera.db")).unwrap();
        for (seq, line) in full.lines().enumerate().skip(2) {
            c.execute(
                "INSERT OR REPLACE INTO audit_pending(seq, line) VALUES(?1, ?2)",
                params![seq as i64, line.as_bytes()],
            )
            .unwrap();
        }
        std::fs::write(copy.path().join("audit.jsonl"), file).unwrap();
        copy
    }

    #[tokio::test]
    async fn records_a_failed_sync_left_out_of_the_file_are_written_again_at_open() {
        let (d, _s, full) = audited(5).await;
        let recorded = recorded_audit_head(d.path()).unwrap().unwrap();
        // The file intact: left exactly as it is.
        let intact = unconfirmed_from_2(d.path(), &full, full.as_bytes());
        SqliteStore::open(intact.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_eq!(
            std::fs::read_to_string(intact.path().join("audit.jsonl")).unwrap(),
            full
        );
        // Record 2 is a hole of zeros (pages the kernel dropped after a failed write-back, then
        // a power loss), newline included; records 3 and 4 after it are intact.
        let start: usize = full.lines().take(2).map(|l| l.len() + 1).sum();
        let len = full.lines().nth(2).unwrap().len() + 1;
        let mut holed = full.clone().into_bytes();
        holed[start..start + len].fill(0);
        let crashed = unconfirmed_from_2(d.path(), &full, &holed);
        let file = crashed.path().join("audit.jsonl");
        assert!(crate::audit::verify(&file, Some((recorded.0, &recorded.1))).is_err());
        let (_s2, snap) = SqliteStore::open(crashed.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_eq!(snap.audit_head.as_ref().unwrap().0, 5);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            full,
            "records 2-4 written again from the store, byte for byte"
        );
        crate::audit::verify(&file, Some((recorded.0, &recorded.1))).unwrap();
        // A store row edited since (it no longer continues the chain) replaces nothing: the
        // intact file stays as it is.
        let edited = unconfirmed_from_2(d.path(), &full, full.as_bytes());
        Connection::open(edited.path().join("tessera.db"))
            .unwrap()
            .execute(
                "UPDATE audit_pending SET line = replace(line, 'l3', 'l9') WHERE seq = 3",
                [],
            )
            .unwrap();
        SqliteStore::open(edited.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_eq!(
            std::fs::read_to_string(edited.path().join("audit.jsonl")).unwrap(),
            full
        );
    }

    #[test]
    fn after_a_failed_audit_sync_nothing_counts_as_synced() {
        use std::os::fd::OwnedFd;
        // fdatasync of a pipe fails (EINVAL), as of a file whose write-back failed.
        let (r, w) = std::io::pipe().unwrap();
        let failing = Arc::new(std::fs::File::from(OwnedFd::from(w)));
        let dir = tempfile::tempdir().unwrap();
        let good = Arc::new(std::fs::File::create(dir.path().join("f")).unwrap());
        let sync = Arc::new(AuditSync::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let (sync, stop) = (Arc::clone(&sync), Arc::clone(&stop));
            std::thread::spawn(move || sync.run(&stop))
        };
        let settle = |upto| {
            sync.request(Arc::clone(&good), upto);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while sync.want.lock().unwrap().is_some() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(AUDIT_SYNC_INTERVAL * 2);
        };
        settle(3);
        assert_eq!(sync.synced.load(Ordering::Acquire), 3, "a good sync counts");
        sync.request(failing, 7);
        std::thread::sleep(AUDIT_SYNC_INTERVAL * 2);
        assert!(sync.failed.load(Ordering::Acquire));
        // A later sync that succeeds proves nothing about what the failed one lost.
        settle(9);
        assert_eq!(sync.synced.load(Ordering::Acquire), 3);
        stop.store(true, Ordering::Release);
        sync.wake.notify_one();
        t.join().unwrap();
        drop(r);
    }

    #[tokio::test]
    async fn the_reapers_delete_keeps_a_certificate_revoked_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cert = |exp| Lease {
            kind: Kind::X509,
            serial: Some(Box::new([7; 16])),
            ..lease("spiffe://td/a", exp - 60, exp)
        };
        // Expired a moment ago: revoked while the reaper retired it (active in its eyes).
        let (racing, active, long_gone) = (cert(now - 1), cert(now - 1), cert(now - 90_000));
        let rev = Revocation {
            at_ms: now * 1000,
            by: "operator uid:0".into(),
            reason: "leaked".into(),
        };
        commit(
            &s,
            vec![
                Op::PutLease(racing.clone()),
                Op::PutLease(active.clone()),
                Op::PutLease(long_gone.clone()),
                Op::Revoke(vec![racing.id, long_gone.id], rev),
            ],
        )
        .await
        .unwrap();
        commit(
            &s,
            vec![Op::Delete(vec![racing.id, active.id, long_gone.id])],
        )
        .await
        .unwrap();
        let left = rows(d.path(), "SELECT id FROM leases", |r| {
            r.get::<_, Vec<u8>>(0)
        });
        // The revoked certificate within its day past expiry stays, for the CRL; the active
        // one and the one revoked more than a day past its expiry go.
        assert_eq!(left, vec![racing.id.0.to_vec()]);
    }

    #[tokio::test]
    async fn a_checkpoint_batch_leaves_the_whole_store_in_the_database_file() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let l = lease("spiffe://td/a", 100, 1000);
        commit(&s, vec![Op::PutLease(l)]).await.unwrap();
        let wal = d.path().join("tessera.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        commit(&s, vec![Op::Checkpoint]).await.unwrap();
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "the log was emptied"
        );
        // A copy of the database file alone (a backup that left out the -wal) is complete.
        let copy = tempfile::tempdir().unwrap();
        for f in ["tessera.db", "audit.jsonl"] {
            std::fs::copy(d.path().join(f), copy.path().join(f)).unwrap();
        }
        let mut restored = 0;
        SqliteStore::open(copy.path(), u64::MAX, 100, &mut |v| restored += v.len()).unwrap();
        assert_eq!(restored, 1);
    }

    /// A consistent copy of the store in `d` (a backup), in a new directory.
    fn store_copy(d: &Path) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        Connection::open(d.join("tessera.db"))
            .unwrap()
            .execute(
                "VACUUM INTO ?1",
                params![copy.path().join("tessera.db").to_str()],
            )
            .unwrap();
        copy
    }

    /// Commits a kill of spiffe://td/a with its audit record.
    async fn commit_kill(s: &SqliteStore) {
        let ev = Event::now("kill", Actor::Daemon).spiffe_id("spiffe://td/a");
        commit(s, vec![kill(1, "spiffe://td/a", 5), Op::Audit(ev)])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_store_older_than_the_audit_log_is_refused() {
        let (d, s, _) = audited(2).await;
        // A consistent copy of the store, taken before a kill (a backup put back later, or
        // the WAL holding the kill lost).
        let older = store_copy(d.path());
        commit_kill(&s).await;
        let log = d.path().join("audit.jsonl");
        std::fs::copy(&log, older.path().join("audit.jsonl")).unwrap();
        let err = match SqliteStore::open(older.path(), u64::MAX, 100, &mut |_| {}) {
            Ok(_) => panic!("a store older than the log was taken"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(
            msg.contains("records 2..2") && msg.contains("(1 kill)"),
            "{msg}"
        );
        assert!(
            msg.contains("move away the audit files that hold them")
                && msg.contains(&older.path().join("audit.jsonl").display().to_string()),
            "{msg}"
        );
        // Nothing was written: the log is as it was, the store still lacks the kill.
        assert_eq!(
            std::fs::read(older.path().join("audit.jsonl")).unwrap(),
            std::fs::read(&log).unwrap()
        );
        assert!(kill_rows(older.path()).is_empty());

        // A store lost altogether (no recorded head) beside a log with history.
        let lost = tempfile::tempdir().unwrap();
        std::fs::copy(&log, lost.path().join("audit.jsonl")).unwrap();
        let err = match SqliteStore::open(lost.path(), u64::MAX, 100, &mut |_| {}) {
            Ok(_) => panic!("an empty store beside a log with history was taken"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("(2 issue, 1 kill)"), "{err}");

        // The way out the message gives: the log moved away, the store starts.
        std::fs::rename(
            older.path().join("audit.jsonl"),
            older.path().join("audit.old"),
        )
        .unwrap();
        SqliteStore::open(older.path(), u64::MAX, 100, &mut |_| {}).unwrap();
    }

    #[tokio::test]
    async fn a_store_older_than_the_log_is_refused_with_rotated_files_archived() {
        // Rotation every few records; the store copied after record 5 (review AB F2).
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path(), 600, 100, &mut |_| {}).unwrap();
        let issue = |i: usize| Op::Audit(Event::now("issue", Actor::Daemon).lease(format!("l{i}")));
        for i in 0..6 {
            commit(&s, vec![issue(i)]).await.unwrap();
        }
        let older = store_copy(d.path());
        for i in 6..12 {
            commit(&s, vec![issue(i)]).await.unwrap();
        }
        commit_kill(&s).await;
        drop(s);
        // The log beside the old store, but the rotated file holding the store's last record
        // (5) archived elsewhere, as the README advises for rotated files.
        let chain = audit::chain_files(&d.path().join("audit.jsonl"));
        assert!(chain.len() >= 3, "{chain:?}");
        let mut archived = 0;
        for f in &chain {
            let text = std::fs::read_to_string(f).unwrap();
            if text.lines().any(|l| l.contains("\"seq\":5,")) {
                archived += 1;
                continue;
            }
            std::fs::copy(f, older.path().join(f.file_name().unwrap())).unwrap();
        }
        assert_eq!(archived, 1);
        let err = match SqliteStore::open(older.path(), 600, 100, &mut |_| {}) {
            Ok(_) => panic!("a store older than the log was taken"),
            Err(e) => e,
        };
        assert!(err.to_string().contains(", 1 kill)"), "{err}");
        assert!(kill_rows(older.path()).is_empty());
    }

    fn rejected(d: &Path) -> Vec<(i64, String)> {
        rows(
            d,
            "SELECT seq, CAST(line AS TEXT) FROM audit_rejected ORDER BY seq",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Asserts that the file's last record is a gap at `seq` with these counts and a reason
    /// mentioning `why`.
    fn assert_gap(d: &Path, seq: u64, recorded: u64, file: u64, rejected: u64, why: &str) {
        let text = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
        let gap: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(gap["event"], audit::GAP_EVENT);
        assert_eq!(gap["seq"], seq);
        assert_eq!(gap["detail"]["recorded_records"], recorded);
        assert_eq!(gap["detail"]["file_records"], file);
        assert_eq!(gap["detail"]["rejected_records"], rejected);
        assert!(gap["reason"].as_str().unwrap().contains(why), "{gap}");
    }

    #[tokio::test]
    async fn a_stored_record_that_does_not_continue_the_file_is_kept_apart_and_the_gap_recorded() {
        let (d, _s, full) = audited(3).await;
        // The file lost record 2 and record 2 in the store was edited.
        let crashed = power_loss(d.path(), &full, 2);
        Connection::open(crashed.path().join("tessera.db"))
            .unwrap()
            .execute(
                "UPDATE audit_pending SET line = replace(line, 'l2', 'l9') WHERE seq = 2",
                [],
            )
            .unwrap();
        let (s2, snap) = SqliteStore::open(crashed.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let text = std::fs::read_to_string(crashed.path().join("audit.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3, "records 0 and 1, then the gap");
        assert!(
            text.starts_with(
                &full
                    .lines()
                    .take(2)
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            )
        );
        assert_gap(crashed.path(), 2, 3, 2, 1, "does not continue");
        assert_eq!(snap.audit_head.as_ref().unwrap().0, 3);
        assert!(pending(crashed.path()).is_empty());
        let kept = rejected(crashed.path());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, 2);
        assert!(kept[0].1.contains("\"l9\""), "the edited row, as found");

        // Later records take the same seqs in the file; the rejected row stays as it was.
        for _ in 0..2 {
            commit(&s2, vec![Op::Audit(Event::now("revoke", Actor::Daemon))])
                .await
                .unwrap();
        }
        assert_eq!(rejected(crashed.path()), kept);
        let head = recorded_audit_head(crashed.path()).unwrap().unwrap();
        let v =
            audit::verify(&crashed.path().join("audit.jsonl"), Some((head.0, &head.1))).unwrap();
        assert_eq!(v.records, 5);
        assert_eq!(v.gaps, vec![2], "verify reports the gap");

        // The next start finds nothing missing and records no new gap.
        drop(s2);
        let (_s3, _) = SqliteStore::open(crashed.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        let v = audit::verify(&crashed.path().join("audit.jsonl"), None).unwrap();
        assert_eq!((v.records, v.gaps), (5, vec![2]));
    }

    #[tokio::test]
    async fn records_deleted_beyond_what_the_store_holds_are_a_recorded_gap() {
        let (d, s, _) = audited(4).await;
        // Let the sync make everything durable and a later batch clear the store's copies.
        std::thread::sleep(AUDIT_SYNC_INTERVAL * 3);
        commit(&s, vec![Op::Audit(Event::now("revoke", Actor::Daemon))])
            .await
            .unwrap();
        assert_eq!(pending(d.path()), vec![4]);
        drop(s);
        // Someone removes the last two records and the store's copy of the newest.
        let file = d.path().join("audit.jsonl");
        let text = std::fs::read_to_string(&file).unwrap();
        let kept: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        std::fs::write(&file, kept).unwrap();
        Connection::open(d.path().join("tessera.db"))
            .unwrap()
            .execute("DELETE FROM audit_pending", [])
            .unwrap();

        let (_s2, snap) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_gap(d.path(), 3, 5, 3, 0, "deleted");
        assert_eq!(snap.audit_head.as_ref().unwrap().0, 4);
        assert!(rejected(d.path()).is_empty());
        let head = recorded_audit_head(d.path()).unwrap().unwrap();
        assert_eq!(head.0, 4, "the store's head follows the file again");
        let v = audit::verify(&file, Some((head.0, &head.1))).unwrap();
        assert_eq!(v.gaps, vec![3]);
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_no_record_in_the_file() {
        let (d, s, _) = audited(2).await;
        // Any batch holding a record that mentions "boom" fails inside the transaction.
        Connection::open(d.path().join("tessera.db"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON audit_pending \
                 WHEN CAST(NEW.line AS TEXT) LIKE '%boom%' BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let failed = commit(
            &s,
            vec![Op::Audit(Event::now("kill", Actor::Daemon).reason("boom"))],
        )
        .await;
        assert!(failed.is_err(), "the injected failure");
        commit(&s, vec![Op::Audit(Event::now("revoke", Actor::Daemon))])
            .await
            .unwrap();
        let text = std::fs::read_to_string(d.path().join("audit.jsonl")).unwrap();
        assert!(!text.contains("boom"), "{text}");
        assert_eq!(text.lines().count(), 3);
        let head = recorded_audit_head(d.path()).unwrap().unwrap();
        let v =
            audit::verify_chain(&d.path().join("audit.jsonl"), Some((head.0, &head.1))).unwrap();
        assert_eq!((v.records, head.0), (3, 3));
    }

    #[tokio::test]
    async fn a_commit_of_unknown_outcome_stops_the_store_and_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = Arc::clone(&fail);
        // The hook stands in for an fsync EIO or a full disk at COMMIT.
        let hook: CommitHook = Box::new(move || f.load(Ordering::SeqCst));
        let (s, _) =
            SqliteStore::open_with(d.path(), u64::MAX, 100, &mut |_| {}, Some(hook)).unwrap();
        let mut failure = s.failure();
        let kept = lease("spiffe://td/a", 100, 1000);
        commit(&s, vec![Op::PutLease(kept.clone())]).await.unwrap();
        assert!(failure.borrow().is_none());
        fail.store(true, Ordering::SeqCst);
        let lost = lease("spiffe://td/b", 100, 1000);
        let r = commit(&s, vec![Op::PutLease(lost)]).await;
        assert!(matches!(r, Err(StoreError::Uncertain(_))), "{r:?}");
        // Reported to whoever must stop the daemon, and nothing more is taken.
        tokio::time::timeout(Duration::from_secs(5), failure.wait_for(Option::is_some))
            .await
            .expect("the failure is signalled")
            .unwrap();
        fail.store(false, Ordering::SeqCst);
        let after = commit(&s, vec![Op::PutLease(lease("spiffe://td/c", 100, 1000))]).await;
        assert!(matches!(after, Err(StoreError::Closed)), "{after:?}");
        drop(s);
        // A start reads what the disk holds (here the hook's rollback: only the first).
        let mut back = Vec::new();
        let (_s, _) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |c| back.extend(c)).unwrap();
        let ids: Vec<_> = back.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![kept.id]);
    }

    #[tokio::test]
    async fn a_rewritten_history_padded_past_the_recorded_head_is_a_recorded_gap() {
        let (d, s, _) = audited(4).await;
        std::thread::sleep(AUDIT_SYNC_INTERVAL * 3);
        commit(&s, vec![Op::Audit(Event::now("revoke", Actor::Daemon))])
            .await
            .unwrap();
        drop(s);
        // The writer's stop ends by putting back a live file replaced meanwhile, and then
        // clears what the store held for the file: waited for, or it could undo the forgery
        // below.
        let pending = || {
            Connection::open(d.path().join("tessera.db"))
                .unwrap()
                .query_row("SELECT count(*) FROM audit_pending", [], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pending() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pending(), 0, "the writer stopped");
        let recorded = recorded_audit_head(d.path()).unwrap().unwrap();
        assert_eq!(recorded.0, 5);
        // A whole new chain, valid on its own, one record longer than the store recorded.
        let file = d.path().join("audit.jsonl");
        std::fs::remove_file(&file).unwrap();
        let mut forged = audit::AuditWriter::open(&file, u64::MAX).unwrap();
        for _ in 0..6 {
            forged.push(&Event::now("restore", Actor::Daemon));
        }
        forged.flush().unwrap();
        drop(forged);
        assert!(audit::verify_chain(&file, None).is_ok(), "valid on its own");
        let e = audit::verify_chain(&file, Some((recorded.0, &recorded.1))).unwrap_err();
        assert!(e.why.contains("record 4 differs"), "{e}");
        Connection::open(d.path().join("tessera.db"))
            .unwrap()
            .execute("DELETE FROM audit_pending", [])
            .unwrap();

        let (_s2, snap) = SqliteStore::open(d.path(), u64::MAX, 100, &mut |_| {}).unwrap();
        assert_gap(d.path(), 6, 5, 6, 0, "replaced");
        assert_eq!(snap.audit_head.as_ref().unwrap().0, 7);
    }
}
