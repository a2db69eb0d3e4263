//! Lease benchmark: memory per live lease, restart-to-serving with 1M leases, issuance latency
//! while 1M leases expire at once, and kill-switch time on an identity holding 100k leases.
//!
//! `cargo bench --bench leases` (env: `TESSERA_BENCH_LEASES`, default 1000000;
//! `TESSERA_BENCH_SECS`, each latency window, default 4). Prints a table and writes
//! `target/bench/leases.json`. The daemon is the real binary, started on a data
//! directory whose lease store this benchmark fills beforehand.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera::lease::store::{Op, SqliteStore, commit};
use tessera::lease::{Kind, Lease, LeaseId, LeaseTable, State};

// Same allocator as tesserad, so memory per lease is what the daemon pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        serial: (kind == Kind::X509).then_some(id.0),
        revocation: None,
    }
}

/// Bytes of resident memory per live lease in the lease table (indexes and expiry queue
/// included), for a mix of 1000 identities.
fn memory_per_lease(n: usize) -> f64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ids: Vec<Arc<str>> = (0..1000)
        .map(|i| Arc::from(format!("spiffe://tessera.internal/agent/{i}")))
        .collect();
    let entry: Arc<str> = Arc::from("config-0");
    let exe: Arc<str> = Arc::from("/usr/local/bin/agent");
    // Build the leases first so that only the table's own memory is measured.
    let leases: Vec<Lease> = (0..n)
        .map(|i| {
            lease(
                &ids[i % ids.len()],
                &entry,
                &exe,
                if i % 2 == 0 { Kind::X509 } else { Kind::Jwt },
                now,
                now + 3600 + (i % 600) as i64,
            )
        })
        .collect();
    let before = rss();
    let table = LeaseTable::new();
    for l in leases {
        table.insert(l);
    }
    let after = rss();
    // The Vec the leases came from was freed while inserting; its pages may still count in
    // `before` but not in `after`, which can only make this figure larger, never smaller.
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    assert_eq!(table.len(), n);
    per
}

