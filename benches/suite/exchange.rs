//! Token exchange phases: RFC 8693 exchanges per second, and latency at half load, against
//! the real daemon with a real OIDC issuer (loopback JWKS), Cedar policy and durable leases.
//!
//! (1) HTTP token endpoint, each client on its own keep-alive connection, actor token = the
//! agent's JWT-SVID; (2) gRPC `tessera.v1.Tasks` on the Workload API socket (attested caller);
//! (3) HTTP again, paced at half the rate (1) reached. Every client starts a new task every 10
//! exchanges, for a new user: each task's subject token is a fresh ES256 ID token, so the
//! daemon verifies a subject token's signature once per task, as it would for many users
//! (its cache of verified tokens would otherwise answer for the whole run).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera::proto::tessera::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Load, Opts, Outcome, Report, Target, drive, grpc_outcome};
use crate::common;

const TT_ID: &str = "urn:ietf:params:oauth:token-type:id_token";
/// The listener's refusal of request bodies beyond its budget (`api::http`), the one 503
/// that is shedding.
const SHED: &[u8] = b"too many request bodies at once";
/// What a 200 from `/token` must hold to count: a JWS in `access_token`.
const TOKEN_FIELD: &[u8] = b"\"access_token\":\"ey";

/// A keep-alive HTTP/1.1 connection that posts forms and reads `Content-Length` bodies:
/// as little client work as possible, since the load generator shares the daemon's cores.
struct Conn {
    r: BufReader<tokio::net::TcpStream>,
    line: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            r: BufReader::new(s),
            line: String::new(),
        })
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

/// One HTTP client: its connection (reopened after an error) and the body of its current task.
struct HttpClient {
    conn: Option<Conn>,
    body: Vec<u8>,
}

/// A fresh ID token of a user of its own for client `c`'s task `task`.
fn subject_token(idp: &Idp, tag: &str, c: usize, task: u64) -> String {
    idp.ec_token(&format!("{tag}-user-{c}-{task}"))
}

type Idp = common::idp::Idp;

