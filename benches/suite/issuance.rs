//! Issuance phases: the raw key-generation + signing rate on every core (the physical limit),
//! fresh X.509-SVIDs and JWT-SVIDs per second through the real `spiffe` client over the
//! Workload API socket, latency at half that load, and errors under overload.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use tessera::proto::workload as pb;
use tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use super::{CpuMark, Load, Opts, Outcome, Report, Target, drive, grpc_outcome, workload_req};
use crate::common;

/// What later phases compare against.
pub struct Figures {
    pub x509: f64,
}

/// Key generation + one ECDSA signature over a certificate-sized message, on every core.
fn raw_limit(secs: f64, threads: usize) -> f64 {
    let rng = SystemRandom::new();
    let ca_doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ca = Arc::new(
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, ca_doc.as_ref(), &rng).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ca, stop, count) = (Arc::clone(&ca), Arc::clone(&stop), Arc::clone(&count));
            std::thread::spawn(move || {
                let rng = SystemRandom::new();
                let tbs = [0x5au8; 420];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let k = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                        .unwrap();
                    std::hint::black_box(k);
                    std::hint::black_box(ca.sign(&rng, &tbs).unwrap());
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// `clients` loops over `clients / 4` connections of the real `spiffe` client, as sidecars
/// sharing an agent's socket would.
async fn spiffe_clients(d: &common::Daemon, clients: usize) -> Vec<Arc<spiffe::WorkloadApiClient>> {
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(4) {
        pool.push(Arc::new(d.client().await));
    }
    (0..clients)
        .map(|i| Arc::clone(&pool[i % pool.len()]))
        .collect()
}

/// A bare generated gRPC client that only checks a response arrived: shows what the daemon
/// sustains when the load generator's certificate parsing is not competing for the CPU, and
/// sees status codes, which the overload phase needs.
async fn bare_clients(
    d: &common::Daemon,
    clients: usize,
) -> Vec<SpiffeWorkloadApiClient<tonic::transport::Channel>> {
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(4) {
        pool.push(SpiffeWorkloadApiClient::new(
            common::channel(&d.socket).await,
        ));
    }
    (0..clients).map(|i| pool[i % pool.len()].clone()).collect()
}

/// The disk under the daemon's data directory: fsync of a 4 KiB overwrite, `n` times, as
/// sorted microseconds: what SQLite does to its write-ahead log at each commit once the log
/// has wrapped (it syncs with fdatasync; the probe's fsync also writes the changed mtime, at
/// most one write more per sync). Every issuance waits for one such flush
/// (its batch's commit), so the disk's own tail is a floor under the issuance tail that no
/// code in the daemon can lower. Measured alone, before the load: under load the audit
/// log's appends and their syncs share the disk too.
fn disk_syncs(dir: &std::path::Path, n: usize) -> Vec<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("bench-disk-probe");
    let mut f = std::fs::File::create(&path).expect("create the disk probe");
    f.write_all(&[0u8; 64 * 4096]).unwrap();
    f.sync_all().unwrap();
    let block = [0x5au8; 4096];
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        f.seek(SeekFrom::Start((i % 64) as u64 * 4096)).unwrap();
        f.write_all(&block).unwrap();
        let t = Instant::now();
        f.sync_all().unwrap();
        took.push(t.elapsed().as_micros() as u64);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    took.sort_unstable();
    took
}

/// What the machine takes from a thread that never waits: one per core reads the clock in a
/// loop for `secs`, and a gap over [`GAP`] between two reads is time it did not run (another
/// task, an interrupt, or the hypervisor giving the core to someone else). A request in
/// flight on a core during such a gap waits it out, so their rate is a floor under the
/// latency tail that no code in the daemon can lower. Measured alone, before the load.
/// Returns the gaps over [`GAP`] per second (all cores together) and the longest gap in ms.
fn cpu_gaps(cores: usize, secs: f64) -> (f64, f64) {
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let (mut last, mut over, mut longest) = (Instant::now(), 0u64, Duration::ZERO);
                while last < end {
                    let now = Instant::now();
                    let gap = now - last;
                    if gap > GAP {
                        over += 1;
                    }
                    longest = longest.max(gap);
                    last = now;
                }
                (over, longest)
            })
        })
        .collect();
    let (mut over, mut longest) = (0, Duration::ZERO);
    for s in spinners {
        let (o, l) = s.join().expect("a spinner thread");
        over += o;
        longest = longest.max(l);
    }
    (over as f64 / secs, longest.as_secs_f64() * 1000.0)
}

