//! Soak phase (`--duration`): steady paced load of X.509-SVIDs and JWT-SVIDs for a long time,
//! sampling the daemon's resident memory, throughput and latency in windows. Leases live 15 s,
//! so the live set reaches its steady size within the first half minute; from then on memory
//! must stay flat, and any growth is a leak (tables, caches, audit or store buffers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Opts, Outcome, Report, Target, drive, rss_of};
use crate::common;

/// Lease lifetime during the soak: short, so that the steady state comes quickly.
const TTL_SECS: u64 = 15;

pub async fn run(_o: &Opts, r: &mut Report, duration: Duration, rate: f64) {
    let clients = 16usize;
    let window = Duration::from_secs((duration.as_secs() / 30).clamp(2, 60));
    let d = common::Daemon::start(&format!(
        "log.level = \"info\"\n{}",
        common::entry_for_uid(
            "soak",
            common::my_uid(),
            &format!("x509_svid_ttl = \"{TTL_SECS}s\"\njwt_svid_ttl = \"{TTL_SECS}s\"")
        )
    ));
    let mut pool = Vec::new();
    for _ in 0..clients / 4 {
        pool.push(Arc::new(d.client().await));
    }
    let all: Vec<_> = (0..clients)
        .map(|i| Arc::clone(&pool[i % pool.len()]))
        .collect();
    let pace = Duration::from_secs_f64(clients as f64 / rate.max(1.0));
    eprintln!(
        "[soak] {:.0}s at {rate:.0}/s (X.509 and JWT alternating), sampling every {}s ...",
        duration.as_secs_f64(),
        window.as_secs()
    );
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        let l = drive(
            "soak",
            all.clone(),
            window.as_secs_f64(),
            Some(pace),
            |c, i, _| async move {
                let ok = if i % 2 == 0 {
                    c.fetch_x509_svid().await.is_ok()
                } else {
                    c.fetch_jwt_svid(["soak"], None).await.is_ok()
                };
                (c, if ok { Outcome::Ok } else { Outcome::Err })
            },
        )
        .await;
        let rss = rss_of(d.pid()).unwrap_or(0);
        let at = start.elapsed().as_secs_f64();
        eprintln!(
            "      soak {at:>6.0}s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, errors {}, RSS {:.1} MiB",
            l.rate,
            l.p50_ms,
            l.p99_ms,
            l.errors,
            rss as f64 / (1 << 20) as f64
        );
        samples.push((at, rss, l));
    }
    drop(d);

    // Memory is compared from the first window after two lease lifetimes (the live set has
    // reached its steady size) to the last.
    let settle = (2 * TTL_SECS) as f64;
    let steady: Vec<_> = samples.iter().filter(|(at, ..)| *at > settle).collect();
    let (first, last) = match (steady.first(), steady.last()) {
        (Some(f), Some(l)) if steady.len() >= 2 => (f, l),
        _ => {
            eprintln!(
                "[soak] too short to judge memory: run at least {}s",
                settle as u64 * 2
            );
            return;
        }
    };
    let growth = last.1 as f64 / first.1.max(1) as f64;
    let worst_p99 = steady.iter().map(|(_, _, l)| l.p99_ms).fold(0.0, f64::max);
    let errors: u64 = samples.iter().map(|(_, _, l)| l.errors).sum();
    r.figure(
        "soak_rss_start_mib",
        "soak: daemon RSS once steady",
        first.1 as f64 / (1 << 20) as f64,
        "MiB",
        Target::None,
    );
    r.figure(
        "soak_rss_end_mib",
        "soak: daemon RSS at the end",
        last.1 as f64 / (1 << 20) as f64,
        "MiB",
        Target::None,
    );
    r.figure(
        "soak_rss_growth",
        "  RSS end / steady start (flat = 1)",
        growth,
        "ratio",
        Target::AtMost(1.10),
    );
    r.figure(
        "soak_p99_first_ms",
        "soak: p99, first steady window",
        first.2.p99_ms,
        "ms",
        Target::None,
    );
    r.figure(
        "soak_p99_last_ms",
        "soak: p99, last window",
        last.2.p99_ms,
        "ms",
        Target::None,
    );
    r.figure(
        "soak_p99_worst_ms",
        "soak: worst window p99",
        worst_p99,
        "ms",
        Target::None,
    );
    r.figure(
        "soak_errors",
        "soak: errors",
        errors as f64,
        "count",
        Target::AtMost(0.0),
    );
    r.detail(
        "soak",
        json!({
            "duration_s": duration.as_secs_f64(), "rate_per_sec": rate, "window_s": window.as_secs(),
            "lease_ttl_s": TTL_SECS,
            "samples": samples.iter().map(|(at, rss, l)| json!({
                "at_s": at, "rss_bytes": rss, "per_sec": l.rate, "p50_ms": l.p50_ms,
                "p99_ms": l.p99_ms, "errors": l.errors,
            })).collect::<Vec<_>>(),
        }),
    );
}
