//! The expiry queue: which lease falls due when.
//!
//! Owns: the order in which the reaper retires leases. Leases due within the next hour are
//! bucketed by the second they fall due in, each bucket a plain list of ids, so taking what is
//! due is a walk along a list rather than a heap pop per lease. A binary heap alone paid ~20
//! levels of sift-down, mostly cache misses in a 26 MB heap, for each of a million leases
//! expiring at once: about a fifth of the retirement's CPU, all of it under the lock that
//! every issuance also takes. Credentials of one TTL issued in one second share a bucket, and
//! there are at most an hour's worth of buckets.
//!
//! Leases due later wait in a binary heap and move into their bucket as they come within the
//! hour, a bounded number per call. Buckets for them would cost ~100 bytes a lease where few
//! share a second (long TTLs issued slowly), against the heap's 24, and a restore of leases
//! spread over days would pay a map lookup per lease where the heap builds in linear time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::LeaseId;

/// Leases due sooner than this after the latest `now` the queue was given go into buckets.
pub const BUCKETED_S: i64 = 3600;

/// Leases moved from the heap into buckets per call of [`ExpiryQueue::take_due`]: bounds the
/// time the queue's lock is held for it (about 0.3 ms in a heap of a million).
const PROMOTE_MAX: usize = 1024;

/// Lease ids by the second they fall due. An id may be queued more than once (see
/// [`super::LeaseTable::requeue_listed`]); whoever takes it finds the lease gone the second
/// time.
#[derive(Debug)]
pub struct ExpiryQueue {
    buckets: BTreeMap<i64, Vec<LeaseId>>,
    bucketed: usize,
    later: BinaryHeap<Reverse<(i64, LeaseId)>>,
    /// Pushes due before this second go into buckets, the rest into `later`. It only grows,
    /// so some of `later` may be due before it until moved: every reader looks at both.
    horizon: i64,
}

impl Default for ExpiryQueue {
    /// A queue bucketing what falls due within the hour from now (the wall clock's).
    fn default() -> Self {
        Self::starting_at(time::OffsetDateTime::now_utc().unix_timestamp())
    }
}

impl ExpiryQueue {
    /// A queue bucketing what falls due within [`BUCKETED_S`] of `now_s`.
    pub fn starting_at(now_s: i64) -> Self {
        Self {
            buckets: BTreeMap::new(),
            bucketed: 0,
            later: BinaryHeap::new(),
            horizon: now_s.saturating_add(BUCKETED_S),
        }
    }

    /// Queues `id` to fall due at `at_s` (Unix seconds).
    pub fn push(&mut self, at_s: i64, id: LeaseId) {
        if at_s < self.horizon {
            self.buckets.entry(at_s).or_default().push(id);
            self.bucketed += 1;
        } else {
            self.later.push(Reverse((at_s, id)));
        }
    }

