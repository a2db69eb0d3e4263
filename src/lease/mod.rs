//! Leases: every credential Tessera hands out is a lease that can be listed, traced to its
//! holder and revoked before it expires.
//!
//! Owns: the in-memory lease table (live and not-yet-expired revoked leases) with its indexes
//! by identity and by task, the expiry queue the reaper works from, the set of revoked
//! certificate serials the CRL is built from, and the kill list. Durability lives in
//! [`store`] (its WAL checkpoints in [`checkpoint`]); the background expiry in [`reaper`].

pub mod checkpoint;
pub mod expiry;
pub mod reaper;
pub mod store;

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use tokio::sync::{Notify, watch};

use self::expiry::ExpiryQueue;
use crate::spiffe_id::SpiffeId;

/// A lease id, written as 22 base64url characters; it is also the JWT `jti`.
///
/// 48 bits of Unix milliseconds, then 80 random bits (the ULID layout). The time prefix makes
/// ids of new leases sort after old ones, so the store appends to the right edge of its
/// B-tree instead of touching a random page per lease; 80 random bits keep ids unguessable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub [u8; 16]);

impl LeaseId {
    /// A fresh id for now.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        let ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        crate::entropy::fill(&mut b[6..]).expect("the system random source works");
        Self(b)
    }

    /// Parses the base64url form.
    pub fn parse(s: &str) -> Option<Self> {
        use base64::Engine;
        let v = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::jose::b64_encode(&self.0))
    }
}

/// Seconds after its expiry at which a revoked certificate's lease asks for a CRL to be
/// signed that still lists it. RFC 5280 §3.3: a revoked serial MUST NOT leave the CRL before it
/// appears on one CRL issued beyond the certificate's validity, and a CRL's `thisUpdate` is
/// dated [`crate::ca::CRL_BACKDATE`] back, so only one signed this much after `notAfter` is
/// issued beyond it. Without it a relying party whose clock runs behind (`notBefore` is dated
/// back for such peers) could still accept the revoked certificate from a CRL without it.
pub const CRL_RESIGN_AFTER_EXPIRY_S: i64 = crate::ca::CRL_BACKDATE.whole_seconds() + 1;

/// Seconds after its expiry at which a revoked certificate's serial leaves the CRL:
/// [`CRL_RESIGN_AFTER_EXPIRY_S`] later again, time for that CRL to be signed and fetched.
pub const CRL_KEPT_AFTER_EXPIRY_S: i64 = 2 * CRL_RESIGN_AFTER_EXPIRY_S;

/// Seconds after its expiry at which a revoked certificate's lease is retired. Until then it
/// is kept, in memory and in the store, and shown as revoked; the CRL lists it only while
/// the clock is before [`CRL_KEPT_AFTER_EXPIRY_S`] past its expiry. A wall clock that steps
/// forward (a bad NTP step, an RTC ahead at boot) takes the serial off the CRL while it is
/// wrong, but not for good: once it is back, the next CRL lists the serial again. (Retired at
/// the CRL's own horizon, the revocation was gone while the certificate was still valid for
/// every relying party with a right clock.) Revocations are few, so a day costs little.
pub const REVOKED_KEPT_AFTER_EXPIRY_S: i64 = 24 * 60 * 60;

/// What kind of credential a lease stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An X.509-SVID.
    X509 = 1,
    /// A JWT-SVID.
    Jwt = 2,
    /// A task token (token exchange).
    Task = 3,
}

impl Kind {
    /// Display and filter name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509-svid",
            Self::Jwt => "jwt-svid",
            Self::Task => "task-token",
        }
    }

    /// Parses [`Kind::as_str`] output (and short forms).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509-svid" | "x509" => Some(Self::X509),
            "jwt-svid" | "jwt" => Some(Self::Jwt),
            "task-token" | "task" => Some(Self::Task),
            _ => None,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        [Self::X509, Self::Jwt, Self::Task]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

/// Lease state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Valid.
    Active = 1,
    /// Revoked before its expiry.
    Revoked = 2,
    /// Past its expiry.
    Expired = 3,
}

impl State {
    /// Display and filter name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// Parses [`State::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "revoked" => Some(Self::Revoked),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        [Self::Active, Self::Revoked, Self::Expired]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

/// Who revoked a lease, when and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Actor label (`operator uid:0`, `kill`, ...).
    pub by: String,
    /// Reason given.
    pub reason: String,
}

// A lease lives in a 128-byte allocation (the table boxes it); see `serial`.
const _: () = assert!(std::mem::size_of::<Lease>() <= 128);

/// One lease. Strings are shared `Arc<str>`s: thousands of leases of one identity, entry or
/// process point at the same bytes, which keeps a live lease small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Id (JWT `jti`).
    pub id: LeaseId,
    /// Credential kind.
    pub kind: Kind,
    /// State.
    pub state: State,
    /// Holder uid.
    pub uid: u32,
    /// Holder pid.
    pub pid: i32,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Identity.
    pub spiffe_id: Arc<str>,
    /// Entry that granted it.
    pub entry_id: Arc<str>,
    /// Holder executable.
    pub exe: Option<Arc<str>>,
    /// Task, for task-scoped credentials.
    pub task_id: Option<Arc<str>>,
    /// X.509 serial. Boxed: inline, its 17 bytes took the lease past 128 bytes and into the
    /// allocator's 160-byte class, 32 bytes more for every lease; boxed, a JWT lease pays 8
    /// bytes and an X.509 lease 24.
    pub serial: Option<Box<[u8; 16]>>,
    /// Set when revoked; one kill shares one record among all the leases it revoked.
    pub revocation: Option<Arc<Revocation>>,
    /// The kill epoch when it was issued (the `seq` of the latest kill recorded): at load,
    /// exactly the kills with a higher `seq` came after it, whatever the clock said.
    pub kill_epoch: u32,
}

/// A kill-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// Its place among all kills ever recorded (1, 2, ...): the kill epoch it starts.
    pub seq: u32,
    /// The identity (and everything under its path).
    pub spiffe_id: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Actor label.
    pub by: String,
    /// Reason.
    pub reason: String,
}

/// A revoked certificate still inside its validity: a CRL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Serial.
    pub serial: [u8; 16],
    /// Unix seconds.
    pub revoked_at: i64,
    /// Unix seconds (the certificate's notAfter).
    pub expires_at: i64,
}

impl RevokedSerial {
    /// Whether a CRL signed at `now_s` lists it (see [`CRL_KEPT_AFTER_EXPIRY_S`]).
    pub fn listed_at(&self, now_s: i64) -> bool {
        now_s < self.expires_at + CRL_KEPT_AFTER_EXPIRY_S
    }
}

const MAX_TASK_ID_LEN: usize = 128;

/// `[A-Za-z0-9_-]`, 1 to 128 characters: always a valid SPIFFE path segment.
pub fn validate_task_id(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > MAX_TASK_ID_LEN {
        return Err(format!("task_id must be 1 to {MAX_TASK_ID_LEN} characters"));
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("task_id may contain only letters, digits, '_' and '-'".into());
    }
    Ok(())
}

/// The name a task is kept under: `<agent SPIFFE ID>/task/<task id>`, which is also the
/// SPIFFE ID of its task X.509-SVID. Task ids are the agent's own: agents that pick the same
/// id (ticket numbers, say) name two tasks, and none can take or block another's.
pub fn task_key(agent: &str, task_id: &str) -> String {
    format!("{agent}/task/{task_id}")
}

/// The task id (the agent's part) of a task name made by [`task_key`]. Unambiguous: a task id
/// has no `/`.
pub fn task_id_of(key: &str) -> &str {
    key.rsplit_once("/task/").map_or(key, |(_, id)| id)
}

/// What an operator may name a task by: a task id (`[A-Za-z0-9_-]`), or a task's full name,
/// `<agent SPIFFE ID>/task/<task id>`. The error names what was given.
pub fn validate_task_name(given: &str) -> Result<(), String> {
    let why = match given.rsplit_once("/task/") {
        None => validate_task_id(given)
            .map_err(|e| format!("{e} (or name a task in full: <agent SPIFFE ID>/task/<task id>)")),
        Some((agent, id)) => SpiffeId::parse(agent)
            .map_err(|e| format!("the agent part of the task name {e}"))
            .and_then(|_| validate_task_id(id)),
    };
    why.map_err(|e| {
        let shown: String = given.chars().take(128).collect();
        format!("task_id {shown:?}: {e}")
    })
}

