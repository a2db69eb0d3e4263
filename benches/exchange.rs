//! Token exchange benchmark: RFC 8693 exchanges per second, and latency at half load, against
//! the real daemon with a real OIDC issuer (loopback JWKS), Cedar policy and durable leases.
//!
//! Phases: (1) HTTP token endpoint, each client on its own keep-alive connection, actor token
//! = the agent's JWT-SVID; (2) gRPC `tessera.v1.Tasks` on the Workload API socket (attested
//! caller); (3) HTTP again, paced at half the rate phase 1 reached, for p50/p99.
//! Every client starts a new task every 10 exchanges.
//!
//! `cargo bench --bench exchange` (env: `TESSERA_BENCH_SECS`, default 5 per phase;
//! `TESSERA_BENCH_CLIENTS`, default 32). Prints a table and writes
//! `target/bench/exchange.json`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera::proto::tessera::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const TT_ID: &str = "urn:ietf:params:oauth:token-type:id_token";

/// A keep-alive HTTP/1.1 connection that posts forms and reads `Content-Length` bodies:
/// as little client work as possible, since the load generator shares the daemon's cores.
struct Conn {
    r: BufReader<tokio::net::TcpStream>,
    line: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Self {
            r: BufReader::new(s),
            line: String::new(),
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.r.get_mut().write_all(&req).await?;
        let mut status = 0;
        let mut len = 0usize;
        loop {
            self.line.clear();
            if self.r.read_line(&mut self.line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            } else if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

struct Load {
    rate: f64,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
    n: usize,
}

fn summarize(mut all: Vec<u64>, errors: u64, elapsed: f64) -> Load {
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
        n: all.len(),
    }
}

/// HTTP exchanges from `clients` connections for `secs`. With `pace`, each client sends one
/// request per `pace` (open loop), else as fast as responses come back.
async fn drive_http(
    addr: SocketAddr,
    subject: &str,
    actor: &str,
    clients: usize,
    secs: f64,
    pace: Option<Duration>,
    tag: &str,
) -> Load {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (subject, actor, tag) = (subject.to_owned(), actor.to_owned(), tag.to_owned());
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let (mut lat, mut errors, mut i) = (Vec::with_capacity(8192), 0u64, 0u64);
                let mut body = Vec::new();
                let mut next =
                    Instant::now() + pace.unwrap_or_default() * c as u32 / clients as u32;
                while Instant::now() < deadline {
                    if let Some(p) = pace {
                        tokio::time::sleep_until(next.into()).await;
                        next += p;
                    }
                    // The body changes only with the task: encode it once per task, so the
                    // load generator spends its share of the two cores on requests.
                    if i % 10 == 0 {
                        let task = format!("{tag}-{c}-{}", i / 10);
                        body = common::form(&[
                            (
                                "grant_type",
                                "urn:ietf:params:oauth:grant-type:token-exchange",
                            ),
                            ("subject_token", &subject),
                            ("subject_token_type", TT_ID),
                            ("actor_token", &actor),
                            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                            ("audience", "https://tickets.example"),
                            ("scope", "tickets:read"),
                            ("task_id", &task),
                        ]);
                    }
                    i += 1;
                    let t = Instant::now();
                    match conn.post("/token", &body).await {
                        Ok((200, _)) => lat.push(t.elapsed().as_micros() as u64),
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            conn = Conn::open(addr).await;
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    summarize(all, errors, start.elapsed().as_secs_f64())
}

async fn drive_grpc(d: &common::Daemon, subject: &str, clients: usize, secs: f64) -> Load {
    let conns = clients.div_ceil(4);
    let mut pool = Vec::new();
    for _ in 0..conns {
        pool.push(pb::tasks_client::TasksClient::new(
            common::channel(&d.socket).await,
        ));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut client = pool[c % conns].clone();
            let subject = subject.to_owned();
            tokio::spawn(async move {
                let (mut lat, mut errors, mut i) = (Vec::with_capacity(8192), 0u64, 0u64);
                while Instant::now() < deadline {
                    let req = pb::ExchangeRequest {
                        subject_token: subject.clone(),
                        subject_token_type: TT_ID.into(),
                        audience: "https://tickets.example".into(),
                        scopes: vec!["tickets:read".into()],
                        task_id: format!("grpc-{c}-{}", i / 10),
                        ..Default::default()
                    };
                    i += 1;
                    let t = Instant::now();
                    match client.exchange(req).await {
                        Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    summarize(all, errors, start.elapsed().as_secs_f64())
}

fn main() {
    let secs = common::env_num("TESSERA_BENCH_SECS", 5) as f64;
    let clients = common::env_num("TESSERA_BENCH_CLIENTS", 32) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("exchange benchmark: {cores} cores, {clients} concurrent clients, {secs}s per phase");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (http, grpc, half, half_rate) = rt.block_on(async {
        let idp = common::idp::Idp::start().await;
        let dir = common::open_tempdir();
        let policy = dir.path().join("policy.cedar");
        std::fs::write(
            &policy,
            r#"@id("bench")
permit(principal, action == Tessera::Action::"exchange", resource == Tessera::Audience::"https://tickets.example")
when { context.scope == "tickets:read" && context.subject has email && context.subject.email like "*@example.com" };
@id("never-delete")
forbid(principal, action, resource) when { context.scope == "tickets:delete" };"#,
        )
        .unwrap();
        let d = common::Daemon::start_in(
            dir,
            &format!(
                "log.level = \"info\"\npolicy.file = {policy:?}\n[[oidc_issuers]]\nissuer = {:?}\naudiences = [\"tessera\"]\n{}",
                idp.issuer,
                common::entry_for_uid("agents/bench", common::my_uid(), "owner = \"platform\"")
            ),
        );
        let issuer = format!("http://{}", d.http);
        let client = d.client().await;
        let actor = client
            .fetch_jwt_svid([issuer.as_str()], None)
            .await
            .unwrap()
            .token()
            .to_owned();
        // The subject's token lives for 10 minutes, long enough for every phase.
        let subject = idp.token("bench-user");
        // Warm up (first key fetch, policy, connections).
        drive_http(d.http, &subject, &actor, 4, 0.5, None, "warm").await;

        eprintln!("[1/3] HTTP token endpoint (actor token = JWT-SVID) ...");
        let http = drive_http(d.http, &subject, &actor, clients, secs, None, "http").await;
        eprintln!("[2/3] gRPC tessera.v1.Tasks/Exchange (attested caller) ...");
        let grpc = drive_grpc(&d, &subject, clients, secs).await;
        let half_rate = http.rate / 2.0;
        eprintln!("[3/3] HTTP at half load ({half_rate:.0}/s) ...");
        let pace = Duration::from_secs_f64(clients as f64 / half_rate.max(1.0));
        let half = drive_http(d.http, &subject, &actor, clients, secs, Some(pace), "half").await;
        drop(d);
        (http, grpc, half, half_rate)
    });

    println!();
    println!(
        "{:<48} {:>12} {:>9} {:>9} {:>8}",
        "measure", "per second", "p50 ms", "p99 ms", "errors"
    );
    for (name, l) in [
        ("RFC 8693 exchanges, HTTP (max)", &http),
        ("RFC 8693 exchanges, gRPC Tasks (max)", &grpc),
        ("RFC 8693 exchanges, HTTP at half load", &half),
    ] {
        println!(
            "{:<48} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            name,
            l.rate,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.errors
        );
    }
    let report = json!({
        "cores": cores,
        "clients": clients,
        "seconds_per_phase": secs,
        "http_exchanges_per_sec": http.rate,
        "http_p50_ms": http.p50_us as f64 / 1000.0,
        "http_p99_ms": http.p99_us as f64 / 1000.0,
        "http_errors": http.errors,
        "http_exchanges": http.n,
        "grpc_exchanges_per_sec": grpc.rate,
        "grpc_p50_ms": grpc.p50_us as f64 / 1000.0,
        "grpc_p99_ms": grpc.p99_us as f64 / 1000.0,
        "grpc_errors": grpc.errors,
        "half_load_target_per_sec": half_rate,
        "half_load_per_sec": half.rate,
        "half_load_p50_ms": half.p50_us as f64 / 1000.0,
        "half_load_p99_ms": half.p99_us as f64 / 1000.0,
        "half_load_errors": half.errors,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("exchange.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
