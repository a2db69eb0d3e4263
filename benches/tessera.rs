//! The benchmark suite, one command: `cargo bench --bench tessera [-- OPTIONS]`.
//!
//! Starts the real daemon and drives it through real clients over its sockets, in one run:
//! the raw key-generation + signing limit of this machine, fresh X.509-SVIDs and JWT-SVIDs per
//! second and their ratio to that limit, latency at half load, errors under overload, cfssl
//! (a conventional Go CA server) on the same work, RFC 8693 exchanges, memory per lease,
//! restart with 1M leases, issue latency during a mass expiry, the kill switch, a kill -9 crash
//! test, and with `--duration` a soak. Prints progress, then one table with each figure
//! against its target, and writes JSON (`target/bench/results.json` by default).

#[path = "../tests/common/mod.rs"]
mod common;
mod suite;

use std::time::Duration;

use clap::Parser;
use serde_json::json;

// Same allocator as tesserad, so memory per lease is what the daemon pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PHASES: [&str; 5] = ["issuance", "cfssl", "exchange", "leases", "crash"];

#[derive(Parser, Debug)]
#[command(
    name = "tessera-bench",
    about = "Tessera's benchmark suite against the real daemon"
)]
struct Args {
    /// A short run for CI: 1 s phases, 16 clients, 20k leases, 3 crash rounds.
    #[arg(long)]
    quick: bool,
    /// Run only these phases (comma-separated): issuance, cfssl, exchange, leases, crash, soak.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds of load per measured phase.
    #[arg(long, env = "TESSERA_BENCH_SECS")]
    secs: Option<f64>,
    /// Concurrent clients for the maximum-rate phases.
    #[arg(long, env = "TESSERA_BENCH_CLIENTS")]
    clients: Option<usize>,
    /// Leases in the store for the restart and mass-expiry phases.
    #[arg(long, env = "TESSERA_BENCH_LEASES")]
    leases: Option<usize>,
    /// Leases held by the identity the kill switch cuts off.
    #[arg(long)]
    kill_leases: Option<usize>,
    /// Rounds of load + kill -9 in the crash test.
    #[arg(long, env = "TESSERA_CRASH_ROUNDS")]
    crash_rounds: Option<u64>,
    /// Clients running tasks (exchanges and completions) in the crash test, beside the SVID
    /// clients; 0 leaves tasks out.
    #[arg(long, default_value_t = 4)]
    crash_task_clients: usize,
    /// Soak: steady load for this long (e.g. 10m, 1h), sampling memory and latency.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Soak request rate per second.
    #[arg(long, default_value_t = 2000.0)]
    soak_rate: f64,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `git args` in the source tree, trimmed; `None` outside a git checkout.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The filesystem the daemons' data directories are made on (under `$TMPDIR`): its
/// `statfs` type, and whether it is memory, where every sync is free and durability is not
/// what the figures measure.
fn data_filesystem() -> (std::path::PathBuf, Option<i64>, bool) {
    let dir = std::env::temp_dir();
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok();
    let kind = path.and_then(|p| {
        // SAFETY: `p` is a valid C string and `s` a writable statfs buffer.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statfs(p.as_ptr(), &mut s) } == 0).then_some(s.f_type as i64)
    });
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    let memory = matches!(kind, Some(TMPFS | RAMFS));
    (dir, kind, memory)
}

fn main() {
    let a = Args::parse();
    let q = a.quick;
    let o = suite::Opts {
        secs: a.secs.unwrap_or(if q { 1.0 } else { 5.0 }),
        clients: a.clients.unwrap_or(if q { 16 } else { 64 }),
        leases: a.leases.unwrap_or(if q { 20_000 } else { 1_000_000 }),
        kill_leases: a.kill_leases.unwrap_or(if q { 20_000 } else { 100_000 }),
        crash_rounds: a.crash_rounds.unwrap_or(if q { 3 } else { 20 }),
        crash_task_clients: a.crash_task_clients,
    };
    let mut phases: Vec<&str> = if a.only.is_empty() {
        PHASES.to_vec()
    } else {
        a.only.iter().map(String::as_str).collect()
    };
    if a.duration.is_some() && !phases.contains(&"soak") {
        phases.push("soak");
    }
    for p in &phases {
        if !PHASES.contains(p) && *p != "soak" {
            eprintln!("unknown phase {p:?}; phases: {}, soak", PHASES.join(", "));
            std::process::exit(2);
        }
    }
    let duration = a.duration;
    if phases.contains(&"soak") && duration.is_none() {
        eprintln!("the soak phase needs --duration (e.g. --duration 10m)");
        std::process::exit(2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "tessera benchmark: {cores} cores; phases {}; {}s per phase, {} clients",
        phases.join(", "),
        o.secs,
        o.clients
    );
    let (data_dir, data_fs, in_memory) = data_filesystem();
    if in_memory {
        eprintln!(
            "warning: {} is in memory (tmpfs or ramfs): the daemons' stores sync for free \
             there, so the rates are not those of durable leases on a disk. Set TMPDIR to a \
             directory on a disk.",
            data_dir.display()
        );
    }
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut r = suite::Report::default();
    let (lost, crash_failed) = rt.block_on(async {
        let mut issued = None;
        let mut lost = 0;
        let mut crash_failed = None;
        for p in &phases {
            match *p {
                "issuance" => issued = Some(suite::issuance::run(&o, &mut r).await),
                "cfssl" => cfssl(&o, &mut r, issued.as_ref()).await,
                "exchange" => suite::exchange::run(&o, &mut r).await,
                "leases" => suite::leases::run(&o, &mut r).await,
                "crash" => match suite::crash::run(&o, &mut r).await {
                    Ok(n) => lost = n,
                    Err(e) => crash_failed = Some(e),
                },
                "soak" => {
                    let d = duration.expect("checked above");
                    suite::soak::run(&o, &mut r, d, a.soak_rate).await
                }
                _ => unreachable!("phases are checked above"),
            }
        }
        (lost, crash_failed)
    });

    r.print();
    let missed = r.missed();
    if !missed.is_empty() {
        println!("missed targets: {}", missed.join(", "));
    }
    let meta = json!({
        "cores": cores,
        "phases": phases,
        "seconds_per_phase": o.secs,
        "clients": o.clients,
        "leases": o.leases,
        "kill_leases": o.kill_leases,
        "crash_rounds": o.crash_rounds,
        "crash_task_clients": o.crash_task_clients,
        "quick": q,
        // Where the daemons kept their stores: figures from memory are not durable ones.
        "data_parent": data_dir,
        "data_fs_magic": data_fs.map(|m| format!("{m:#x}")),
        "data_fs_in_memory": in_memory,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "version": env!("CARGO_PKG_VERSION"),
        // What was measured: figures are tied to a build, not to a name.
        // The bench's own source; with TESSERAD set, the daemon's hash says what ran.
        "source_commit": git(&["rev-parse", "HEAD"]),
        "source_modified": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        "tesserad": common::tesserad_bin(),
        "tesserad_sha256": std::fs::read(common::tesserad_bin())
            .ok()
            .map(|b| hex::encode(ring::digest::digest(&ring::digest::SHA256, &b))),
    });
    let path = a.json.unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/results.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the JSON directory");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&r.json(meta)).unwrap())
        .expect("write the JSON results");
    println!("wrote {}", path.display());
    // Lost records are a correctness failure, unlike a missed performance target.
    if lost > 0 {
        eprintln!("LOST RECORDS in the crash test: {lost}");
        std::process::exit(1);
    }
    if let Some(e) = crash_failed {
        eprintln!("CRASH TEST INCONCLUSIVE: {e}");
        std::process::exit(1);
    }
}

/// cfssl on the same work as an X.509-SVID: a fresh P-256 key and a leaf signed by a P-256 CA.
async fn cfssl(o: &suite::Opts, r: &mut suite::Report, issued: Option<&suite::issuance::Figures>) {
    let clients = o.clients.min(32);
    eprintln!(
        "[cfssl] cfssl serve, newcert (server-side P-256 key + signature), {clients} clients ..."
    );
    match suite::cfssl::run(o.secs, clients).await {
        Ok(c) => {
            r.figure(
                "cfssl_per_sec",
                &format!("cfssl serve newcert (Go CA server), {clients} clients"),
                c.rate,
                "/s",
                suite::Target::None,
            );
            // cfssl's failures would flatter the ratio below: shown, not only in the JSON.
            r.figure(
                "cfssl_errors",
                "  cfssl errors (failed or unverifiable answers)",
                c.errors as f64,
                "count",
                suite::Target::None,
            );
            if let Some(i) = issued {
                r.figure(
                    "x509_vs_cfssl",
                    "  Tessera X.509-SVIDs / cfssl",
                    i.x509 / c.rate.max(1e-9),
                    "ratio",
                    suite::Target::AtLeast(4.0),
                );
            }
            r.detail(
                "cfssl",
                json!({
                    "version": c.version, "clients": clients, "per_sec": c.rate,
                    "p50_ms": c.p50_ms, "p99_ms": c.p99_ms, "errors": c.errors,
                    "certificate_verified": c.verified,
                }),
            );
        }
        Err(e) => {
            eprintln!("[cfssl] skipped: {e}");
            // Shown as missed, not left out: a run without the comparison has not met it.
            if issued.is_some() {
                r.figure(
                    "x509_vs_cfssl",
                    "  Tessera X.509-SVIDs / cfssl (cfssl did not run)",
                    f64::NAN,
                    "ratio",
                    suite::Target::AtLeast(4.0),
                );
            }
            r.detail("cfssl", json!({ "skipped": e }));
        }
    }
}