/// The latency target's bound: a gap longer than this puts whatever waits on it past the p99.
const GAP: Duration = Duration::from_millis(2);

/// A histogram's cumulative bucket counts in a `/metrics` body, as (upper bound in
/// seconds, count) in the order served; `label` picks one series (`rpc="FetchJWTSVID"`).
fn buckets(body: &str, name: &str, label: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter(|l| label.is_empty() || l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, l.rsplit(' ').next()?.trim().parse().ok()?))
        })
        .collect()
}

/// The daemon's own account of a phase, from its `/metrics` before and after: the bucket
/// bound (ms) under which 99% of its `rpc` handler times fell (NaN if none was served), and
/// how many store commits there were and took longer than 25 ms. The handler is timed from
/// when tonic calls it to its answer: the socket, HTTP/2, the wait for a runtime worker
/// before the call and after the answer, the client library and the generator are outside.
struct DaemonView {
    handler_p99_at_most_ms: f64,
    commits: u64,
    commits_over_25ms: u64,
}

/// A histogram's cumulative bucket counts gained between two `/metrics` bodies.
fn bucket_delta(before: &str, after: &str, name: &str, label: &str) -> Vec<(f64, u64)> {
    let b = buckets(before, name, label);
    buckets(after, name, label)
        .into_iter()
        .map(|(le, n)| {
            let was = b.iter().find(|(l, _)| *l == le).map_or(0, |(_, n)| *n);
            (le, n.saturating_sub(was))
        })
        .collect()
}

/// The store commits' cumulative bucket counts gained between two `/metrics` bodies; the
/// last (`+Inf`) is how many commits there were.
fn commit_delta(before: &str, after: &str) -> Vec<(f64, u64)> {
    bucket_delta(before, after, "tessera_store_commit_duration_seconds", "")
}

/// How many store commits there were between two `/metrics` bodies.
fn store_commits(before: &str, after: &str) -> u64 {
    commit_delta(before, after).last().map_or(0, |(_, n)| *n)
}

impl DaemonView {
    fn between(before: &str, after: &str, rpc: &str) -> Self {
        let handler = bucket_delta(
            before,
            after,
            "tessera_request_duration_seconds",
            &format!("rpc=\"{rpc}\""),
        );
        let total = handler.last().map_or(0, |(_, n)| *n);
        let handler_p99_at_most_ms = handler
            .iter()
            .find(|(_, n)| total > 0 && *n as f64 >= total as f64 * 0.99)
            .map_or(f64::NAN, |(le, _)| le * 1000.0);
        let commits = commit_delta(before, after);
        let all = commits.last().map_or(0, |(_, n)| *n);
        let within = commits
            .iter()
            .find(|(le, _)| *le >= 0.025)
            .map_or(all, |(_, n)| *n);
        DaemonView {
            handler_p99_at_most_ms,
            commits: all,
            commits_over_25ms: all - within,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "handler_p99_at_most_ms": self.handler_p99_at_most_ms,
            "store_commits": self.commits,
            "store_commits_over_25ms": self.commits_over_25ms,
        })
    }
}

fn metrics_body(d: &common::Daemon) -> String {
    let (code, body) = common::http_get(d.http, "/metrics");
    assert_eq!(code, 200, "GET /metrics");
    String::from_utf8(body).expect("/metrics is text")
}

