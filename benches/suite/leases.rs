//! Lease phases: memory per live lease, restart-to-serving with 1M leases, issuance latency
//! while 1M leases expire at once, and kill-switch time on an identity holding 100k leases.
//! The daemon is the real binary, started on a data directory this phase fills beforehand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera::lease::store::{Op, SqliteStore, commit};
use tessera::lease::{Kind, Lease, LeaseId, LeaseTable, State};

use super::{Load, Opts, Outcome, Report, Target, drive, rss_of};
use crate::common;

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn lease(
    spiffe_id: &Arc<str>,
    entry: &Arc<str>,
    exe: &Arc<str>,
    kind: Kind,
    now: i64,
    exp: i64,
) -> Lease {
    let id = LeaseId::random();
    Lease {
        id,
        kind,
        state: State::Active,
        uid: 1000,
        pid: 4242,
        issued_at: now,
        expires_at: exp,
        spiffe_id: Arc::clone(spiffe_id),
        entry_id: Arc::clone(entry),
        exe: Some(Arc::clone(exe)),
        task_id: None,
        serial: (kind == Kind::X509).then(|| Box::new(id.0)),
        revocation: None,
        kill_epoch: 0,
    }
}

/// Fewest leases the memory figure is taken with, whatever `--leases` says. The quick run's
/// 20k leases moved RSS by a few MiB, where the allocator's granularity showed: 327 and 374
/// bytes a lease in two CI runs against 277–280 with 1M.
const MEMORY_MIN_LEASES: usize = 200_000;

/// Bytes of resident memory per live lease in the lease table (indexes and expiry queue
/// included), for a mix of 1000 identities.
fn memory_per_lease(n: usize) -> f64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ids: Vec<Arc<str>> = (0..1000)
        .map(|i| Arc::from(format!("spiffe://tessera.internal/agent/{i}")))
        .collect();
    let entry: Arc<str> = Arc::from("config-3f2a9c0b1d4e");
    let exe: Arc<str> = Arc::from("/usr/local/bin/agent");
    // Build the leases first so that only the table's own memory is measured; half of them
    // become X.509 leases in the measured loop, where their boxed serial is allocated.
    let mut leases: Vec<Lease> = (0..n)
        .map(|i| {
            lease(
                &ids[i % ids.len()],
                &entry,
                &exe,
                Kind::Jwt,
                now,
                now + 3600 + (i % 600) as i64,
            )
        })
        .collect();
    let before = rss();
    let table = LeaseTable::new();
    // Drained, not consumed: the Vec's buffer stays allocated until `after` is read, so its
    // pages count in both samples. Freed in between, the allocator could hand them back to
    // the system or not, depending on timing, and the figure would move by its ~130 bytes a
    // lease.
    for (i, mut l) in leases.drain(..).enumerate() {
        if i % 2 == 0 {
            l.kind = Kind::X509;
            l.serial = Some(Box::new(l.id.0));
        }
        table.insert(l);
    }
    let after = rss();
    drop(leases);
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    assert_eq!(table.len(), n);
    per
}

/// Most 2-s windows measured after the mass expiry's first window while the store still
/// deletes expired rows (a minute).
const MAX_AFTER_WINDOWS: usize = 30;

/// JWT-SVIDs from `clients` loops: as fast as they go (`pace` None), or open loop, each
/// loop sending one per `pace` with latency counted from the schedule.
async fn jwt_load(
    d: &common::Daemon,
    label: &str,
    clients: usize,
    secs: f64,
    pace: Option<Duration>,
) -> Load {
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(4) {
        pool.push(Arc::new(d.client().await));
    }
    let all = (0..clients)
        .map(|i| Arc::clone(&pool[i % pool.len()]))
        .collect();
    drive(label, all, secs, pace, |c, _, _| async move {
        let ok = c.fetch_jwt_svid(["bench"], None).await.is_ok();
        (c, if ok { Outcome::Ok } else { Outcome::Err })
    })
    .await
}

