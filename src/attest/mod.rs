//! Workload attestation from the kernel.
//!
//! Owns: who is on the other end of a Unix socket. The kernel gives us the peer's uid, gid and
//! pid (`SO_PEERCRED`) and, on Linux ≥ 6.5, a pidfd for that exact process (`SO_PEERPIDFD`).
//! From `/proc/<pid>` we add supplementary groups, the executable's path and its SHA-256.
//!
//! PID reuse: a pid alone can name a different process by the time we read `/proc`. With a
//! pidfd we read `/proc/<pid>` and then check the pidfd's process has not exited: a live
//! process keeps its pid, so what we read was that process. Without a pidfd we require the
//! process to have started before the connection was accepted and its start time to be the
//! same before and after the reads. Anything we cannot establish is refused.

pub mod principal;
pub mod selector;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ring::digest;

pub use selector::{Selector, SelectorError};

/// Attestation failures. None of them is the caller's fault in a way it could fix by retrying
/// differently, so the API maps them all to `PermissionDenied` (fail closed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The peer is not visible in our pid namespace (the kernel reported pid 0).
    #[error("caller's process is not visible to the daemon (pid 0 from SO_PEERCRED)")]
    NoPid,
    /// The process exited or its pid was reused while we looked at it.
    #[error("caller's process {0} exited or was replaced during attestation")]
    ProcessGone(i32),
    /// Reading what attestation needs did not finish in time: the caller's executable sits
    /// on a filesystem that does not answer (a FUSE mount it serves, a hung NFS share), or
    /// the caller's uid already has [`OBSERVING_PER_UID`] such reads waiting.
    #[error("attesting caller's process {pid} did not finish: {why}")]
    Stalled {
        /// Process id.
        pid: i32,
        /// What waited.
        why: &'static str,
    },
    /// `/proc/<pid>` could not be read.
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Proc {
        /// Process id.
        pid: i32,
        /// Which file.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl AttestError {
    /// True when the daemon could not read what it needed for reasons of its own (out of
    /// file descriptors, I/O errors), not because of anything about the caller: a process
    /// gone, a file it may not read, an unexpected format are the caller's.
    pub fn is_daemon_side(&self) -> bool {
        match self {
            // Says nothing about who the caller is either; the caller may retry.
            Self::Stalled { .. } => true,
            Self::Proc { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EIO | libc::EAGAIN)
            ),
            _ => false,
        }
    }
}

/// What the kernel told us about the peer when the connection was accepted, plus the
/// connection's last attestation.
#[derive(Debug)]
pub struct PeerInfo {
    /// Effective uid of the peer at connect time.
    pub uid: u32,
    /// Effective gid of the peer at connect time.
    pub gid: u32,
    /// Peer pid at connect time (0 if not visible in our namespace).
    pub pid: i32,
    /// A pidfd for the connecting process, when the kernel supports `SO_PEERPIDFD`.
    pub pidfd: Option<Arc<OwnedFd>>,
    /// `CLOCK_BOOTTIME` at accept, in clock ticks, to detect a pid that was reused after accept.
    pub accepted_at_ticks: u64,
    /// The last full attestation of this connection's process.
    cache: Mutex<Option<Cached>>,
    /// A listener's admission check passed at accept, on the kernel's credentials of that
    /// moment (the admin socket's supplementary groups, `SO_PEERGROUPS`).
    pub admitted: std::sync::atomic::AtomicBool,
}

/// A full attestation, reused for later requests on the same connection while the process is
/// provably the same one running the same executable.
#[derive(Debug)]
struct Cached {
    attestation: Arc<Attestation>,
    exe: Option<FileKey>,
    start_time: Option<u64>,
    at: Instant,
    /// The executable could have been hashed but no entry wanted it: an entry added later may.
    hash_skipped: bool,
    /// The [`GroupInterest`] generation its supplementary groups were kept by: an entry
    /// naming another group makes it stale.
    groups_gen: u64,
}

/// How long a connection's attestation is reused before it is done again in full, so that
/// changes the cheap re-check cannot see (user or group renames) still arrive.
const ATTESTATION_REUSE: Duration = Duration::from_secs(30);

/// How long a full attestation's reads (`/proc`, the executable, user and group names) may
/// take before the request is refused. Its thread may go on waiting; the request does not.
const OBSERVE_DEADLINE: Duration = Duration::from_secs(10);
/// How long hashing an executable may take before the attestation goes on without its
/// `sha256` selector (entries that need it do not match: fail closed).
const HASH_DEADLINE: Duration = Duration::from_secs(30);
/// Full attestations of one uid ([`principal`](principal::principal): a block of subordinate
/// uids counts as one) whose reads are still running, past which its next ones are refused at
/// once: reads that never return hold a blocking thread each, and the pool is shared by every
/// caller.
pub const OBSERVING_PER_UID: usize = 32;
/// The same for all uids together: well under tokio's 512 blocking threads, so that stalled
/// reads of several users cannot take the threads the reaper, the store and entry changes
/// need.
pub const OBSERVING_TOTAL: usize = 256;

