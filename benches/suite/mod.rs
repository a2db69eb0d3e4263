//! Shared parts of the benchmark suite: the load driver (closed or open loop), percentiles,
//! progress lines for long phases, and the results table with its targets and JSON.

pub mod cfssl;
pub mod crash;
pub mod exchange;
pub mod issuance;
pub mod leases;
pub mod soak;

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// Knobs shared by every phase.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Seconds of measured load per phase.
    pub secs: f64,
    /// Concurrent clients for the maximum-rate phases.
    pub clients: usize,
    /// Leases in the store for the restart and mass-expiry phases.
    pub leases: usize,
    /// Leases held by the identity the kill switch cuts off.
    pub kill_leases: usize,
    pub crash_rounds: u64,
    /// Clients running tasks in the crash test.
    pub crash_task_clients: usize,
}

/// What one request came to. `Shed` is the daemon refusing load on purpose (gRPC
/// `Unavailable` "shedding load" from its per-uid limits, HTTP 503 from the listener's body
/// budget),
/// which the overload target allows; `Err` is anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Shed,
    Err,
}

/// Throughput and latency of one phase.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub rate: f64,
    pub ok: u64,
    pub shed: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Paced phases only: p50, p99 and max counted from when each request was actually sent.
    /// The headline figures count from the scheduled time, which also charges the
    /// generator's own lateness (the pacer thread's wake-up, see [`pacer`]) and the wait
    /// of a request whose client was still busy with its previous one. The max tells a
    /// stall apart: one in the daemon shows in it, a stall before the send (the generator)
    /// only in the scheduled figures, since so few requests are in flight at half load
    /// that either kind of stall leaves the p99 from the send alone.
    pub from_send: Option<(f64, f64, f64)>,
    /// Paced phases only: how the schedule was kept (see [`Paced`]).
    pub paced: Option<Paced>,
}

/// How a paced phase kept its schedule: each loop has one request in flight, and its
/// times are evenly spaced (not random arrivals), which an outside generator must copy to
/// compare latencies.
#[derive(Debug, Clone, Default)]
pub struct Paced {
    /// The pacer thread's own lateness in handing out a send time: p99 and max, ms.
    pub pacer_late_p99_ms: f64,
    pub pacer_late_max_ms: f64,
    /// Send times that waited over a millisecond for their loop's previous request.
    pub waited_behind: u64,
    /// Send times due before the end that were never sent: their loop was still waiting.
    /// They count in the percentiles from the schedule with the time they had waited.
    pub unsent_at_end: u64,
}

/// What the paced loops collected beyond their latencies.
#[derive(Debug, Default)]
struct PacedSamples {
    pacer_late_us: Vec<u64>,
    waited_behind: u64,
    unsent_us: Vec<u64>,
}

/// The `p`-quantile of sorted microseconds, in milliseconds.
pub fn quantile_ms(sorted_us: &[u64], p: f64) -> f64 {
    sorted_us
        .get(((sorted_us.len() as f64 * p) as usize).min(sorted_us.len().saturating_sub(1)))
        .map_or(0.0, |&us| us as f64 / 1000.0)
}

impl Load {
    fn from_latencies(
        mut lat_us: Vec<u64>,
        from_send_us: Option<Vec<u64>>,
        paced: Option<PacedSamples>,
        shed: u64,
        errors: u64,
        elapsed: f64,
    ) -> Self {
        let ok = lat_us.len() as u64;
        let sorted = |mut v: Vec<u64>| {
            v.sort_unstable();
            v
        };
        let max_ms = |v: &[u64]| v.last().map_or(0.0, |&us| us as f64 / 1000.0);
        let paced = paced.map(|p| {
            // Lower bounds of latencies never completed: left out, a stall at the end of
            // the phase would go uncounted.
            lat_us.extend(&p.unsent_us);
            let late = sorted(p.pacer_late_us);
            Paced {
                pacer_late_p99_ms: quantile_ms(&late, 0.99),
                pacer_late_max_ms: max_ms(&late),
                waited_behind: p.waited_behind,
                unsent_at_end: p.unsent_us.len() as u64,
            }
        });
        let lat_us = sorted(lat_us);
        Load {
            rate: ok as f64 / elapsed,
            ok,
            shed,
            errors,
            p50_ms: quantile_ms(&lat_us, 0.50),
            p99_ms: quantile_ms(&lat_us, 0.99),
            max_ms: max_ms(&lat_us),
            from_send: from_send_us.map(|v| {
                let v = sorted(v);
                (quantile_ms(&v, 0.50), quantile_ms(&v, 0.99), max_ms(&v))
            }),
            paced,
        }
    }

