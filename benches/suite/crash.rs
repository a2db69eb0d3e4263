//! Crash test: under load, `kill -9` the daemon again and again; after each restart every
//! credential a client received must be in the lease store, every revocation the operator saw
//! acknowledged must still be revoked, the kill must still hold (listed, and no SVID of the
//! killed identity handed out in any round), and every acknowledged task completion too.
//!
//! Clients keep a ledger of what they received (JWT-SVID `jti`s, X.509-SVID serials, task
//! lease ids) and of acknowledged revocations, kills and completions; nothing counts until
//! the client has the full response. Besides the kill made before the first round, the
//! operator kills an identity every few tens of milliseconds under the load, so kills
//! acknowledged just before a crash are checked as well: every other kill is of one of the
//! round's victims, each holding a JWT-SVID fetched before the load, whose leases must come
//! back revoked; the others of fresh identities. One operator revocation in twelve, up to four
//! a round, is of an X.509-SVID (of identities given one through a copy of the CLI before each
//! round): it must come back revoked and on the CRL `/crl` serves. More clients (4 unless
//! `--crash-task-clients` says otherwise) run tasks over `tessera.v1.Tasks`: three RFC 8693
//! exchanges each (the first also for a task X.509-SVID), then `Complete`. A completed task's
//! leases must come back revoked; after the next restart its X.509-SVID must be on the CRL
//! and the task refused another credential, and the last task of each round is asked again
//! after every later restart. Each lost record counts once, however many rounds find it
//! missing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera::proto::tessera::v1 as apb;
use tessera::proto::workload as wpb;

use super::{Report, Target, workload_req as req};
use crate::common;

#[derive(Default)]
struct Ledger {
    jtis: Vec<String>,
    serials: Vec<String>,
    /// JWT-SVID leases whose revocation was acknowledged.
    revoked: Vec<String>,
    /// This round's X.509-SVID leases not revoked yet, as lease id and serial.
    x509_targets: Vec<(String, String)>,
    /// X.509-SVID leases whose revocation was acknowledged: lease id and serial.
    revoked_x509: Vec<(String, String)>,
    /// Identities killed under load, acknowledged.
    kills: Vec<String>,
    /// This round's victims not killed yet: identity and the `jti` of the JWT-SVID it holds.
    victims: Vec<(String, String)>,
    /// Leases (`jti`s) of every victim.
    victim_jtis: Vec<String>,
    /// Leases (`jti`s) of victims whose kill was acknowledged: each must come back revoked.
    killed_leases: Vec<String>,
    /// Victims whose acknowledged kill said it revoked nothing although they held a lease.
    kills_revoking_nothing: usize,
    /// SVIDs received for the killed identity: each one is a kill not in force.
    served_killed: usize,
    /// Credentials whose `jti`, serial or lease id could not be read, and task X.509-SVIDs
    /// asked for and not given: they cannot be looked up, so they count as lost rather than
    /// drop out of the check.
    unreadable: usize,
    /// Task credentials received (task tokens and task X.509-SVIDs), by lease id.
    task_leases: Vec<String>,
    /// Tasks whose completion was acknowledged: each lease must come back revoked, the task
    /// X.509-SVID listed on the CRL, and the task refused another credential.
    completed: Vec<Completed>,
    /// This round's first answer to a task client that was neither a credential nor the
    /// daemon going away: the reason when a round completes no task.
    task_error: Option<String>,
}

/// A task whose completion was acknowledged.
struct Completed {
    task: String,
    /// The leases the client received for it.
    leases: Vec<String>,
    /// Its task X.509-SVID's serial.
    serial: String,
    /// How many leases the completion said it revoked.
    revoked: u32,
}

const KILLED: &str = "spiffe://tessera.internal/crash/killed";
/// The identity the load runs as, and whose tasks it exchanges tokens for.
const AGENT: &str = "spiffe://tessera.internal/crash/agent";
/// What the task clients ask for, and the only thing the policy permits.
const TASK_AUDIENCE: &str = "https://tickets.example";
const TASK_SCOPE: &str = "tickets:read";
/// Exchanges per task before it is completed; the first also mints a task X.509-SVID.
const EXCHANGES_PER_TASK: u64 = 3;
/// Each task client's pause before a task. A completion holds the issuance barrier for a
/// commit of its own and has the CRL signed again: unpaced, four clients completed several
/// hundred tasks a second, far more often than the operator revokes (every 5 ms).
const TASK_PAUSE: Duration = Duration::from_millis(20);

impl Ledger {
    fn received(&mut self, spiffe_id: &str, id: Option<String>, x509: bool) {
        self.served_killed += usize::from(spiffe_id == KILLED);
        match (id, x509) {
            (Some(id), false) => self.jtis.push(id),
            (Some(id), true) => self.serials.push(id),
            (None, _) => self.unreadable += 1,
        }
    }
}

