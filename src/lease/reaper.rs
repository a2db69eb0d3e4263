//! The reaper: one background task that retires leases at their expiry.
//!
//! Owns: turning expiry into removal. It sleeps until the soonest deadline in the lease
//! table's expiry queue (not a timer per lease and not a periodic scan), wakes
//! early when a sooner deadline is added, removes what is due from memory (a slice at a time,
//! handing its thread back in between) and from the store (a small commit at a time),
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

/// Expired leases taken out of memory before the reaper yields its thread (~1 ms).
const RETIRE_SLICE: usize = 512;

/// Leases moved from the expiry queue's heap into its buckets per lock: ~0.3 ms when they
/// share a second, up to ~3 ms spread over a heap of millions.
const PROMOTE_SLICE: usize = 1024;

/// Expired leases deleted per store commit (see the loop for why so few).
const DELETE_CHUNK: usize = 256;

/// How often the reaper wakes even with nothing due: bounds the effect of a wall-clock jump.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Seconds by which the wall clock must move more, or less, than the monotonic clock between
/// two readings to count as stepped.
pub const CLOCK_STEP_S: i64 = 60;

/// The wall clock as last read, with the monotonic instant of that reading: what the reaper
/// and the CRL publisher compare each new reading with to see a stepped clock.
#[derive(Debug, Clone, Copy)]
pub struct ClockWatch {
    wall_s: i64,
    at: tokio::time::Instant,
}

impl ClockWatch {
    /// Starts from the wall clock reading `now_s`, taken now.
    pub fn new(now_s: i64) -> Self {
        ClockWatch {
            wall_s: now_s,
            at: tokio::time::Instant::now(),
        }
    }

    /// Records the reading `now_s`; returns the previous one and how far the wall clock moved
    /// beyond the time that passed since (seconds; negative when it went back).
    pub fn observe(&mut self, now_s: i64) -> (i64, i64) {
        let last = std::mem::replace(self, ClockWatch::new(now_s));
        let step = now_s - last.wall_s - last.at.elapsed().as_secs() as i64;
        (last.wall_s, step)
    }
}

/// Tells the operator about a stepped wall clock, and after a step back has the CRL signed
/// again, at once rather than at the next refresh: the one served is dated by the clock that
/// ran ahead (relying parties refuse it as not yet valid), and serials that clock took off it
/// are listed again (their leases were kept, see [`super::REVOKED_KEPT_AFTER_EXPIRY_S`]).
/// Returns the step after a jump ahead, for [`LeaseTable::expire_due_after`].
fn check_clock(table: &LeaseTable, watch: &mut ClockWatch, now: i64) -> Option<i64> {
    let (ahead, step) = watch.observe(now);
    if step <= -CLOCK_STEP_S {
        tracing::warn!(
            seconds = -step,
            "the wall clock went back; signing the CRL again, with any revoked certificate \
             that the clock ahead had taken off it"
        );
        table.requeue_listed(now, ahead);
        table.request_crl_resign();
    } else if step >= CLOCK_STEP_S {
        tracing::warn!(
            seconds = step,
            "the wall clock jumped ahead (or the host was suspended): leases the jump made \
             due are kept, still revocable, until the time they had left has passed; leases \
             issued from now on expire by it; revoked certificates expired by it leave the \
             CRL until it comes back (their leases are kept a day)"
        );
        return Some(step);
    }
    None
}