    /// Errors (not counting shed requests) as a fraction of all requests.
    pub fn error_ratio(&self) -> f64 {
        let all = self.ok + self.shed + self.errors;
        if all == 0 {
            return 1.0;
        }
        self.errors as f64 / all as f64
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "per_sec": self.rate, "ok": self.ok, "shed": self.shed, "errors": self.errors,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
        });
        if let Some((p50, p99, max)) = self.from_send {
            v["from_send_p50_ms"] = json!(p50);
            v["from_send_p99_ms"] = json!(p99);
            v["from_send_max_ms"] = json!(max);
        }
        if let Some(p) = &self.paced {
            v["schedule"] = json!({
                "arrivals": "evenly spaced; each loop one request in flight",
                "pacer_late_p99_ms": p.pacer_late_p99_ms,
                "pacer_late_max_ms": p.pacer_late_max_ms,
                "waited_behind_previous_request": p.waited_behind,
                "unsent_at_end": p.unsent_at_end,
            });
        }
        v
    }
}

/// CPU time used so far by the daemon (every thread it ever had), by its store writer
/// thread, and by this process, the load generator. Taken before and after a phase, it
/// gives each one's CPU per request ([`CpuMark::per_op`]): a figure the VM's noise hardly
/// moves, unlike rates, and the one that says how many requests two cores can carry.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    daemon_s: f64,
    writer_s: f64,
    generator_s: f64,
    /// The whole machine, from `/proc/stat`: busy (user, nice, system, irq, softirq) and
    /// stolen by the hypervisor.
    box_busy_s: f64,
    box_steal_s: f64,
}

/// CPU per request in microseconds, and the rate both sides together would reach on
/// `cores` fully used.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPerOp {
    pub daemon_us: f64,
    pub writer_us: f64,
    pub generator_us: f64,
    pub ceiling_per_sec: f64,
    /// Cores busy meanwhile with anything but the daemon and the generator (other
    /// processes, kernel threads), and cores the hypervisor stole: the phase's figures are
    /// the daemon's own only when both are near zero.
    pub other_cores: f64,
    pub steal_cores: f64,
}

/// user + system seconds of a whole process, from `/proc/<pid>/stat`.
fn process_cpu_s(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The name in parentheses may hold spaces; fields 14 and 15 (utime, stime) are the
    // 12th and 13th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / clock_ticks_per_s()
}

/// The unit of `/proc`'s CPU times.
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// (busy, stolen) seconds of the whole machine since boot, from `/proc/stat`.
fn machine_cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let hz = clock_ticks_per_s();
    (busy as f64 / hz, at(7) as f64 / hz)
}

