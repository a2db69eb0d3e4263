//! The expiry queue: which lease falls due when.
//!
//! Owns: the order in which the reaper retires leases. Leases due within the next two hours
//! are bucketed by the second they fall due in, each bucket a plain list of ids, so taking
//! what is due is a walk along a list rather than a heap pop per lease. A binary heap alone
//! paid ~20 levels of sift-down, mostly cache misses in a 26 MB heap, for each of a million
//! leases expiring at once: about a fifth of the retirement's CPU, all of it under the lock
//! that every issuance also takes. Credentials of one TTL issued in one second share a
//! bucket, and there are at most two hours' worth of buckets.
//!
//! Leases due later wait in a binary heap, and the reaper moves them into their bucket as they
//! come within the window ([`ExpiryQueue::promote`]). Buckets for them would cost ~100 bytes a
//! lease where few share a second (long TTLs issued slowly), against the heap's 24, and a
//! restore of leases spread over days would pay a map lookup per lease where the heap builds
//! in linear time.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BTreeMap, BinaryHeap};

use super::LeaseId;

/// Leases due sooner than this after the latest `now` the queue was given go into buckets.
/// Two hours, not one: an hour is the commonest TTL (SPIRE's default for X.509-SVIDs, and
/// Tessera's task limit), and the reaper may have last given the queue its `now` 30 s ago, so
/// with an hour's window every hour-long lease would have gone through the heap.
pub const BUCKETED_S: i64 = 2 * 3600;

/// Lease ids by the second they fall due. An id may be queued more than once (see
/// [`super::LeaseTable::requeue_listed`]); whoever takes it finds the lease gone the second
/// time.
#[derive(Debug)]
pub struct ExpiryQueue {
    buckets: BTreeMap<i64, Vec<LeaseId>>,
    bucketed: usize,
    later: BinaryHeap<Reverse<(i64, LeaseId)>>,
    /// Pushes due before this second go into buckets, the rest into `later`. Some of `later`
    /// may be due before it until moved, and after the clock went back some buckets after it:
    /// every reader looks at both.
    horizon: i64,
}