impl PeerInfo {
    /// Reads the peer credentials of a connected Unix socket.
    pub fn from_socket(fd: RawFd) -> std::io::Result<Self> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            pidfd: peer_pidfd(fd)?.map(Arc::new),
            accepted_at_ticks: boottime_ticks(),
            cache: Mutex::new(None),
            admitted: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// `SO_PEERPIDFD` (Linux 6.5). Not in every libc crate release, so defined here.
const SO_PEERPIDFD: libc::c_int = 77;

/// The peer's pidfd; `None` where the kernel has no `SO_PEERPIDFD` (or the daemon cannot
/// take one now), and the start-time check stands in. `ESRCH` or `EINVAL` are an error, not
/// that fallback: they say the connecting process has already exited and been reaped, just
/// the case where its pid may already name another process.
fn peer_pidfd(fd: RawFd) -> std::io::Result<Option<OwnedFd>> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH | libc::EINVAL) => Err(e),
            // No such option on this kernel, or the daemon's own trouble (out of
            // descriptors or memory): the start-time check, as before Linux 6.5.
            _ => Ok(None),
        };
    }
    if pidfd < 0 {
        return Err(std::io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: on success the kernel handed us a new fd that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Time since boot (including suspend) in clock ticks: the unit of `/proc/<pid>/stat` starttime.
fn boottime_ticks() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let hz = clock_ticks_per_sec();
    ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000
}

/// Everything known about a caller. `selectors` is what entries match against.
#[derive(Debug, Clone)]
pub struct Attestation {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
    /// Executable path, if readable and not deleted.
    pub exe_path: Option<Arc<str>>,
    /// Executable SHA-256 (hex), if hashed.
    pub exe_sha256: Option<String>,
    /// All selectors, sorted.
    pub selectors: BTreeSet<Selector>,
}

impl Attestation {
    /// True when every selector in `required` is one of the caller's.
    pub fn satisfies(&self, required: &[Selector]) -> bool {
        required.iter().all(|s| self.selectors.contains(s))
    }
}

/// Identity of an executable file: if any of these change, the contents may have changed.
/// `ctime` cannot be set by users, so rewriting a file and restoring its mtime still misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of `path` (relative to `dirfd`; `""` with `AT_EMPTY_PATH` for `dirfd` itself)
    /// from the attributes the kernel holds, never asking the file's filesystem: a caller's
    /// binary may sit on a FUSE mount the caller serves, or a hung NFS share, where a
    /// synced stat waits as long as the server wants. Called inline on an async worker, such
    /// a wait stopped every request of every caller. Enough to see an exec: another file is
    /// another inode, whatever its cached attributes say.
    fn cached(dirfd: libc::c_int, path: &std::ffi::CStr, flags: libc::c_int) -> Option<Self> {
        // SAFETY: an all-zero statx is a valid value for the kernel to fill.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` a valid, writable statx.
        let r = unsafe {
            libc::statx(
                dirfd,
                path.as_ptr(),
                flags | libc::AT_STATX_DONT_SYNC,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        (r == 0).then(|| Self {
            dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            size: st.stx_size,
            mtime: (st.stx_mtime.tv_sec, i64::from(st.stx_mtime.tv_nsec)),
            ctime: (st.stx_ctime.tv_sec, i64::from(st.stx_ctime.tv_nsec)),
        })
    }

    /// [`Self::cached`] of what `/proc/<pid>/exe` links to.
    fn of_exe(pid: i32) -> Option<Self> {
        let path = std::ffi::CString::new(format!("/proc/{pid}/exe")).ok()?;
        Self::cached(libc::AT_FDCWD, &path, 0)
    }

    /// [`Self::cached`] of an open file.
    fn of_file(f: &File) -> Option<Self> {
        Self::cached(f.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
    }

    #[cfg(test)]
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Bounded so that a workload spawning many distinct executables cannot grow memory without end.
const HASH_CACHE_MAX: usize = 4096;
/// Executables hashed at once: hashing is disk- and CPU-bound, so more at once only slows
/// each, and leaves the blocking pool to attestations.
const HASHES_AT_ONCE: usize = 4;
/// Most primary user and group names cached; past it the caches start over. A caller in a
/// user namespace of its own can present any of its subordinate ids, so the ids seen are
/// not bounded by the accounts of the host.
const NAME_CACHE_MAX: usize = 4096;
const NAME_CACHE_TTL: Duration = Duration::from_secs(60);

/// A cached executable hash and when it was last used, so that a full cache drops the
/// executable used longest ago, not every hash at once.
#[derive(Debug)]
struct KnownHash {
    hex: Arc<str>,
    used: std::sync::atomic::AtomicU64,
}

/// Attests callers; holds the executable-hash and user/group-name caches.
#[derive(Debug)]
pub struct Attestor {
    max_hash_bytes: u64,
    hash_cache_max: usize,
    hashes: DashMap<FileKey, KnownHash>,
    /// Orders uses of the hash cache (a logical clock; cheaper than reading time).
    hash_clock: std::sync::atomic::AtomicU64,
    /// One lock per executable being hashed, so that many first connections from the same
    /// binary (sidecars starting together after a reboot) hash it once, not once each.
    hashing: DashMap<FileKey, Arc<tokio::sync::Mutex<()>>>,
    /// One lock per uid: a user hashes one executable at a time, so one user's churn of new
    /// binaries (or of `touch`ed large files) queues behind itself, not in front of others.
    hashing_uid: DashMap<u32, Arc<tokio::sync::Mutex<()>>>,
    /// Full attestations' reads still running, per principal ([`OBSERVING_PER_UID`]) and in
    /// all ([`OBSERVING_TOTAL`]). A slot is held by the thread doing the reads.
    observing: Arc<principal::PerUid>,
    /// Executables read and hashed in full, for the single-flight test and debugging.
    files_hashed: std::sync::atomic::AtomicU64,
    users: DashMap<u32, (Instant, Option<String>)>,
    groups: DashMap<u32, (Instant, Option<String>)>,
    /// Executables hashed at once, by all users together.
    hash_slots: Arc<tokio::sync::Semaphore>,
    /// Gids `[admin] allowed_gids` admits: kept whatever the entries name.
    admin_gids: HashSet<u32>,
    interest: RwLock<Arc<GroupInterest>>,
    interest_gen: std::sync::atomic::AtomicU64,
}

/// The supplementary groups an attestation keeps: those an entry names (by gid or by name)
/// and those `[admin] allowed_gids` admits. A caller may hold 65,536 groups (NGROUPS_MAX; a
/// user with subordinate gids can set that many in a user namespace of its own): a
/// selector and a name lookup for each, kept for the connection's life, cost megabytes per
/// connection and a directory-server round trip per group. Groups nobody names decide
/// nothing, so they are dropped; names are resolved to gids here, once per
/// [`NAME_CACHE_TTL`], not per caller.
#[derive(Debug, Default)]
struct GroupInterest {
    generation: u64,
    gids: HashSet<u32>,
    names: BTreeSet<String>,
    /// `names` resolved: gid → the names (of `names`) it has.
    named: HashMap<u32, Vec<String>>,
    resolved_at: Option<Instant>,
}

/// Forgets a user's hashing turn when a request is done with it ([`Attestor::forget_turn`]).
struct ForgetTurn<'a> {
    attestor: &'a Attestor,
    uid: u32,
}

impl Drop for ForgetTurn<'_> {
    fn drop(&mut self) {
        self.attestor.forget_turn(self.uid);
    }
}

/// Removes a single-flight gate when its hashing ends, also when the request that started it
/// is cancelled (the client went away while the file was being read).
struct GateGuard<'a> {
    map: &'a DashMap<FileKey, Arc<tokio::sync::Mutex<()>>>,
    key: FileKey,
    gate: &'a Arc<tokio::sync::Mutex<()>>,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        // Only our own gate: a newer one may have taken its place after an earlier removal.
        self.map
            .remove_if(&self.key, |_, g| Arc::ptr_eq(g, self.gate));
    }
}

