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

/// How much higher the last quarter's highest RSS may be than the second quarter's: the
/// allocator's own swings at this load, well under what a leak adds over a long soak.
const SOAK_RISE_MIB: f64 = 2.0;

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
    // Flat is judged on the trend, not on two samples: the highest RSS of the last quarter of
    // the steady windows against the highest of its second quarter, with a fixed allowance
    // for the allocator's ups and downs (a leak grows past it given time, whatever the
    // daemon's size); and the least-squares slope over the second half, per credential.
    let quarter = |k: usize| {
        let n = steady.len();
        &steady[k * n / 4..((k + 1) * n / 4).max(k * n / 4 + 1).min(n)]
    };
    let max_rss = |s: &[&(f64, u64, super::Load)]| s.iter().map(|x| x.1).max().unwrap_or(0);
    let rise_mib = (max_rss(quarter(3)) as f64 - max_rss(quarter(1)) as f64) / (1 << 20) as f64;
    let half = &steady[steady.len() / 2..];
    let slope_b_per_s = {
        let n = half.len() as f64;
        let (mt, mr) = half
            .iter()
            .fold((0.0, 0.0), |(t, r), x| (t + x.0 / n, r + x.1 as f64 / n));
        let (cov, var) = half.iter().fold((0.0, 0.0), |(c, v), x| {
            (
                c + (x.0 - mt) * (x.1 as f64 - mr),
                v + (x.0 - mt) * (x.0 - mt),
            )
        });
        if var > 0.0 { cov / var } else { 0.0 }
    };
    let median_p99 = |s: &[&(f64, u64, super::Load)]| {
        let mut v: Vec<f64> = s.iter().map(|x| x.2.p99_ms).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
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
        Target::None,
    );
    r.figure(
        "soak_rss_rise_mib",
        "  highest RSS, last quarter minus second quarter",
        rise_mib,
        "MiB",
        Target::AtMost(SOAK_RISE_MIB),
    );
    r.figure(
        "soak_rss_slope_bytes_per_credential",
        "  RSS trend over the second half, per credential",
        slope_b_per_s / rate.max(1.0),
        "B",
        Target::None,
    );
    r.figure(
        "soak_p99_median_first_quarter_ms",
        "soak: median window p99, first steady quarter",
        median_p99(quarter(0)),
        "ms",
        Target::None,
    );
    r.figure(
        "soak_p99_median_last_quarter_ms",
        "soak: median window p99, last quarter",
        median_p99(quarter(3)),
        "ms",
        Target::None,
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