/// Seconds on the CPU of `pid`'s threads named `name`, from their `schedstat`.
fn threads_cpu_s(pid: &str, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

impl CpuMark {
    pub fn now(daemon_pid: i32) -> Self {
        let pid = daemon_pid.to_string();
        let (box_busy_s, box_steal_s) = machine_cpu_s();
        CpuMark {
            at: Instant::now(),
            daemon_s: process_cpu_s(&pid),
            writer_s: threads_cpu_s(&pid, "tessera-store"),
            generator_s: process_cpu_s("self"),
            box_busy_s,
            box_steal_s,
        }
    }

    /// Per request of the `ops` served between `self` and `later`.
    pub fn per_op(&self, later: &CpuMark, ops: u64, cores: usize) -> CpuPerOp {
        let per = |a: f64, b: f64| (b - a).max(0.0) * 1e6 / ops.max(1) as f64;
        let daemon_us = per(self.daemon_s, later.daemon_s);
        let generator_us = per(self.generator_s, later.generator_s);
        let wall = (later.at - self.at).as_secs_f64().max(1e-9);
        let ours = (later.daemon_s - self.daemon_s) + (later.generator_s - self.generator_s);
        CpuPerOp {
            daemon_us,
            writer_us: per(self.writer_s, later.writer_s),
            generator_us,
            ceiling_per_sec: cores as f64 * 1e6 / (daemon_us + generator_us).max(1e-9),
            other_cores: ((later.box_busy_s - self.box_busy_s - ours) / wall).max(0.0),
            steal_cores: (later.box_steal_s - self.box_steal_s).max(0.0) / wall,
        }
    }
}

impl CpuPerOp {
    pub fn json(&self) -> Value {
        json!({
            "daemon_us": self.daemon_us, "store_writer_us": self.writer_us,
            "generator_us": self.generator_us, "ceiling_per_sec": self.ceiling_per_sec,
            "other_cores": self.other_cores, "steal_cores": self.steal_cores,
        })
    }
}

/// A send time from the pacer: when it was due, and when the pacer handed it out.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    due: Instant,
    handed: Instant,
}

/// Hands out send times for paced loops: loop `c` of `n` is due at `start + c·pace/n`, then
/// every `pace`, until `deadline`. Each time is sent when it is reached, from an OS thread
/// that sleeps in the kernel's high-resolution timer (`nanosleep`, timer slack 1 ns), so a
/// loop is woken within tens of microseconds of its schedule on an idle core. (Loops
/// sleeping on tokio's timer were woken up to a millisecond late: its wheel counts whole
/// milliseconds. That lateness counted as the daemon's latency and put about 0.8 ms on
/// every scheduled figure at half load.) The pacer's own lateness is reported
/// ([`Paced`]); it still counts as latency. A time whose loop is still waiting for its
/// previous answer queues, and counts from when it was due.
fn pacer(
    n: usize,
    pace: Duration,
    start: Instant,
    deadline: Instant,
) -> Vec<UnboundedReceiver<Ticket>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
    let step_ns = (pace.as_nanos() / n as u128).max(1) as u64;
    std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            // The default slack of 50 µs would let every sleep end that much late.
            // SAFETY: prctl(PR_SET_TIMERSLACK) only sets this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
            for k in 0u64.. {
                let due = start + Duration::from_nanos(step_ns.saturating_mul(k));
                if due >= deadline {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let handed = Instant::now();
                // A loop that already stopped is no error: the others go on.
                let _ = txs[(k % n as u64) as usize].send(Ticket { due, handed });
            }
            // Dropping the senders ends the loops waiting for their next time.
        })
        .expect("start the pacer thread");
    rxs
}

