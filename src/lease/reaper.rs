//! The reaper: one background task that retires leases at their expiry.
//!
//! Owns: turning expiry into removal. It sleeps until the soonest deadline in the lease
//! table's expiry queue (a binary heap, not a timer per lease and not a periodic scan), wakes
//! early when a sooner deadline is added, removes what is due from memory and from the store,
//! gives back the table capacity a burst left behind, and reports how late it ran (reaper
//! lag) for the metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::LeaseTable;
use super::store::{Op, Store, commit};
use crate::shutdown::Shutdown;

/// Wall-clock seconds source; tests drive it from tokio's paused clock.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| time::OffsetDateTime::now_utc().unix_timestamp())
}

/// Expired leases deleted per store commit.
const DELETE_CHUNK: usize = 2_000;

/// How often the reaper wakes even with nothing due: bounds the effect of a wall-clock jump.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Runs until shutdown. `lag_ms` receives how late the last batch was handled.
pub async fn run(
    table: Arc<LeaseTable>,
    store: Arc<dyn Store>,
    clock: Clock,
    lag_ms: Arc<AtomicI64>,
    mut shutdown: Shutdown,
) {
    loop {
        let now = clock();
        let sleep = match table.next_deadline() {
            Some(t) if t <= now => Duration::ZERO,
            Some(t) => Duration::from_secs((t - now) as u64).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        if !sleep.is_zero() {
            tokio::select! {
                () = shutdown.wait() => return,
                () = table.deadline_changed() => continue,
                () = tokio::time::sleep(sleep) => {}
            }
        }
        let now = clock();
        let due = table.next_deadline();
        let (removed, _) = table.expire_due(now);
        if let Some(d) = due {
            lag_ms.store((now - d).max(0) * 1000, Ordering::Relaxed);
        }
        if !removed.is_empty() {
            tracing::debug!(count = removed.len(), "expired leases retired");
            // Before the store deletes, which take seconds for a million rows.
            let shrunk = table.compact();
            if shrunk > 0 {
                tracing::debug!(tables = shrunk, "lease tables shrunk after expiry");
            }
            // Forgetting expired rows is housekeeping: on failure they are found expired and
            // deleted again at the next start.
            // In chunks: the store's single writer serves issuance between them, so a mass
            // expiry does not stall credentials waiting to be committed.
            for chunk in removed.chunks(DELETE_CHUNK) {
                if let Err(e) = commit(&*store, vec![Op::Delete(chunk.to_vec())]).await {
                    tracing::warn!(error = %e, "could not delete expired leases from the store");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::store::StoreError;
    use crate::lease::{Kind, Lease, LeaseId, State};
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// Records what the reaper asks the store to do.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<LeaseId>>);

    impl Store for Recorder {
        fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
            for op in ops {
                if let Op::Delete(ids) = op {
                    self.0.lock().unwrap().extend(ids);
                }
            }
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            rx
        }
    }

    fn lease(exp: i64) -> Lease {
        Lease {
            id: LeaseId::random(),
            kind: Kind::Jwt,
            state: State::Active,
            uid: 0,
            pid: 0,
            issued_at: 0,
            expires_at: exp,
            spiffe_id: "spiffe://td/a".into(),
            entry_id: "e".into(),
            exe: None,
            task_id: None,
            serial: None,
            revocation: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retires_leases_at_expiry_and_wakes_for_sooner_deadlines() {
        let base = tokio::time::Instant::now();
        let clock: Clock = Arc::new(move || 1_000 + base.elapsed().as_secs() as i64);
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let late = lease(1_100);
        table.insert(late.clone());
        let (trigger, sd) = crate::shutdown::channel();
        let lag = Arc::new(AtomicI64::new(0));
        let task = tokio::spawn(run(
            Arc::clone(&table),
            store.clone() as Arc<dyn Store>,
            clock,
            lag,
            sd,
        ));

        tokio::time::sleep(Duration::from_secs(5)).await;
        // A sooner deadline arrives while the reaper sleeps towards t=1100.
        let soon = lease(1_010);
        table.insert(soon.clone());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(table.get(&soon.id).is_some(), "not yet due at t=1009");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(table.get(&soon.id).is_none(), "retired at t=1010");
        assert_eq!(*store.0.lock().unwrap(), vec![soon.id]);
        assert!(table.get(&late.id).is_some());

        tokio::time::sleep(Duration::from_secs(90)).await;
        assert!(table.get(&late.id).is_none());
        assert!(table.is_empty());
        trigger.trigger();
        task.await.unwrap();
    }
}