async fn drive_http(
    addr: SocketAddr,
    idp: &Arc<Idp>,
    actor: &str,
    clients: usize,
    secs: f64,
    pace: Option<Duration>,
    tag: &str,
) -> Load {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(HttpClient {
            conn: Conn::open(addr).await.ok(),
            body: Vec::new(),
        });
    }
    let (actor, tag) = (actor.to_owned(), tag.to_owned());
    let idp = Arc::clone(idp);
    drive(
        &format!("exchange {tag}"),
        conns,
        secs,
        pace,
        move |mut h, c, i| {
            let (idp, actor, tag) = (Arc::clone(&idp), actor.clone(), tag.clone());
            async move {
                // The body changes only with the task: encode it once per task, so the load
                // generator spends its share of the two cores on requests.
                if i % 10 == 0 {
                    let task = format!("{tag}-{c}-{}", i / 10);
                    let subject = subject_token(&idp, &tag, c, i / 10);
                    h.body = common::form(&[
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
                let conn = match h.conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::open(addr).await {
                        Ok(c) => h.conn.insert(c),
                        Err(_) => return (h, Outcome::Err),
                    },
                };
                let outcome = match conn.post("/token", &h.body).await {
                    Ok((200, b)) if b.windows(TOKEN_FIELD.len()).any(|w| w == TOKEN_FIELD) => {
                        Outcome::Ok
                    }
                    // Only the listener's deliberate refusal is shedding; a 503 because the
                    // store, the CA or the issuer's keys failed is an error.
                    Ok((503, b)) if b.windows(SHED.len()).any(|w| w == SHED) => Outcome::Shed,
                    Ok(_) => Outcome::Err,
                    Err(_) => {
                        h.conn = None;
                        Outcome::Err
                    }
                };
                (h, outcome)
            }
        },
    )
    .await
}

async fn drive_grpc(d: &common::Daemon, idp: &Arc<Idp>, clients: usize, secs: f64) -> Load {
    let mut pool = Vec::new();
    for _ in 0..clients.div_ceil(4) {
        pool.push(tessera::api::workload::tasks_client(
            common::channel(&d.socket).await,
        ));
    }
    // Each client with its current task's subject token.
    let all: Vec<_> = (0..clients)
        .map(|i| (pool[i % pool.len()].clone(), String::new()))
        .collect();
    let idp = Arc::clone(idp);
    drive(
        "exchange grpc",
        all,
        secs,
        None,
        move |(mut client, mut subject), c, i| {
            // One token per task, as over HTTP: signed once per 10 requests.
            if i % 10 == 0 {
                subject = subject_token(&idp, "grpc", c, i / 10);
            }
            async move {
                let req = pb::ExchangeRequest {
                    subject_token: subject.clone(),
                    subject_token_type: TT_ID.into(),
                    audience: "https://tickets.example".into(),
                    scopes: vec!["tickets:read".into()],
                    task_id: format!("grpc-{c}-{}", i / 10),
                    ..Default::default()
                };
                let outcome = match client.exchange(req).await {
                    Ok(r) if !r.get_ref().access_token.is_empty() => Outcome::Ok,
                    Ok(_) => Outcome::Err,
                    Err(s) => grpc_outcome(&s),
                };
                ((client, subject), outcome)
            }
        },
    )
    .await
}

pub async fn run(o: &Opts, r: &mut Report) {
    let idp = Arc::new(common::idp::Idp::start().await);
    let dir = common::open_tempdir();
    let policy = dir.path().join("policy.cedar");
    // Read as a trusted file: its mode must not depend on the umask.
    common::write_fixture(
        &policy,
        r#"@id("bench")
permit(principal, action == Tessera::Action::"exchange", resource == Tessera::Audience::"https://tickets.example")
when { context.scope == "tickets:read" && context.subject has email && context.subject.email like "*@example.com" };
@id("never-delete")
forbid(principal, action, resource) when { context.scope == "tickets:delete" };"#,
    );
    let d = common::Daemon::start_in(
        dir,
        &format!(
            "log.level = \"info\"\npolicy.file = {policy:?}\n[[oidc_issuers]]\nissuer = {:?}\naudiences = [\"tessera\"]\n{}",
            idp.issuer,
            common::entry_for_uid("agents/bench", common::my_uid(), "owner = \"platform\"")
        ),
    );
    let issuer = format!("http://{}", d.http);
    let actor = d
        .client()
        .await
        .fetch_jwt_svid([issuer.as_str()], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    // Warm up (first key fetch, policy, connections).
    drive_http(d.http, &idp, &actor, 4, 0.5, None, "warm").await;

    let c = o.clients.min(32);
    eprintln!("[exchange] HTTP token endpoint, {c} clients (actor token = JWT-SVID) ...");
    let http = drive_http(d.http, &idp, &actor, c, o.secs, None, "http").await;
    eprintln!("[exchange] gRPC tessera.v1.Tasks/Exchange (attested caller) ...");
    let grpc = drive_grpc(&d, &idp, c, o.secs).await;
    let half_rate = http.rate / 2.0;
    eprintln!("[exchange] HTTP at half load ({half_rate:.0}/s) ...");
    let pace = Duration::from_secs_f64(c as f64 / half_rate.max(1.0));
    let half = drive_http(d.http, &idp, &actor, c, o.secs, Some(pace), "half").await;
    drop(d);

    r.figure(
        "exchange_http_per_sec",
        "RFC 8693 exchanges, HTTP",
        http.rate,
        "/s",
        Target::AtLeast(8_000.0),
    );
    r.figure(
        "exchange_grpc_per_sec",
        "RFC 8693 exchanges, gRPC Tasks",
        grpc.rate,
        "/s",
        Target::None,
    );
    r.figure(
        "exchange_half_load_p50_ms",
        "exchanges at half load, p50",
        half.p50_ms,
        "ms",
        Target::None,
    );
    r.figure(
        "exchange_half_load_p99_ms",
        "exchanges at half load, p99",
        half.p99_ms,
        "ms",
        Target::Below(2.0),
    );
    r.detail(
        "exchange",
        serde_json::json!({
            "clients": c, "seconds_per_phase": o.secs,
            "http": http.json(), "grpc": grpc.json(), "half_load": half.json(),
            "half_load_target_per_sec": half_rate,
        }),
    );
}