impl Default for ExpiryQueue {
    /// A queue bucketing what falls due within [`BUCKETED_S`] from now (the wall clock's).
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
        bucketed.into_iter().chain(later).min()
    }

    /// Moves up to `max` ids due at or before `now_s` into `out`: the buckets' soonest second
    /// first (in no order within a second), then any due still in the heap, so not strictly
    /// soonest first across the two. An emptied bucket's memory goes back at once, so a mass
    /// expiry gives back the queue's share as it is retired.
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
        // Due, but not moved into a bucket in time (a clock step forward): taken as the heap
        // hands them out.
        while left > 0 {
            let Some(top) = self.later.peek_mut() else {
                break;
            };
            if top.0.0 > now_s {
                break;
            }
            out.push(PeekMut::pop(top).0.1);
            left -= 1;
        }
    }

    /// Moves up to `max` leases due within [`BUCKETED_S`] of `now_s`, but not yet due, from
    /// the heap into their buckets, and from now on buckets pushes due within that window.
    /// Returns how many moved: the caller repeats, releasing the lock in between, until fewer
    /// than `max` did. Leases already due are left for [`Self::take_due`]; while one is at the
    /// heap's top, nothing moves.
    pub fn promote(&mut self, now_s: i64, max: usize) -> usize {
        // Follows the clock both ways: a horizon left a year ahead by a clock that ran ahead
        // would bucket every lease until real time caught up.
        self.horizon = now_s.saturating_add(BUCKETED_S);
        let mut moved = 0;
        while moved < max {
            let Some(top) = self.later.peek_mut() else {
                break;
            };
            let t = top.0.0;
            if t <= now_s || t >= self.horizon {
                break;
            }
            let Reverse((_, id)) = PeekMut::pop(top);
            self.buckets.entry(t).or_default().push(id);
            self.bucketed += 1;
            moved += 1;
        }
        moved
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
    /// Sorts what falls due within the window by second first, so that each second costs one map
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
    fn leases_due_beyond_the_window_wait_in_the_heap_and_move_into_buckets_as_it_comes() {
        const W: i64 = BUCKETED_S;
        let mut q = ExpiryQueue::starting_at(0);
        // Within the window: buckets. Beyond: the heap, pushed or restored.
        q.push(100, id(1));
        q.push(W + 50, id(2));
        q.extend([(W + 10, id(3)), (200, id(4)), (3 * W, id(5))]);
        assert_eq!((q.len(), q.bucketed(), q.next_due()), (5, 2, Some(100)));

        let mut out = Vec::new();
        q.take_due(100, 10, &mut out);
        assert_eq!(out, [id(1)]);
        assert_eq!(q.bucketed(), 1, "taking moves nothing");
        // At 100, W+10 and W+50 come within the window and move; 3W stays.
        assert_eq!(q.promote(100, 10), 2);
        assert_eq!((q.len(), q.bucketed()), (4, 3));
        // A push due before the moved-on horizon goes into a bucket at once.
        q.push(W + 90, id(6));
        assert_eq!(q.bucketed(), 4);

        out.clear();
        q.take_due(W + 50, 10, &mut out);
        assert_eq!(out, [id(4), id(3), id(2)]);
        assert_eq!(q.next_due(), Some(W + 90));
        out.clear();
        q.take_due(i64::MAX, 10, &mut out);
        assert_eq!(out, [id(6), id(5)]);
        assert!(q.is_empty());
    }

    #[test]
    fn the_soonest_lease_still_in_the_heap_is_due_and_taken_and_moves_are_bounded() {
        const W: i64 = BUCKETED_S;
        let mut q = ExpiryQueue::starting_at(0);
        let n = 2 * 1024 + 5;
        q.extend((0..n).map(|i| (2 * W, LeaseId([(i % 251) as u8; 16]))));
        q.push(2 * W - 1, id(7));
        q.push(W - 1, id(8));
        assert_eq!((q.bucketed(), q.next_due()), (1, Some(W - 1)));
        let mut out = Vec::new();
        q.take_due(W - 1, 10, &mut out);
        assert_eq!(out, [id(8)]);
        // The heap holds the soonest now.
        assert_eq!(q.next_due(), Some(2 * W - 1));
        // Within the window of them: a bounded number moves per call, soonest first.
        assert_eq!(q.promote(W + 1, 1024), 1024);
        assert_eq!(q.next_due(), Some(2 * W - 1));
        assert_eq!(q.promote(W + 1, 1024), 1024);
        assert_eq!(q.bucketed(), 2048);
        // The clock jumps past them all before the last moved: due exactly at `now` counts.
        out.clear();
        q.take_due(2 * W, usize::MAX, &mut out);
        assert_eq!(out.len(), n + 1);
        assert!(q.is_empty());
        assert_eq!(q.next_due(), None);
        // Nothing due in the heap's top blocks moves, and nothing due is moved.
        q.push(3 * W, id(9));
        q.push(3 * W + 5, id(10));
        assert_eq!(q.promote(3 * W, 10), 0);
        assert_eq!(q.bucketed(), 0);
    }

    #[test]
    fn the_window_follows_the_clock_back_as_well_as_forward() {
        const W: i64 = BUCKETED_S;
        let mut q = ExpiryQueue::starting_at(0);
        // A clock a year ahead, then right again: a lease due in three windows goes to the
        // heap, not to a bucket of its own.
        let _ = q.promote(365 * 86_400, 10);
        q.push(W / 2, id(1));
        assert_eq!(q.bucketed(), 1, "within the year-ahead window");
        let _ = q.promote(0, 10);
        q.push(3 * W, id(2));
        assert_eq!((q.bucketed(), q.len()), (1, 2));
        assert_eq!(q.heap_room().1, 1);
    }

    /// Random pushes, restores, takes, moves and clock steps against a plain list: every id
    /// comes out once, when due, never more than asked for, and `next_due` and `len` agree.
    #[test]
    fn agrees_with_a_plain_list_under_random_use() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let mut now = 1_000_000_i64;
            let mut q = ExpiryQueue::starting_at(now);
            let mut model: Vec<(i64, LeaseId)> = Vec::new();
            let mut next = 0u32;
            let mut fresh = |at: i64| {
                next += 1;
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&next.to_le_bytes());
                (at, LeaseId(b))
            };
            for _ in 0..300 {
                let ahead = |r: u64| now - 5 + r as i64;
                match rand(6) {
                    0 | 1 => {
                        let e = fresh(ahead(rand(3 * BUCKETED_S as u64)));
                        q.push(e.0, e.1);
                        model.push(e);
                    }
                    2 => {
                        let batch: Vec<_> = (0..rand(40))
                            .map(|_| fresh(ahead(rand(4 * BUCKETED_S as u64))))
                            .collect();
                        model.extend(&batch);
                        q.extend(batch);
                    }
                    3 => {
                        let max = 1 + rand(64) as usize;
                        let mut out = Vec::new();
                        q.take_due(now, max, &mut out);
                        let due = model.iter().filter(|e| e.0 <= now).count();
                        assert_eq!(out.len(), due.min(max), "round {round}");
                        for id in out {
                            let at = model.iter().position(|e| e.1 == id).expect("taken once");
                            assert!(model.swap_remove(at).0 <= now, "taken before due");
                        }
                    }
                    4 => {
                        let _ = q.promote(now, 1 + rand(16) as usize);
                    }
                    _ => {
                        // Mostly forward, sometimes a step either way.
                        now += match rand(10) {
                            0 => rand(2 * BUCKETED_S as u64) as i64,
                            1 => -(rand(BUCKETED_S as u64) as i64),
                            _ => rand(120) as i64,
                        };
                    }
                }
                assert_eq!(q.len(), model.len(), "round {round}");
                assert_eq!(
                    q.next_due(),
                    model.iter().map(|e| e.0).min(),
                    "round {round}"
                );
            }
        }
    }
}
