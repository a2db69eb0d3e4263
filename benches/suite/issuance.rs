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

use super::{Load, Opts, Outcome, Report, Target, drive, grpc_outcome, workload_req};
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

/// Which SVID a load phase asks for.
#[derive(Clone, Copy)]
enum Svid {
    X509,
    Jwt,
}

async fn spiffe_load(
    d: &common::Daemon,
    svid: Svid,
    label: &str,
    clients: usize,
    secs: f64,
    pace: Option<Duration>,
) -> Load {
    drive(
        label,
        spiffe_clients(d, clients).await,
        secs,
        pace,
        move |c, _, _| async move {
            let ok = match svid {
                Svid::X509 => c.fetch_x509_svid().await.is_ok(),
                Svid::Jwt => c.fetch_jwt_svid(["bench"], None).await.is_ok(),
            };
            (c, if ok { Outcome::Ok } else { Outcome::Err })
        },
    )
    .await
}

async fn x509_bare(d: &common::Daemon, label: &str, clients: usize, secs: f64) -> Load {
    drive(
        label,
        bare_clients(d, clients).await,
        secs,
        None,
        |mut c, _, _| async move {
            let outcome = match c.fetch_x509svid(workload_req(pb::X509svidRequest {})).await {
                Ok(s) => match s.into_inner().message().await {
                    Ok(Some(m)) if !m.svids.is_empty() => Outcome::Ok,
                    Ok(_) => Outcome::Err,
                    Err(s) => grpc_outcome(&s),
                },
                Err(s) => grpc_outcome(&s),
            };
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
        "raw keygen+sign, all cores (the limit)",
        raw,
        "/s",
        Target::None,
    );

    let d = common::Daemon::start(&format!(
        "log.level = \"info\"\n{}",
        common::entry_for_uid("bench", common::my_uid(), "")
    ));
    let c = o.clients;
    eprintln!("[issuance] fresh X.509-SVIDs, spiffe client, {c} clients ...");
    let x509 = spiffe_load(&d, Svid::X509, "x509", c, secs, None).await;
    eprintln!("[issuance] fresh X.509-SVIDs, bare gRPC client ...");
    let bare = x509_bare(&d, "x509 bare", c, secs).await;
    eprintln!("[issuance] JWT-SVIDs, spiffe client ...");
    let jwt = spiffe_load(&d, Svid::Jwt, "jwt", c, secs, None).await;
    eprintln!(
        "[issuance] X.509-SVIDs at half load ({:.0}/s) ...",
        x509.rate / 2.0
    );
    let x509_half = spiffe_load(
        &d,
        Svid::X509,
        "x509 half",
        c,
        secs,
        Some(pace_for(x509.rate / 2.0, c)),
    )
    .await;
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
    )
    .await;
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
    for (key, name, load) in [("x509", "X.509", &x509_half), ("jwt", "JWT", &jwt_half)] {
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
    }
    r.figure(
        "overload_error_ratio",
        &format!("overload ({over_clients} clients), errors other than shedding"),
        over.error_ratio(),
        "ratio",
        Target::Below(0.001),
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
        "  refused by the per-uid limits (ResourceExhausted)",
        over.shed as f64 / all,
        "ratio",
        Target::None,
    );
    r.detail(
        "issuance",
        serde_json::json!({
            "cores": cores, "clients": c, "seconds_per_phase": secs,
            "x509": x509.json(), "x509_bare": bare.json(), "jwt": jwt.json(),
            "x509_half_load": x509_half.json(), "jwt_half_load": jwt_half.json(),
            "overload": over.json(), "overload_clients": over_clients,
        }),
    );
    Figures { x509: x509.rate }
}