fn serial_hex(cert_der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(common::serial_key(c.raw_serial()))
}

fn jti(token: &str) -> Option<String> {
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1)?)
            .ok()?,
    )
    .ok()?;
    claims["jti"].as_str().map(str::to_owned)
}

/// Drives load until the daemon dies: JWT-SVIDs and X.509-SVIDs from `clients` tasks, task
/// credentials from `task_clients` more, an operator revoking a received SVID every few
/// milliseconds, and one killing an identity every few tens of milliseconds.
async fn load_until_crash(
    d: &common::Daemon,
    idp: &Arc<common::idp::Idp>,
    (clients, task_clients): (usize, usize),
    round: u64,
    ledger: Arc<Mutex<Ledger>>,
) {
    use wpb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let mut tasks = Vec::new();
    for i in 0..clients {
        // One connection per client, as separate workloads would have.
        let mut c = SpiffeWorkloadApiClient::new(common::channel(&d.socket).await);
        let ledger = Arc::clone(&ledger);
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            while failures < 3 {
                let ok = if i % 2 == 0 {
                    // A request to a dead daemon may wait on reconnection forever; bound it.
                    match tokio::time::timeout(
                        Duration::from_secs(2),
                        c.fetch_jwtsvid(req(wpb::JwtsvidRequest {
                            audience: vec!["crash".into()],
                            spiffe_id: String::new(),
                        })),
                    )
                    .await
                    {
                        Ok(Ok(r)) => {
                            let mut l = ledger.lock().unwrap();
                            for s in r.into_inner().svids {
                                l.received(&s.spiffe_id, jti(&s.svid), false);
                            }
                            true
                        }
                        _ => false,
                    }
                } else {
                    let first = async {
                        let s = c.fetch_x509svid(req(wpb::X509svidRequest {})).await?;
                        s.into_inner().message().await
                    };
                    match tokio::time::timeout(Duration::from_secs(2), first).await {
                        Ok(Ok(Some(m))) => {
                            let mut l = ledger.lock().unwrap();
                            for s in m.svids {
                                l.received(&s.spiffe_id, serial_hex(&s.x509_svid), true);
                            }
                            true
                        }
                        _ => false,
                    }
                };
                if ok {
                    failures = 0;
                } else {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for i in 0..task_clients {
        let c = tessera::api::workload::tasks_client(common::channel(&d.socket).await);
        tasks.push(tokio::spawn(run_tasks(
            c,
            Arc::clone(idp),
            format!("r{round}-c{i}"),
            Arc::clone(&ledger),
        )));
    }
    let mut admin = apb::admin_client::AdminClient::new(common::channel(&d.admin_socket).await);
    let revoker_ledger = Arc::clone(&ledger);
    tasks.push(tokio::spawn(async move {
        let (mut failures, mut n) = (0, 0u64);
        while failures < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            // One revocation in twelve (about one every 100 ms) is of one of the round's
            // X.509-SVIDs while any is left, so that some land close to the crash.
            let (pick, serial) = {
                let l = revoker_ledger.lock().unwrap();
                match l.x509_targets.last() {
                    Some((id, serial)) if n % 12 == 0 => (Some(id.clone()), Some(serial.clone())),
                    _ => (l.jtis.get(l.jtis.len().saturating_sub(3)).cloned(), None),
                }
            };
            n += 1;
            let Some(id) = pick else { continue };
            let revoke = admin.revoke_lease(apb::RevokeLeaseRequest {
                id: id.clone(),
                reason: "crash test".into(),
            });
            let outcome = tokio::time::timeout(Duration::from_secs(2), revoke).await;
            let mut l = revoker_ledger.lock().unwrap();
            if serial.is_some() {
                // Not asked again whatever the outcome: a revocation that timed out may have
                // committed, and asked again it would be refused as already revoked.
                l.x509_targets.pop();
            }
            match (outcome, serial) {
                (Ok(Ok(_)), Some(serial)) => {
                    failures = 0;
                    l.revoked_x509.push((id, serial));
                }
                (Ok(Ok(_)), None) => {
                    failures = 0;
                    l.revoked.push(id);
                }
                (Ok(Err(s)), _) if s.code() == tonic::Code::FailedPrecondition => {}
                _ => failures += 1,
            }
        }
    }));
    let mut admin = apb::admin_client::AdminClient::new(common::channel(&d.admin_socket).await);
    let killer_ledger = Arc::clone(&ledger);
    tasks.push(tokio::spawn(async move {
        let (mut failures, mut n) = (0, 0u64);
        while failures < 3 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            // Every other kill is of one of the round's victims (they hold leases) while any
            // is left, so that some are acknowledged just before the crash; the rest are of
            // fresh identities.
            let victim = if n % 2 == 0 {
                killer_ledger.lock().unwrap().victims.last().cloned()
            } else {
                None
            };
            n += 1;
            let id = match &victim {
                Some((id, _)) => id.clone(),
                None => format!("{GONE}/{round}-{}", n - 1),
            };
            let kill = admin.kill_identity(apb::KillIdentityRequest {
                spiffe_id: id.clone(),
                reason: "crash test".into(),
            });
            match tokio::time::timeout(Duration::from_secs(2), kill).await {
                Ok(Ok(r)) => {
                    failures = 0;
                    let mut l = killer_ledger.lock().unwrap();
                    l.kills.push(id);
                    if let Some((_, jti)) = victim {
                        l.victims.pop();
                        l.kills_revoking_nothing += usize::from(r.into_inner().revoked == 0);
                        l.killed_leases.push(jti);
                    }
                }
                _ => {
                    failures += 1;
                    // Not the same victim again: a kill that timed out may have committed, and
                    // asked again it would revoke nothing, a false loss (review BE-3).
                    if victim.is_some() {
                        killer_ledger.lock().unwrap().victims.pop();
                    }
                }
            }
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

/// An exchange for a token of `task`, with a fresh subject token of a user of the task's own.
fn task_exchange(idp: &common::idp::Idp, task: &str) -> apb::ExchangeRequest {
    apb::ExchangeRequest {
        subject_token: idp.ec_token(&format!("crash-user-{task}")),
        subject_token_type: tessera::exchange::TOKEN_TYPE_ID_TOKEN.into(),
        audience: TASK_AUDIENCE.into(),
        scopes: vec![TASK_SCOPE.into()],
        task_id: task.to_owned(),
        spiffe_id: AGENT.into(),
        ..Default::default()
    }
}

/// Notes the round's first answer to a task client that is neither a credential nor the
/// daemon going away, so that a misconfigured task load says why it did nothing. The crash
/// cuts requests off as `Unavailable`, `Cancelled` or `Unknown` "transport error", and a
/// timeout is no answer at all.
fn note_task_error(ledger: &Mutex<Ledger>, what: &str, s: &tonic::Status) {
    let cut_off = matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
        || (s.code() == tonic::Code::Unknown && s.message().contains("transport error"));
    if !cut_off {
        let mut l = ledger.lock().unwrap();
        l.task_error
            .get_or_insert_with(|| format!("{what}: {:?}: {}", s.code(), s.message()));
    }
}

/// One agent's tasks until the daemon dies: for each, `EXCHANGES_PER_TASK` exchanges with a
/// subject token of the task's own (the first also for a task X.509-SVID), then
/// `Tasks.Complete`. A task whose exchange failed is not completed: the failure almost always
/// means the daemon has died, and the round is ending.
async fn run_tasks(
    mut c: tessera::api::workload::TasksClient,
    idp: Arc<common::idp::Idp>,
    prefix: String,
    ledger: Arc<Mutex<Ledger>>,
) {
    let (mut failures, mut n) = (0, 0u64);
    'tasks: while failures < 3 {
        tokio::time::sleep(TASK_PAUSE).await;
        let task = format!("{prefix}-t{n}");
        n += 1;
        let first = task_exchange(&idp, &task);
        let (mut leases, mut serial) = (Vec::new(), None);
        for k in 0..EXCHANGES_PER_TASK {
            let req = apb::ExchangeRequest {
                x509_svid: k == 0,
                ..first.clone()
            };
            let r = match tokio::time::timeout(Duration::from_secs(2), c.exchange(req)).await {
                Ok(Ok(r)) => r.into_inner(),
                outcome => {
                    if let Ok(Err(s)) = &outcome {
                        note_task_error(&ledger, "task exchange", s);
                    }
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue 'tasks;
                }
            };
            failures = 0;
            let mut l = ledger.lock().unwrap();
            if k == 0 {
                serial = r.x509_svid.as_ref().and_then(|x| serial_hex(&x.x509_svid));
                // Asked for and not given, or unreadable: it cannot be checked.
                l.unreadable += usize::from(serial.is_none());
            }
            for id in std::iter::once(r.lease_id).chain(r.x509_svid.map(|x| x.lease_id)) {
                if id.is_empty() {
                    l.unreadable += 1;
                } else {
                    l.task_leases.push(id.clone());
                    leases.push(id);
                }
            }
        }
        let complete = c.complete(apb::CompleteRequest {
            task_id: task.clone(),
            spiffe_id: AGENT.into(),
        });
        match tokio::time::timeout(Duration::from_secs(2), complete).await {
            Ok(Ok(r)) => {
                failures = 0;
                let revoked = r.into_inner().revoked;
                let mut l = ledger.lock().unwrap();
                l.completed.push(Completed {
                    task,
                    leases,
                    serial: serial.unwrap_or_default(),
                    revoked,
                });
            }
            outcome => {
                if let Ok(Err(s)) = &outcome {
                    note_task_error(&ledger, "task completion", s);
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// What the daemon answered an exchange for a task whose completion was acknowledged.
enum AfterCompletion {
    /// Refused as complete, as it must be.
    Refused,
    /// Served, or refused for another reason: either way the check of the completion failed.
    Wrong(String),
}

/// Asks the daemon for another credential of completed `task`. `Unavailable` and silence
/// (the restarted daemon still fetching the issuer's keys, which it retries after 30 s at
/// most) are asked again until `deadline`, shared by the round's checks so that a wedged
/// daemon ends the test instead of stalling it task by task.
async fn after_completion(
    c: &mut tessera::api::workload::TasksClient,
    idp: &common::idp::Idp,
    task: &str,
    deadline: Instant,
) -> Result<AfterCompletion, String> {
    // One subject token for every try: signing it is the generator's work, not the check's.
    let req = task_exchange(idp, task);
    loop {
        let exchange = c.exchange(req.clone());
        let last = match tokio::time::timeout(Duration::from_secs(2), exchange).await {
            Ok(Ok(_)) => return Ok(AfterCompletion::Wrong("served".into())),
            Ok(Err(s))
                if s.code() == tonic::Code::InvalidArgument
                    && s.message().contains("is complete") =>
            {
                return Ok(AfterCompletion::Refused);
            }
            Ok(Err(s)) if s.code() != tonic::Code::Unavailable => {
                return Ok(AfterCompletion::Wrong(format!("{s:?}")));
            }
            Ok(Err(s)) => format!("{s:?}"),
            Err(_) => "no answer in 2 s".into(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "exchange for completed task {task}: the daemon did not answer it within the \
                 round's {}s of checks: {last}",
                CHECK_BUDGET.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long one round's completion checks may take in all.
const CHECK_BUDGET: Duration = Duration::from_secs(60);

/// Where the identities killed under load live.
const GONE: &str = "spiffe://tessera.internal/crash/gone";

/// Every lease in the store, by id and serial.
async fn store_contents(d: &common::Daemon) -> (HashMap<String, String>, HashMap<String, String>) {
    let (mut by_id, mut by_serial) = (HashMap::new(), HashMap::new());
    for l in common::all_leases(&d.admin_socket).await {
        if !l.serial.is_empty() {
            by_serial.insert(l.serial.clone(), l.state.clone());
        }
        by_id.insert(l.id, l.state);
    }
    (by_id, by_serial)
}

/// Victims per round: identities that hold a lease when they are killed under load. Killed
/// every other 40 ms, eight last 640 ms, about as long as the longest round.
const VICTIMS_PER_ROUND: u64 = 8;

fn victim(round: u64, k: u64) -> String {
    format!("spiffe://tessera.internal/crash/victim/{round}-{k}")
}

/// X.509-SVIDs revoked under load per round, each of its own identity.
const X509_REVOCATIONS_PER_ROUND: u64 = 4;

/// Where a round's X.509-SVIDs to revoke live (`/<k>` beneath).
fn x509_target_root(round: u64) -> String {
    format!("spiffe://tessera.internal/crash/x509/{round}")
}

/// The load's identities, and `rounds` rounds of victims and of X.509-SVIDs to revoke. A
/// victim's entry also selects the `tessera` CLI's path, so the load (this binary) is never
/// served its SVIDs: only the CLI fetch before each round gives a victim its lease. The X.509
/// identities select a copy of the CLI at `x509_cli` instead, so that a victim holds only the
/// JWT-SVID its kill must revoke; they live a day, so that their serials stay on the CRL
/// through the longest run (15 minutes would take round 0's off it after about 16). The
/// policy at `policy` lets the agent exchange tokens of `issuer`'s users for its tasks.
fn config(
    rounds: u64,
    x509_cli: &std::path::Path,
    issuer: &str,
    policy: &std::path::Path,
) -> String {
    let uid = common::my_uid();
    let cli = common::tessera_bin();
    let mut c = format!(
        "log.level = \"info\"\npolicy.file = {policy:?}\n[[oidc_issuers]]\nissuer = {issuer:?}\n\
         audiences = [\"tessera\"]\n{}{}",
        common::entry_for_uid("crash/agent", uid, ""),
        common::entry_for_uid("crash/killed", uid, "")
    );
    let entry = |id: &str, path: &std::path::Path, extra: &str| {
        format!(
            "[[entries]]\nspiffe_id = \"{id}\"\nselectors = [\"unix:uid:{uid}\", \"unix:path:{}\"]\n{extra}",
            path.display()
        )
    };
    for round in 0..rounds {
        for k in 0..VICTIMS_PER_ROUND {
            c.push_str(&entry(&victim(round, k), &cli, ""));
        }
        for k in 0..X509_REVOCATIONS_PER_ROUND {
            let id = format!("{}/{k}", x509_target_root(round));
            c.push_str(&entry(&id, x509_cli, "x509_svid_ttl = \"24h\"\n"));
        }
    }
    c
}

/// A copy of the `tessera` CLI in `dir`, for the X.509 identities' entries to select.
fn copy_cli(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tessera-x509");
    std::fs::copy(common::tessera_bin(), &path).expect("a copy of the CLI");
    // Canonical, as the attestor reports an executable's path.
    std::fs::canonicalize(&path).unwrap()
}

/// X.509-SVIDs for `round`'s identities to revoke, fetched through the copy of the CLI (which
/// is served every round's: those of earlier rounds again, and later rounds' early); returns
/// this round's leases, as lease id and serial.
fn arm_x509_targets(
    d: &common::Daemon,
    x509_cli: &std::path::Path,
    round: u64,
) -> Vec<(String, String)> {
    let o = d.cli_as(x509_cli, &["svid", "x509", "--json"]);
    assert!(
        o.status.success(),
        "the CLI fetched no X.509-SVIDs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let root = x509_target_root(round);
    let o = d.cli(&[
        "--json",
        "lease",
        "list",
        "--spiffe-id",
        &root,
        "--prefix",
        "--kind",
        "x509-svid",
        "--state",
        "active",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let leases: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    // Each earlier round's fetch minted one for these identities as well: the latest of each
    // (leases are listed by issue time) is this round's.
    let latest: HashMap<&str, (String, String)> = leases
        .iter()
        .map(|l| {
            (
                l["spiffe_id"].as_str().unwrap(),
                (
                    l["id"].as_str().unwrap().to_owned(),
                    l["serial"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    let targets: Vec<(String, String)> = latest.into_values().collect();
    assert_eq!(
        targets.len() as u64,
        X509_REVOCATIONS_PER_ROUND,
        "one X.509-SVID for each of {root}'s identities: {leases:?}"
    );
    targets
}

/// The serials `/crl` lists.
fn crl_serials(d: &common::Daemon) -> std::collections::HashSet<String> {
    let (code, body) = common::http_get(d.http, "/crl");
    assert_eq!(code, 200, "/crl");
    let (_, crl) = x509_parser::parse_x509_crl(&body).expect("/crl is a DER CRL");
    crl.iter_revoked_certificates()
        .map(|r| common::serial_key(r.raw_serial()))
        .collect()
}

/// Gives each of `round`'s victims a JWT-SVID through the CLI; returns identity and `jti`.
fn arm_victims(d: &common::Daemon, round: u64) -> Vec<(String, String)> {
    (0..VICTIMS_PER_ROUND)
        .map(|k| {
            let id = victim(round, k);
            let o = d.cli(&["svid", "jwt", "--audience", "crash", "--spiffe-id", &id]);
            assert!(
                o.status.success(),
                "the CLI fetched no JWT-SVID for {id}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let jti = jti(&token).unwrap_or_else(|| panic!("no jti in {token:?}"));
            (id, jti)
        })
        .collect()
}

/// Fewest SVIDs per round for the crash test to show anything: with nothing received,
/// nothing can be found lost.
const MIN_SVIDS_PER_ROUND: u64 = 100;

/// Returns the number of lost records (leases, revocations, kills and completions), or an
/// error when the test saw too little to show anything.
pub async fn run(o: &super::Opts, r: &mut Report) -> Result<u64, String> {
    let rounds = o.crash_rounds;
    let clients = o.clients.min(16);
    let task_clients = o.crash_task_clients;
    eprintln!("[crash] {rounds} rounds of load + kill -9, {clients} clients ...");
    let report = async {
        // Under the build's own scratch directory: `/tmp` may be mounted noexec.
        let cli_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let x509_cli = copy_cli(cli_dir.path());
        let idp = Arc::new(common::idp::Idp::start().await);
        // A file the daemon trusts whatever the umask.
        let policy_dir = common::open_tempdir();
        let policy = policy_dir.path().join("policy.cedar");
        common::write_fixture(
            &policy,
            format!(
                "permit(principal, action == Tessera::Action::\"exchange\", \
                 resource == Tessera::Audience::\"{TASK_AUDIENCE}\")\n\
                 when {{ context.scope == \"{TASK_SCOPE}\" }};"
            ),
        );
        let cfg = config(rounds, &x509_cli, &idp.issuer, &policy);
        let mut d = common::Daemon::start(&cfg);
        // A kill before the first crash must hold through every restart.
        let o = d.cli(&["kill", KILLED, "--reason", "crash test"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        // Sets, so that a record found missing after several restarts counts once.
        let mut lost_leases = std::collections::HashSet::new();
        let mut lost_revocations = std::collections::HashSet::new();
        let mut lost_kills = std::collections::HashSet::new();
        let started = Instant::now();
        let mut lost_kill_revocations = std::collections::HashSet::new();
        // Rounds in which no lease holder's kill was acknowledged: they test nothing of it.
        let mut rounds_without_victims = 0u64;
        // Tasks whose completion lost any of its effects, counted once each.
        let mut lost_completions = std::collections::HashSet::new();
        // Rounds in which no task's completion was acknowledged, and the task clients' first
        // unexpected answer in the first of them.
        let mut rounds_without_completions = 0u64;
        let mut bare_round_error: Option<String> = None;
        // Rounds with fewer than `MIN_SVIDS_PER_ROUND` SVIDs received.
        let mut thin_rounds = 0u64;
        // Completion checks answered with neither a credential nor the refusal, and the
        // first such answer.
        let (mut wrong_refusals, mut first_wrong) = (0u64, None::<String>);
        // Completions of earlier rounds, already checked after their own restart.
        let mut completions_checked = 0;
        // The last completed task of each earlier round: asked again after every restart.
        let mut sentinels: Vec<String> = Vec::new();
        for round in 0..rounds {
            let armed = arm_victims(&d, round);
            let x509_targets = arm_x509_targets(&d, &x509_cli, round);
            let (victims_before, svids_before) = {
                let mut l = ledger.lock().unwrap();
                l.task_error = None;
                l.x509_targets = x509_targets;
                // Their leases must survive like any other received credential.
                l.victim_jtis.extend(armed.iter().map(|v| v.1.clone()));
                l.victims = armed;
                (l.killed_leases.len(), l.jtis.len() + l.serials.len())
            };
            let pid = d.pid();
            // Crash after a random 200–700 ms of load.
            let delay = 200 + (rand_u64() % 500);
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                // SAFETY: kill(2) on our child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            load_until_crash(
                &d,
                &idp,
                (clients, task_clients),
                round,
                Arc::clone(&ledger),
            )
            .await;
            killer.join().unwrap();
            d.wait_exit(Duration::from_secs(10));
            let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
            drop(d);
            d = common::Daemon::start_in(dir, &cfg);
            let (by_id, by_serial) = store_contents(&d).await;
            // An X.509-SVID's revocation holds only if relying parties learn of it: its lease
            // revoked, and its serial on the CRL (signed at start from the store; polled
            // briefly in case the first is still being signed).
            // So must this round's completed tasks' X.509-SVIDs (earlier rounds' may have left
            // the CRL: they live 5 minutes).
            let revoked_serials: Vec<String> = {
                let l = ledger.lock().unwrap();
                l.revoked_x509
                    .iter()
                    .map(|(_, s)| s.clone())
                    .chain(
                        l.completed[completions_checked..]
                            .iter()
                            .map(|c| c.serial.clone()),
                    )
                    // An X.509-SVID not received is counted as unreadable, not polled for.
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            let mut crl = crl_serials(&d);
            let deadline = Instant::now() + Duration::from_secs(3);
            while revoked_serials.iter().any(|s| !crl.contains(s)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                crl = crl_serials(&d);
            }
            // This round's completed tasks, and one of each earlier round, must still be
            // refused credentials. Asked before the ledger is locked: each is an exchange.
            let (this_round, last): (Vec<String>, Option<String>) = {
                let l = ledger.lock().unwrap();
                let new = &l.completed[completions_checked..];
                (
                    new.iter().map(|c| c.task.clone()).collect(),
                    new.last().map(|c| c.task.clone()),
                )
            };
            let mut tasks_client =
                tessera::api::workload::tasks_client(common::channel(&d.socket).await);
            let deadline = Instant::now() + CHECK_BUDGET;
            for task in this_round.iter().chain(&sentinels) {
                if let AfterCompletion::Wrong(answer) =
                    after_completion(&mut tasks_client, &idp, task, deadline).await?
                {
                    lost_completions.insert(task.clone());
                    wrong_refusals += 1;
                    first_wrong.get_or_insert(format!("{task}: {answer}"));
                }
            }
            if last.is_none() && task_clients > 0 {
                rounds_without_completions += 1;
                if bare_round_error.is_none() {
                    bare_round_error = ledger.lock().unwrap().task_error.clone();
                }
            }
            sentinels.extend(last);
            let l = ledger.lock().unwrap();
            let missing: Vec<&String> = l
                .jtis
                .iter()
                .filter(|j| !by_id.contains_key(*j))
                .chain(l.serials.iter().filter(|s| !by_serial.contains_key(*s)))
                .chain(l.victim_jtis.iter().filter(|j| !by_id.contains_key(*j)))
                .chain(l.task_leases.iter().filter(|j| !by_id.contains_key(*j)))
                .collect();
            // A killed victim's lease, present but not revoked: the kill lost its effect.
            let unkilled: Vec<&String> = l
                .killed_leases
                .iter()
                .filter(|j| by_id.get(*j).is_some_and(|s| s != "revoked"))
                .collect();
            let revoked = |id: &String| by_id.get(id).map(String::as_str) == Some("revoked");
            // One count per revocation: an X.509-SVID's is lost if either half is.
            let unrevoked: Vec<&String> = l
                .revoked
                .iter()
                .filter(|id| !revoked(id))
                .chain(
                    l.revoked_x509
                        .iter()
                        .filter(|(id, s)| !revoked(id) || !crl.contains(s))
                        .map(|(id, _)| id),
                )
                .collect();
            // A completion lost its effect if a lease it revoked is back (one missing is a
            // lost lease already), its count fell short of the leases received, or this
            // round's task X.509-SVID is off the CRL.
            let undone: Vec<&String> = l
                .completed
                .iter()
                .enumerate()
                .filter(|(i, c)| {
                    c.leases
                        .iter()
                        .any(|id| by_id.get(id).is_some_and(|s| s != "revoked"))
                        || (c.revoked as usize) < c.leases.len()
                        // (An X.509-SVID not received counts as unreadable.)
                        || (*i >= completions_checked
                            && !c.serial.is_empty()
                            && !crl.contains(&c.serial))
                })
                .map(|(_, c)| &c.task)
                .collect();
            completions_checked = l.completed.len();
            let killed = d.cli(&["--json", "killed"]);
            let listed: std::collections::HashSet<String> =
                serde_json::from_slice::<serde_json::Value>(&killed.stdout)
                    .ok()
                    .and_then(|v| {
                        v.as_array().map(|a| {
                            a.iter()
                                .filter_map(|k| k["spiffe_id"].as_str().map(str::to_owned))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
            let before_load = KILLED.to_owned();
            let unlisted: Vec<String> = l
                .kills
                .iter()
                .chain(std::iter::once(&before_load))
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect();
            lost_completions.extend(undone.into_iter().cloned());
            eprintln!(
                "round {:>3}: {} JWT + {} X.509 + {} task credentials received so far, {} \
                 tasks completed, {} revocations ({} of X.509-SVIDs), {} kills under load ({} \
                 of them holding a lease); lost {} leases, {} revocations, {} kills, {} killed \
                 leases, {} completions (so far)",
                round + 1,
                l.jtis.len(),
                l.serials.len(),
                l.task_leases.len(),
                l.completed.len(),
                l.revoked.len() + l.revoked_x509.len(),
                l.revoked_x509.len(),
                l.kills.len(),
                l.killed_leases.len(),
                missing.len(),
                unrevoked.len(),
                unlisted.len(),
                unkilled.len(),
                lost_completions.len(),
            );
            lost_kill_revocations.extend(unkilled.into_iter().cloned());
            rounds_without_victims += u64::from(l.killed_leases.len() == victims_before);
            thin_rounds += u64::from(
                ((l.jtis.len() + l.serials.len() - svids_before) as u64) < MIN_SVIDS_PER_ROUND,
            );
            lost_leases.extend(missing.into_iter().cloned());
            lost_revocations.extend(unrevoked.into_iter().cloned());
            lost_kills.extend(unlisted);
        }
        let l = ledger.lock().unwrap();
        // Listed is not enough: the identity must also have got nothing.
        let lost_kills = lost_kills.len()
            + l.served_killed
            + lost_kill_revocations.len()
            + l.kills_revoking_nothing;
        let lost_leases = lost_leases.len() + l.unreadable;
        let lost_revocations = lost_revocations.len();
        Ok::<_, String>(json!({
            "rounds": rounds,
            "clients": clients,
            "seconds": started.elapsed().as_secs_f64(),
            "jwt_svids_received": l.jtis.len(),
            "x509_svids_received": l.serials.len(),
            "task_credentials_received": l.task_leases.len(),
            "task_completions_acknowledged": l.completed.len(),
            "task_credentials_of_completed_tasks":
                l.completed.iter().map(|c| c.leases.len()).sum::<usize>(),
            "task_leases_revoked_by_completions":
                l.completed.iter().map(|c| u64::from(c.revoked)).sum::<u64>(),
            "task_clients": task_clients,
            "rounds_without_completions": rounds_without_completions,
            "task_client_error_in_a_round_without_completions": bare_round_error,
            "completion_checks_answered_otherwise": wrong_refusals,
            "first_completion_check_answered_otherwise": first_wrong,
            "rounds_with_too_few_svids": thin_rounds,
            "lost_completions": lost_completions.len(),
            "revocations_acknowledged": l.revoked.len() + l.revoked_x509.len(),
            "x509_revocations_acknowledged": l.revoked_x509.len(),
            "jwt_revocations_acknowledged": l.revoked.len(),
            "kills_acknowledged_under_load": l.kills.len(),
            "kills_of_lease_holders_under_load": l.killed_leases.len(),
            "killed_leases_not_revoked_after_restart": lost_kill_revocations.len(),
            "kills_that_revoked_nothing": l.kills_revoking_nothing,
            "rounds_without_kills_of_lease_holders": rounds_without_victims,
            "lost_leases": lost_leases,
            "lost_revocations": lost_revocations,
            "lost_kills": lost_kills,
            "svids_served_to_killed_identity": l.served_killed,
            "unreadable_credentials": l.unreadable,
        }))
    }
    .await?;
    let lost = report["lost_leases"].as_u64().unwrap()
        + report["lost_revocations"].as_u64().unwrap()
        + report["lost_kills"].as_u64().unwrap()
        + report["lost_completions"].as_u64().unwrap();
    // SVIDs alone, as before task credentials were added, so that runs compare.
    r.figure(
        "crash_credentials_received",
        &format!("crash: SVIDs received over {rounds} kill -9 rounds"),
        (report["jwt_svids_received"].as_u64().unwrap()
            + report["x509_svids_received"].as_u64().unwrap()) as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_task_credentials",
        "  task credentials received (tokens, task X.509-SVIDs)",
        report["task_credentials_received"].as_u64().unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_task_completions",
        "  tasks completed (revoked, refused, on the CRL)",
        report["task_completions_acknowledged"].as_u64().unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_revocations_acknowledged",
        "  revocations acknowledged",
        report["revocations_acknowledged"].as_u64().unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_x509_revocations",
        "    of them, of X.509-SVIDs (revoked and on the CRL after restart)",
        report["x509_revocations_acknowledged"].as_u64().unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_kills_under_load",
        "  kills acknowledged under load",
        report["kills_acknowledged_under_load"].as_u64().unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_kills_of_lease_holders",
        "    of them, of identities holding a lease",
        report["kills_of_lease_holders_under_load"]
            .as_u64()
            .unwrap() as f64,
        "count",
        Target::None,
    );
    r.figure(
        "crash_lost_records",
        "  lost leases, revocations, kills and completions",
        lost as f64,
        "count",
        Target::AtMost(0.0),
    );
    r.detail("crash", report.clone());
    let received = report["jwt_svids_received"].as_u64().unwrap()
        + report["x509_svids_received"].as_u64().unwrap();
    let completions = report["task_completions_acknowledged"].as_u64().unwrap();
    let no_completion = report["rounds_without_completions"].as_u64().unwrap();
    let task_error = report["task_client_error_in_a_round_without_completions"]
        .as_str()
        .map(|e| format!(" (in the first such round the task clients were answered {e})"))
        .unwrap_or_default();
    let thin = report["rounds_with_too_few_svids"].as_u64().unwrap();
    let revocations = report["revocations_acknowledged"].as_u64().unwrap();
    let kills = report["kills_acknowledged_under_load"].as_u64().unwrap();
    let victims = report["kills_of_lease_holders_under_load"]
        .as_u64()
        .unwrap();
    let bare = report["rounds_without_kills_of_lease_holders"]
        .as_u64()
        .unwrap();
    let x509_revocations = report["x509_revocations_acknowledged"].as_u64().unwrap();
    let jwt_revocations = report["jwt_revocations_acknowledged"].as_u64().unwrap();
    if thin > 0 || jwt_revocations == 0 || x509_revocations == 0 || no_completion > 0 || bare > 0 {
        return Err(format!(
            "the crash test received {received} SVIDs (fewer than {MIN_SVIDS_PER_ROUND} in \
             {thin} rounds), {revocations} revocations ({x509_revocations} of X.509-SVIDs), \
             {completions} task completions (none in {no_completion} rounds){task_error} and \
             {kills} kills ({victims} of lease holders, none in {bare} rounds) over {rounds} \
             rounds: too few to show that nothing is lost (at least {MIN_SVIDS_PER_ROUND} \
             SVIDs, one kill of a lease holder and, with task clients, one task completion per \
             round, and one revocation of each kind of SVID, are needed)"
        ));
    }
    Ok(lost)
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u64::from_le_bytes(b)
}
