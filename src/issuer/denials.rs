//! Owns: how many refusals each caller may write to the audit log.
//!
//! Anyone on the machine can connect to the Workload API socket, and every refused request
//! used to become a durable audit record: a loop of refused calls from one uid grew the
//! store's queue, the audit files and the disk without bound, and rotated older evidence
//! away. Each caller (uid, agent or operator) now gets a burst of records per window; past
//! it, refusals are counted, not written, and the caller's next recorded refusal says how
//! many were left out. Metrics still count every refusal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals recorded per caller per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Callers tracked at once; past this, windows that have ended are forgotten first, and then
/// every caller shares one bucket.
const MAX_CALLERS: usize = 4096;

#[derive(Debug)]
struct Bucket {
    window_start: Instant,
    recorded: u32,
    /// Left out since this caller's last recorded refusal.
    left_out: u64,
}

/// Per-caller limits on refusal records.
#[derive(Debug, Default)]
pub struct DenialLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl DenialLimiter {
    /// `Some(n)`: record this refusal, noting that `n` refusals by the same caller were left
    /// out before it. `None`: leave it out (it is counted).
    pub fn admit(&self, caller: &str, now: Instant) -> Option<u64> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= MAX_CALLERS && !b.contains_key(caller) {
            b.retain(|_, v| now.duration_since(v.window_start) < WINDOW || v.left_out > 0);
        }
        let key = if b.len() >= MAX_CALLERS && !b.contains_key(caller) {
            "(many callers)"
        } else {
            caller
        };
        let bucket = b.entry(key.to_owned()).or_insert(Bucket {
            window_start: now,
            recorded: 0,
            left_out: 0,
        });
        if now.duration_since(bucket.window_start) >= WINDOW {
            bucket.window_start = now;
            bucket.recorded = 0;
        }
        if bucket.recorded < BURST {
            bucket.recorded += 1;
            Some(std::mem::take(&mut bucket.left_out))
        } else {
            bucket.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_counted_and_reported_with_the_next_record() {
        let l = DenialLimiter::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit("uid:1000", t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(l.admit("uid:1000", t0), None);
        }
        // Another caller is not held back by the first.
        assert_eq!(l.admit("uid:1001", t0), Some(0));
        // Next window: recorded again, with the count of what was left out.
        let t1 = t0 + WINDOW;
        assert_eq!(l.admit("uid:1000", t1), Some(5));
        assert_eq!(l.admit("uid:1000", t1), Some(0));
    }

    #[test]
    fn many_callers_share_one_bucket_instead_of_growing_the_map() {
        let l = DenialLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_CALLERS {
            l.admit(&format!("uid:{i}"), t0);
        }
        let mut recorded = 0;
        for i in 0..100 {
            recorded += usize::from(l.admit(&format!("new:{i}"), t0).is_some());
        }
        assert_eq!(recorded, BURST as usize);
        assert!(l.buckets.lock().unwrap().len() <= MAX_CALLERS + 1);
        // Once their windows end, the old callers make room.
        assert_eq!(l.admit("new:late", t0 + WINDOW), Some(0));
        assert!(l.buckets.lock().unwrap().len() < 10);
    }
}