/// What a full attestation reads from `/proc` and NSS, before any hashing.
struct Observed {
    attestation: Attestation,
    exe: Option<File>,
    exe_key: Option<FileKey>,
    start_before: Option<u64>,
    groups_gen: u64,
}

impl Attestor {
    /// `max_hash_bytes`: executables larger than this get no `sha256` selector.
    pub fn new(max_hash_bytes: u64) -> Self {
        Self {
            max_hash_bytes,
            hash_cache_max: HASH_CACHE_MAX,
            hashes: DashMap::new(),
            hash_clock: Default::default(),
            hashing: DashMap::new(),
            hashing_uid: DashMap::new(),
            observing: principal::PerUid::new(OBSERVING_PER_UID, OBSERVING_TOTAL),
            files_hashed: Default::default(),
            users: DashMap::new(),
            groups: DashMap::new(),
            hash_slots: Arc::new(tokio::sync::Semaphore::new(HASHES_AT_ONCE)),
            admin_gids: HashSet::new(),
            interest: RwLock::default(),
            interest_gen: Default::default(),
        }
    }

    /// Also keeps these supplementary gids (`[admin] allowed_gids`).
    pub fn with_admin_gids(mut self, gids: impl IntoIterator<Item = u32>) -> Self {
        self.admin_gids = gids.into_iter().collect();
        self
    }

    /// Sets the supplementary groups entries name (`unix:supplementary_gid`,
    /// `unix:supplementary_group`); others are left out of attestations. Attestations kept
    /// by connections are redone at their next request.
    pub fn want_groups(&self, gids: HashSet<u32>, names: BTreeSet<String>) {
        {
            let current = self.interest.read().unwrap_or_else(|e| e.into_inner());
            // Most entry edits name no new group: kept attestations stay good.
            if current.gids == gids && current.names == names && current.generation > 0 {
                return;
            }
        }
        let generation = self
            .interest_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        *self.interest.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(GroupInterest {
            generation,
            gids,
            names,
            named: HashMap::new(),
            resolved_at: None,
        });
    }

    /// The groups to keep, with their names resolved within [`NAME_CACHE_TTL`]. Blocking
    /// (NSS): called from the blocking part of an attestation.
    fn group_interest(&self) -> Arc<GroupInterest> {
        let current = Arc::clone(&self.interest.read().unwrap_or_else(|e| e.into_inner()));
        if current.names.is_empty()
            || current
                .resolved_at
                .is_some_and(|t| t.elapsed() < NAME_CACHE_TTL)
        {
            return current;
        }
        let mut named: HashMap<u32, Vec<String>> = HashMap::new();
        for n in &current.names {
            if let Ok(Some(g)) = nix::unistd::Group::from_name(n) {
                named.entry(g.gid.as_raw()).or_default().push(n.clone());
            }
        }
        let fresh = Arc::new(GroupInterest {
            generation: current.generation,
            gids: current.gids.clone(),
            names: current.names.clone(),
            named,
            resolved_at: Some(Instant::now()),
        });
        let mut w = self.interest.write().unwrap_or_else(|e| e.into_inner());
        // Unless the entries changed meanwhile: then theirs stands, resolved by the next call.
        if w.generation == fresh.generation {
            *w = Arc::clone(&fresh);
        }
        fresh
    }

    fn interest_gen(&self) -> u64 {
        self.interest_gen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Attests the peer. The blocking work of a full attestation (its `/proc` reads, user and
    /// group name lookups, hashing a new executable) runs off the async threads; the cheap
    /// re-check of a reused one (a pidfd poll, one `statx` that never waits on the
    /// executable's filesystem) runs inline.
    ///
    /// The executable is hashed only when `wants_hash`, given the attestation without a hash,
    /// says some entry could match by it.
    ///
    /// The first request on a connection is attested in full. Later ones reuse that result
    /// after two cheap checks: the connecting process is still alive (pidfd, or an unchanged
    /// start time) and `/proc/<pid>/exe` is still the same file (an `exec` changes it).
    pub async fn attest(
        self: &Arc<Self>,
        peer: &PeerInfo,
        wants_hash: impl Fn(&Attestation) -> bool,
    ) -> Result<Arc<Attestation>, AttestError> {
        if peer.pid <= 0 {
            return Err(AttestError::NoPid);
        }
        if let Some(a) = self.reuse(peer, &wants_hash)? {
            return Ok(a);
        }
        let (att, exe, start_time, hash_skipped, groups_gen) =
            self.attest_fully(peer, &wants_hash).await?;
        let att = Arc::new(att);
        *peer.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            attestation: Arc::clone(&att),
            exe,
            start_time,
            at: Instant::now(),
            hash_skipped,
            groups_gen,
        });
        Ok(att)
    }