/// A task: the unit task-scoped credentials belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Its name, [`task_key`]`(agent, task id)`.
    pub id: Arc<str>,
    /// SPIFFE ID of the agent whose task it is.
    pub agent: Arc<str>,
    /// First use, Unix ms.
    pub created_ms: i64,
    /// When it was completed, if it was.
    pub completed_ms: Option<i64>,
}

/// Outcome of [`LeaseTable::claim_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskClaim {
    /// Open and the caller's: the record, which the caller writes with every credential of
    /// the task. (Claimed by a concurrent request whose commit may fail, so a record in
    /// memory is not known to be durable; a claim whose credential was never issued stays
    /// until task pruning forgets it, as it holds no lease.)
    Open(Task),
    /// Completed: no more credentials.
    Completed,
}

/// The in-memory lease table.
#[derive(Debug)]
pub struct LeaseTable {
    /// Boxed: a hash table keeps up to half its slots empty after growing, and an empty slot
    /// then costs a pointer instead of a whole lease.
    leases: DashMap<LeaseId, Box<Lease>>,
    by_identity: DashMap<Arc<str>, HashSet<LeaseId>>,
    by_task: DashMap<Arc<str>, HashSet<LeaseId>>,
    /// Per task, how many of its leases the table holds in any state: a revoked credential
    /// still exists until it expires, and while one does its task is not forgotten.
    task_leases: DashMap<Arc<str>, u32>,
    expiry: Mutex<ExpiryQueue>,
    expiry_changed: Notify,
    revoked_serials: Mutex<HashMap<LeaseId, RevokedSerial>>,
    kills: RwLock<HashMap<String, Kill>>,
    /// Bumped on every kill and restore: what a stream checks before asking whether its
    /// caller gained an identity.
    kill_generation: std::sync::atomic::AtomicU64,
    /// The `seq` of the latest kill recorded (restored and pruned ones included): what new
    /// leases are stamped with, and one less than the next kill's `seq`.
    kill_epoch: std::sync::atomic::AtomicU32,
    tasks: DashMap<Arc<str>, Task>,
    /// Bumped on every revocation, kill and restore, and by the reaper when an expiry took
    /// revoked certificates off the CRL: streams and the CRL publisher re-check.
    changes: watch::Sender<u64>,
    /// Set when a revoked certificate must appear on a CRL signed from now on, although the
    /// set of revoked serials is unchanged (see [`CRL_RESIGN_AFTER_EXPIRY_S`]).
    crl_resign: std::sync::atomic::AtomicBool,
}

/// Below this many slots a table is left as it is: shrinking it would return little.
const COMPACT_MIN_CAPACITY: usize = 4096;
/// The same for one identity's or task's index set.
const SET_MIN_CAPACITY: usize = 64;
/// A table is shrunk when under 1/`SHRINK_BELOW` full, to `SHRINK_TO` times what is left
/// where the type allows it (see [`sparse`]).
const SHRINK_BELOW: usize = 8;
const SHRINK_TO: usize = 4;

/// True when a table of `capacity` slots holding `len` is worth shrinking. An eighth, not a
/// quarter: hashbrown doubles a table that is over half full when deleted slots force a
/// rehash, so a table shrunk to twice its size doubled again under steady churn and shrank
/// again at the next dip (the soak showed that cycle). Sets and queues shrink to four times
/// what is left and maps to fit (a map may then double once), which leaves a factor of two
/// of headroom both ways.
fn sparse(capacity: usize, len: usize, min_capacity: usize) -> bool {
    capacity >= min_capacity && capacity / SHRINK_BELOW > len
}

fn shrink_map<K: Eq + std::hash::Hash, V>(m: &DashMap<K, V>) -> bool {
    let shrink = sparse(m.capacity(), m.len(), COMPACT_MIN_CAPACITY);
    if shrink {
        m.shrink_to_fit();
    }
    shrink
}

/// Shrinks an index set that a revocation or expiry left mostly empty (see [`sparse`]);
/// small sets are left alone.
fn shrink_set(set: &mut HashSet<LeaseId>) {
    if sparse(set.capacity(), set.len(), SET_MIN_CAPACITY) {
        set.shrink_to(set.len() * SHRINK_TO);
    }
}

impl Default for LeaseTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Filters for [`LeaseTable::list`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exact identity, or with `prefix` everything under it.
    pub spiffe_id: Option<SpiffeId>,
    /// Match identities under `spiffe_id` too.
    pub prefix: bool,
    /// Task: its full name, or a task id (that id of every agent).
    pub task_id: Option<String>,
    /// State.
    pub state: Option<State>,
    /// Kind.
    pub kind: Option<Kind>,
}