pub async fn run(o: &Opts, r: &mut Report) {
    let n = o.leases;
    let bulk = o.kill_leases;
    let m = n.max(MEMORY_MIN_LEASES);
    eprintln!("[leases] memory per live lease, {m} leases in the table ...");
    let per_lease = tokio::task::spawn_blocking(move || memory_per_lease(m))
        .await
        .unwrap();
    let config = format!(
        "log.level = \"info,tessera::lease=debug\"\n{}",
        common::entry_for_uid("bench", common::my_uid(), "jwt_svid_ttl = \"10m\"")
    );
    // What the daemon itself holds per lease is its RSS with the leases less its RSS without:
    // an empty daemon, as it is once it has served its first SVID.
    let rss_empty = {
        let cfg = config.clone();
        let d = tokio::task::spawn_blocking(move || common::Daemon::start(&cfg))
            .await
            .unwrap();
        d.client()
            .await
            .fetch_jwt_svid(["empty"], None)
            .await
            .expect("a JWT-SVID from an empty daemon");
        rss_of(d.pid()).unwrap_or(0)
    };

    // A data directory holding n leases that all expire at the same second, plus `bulk`
    // long-lived X.509 leases of one identity for the kill switch.
    let dir = common::open_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let secs = o.secs.max(1.0);
    // Far enough ahead for the restart, the capacity probe and the baseline to finish first.
    let mass_expiry = now + 9 + (secs * 1.5).ceil() as i64 + (n as i64 / 100_000) * 3;
    eprintln!("[leases] writing {} leases into the store ...", n + bulk);
    let t = Instant::now();
    {
        let (store, _) = SqliteStore::open(&data, u64::MAX, now, &mut |_| {}).unwrap();
        let entry: Arc<str> = Arc::from("config-3f2a9c0b1d4e");
        let exe: Arc<str> = Arc::from("/usr/local/bin/agent");
        let ids: Vec<Arc<str>> = (0..1000)
            .map(|i| Arc::from(format!("spiffe://tessera.internal/mass/{i}")))
            .collect();
        let bulk_id: Arc<str> = Arc::from("spiffe://tessera.internal/bulk");
        let mut ops = Vec::with_capacity(50_000);
        for i in 0..n + bulk {
            let l = if i < n {
                lease(
                    &ids[i % ids.len()],
                    &entry,
                    &exe,
                    Kind::Jwt,
                    now,
                    mass_expiry,
                )
            } else {
                lease(&bulk_id, &entry, &exe, Kind::X509, now, now + 3600)
            };
            ops.push(Op::PutLease(l));
            if ops.len() == 50_000 {
                commit(&store, std::mem::take(&mut ops)).await.unwrap();
            }
        }
        commit(&store, ops).await.unwrap();
    }
    eprintln!("      written in {:.1}s", t.elapsed().as_secs_f64());
    // The store is durable already; what the kernel still has to write back of writing it
    // (the database file the checkpoint filled, the log truncated at close) would otherwise
    // land on the daemon's first commits, as stalls of 50-300 ms in the baseline that have
    // nothing to do with it.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };

    eprintln!("[leases] restart to serving with {} leases ...", n + bulk);
    let t = Instant::now();
    let d = tokio::task::spawn_blocking(move || common::Daemon::start_in(dir, &config))
        .await
        .unwrap();
    // Serving means a real SVID: the clock stops when the first JWT-SVID is received.
    d.client()
        .await
        .fetch_jwt_svid(["restart"], None)
        .await
        .expect("a JWT-SVID after the restart");
    let restart = t.elapsed().as_secs_f64();
    let restored = d
        .log_text()
        .lines()
        .find(|l| l.contains("state restored"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    // Every stored lease came back: the restart did the whole work.
    let restored_leases = restored
        .as_ref()
        .and_then(|v| v["fields"]["leases"].as_u64());
    assert_eq!(
        restored_leases,
        Some((n + bulk) as u64),
        "leases restored at start"
    );
    let restored_ms = restored.as_ref().and_then(|v| v["fields"]["ms"].as_u64());
    let load_ms = restored
        .as_ref()
        .and_then(|v| v["fields"]["load_ms"].as_u64());

    let rss_restored = rss_of(d.pid()).unwrap_or(0);
    eprintln!("[leases] JWT issue latency: baseline, then while {n} leases expire at once ...");
    // Open loop at half of what a closed loop reaches here, the same before and during: a
    // closed loop sends nothing while its requests wait, so a stall of the daemon would
    // hold up only the requests in flight and hardly move the p99 (coordinated omission).
    // As many loops as the issuance phase's (64 unless --clients): each has one request in
    // flight, and with few loops a request slower than the loops' spacing holds up the next
    // one's send, which an open-loop generator of more concurrency would not.
    let c = o.clients;
    let probe = jwt_load(&d, "capacity", c, secs / 2.0, None).await;
    let pace = Duration::from_secs_f64(c as f64 / (probe.rate / 2.0).max(1.0));
    eprintln!(
        "[leases] paced at {:.0}/s, half of the {:.0}/s of a closed loop",
        probe.rate / 2.0,
        probe.rate
    );
    let baseline = jwt_load(&d, "baseline", c, secs, Some(pace)).await;
    // From the second the leases expire in, not before it: a window begun earlier would
    // hold baseline load as well.
    let wait = mass_expiry as i128 * 1_000_000_000
        - time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    assert!(
        wait >= 0,
        "the restart took too long to measure a baseline before the mass expiry"
    );
    tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
    let during = jwt_load(&d, "mass expiry", c, secs, Some(pace)).await;
    // The expiry is over once the store has deleted every expired row too (the reaper does
    // that after taking them out of memory, in small commits between issuance). Rows still
    // there when the window ended: more windows, at the same pace, until none is left.
    // One number about the expired rows still in the store (read-only, beside the daemon).
    let expired = |sql: &str| -> Option<i64> {
        rusqlite::Connection::open_with_flags(
            data.join("tessera.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|db| db.query_row(sql, [mass_expiry], |r| r.get::<_, i64>(0)))
        .ok()
    };
    let left_at_window_end =
        expired("SELECT count(*) FROM leases WHERE expires_at <= ?1").unwrap_or(i64::MAX);
    // Between windows only an existence check (it stops at the first expired row), so that
    // little goes unmeasured between them; the count above is taken once.
    let any_left =
        || expired("SELECT EXISTS (SELECT 1 FROM leases WHERE expires_at <= ?1)") != Some(0);
    let mut after_windows: Vec<Load> = Vec::new();
    while left_at_window_end > 0 && any_left() && after_windows.len() < MAX_AFTER_WINDOWS {
        after_windows.push(jwt_load(&d, "expiry, deletes", c, 2.0, Some(pace)).await);
    }
    if after_windows.len() == MAX_AFTER_WINDOWS && any_left() {
        eprintln!(
            "[leases] warning: expired rows were still in the store after {MAX_AFTER_WINDOWS} \
             windows more; the mass-expiry figure does not cover the whole expiry"
        );
    }
    let after_p99 = after_windows
        .iter()
        .map(|l| l.p99_ms)
        .fold(f64::NAN, f64::max);
    // Memory once the mass expiry is reaped: what the daemon keeps after a burst is gone. The
    // reaper takes the leases out of memory (and shrinks the tables), then deletes their rows
    // from the store in chunks between issuance: wait until no expired row is left (the lease
    // gauge cannot tell, as the phase's own JWT-SVIDs stay active), then until RSS settles
    // (three samples a second apart within 1 MiB, at most 30 s), so that neither the deletes
    // nor the allocator's delayed purge count.
    let reaped = Instant::now();
    let db = rusqlite::Connection::open_with_flags(
        data.join("tessera.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut deleted_s = None;
    while reaped.elapsed() < Duration::from_secs(60) {
        let left: i64 = db
            .query_row(
                "SELECT count(*) FROM leases WHERE expires_at <= ?1",
                [mass_expiry],
                |r| r.get(0),
            )
            .unwrap_or(i64::MAX);
        if left == 0 {
            deleted_s = Some(reaped.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(db);
    let mut series = vec![rss_of(d.pid()).unwrap_or(0)];
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        series.push(rss_of(d.pid()).unwrap_or(0));
        let last = &series[series.len().saturating_sub(3)..];
        if last.len() == 3
            && last.iter().max().unwrap_or(&0) - last.iter().min().unwrap_or(&0) < 1 << 20
        {
            break;
        }
    }
    let rss_reaped = *series.last().unwrap_or(&0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "      expired rows gone from the store {:.1} s after the load; RSS each second after (MiB): {:?}",
        deleted_s.unwrap_or(f64::NAN),
        series.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
    eprintln!(
        "      daemon RSS {:.1} MiB with {} leases, {:.1} MiB after {n} expired",
        mib(rss_restored),
        n + bulk,
        mib(rss_reaped)
    );
    let metrics = String::from_utf8(common::http_get(d.http, "/metrics").1).unwrap_or_default();
    let lag: Option<f64> = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_reaper_lag_seconds "))
        .and_then(|v| v.trim().parse().ok());

    eprintln!("[leases] kill switch on an identity with {bulk} leases ...");
    let mut admin = tessera::proto::tessera::v1::admin_client::AdminClient::new(
        common::channel(&d.admin_socket).await,
    );
    let t = Instant::now();
    let killed = admin
        .kill_identity(tessera::proto::tessera::v1::KillIdentityRequest {
            spiffe_id: "spiffe://tessera.internal/bulk".into(),
            reason: "benchmark".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let kill_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(
        killed.revoked as usize, bulk,
        "the kill switch revoked every lease"
    );
    // From the same start until `/crl` lists the killed certificates (as many as a CRL holds):
    // when X.509 relying parties can learn of the kill. The call above covers the cut-off:
    // the daemon refuses the identity from its return on.
    let want = bulk.min(tessera::ca::MAX_CRL_ENTRIES);
    let http = d.http;
    let crl_ms = tokio::task::spawn_blocking(move || {
        let mut last_len = 0;
        while t.elapsed() < Duration::from_secs(30) {
            let (code, body) = common::http_get(http, "/crl");
            if code == 200 && body.len() != last_len {
                last_len = body.len();
                let listed = x509_parser::parse_x509_crl(&body)
                    .map(|(_, c)| c.iter_revoked_certificates().count())
                    .unwrap_or(0);
                if listed >= want {
                    return Some(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
    .await
    .unwrap();
    // The daemon's own split of the kill: finding the leases, the durable write, in memory.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kill_log = d
        .log_text()
        .lines()
        .find(|l| l.contains("identity killed"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone());
    if let Some(f) = &kill_log {
        eprintln!(
            "      daemon: found {} us, durable {} us, total {} us",
            f["found_us"], f["durable_us"], f["total_us"]
        );
    }
    // The reaper's own CPU for taking the expired leases out of memory and shrinking the
    // tables after: on a busy two-core box the wall time it took (`ms`) is mostly the time
    // it handed its thread to issuance.
    // The one retirement that took all n (they share one second and the reaper takes
    // everything due in one pass).
    let retired = d
        .log_text()
        .lines()
        .filter(|l| l.contains("expired leases retired"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .find(|f| f["count"].as_u64() == Some(n as u64));
    let field_ms = |key: &str| {
        retired
            .as_ref()
            .and_then(|f| f[key].as_f64())
            .map(|us| us / 1000.0)
    };
    let (retire_cpu_ms, shrink_cpu_ms) = (field_ms("cpu_us"), field_ms("shrink_cpu_us"));
    match &retired {
        Some(f) => eprintln!(
            "      reaper: {n} leases retired from memory in {} ms, {:.0} ms of CPU; {} tables shrunk in {:.1} ms of CPU",
            f["ms"],
            retire_cpu_ms.unwrap_or(f64::NAN),
            f["tables_shrunk"],
            shrink_cpu_ms.unwrap_or(f64::NAN)
        ),
        None => eprintln!("      reaper: no retirement of all {n} leases in the daemon's log"),
    }
    if let Ok(path) = std::env::var("TESSERA_BENCH_DAEMON_LOG") {
        // For looking into a run: the daemon's own account of it, JSON lines.
        let _ = std::fs::write(path, d.log_text());
    }
    drop(d);

    let kill_per_100k = kill_ms * 100_000.0 / bulk.max(1) as f64;
    // The worse of the window from the expiry and the windows after it until the deletes
    // were done.
    let ratio = during.p99_ms.max(after_p99) / baseline.p99_ms;
    // The target is the daemon's own: what an independent generator can measure.
    r.figure(
        "memory_per_lease_bytes",
        &format!(
            "memory per live lease, daemon RSS with {} less empty",
            n + bulk
        ),
        rss_restored.saturating_sub(rss_empty) as f64 / (n + bulk).max(1) as f64,
        "bytes",
        Target::AtMost(300.0),
    );
    r.figure(
        "memory_per_lease_table_bytes",
        &format!("  the lease table alone, {m} leases in the bench's process"),
        per_lease,
        "bytes",
        Target::None,
    );
    r.figure(
        "rss_empty_mib",
        "daemon RSS, empty, after its first SVID",
        mib(rss_empty),
        "MiB",
        Target::None,
    );
    r.figure(
        "rss_leases_mib",
        &format!("daemon RSS with {} leases", n + bulk),
        mib(rss_restored),
        "MiB",
        Target::None,
    );
    r.figure(
        "rss_after_expiry_mib",
        &format!("  after {n} of them expired"),
        mib(rss_reaped),
        "MiB",
        Target::None,
    );
    r.figure(
        "restart_s",
        &format!("restart to serving, {} leases", n + bulk),
        restart,
        "s",
        Target::AtMost(2.0),
    );
    r.figure(
        "kill_switch_ms",
        &format!("kill switch, {bulk} leases revoked"),
        kill_ms,
        "ms",
        Target::None,
    );
    r.figure(
        "kill_switch_ms_per_100k",
        "  kill switch per 100k leases",
        kill_per_100k,
        "ms",
        Target::AtMost(50.0),
    );
    r.figure(
        "kill_crl_ms",
        &format!(
            "  until /crl lists them ({} of {bulk}: a CRL holds {})",
            want,
            tessera::ca::MAX_CRL_ENTRIES
        ),
        crl_ms.unwrap_or(f64::NAN),
        "ms",
        Target::None,
    );
    r.figure(
        "mass_expiry_p99_ms",
        &format!("JWT p99 while {n} leases expire"),
        during.p99_ms,
        "ms",
        Target::None,
    );
    r.figure(
        "mass_expiry_rows_left_at_window_end",
        &format!(
            "  expired rows still in the store when it ended ({} windows of 2 s more)",
            after_windows.len()
        ),
        left_at_window_end as f64,
        "",
        Target::None,
    );
    r.figure(
        "mass_expiry_after_p99_ms",
        "  JWT p99 in those windows, the worst",
        after_p99,
        "ms",
        Target::None,
    );
    r.figure(
        "mass_expiry_p99_ratio",
        "  p99 ratio to baseline (the worse of the two)",
        ratio,
        "ratio",
        Target::AtMost(2.0),
    );
    // Paced, the rate only drops if requests are still waiting at the end of the phase; the
    // slowest request shows a stall too short to reach the p99.
    r.figure(
        "mass_expiry_rate_ratio",
        "  JWT rate during / baseline",
        during.rate / baseline.rate.max(1e-9),
        "ratio",
        Target::None,
    );
    r.figure(
        "mass_expiry_max_ms",
        &format!(
            "  slowest JWT-SVID during (baseline {:.1} ms)",
            baseline.max_ms
        ),
        during.max_ms,
        "ms",
        Target::None,
    );
    if let Some(ms) = retire_cpu_ms {
        r.figure(
            "mass_expiry_retire_cpu_us_per_lease",
            "  reaper CPU per expired lease, out of memory",
            ms * 1000.0 / n.max(1) as f64,
            "us",
            Target::None,
        );
    }
    r.detail(
        "leases",
        json!({
            "leases": n, "kill_leases": bulk,
            "restore_state_s": restored_ms.map(|m| m as f64 / 1000.0),
            "read_store_s": load_ms.map(|m| m as f64 / 1000.0),
            "capacity_closed_loop": probe.json(), "paced_per_sec": probe.rate / 2.0,
            "baseline": baseline.json(), "mass_expiry": during.json(),
            "reaper_lag_seconds": lag,
            "store_deletes_done_s": deleted_s,
            "rows_left_at_window_end": left_at_window_end,
            "after_windows": after_windows.iter().map(Load::json).collect::<Vec<_>>(),
            "rss_empty_bytes": rss_empty, "rss_leases_bytes": rss_restored,
            "kill_crl_ms": crl_ms,
            "reaper_retire_ms": retired.as_ref().and_then(|f| f["ms"].as_u64()),
            "reaper_retire_cpu_ms": retire_cpu_ms,
            "reaper_shrink_cpu_ms": shrink_cpu_ms,
        "kill_daemon_split": kill_log,
        }),
    );
}