    fn reuse(
        &self,
        peer: &PeerInfo,
        wants_hash: impl Fn(&Attestation) -> bool,
    ) -> Result<Option<Arc<Attestation>>, AttestError> {
        let guard = peer.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = guard
            .as_ref()
            .filter(|c| c.at.elapsed() < ATTESTATION_REUSE)
        else {
            return Ok(None);
        };
        let pid = peer.pid;
        match (&peer.pidfd, c.start_time) {
            (Some(fd), _) if process_exited(fd.as_raw_fd()) => {
                return Err(AttestError::ProcessGone(pid));
            }
            (None, Some(st)) if start_time(pid)? != st => {
                return Err(AttestError::ProcessGone(pid));
            }
            _ => {}
        }
        let exe_now = FileKey::of_exe(pid);
        if exe_now != c.exe
            || (c.hash_skipped && wants_hash(&c.attestation))
            || c.groups_gen != self.interest_gen()
        {
            return Ok(None);
        }
        Ok(Some(Arc::clone(&c.attestation)))
    }

    /// Returns the attestation, the executable's identity, the start time read (without a
    /// pidfd) and whether a hash was skipped because nothing wanted it.
    async fn attest_fully(
        self: &Arc<Self>,
        peer: &PeerInfo,
        wants_hash: impl Fn(&Attestation) -> bool,
    ) -> Result<(Attestation, Option<FileKey>, Option<u64>, bool, u64), AttestError> {
        let pid = peer.pid;
        // `/proc` reads are quick, but user and group lookups go through NSS, which may ask
        // a directory server (sssd, LDAP) once per supplementary group.
        let this = Arc::clone(self);
        let (uid, gid, accepted_at, has_pidfd) = (
            peer.uid,
            peer.gid,
            peer.accepted_at_ticks,
            peer.pidfd.is_some(),
        );
        let observing = self
            .observing
            .take(uid)
            .map_err(|full| AttestError::Stalled {
                pid,
                why: match full {
                    principal::Full::Principal => {
                        "too many attestations of this uid are still waiting for their reads"
                    }
                    principal::Full::Total => {
                        "too many attestations are still waiting for their reads"
                    }
                },
            })?;
        let reads = tokio::task::spawn_blocking(move || {
            // Held by the thread: ended when its reads return, whenever that is.
            let _observing = observing;
            this.observe(pid, uid, gid, accepted_at, has_pidfd)
        });
        let observed = tokio::time::timeout(OBSERVE_DEADLINE, reads)
            .await
            .map_err(|_| AttestError::Stalled {
                pid,
                why: "reading its process or executable took too long (a filesystem that \
                      does not answer?)",
            })?
            .map_err(|e| AttestError::Proc {
                pid,
                what: "status",
                source: std::io::Error::other(e.to_string()),
            })??;
        let Observed {
            mut attestation,
            exe,
            exe_key,
            start_before,
            groups_gen,
        } = observed;

        let hashable = exe_key.is_some_and(|k| k.size <= self.max_hash_bytes);
        let mut hash_skipped = false;
        if let (Some(f), Some(key)) = (exe, exe_key) {
            if !hashable {
                tracing::debug!(
                    size = key.size,
                    "executable over the hash size cap; no sha256 selector"
                );
            } else if wants_hash(&attestation) {
                // Out of time: refused as not attested now (`Unavailable`, nothing cached), not
                // attested without the hash, which would read as "no such identity" for the
                // next 30 s of this connection.
                attestation.exe_sha256 =
                    tokio::time::timeout(HASH_DEADLINE, self.hash_exe(f, key, uid))
                        .await
                        .map_err(|_| AttestError::Stalled {
                            pid,
                            why: "hashing its executable took too long (a filesystem that does \
                                  not answer, or other users' hashes that do not finish)",
                        })?;
            } else {
                hash_skipped = true;
            }
        }

        // The reads above are only good if they were of the process that connected.
        match (&peer.pidfd, start_before) {
            (Some(fd), _) => {
                if process_exited(fd.as_raw_fd()) {
                    return Err(AttestError::ProcessGone(pid));
                }
            }
            (None, Some(st)) => {
                if start_time(pid)? != st {
                    return Err(AttestError::ProcessGone(pid));
                }
            }
            (None, None) => unreachable!("start time is read whenever there is no pidfd"),
        }

        if let Some(h) = &attestation.exe_sha256 {
            attestation.selectors.insert(Selector::Sha256(h.clone()));
        }
        Ok((attestation, exe_key, start_before, hash_skipped, groups_gen))
    }