/// Runs one loop per element of `clients` for `secs`. Each loop owns its client state and gets
/// it back from `op` with the outcome, so HTTP connections and gRPC clients fit alike.
/// With `pace`, each loop sends one request per `pace` (open loop, timed by [`pacer`]) and
/// latency counts from the scheduled send time, so a stalled daemon is not hidden by
/// requests never sent (and from the actual send as well, see [`Load::from_send`]).
pub async fn drive<C, F, Fut>(
    label: &str,
    clients: Vec<C>,
    secs: f64,
    pace: Option<Duration>,
    op: F,
) -> Load
where
    C: Send + 'static,
    F: Fn(C, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Outcome)> + Send,
{
    let n = clients.len().max(1);
    let progress = Progress::start(label, secs);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut due = match pace {
        Some(p) => pacer(n, p, start, deadline).into_iter().map(Some).collect(),
        None => Vec::new(),
    };
    due.resize_with(n, || None);
    let trace_dir = std::env::var_os("TESSERA_BENCH_TRACE");
    let trace = trace_dir.is_some();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(due)
        .enumerate()
        .map(|(c, (mut client, mut due))| {
            let op = op.clone();
            let mut trace = trace.then(Vec::new);
            let done = Arc::clone(&progress.done);
            tokio::spawn(async move {
                let (mut lat, mut shed, mut errors) = (Vec::with_capacity(8192), 0u64, 0u64);
                let mut lat_sent = Vec::with_capacity(if pace.is_some() { 8192 } else { 0 });
                let mut paced = PacedSamples::default();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t = match &mut due {
                        Some(rx) => match rx.recv().await {
                            Some(tk) => {
                                let late = tk.handed - tk.due;
                                paced.pacer_late_us.push(late.as_micros() as u64);
                                if tk.handed.elapsed() > Duration::from_millis(1) {
                                    paced.waited_behind += 1;
                                }
                                tk.due
                            }
                            None => break,
                        },
                        None => Instant::now(),
                    };
                    let sent = Instant::now();
                    let (back, outcome) = op(client, c, i).await;
                    client = back;
                    i += 1;
                    if let Some(tr) = &mut trace {
                        tr.push((
                            t.duration_since(start).as_micros() as u64,
                            t.elapsed().as_micros() as u64,
                            outcome as u8,
                        ));
                    }
                    match outcome {
                        Outcome::Ok => {
                            lat.push(t.elapsed().as_micros() as u64);
                            if pace.is_some() {
                                lat_sent.push(sent.elapsed().as_micros() as u64);
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Shed => shed += 1,
                        Outcome::Err => errors += 1,
                    }
                }
                // Send times this loop was too far behind to reach.
                if let Some(rx) = &mut due {
                    while let Ok(tk) = rx.try_recv() {
                        paced.unsent_us.push(tk.due.elapsed().as_micros() as u64);
                    }
                }
                (lat, lat_sent, paced, shed, errors, trace)
            })
        })
        .collect();
    let (mut all, mut all_sent, mut shed, mut errors) = (Vec::new(), Vec::new(), 0, 0);
    let mut traced = Vec::new();
    let mut paced = PacedSamples::default();
    for t in tasks {
        let (l, ls, p, s, e, tr) = t.await.expect("load task panicked");
        traced.extend(tr.unwrap_or_default());
        all.extend(l);
        all_sent.extend(ls);
        paced.pacer_late_us.extend(p.pacer_late_us);
        paced.waited_behind += p.waited_behind;
        paced.unsent_us.extend(p.unsent_us);
        shed += s;
        errors += e;
    }
    progress.finish();
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(dir) = trace_dir {
        // For looking into a run: every request's send time (scheduled, when paced) from the
        // phase's start and latency, in microseconds, and its outcome (0 issued, 1 shed, 2
        // error), to line up with the daemon's log (the file is named with the phase's start
        // in Unix microseconds).
        traced.sort_unstable();
        let text: String = traced
            .iter()
            .map(|(t, l, o)| format!("{t} {l} {o}\n"))
            .collect();
        let began = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000
            - start.elapsed().as_micros() as i128;
        let file =
            std::path::Path::new(&dir).join(format!("{}.{began}.txt", label.replace(' ', "_")));
        if let Err(e) = std::fs::write(&file, text) {
            eprintln!("      cannot write {}: {e}", file.display());
        }
    }
    let from_send = pace.is_some().then_some(all_sent);
    let paced = pace.is_some().then_some(paced);
    Load::from_latencies(all, from_send, paced, shed, errors, elapsed)
}

/// A progress line for a running phase: rewritten in place on a terminal, a line every five
/// seconds otherwise (CI logs), nothing for phases too short to need it.
pub struct Progress {
    pub done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: &str, secs: f64) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let every = if tty { 1 } else { 5 };
        let handle = (secs >= 3.0).then(|| {
            let (done, stop, label) = (Arc::clone(&done), Arc::clone(&stop), label.to_owned());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let el = start.elapsed().as_secs_f64();
                    if (el as u64) < tick + every {
                        continue;
                    }
                    tick = el as u64;
                    let n = done.load(Ordering::Relaxed);
                    let line = format!(
                        "      {label}: {el:>5.0}s of {secs:.0}s, {n} done, {:.0}/s",
                        n as f64 / el
                    );
                    if tty {
                        eprint!("\r{line}\x1b[K");
                    } else {
                        eprintln!("{line}");
                    }
                }
                if tty {
                    eprint!("\r\x1b[K");
                }
                let _ = std::io::stderr().flush();
            })
        });
        Self { done, stop, handle }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What a figure must reach.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Target {
    fn met(self, v: f64) -> Option<bool> {
        match self {
            Target::None => None,
            Target::AtLeast(t) => Some(v >= t),
            Target::AtMost(t) => Some(v <= t),
            Target::Below(t) => Some(v < t),
        }
    }

    fn text(self) -> String {
        match self {
            Target::None => String::new(),
            Target::AtLeast(t) => format!(">= {}", short(t)),
            Target::AtMost(t) => format!("<= {}", short(t)),
            Target::Below(t) => format!("< {}", short(t)),
        }
    }
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    target: Target,
}