/// CPU time of the calling thread. The retirement's own cost, apart from the time it spent
/// handing its thread to others: what the benchmark reports per expired lease, as the wall
/// time on a busy two-core box says more about the box than about the retirement.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs until shutdown. `lag_ms` receives how late the last batch was handled.
pub async fn run(
    table: Arc<LeaseTable>,
    store: Arc<dyn Store>,
    clock: Clock,
    lag_ms: Arc<AtomicI64>,
    mut shutdown: Shutdown,
) {
    // From the start, so that a step before anything falls due is seen too.
    let mut watch = ClockWatch::new(clock());
    loop {
        // Checked here as well as in the sleep: a backlog of due leases never sleeps.
        if shutdown.is_triggered() {
            return;
        }
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
        let stepped = check_clock(&table, &mut watch, now);
        let due = table.next_deadline();
        let started = std::time::Instant::now();
        let mut removed = Vec::new();
        let mut crl_changed = false;
        let mut cpu = Duration::ZERO;
        loop {
            let on_cpu = thread_cpu();
            let (slice, crl) = table.expire_due_after(now, RETIRE_SLICE, stepped);
            cpu += thread_cpu().saturating_sub(on_cpu);
            crl_changed |= crl;
            removed.extend(slice);
            if table.next_deadline().is_none_or(|t| t > now) {
                break;
            }
            // Retiring a million leases takes over a second of hash-table misses; held in
            // one go, it took a tokio worker (of two on a small box) from issuance for all of
            // it, halving the rate and tripling the p99 of credentials issued meanwhile.
            tokio::task::yield_now().await;
            // What is left is still due at the next wake, or deleted as expired at the next
            // start: stopping here loses nothing.
            if shutdown.is_triggered() {
                return;
            }
        }
        // After the work, so that a slow retirement shows as lag.
        if let Some(d) = due {
            lag_ms.store((clock() - d).max(0) * 1000, Ordering::Relaxed);
        }
        // Once, not per slice: each announcement has the CRL publisher copy every revoked
        // serial and re-sign the CRL.
        if crl_changed {
            table.announce_change();
        }
        if !removed.is_empty() {
            let ms = started.elapsed().as_millis() as u64;
            // Before the store deletes, which take seconds for a million rows.
            let on_cpu = thread_cpu();
            let shrunk = table.compact();
            tracing::debug!(
                count = removed.len(),
                ms,
                cpu_us = cpu.as_micros() as u64,
                tables_shrunk = shrunk,
                shrink_cpu_us = thread_cpu().saturating_sub(on_cpu).as_micros() as u64,
                "expired leases retired"
            );
            // In key order, as SQLite stores them: chunks of ids scattered over the table
            // touch a page per row (a test deleting half of 300k rows, 256 at a time, wrote
            // 11 times the log). The queue hands out one second's leases in no order. Off the
            // workers: a million ids take ~0.1 s to sort.
            let removed = if removed.len() > DELETE_CHUNK {
                // On failure (a panic, a runtime shutting down) none: the next start deletes
                // expired rows.
                tokio::task::spawn_blocking(move || {
                    removed.sort_unstable();
                    removed
                })
                .await
                .unwrap_or_default()
            } else {
                removed.sort_unstable();
                removed
            };
            // Forgetting expired rows is housekeeping: on failure they are found expired and
            // deleted again at the next start.
            // In small chunks, one commit at a time: the store's single writer folds each into
            // the batch of credentials waiting with it, so a chunk adds under a millisecond to
            // that batch instead of stalling it (2,000-row chunks, ~5 ms each, doubled the p99
            // of issuance during a mass expiry), and the deletes ride on issuance's fsyncs.
            for chunk in removed.chunks(DELETE_CHUNK) {
                if shutdown.is_triggered() {
                    return;
                }
                if let Err(e) = commit(&*store, vec![Op::Delete(chunk.to_vec())]).await {
                    tracing::warn!(error = %e, "could not delete expired leases from the store");
                    break;
                }
            }
        }
        // Leases coming within the next two hours move into the expiry queue's lists, so that
        // they are not popped from its heap one by one when they expire; a slice per lock.
        // Slept between, not yielded: the lock is not fair, and taken again at once it kept
        // issuance waiting for most of a second while a million moved (review AM). Nothing
        // hurries: they are due two hours from now.
        while table.promote_expiries(now, PROMOTE_SLICE) == PROMOTE_SLICE {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::store::StoreError;
    use crate::lease::{Kind, Lease, LeaseId, Revocation, State};
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// Records the deletes the reaper asks the store for, one entry per op, and with a
    /// table, how many leases it held at each.
    #[derive(Debug, Default)]
    struct Recorder {
        deletes: Mutex<Vec<Vec<LeaseId>>>,
        table: Option<Arc<LeaseTable>>,
        table_len: Mutex<Vec<usize>>,
    }

    impl Recorder {
        fn deleted(&self) -> Vec<LeaseId> {
            self.deletes.lock().unwrap().concat()
        }
    }

    impl Store for Recorder {
        fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
            for op in ops {
                if let Op::Delete(ids) = op {
                    self.deletes.lock().unwrap().push(ids);
                    if let Some(t) = &self.table {
                        self.table_len.lock().unwrap().push(t.len());
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            rx
        }
    }

    /// Starts the reaper over `table` and `store`, its clock reading 1,000 s now (tests run on
    /// tokio's paused clock).
    fn start(
        table: &Arc<LeaseTable>,
        store: &Arc<Recorder>,
    ) -> (crate::shutdown::Trigger, tokio::task::JoinHandle<()>) {
        start_with(table, store, &Arc::new(AtomicI64::new(0)))
    }

    /// The same, with the wall clock 1000 plus tokio's (paused) time plus `step`, which the
    /// test may change.
    fn start_with(
        table: &Arc<LeaseTable>,
        store: &Arc<Recorder>,
        step: &Arc<AtomicI64>,
    ) -> (crate::shutdown::Trigger, tokio::task::JoinHandle<()>) {
        let base = tokio::time::Instant::now();
        let step = Arc::clone(step);
        let clock: Clock =
            Arc::new(move || 1_000 + base.elapsed().as_secs() as i64 + step.load(Ordering::SeqCst));
        let (trigger, sd) = crate::shutdown::channel();
        let task = tokio::spawn(run(
            Arc::clone(table),
            Arc::clone(store) as Arc<dyn Store>,
            clock,
            Arc::new(AtomicI64::new(0)),
            sd,
        ));
        (trigger, task)
    }

    /// A revoked X.509-SVID's lease.
    fn revoked_cert(exp: i64) -> Lease {
        let mut l = lease(exp);
        l.kind = Kind::X509;
        l.state = State::Revoked;
        l.serial = Some(Box::new(l.id.0));
        l.revocation = Some(Arc::new(Revocation {
            at_ms: 1_000_000,
            by: "op".into(),
            reason: "leaked".into(),
        }));
        l
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
            kill_epoch: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retires_leases_at_expiry_and_wakes_for_sooner_deadlines() {
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let late = lease(1_100);
        table.insert(late.clone());
        let (trigger, task) = start(&table, &store);

        tokio::time::sleep(Duration::from_secs(5)).await;
        // A sooner deadline arrives while the reaper sleeps towards t=1100.
        let soon = lease(1_010);
        table.insert(soon.clone());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(table.get(&soon.id).is_some(), "not yet due at t=1009");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(table.get(&soon.id).is_none(), "retired at t=1010");
        assert_eq!(store.deleted(), vec![soon.id]);
        assert!(table.get(&late.id).is_some());

        tokio::time::sleep(Duration::from_secs(90)).await;
        assert!(table.get(&late.id).is_none());
        assert!(table.is_empty());
        trigger.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_mass_expiry_leaves_memory_at_once_and_the_store_in_small_chunks() {
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder {
            table: Some(Arc::clone(&table)),
            ..Recorder::default()
        });
        // Several slices and chunks of retired leases, the last of each partial, whatever
        // order the queue hands out one second's leases in. Some leases are revoked
        // certificates, so the expiry empties the CRL: they expired earlier, by as long as a
        // revoked certificate stays on the CRL, so their serials leave it at 1010 while the
        // rest are retired. Their leases stay (a day past expiry).
        let revoked = RETIRE_SLICE / 2 + 3;
        let n = RETIRE_SLICE * 3 + DELETE_CHUNK + 7 + revoked;
        let mut due: Vec<LeaseId> = (0..n)
            .filter_map(|i| {
                let retired = i % 4 != 0 || i >= 4 * revoked;
                let l = if retired {
                    lease(1_010)
                } else {
                    revoked_cert(1_010 - crate::lease::CRL_KEPT_AFTER_EXPIRY_S)
                };
                table.insert(l.clone());
                retired.then_some(l.id)
            })
            .collect();
        assert_eq!(table.revoked_serials(0).len(), revoked);
        let changes = table.subscribe();
        let keep = lease(1_100);
        table.insert(keep.clone());
        let (trigger, task) = start(&table, &store);
        // At 1000 the revoked ones asked for a CRL still listing them (past their expiry).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(table.len(), n + 1, "nothing retired before 1010");
        let announced = *changes.borrow();
        // Another task on the same (single) thread, woken at the expiry: it only gets to run
        // in the middle of the retirement if the reaper hands the thread back between slices.
        let probe = tokio::spawn({
            let table = Arc::clone(&table);
            async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                let mut seen = Vec::new();
                for _ in 0..100_000 {
                    let len = table.len();
                    if len == revoked + 1 {
                        break;
                    }
                    seen.push(len);
                    tokio::task::yield_now().await;
                }
                seen
            }
        });

        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut seen = probe.await.unwrap();
        seen.dedup();
        let midway = seen
            .iter()
            .filter(|&&len| len > revoked + 1 && len <= n)
            .count();
        assert!(midway >= 2, "the probe ran between slices only at {seen:?}");
        assert_eq!(
            table.len(),
            revoked + 1,
            "every due lease retired, the later one and the revoked certificates kept"
        );
        assert!(table.get(&keep.id).is_some());
        let mut deleted = store.deleted();
        assert_eq!(deleted.len(), n - revoked, "each deleted once");
        deleted.sort();
        due.sort();
        assert_eq!(deleted, due);
        let chunks = store
            .deletes
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>();
        assert!(
            chunks.iter().all(|&c| c <= DELETE_CHUNK),
            "chunks {chunks:?}"
        );
        // In the store's key order across all chunks, whatever order the queue gave.
        assert!(store.deleted().is_sorted(), "deletes not in key order");
        assert!(table.revoked_serials(1_010).is_empty(), "left the CRL");
        assert_eq!(table.revoked_serials(0).len(), revoked, "kept");
        assert_eq!(
            *changes.borrow(),
            announced + 1,
            "one announcement for the whole expiry, not one per slice"
        );
        // Memory is not paced by the store: every slice was retired before the first delete.
        let lens = store.table_len.lock().unwrap().clone();
        assert!(lens.iter().all(|&len| len == revoked + 1), "{lens:?}");
        trigger.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_that_ran_ahead_and_came_back_lists_the_revoked_serial_again() {
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let l = revoked_cert(1_100);
        table.insert(l.clone());
        let changes = table.subscribe();
        let step = Arc::new(AtomicI64::new(0));
        let (trigger, task) = start_with(&table, &store, &step);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = *changes.borrow();
        // An hour ahead: the certificate expired long enough ago to leave the CRL.
        step.store(3_600, Ordering::SeqCst);
        tokio::time::sleep(MAX_SLEEP * 2).await;
        let ahead = *changes.borrow();
        assert!(ahead > before, "the CRL without it was not asked for");
        assert!(table.revoked_serials(4_700).is_empty());
        assert!(table.get(&l.id).is_some(), "the revoked lease was retired");
        assert!(store.deleted().is_empty(), "deleted from the store");
        // Back to the right time: the CRL is asked for again, and lists it.
        step.store(0, Ordering::SeqCst);
        tokio::time::sleep(MAX_SLEEP * 2).await;
        assert!(*changes.borrow() > ahead, "no CRL once the clock came back");
        assert!(
            table.take_crl_resign(),
            "signed only if the serials changed"
        );
        // Queued at its expiry again, so that a CRL dated after it lists it (RFC 5280 §3.3).
        let resign_at = 1_100 + crate::lease::CRL_RESIGN_AFTER_EXPIRY_S;
        assert_eq!(table.next_deadline(), Some(resign_at));
        tokio::time::sleep(Duration::from_secs((resign_at - 1_121 + 5) as u64)).await;
        assert!(table.take_crl_resign(), "no CRL dated after its expiry");
        assert_eq!(table.revoked_serials(1_061).len(), 1);
        trigger.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_jump_ahead_keeps_the_leases_it_made_due_revocable() {
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let mut cert = lease(1_500);
        cert.kind = Kind::X509;
        cert.serial = Some(Box::new(cert.id.0));
        let jwt = lease(1_300);
        let due_anyway = lease(1_020);
        for l in [&cert, &jwt, &due_anyway] {
            table.insert(l.clone());
        }
        let step = Arc::new(AtomicI64::new(0));
        let (trigger, task) = start_with(&table, &store, &step);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // An hour ahead while the reaper sleeps towards t=1020: at its wake every lease is
        // due by the clock.
        step.store(3_600, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(
            store.deleted(),
            vec![due_anyway.id],
            "only what was due before the jump is retired"
        );
        assert!(table.get(&cert.id).is_some() && table.get(&jwt.id).is_some());
        assert_eq!(
            table.next_deadline(),
            Some(1_300 + 3_600),
            "kept for the time they had left"
        );
        // Still revocable: onto the CRL once the clock is right again.
        let rev = Arc::new(Revocation {
            at_ms: 0,
            by: "op".into(),
            reason: "leaked".into(),
        });
        assert_eq!(table.revoke(&[cert.id], &rev)[0], 1);
        step.store(0, Ordering::SeqCst);
        tokio::time::sleep(MAX_SLEEP * 2).await;
        let listed = table.revoked_serials(1_100);
        assert_eq!(listed.len(), 1, "the revoked certificate is not on the CRL");
        assert!(store.deleted() == vec![due_anyway.id]);
        trigger.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn leases_due_beyond_the_bucketed_window_leave_the_heap_before_they_expire() {
        use crate::lease::expiry::BUCKETED_S;
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let (trigger, task) = start(&table, &store);
        let in_heap = || table.expiry.lock().unwrap().heap_room().1;
        // After a pass the window runs from the reaper's clock (about 1030).
        tokio::time::sleep(MAX_SLEEP + Duration::from_secs(1)).await;
        let exp = 1_031 + BUCKETED_S + 100;
        let l = lease(exp);
        table.insert(l.clone());
        // Enough for several slices, each under the lock on its own.
        let n = PROMOTE_SLICE * 2 + 5;
        for _ in 0..n {
            table.insert(lease(exp + 1));
        }
        assert_eq!(in_heap(), n + 1, "beyond the window: in the heap");
        // Once within the window, a pass moves it, long before it falls due.
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert_eq!(in_heap(), 0, "not moved out of the heap");
        assert!(table.get(&l.id).is_some());
        assert_eq!(table.next_deadline(), Some(exp));
        tokio::time::sleep(Duration::from_secs(BUCKETED_S as u64)).await;
        assert!(table.get(&l.id).is_none(), "retired at its expiry");
        assert!(table.is_empty());
        trigger.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_mass_expiry_midway() {
        let table = Arc::new(LeaseTable::new());
        let store = Arc::new(Recorder::default());
        let n = RETIRE_SLICE * 4;
        for _ in 0..n {
            table.insert(lease(1_010));
        }
        let (trigger, task) = start(&table, &store);
        tokio::time::sleep(Duration::from_secs(10)).await;
        trigger.trigger();
        task.await.unwrap();
        // Whichever ran first at t=1010, the reaper stopped between slices: the rest is left
        // for the next start, which deletes expired rows.
        assert!(table.len() > RETIRE_SLICE, "{} left", table.len());
        assert!(store.deleted().is_empty());
    }
}