    /// The blocking part of a full attestation: everything but the hash and the final
    /// liveness check.
    fn observe(
        &self,
        pid: i32,
        uid: u32,
        gid: u32,
        accepted_at_ticks: u64,
        has_pidfd: bool,
    ) -> Result<Observed, AttestError> {
        let start_before = if has_pidfd {
            None
        } else {
            let st = start_time(pid)?;
            // A process that started after we accepted the connection cannot be the one that
            // connected: the pid has been reused.
            if st > accepted_at_ticks {
                return Err(AttestError::ProcessGone(pid));
            }
            Some(st)
        };

        let groups = supplementary_groups(pid)?;
        // O_PATH: names the file without opening it, so its filesystem is not asked to open
        // it, nor (at the close, which may run on an async worker) to flush it: a FUSE server
        // the caller runs could leave either unanswered. Hashing opens it for reading, on
        // the hashing thread.
        let exe = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(format!("/proc/{pid}/exe"))
        {
            Ok(f) => Some(f),
            // Not permitted (daemon is not root and the caller is another user) or a kernel
            // thread: no path/hash selectors, so entries that need them do not match.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => None,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(AttestError::ProcessGone(pid));
            }
            Err(source) => {
                return Err(AttestError::Proc {
                    pid,
                    what: "exe",
                    source,
                });
            }
        };
        let exe_path: Option<Arc<str>> = match &exe {
            Some(_) => std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| p.into_os_string().into_string().ok())
                // A replaced or deleted binary: the path now names something else.
                .filter(|p| !p.ends_with(" (deleted)"))
                .map(Arc::from),
            None => None,
        };
        // Read the way `reuse` reads it, or every reuse would see another file.
        let exe_key = exe.as_ref().and_then(FileKey::of_file);
        // The link names the file in the caller's mount namespace, which the caller may have
        // made itself (`unshare -rm` and a bind mount make any binary read as /usr/bin/x). A
        // path is only a selector if it names the same file in the daemon's own view.
        let exe_path = exe_path.filter(|p| {
            exe_key.is_some_and(|k| {
                std::fs::metadata(&**p).is_ok_and(|m| m.dev() == k.dev && m.ino() == k.ino)
            })
        });

        let mut selectors = BTreeSet::new();
        selectors.insert(Selector::Uid(uid));
        selectors.insert(Selector::Gid(gid));
        if let Some(name) = self.user_name(uid) {
            selectors.insert(Selector::User(name));
        }
        if let Some(name) = self.group_name(gid) {
            selectors.insert(Selector::Group(name));
        }
        let interest = self.group_interest();
        for g in groups {
            if interest.gids.contains(&g) || self.admin_gids.contains(&g) {
                selectors.insert(Selector::SupplementaryGid(g));
            }
            for name in interest.named.get(&g).into_iter().flatten() {
                selectors.insert(Selector::SupplementaryGroup(name.clone()));
            }
        }
        if let Some(p) = &exe_path {
            selectors.insert(Selector::Path(p.to_string()));
        }
        Ok(Observed {
            attestation: Attestation {
                uid,
                gid,
                pid,
                exe_path,
                exe_sha256: None,
                selectors,
            },
            exe,
            exe_key,
            start_before,
            groups_gen: interest.generation,
        })
    }

    fn cached_hash(&self, key: &FileKey) -> Option<String> {
        let h = self.hashes.get(key)?;
        let now = self
            .hash_clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        h.used.store(now, std::sync::atomic::Ordering::Relaxed);
        Some(h.hex.to_string())
    }

    async fn hash_exe(self: &Arc<Self>, file: File, key: FileKey, uid: u32) -> Option<String> {
        // Turns are per principal: a block of subordinate uids hashes one file at a time too.
        let uid = principal::principal(uid);
        if let Some(h) = self.cached_hash(&key) {
            return Some(h);
        }
        // Declared first, dropped last: once this request is done with the user's turn
        // (answered from the cache, cancelled, or hashed), it is forgotten if nobody else
        // holds or awaits it.
        let _forget = ForgetTurn {
            attestor: self,
            uid,
        };
        // The user's turn first: while it waits behind its own earlier hashes it holds no
        // file's gate, so other users' first runs of a shared binary do not wait with it.
        let user_gate = Arc::clone(self.hashing_uid.entry(uid).or_default().value());
        // Held by the blocking task, which runs on if this request is cancelled: a user that
        // cancels its requests still hashes one file at a time.
        let user_turn = user_gate.lock_owned().await;
        let gate = Arc::clone(self.hashing.entry(key).or_default().value());
        let _hashing = gate.lock().await;
        let _gate_guard = GateGuard {
            map: &self.hashing,
            key,
            gate: &gate,
        };
        // Whoever held the lock before us may have hashed this very file.
        if let Some(h) = self.cached_hash(&key) {
            return Some(h);
        }
        // Across all users too: a user with subordinate uids is thousands of users, and the
        // blocking pool the hashes run on also runs every attestation's `/proc` reads.
        let Ok(slot) = Arc::clone(&self.hash_slots).acquire_owned().await else {
            return None;
        };
        let this = Arc::clone(self);
        // Held by the thread, which may run on after the request is gone (cancelled, or out of
        // time): four hashing threads at most, whatever the requests do. A read that never
        // returns keeps its slot; the requests waiting for one are refused at their deadline.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            this.files_hashed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let h = sha256_of_path_fd(&file, this.max_hash_bytes).map(Arc::<str>::from);
            if let Some(h) = &h {
                this.remember_hash(key, Arc::clone(h));
            }
            // Ended here, not with the request, when the request was cancelled meanwhile.
            drop(user_turn);
            this.forget_turn(uid);
            h.map(|h| h.to_string())
        })
        .await
        .ok()
        .flatten()
    }

    /// Forgets `uid`'s hashing turn once nobody holds or awaits it (a clone is taken under
    /// the same shard lock), so the map holds the users hashing now, not every uid ever seen.
    fn forget_turn(&self, uid: u32) {
        self.hashing_uid
            .remove_if(&uid, |_, g| Arc::strong_count(g) == 1);
    }

    fn remember_hash(&self, key: FileKey, hex: Arc<str>) {
        use std::sync::atomic::Ordering::Relaxed;
        // A linear scan per new executable: cheap beside reading the file just hashed.
        while self.hashes.len() >= self.hash_cache_max {
            let oldest = self
                .hashes
                .iter()
                .min_by_key(|e| e.used.load(Relaxed))
                .map(|e| *e.key());
            match oldest {
                Some(k) => self.hashes.remove(&k),
                None => break,
            };
        }
        let used = self.hash_clock.fetch_add(1, Relaxed).into();
        self.hashes.insert(key, KnownHash { hex, used });
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        cached_name(&self.users, uid, |id| {
            nix::unistd::User::from_uid(id.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        cached_name(&self.groups, gid, |id| {
            nix::unistd::Group::from_gid(id.into())
                .ok()
                .flatten()
                .map(|g| g.name)
        })
    }
}

fn cached_name(
    cache: &DashMap<u32, (Instant, Option<String>)>,
    id: u32,
    lookup: impl FnOnce(u32) -> Option<String>,
) -> Option<String> {
    if let Some(e) = cache.get(&id)
        && e.0.elapsed() < NAME_CACHE_TTL
    {
        return e.1.clone();
    }
    if cache.len() >= NAME_CACHE_MAX {
        cache.clear();
    }
    let name = lookup(id);
    cache.insert(id, (Instant::now(), name.clone()));
    name
}

/// Opens for reading the file an `O_PATH` descriptor names (the same file, whatever its path
/// says now), and hashes it. On the hashing thread: the open and the close go to the file's
/// filesystem.
fn sha256_of_path_fd(file: &File, cap: u64) -> Option<String> {
    sha256_reader(
        File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?,
        cap,
    )
}

fn sha256_reader(mut file: File, cap: u64) -> Option<String> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > cap {
            return None;
        }
        ctx.update(&buf[..n]);
    }
    Some(hex::encode(ctx.finish()))
}

