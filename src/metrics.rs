//! Prometheus metrics, served as text at `/metrics`.
//!
//! Owns: the counters and histograms the daemon keeps. Plain atomics: recording costs a few
//! nanoseconds on the issuance path and needs no registry or lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::lease::Kind;

/// Latency bucket bounds, seconds.
/// Starts at 100 µs: a store commit takes ~0.2 ms and a JWT-SVID ~0.5 ms when all is well.
/// 2 ms is the half-load p99 target the benchmark holds the daemon to.
const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// `label`: `key="value"` pairs without braces, or empty.
    fn render(&self, out: &mut String, name: &str, label: &str) {
        let sep = if label.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{label}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{label}{sep}le=\"+Inf\"}} {cum}");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(label),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{} {cum}", braces(label));
    }
}

/// RPCs whose latency is recorded.
pub const RPCS: [&str; 6] = [
    "FetchX509SVID",
    "FetchJWTSVID",
    "ValidateJWTSVID",
    "FetchX509Bundles",
    "FetchJWTBundles",
    "TokenExchange",
];

/// All daemon metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    issued: [AtomicU64; 3],
    revoked: [AtomicU64; 3],
    denied: [AtomicU64; 3],
    /// Refusals counted but not written to the audit log (per-caller limit).
    refusals_left_out: AtomicU64,
    /// Milliseconds between a lease's expiry and the reaper retiring it, last batch.
    pub reaper_lag_ms: std::sync::Arc<AtomicI64>,
    latency: [Histogram; 6],
    /// Lease store commits (statements, log write and sync), shared with the store's writer:
    /// every credential of a batch waits for its commit, so this is the floor under issuance
    /// latency and where a slow disk shows.
    pub store_commit: std::sync::Arc<Histogram>,
}

/// Gauges read from the daemon's state when metrics are rendered.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Leases held in memory, active and revoked.
    pub live_leases: usize,
    /// Of those, the active ones.
    pub active_leases: usize,
    /// Task records held.
    pub tasks: usize,
    /// The CA certificate's `notAfter`, Unix seconds.
    pub ca_not_after: i64,
}

impl Metrics {
    /// Metrics whose store-commit histogram is the one the store's writer records into.
    pub fn with_store_commits(store_commit: std::sync::Arc<Histogram>) -> Self {
        Self {
            store_commit,
            ..Self::default()
        }
    }
}

fn idx(k: Kind) -> usize {
    k as usize - 1
}

impl Metrics {
    /// Counts an issued credential.
    pub fn issued(&self, k: Kind, n: u64) {
        self.issued[idx(k)].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts revoked credentials.
    pub fn revoked(&self, k: Kind, n: u64) {
        self.revoked[idx(k)].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a refused request for a credential of kind `k`.
    pub fn denied(&self, k: Kind) {
        self.denied[idx(k)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal the per-caller limit left out of the audit log.
    pub fn refusal_left_out(&self) {
        self.refusals_left_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an RPC's latency (for streams: to the first message).
    pub fn observe(&self, rpc: &str, d: Duration) {
        if let Some(i) = RPCS.iter().position(|r| *r == rpc) {
            self.latency[i].observe(d);
        }
    }

    /// Prometheus text exposition, with the gauges the caller read from the daemon's state.
    pub fn render(&self, g: &Gauges) -> String {
        let Gauges {
            live_leases,
            active_leases,
            tasks,
            ca_not_after,
        } = *g;
        let mut o = String::with_capacity(4096);
        let kinds = [Kind::X509, Kind::Jwt, Kind::Task];
        for (name, help, arr) in [
            ("tessera_issued_total", "Credentials issued.", &self.issued),
            (
                "tessera_revoked_total",
                "Credentials revoked before expiry.",
                &self.revoked,
            ),
            (
                "tessera_denied_total",
                "Credential requests refused.",
                &self.denied,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for k in kinds {
                let _ = writeln!(
                    o,
                    "{name}{{kind=\"{}\"}} {}",
                    k.as_str(),
                    arr[idx(k)].load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP tessera_audit_refusals_left_out_total Refusals counted but not written to the audit log: past a burst of 10 per caller per 10 s.\n# TYPE tessera_audit_refusals_left_out_total counter\ntessera_audit_refusals_left_out_total {}",
            self.refusals_left_out.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP tessera_leases Leases held in memory (active, and revoked until expiry; revoked certificates a day longer, in case the clock steps back).\n# TYPE tessera_leases gauge"
        );
        let _ = writeln!(o, "tessera_leases{{state=\"active\"}} {active_leases}");
        let _ = writeln!(
            o,
            "tessera_leases{{state=\"revoked\"}} {}",
            live_leases.saturating_sub(active_leases)
        );
        let _ = writeln!(
            o,
            "# HELP tessera_tasks Task records held (open and completed, until retention).\n# TYPE tessera_tasks gauge\ntessera_tasks {tasks}"
        );
        // What to alert on before X.509 issuance stops.
        let _ = writeln!(
            o,
            "# HELP tessera_ca_not_after_seconds When the CA certificate expires (Unix seconds); no X.509-SVID is issued after it.\n# TYPE tessera_ca_not_after_seconds gauge\ntessera_ca_not_after_seconds {ca_not_after}"
        );
        let _ = writeln!(
            o,
            "# HELP tessera_reaper_lag_seconds How late the reaper retired the last expired leases.\n# TYPE tessera_reaper_lag_seconds gauge"
        );
        let _ = writeln!(
            o,
            "tessera_reaper_lag_seconds {}",
            self.reaper_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(
            o,
            "# HELP tessera_request_duration_seconds Workload API request latency (streams: to the first message).\n# TYPE tessera_request_duration_seconds histogram"
        );
        for (i, rpc) in RPCS.iter().enumerate() {
            self.latency[i].render(
                &mut o,
                "tessera_request_duration_seconds",
                &format!("rpc=\"{rpc}\""),
            );
        }
        let _ = writeln!(
            o,
            "# HELP tessera_store_commit_duration_seconds Lease store group commits, the log sync included; credentials wait for them.\n# TYPE tessera_store_commit_duration_seconds histogram"
        );
        self.store_commit
            .render(&mut o, "tessera_store_commit_duration_seconds", "");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.issued(Kind::X509, 3);
        m.observe("FetchX509SVID", Duration::from_micros(700));
        m.observe("FetchX509SVID", Duration::from_millis(30));
        let g = Gauges {
            live_leases: 5,
            active_leases: 4,
            tasks: 2,
            ca_not_after: 0,
        };
        let t = m.render(&g);
        assert!(t.contains("tessera_issued_total{kind=\"x509-svid\"} 3"));
        assert!(t.contains("tessera_leases{state=\"revoked\"} 1"));
        assert!(t.contains(
            "tessera_request_duration_seconds_bucket{rpc=\"FetchX509SVID\",le=\"0.001\"} 1"
        ));
        assert!(t.contains(
            "tessera_request_duration_seconds_bucket{rpc=\"FetchX509SVID\",le=\"+Inf\"} 2"
        ));
        m.store_commit.observe(Duration::from_micros(300));
        let t = m.render(&g);
        assert!(t.contains("tessera_store_commit_duration_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(t.contains("tessera_store_commit_duration_seconds_count 1"));
        assert!(t.contains("tessera_store_commit_duration_seconds_sum 0.0003"));
    }
}