struct Lat {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn jwt_load(d: &common::Daemon, clients: usize, secs: f64) -> Lat {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(4) {
        pool.push(Arc::new(d.client().await));
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let c = Arc::clone(&pool[i % pool.len()]);
            tokio::spawn(async move {
                let (mut lat, mut err) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match c.fetch_jwt_svid(["bench"], None).await {
                        Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                        Err(_) => err += 1,
                    }
                }
                (lat, err)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Lat {
        rate: all.len() as f64 / start.elapsed().as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        errors,
    }
}

fn main() {
    let n = std::env::var("TESSERA_BENCH_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000usize);
    let bulk = (n / 10).max(1000);
    eprintln!("lease benchmark: {n} leases, kill switch on {bulk}");

    eprintln!("[1/5] memory per live lease ...");
    let per_lease = memory_per_lease(n);

    // A data directory holding n leases that all expire at the same second, plus `bulk`
    // long-lived X.509 leases of one identity for the kill switch.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = common::open_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // Far enough ahead for the restart and a baseline measurement to finish first.
    let secs: f64 = std::env::var("TESSERA_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    let mass_expiry = now + 8 + secs as i64 + (n as i64 / 100_000) * 3;
    eprintln!("[2/5] writing {} leases into the store ...", n + bulk);
    let t = Instant::now();
    rt.block_on(async {
        let (store, _) = SqliteStore::open(&data, u64::MAX, now, &mut |_| {}).unwrap();
        let entry: Arc<str> = Arc::from("config-0");
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
    });
    eprintln!("      written in {:.1}s", t.elapsed().as_secs_f64());

    eprintln!("[3/5] restart to serving with {} leases ...", n + bulk);
    let config = format!(
        "log.level = \"info\"\n{}",
        common::entry_for_uid("bench", common::my_uid(), "jwt_svid_ttl = \"10m\"")
    );
    let t = Instant::now();
    let d = common::Daemon::start_in(dir, &config);
    let restart = t.elapsed();
    let restored = d
        .log_text()
        .lines()
        .find(|l| l.contains("state restored"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let restored_ms = restored.as_ref().and_then(|v| v["fields"]["ms"].as_u64());
    let load_ms = restored
        .as_ref()
        .and_then(|v| v["fields"]["load_ms"].as_u64());

    let (baseline, during, kill_ms, kill_revoked, lag) = rt.block_on(async {
        eprintln!("[4/5] issuance latency: baseline, then while {n} leases expire at once ...");
        let baseline = jwt_load(&d, 16, secs).await;
        let wait = mass_expiry - time::OffsetDateTime::now_utc().unix_timestamp() - 1;
        assert!(
            wait >= 0,
            "the restart took too long to measure a baseline before the mass expiry"
        );
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        let during = jwt_load(&d, 16, secs).await;
        let metrics = String::from_utf8(common::http_get(d.http, "/metrics").1).unwrap_or_default();
        let lag = metrics
            .lines()
            .find(|l| l.starts_with("tessera_reaper_lag_seconds"))
            .unwrap_or_default()
            .to_owned();

        eprintln!("[5/5] kill switch on an identity with {bulk} leases ...");
        let mut admin = tessera::proto::tessera::v1::admin_client::AdminClient::new(
            common::channel(&d.admin_socket).await,
        );
        let t = Instant::now();
        let r = admin
            .kill_identity(tessera::proto::tessera::v1::KillIdentityRequest {
                spiffe_id: "spiffe://tessera.internal/bulk".into(),
                reason: "benchmark".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (
            baseline,
            during,
            t.elapsed().as_secs_f64() * 1000.0,
            r.revoked,
            lag,
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    for l in d
        .log_text()
        .lines()
        .filter(|l| l.contains("state restored") || l.contains("identity killed"))
    {
        eprintln!("daemon: {l}");
    }
    drop(d);

    println!();
    println!("{:<52} {:>14}", "measure", "value");
    println!(
        "{:<52} {:>14.0}",
        "memory per live lease (bytes)", per_lease
    );
    println!(
        "{:<52} {:>14.2}",
        format!("restart to serving, {} leases (s)", n + bulk),
        restart.as_secs_f64()
    );
    if let Some(ms) = restored_ms {
        println!(
            "{:<52} {:>14.2}",
            "  of which restoring state (s)",
            ms as f64 / 1000.0
        );
    }
    if let Some(ms) = load_ms {
        println!(
            "{:<52} {:>14.2}",
            "    of which reading the store (s)",
            ms as f64 / 1000.0
        );
    }
    println!(
        "{:<52} {:>14.2}",
        "JWT issue p99, baseline (ms)", baseline.p99_ms
    );
    println!(
        "{:<52} {:>14.2}",
        format!("JWT issue p99, while {n} leases expire (ms)"),
        during.p99_ms
    );
    println!(
        "{:<52} {:>14.2}",
        "  ratio (target <= 2)",
        during.p99_ms / baseline.p99_ms
    );
    println!(
        "{:<52} {:>14.0}",
        "  issue rate baseline / during (per s)", baseline.rate
    );
    println!("{:<52} {:>14.0}", "", during.rate);
    println!(
        "{:<52} {:>14.1}",
        format!("kill switch, {kill_revoked} leases revoked (ms)"),
        kill_ms
    );
    println!("reaper: {lag}");
    let report = json!({
        "leases": n,
        "memory_per_lease_bytes": per_lease,
        "restart_to_serving_s": restart.as_secs_f64(),
        "restore_state_s": restored_ms.map(|m| m as f64 / 1000.0),
        "read_store_s": load_ms.map(|m| m as f64 / 1000.0),
        "jwt_p99_baseline_ms": baseline.p99_ms,
        "jwt_p50_baseline_ms": baseline.p50_ms,
        "jwt_p99_mass_expiry_ms": during.p99_ms,
        "jwt_p50_mass_expiry_ms": during.p50_ms,
        "p99_ratio": during.p99_ms / baseline.p99_ms,
        "errors": baseline.errors + during.errors,
        "kill_switch_ms": kill_ms,
        "kill_switch_revoked": kill_revoked,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("leases.json"),
        serde_json::to_vec_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("leases.json").display());
}
