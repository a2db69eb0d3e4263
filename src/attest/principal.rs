//! Owns: which uids count as one user for fair shares of the daemon (connections, streams,
//! bytes in flight, attestation reads).
//!
//! A user with a subordinate uid range (`/etc/subuid`: rootless containers, the `useradd`
//! default on current distributions) appears to the kernel as up to 65,536 users. Counted
//! apart, 16 of them reached a socket's connection total and shut every other caller out.
//! Each range counts as one principal per block of 65,536 uids from its start: a user's
//! range is one principal, and a container manager's large range (LXD's
//! `root:1000000:1000000000`, `--userns=auto`) one per container it hands a block to, not
//! one for all of them (nor its owner's, root's, own share). Identity is still each uid's own.

use std::sync::OnceLock;

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

#[cfg(test)]
mod tests {
    use super::*;

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