    /// The soonest second anything falls due.
    pub fn next_due(&self) -> Option<i64> {
        let bucketed = self.buckets.first_key_value().map(|(t, _)| *t);
        let later = self.later.peek().map(|Reverse((t, _))| *t);
        match (bucketed, later) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves up to `max` ids due at or before `now_s` into `out` (a bucket's second at a time,
    /// in no order within a second), then moves up to [`PROMOTE_MAX`] of the leases due within
    /// [`BUCKETED_S`] from the heap into their buckets. An emptied bucket's memory goes back
    /// at once, so a mass expiry gives back the queue's share as it is retired.
    pub fn take_due(&mut self, now_s: i64, max: usize, out: &mut Vec<LeaseId>) {
        let mut left = max;
        while left > 0 {
            let Some(mut first) = self.buckets.first_entry() else {
                break;
            };
            if *first.key() > now_s {
                break;
            }
            let ids = first.get_mut();
            let from = ids.len().saturating_sub(left);
            let taken = ids.len() - from;
            out.extend(ids.drain(from..));
            left -= taken;
            self.bucketed -= taken;
            if ids.is_empty() {
                first.remove();
            }
        }
        // Due, but not moved into a bucket in time (a clock step, or more coming within the
        // hour than the moves kept up with): taken as the heap hands them out.
        while left > 0 {
            match self.later.peek() {
                Some(Reverse((t, _))) if *t <= now_s => {}
                _ => break,
            }
            if let Some(Reverse((_, id))) = self.later.pop() {
                out.push(id);
                left -= 1;
            }
        }
        let horizon = now_s.saturating_add(BUCKETED_S);
        self.horizon = self.horizon.max(horizon);
        for _ in 0..PROMOTE_MAX {
            match self.later.peek() {
                Some(Reverse((t, _))) if *t < horizon => {}
                _ => break,
            }
            if let Some(Reverse((t, id))) = self.later.pop() {
                self.buckets.entry(t).or_default().push(id);
                self.bucketed += 1;
            }
        }
    }

    /// Ids queued (a lease queued twice counts twice).
    pub fn len(&self) -> usize {
        self.bucketed + self.later.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids the queue has room for without growing.
    pub fn capacity(&self) -> usize {
        self.buckets.values().map(Vec::capacity).sum::<usize>() + self.later.capacity()
    }

    /// The heap's (capacity, length): the buckets give their room back as they empty, the
    /// heap only when shrunk.
    pub fn heap_room(&self) -> (usize, usize) {
        (self.later.capacity(), self.later.len())
    }

    /// Shrinks the heap's room to `n` ids, or what it holds if more.
    pub fn shrink_heap_to(&mut self, n: usize) {
        self.later.shrink_to(n);
    }

    /// Every queued (second, id): the buckets' soonest second first, then the heap's in no
    /// order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, LeaseId)> + '_ {
        self.buckets
            .iter()
            .flat_map(|(t, ids)| ids.iter().map(move |id| (*t, *id)))
            .chain(self.later.iter().map(|Reverse(e)| *e))
    }

    /// Ids in buckets, for tests.
    #[cfg(test)]
    fn bucketed(&self) -> usize {
        self.bucketed
    }
}

impl Extend<(i64, LeaseId)> for ExpiryQueue {
    /// Sorts what falls due within the hour by second first, so that each second costs one map
    /// lookup: a restore hands over leases in id order, which mixed TTLs leave in no order of
    /// expiry. The rest goes to the heap, which builds in linear time.
    fn extend<I: IntoIterator<Item = (i64, LeaseId)>>(&mut self, items: I) {
        let (mut soon, later): (Vec<_>, Vec<_>) =
            items.into_iter().partition(|&(at, _)| at < self.horizon);
        soon.sort_unstable_by_key(|&(at, _)| at);
        for run in soon.chunk_by(|a, b| a.0 == b.0) {
            let bucket = self.buckets.entry(run[0].0).or_default();
            bucket.extend(run.iter().map(|&(_, id)| id));
            self.bucketed += run.len();
        }
        // BinaryHeap::extend rebuilds in O(n) when that is cheaper than pushing one by one.
        self.later.extend(later.into_iter().map(Reverse));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> LeaseId {
        LeaseId([n; 16])
    }

    #[test]
    fn takes_what_is_due_soonest_second_first_in_bounded_slices() {
        let mut q = ExpiryQueue::starting_at(0);
        q.push(30, id(1));
        q.extend([(10, id(2)), (10, id(3)), (20, id(4)), (10, id(5))]);
        q.push(20, id(6));
        assert_eq!((q.len(), q.next_due()), (6, Some(10)));

        let mut out = Vec::new();
        q.take_due(5, 10, &mut out);
        assert!(out.is_empty(), "nothing due before 10");

        // A slice ends inside a second; the rest of that second comes next.
        q.take_due(20, 2, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((q.len(), q.next_due()), (4, Some(10)));
        q.take_due(20, 10, &mut out);
        let mut got: Vec<u8> = out.iter().map(|i| i.0[0]).collect();
        let (early, late) = got.split_at_mut(3);
        early.sort();
        late.sort();
        assert_eq!(got, [2, 3, 5, 4, 6], "every id of 10, then of 20");
        assert_eq!((q.len(), q.next_due()), (1, Some(30)));
        assert_eq!(q.iter().collect::<Vec<_>>(), [(30, id(1))]);

        out.clear();
        q.take_due(i64::MAX, 10, &mut out);
        assert_eq!(out, [id(1)]);
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn leases_due_beyond_the_hour_wait_in_the_heap_and_move_into_buckets_as_it_comes() {
        let mut q = ExpiryQueue::starting_at(0);
        // Within the hour: buckets. Beyond: the heap, pushed or restored.
        q.push(100, id(1));
        q.push(BUCKETED_S + 50, id(2));
        q.extend([
            (BUCKETED_S + 10, id(3)),
            (200, id(4)),
            (3 * BUCKETED_S, id(5)),
        ]);
        assert_eq!((q.len(), q.bucketed(), q.next_due()), (5, 2, Some(100)));

        // At 100 the first is due; 3610 and 3650 come within the hour and move; 10800 stays.
        let mut out = Vec::new();
        q.take_due(100, 10, &mut out);
        assert_eq!(out, [id(1)]);
        assert_eq!((q.len(), q.bucketed()), (4, 3));
        // A push due before the moved-on horizon goes into a bucket at once.
        q.push(BUCKETED_S + 90, id(6));
        assert_eq!(q.bucketed(), 4);

        // Soonest first across both, and one left in the heap is still taken when due.
        out.clear();
        q.take_due(BUCKETED_S + 50, 10, &mut out);
        assert_eq!(out, [id(4), id(3), id(2)]);
        assert_eq!(q.next_due(), Some(BUCKETED_S + 90));
        out.clear();
        q.take_due(i64::MAX, 10, &mut out);
        assert_eq!(out, [id(6), id(5)]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_due_lease_still_in_the_heap_is_taken_and_moves_are_bounded() {
        let mut q = ExpiryQueue::starting_at(0);
        let n = PROMOTE_MAX * 2 + 5;
        q.extend((0..n).map(|i| (2 * BUCKETED_S, LeaseId([(i % 251) as u8; 16]))));
        q.push(2 * BUCKETED_S - 1, id(7));
        assert_eq!(q.bucketed(), 0);
        let mut out = Vec::new();
        // Within the hour of them, a bounded number moves per call.
        q.take_due(BUCKETED_S + 1, 10, &mut out);
        assert!(out.is_empty());
        assert_eq!(q.bucketed(), PROMOTE_MAX);
        // The clock jumps past them all: what is due comes out whether moved or not.
        let mut taken = 0;
        loop {
            out.clear();
            q.take_due(3 * BUCKETED_S, 512, &mut out);
            assert!(out.len() <= 512);
            if out.is_empty() {
                break;
            }
            taken += out.len();
        }
        assert_eq!(taken, n + 1);
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
    }
}