/// Which SVID a load phase asks for.
#[derive(Clone, Copy)]
enum Svid {
    X509,
    Jwt,
}

/// Every [`FRESH_EVERY`]th X.509-SVID of a loop is looked at: its key must be new, its serial
/// new, and its `notBefore` now (give or take the daemon's 30-s backdating). The bench checks
/// cfssl's answers the same way: a server that handed out cached certificates would show here,
/// not only in a slower rate.
const FRESH_EVERY: u64 = 64;

#[derive(Default)]
struct Fresh {
    sampled: u64,
    keys: std::collections::HashSet<[u8; 32]>,
    serials: std::collections::HashSet<Vec<u8>>,
    repeated: u64,
    /// Not parseable, or `notBefore` more than a minute away from now.
    stale: u64,
}

impl Fresh {
    fn look(&mut self, svid: &spiffe::X509Svid) {
        self.sampled += 1;
        let key = ring::digest::digest(&ring::digest::SHA256, svid.private_key().as_ref());
        let key: [u8; 32] = key.as_ref().try_into().expect("SHA-256 is 32 bytes");
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()) else {
            self.stale += 1;
            return;
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if (cert.validity().not_before.timestamp() - now).abs() > 60 {
            self.stale += 1;
        }
        let new_key = self.keys.insert(key);
        let new_serial = self.serials.insert(cert.raw_serial().to_vec());
        self.repeated += u64::from(!(new_key && new_serial));
    }
}

async fn spiffe_load(
    d: &common::Daemon,
    svid: Svid,
    label: &str,
    clients: usize,
    secs: f64,
    pace: Option<Duration>,
    fresh: Option<&Arc<std::sync::Mutex<Fresh>>>,
) -> Load {
    let fresh = fresh.cloned();
    drive(
        label,
        spiffe_clients(d, clients).await,
        secs,
        pace,
        move |c, _, i| {
            let fresh = fresh.clone();
            async move {
                let ok = match svid {
                    Svid::X509 => match c.fetch_x509_svid().await {
                        Ok(s) => {
                            if let Some(f) = fresh.filter(|_| i % FRESH_EVERY == 0) {
                                f.lock().unwrap().look(&s);
                            }
                            true
                        }
                        Err(_) => false,
                    },
                    Svid::Jwt => c.fetch_jwt_svid(["bench"], None).await.is_ok(),
                };
                (c, if ok { Outcome::Ok } else { Outcome::Err })
            }
        },
    )
    .await
}

/// How long a bare client waits for an SVID: past it the request counts as an error, so a
/// daemon that stops answering under overload shows as errors, not as a slow phase.
const BARE_DEADLINE: Duration = Duration::from_secs(1);

async fn x509_bare(d: &common::Daemon, label: &str, clients: usize, secs: f64) -> Load {
    drive(
        label,
        bare_clients(d, clients).await,
        secs,
        None,
        |mut c, _, _| async move {
            let fetch = async {
                match c.fetch_x509svid(workload_req(pb::X509svidRequest {})).await {
                    Ok(s) => match s.into_inner().message().await {
                        Ok(Some(m)) if !m.svids.is_empty() => Outcome::Ok,
                        Ok(_) => Outcome::Err,
                        Err(s) => grpc_outcome(&s),
                    },
                    Err(s) => grpc_outcome(&s),
                }
            };
            let outcome = tokio::time::timeout(BARE_DEADLINE, fetch)
                .await
                .unwrap_or(Outcome::Err);
            (c, outcome)
        },
    )
    .await
}

/// Paces `clients` loops so that together they send `rate` requests per second.
fn pace_for(rate: f64, clients: usize) -> Duration {
    Duration::from_secs_f64(clients as f64 / rate.max(1.0))
}

