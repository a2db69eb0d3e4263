//! Issuance benchmark: fresh X.509-SVIDs and JWT-SVIDs per second through the real `spiffe`
//! client over the Workload API socket, against the raw key-generation + signing rate
//! measured in the same run (the physical limit on this machine).
//!
//! `cargo bench --bench issuance` (env: `TESSERA_BENCH_SECS`, default 5 per phase;
//! `TESSERA_BENCH_CLIENTS`, default 64). Prints a table and writes
//! `target/bench/issuance.json`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::json;

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

struct Load {
    rate: f64,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
}

/// Runs `clients` concurrent loops of `op` for `secs`, each on its own connection.
async fn drive<F, Fut>(d: &common::Daemon, clients: usize, secs: f64, op: F) -> Load
where
    F: Fn(Arc<spiffe::WorkloadApiClient>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    // Several requests share each connection, as sidecars behind one agent socket would.
    let conns = clients.div_ceil(4);
    let mut pool = Vec::new();
    for _ in 0..conns {
        pool.push(Arc::new(d.client().await));
    }
    let start = Instant::now();
    for i in 0..clients {
        let client = Arc::clone(&pool[i % conns]);
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if op(Arc::clone(&client)).await {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    collect(tasks, start).await
}

/// The same work through a minimal gRPC client that only checks a response arrived: shows
/// what the daemon sustains when the load generator's parsing is not competing for the CPU.
async fn drive_raw(d: &common::Daemon, clients: usize, secs: f64) -> Load {
    use tessera::proto::workload as pb;
    use tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let conns = clients.div_ceil(4);
    let mut pool = Vec::new();
    for _ in 0..conns {
        let ch = common::channel(&d.socket).await;
        pool.push(SpiffeWorkloadApiClient::new(ch));
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let mut c = pool[i % conns].clone();
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::with_capacity(4096), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let mut r = tonic::Request::new(pb::X509svidRequest {});
                    r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
                    let ok = match c.fetch_x509svid(r).await {
                        Ok(s) => matches!(s.into_inner().message().await, Ok(Some(m)) if !m.svids.is_empty()),
                        Err(_) => false,
                    };
                    if ok { lat.push(t.elapsed().as_micros() as u64) } else { errors += 1 }
                }
                (lat, errors)
            })
        })
        .collect();
    collect(tasks, start).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<(Vec<u64>, u64)>>, start: Instant) -> Load {
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Load {
        rate: all.len() as f64 / elapsed,
        errors,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn main() {
    let secs = common::env_num("TESSERA_BENCH_SECS", 5) as f64;
    let clients = common::env_num("TESSERA_BENCH_CLIENTS", 64) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("issuance benchmark: {cores} cores, {clients} concurrent clients, {secs}s per phase");

    eprintln!("[1/3] raw P-256 key generation + ECDSA signing on all cores ...");
    let raw1 = raw_limit(secs / 2.0, 1);
    let raw = raw_limit(secs, cores);

    let d = common::Daemon::start(&format!(
        "log.level = \"info\"\n{}",
        common::entry_for_uid("bench", common::my_uid(), "")
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (x509, x509_raw, jwt) = rt.block_on(async {
        eprintln!("[2/3] fresh X.509-SVIDs through the spiffe client ...");
        let x509 = drive(&d, clients, secs, |c| async move {
            c.fetch_x509_svid().await.is_ok()
        })
        .await;
        eprintln!("[2b] fresh X.509-SVIDs through a bare gRPC client (no client-side parsing) ...");
        let x509_raw = drive_raw(&d, clients, secs).await;
        eprintln!("[3/3] JWT-SVIDs through the spiffe client ...");
        let jwt = drive(&d, clients, secs, |c| async move {
            c.fetch_jwt_svid(["bench"], None).await.is_ok()
        })
        .await;
        (x509, x509_raw, jwt)
    });
    drop(d);

    println!();
    println!(
        "{:<44} {:>12} {:>9} {:>9} {:>8}",
        "measure", "per second", "p50 ms", "p99 ms", "errors"
    );
    println!(
        "{:<44} {:>12.0} {:>9} {:>9} {:>8}",
        "raw keygen+sign, one core", raw1, "-", "-", "-"
    );
    println!(
        "{:<44} {:>12.0} {:>9} {:>9} {:>8}",
        "raw keygen+sign, all cores (limit)", raw, "-", "-", "-"
    );
    for (name, l) in [
        ("X.509-SVIDs, spiffe client (fresh key)", &x509),
        ("X.509-SVIDs, bare gRPC client (fresh key)", &x509_raw),
        ("JWT-SVIDs, spiffe client", &jwt),
    ] {
        println!(
            "{:<44} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            name,
            l.rate,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.errors
        );
    }
    println!("X.509 rate / raw limit: {:.1}%", 100.0 * x509.rate / raw);

    let report = json!({
        "cores": cores,
        "clients": clients,
        "seconds_per_phase": secs,
        "raw_keygen_sign_per_sec_one_core": raw1,
        "raw_keygen_sign_per_sec": raw,
        "x509_svids_per_sec": x509.rate,
        "x509_ratio_to_raw": x509.rate / raw,
        "x509_p50_ms": x509.p50_us as f64 / 1000.0,
        "x509_p99_ms": x509.p99_us as f64 / 1000.0,
        "x509_errors": x509.errors,
        "x509_bare_grpc_per_sec": x509_raw.rate,
        "x509_bare_grpc_p99_ms": x509_raw.p99_us as f64 / 1000.0,
        "jwt_svids_per_sec": jwt.rate,
        "jwt_p50_ms": jwt.p50_us as f64 / 1000.0,
        "jwt_p99_ms": jwt.p99_us as f64 / 1000.0,
        "jwt_errors": jwt.errors,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("issuance.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