/// Every figure of the run: printed as one table at the end and written as JSON.
#[derive(Default)]
pub struct Report {
    rows: Vec<(String, Row)>,
    details: Map<String, Value>,
}

impl Report {
    /// Records a headline figure under `key` (the JSON name), shown in the table as `name`.
    pub fn figure(
        &mut self,
        key: &str,
        name: &str,
        value: f64,
        unit: &'static str,
        target: Target,
    ) {
        self.rows.push((
            key.to_owned(),
            Row {
                name: name.to_owned(),
                value,
                unit,
                target,
            },
        ));
    }

    /// Extra detail kept in the JSON only (per-phase latencies, counts, versions).
    pub fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.to_owned(), value);
    }

    /// Headline figures that missed their targets.
    pub fn missed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|(_, r)| r.target.met(r.value) == Some(false))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    pub fn print(&self) {
        println!();
        println!(
            "{:<58} {:>12} {:<8} {:>12}",
            "measure", "value", "unit", "target"
        );
        for (_, r) in &self.rows {
            let verdict = match r.target.met(r.value) {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            };
            println!(
                "{:<58} {:>12} {:<8} {:>12}  {verdict}",
                r.name,
                short(r.value),
                r.unit,
                r.target.text()
            );
        }
    }

    pub fn json(&self, meta: Value) -> Value {
        let figures: Map<String, Value> = self
            .rows
            .iter()
            .map(|(k, r)| {
                let (kind, bound) = match r.target {
                    Target::None => (Value::Null, Value::Null),
                    Target::AtLeast(t) => (json!(">="), json!(t)),
                    Target::AtMost(t) => (json!("<="), json!(t)),
                    Target::Below(t) => (json!("<"), json!(t)),
                };
                (
                    k.clone(),
                    json!({
                        "name": r.name, "value": r.value, "unit": r.unit,
                        "target": bound, "target_kind": kind, "met": r.target.met(r.value),
                    }),
                )
            })
            .collect();
        json!({ "meta": meta, "figures": figures, "details": self.details })
    }
}

/// Resident memory of a process, from `/proc/<pid>/status` (bytes).
pub fn rss_of(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The gRPC metadata the Workload API requires on every request.
pub use crate::common::with_header as workload_req;

/// A gRPC status mapped to an outcome. Only the daemon's deliberate refusals are shedding:
/// `Unavailable` from its per-uid limits (streams, request bytes in flight), whose message says
/// so. Every other `Unavailable` is an error: the daemon answers it when it cannot attest,
/// record or sign, and tonic when the connection is refused or lost, as to a daemon that died.
pub fn grpc_outcome(s: &tonic::Status) -> Outcome {
    if tessera::api::limits::is_shed(s) {
        Outcome::Shed
    } else {
        Outcome::Err
    }
}
