//! The expiry queue: which lease falls due when.
//!
//! Owns: the order in which the reaper retires leases. Leases are bucketed by the second they
//! fall due in, each bucket a plain list of ids, so taking what is due is a walk along a list
//! rather than a heap pop per lease. A binary heap paid ~20 levels of sift-down, mostly cache
//! misses in a 26 MB heap, for each of a million leases expiring at once: about a fifth of
//! the retirement's CPU, all of it under the lock that every issuance also takes. Expiry
//! times are whole seconds and credentials of one TTL issued in one second share a bucket, so
//! there are as many buckets as distinct seconds ahead (a few thousand for hour-long TTLs).

use std::collections::BTreeMap;

use super::LeaseId;

/// Lease ids by the second they fall due. An id may be queued more than once (see
/// [`super::LeaseTable::requeue_listed`]); whoever takes it finds the lease gone the second
/// time.
#[derive(Debug, Default)]
pub struct ExpiryQueue {
    buckets: BTreeMap<i64, Vec<LeaseId>>,
    len: usize,
}

impl ExpiryQueue {
    /// Queues `id` to fall due at `at_s` (Unix seconds).
    pub fn push(&mut self, at_s: i64, id: LeaseId) {
        self.buckets.entry(at_s).or_default().push(id);
        self.len += 1;
    }

    /// The soonest second anything falls due.
    pub fn next_due(&self) -> Option<i64> {
        self.buckets.first_key_value().map(|(t, _)| *t)
    }

    /// Moves up to `max` ids due at or before `now_s` into `out`, soonest second first (in no
    /// order within a second). An emptied bucket's memory goes back at once, so a mass expiry
    /// gives back the queue's share as it is retired, with nothing left to shrink.
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
            self.len -= taken;
            if ids.is_empty() {
                first.remove();
            }
        }
    }

    /// Ids queued (a lease queued twice counts twice).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ids the buckets have room for without growing.
    pub fn capacity(&self) -> usize {
        self.buckets.values().map(Vec::capacity).sum()
    }

    /// Every queued (second, id), soonest second first.
    pub fn iter(&self) -> impl Iterator<Item = (i64, LeaseId)> + '_ {
        self.buckets
            .iter()
            .flat_map(|(t, ids)| ids.iter().map(move |id| (*t, *id)))
    }
}

impl Extend<(i64, LeaseId)> for ExpiryQueue {
    /// Sorts what it is given by second first, so that each second costs one map lookup: a
    /// restore hands over leases in id order, which mixed TTLs leave in no order of expiry.
    fn extend<I: IntoIterator<Item = (i64, LeaseId)>>(&mut self, items: I) {
        let mut items: Vec<(i64, LeaseId)> = items.into_iter().collect();
        items.sort_unstable_by_key(|&(at, _)| at);
        for run in items.chunk_by(|a, b| a.0 == b.0) {
            let bucket = self.buckets.entry(run[0].0).or_default();
            bucket.extend(run.iter().map(|&(_, id)| id));
            self.len += run.len();
        }
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
        let mut q = ExpiryQueue::default();
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
}
