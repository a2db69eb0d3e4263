//! Owns: how much of the daemon one local user can hold at once.
//!
//! The Workload API socket is open to every local uid (attestation decides identity), so
//! connections and long-lived streams are counted per uid: one user's loop of `connect()`
//! calls cannot use up the daemon's file descriptors, and one workload cannot open streams
//! without end (each `FetchX509SVID` stream holds leases and mints again at every rotation).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Connections one uid may hold open on one socket.
pub const CONNECTIONS_PER_UID: usize = 1024;
/// Connections all uids together may hold open on one socket.
pub const CONNECTIONS_TOTAL: usize = 16_384;
/// `FetchX509SVID` streams one uid may hold open.
pub const X509_STREAMS_PER_UID: usize = 256;
/// Concurrent HTTP/2 streams (requests) per connection; tonic would otherwise allow any
/// number.
pub const STREAMS_PER_CONNECTION: u32 = 256;
/// Concurrent streams per admin connection: the CLI uses one.
pub const ADMIN_STREAMS_PER_CONNECTION: u32 = 16;
/// Largest request message on the Workload API and admin sockets, as the HTTP API's body limit: the
/// largest legitimate one (a token exchange with two 16 KiB tokens and 32 scopes) needs
/// under half of it, and tonic's default of 4 MiB let any local process hand the daemon
/// megabytes to parse.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// At most one "go" per interval: for warnings a caller can provoke (refused connections,
/// attestation failures of the daemon's own), so a log flood does not bury the rest.
#[derive(Debug)]
pub struct Throttle {
    every_ms: i64,
    last_ms: std::sync::atomic::AtomicI64,
}

impl Throttle {
    /// Lets one call through per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        Self {
            every_ms: every.as_millis() as i64,
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// True for the first call of each interval.
    pub fn ready(&self) -> bool {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.every_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Counts held slots per uid, with a cap per uid and in total.
#[derive(Debug)]
pub struct PerUid {
    per_uid: usize,
    total_max: usize,
    counts: DashMap<u32, usize>,
    total: AtomicUsize,
}

/// One held slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    /// At most `per_uid` slots per uid and `total` in all.
    pub fn new(per_uid: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_uid,
            total_max: total,
            counts: DashMap::new(),
            total: AtomicUsize::new(0),
        })
    }

    /// A slot for `uid`, or `None` when it (or everyone together) holds the most allowed.
    pub fn take(self: &Arc<Self>, uid: u32) -> Option<Slot> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.total_max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut n = self.counts.entry(uid).or_insert(0);
        if *n >= self.per_uid {
            drop(n);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: Arc::clone(self),
            uid,
        })
    }

    /// Slots held now by `uid`.
    pub fn held(&self, uid: u32) -> usize {
        self.counts.get(&uid).map_or(0, |n| *n)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.total.fetch_sub(1, Ordering::AcqRel);
        // Forget a uid with nothing held, so the map does not keep every uid ever seen.
        self.owner.counts.remove_if_mut(&self.uid, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_interval() {
        let t = Throttle::new(std::time::Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        assert!(Throttle::new(std::time::Duration::ZERO).ready());
    }

    #[test]
    fn caps_per_uid_and_in_total_and_gives_back_on_drop() {
        let l = PerUid::new(2, 3);
        let a1 = l.take(1).unwrap();
        let a2 = l.take(1).unwrap();
        assert!(l.take(1).is_none(), "per uid");
        let b1 = l.take(2).unwrap();
        assert!(l.take(3).is_none(), "in total");
        drop(a1);
        assert_eq!(l.held(1), 1);
        let a3 = l.take(1).unwrap();
        drop((a2, a3, b1));
        assert_eq!((l.held(1), l.held(2)), (0, 0));
        assert!(l.counts.is_empty());
        assert_eq!(l.total.load(Ordering::Relaxed), 0);
    }
}