/// SHA-256 of a file, hex; used by the CLI and tests to write `unix:sha256` selectors.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let f = File::open(path)?;
    sha256_reader(f, u64::MAX).ok_or_else(|| std::io::Error::other("read failed"))
}

/// A pidfd polls readable once its process has exited.
fn process_exited(pidfd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc != 0
}

fn proc_err(pid: i32, what: &'static str, source: std::io::Error) -> AttestError {
    if source.kind() == std::io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        AttestError::ProcessGone(pid)
    } else {
        AttestError::Proc { pid, what, source }
    }
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) may contain spaces and ')' so
/// parsing starts after the last ')'.
fn start_time(pid: i32) -> Result<u64, AttestError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| proc_err(pid, "stat", e))?;
    parse_start_time(&stat).ok_or_else(|| AttestError::Proc {
        pid,
        what: "stat",
        source: std::io::Error::other("unexpected format"),
    })
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; starttime is field 22, i.e. the 20th of these.
    after.split_ascii_whitespace().nth(19)?.parse().ok()
}

fn supplementary_groups(pid: i32) -> Result<Vec<u32>, AttestError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| proc_err(pid, "status", e))?;
    Ok(parse_groups(&status))
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_ascii_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comm() {
        // comm may contain ") " and digits; only the text after the last ')' counts.
        let stat = "1234 (evil) 1 2 3) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn only_the_daemons_own_failures_are_daemon_side() {
        let proc = |errno| AttestError::Proc {
            pid: 1,
            what: "status",
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(proc(libc::EMFILE).is_daemon_side());
        assert!(proc(libc::EIO).is_daemon_side());
        assert!(!proc(libc::EACCES).is_daemon_side());
        assert!(!proc(libc::ESRCH).is_daemon_side());
        assert!(!AttestError::ProcessGone(1).is_daemon_side());
        assert!(!AttestError::NoPid.is_daemon_side());
        assert!(AttestError::Stalled { pid: 1, why: "" }.is_daemon_side());
    }

    #[test]
    fn groups_parse() {
        let s = "Name:\tx\nGroups:\t4 24 27 1000 \nNSpid:\t1\n";
        assert_eq!(parse_groups(s), vec![4, 24, 27, 1000]);
        assert!(parse_groups("Groups:\t\n").is_empty());
        assert!(parse_groups("").is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_connections_hash_an_executable_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent");
        std::fs::write(&path, vec![0xA5u8; 8 << 20]).unwrap();
        let key = FileKey::of(&std::fs::metadata(&path).unwrap());
        let attestor = Arc::new(Attestor::new(1 << 30));
        let calls = (0..16).map(|_| {
            let a = Arc::clone(&attestor);
            let f = File::open(&path).unwrap();
            tokio::spawn(async move { a.hash_exe(f, key, 1000).await })
        });
        let results = futures_util::future::join_all(calls).await;
        let want = sha256_file(&path).unwrap();
        for r in results {
            assert_eq!(r.unwrap().as_deref(), Some(want.as_str()));
        }
        assert_eq!(
            attestor
                .files_hashed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(attestor.hashing.is_empty(), "gates are removed after use");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_hash_leaves_no_gate_and_keeps_its_users_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        // Sparse: hashing it reads 256 MiB of zeros, long enough to be cancelled midway.
        File::create(&path).unwrap().set_len(256 << 20).unwrap();
        let key = FileKey::of(&std::fs::metadata(&path).unwrap());
        let attestor = Arc::new(Attestor::new(1 << 30));
        let f = File::open(&path).unwrap();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(5), attestor.hash_exe(f, key, 1000)).await;
        assert!(cancelled.is_err(), "hashing 256 MiB took under 5 ms");
        assert!(
            attestor.hashing.is_empty(),
            "a cancelled hash left its gate"
        );
        // The file is still being read: the same user cannot start another hash meanwhile.
        let turn = Arc::clone(attestor.hashing_uid.get(&1000).unwrap().value());
        assert!(
            turn.try_lock().is_err(),
            "the user's turn ended with the request"
        );
        let _ = tokio::time::timeout(Duration::from_secs(30), turn.lock()).await;
        assert!(attestor.hashes.contains_key(&key));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn users_hash_a_bounded_number_of_files_at_once_and_are_then_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut attestor = Attestor::new(1 << 30);
        attestor.hash_slots = Arc::new(tokio::sync::Semaphore::new(1));
        let attestor = Arc::new(attestor);
        let big = |name: &str| {
            let path = dir.path().join(name);
            File::create(&path).unwrap().set_len(128 << 20).unwrap();
            let key = FileKey::of(&std::fs::metadata(&path).unwrap());
            (File::open(&path).unwrap(), key)
        };
        // Two users (as one with subordinate uids can be), one slot: one hash at a time.
        let ((fa, ka), (fb, kb)) = (big("a"), big("b"));
        let (a, b) = (Arc::clone(&attestor), Arc::clone(&attestor));
        let first = tokio::spawn(async move { a.hash_exe(fa, ka, 2001).await });
        let second = tokio::spawn(async move { b.hash_exe(fb, kb, 2002).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = || {
            attestor
                .files_hashed
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        if !(first.is_finished() || second.is_finished()) {
            assert_eq!(started(), 1, "both users hashed at once");
        }
        assert!(first.await.unwrap().is_some());
        assert!(second.await.unwrap().is_some());
        assert_eq!(started(), 2);
        assert!(attestor.hashing_uid.is_empty(), "users kept after hashing");
    }

    #[test]
    fn a_full_hash_cache_drops_the_hash_used_longest_ago() {
        let mut attestor = Attestor::new(1 << 30);
        attestor.hash_cache_max = 2;
        let key = |ino| FileKey {
            dev: 1,
            ino,
            size: 1,
            mtime: (0, 0),
            ctime: (0, 0),
        };
        attestor.remember_hash(key(1), "one".into());
        attestor.remember_hash(key(2), "two".into());
        assert_eq!(attestor.cached_hash(&key(1)).as_deref(), Some("one"));
        attestor.remember_hash(key(3), "three".into());
        assert_eq!(attestor.hashes.len(), 2);
        assert!(attestor.cached_hash(&key(1)).is_some(), "recently used");
        assert!(attestor.cached_hash(&key(2)).is_none(), "used longest ago");
        assert!(attestor.cached_hash(&key(3)).is_some());
    }

    #[tokio::test]
    async fn an_executable_is_hashed_only_when_an_entry_wants_it() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        let attestor = Arc::new(Attestor::new(1 << 30));
        let hashed = || {
            attestor
                .files_hashed
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let plain = attestor.attest(&peer, |_| false).await.unwrap();
        assert_eq!(plain.exe_sha256, None);
        assert!(
            !plain
                .selectors
                .iter()
                .any(|s| matches!(s, Selector::Sha256(_)))
        );
        assert_eq!(hashed(), 0);
        // Still not wanted: the attestation is reused.
        assert!(Arc::ptr_eq(
            &plain,
            &attestor.attest(&peer, |_| false).await.unwrap()
        ));
        // An entry now wants it (one was added): the next request is attested with the hash.
        let exe = std::env::current_exe().unwrap();
        let with = attestor.attest(&peer, |_| true).await.unwrap();
        assert_eq!(
            with.exe_sha256.as_deref(),
            Some(sha256_file(&exe).unwrap().as_str())
        );
        assert!(
            with.selectors
                .contains(&Selector::Sha256(with.exe_sha256.clone().unwrap()))
        );
        assert_eq!(hashed(), 1);
        // The hashed attestation is reused whatever is wanted.
        assert!(Arc::ptr_eq(
            &with,
            &attestor.attest(&peer, |_| false).await.unwrap()
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_supplementary_groups_that_something_names_are_kept() {
        if !nix::unistd::geteuid().is_root() {
            skip("setting a caller's supplementary groups needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A caller with 3,001 groups, as a user namespace of its own allows (up to 65,536).
        let groups: Vec<libc::gid_t> = std::iter::once(0).chain(47_100..47_100 + 3000).collect();
        let script = format!(
            "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntime.sleep(10)",
            path.to_str().unwrap()
        );
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", &script]);
        use std::os::unix::process::CommandExt;
        // SAFETY: setgroups is async-signal-safe; the list outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let (conn, _) = listener.accept().unwrap();
        let peer = PeerInfo::from_socket(conn.as_raw_fd()).unwrap();
        let attestor = Arc::new(Attestor::new(1 << 30).with_admin_gids([47_103]));
        attestor.want_groups([47_101].into(), ["root".into()].into());
        let kept = |a: &Attestation| {
            a.selectors
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        Selector::SupplementaryGid(_) | Selector::SupplementaryGroup(_)
                    )
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        let first = attestor.attest(&peer, |_| false).await.unwrap();
        assert_eq!(
            kept(&first),
            vec![
                Selector::SupplementaryGid(47_101),
                Selector::SupplementaryGid(47_103),
                Selector::SupplementaryGroup("root".into()),
            ]
        );
        assert!(Arc::ptr_eq(
            &first,
            &attestor.attest(&peer, |_| false).await.unwrap()
        ));
        // An entry edit that names no new group keeps it.
        attestor.want_groups([47_101].into(), ["root".into()].into());
        assert!(Arc::ptr_eq(
            &first,
            &attestor.attest(&peer, |_| false).await.unwrap()
        ));
        // An entry names another group: the connection is attested again, with it.
        attestor.want_groups([47_101, 47_102].into(), BTreeSet::new());
        let second = attestor.attest(&peer, |_| false).await.unwrap();
        assert_eq!(
            kept(&second),
            vec![
                Selector::SupplementaryGid(47_101),
                Selector::SupplementaryGid(47_102),
                Selector::SupplementaryGid(47_103),
            ]
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_connection_whose_process_was_reaped_before_the_accept_gets_no_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})",
            path.to_str().unwrap()
        );
        // Connected, exited and reaped (by this wait) before the accept below.
        let status = std::process::Command::new("python3")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(status.success());
        let (conn, _) = listener.accept().unwrap();
        // Either the kernel gives no pidfd for it (an error, not the weaker fallback), or a
        // pidfd of a process that has exited.
        match PeerInfo::from_socket(conn.as_raw_fd()) {
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EINVAL)),
                "{e}"
            ),
            Ok(peer) => {
                let err = Arc::new(Attestor::new(1 << 30))
                    .attest(&peer, |_| false)
                    .await
                    .unwrap_err();
                assert!(matches!(err, AttestError::ProcessGone(_)), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn attests_own_process_through_a_socketpair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        assert_eq!(peer.pid as u32, std::process::id());
        let att = Arc::new(Attestor::new(1 << 30))
            .attest(&peer, |_| true)
            .await
            .unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(att.exe_path.as_deref(), exe.to_str());
        assert_eq!(
            att.exe_sha256.as_deref(),
            Some(sha256_file(&exe).unwrap().as_str())
        );
        assert!(
            att.selectors
                .contains(&Selector::Uid(nix::unistd::geteuid().as_raw()))
        );
        assert!(
            att.selectors
                .contains(&Selector::Path(exe.to_str().unwrap().into()))
        );
    }

    #[tokio::test]
    async fn a_pid_that_started_after_accept_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        // Pretend the connection was accepted before this process existed, without a pidfd:
        // this is what a reused pid looks like.
        peer.pidfd = None;
        peer.accepted_at_ticks = 0;
        let err = Arc::new(Attestor::new(1 << 30))
            .attest(&peer, |_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone(_)), "{err}");
    }

    #[tokio::test]
    async fn an_exited_process_is_refused() {
        use std::os::unix::net::UnixStream;
        // A child connects, then exits; its pidfd must make attestation fail.
        let (a, b) = UnixStream::pair().unwrap();
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id() as i32;
        // Take a pidfd for the child through pidfd_open, as SO_PEERPIDFD would give.
        // SAFETY: plain syscall with a valid pid.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0);
        child.wait().unwrap();
        // SAFETY: fd is a fresh pidfd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        peer.pid = std::process::id() as i32; // a live pid, but not the pidfd's process
        peer.pidfd = Some(Arc::new(pidfd));
        let err = Arc::new(Attestor::new(1 << 30))
            .attest(&peer, |_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone(_)), "{err}");
        drop(b);
    }

    #[tokio::test]
    async fn attestations_waiting_for_reads_are_bounded_per_uid_and_in_all() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        let attestor = Arc::new(Attestor::new(1 << 30));
        let stalled = |r: Result<_, AttestError>| match r {
            Err(AttestError::Stalled { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        // As if this uid's earlier attestations were all still waiting for their reads.
        let held: Vec<_> = (0..OBSERVING_PER_UID)
            .map(|_| attestor.observing.take(peer.uid).unwrap())
            .collect();
        let why = stalled(attestor.attest(&peer, |_| true).await);
        assert!(why.contains("of this uid"), "{why}");
        drop(held);
        // Other uids together reach the total: refused although this uid holds none.
        let others: Vec<_> = (0..OBSERVING_TOTAL)
            .map(|i| 1_000_000 + (i / OBSERVING_PER_UID) as u32)
            .filter(|&u| u != peer.uid)
            .map(|u| attestor.observing.take(u).unwrap())
            .collect();
        let why = stalled(attestor.attest(&peer, |_| true).await);
        assert_eq!(
            why,
            "too many attestations are still waiting for their reads"
        );
        drop(others);
        // Given back: the next attestation runs, and its slot is given back when it is done.
        attestor.attest(&peer, |_| true).await.unwrap();
        assert_eq!(attestor.observing.total(), 0);
    }

    #[tokio::test]
    async fn exec_after_connect_is_seen_on_the_next_request() {
        // A process connects as python3, then execs sleep while keeping the connection:
        // the cached attestation must not outlive the exec.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let script = format!(
            "import socket,os,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\nos.set_inheritable(s.fileno(),True)\ntime.sleep(0.5)\nos.execv('/bin/sleep',['sleep','5'])",
            path.to_str().unwrap()
        );
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap();
        let (conn, _) = listener.accept().unwrap();
        let peer = PeerInfo::from_socket(conn.as_raw_fd()).unwrap();
        let attestor = Arc::new(Attestor::new(1 << 30));
        let before = attestor.attest(&peer, |_| true).await.unwrap();
        assert!(
            before.exe_path.as_deref().unwrap().contains("python"),
            "{before:?}"
        );
        // Reused while nothing changed.
        assert!(Arc::ptr_eq(
            &before,
            &attestor.attest(&peer, |_| true).await.unwrap()
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let exe = std::fs::read_link(format!("/proc/{}/exe", peer.pid)).unwrap();
            if exe.to_string_lossy().contains("sleep") {
                break;
            }
            assert!(Instant::now() < deadline, "child never exec'd");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = attestor.attest(&peer, |_| true).await.unwrap();
        assert!(
            after.exe_path.as_deref().unwrap().ends_with("sleep"),
            "{after:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // The process is gone: no identity at all.
        assert!(matches!(
            attestor.attest(&peer, |_| true).await,
            Err(AttestError::ProcessGone(_))
        ));
    }

    /// As the integration tests' `common::skip`: under `TESSERA_TEST_STRICT=1` (CI) a skip
    /// fails.
    fn skip(why: &str) {
        assert!(
            std::env::var_os("TESSERA_TEST_STRICT").is_none_or(|v| v != "1"),
            "TESSERA_TEST_STRICT=1, yet this test would be skipped: {why}"
        );
        eprintln!("skipped: {why}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_path_seen_only_in_the_callers_mount_namespace_is_not_a_selector() {
        // The caller bind-mounts /bin/sleep over `decoy` in a mount namespace of its own and
        // execs it: /proc/<pid>/exe then reads `decoy`, which in the daemon's view is another
        // file (a copy of /bin/true). That path must not become a selector.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let decoy = dir.path().join("decoy");
        std::fs::copy("/bin/true", &decoy).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let script = format!(
            "import socket,os\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\nos.set_inheritable(s.fileno(),True)\nos.execv({:?},['sleep','5'])",
            path.to_str().unwrap(),
            decoy.to_str().unwrap()
        );
        let shell = format!(
            "mount --bind /bin/sleep {:?} && exec python3 -c \"$0\"",
            decoy.to_str().unwrap()
        );
        // Without root, a user namespace of its own gives the caller the right to mount.
        let ns = if nix::unistd::geteuid().is_root() {
            "-m"
        } else {
            "-rm"
        };
        let Ok(mut child) = std::process::Command::new("unshare")
            .args([ns, "sh", "-c", &shell, &script])
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            skip("unshare is not available");
            return;
        };
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let conn = loop {
            if let Ok((c, _)) = listener.accept() {
                break c;
            }
            if child.try_wait().unwrap().is_some() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                // Only a namespace this machine refuses is a reason to skip; any other early
                // end (no python3, a failed mount) is a failure of the test.
                assert!(
                    err.contains("unshare failed"),
                    "the caller ended before connecting: {err}"
                );
                skip(&format!("no mount namespace here: {}", err.trim()));
                return;
            }
            assert!(Instant::now() < deadline, "the caller never connected");
            std::thread::sleep(Duration::from_millis(10));
        };
        let peer = PeerInfo::from_socket(conn.as_raw_fd()).unwrap();
        loop {
            let exe = std::fs::read_link(format!("/proc/{}/exe", peer.pid)).unwrap_or_default();
            if exe == decoy {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the caller never exec'd: {exe:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let att = Arc::new(Attestor::new(1 << 30))
            .attest(&peer, |_| true)
            .await
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(att.exe_path, None, "{att:?}");
        assert!(
            !att.selectors.iter().any(|s| matches!(s, Selector::Path(_))),
            "{att:?}"
        );
        // The hash is of the file actually running, so it still tells the binaries apart.
        assert!(att.exe_sha256.is_some());
    }
}
