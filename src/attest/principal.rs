//! Owns: which uids count as one user for fair shares of the daemon (connections, streams,
//! bytes in flight, attestation reads), and the counter of those shares ([`PerUid`]).
//!
//! A user with a subordinate uid range (`/etc/subuid`: rootless containers, the `useradd`
//! default on current distributions) appears to the kernel as up to 65,536 users. Counted
//! apart, 16 of them reached a socket's connection total and shut every other caller out.
//! Each range counts as one principal per block of 65,536 uids from its start: a user's
//! range is one principal, and a container manager's large range (LXD's
//! `root:1000000:1000000000`, `--userns=auto`) one per container it hands a block to, not
//! one for all of them (nor its owner's, root's, own share). Identity is still each uid's own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

/// Uids per principal within a range: what `useradd` and container managers give each user
/// or container.
const BLOCK: u32 = 65_536;

/// A range: first uid, one past the last. Sorted by first uid.
type Ranges = Vec<(u32, u32)>;

static SUBORDINATE: OnceLock<Ranges> = OnceLock::new();

/// The principal a uid counts as: the first uid of its block of a subordinate range, or the
/// uid itself.
pub fn principal(uid: u32) -> u32 {
    SUBORDINATE
        .get()
        .and_then(|r| block_of(r, uid))
        .unwrap_or(uid)
}

/// "uid N", with the block it is counted with when it is in one: for refusals that say what
/// holds the share.
pub fn describe(uid: u32) -> String {
    match SUBORDINATE.get().and_then(|r| block_of(r, uid)) {
        Some(p) => format!("uid {uid} (counted with the subordinate uids of its block from {p})"),
        None => format!("uid {uid}"),
    }
}

fn block_of(ranges: &Ranges, uid: u32) -> Option<u32> {
    let i = ranges.partition_point(|&(start, _)| start <= uid);
    let &(start, end) = ranges.get(i.checked_sub(1)?)?;
    (start..end)
        .contains(&uid)
        .then(|| start + (uid - start) / BLOCK * BLOCK)
}

/// Reads `/etc/subuid`-format text: `USER:FIRST:COUNT` lines. Lines that do not parse are
/// left out, and a range overlapping the one before it is cut to what follows it.
pub fn parse_subordinate(text: &str) -> Ranges {
    let mut v: Ranges = text
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (_user, first, count) = (f.next()?, f.next()?, f.next()?);
            let first: u32 = first.parse().ok()?;
            let end = first.checked_add(count.parse().ok().filter(|&c: &u32| c > 0)?)?;
            Some((first, end))
        })
        .collect();
    v.sort_unstable();
    // Nested or overlapping lines (hand-edited files): each uid in exactly one range.
    let mut out: Ranges = Vec::with_capacity(v.len());
    for (start, end) in v {
        match out.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Loads the subordinate uid ranges once, at start (a missing file is no ranges). Returns how
/// many there are.
pub fn load_subordinate_uids(path: &std::path::Path) -> usize {
    let ranges = parse_subordinate(&std::fs::read_to_string(path).unwrap_or_default());
    let n = ranges.len();
    let _ = SUBORDINATE.set(ranges);
    n
}

/// Counts what each principal holds (slots, or bytes), with a cap per principal and in total.
/// Every per-user limit of the daemon is one of these: the API layer's connections, streams
/// and bytes in flight, and attestation's reads still running.
#[derive(Debug)]
pub struct PerUid {
    per_uid: usize,
    total_max: usize,
    counts: DashMap<u32, usize>,
    total: AtomicUsize,
}

/// Which cap a refused [`PerUid::take`] reached, so that a refusal can say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The caller's principal holds its most.
    Principal,
    /// Everyone together holds the most allowed.
    Total,
}

/// One held slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    /// At most `per_uid` per principal and `total` in all.
    pub fn new(per_uid: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_uid,
            total_max: total,
            counts: DashMap::new(),
            total: AtomicUsize::new(0),
        })
    }

    /// A slot for `uid`'s principal, or which cap stops it.
    pub fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, Full> {
        self.add(uid, 1)?;
        Ok(Slot {
            owner: Arc::clone(self),
            uid,
        })
    }

    /// Counts `n` more for `uid` (its [`principal`]) if that stays within both caps.
    pub fn add(&self, uid: u32, n: usize) -> Result<(), Full> {
        let uid = principal(uid);
        if self.total.fetch_add(n, Ordering::AcqRel) + n > self.total_max {
            self.total.fetch_sub(n, Ordering::AcqRel);
            return Err(Full::Total);
        }
        let mut held = self.counts.entry(uid).or_insert(0);
        if *held + n > self.per_uid {
            drop(held);
            self.total.fetch_sub(n, Ordering::AcqRel);
            return Err(Full::Principal);
        }
        *held += n;
        Ok(())
    }

    /// Gives back `n` that [`Self::add`] counted for `uid`.
    pub fn give(&self, uid: u32, n: usize) {
        let uid = principal(uid);
        self.total.fetch_sub(n, Ordering::AcqRel);
        // Forget a principal with nothing held, so the map does not keep every uid ever seen.
        self.counts.remove_if_mut(&uid, |_, held| {
            *held = held.saturating_sub(n);
            *held == 0
        });
    }

    /// What `uid`'s principal holds now.
    pub fn held(&self, uid: u32) -> usize {
        self.counts.get(&principal(uid)).map_or(0, |n| *n)
    }

    /// What everyone together holds now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Principals holding anything now.
    pub fn principals(&self) -> usize {
        self.counts.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.give(self.uid, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_uid_and_in_total_and_gives_back_on_drop() {
        let l = PerUid::new(2, 3);
        let a1 = l.take(1).unwrap();
        let a2 = l.take(1).unwrap();
        assert_eq!(l.take(1).err(), Some(Full::Principal));
        let b1 = l.take(2).unwrap();
        assert_eq!(l.take(3).err(), Some(Full::Total));
        drop(a1);
        assert_eq!(l.held(1), 1);
        let a3 = l.take(1).unwrap();
        drop((a2, a3, b1));
        assert_eq!((l.held(1), l.held(2)), (0, 0));
        assert_eq!(
            (l.total(), l.principals()),
            (0, 0),
            "principals forgotten at zero"
        );
    }

    #[test]
    fn subordinate_uids_count_per_block_of_their_range() {
        let ranges = parse_subordinate(
            "alice:100000:65536\n1001:165536:65536\n# comment\nroot:1000000:1000000000\n\
             inner:1100000:10\nbad:x:1\nzero:400000:0\nover:4294967290:100\n",
        );
        assert_eq!(
            ranges,
            [
                (100_000, 165_536),
                (165_536, 231_072),
                (1_000_000, 1_001_000_000)
            ]
        );
        for (uid, block) in [
            (99_999, None),
            (100_000, Some(100_000)),
            (165_535, Some(100_000)),
            (165_536, Some(165_536)),
            (231_071, Some(165_536)),
            (231_072, None),
            (0, None),
            // A container manager's range: one principal per container's block, not one for
            // all of them, and not its owner (root).
            (1_000_000, Some(1_000_000)),
            (1_065_535, Some(1_000_000)),
            (1_065_536, Some(1_065_536)),
            // Inside the nested line: the outer range's block.
            (1_100_005, Some(1_065_536)),
        ] {
            assert_eq!(block_of(&ranges, uid), block, "uid {uid}");
        }
    }
}