impl LeaseTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            leases: DashMap::new(),
            by_identity: DashMap::new(),
            by_task: DashMap::new(),
            task_leases: DashMap::new(),
            expiry: Mutex::new(ExpiryQueue::default()),
            expiry_changed: Notify::new(),
            revoked_serials: Mutex::new(HashMap::new()),
            kills: RwLock::new(HashMap::new()),
            kill_generation: Default::default(),
            kill_epoch: Default::default(),
            tasks: DashMap::new(),
            changes: watch::channel(0).0,
            crl_resign: Default::default(),
        }
    }

    /// Whether a CRL must be signed although the revoked serials are the same (a revoked
    /// certificate just expired); clears the request.
    pub fn take_crl_resign(&self) -> bool {
        self.crl_resign
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Restores task records at start.
    pub fn load_tasks(&self, tasks: Vec<Task>) {
        for t in tasks {
            self.tasks.insert(Arc::clone(&t.id), t);
        }
    }

    /// A task's record, by its name ([`task_key`]).
    pub fn task(&self, key: &str) -> Option<Task> {
        self.tasks.get(key).map(|t| t.clone())
    }

    /// The tasks an operator means by `given`: a task's full name, or a bare task id, which
    /// matches that id of every agent that used it. Sorted by name.
    pub fn find_tasks(&self, given: &str) -> Vec<Task> {
        let mut out: Vec<Task> = if given.contains('/') {
            self.task(given).into_iter().collect()
        } else {
            self.tasks
                .iter()
                .filter(|t| task_id_of(&t.id) == given)
                .map(|t| t.clone())
                .collect()
        };
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Opens `agent`'s task `task_id` (creating its record on first use), atomically with
    /// any completion.
    pub fn claim_task(&self, agent: &str, task_id: &str, now_ms: i64) -> TaskClaim {
        use dashmap::mapref::entry::Entry as E;
        match self.tasks.entry(Arc::from(task_key(agent, task_id))) {
            E::Occupied(o) => {
                let t = o.get();
                if t.completed_ms.is_some() {
                    TaskClaim::Completed
                } else {
                    TaskClaim::Open(t.clone())
                }
            }
            E::Vacant(v) => {
                let t = Task {
                    id: Arc::clone(v.key()),
                    agent: Arc::from(agent),
                    created_ms: now_ms,
                    completed_ms: None,
                };
                v.insert(t.clone());
                TaskClaim::Open(t)
            }
        }
    }

    /// Number of task records held.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks first used before `cutoff_ms` of which the table holds no lease (active, or
    /// revoked and not yet retired): the records
    /// [`crate::issuer::Issuer::prune_tasks`] may forget. Of `ids` when given (the re-check
    /// under the issuance barrier), else of all tasks.
    pub fn stale_tasks(&self, cutoff_ms: i64, ids: Option<&[Arc<str>]>) -> Vec<Arc<str>> {
        let stale = |t: &Task| t.created_ms < cutoff_ms && !self.task_leases.contains_key(&*t.id);
        match ids {
            Some(ids) => ids
                .iter()
                .filter(|id| self.tasks.get(&***id).is_some_and(|t| stale(&t)))
                .cloned()
                .collect(),
            None => self
                .tasks
                .iter()
                .filter(|t| stale(t.value()))
                .map(|t| Arc::clone(t.key()))
                .collect(),
        }
    }

    /// Drops task records (already deleted from the store).
    pub fn forget_tasks(&self, ids: &[Arc<str>]) {
        for id in ids {
            self.tasks.remove(id);
        }
    }

    /// Returns memory that bursts left behind: a hash table or queue keeps the capacity of its
    /// largest size, so after a million leases expire (or a day of tasks is pruned) the daemon
    /// would otherwise hold their slots for good. Shrinks only what is under an eighth full
    /// ([`sparse`]), to four times what is left where the type allows (the maps shrink to
    /// fit, and may double once afterwards), so steady churn does not shrink and regrow, and
    /// each shrink (a rehash of what is left) is paid for by the removals that emptied the
    /// table. Returns how many were shrunk.
    pub fn compact(&self) -> usize {
        let mut n = 0;
        n += usize::from(shrink_map(&self.leases));
        n += usize::from(shrink_map(&self.by_identity));
        n += usize::from(shrink_map(&self.by_task));
        n += usize::from(shrink_map(&self.task_leases));
        n += usize::from(shrink_map(&self.tasks));
        {
            let mut queue = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
            let (capacity, len) = queue.heap_room();
            if sparse(capacity, len, COMPACT_MIN_CAPACITY) {
                queue.shrink_heap_to(len * SHRINK_TO);
                n += 1;
            }
        }
        let mut serials = self
            .revoked_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if sparse(serials.capacity(), serials.len(), COMPACT_MIN_CAPACITY) {
            let keep = serials.len() * SHRINK_TO;
            serials.shrink_to(keep);
            n += 1;
        }
        n
    }

    /// Marks a task completed. Returns false if it was unknown.
    pub fn complete_task(&self, id: &str, at_ms: i64) -> bool {
        match self.tasks.get_mut(id) {
            Some(mut t) => {
                t.completed_ms.get_or_insert(at_ms);
                true
            }
            None => false,
        }
    }

    /// The shared `Arc<str>` for an identity, so that leases of one identity share its bytes.
    pub fn intern_identity(&self, id: &str) -> Arc<str> {
        match self.by_identity.get(id) {
            Some(e) => Arc::clone(e.key()),
            None => Arc::from(id),
        }
    }

    /// Adds a lease (active or revoked).
    pub fn insert(&self, lease: Lease) {
        let (id, exp) = (lease.id, lease.expires_at);
        if lease.state == State::Active {
            self.by_identity
                .entry(Arc::clone(&lease.spiffe_id))
                .or_default()
                .insert(id);
            if let Some(t) = &lease.task_id {
                self.by_task.entry(Arc::clone(t)).or_default().insert(id);
            }
        } else if let (Some(&serial), Some(r)) = (lease.serial.as_deref(), &lease.revocation) {
            self.revoked_serials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    id,
                    RevokedSerial {
                        serial,
                        revoked_at: r.at_ms / 1000,
                        expires_at: exp,
                    },
                );
        }
        if let Some(t) = &lease.task_id {
            self.hold_task(t);
        }
        self.leases.insert(id, Box::new(lease));
        let mut queue = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        let sooner = queue.next_due().is_none_or(|t| exp < t);
        queue.push(exp, id);
        drop(queue);
        if sooner {
            self.expiry_changed.notify_one();
        }
    }

    /// Number of leases held (active, and revoked until retired: see [`Self::expire_due`]).
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no lease is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Active leases granted by entry `entry_id` whose identity `keep` accepts. Walks the
    /// whole table: for start-up, not the issuance path.
    pub fn active_of_entry(&self, entry_id: &str, keep: impl Fn(&str) -> bool) -> Vec<LeaseId> {
        self.leases
            .iter()
            .filter(|l| l.state == State::Active && &*l.entry_id == entry_id && keep(&l.spiffe_id))
            .map(|l| l.id)
            .collect()
    }

    /// Number of active leases.
    pub fn active_count(&self) -> usize {
        self.by_identity.iter().map(|e| e.value().len()).sum()
    }

    /// A copy of a lease.
    pub fn get(&self, id: &LeaseId) -> Option<Lease> {
        let l = Lease::clone(&*self.leases.get(id)?);
        let kills = self.kills.read().unwrap_or_else(|e| e.into_inner());
        Some(with_kill(l, &kills))
    }

    /// True when a kill covers `spiffe_id`; cheap when the kill list is empty.
    fn kill_covers(&self, spiffe_id: &str) -> bool {
        let kills = self.kills.read().unwrap_or_else(|e| e.into_inner());
        !kills.is_empty() && covering_kill(&kills, spiffe_id).is_some()
    }

    /// How many active leases `id` and the identities under its path hold, without touching
    /// the leases: the kill switch reports it before marking them.
    pub fn active_in_tree(&self, id: &SpiffeId) -> usize {
        self.by_identity
            .iter()
            .filter(|e| SpiffeId::parse(e.key()).is_ok_and(|k| k.is_within(id)))
            .map(|e| e.value().len())
            .sum()
    }

    /// True when the lease exists, is active and has not reached its expiry.
    ///
    /// A lease under a kill counts as revoked from the moment the kill is in the kill list,
    /// before [`LeaseTable::revoke_identity_tree`] has marked it, so that the kill switch
    /// takes effect in the time of one durable write, not of one update per lease.
    pub fn is_active(&self, id: &LeaseId, now_s: i64) -> bool {
        self.leases.get(id).is_some_and(|l| self.live(&l, now_s))
    }

    /// Active, unexpired and not covered by a kill.
    fn live(&self, l: &Lease, now_s: i64) -> bool {
        l.state == State::Active && now_s < l.expires_at && !self.kill_covers(&l.spiffe_id)
    }

    /// As [`Self::is_active`], and the lease is of `kind` and held by `spiffe_id`: what the
    /// `jti` of a presented credential must name, so that one kind cannot pass for another.
    pub fn is_active_for(&self, id: &LeaseId, kind: Kind, spiffe_id: &str, now_s: i64) -> bool {
        self.leases
            .get(id)
            .is_some_and(|l| l.kind == kind && &*l.spiffe_id == spiffe_id && self.live(&l, now_s))
    }

    /// Ids of the active leases of `id` and, if `tree`, of every identity under its path.
    /// Costs time in the number of identities and leases returned, not the table size.
    pub fn active_of_identity(&self, id: &SpiffeId, tree: bool) -> Vec<LeaseId> {
        if !tree {
            return self
                .by_identity
                .get(id.as_str())
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
        }
        let mut out = Vec::new();
        for e in &self.by_identity {
            if SpiffeId::parse(e.key()).is_ok_and(|k| k.is_within(id)) {
                out.extend(e.value().iter().copied());
            }
        }
        out
    }

    /// Ids of the active leases of a task (by its name, [`task_key`]).
    pub fn active_of_task(&self, task: &str) -> Vec<LeaseId> {
        self.by_task
            .get(task)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Marks leases revoked in memory; returns how many of each kind were active (indexed by
    /// `Kind as usize - 1`). Durability is the caller's job (it writes first, then calls this).
    ///
    /// Cost is linear in `ids` with one index update per distinct identity and task, so a kill
    /// of 100k leases of one identity touches the identity index once.
    pub fn revoke(&self, ids: &[LeaseId], rev: &Arc<Revocation>) -> [usize; 3] {
        let mut counts = [0usize; 3];
        let mut serials = Vec::new();
        let mut by_identity: HashMap<Arc<str>, Vec<LeaseId>> = HashMap::new();
        let mut by_task: HashMap<Arc<str>, Vec<LeaseId>> = HashMap::new();
        for id in ids {
            let Some(mut l) = self.leases.get_mut(id) else {
                continue;
            };
            if l.state != State::Active {
                continue;
            }
            l.state = State::Revoked;
            l.revocation = Some(Arc::clone(rev));
            counts[l.kind as usize - 1] += 1;
            if let Some(&s) = l.serial.as_deref() {
                serials.push((
                    *id,
                    RevokedSerial {
                        serial: s,
                        revoked_at: rev.at_ms / 1000,
                        expires_at: l.expires_at,
                    },
                ));
            }
            by_identity
                .entry(Arc::clone(&l.spiffe_id))
                .or_default()
                .push(*id);
            if let Some(t) = &l.task_id {
                by_task.entry(Arc::clone(t)).or_default().push(*id);
            }
        }
        for (index, groups) in [(&self.by_identity, by_identity), (&self.by_task, by_task)] {
            for (key, ids) in groups {
                if let Some(mut set) = index.get_mut(&key) {
                    // A kill revokes an identity's whole set: drop it instead of emptying it.
                    if set.len() == ids.len() {
                        set.clear();
                    } else {
                        for id in &ids {
                            set.remove(id);
                        }
                        shrink_set(&mut set);
                    }
                    let empty = set.is_empty();
                    drop(set);
                    if empty {
                        index.remove_if(&key, |_, s| s.is_empty());
                    }
                }
            }
        }
        self.publish_revoked(&serials);
        if counts.iter().any(|c| *c > 0) {
            self.announce_change();
        }
        counts
    }

    /// Puts certificates that [`Self::revoke`] or [`Self::revoke_identity_tree`] just marked
    /// on the CRL. Their leases were marked first, each under its own entry's lock, so the
    /// reaper can retire one in between: it then found no serial to take off the CRL, and
    /// the serial would stay there until a restart. Hence the check after the insert: the
    /// reaper removes a lease before its serial, so either it sees the serial inserted here
    /// or this sees the lease gone.
    fn publish_revoked(&self, serials: &[(LeaseId, RevokedSerial)]) {
        if serials.is_empty() {
            return;
        }
        {
            // Reserve first: a kill can add 100k serials, and growing step by step rehashes.
            let mut set = self
                .revoked_serials
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            set.reserve(serials.len());
            set.extend(serials.iter().copied());
        }
        // Looked up with the CRL's lock released: the reaper takes a lease entry's lock and
        // then, separately, the CRL's, and this keeps to one lock at a time as well.
        let retired: Vec<LeaseId> = serials
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.leases.contains_key(id))
            .collect();
        if !retired.is_empty() {
            let mut set = self
                .revoked_serials
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for id in &retired {
                set.remove(id);
            }
        }
    }

    fn unindex(&self, l: &Lease) {
        for (index, key) in [
            (&self.by_identity, Some(&l.spiffe_id)),
            (&self.by_task, l.task_id.as_ref()),
        ] {
            let Some(key) = key else { continue };
            if let Some(mut set) = index.get_mut(key) {
                set.remove(&l.id);
                shrink_set(&mut set);
                let empty = set.is_empty();
                drop(set);
                if empty {
                    index.remove_if(key, |_, s| s.is_empty());
                }
            }
        }
    }

    /// Kill-switch revocation: every active lease of `id` and of identities under its path.
    /// Takes each identity's whole index set in one removal and touches only those leases,
    /// so the cost is the number of leases revoked (no per-lease index bookkeeping).
    pub fn revoke_identity_tree(&self, id: &SpiffeId, rev: &Arc<Revocation>) -> [usize; 3] {
        let keys: Vec<Arc<str>> = self
            .by_identity
            .iter()
            .filter(|e| SpiffeId::parse(e.key()).is_ok_and(|k| k.is_within(id)))
            .map(|e| Arc::clone(e.key()))
            .collect();
        let mut counts = [0usize; 3];
        let mut serials = Vec::new();
        let mut by_task: HashMap<Arc<str>, Vec<LeaseId>> = HashMap::new();
        for key in keys {
            let Some((_, set)) = self.by_identity.remove(&key) else {
                continue;
            };
            for lid in set {
                let Some(mut l) = self.leases.get_mut(&lid) else {
                    continue;
                };
                if l.state != State::Active {
                    continue;
                }
                l.state = State::Revoked;
                l.revocation = Some(Arc::clone(rev));
                counts[l.kind as usize - 1] += 1;
                if let Some(&s) = l.serial.as_deref() {
                    serials.push((
                        lid,
                        RevokedSerial {
                            serial: s,
                            revoked_at: rev.at_ms / 1000,
                            expires_at: l.expires_at,
                        },
                    ));
                }
                if let Some(t) = &l.task_id {
                    by_task.entry(Arc::clone(t)).or_default().push(lid);
                }
            }
        }
        for (key, ids) in by_task {
            if let Some(mut set) = self.by_task.get_mut(&key) {
                for id in &ids {
                    set.remove(id);
                }
                shrink_set(&mut set);
                let empty = set.is_empty();
                drop(set);
                if empty {
                    self.by_task.remove_if(&key, |_, s| s.is_empty());
                }
            }
        }
        self.publish_revoked(&serials);
        if counts.iter().any(|c| *c > 0) {
            self.announce_change();
        }
        counts
    }

    /// Adds many leases at once (restore at start).
    pub fn insert_many(&self, leases: Vec<Lease>) {
        let mut queue: Vec<(i64, LeaseId)> = Vec::with_capacity(leases.len());
        let mut revoked = Vec::new();
        for lease in leases {
            queue.push((lease.expires_at, lease.id));
            if lease.state == State::Active {
                self.by_identity
                    .entry(Arc::clone(&lease.spiffe_id))
                    .or_default()
                    .insert(lease.id);
                if let Some(t) = &lease.task_id {
                    self.by_task
                        .entry(Arc::clone(t))
                        .or_default()
                        .insert(lease.id);
                }
            } else if let (Some(&serial), Some(r)) = (lease.serial.as_deref(), &lease.revocation) {
                revoked.push((
                    lease.id,
                    RevokedSerial {
                        serial,
                        revoked_at: r.at_ms / 1000,
                        expires_at: lease.expires_at,
                    },
                ));
            }
            if let Some(t) = &lease.task_id {
                self.hold_task(t);
            }
            self.leases.insert(lease.id, Box::new(lease));
        }
        self.revoked_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(revoked);
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(queue);
        self.expiry_changed.notify_one();
    }

    /// Removes up to `max` leases whose expiry is at or before `now_s` (soonest second first,
    /// but see [`ExpiryQueue::take_due`]);
    /// returns their ids and whether the CRL must be signed again (a revoked certificate left
    /// it, or one just expired must appear on a CRL issued after its expiry). A revoked
    /// certificate's lease is kept [`REVOKED_KEPT_AFTER_EXPIRY_S`] past its expiry, asking for
    /// a CRL at [`CRL_RESIGN_AFTER_EXPIRY_S`] and again at [`CRL_KEPT_AFTER_EXPIRY_S`], when
    /// its serial leaves the CRL. Bounded so that a caller retiring a mass expiry
    /// holds the expiry queue's lock (which every issuance takes) and its thread for a short
    /// slice at a time. It does not notify subscribers: when the CRL changed, the caller calls
    /// [`Self::announce_change`] once it has retired everything due, so that the CRL is
    /// rebuilt once per expiry, not once per slice.
    #[must_use = "a change to the CRL must be announced"]
    #[cfg(test)]
    pub(crate) fn expire_due(&self, now_s: i64, max: usize) -> (Vec<LeaseId>, bool) {
        self.expire_due_after(now_s, max, None)
    }

    /// As [`Self::expire_due`], right after the wall clock jumped `step` seconds ahead to
    /// `now_s`, when `stepped` is `Some(step)`. Active leases the jump alone made due (their
    /// expiry after `now_s - step`) are kept, queued at their expiry plus `step`: if the clock
    /// is wrong, their credentials are still valid for relying parties with the right time,
    /// and only a lease in the table can be revoked or killed onto the CRL (review AR-2).
    /// What they hold is bounded by the table at the jump, unlike a reaper that ran behind
    /// the clock for every lease issued after it too. If the jump was right (an NTP
    /// correction, a suspend), they leave `step` seconds late.
    #[must_use = "a change to the CRL must be announced"]
    pub(crate) fn expire_due_after(
        &self,
        now_s: i64,
        max: usize,
        stepped: Option<i64>,
    ) -> (Vec<LeaseId>, bool) {
        let held_back = |l: &Lease| {
            stepped.filter(|&step| l.state == State::Active && l.expires_at > now_s - step)
        };
        let mut due = Vec::with_capacity(max.min(4096));
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_due(now_s, max, &mut due);
        let mut crl_changed = false;
        let mut removed = Vec::with_capacity(due.len());
        let mut kept = Vec::new();
        // A copy, not the lock: the lease map's shard is locked while a lease is looked at,
        // and readers take the kill list's lock before the shards'.
        let kills = {
            let k = self.kills.read().unwrap_or_else(|e| e.into_inner());
            (!k.is_empty()).then(|| k.clone())
        };
        for id in due {
            // One lookup for all but a revoked certificate within its time kept past its
            // expiry, which stays.
            // A certificate under a kill counts as revoked even before the kill's marking
            // reaches it: retired now, its serial would never be listed.
            let kept_revoked = |l: &Lease| {
                l.serial.is_some()
                    && now_s < l.expires_at + REVOKED_KEPT_AFTER_EXPIRY_S
                    && (l.state != State::Active
                        || kills
                            .as_ref()
                            .is_some_and(|k| covering_kill(k, &l.spiffe_id).is_some()))
            };
            let Some((_, l)) = self
                .leases
                .remove_if(&id, |_, l| !kept_revoked(l) && held_back(l).is_none())
            else {
                // Kept, or gone already. A revoked certificate keeps its own schedule.
                let Some((exp, held)) = self.leases.get(&id).map(|l| {
                    let held = if kept_revoked(&l) {
                        None
                    } else {
                        held_back(&l)
                    };
                    (l.expires_at, held)
                }) else {
                    continue;
                };
                if let Some(step) = held {
                    kept.push((exp + step, id));
                } else if now_s < exp + CRL_RESIGN_AFTER_EXPIRY_S {
                    kept.push((exp + CRL_RESIGN_AFTER_EXPIRY_S, id));
                } else if now_s < exp + CRL_KEPT_AFTER_EXPIRY_S {
                    // Its serial is unchanged on the CRL, so the publisher must be told.
                    self.crl_resign
                        .store(true, std::sync::atomic::Ordering::Release);
                    crl_changed = true;
                    kept.push((exp + CRL_KEPT_AFTER_EXPIRY_S, id));
                } else {
                    // Off the CRL from now on (see `revoked_serials`), still kept.
                    crl_changed = true;
                    kept.push((exp + REVOKED_KEPT_AFTER_EXPIRY_S, id));
                }
                continue;
            };
            if let Some(t) = &l.task_id {
                self.release_task(t);
            }
            if l.state == State::Active {
                self.unindex(&l);
            } else if l.serial.is_some() {
                // Retired a day past its expiry: off the CRL since `CRL_KEPT_AFTER_EXPIRY_S`,
                // so the CRL does not change.
                self.revoked_serials
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
            removed.push(id);
        }
        if !kept.is_empty() {
            // Due later than `now_s`, so a caller looping until nothing is due stops.
            self.expiry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(kept);
        }
        (removed, crl_changed)
    }

    /// After the wall clock went back: revoked certificates listed on the CRL again are
    /// queued at their expiry once more, so that a CRL dated after it lists them (RFC 5280
    /// §3.3; a clock that ran ahead had queued them straight for retirement). A lease queued
    /// twice is retired once: the later entry finds it gone. Only those `ahead_s`, the clock
    /// as it last was ahead, had taken past that point: the others are still queued there.
    pub fn requeue_listed(&self, now_s: i64, ahead_s: i64) {
        let listed: Vec<(i64, LeaseId)> = self
            .revoked_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| {
                r.listed_at(now_s) && r.expires_at + CRL_RESIGN_AFTER_EXPIRY_S <= ahead_s
            })
            .map(|(id, r)| (r.expires_at + CRL_RESIGN_AFTER_EXPIRY_S, *id))
            .collect();
        if !listed.is_empty() {
            self.expiry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(listed);
            self.expiry_changed.notify_one();
        }
    }

    /// Has the CRL publisher sign a CRL now even if the set of serials it lists is unchanged:
    /// after the wall clock went back, the CRL served is dated in the future, which relying
    /// parties refuse ("not yet valid") until a new one is signed.
    pub fn request_crl_resign(&self) {
        self.crl_resign
            .store(true, std::sync::atomic::Ordering::Release);
        self.announce_change();
    }

    /// Tells subscribers (the CRL publisher, Workload API streams) that revocation state
    /// changed: every revocation, kill and restore calls it, and the reaper once per expiry
    /// (see [`Self::expire_due`]).
    pub fn announce_change(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// One more lease of task `t` is in the table.
    fn hold_task(&self, t: &Arc<str>) {
        *self.task_leases.entry(Arc::clone(t)).or_default() += 1;
    }

    /// One lease of task `t` left the table.
    fn release_task(&self, t: &str) {
        let Some(mut n) = self.task_leases.get_mut(t) else {
            return;
        };
        *n = n.saturating_sub(1);
        let gone = *n == 0;
        drop(n);
        if gone {
            self.task_leases.remove_if(t, |_, n| *n == 0);
        }
    }

    /// Moves up to `max` leases coming within the expiry queue's bucketed window out of its
    /// heap (see [`expiry`]); returns how many moved. The reaper calls it after each pass,
    /// until fewer than `max` move, taking the queue's lock once per call.
    pub(crate) fn promote_expiries(&self, now_s: i64, max: usize) -> usize {
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .promote(now_s, max)
    }

    /// The soonest expiry in the queue.
    pub fn next_deadline(&self) -> Option<i64> {
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_due()
    }

    /// Resolves when a lease with an earlier expiry than any before it was added.
    pub async fn deadline_changed(&self) {
        self.expiry_changed.notified().await;
    }

    /// What the CRL lists at `now_s`: revoked certificates still within their validity (or
    /// expired less than [`CRL_KEPT_AFTER_EXPIRY_S`] ago), latest expiry first. Decided by
    /// the clock at each call, so that kept serials come back after a clock went back.
    pub fn revoked_serials(&self, now_s: i64) -> Vec<RevokedSerial> {
        let mut v: Vec<_> = self
            .revoked_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.listed_at(now_s))
            .copied()
            .collect();
        v.sort_by_key(|r| Reverse(r.expires_at));
        v
    }

    /// Active leases matching `f`, sorted by issue time then id. Cost is proportional to the
    /// table for an unfiltered list; identity and task filters use the indexes.
    pub fn list(&self, f: &Filter) -> Vec<Lease> {
        let mut out: Vec<Lease> = match (&f.spiffe_id, &f.task_id, f.state) {
            (Some(id), _, Some(State::Active)) => self
                .active_of_identity(id, f.prefix)
                .iter()
                .filter_map(|i| self.get(i))
                .collect(),
            (None, Some(t), Some(State::Active)) => self
                .find_tasks(t)
                .iter()
                .flat_map(|t| self.active_of_task(&t.id))
                .filter_map(|i| self.get(&i))
                .collect(),
            _ => {
                let kills = self.kills.read().unwrap_or_else(|e| e.into_inner());
                self.leases
                    .iter()
                    .map(|l| with_kill(Lease::clone(&l), &kills))
                    .collect()
            }
        };
        out.retain(|l| {
            f.kind.is_none_or(|k| l.kind == k)
                && f.state.is_none_or(|s| l.state == s)
                && f.task_id.as_deref().is_none_or(|t| {
                    l.task_id
                        .as_deref()
                        .is_some_and(|k| k == t || (!t.contains('/') && task_id_of(k) == t))
                })
                && f.spiffe_id.as_ref().is_none_or(|id| {
                    &*l.spiffe_id == id.as_str()
                        || (f.prefix
                            && SpiffeId::parse(&l.spiffe_id).is_ok_and(|x| x.is_within(id)))
                })
        });
        out.sort_by_key(|l| (l.issued_at, l.id));
        out
    }

    /// True when `id` or an identity above it (by whole path segments) is killed.
    pub fn is_killed(&self, id: &SpiffeId) -> bool {
        self.kill_covers(id.as_str())
    }

    /// The current kill epoch ([`Lease::kill_epoch`]). Read under the issuance barrier,
    /// which a kill holds exclusively until its epoch is in force.
    pub fn kill_epoch(&self) -> u32 {
        self.kill_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Raises the kill epoch to at least `seq` (at start: the store's latest kill).
    pub fn raise_kill_epoch(&self, seq: u32) {
        self.kill_epoch
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    /// Adds to the kill list (and raises the kill epoch to its `seq`).
    pub fn add_kill(&self, k: Kill) {
        self.raise_kill_epoch(k.seq);
        self.kills
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k.spiffe_id.clone(), k);
        self.kill_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.announce_change();
    }

    /// Changes with every kill and restore.
    pub fn kill_generation(&self) -> u64 {
        self.kill_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Removes from the kill list; returns whether it was there.
    pub fn remove_kill(&self, id: &str) -> bool {
        let had = self
            .kills
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some();
        if had {
            self.kill_generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            self.announce_change();
        }
        had
    }

    /// The kill list, sorted by identity.
    pub fn kills(&self) -> Vec<Kill> {
        let mut v: Vec<Kill> = self
            .kills
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        v
    }

    /// Notified on every revocation, kill and restore, and once per expiry that took revoked
    /// certificates off the CRL.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The kill on `spiffe_id` or on an identity above it (by whole path segments), if any.
fn covering_kill<'a>(kills: &'a HashMap<String, Kill>, spiffe_id: &str) -> Option<&'a Kill> {
    if let Some(k) = kills.get(spiffe_id) {
        return Some(k);
    }
    // Walk up: spiffe://td/a/b/c → /a/b → /a. The path starts at the first '/' after the
    // scheme and trust domain.
    let root = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.find('/'))
        .map(|i| i + "spiffe://".len())?;
    spiffe_id[root..]
        .match_indices('/')
        .filter(|(i, _)| *i > 0)
        .find_map(|(i, _)| kills.get(&spiffe_id[..root + i]))
        // The trust domain's own ID covers every identity in it.
        .or_else(|| kills.get(&spiffe_id[..root]))
}

/// A lease as readers must see it: active leases under a kill are revoked by it, even before
/// the kill has marked them one by one.
fn with_kill(mut l: Lease, kills: &HashMap<String, Kill>) -> Lease {
    if l.state == State::Active
        && !kills.is_empty()
        && let Some(k) = covering_kill(kills, &l.spiffe_id)
    {
        l.state = State::Revoked;
        l.revocation = Some(Arc::new(Revocation {
            at_ms: k.at_ms,
            by: format!("kill by {}", k.by),
            reason: k.reason.clone(),
        }));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn lease(t: &LeaseTable, id: &str, task: Option<&str>, exp: i64) -> Lease {
        Lease {
            id: LeaseId::random(),
            kind: Kind::X509,
            state: State::Active,
            uid: 1,
            pid: 2,
            issued_at: 0,
            expires_at: exp,
            spiffe_id: t.intern_identity(id),
            entry_id: "e".into(),
            exe: None,
            task_id: task.map(Arc::from),
            serial: Some(Box::new([7; 16])),
            revocation: None,
            kill_epoch: 0,
        }
    }

    #[test]
    fn a_step_back_requeues_only_what_the_clock_ahead_took_past_its_expiry() {
        let t = LeaseTable::new();
        let (a, b) = (
            lease(&t, "spiffe://td/a", None, 100),
            lease(&t, "spiffe://td/b", None, 10_000),
        );
        t.insert(a.clone());
        t.insert(b.clone());
        let rev = Arc::new(Revocation {
            at_ms: 50_000,
            by: "op".into(),
            reason: "r".into(),
        });
        t.revoke(&[a.id, b.id], &rev);
        let queued = || t.expiry.lock().unwrap().len();
        assert_eq!(queued(), 2);
        // The clock ran ahead to 200 and is back at 50: a was taken past its expiry, b was
        // not and is still queued at it.
        t.requeue_listed(50, 200);
        assert_eq!(queued(), 3);
        assert_eq!(t.next_deadline(), Some(100));
        assert!(
            t.expiry
                .lock()
                .unwrap()
                .iter()
                .any(|(at, id)| id == a.id && at == 100 + CRL_RESIGN_AFTER_EXPIRY_S)
        );
    }

    #[test]
    fn a_lease_passes_only_for_its_own_kind_and_holder() {
        let t = LeaseTable::new();
        let jwt = Lease {
            kind: Kind::Jwt,
            ..lease(&t, "spiffe://td/a", None, 100)
        };
        let task = Lease {
            kind: Kind::Task,
            ..lease(&t, "spiffe://td/a", Some("t1"), 100)
        };
        t.insert(jwt.clone());
        t.insert(task.clone());
        assert!(t.is_active_for(&jwt.id, Kind::Jwt, "spiffe://td/a", 10));
        assert!(!t.is_active_for(&jwt.id, Kind::Jwt, "spiffe://td/b", 10));
        assert!(!t.is_active_for(&jwt.id, Kind::Jwt, "spiffe://td/a", 100));
        // Active, but a task token's lease: not a JWT-SVID.
        assert!(t.is_active(&task.id, 10));
        assert!(!t.is_active_for(&task.id, Kind::Jwt, "spiffe://td/a", 10));
        assert!(!t.is_active_for(&LeaseId::random(), Kind::Jwt, "spiffe://td/a", 10));
    }

    #[test]
    fn lease_ids_round_trip() {
        let id = LeaseId::random();
        assert_eq!(LeaseId::parse(&id.to_string()), Some(id));
        assert_eq!(id.to_string().len(), 22);
        assert!(LeaseId::parse("short").is_none());
    }

    #[test]
    fn expiry_is_retired_soonest_first_at_most_max_at_a_time() {
        let t = LeaseTable::new();
        let [a, b, c] = [30, 10, 20].map(|exp| {
            let l = lease(&t, "spiffe://td/a", None, exp);
            t.insert(l.clone());
            l.id
        });
        assert_eq!(t.expire_due(25, 1).0, vec![b]);
        assert_eq!(t.expire_due(25, 5).0, vec![c], "only what is due");
        assert!(t.expire_due(25, 5).0.is_empty());
        assert_eq!(t.next_deadline(), Some(30));
        assert_eq!(
            t.active_of_identity(&SpiffeId::parse("spiffe://td/a").unwrap(), false),
            vec![a],
            "the retired left the identity's index"
        );
    }

    #[test]
    fn kill_matches_whole_segments_up_the_path() {
        let t = LeaseTable::new();
        t.add_kill(Kill {
            seq: 1,
            spiffe_id: "spiffe://td/a/agent".into(),
            at_ms: 0,
            by: "x".into(),
            reason: "r".into(),
        });
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        assert!(t.is_killed(&id("spiffe://td/a/agent")));
        assert!(t.is_killed(&id("spiffe://td/a/agent/task/7")));
        assert!(!t.is_killed(&id("spiffe://td/a/agent2")));
        assert!(!t.is_killed(&id("spiffe://td/a")));
        assert!(!t.is_killed(&id("spiffe://other/a/agent")));
        assert!(t.remove_kill("spiffe://td/a/agent"));
        assert!(!t.is_killed(&id("spiffe://td/a/agent/task/7")));
        // The trust domain's ID covers everything in it, and nothing outside it.
        t.add_kill(Kill {
            seq: 1,
            spiffe_id: "spiffe://td".into(),
            at_ms: 0,
            by: "x".into(),
            reason: "r".into(),
        });
        assert!(t.is_killed(&id("spiffe://td")));
        assert!(t.is_killed(&id("spiffe://td/a")));
        assert!(t.is_killed(&id("spiffe://td/a/agent/task/7")));
        assert!(!t.is_killed(&id("spiffe://td2/a")));
        assert!(!t.is_killed(&id("spiffe://other/a/agent")));
    }

    #[test]
    fn revoke_and_expire_keep_indexes_and_crl_consistent() {
        let t = LeaseTable::new();
        let a = lease(&t, "spiffe://td/a", Some("t1"), 100);
        let b = lease(&t, "spiffe://td/a/task/t1", Some("t1"), 200);
        let c = lease(&t, "spiffe://td/a2", None, 300);
        for l in [&a, &b, &c] {
            t.insert(l.clone());
        }
        let tree = t.active_of_identity(&SpiffeId::parse("spiffe://td/a").unwrap(), true);
        assert_eq!(tree.len(), 2, "a and its task identity, not a2");
        assert_eq!(t.active_of_task("t1").len(), 2);
        let rev = Revocation {
            at_ms: 50_000,
            by: "op".into(),
            reason: "test".into(),
        };
        let rev = Arc::new(rev);
        assert_eq!(t.revoke(&[a.id, a.id], &rev), [1, 0, 0]);
        assert!(!t.is_active(&a.id, 60));
        assert_eq!(t.active_of_task("t1"), vec![b.id]);
        assert_eq!(t.revoked_serials(0).len(), 1);
        // A revoked certificate stays on the CRL past its expiry (RFC 5280 §3.3): kept at its
        // expiry, a CRL asked for once one can be dated after it, then retired.
        let (gone, crl) = t.expire_due(100, usize::MAX);
        assert_eq!((gone.len(), crl), (0, false));
        assert_eq!(t.next_deadline(), Some(100 + CRL_RESIGN_AFTER_EXPIRY_S));
        assert!(!t.take_crl_resign());
        let (gone, crl) = t.expire_due(100 + CRL_RESIGN_AFTER_EXPIRY_S, usize::MAX);
        assert_eq!((gone.len(), crl), (0, true), "no CRL after its expiry");
        // The serials are the same, so the publisher is told to sign anyway.
        assert!(t.take_crl_resign());
        assert!(!t.take_crl_resign(), "taken once");
        assert_eq!(t.revoked_serials(100 + CRL_RESIGN_AFTER_EXPIRY_S).len(), 1);
        assert_eq!(t.get(&a.id).unwrap().state, State::Revoked);
        // Its serial leaves the CRL; the lease stays, revoked.
        let kept = 100 + CRL_KEPT_AFTER_EXPIRY_S;
        let (gone, crl) = t.expire_due(kept, usize::MAX);
        assert_eq!((gone.len(), crl), (0, true), "no CRL without it");
        assert!(t.revoked_serials(kept).is_empty());
        assert_eq!(t.get(&a.id).unwrap().state, State::Revoked);
        assert_eq!(t.next_deadline(), Some(200));
        assert_eq!(t.active_count(), 2);
        // Had the clock run ahead and come back, the serial is listed again.
        assert_eq!(t.revoked_serials(100).len(), 1);
        // A day past its expiry it is gone, with nothing left to take off the CRL.
        let day = 100 + REVOKED_KEPT_AFTER_EXPIRY_S;
        let (gone, crl) = t.expire_due(day - 1, usize::MAX);
        assert_eq!((gone.len(), crl), (2, false), "b and c, active, retired");
        assert!(t.get(&a.id).is_some());
        let (gone, crl) = t.expire_due(day, usize::MAX);
        assert_eq!((gone, crl), (vec![a.id], false));
        assert!(t.revoked_serials(0).is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_serial_whose_lease_was_retired_while_being_revoked_leaves_the_crl() {
        // The interleaving in order: revoke marks the lease, the reaper retires it (no serial
        // on the CRL yet, so nothing to take off), then revoke publishes the serial.
        let t = LeaseTable::new();
        let l = lease(&t, "spiffe://td/a", None, 100);
        t.insert(l.clone());
        t.leases.get_mut(&l.id).unwrap().state = State::Revoked;
        let (gone, crl) = t.expire_due(100 + REVOKED_KEPT_AFTER_EXPIRY_S, usize::MAX);
        assert_eq!((gone, crl), (vec![l.id], false));
        let keep = lease(&t, "spiffe://td/a", None, 500);
        t.insert(keep.clone());
        let entry = |id: LeaseId, exp| {
            let r = RevokedSerial {
                serial: [7; 16],
                revoked_at: 50,
                expires_at: exp,
            };
            (id, r)
        };
        t.publish_revoked(&[entry(l.id, 100), entry(keep.id, 500)]);
        let crl = t.revoked_serials.lock().unwrap();
        assert!(
            !crl.contains_key(&l.id),
            "the retired lease's serial stayed"
        );
        assert!(
            crl.contains_key(&keep.id),
            "a live lease's serial was dropped"
        );
    }

    #[test]
    fn revocations_racing_the_reaper_leave_no_serial_behind() {
        // The same race run for real: every lease expires at 100 and is revoked while the
        // reaper retires them, and the CRL must end empty.
        for _ in 0..20 {
            let t = LeaseTable::new();
            let ids: Vec<LeaseId> = (0..4000)
                .map(|_| {
                    let l = lease(&t, "spiffe://td/a", None, 100);
                    let id = l.id;
                    t.insert(l);
                    id
                })
                .collect();
            let rev = Arc::new(Revocation {
                at_ms: 50_000,
                by: "op".into(),
                reason: "race".into(),
            });
            std::thread::scope(|s| {
                s.spawn(|| {
                    for chunk in ids.chunks(16) {
                        let _ = t.revoke(chunk, &rev);
                    }
                });
                s.spawn(|| {
                    while !t.leases.is_empty() {
                        let _ = t.expire_due(100 + REVOKED_KEPT_AFTER_EXPIRY_S, 8);
                        std::thread::yield_now();
                    }
                });
            });
            assert!(t.leases.is_empty());
            assert_eq!(t.revoked_serials(0).len(), 0, "serials of retired leases");
        }
    }

    #[test]
    fn a_killed_certificate_due_before_the_kill_marks_it_stays_for_the_crl() {
        let t = LeaseTable::new();
        let (killed, other) = (
            lease(&t, "spiffe://td/a/w", None, 100),
            lease(&t, "spiffe://td/b", None, 100),
        );
        let (k_id, o_id) = (killed.id, other.id);
        t.insert(killed);
        t.insert(other);
        t.add_kill(Kill {
            seq: 1,
            spiffe_id: "spiffe://td/a".into(),
            at_ms: 0,
            by: "x".into(),
            reason: "r".into(),
        });
        // Due before the kill's marking reached it: kept, not retired with the other.
        let (removed, _) = t.expire_due(100, 16);
        assert_eq!(removed, vec![o_id]);
        assert!(t.leases.contains_key(&k_id));
        // The marking then puts it on the CRL, where a CRL dated after its expiry lists it.
        let rev = Arc::new(Revocation {
            at_ms: 99_000,
            by: "op".into(),
            reason: "killed".into(),
        });
        t.revoke_identity_tree(&SpiffeId::parse("spiffe://td/a").unwrap(), &rev);
        assert_eq!(t.revoked_serials(100).len(), 1);
    }

    #[test]
    fn a_restore_in_batches_indexes_as_inserting_one_by_one_does() {
        // Identities interleaved as in a real store, one of them as two separate copies of
        // its string, tasks on some, revoked leases with serials, in two batches.
        let names = ["spiffe://td/a", "spiffe://td/b", "spiffe://td/a/task/t"];
        let mut leases = Vec::new();
        let (one, other) = (LeaseTable::new(), LeaseTable::new());
        for i in 0..300 {
            let mut l = lease(&one, names[i % 3], None, 1000 + i as i64);
            if i % 3 == 0 && i % 2 == 0 {
                l.spiffe_id = Arc::from(names[0]);
            }
            if i % 5 == 0 {
                l.task_id = Some(Arc::from(["t1", "t2"][i % 2]));
            }
            if i % 7 == 0 {
                l.state = State::Revoked;
                l.revocation = Some(Arc::new(Revocation {
                    at_ms: 1,
                    by: "op".into(),
                    reason: "r".into(),
                }));
            }
            leases.push(l);
        }
        for l in &leases {
            one.insert(l.clone());
        }
        let (first, second) = leases.split_at(170);
        other.insert_many(first.to_vec());
        other.insert_many(second.to_vec());
        let sorted = |mut v: Vec<LeaseId>| {
            v.sort();
            v
        };
        for t in [&one, &other] {
            assert_eq!(t.len(), 300);
        }
        for name in names {
            let id = SpiffeId::parse(name).unwrap();
            let want = sorted(one.active_of_identity(&id, false));
            assert!(!want.is_empty());
            assert_eq!(sorted(other.active_of_identity(&id, false)), want, "{name}");
        }
        for task in ["t1", "t2"] {
            let want = sorted(one.active_of_task(task));
            assert!(!want.is_empty());
            assert_eq!(sorted(other.active_of_task(task)), want, "{task}");
        }
        assert_eq!(
            other.by_identity.len(),
            3,
            "copies of one string share a set"
        );
        assert_eq!(other.revoked_serials(0), one.revoked_serials(0));
        assert_eq!(other.revoked_serials(0).len(), 300 / 7 + 1);
        assert_eq!(other.next_deadline(), Some(1000));
    }

    #[test]
    fn kill_revocation_takes_the_identity_tree_only() {
        let t = LeaseTable::new();
        let a = lease(&t, "spiffe://td/a", Some("t1"), 100);
        let b = lease(&t, "spiffe://td/a/task/t1", Some("t1"), 100);
        let c = lease(&t, "spiffe://td/a2", Some("t1"), 100);
        for l in [&a, &b, &c] {
            t.insert(l.clone());
        }
        let rev = Arc::new(Revocation {
            at_ms: 1,
            by: "kill".into(),
            reason: "r".into(),
        });
        assert_eq!(
            t.revoke_identity_tree(&SpiffeId::parse("spiffe://td/a").unwrap(), &rev),
            [2, 0, 0]
        );
        assert_eq!(t.active_of_task("t1"), vec![c.id], "task index updated");
        assert!(t.is_active(&c.id, 0));
        assert_eq!(t.revoked_serials(0).len(), 2);
        assert_eq!(t.active_count(), 1);
    }

    #[test]
    fn a_kill_revokes_for_every_reader_before_its_leases_are_marked() {
        let t = LeaseTable::new();
        let a = lease(&t, "spiffe://td/a", None, 100);
        let b = lease(&t, "spiffe://td/a/task/t1", Some("t1"), 100);
        let c = lease(&t, "spiffe://td/a2", None, 100);
        for l in [&a, &b, &c] {
            t.insert(l.clone());
        }
        assert_eq!(
            t.active_in_tree(&SpiffeId::parse("spiffe://td/a").unwrap()),
            2
        );
        t.add_kill(Kill {
            seq: 1,
            spiffe_id: "spiffe://td/a".into(),
            at_ms: 7,
            by: "operator uid:0".into(),
            reason: "incident".into(),
        });
        for id in [a.id, b.id] {
            assert!(!t.is_active(&id, 0));
            let got = t.get(&id).unwrap();
            assert_eq!(got.state, State::Revoked);
            let rev = got.revocation.unwrap();
            assert_eq!((rev.at_ms, rev.reason.as_str()), (7, "incident"));
            assert_eq!(rev.by, "kill by operator uid:0");
        }
        assert!(
            t.is_active(&c.id, 0),
            "a sibling path is not under the kill"
        );
        let active = t.list(&Filter {
            state: Some(State::Active),
            ..Default::default()
        });
        assert_eq!(active.iter().map(|l| l.id).collect::<Vec<_>>(), vec![c.id]);
        let under = t.list(&Filter {
            spiffe_id: Some(SpiffeId::parse("spiffe://td/a").unwrap()),
            prefix: true,
            state: Some(State::Active),
            ..Default::default()
        });
        assert!(under.is_empty());
        // Lifting the kill before marking would bring them back: restores wait for marking.
        let rev = Arc::new(Revocation {
            at_ms: 7,
            by: "kill".into(),
            reason: "incident".into(),
        });
        t.revoke_identity_tree(&SpiffeId::parse("spiffe://td/a").unwrap(), &rev);
        t.remove_kill("spiffe://td/a");
        assert!(!t.is_active(&a.id, 0) && !t.is_active(&b.id, 0));
        assert_eq!(t.revoked_serials(0).len(), 2);
    }

    #[test]
    fn list_filters() {
        let t = LeaseTable::new();
        for i in 0..5 {
            t.insert(lease(
                &t,
                &format!("spiffe://td/w{}", i % 2),
                None,
                1000 + i,
            ));
        }
        let f = Filter {
            spiffe_id: Some(SpiffeId::parse("spiffe://td/w1").unwrap()),
            ..Default::default()
        };
        assert_eq!(t.list(&f).len(), 2);
        let f = Filter {
            state: Some(State::Revoked),
            ..Default::default()
        };
        assert!(t.list(&f).is_empty());
    }

    #[test]
    fn task_ids_are_each_agents_own() {
        let t = LeaseTable::new();
        let (a, b) = ("spiffe://td/a", "spiffe://td/b");
        let TaskClaim::Open(ta) = t.claim_task(a, "T-1", 1) else {
            panic!()
        };
        let TaskClaim::Open(tb) = t.claim_task(b, "T-1", 2) else {
            panic!()
        };
        assert_eq!(&*ta.id, "spiffe://td/a/task/T-1");
        assert_eq!(task_id_of(&tb.id), "T-1");
        assert!(t.complete_task(&ta.id, 3));
        assert_eq!(t.claim_task(a, "T-1", 4), TaskClaim::Completed);
        assert_eq!(t.claim_task(b, "T-1", 4), TaskClaim::Open(tb.clone()));
        // An operator's bare id finds both; a full name one.
        let names = |given: &str| {
            t.find_tasks(given)
                .into_iter()
                .map(|t| t.id.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("T-1"), [&*ta.id, &*tb.id]);
        assert_eq!(names(&tb.id), [&*tb.id]);
        assert!(names("T-2").is_empty() && names("spiffe://td/c/task/T-1").is_empty());
        // The lease filter takes either too.
        for (agent, task) in [(a, &ta.id), (b, &tb.id), (b, &tb.id)] {
            t.insert(lease(&t, agent, Some(task), 1000));
        }
        let listed = |task: &str, state| {
            t.list(&Filter {
                task_id: Some(task.into()),
                state,
                ..Default::default()
            })
            .len()
        };
        for state in [None, Some(State::Active)] {
            assert_eq!(listed("T-1", state), 3);
            assert_eq!(listed(&tb.id, state), 2);
            assert_eq!(listed("T", state), 0);
        }
        for ok in ["T-1", "spiffe://td/a/task/T-1"] {
            validate_task_name(ok).unwrap();
        }
        for bad in [
            "",
            "a b",
            "spiffe://td/a/task/",
            "nope/task/T-1",
            "spiffe://td/a/T-1",
        ] {
            assert!(validate_task_name(bad).is_err(), "{bad}");
        }
    }

    fn task(id: &str, created_ms: i64) -> Task {
        Task {
            id: id.into(),
            agent: "spiffe://td/a".into(),
            created_ms,
            completed_ms: None,
        }
    }

    #[test]
    fn stale_tasks_are_old_and_hold_no_lease() {
        let t = LeaseTable::new();
        t.load_tasks(vec![
            task("old-idle", 1_000),
            task("old-busy", 1_000),
            task("new", 9_000),
        ]);
        let busy = lease(&t, "spiffe://td/a", Some("old-busy"), 10_000);
        t.insert(busy.clone());
        let ids = |v: &[&str]| v.iter().map(|s| Arc::from(*s)).collect::<Vec<Arc<str>>>();
        assert_eq!(t.stale_tasks(5_000, None), ids(&["old-idle"]));
        // The re-check of candidates sees a credential issued since they were found, and
        // tasks that are gone.
        t.insert(lease(&t, "spiffe://td/a", Some("old-idle"), 10_000));
        assert!(
            t.stale_tasks(5_000, Some(&ids(&["old-idle", "gone"])))
                .is_empty()
        );
        // A revoked lease keeps its task until it expires: the credential still exists.
        let rev = Arc::new(Revocation {
            at_ms: 2_000,
            by: "op".into(),
            reason: "r".into(),
        });
        t.revoke(&[busy.id], &rev);
        assert!(t.stale_tasks(5_000, Some(&ids(&["old-busy"]))).is_empty());
        let _ = t.expire_due(10_000 + REVOKED_KEPT_AFTER_EXPIRY_S, usize::MAX);
        assert_eq!(
            t.stale_tasks(5_000, Some(&ids(&["old-busy", "new"]))),
            ids(&["old-busy"])
        );
        t.forget_tasks(&ids(&["old-busy"]));
        assert!(t.task("old-busy").is_none());
        assert_eq!(t.task_count(), 2);
    }

    #[test]
    fn compaction_gives_back_the_expiry_heap_a_burst_of_long_leases_left() {
        let t = LeaseTable::new();
        // Due beyond the window: they wait in the expiry queue's heap, not in its buckets.
        let later = time::OffsetDateTime::now_utc().unix_timestamp() + 3 * expiry::BUCKETED_S;
        for _ in 0..40_000 {
            let mut l = lease(&t, "spiffe://td/long", None, later);
            l.serial = None;
            t.insert(l);
        }
        let before = t.expiry.lock().unwrap().heap_room().0;
        assert!(before >= 40_000);
        let (gone, _) = t.expire_due(later, usize::MAX);
        assert_eq!((gone.len(), t.len()), (40_000, 0));
        assert_eq!(t.compact(), 2, "the lease map and the expiry heap");
        assert!(t.expiry.lock().unwrap().heap_room().0 < before / 8);
        assert_eq!(t.compact(), 0, "nothing left to give back");
    }

    #[test]
    fn compaction_gives_back_what_a_burst_left_and_leaves_steady_tables_alone() {
        let t = LeaseTable::new();
        let rev = Arc::new(Revocation {
            at_ms: 0,
            by: "op".into(),
            reason: "r".into(),
        });
        // A burst of 40k leases of one identity expiring together, 5k of them revoked (their
        // serials on the CRL); 100 long-lived leases of the same identity and task stay.
        let mut burst = Vec::new();
        for _ in 0..40_000 {
            let l = lease(&t, "spiffe://td/burst", Some("job"), 100);
            burst.push(l.id);
            t.insert(l);
        }
        let mut keep = Vec::new();
        for _ in 0..100 {
            let l = lease(&t, "spiffe://td/burst", Some("job"), 1_000_000);
            keep.push(l.id);
            t.insert(l);
        }
        t.revoke(&burst[..5_000], &rev);
        let set_cap =
            |m: &DashMap<Arc<str>, HashSet<LeaseId>>, k: &str| m.get(k).unwrap().capacity();
        let before = (
            t.leases.capacity(),
            t.expiry.lock().unwrap().capacity(),
            t.revoked_serials.lock().unwrap().capacity(),
            set_cap(&t.by_identity, "spiffe://td/burst"),
            set_cap(&t.by_task, "job"),
        );
        assert_eq!(t.compact(), 0, "full tables are left alone");

        let _ = t.expire_due(100 + REVOKED_KEPT_AFTER_EXPIRY_S, usize::MAX);
        assert_eq!(t.len(), 100);
        // The index sets shrink as they empty; the tables at compaction.
        assert!(set_cap(&t.by_identity, "spiffe://td/burst") * 10 < before.3);
        assert!(set_cap(&t.by_task, "job") * 10 < before.4);
        // So does the expiry queue: its buckets went with their leases.
        assert!(t.expiry.lock().unwrap().capacity() * 10 < before.1);
        assert_eq!(t.compact(), 2, "leases, revoked serials");
        assert!(t.leases.capacity() * 10 < before.0);
        assert!(t.revoked_serials.lock().unwrap().capacity() * 10 < before.2);
        assert_eq!(t.compact(), 0, "nothing left to give back");
        // What stayed is intact.
        assert!(keep.iter().all(|id| t.is_active(id, 0)));
        assert_eq!(t.active_of_task("job").len(), 100);
        let id = SpiffeId::parse("spiffe://td/burst").unwrap();
        assert_eq!(t.active_of_identity(&id, false).len(), 100);
        assert!(t.revoked_serials(0).is_empty());
    }
}