pub async fn run(o: &Opts, r: &mut Report) -> Figures {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "[issuance] raw P-256 key generation + ECDSA signing, one core, then all {cores} ..."
    );
    let secs = o.secs;
    let raw1 = tokio::task::spawn_blocking(move || raw_limit(secs / 2.0, 1))
        .await
        .unwrap();
    let raw = tokio::task::spawn_blocking(move || raw_limit(secs, cores))
        .await
        .unwrap();
    r.figure(
        "raw_one_core_per_sec",
        "raw keygen+sign, one core",
        raw1,
        "/s",
        Target::None,
    );
    r.figure(
        "raw_limit_per_sec",
        "raw keygen+sign, all cores (the limit), before the load",
        raw,
        "/s",
        Target::None,
    );

    let d = common::Daemon::start(&format!(
        "log.level = \"info\"\n{}",
        common::entry_for_uid("bench", common::my_uid(), "")
    ));
    let c = o.clients;
    let probe = d.data_dir.clone();
    let disk = tokio::task::spawn_blocking(move || disk_syncs(&probe, 2000))
        .await
        .unwrap();
    let gap_secs = (secs / 2.0).clamp(1.0, 3.0);
    let gaps = tokio::task::spawn_blocking(move || cpu_gaps(cores, gap_secs))
        .await
        .unwrap();
    eprintln!("[issuance] fresh X.509-SVIDs, spiffe client, {c} clients ...");
    // The store's commit counts come from `/metrics`, read after each mark: rendering it
    // costs the next phase well under a microsecond per credential.
    let m0 = CpuMark::now(d.pid());
    let s0 = metrics_body(&d);
    let fresh = Arc::new(std::sync::Mutex::new(Fresh::default()));
    let x509 = spiffe_load(&d, Svid::X509, "x509", c, secs, None, Some(&fresh)).await;
    let m1 = CpuMark::now(d.pid());
    let s1 = metrics_body(&d);
    eprintln!("[issuance] fresh X.509-SVIDs, bare gRPC client ...");
    let bare = x509_bare(&d, "x509 bare", c, secs).await;
    let m2 = CpuMark::now(d.pid());
    let s2 = metrics_body(&d);
    eprintln!("[issuance] JWT-SVIDs, spiffe client ...");
    let jwt = spiffe_load(&d, Svid::Jwt, "jwt", c, secs, None, None).await;
    let m3 = CpuMark::now(d.pid());
    let s3 = metrics_body(&d);
    let full_commits = [
        store_commits(&s0, &s1),
        store_commits(&s1, &s2),
        store_commits(&s2, &s3),
    ];
    // Requests that were not served count too: they also cost CPU.
    let all = |l: &Load| l.ok + l.shed + l.errors;
    let x509_cpu = m0.per_op(&m1, all(&x509), cores);
    let bare_cpu = m1.per_op(&m2, all(&bare), cores);
    let jwt_cpu = m2.per_op(&m3, all(&jwt), cores);
    eprintln!(
        "[issuance] X.509-SVIDs at half load ({:.0}/s) ...",
        x509.rate / 2.0
    );
    let before = metrics_body(&d);
    let x509_half = spiffe_load(
        &d,
        Svid::X509,
        "x509 half",
        c,
        secs,
        Some(pace_for(x509.rate / 2.0, c)),
        None,
    )
    .await;
    let between = metrics_body(&d);
    let x509_view = DaemonView::between(&before, &between, "FetchX509SVID");
    eprintln!(
        "[issuance] JWT-SVIDs at half load ({:.0}/s) ...",
        jwt.rate / 2.0
    );
    let jwt_half = spiffe_load(
        &d,
        Svid::Jwt,
        "jwt half",
        c,
        secs,
        Some(pace_for(jwt.rate / 2.0, c)),
        None,
    )
    .await;
    let jwt_view = DaemonView::between(&between, &metrics_body(&d), "FetchJWTSVID");
    let over_clients = c * 8;
    eprintln!("[issuance] overload: X.509-SVIDs from {over_clients} clients ...");
    let mut d = d;
    let over = x509_bare(&d, "overload", over_clients, secs).await;
    // A daemon that died under the load would leave only refused connections behind.
    assert!(
        d.is_running(),
        "tesserad exited during the overload phase; see its log"
    );
    drop(d);
    // Again, with the daemon gone: the denominator of both ratio targets, so a reading the
    // machine spoiled (a neighbour, a slow spell) would flatter them. The higher counts.
    eprintln!("[issuance] raw limit again, all {cores} cores ...");
    let raw_after = tokio::task::spawn_blocking(move || raw_limit(secs, cores))
        .await
        .unwrap();
    let raw_before = raw;
    let raw = raw_before.max(raw_after);
    r.figure(
        "raw_limit_after_per_sec",
        "  again after the load phases",
        raw_after,
        "/s",
        Target::None,
    );
    r.figure(
        "raw_limit_used_per_sec",
        "  the higher, used for the ratios",
        raw,
        "/s",
        Target::None,
    );
    if (raw_before - raw_after).abs() > 0.1 * raw || raw < 0.8 * cores as f64 * raw1 {
        eprintln!(
            "[issuance] warning: the raw limit read {raw_before:.0}/s before and \
             {raw_after:.0}/s after the load ({raw1:.0}/s on one core): the machine's speed \
             changed during the run, so its ratios are less certain"
        );
    }
    let fresh = std::mem::take(&mut *fresh.lock().unwrap());
    r.figure(
        "x509_sampled_fresh",
        &format!("  X.509-SVIDs looked at (1 in {FRESH_EVERY} per loop)"),
        fresh.sampled as f64,
        "",
        Target::None,
    );
    r.figure(
        "x509_sampled_not_fresh",
        "    of them with a repeated key or serial, or not dated now",
        (fresh.repeated + fresh.stale) as f64,
        "",
        Target::AtMost(0.0),
    );

    r.figure(
        "x509_per_sec",
        "X.509-SVIDs, fresh key, durable lease",
        x509.rate,
        "/s",
        Target::AtLeast(15_000.0),
    );
    r.figure(
        "x509_ratio_to_limit",
        "  X.509 rate / raw limit",
        x509.rate / raw,
        "ratio",
        Target::AtLeast(0.22),
    );
    r.figure(
        "x509_bare_per_sec",
        "  same, bare gRPC load generator",
        bare.rate,
        "/s",
        Target::None,
    );
    r.figure(
        "jwt_per_sec",
        "JWT-SVIDs, durable lease",
        jwt.rate,
        "/s",
        Target::AtLeast(30_000.0),
    );
    r.figure(
        "jwt_ratio_to_limit",
        "  JWT rate / raw limit",
        jwt.rate / raw,
        "ratio",
        Target::AtLeast(0.44),
    );
    for ((key, phase, name, plural, cpu, load), commits) in [
        (
            "x509",
            "X.509",
            "X.509-SVID",
            "X.509-SVIDs",
            &x509_cpu,
            &x509,
        ),
        (
            "x509_bare",
            "X.509 bare",
            "X.509-SVID, bare client",
            "X.509-SVIDs (bare client)",
            &bare_cpu,
            &bare,
        ),
        ("jwt", "JWT", "JWT-SVID", "JWT-SVIDs", &jwt_cpu, &jwt),
    ]
    .into_iter()
    .zip(full_commits)
    {
        for (what, label, value) in [
            ("daemon", "daemon", cpu.daemon_us),
            ("writer", "  its store writer", cpu.writer_us),
            ("generator", "load generator", cpu.generator_us),
        ] {
            r.figure(
                &format!("{key}_cpu_{what}_us"),
                &format!("  CPU per {name}: {label}"),
                value,
                "µs",
                Target::None,
            );
        }
        // Group commit: part of the writer's cost is per commit (its write and sync, and on a
        // VM their device notifications), so how many credentials share one matters. Only
        // issued credentials reach the store; no commit at all (a renamed metric) shows NaN.
        let commits_f = if commits == 0 {
            f64::NAN
        } else {
            commits as f64
        };
        r.figure(
            &format!("{key}_per_store_commit"),
            &format!("  {phase}: credentials per store commit"),
            load.ok as f64 / commits_f,
            "",
            Target::None,
        );
        r.figure(
            &format!("{key}_store_commits"),
            &format!("  {phase}: store commits"),
            commits as f64,
            "",
            Target::None,
        );
        // The writer thread's whole CPU (commits, idle-time checkpoints, audit appends,
        // wake-ups) over its commits.
        r.figure(
            &format!("{key}_cpu_writer_per_commit_us"),
            &format!("  {phase}: store writer CPU / commits"),
            cpu.writer_us * all(load) as f64 / commits_f,
            "µs",
            Target::None,
        );
        // What the two CPU costs allow on this machine with this generator (the targets
        // count the generator in): however the work is spread over the cores, no rate above
        // this is reached without lowering one of them. Another generator costs otherwise.
        r.figure(
            &format!("{key}_cpu_ceiling_per_sec"),
            &format!("  {plural}/s {cores} cores carry at these costs"),
            cpu.ceiling_per_sec,
            "/s",
            Target::None,
        );
        r.figure(
            &format!("{key}_other_cores"),
            &format!(
                "  cores busy with other work (stolen: {:.2})",
                cpu.steal_cores
            ),
            cpu.other_cores,
            "cores",
            Target::None,
        );
        if cpu.other_cores > 0.1 || cpu.steal_cores > 0.1 {
            eprintln!(
                "[issuance] warning: during the {name} phase {:.2} cores were busy with other \
                 work and {:.2} stolen by the hypervisor; its figures are not the daemon's alone",
                cpu.other_cores, cpu.steal_cores
            );
        }
    }
    for (key, name, load, view) in [
        ("x509", "X.509", &x509_half, &x509_view),
        ("jwt", "JWT", &jwt_half, &jwt_view),
    ] {
        let (sent_p50, sent_p99, _) = load.from_send.unwrap_or_default();
        for (what, value, target) in [
            ("p50", load.p50_ms, Target::None),
            ("p99", load.p99_ms, Target::Below(2.0)),
        ] {
            r.figure(
                &format!("{key}_half_load_{what}_ms"),
                &format!("{name} at half load, {what}"),
                value,
                "ms",
                target,
            );
        }
        // Not a target: what the daemon and the client library add, without the generator's
        // timer lateness (see `Load::from_send`).
        for (what, value) in [("p50", sent_p50), ("p99", sent_p99)] {
            r.figure(
                &format!("{key}_half_load_from_send_{what}_ms"),
                &format!("  from the actual send, {what}"),
                value,
                "ms",
                Target::None,
            );
        }
        // Only issued credentials have a latency: a phase with failures must say so.
        r.figure(
            &format!("{key}_half_load_failed"),
            "  errors and refusals (not in the percentiles)",
            (load.errors + load.shed) as f64,
            "",
            Target::AtMost(0.0),
        );
        r.figure(
            &format!("{key}_half_load_pacer_late_p99_ms"),
            "  the pacer's own lateness, p99 (counted in)",
            load.paced
                .as_ref()
                .map_or(f64::NAN, |p| p.pacer_late_p99_ms),
            "ms",
            Target::None,
        );
        r.figure(
            &format!("{key}_half_load_daemon_p99_at_most_ms"),
            "  inside the daemon (its histogram), p99 at most",
            view.handler_p99_at_most_ms,
            "ms",
            Target::None,
        );
        r.figure(
            &format!("{key}_half_load_commits_over_25ms"),
            &format!("  store commits over 25 ms (of {})", view.commits),
            view.commits_over_25ms as f64,
            "",
            Target::None,
        );
    }
    let disk_ms = |p: f64| super::quantile_ms(&disk, p);
    for (what, value) in [
        ("p50", disk_ms(0.5)),
        ("p99", disk_ms(0.99)),
        ("max", disk_ms(1.0)),
    ] {
        r.figure(
            &format!("disk_fsync_{what}_ms"),
            &format!("disk: 4 KiB overwrite + fsync in the data dir, {what}"),
            value,
            "ms",
            Target::None,
        );
    }
    // Not a target: the machine's own share of the tail (see `cpu_gaps`).
    r.figure(
        "cpu_gaps_over_2ms_per_sec",
        &format!("cpu: gaps over 2 ms per s, a spinner per core, {gap_secs:.1} s"),
        gaps.0,
        "/s",
        Target::None,
    );
    r.figure(
        "cpu_gap_max_ms",
        "cpu: the longest gap",
        gaps.1,
        "ms",
        Target::None,
    );
    // Of the requests that were not shed: a shed request is sent again at once, so counting
    // them in would divide the errors by about three times the requests served. A request
    // unanswered after `BARE_DEADLINE` is an error.
    r.figure(
        "overload_error_ratio",
        &format!("overload ({over_clients} clients, one uid), errors / (issued + errors)"),
        over.errors as f64 / (over.ok + over.errors).max(1) as f64,
        "ratio",
        Target::Below(0.001),
    );
    r.figure(
        "overload_error_ratio_of_all",
        "  errors / all requests, shed ones included",
        over.error_ratio(),
        "ratio",
        Target::None,
    );
    r.figure(
        "overload_p99_ms",
        &format!("  latency of issued ones, p99 (max {:.0} ms)", over.max_ms),
        over.p99_ms,
        "ms",
        Target::None,
    );
    // What got through, and how much was refused by the per-uid limits (all clients here are
    // one uid, so beyond its 256 concurrent FetchX509SVID streams it is refused at once).
    r.figure(
        "overload_ok_per_sec",
        "  X.509-SVIDs issued under overload",
        over.rate,
        "/s",
        Target::None,
    );
    let all = (over.ok + over.shed + over.errors).max(1) as f64;
    r.figure(
        "overload_shed_ratio",
        "  refused by the per-uid limits (Unavailable, shedding)",
        over.shed as f64 / all,
        "ratio",
        Target::None,
    );
    r.detail(
        "issuance",
        serde_json::json!({
            "cores": cores, "clients": c, "seconds_per_phase": secs,
            "x509": x509.json(), "x509_bare": bare.json(), "jwt": jwt.json(),
            "raw_limit": { "one_core": raw1, "before": raw_before, "after": raw_after },
            "x509_sampled": {
                "every": FRESH_EVERY, "sampled": fresh.sampled, "repeated": fresh.repeated,
                "not_dated_now": fresh.stale,
            },
            "bare_deadline_ms": BARE_DEADLINE.as_millis() as u64,
            "x509_half_load": x509_half.json(), "jwt_half_load": jwt_half.json(),
            "overload": over.json(), "overload_clients": over_clients,
            "cpu_per_request": {
                "x509": x509_cpu.json(), "x509_bare": bare_cpu.json(), "jwt": jwt_cpu.json(),
            },
            "x509_half_load_daemon": x509_view.json(), "jwt_half_load_daemon": jwt_view.json(),
            "cpu_gaps": {
                "seconds": gap_secs, "over_2ms_per_sec": gaps.0, "longest_ms": gaps.1,
            },
            "disk_fsync_4k_overwrite": {
                "syncs": disk.len(), "p50_ms": disk_ms(0.5), "p99_ms": disk_ms(0.99),
                "max_ms": disk_ms(1.0),
                "over_10ms": disk.iter().filter(|&&us| us > 10_000).count(),
            },
        }),
    );
    Figures { x509: x509.rate }
}
