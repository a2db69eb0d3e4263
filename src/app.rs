//! Application assembly: config → every part built → served → drained on shutdown.
//!
//! Owns start-up order and shutdown. The workload socket opens last, once the admin socket
//! and the HTTP listener are serving, so a workload never reaches a half-started daemon.
//! [`build`] returns the bound addresses so tests can start a real daemon on temp paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::api::admin::{AdminAccess, AdminApi};
use crate::api::tasks::TasksApi;
use crate::api::workload::WorkloadApi;
use crate::api::{http, limits, uds};
use crate::attest::Attestor;
use crate::ca::{Ca, CaError};
use crate::config::Config;
use crate::exchange::approvals::Approvals;
use crate::exchange::{self, Exchanger};
use crate::issuer::{Issuer, IssuerSettings};
use crate::lease::store::{Op, SqliteStore, Store, StoreError, commit};
use crate::lease::{LeaseTable, reaper};
use crate::metrics::Metrics;
use crate::oidc::Verifier;
use crate::policy::Engine;
use crate::proto;
use crate::registry::Registry;
use crate::shutdown::{self, Shutdown, Trigger};

/// Start-up failures; each names what could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The state directory could not be prepared.
    #[error("data_dir {path}: {source}")]
    DataDir {
        /// Path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// CA problem.
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// A socket or listener could not be bound.
    #[error("cannot listen on {what} {addr}: {source}{hint}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address or path.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
        /// What to do about it, when known (empty, or starting with "; ").
        hint: &'static str,
    },
    /// gRPC reflection setup failed.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// The lease store could not be opened or restored.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The policy file or schema is not valid.
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// TLS for the HTTP listener could not be set up.
    #[error("[http] TLS: {0}")]
    Tls(String),
}

/// A running daemon.
#[derive(Debug)]
pub struct Running {
    /// Workload API socket path.
    pub workload_socket: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Bound HTTP address (the real port when the config said 0).
    pub http_addr: SocketAddr,
    /// Tessera's OAuth issuer URL.
    pub issuer_url: String,
    reload: tokio::sync::mpsc::Sender<()>,
    trigger: Trigger,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    store: Arc<dyn Store>,
    store_failed: tokio::sync::watch::Receiver<Option<String>>,
    ca: Arc<Ca>,
}

/// How long a drain may take before remaining connections are cut.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Descriptors the two sockets need at their connection caps: the socket and a pidfd each.
const DESCRIPTORS_AT_CAPS: u64 = 2 * 2 * limits::CONNECTIONS_TOTAL as u64;

/// Raises the soft limit on open files to the hard one, and warns when even that is below
/// what the connection caps need: a flood of connections would then make `accept`, and
/// attestation's `/proc` reads, fail for every caller before any cap refuses the flood.
fn raise_open_file_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    let needed = DESCRIPTORS_AT_CAPS + 1024;
    if r.rlim_cur < needed {
        tracing::warn!(
            limit = r.rlim_cur,
            needed,
            "the open-file limit is below what the connection caps need (a socket and a pidfd \
             per connection): a flood of connections would exhaust descriptors for every caller \
             first; raise it (LimitNOFILE= in the systemd unit, ulimit -Hn)"
        );
    }
}

/// Builds every part and starts serving.
pub async fn build(cfg: Config) -> Result<Running, AppError> {
    // Whatever can still refuse the start comes before the first write to data_dir (review
    // AZ-3): a start that fails leaves it as it was, with no CA generated for a mistyped
    // trust domain, no store created and no credential revoked. The policy and the TLS files
    // are only read; the TCP listener is bound here and served once everything is built. The
    // sockets are bound here and let go at once (see `probe_uds`), and bound for good where
    // they are served.
    let policy = Arc::new(Engine::load(
        cfg.policy_file.as_deref(),
        cfg.policy_schema.as_deref(),
    )?);
    if let Some(crate::config::HttpTls::Files { cert, key }) = &cfg.http_tls {
        http::tls::check_files(cert, key).map_err(AppError::Tls)?;
    }
    let tcp = bind_http(&cfg).await?;
    // Owner-only unless other uids/gids were granted (the peer check in the service is what
    // enforces access; the mode is defence in depth).
    let admin_mode = if cfg.admin_uids.is_empty() && cfg.admin_gids.is_empty() {
        0o600
    } else {
        0o666
    };
    probe_uds("admin socket", &cfg.admin_socket, admin_mode)?;
    // Any local uid must be able to connect: attestation, not file mode, decides identity.
    probe_uds("workload socket", &cfg.workload_socket, 0o666)?;
    // data_dir holds the CA key, the kill list and the audit chain: whoever could rename it
    // (a writable directory above it) could have the daemon start over with a new CA and an
    // empty kill list (review AZ-4). The directories above must not let another user do it.
    check_data_dir_above(&cfg.data_dir).map_err(|source| AppError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    crate::fsutil::ensure_private_dir(&cfg.data_dir).map_err(|source| AppError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    // Before anything in it is read or written, and held until the process ends: the
    // store's writer thread may still close the database and the audit file after shutdown
    // returns (a failed start exits at once).
    let data_lock = crate::fsutil::lock_dir(&cfg.data_dir).map_err(|source| AppError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    std::mem::forget(data_lock);
    raise_open_file_limit();
    // Before any socket counts connections by uid.
    let subordinate =
        crate::attest::principal::load_subordinate_uids(std::path::Path::new("/etc/subuid"));
    if subordinate > 0 {
        tracing::info!(
            ranges = subordinate,
            "subordinate uid ranges (/etc/subuid): each block of 65,536 of their uids shares \
             one per-uid share"
        );
    }
    let ca = Arc::new(Ca::load_or_create(
        &cfg.trust_domain,
        &cfg.data_dir,
        cfg.ca_files.as_ref(),
        cfg.ca_ttl,
    )?);
    warn_if_ca_expires_soon(&ca);
    let started = std::time::Instant::now();
    let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
    // Restore before any socket opens: leases, revocations, the kill list and stored entries.
    let leases = Arc::new(LeaseTable::new());
    // Index on this thread's sibling while the store reads the next chunk: a restart with a
    // million leases then costs about the longer of the two, not their sum.
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Vec<crate::lease::Lease>>(4);
    let table = Arc::clone(&leases);
    let indexer = std::thread::spawn(move || {
        for chunk in chunks_rx {
            table.insert_many(chunk);
        }
    });
    let opened = SqliteStore::open(&cfg.data_dir, cfg.audit_max_bytes, now_s, &mut |chunk| {
        let _ = chunks_tx.send(chunk);
    });
    drop(chunks_tx);
    // Serving with leases missing from memory would hand out as unrevoked what the store
    // holds revoked (and leave their serials off the CRL).
    if indexer.join().is_err() {
        return Err(AppError::Store(crate::lease::store::StoreError::Db(
            "indexing the stored leases failed; see the panic above".into(),
        )));
    }
    let (store, snapshot) = opened?;
    let store_commits = store.commit_durations();
    let store_failed = store.failure();
    let loaded_ms = started.elapsed().as_millis() as u64;
    let store: Arc<dyn Store> = Arc::new(store);
    let restored = snapshot.restored;
    leases.raise_kill_epoch(snapshot.kill_epoch);
    for k in snapshot.kills {
        leases.add_kill(k);
    }
    leases.load_tasks(snapshot.tasks);
    if !snapshot.expired.is_empty() {
        drop(store.submit(vec![Op::Delete(snapshot.expired)]));
    }
    let (mut stored_entries, mut invalid_entries) = (Vec::new(), Vec::new());
    for (id, json) in snapshot.entries {
        let parsed = serde_json::from_str::<crate::config::EntrySpec>(&json)
            .map_err(|e| e.to_string())
            .and_then(|spec| {
                spec.validate(&id, "", &cfg.trust_domain)
                    .map(|e| (e, spec))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(pair) => stored_entries.push(pair),
            Err(e) => {
                tracing::error!(entry = %id, error = %e, "stored entry no longer valid; it grants nothing until deleted (tessera entry delete ID)");
                let spiffe_id = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v.get("spiffe_id")?.as_str().map(str::to_owned));
                invalid_entries.push(crate::issuer::InvalidEntry {
                    id,
                    spiffe_id,
                    reason: e,
                });
            }
        }
    }
    tracing::info!(
        leases = restored,
        killed = leases.kills().len(),
        stored_entries = stored_entries.len(),
        load_ms = loaded_ms,
        ms = started.elapsed().as_millis() as u64,
        "state restored"
    );
    let metrics = Arc::new(Metrics::with_store_commits(store_commits));
    let registry = Arc::new(Registry::new(Vec::new()));
    let attestor =
        Arc::new(Attestor::new(cfg.max_exe_hash_bytes).with_admin_gids(cfg.admin_gids.clone()));
    let issuer = Arc::new(Issuer::new(
        Arc::clone(&attestor),
        Arc::clone(&registry),
        Arc::clone(&ca),
        Arc::clone(&leases),
        Arc::clone(&store),
        Arc::clone(&metrics),
        IssuerSettings {
            trust_domain: cfg.trust_domain.clone(),
            x509_svid_ttl: cfg.x509_svid_ttl,
            jwt_svid_ttl: cfg.jwt_svid_ttl,
            idle_after: cfg.idle_after,
            refuse_idle: cfg.refuse_idle,
        },
        cfg.entries.clone(),
        stored_entries,
    ));
    if !invalid_entries.is_empty() {
        issuer.hold_invalid_entries(invalid_entries);
    }
    warn_unmatchable_paths(issuer.entries().iter().map(|(e, _)| &**e));
    warn_expired(issuer.entries().iter().map(|(e, _)| &**e));
    for w in crate::registry::never_matching(issuer.entries().iter().map(|(e, _)| &**e)) {
        tracing::warn!("{w}");
    }
    issuer.init_activity(snapshot.entry_activity);
    match policy.path() {
        Some(p) => tracing::info!(file = %p.display(), policies = policy.len(), "policy loaded"),
        None => tracing::info!("no [policy] file: every token exchange is denied (default deny)"),
    }
    let oidc = Arc::new(Verifier::new(&cfg.oidc_issuers));
    let approvals = Arc::new(Approvals::new(cfg.approval_ttl));
    if let Some((e, _)) = issuer
        .entries()
        .into_iter()
        .find(|(e, _)| &*e.id == "default")
    {
        tracing::info!(
            spiffe_id = %e.spiffe_id,
            selectors = %e.selectors.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "no entries configured: serving the built-in default entry for the user who started tesserad"
        );
    }

    let (trigger, shutdown) = shutdown::channel();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    tasks.push((
        "reaper",
        tokio::spawn(reaper::run(
            Arc::clone(&leases),
            Arc::clone(&store),
            reaper::system_clock(),
            Arc::clone(&metrics.reaper_lag_ms),
            shutdown.clone(),
        )),
    ));
    tasks.push((
        "task-pruner",
        tokio::spawn(prune_tasks(
            Arc::clone(&issuer),
            cfg.task_retention,
            shutdown.clone(),
        )),
    ));
    // 1. Admin socket.
    let admin_listener = bind_uds("admin socket", &cfg.admin_socket, admin_mode)?;
    let access = AdminAccess::new(cfg.admin_uids.clone(), cfg.admin_gids.clone());
    let admin = AdminApi::new(
        Arc::clone(&issuer),
        Arc::clone(&approvals),
        Arc::clone(&attestor),
        access.clone(),
        cfg.workload_socket.display().to_string(),
    );
    let router = Server::builder()
        .max_concurrent_streams(Some(limits::ADMIN_STREAMS_PER_CONNECTION))
        .layer(limits::InFlightLayer::new(
            limits::IN_FLIGHT_BYTES_PER_UID,
            limits::IN_FLIGHT_BYTES_TOTAL,
        ))
        .add_service(
            proto::tessera::v1::admin_server::AdminServer::new(admin)
                .max_decoding_message_size(limits::MAX_REQUEST_BYTES),
        );
    // Who may be an operator is known from the connection's credentials: anyone else gets
    // only enough bytes to hear PermissionDenied (the service's check stays the authority).
    let operators: uds::Admit = Arc::new(move |peer, fd| {
        access.uids.contains(&peer.uid)
            || access.gids.contains(&peer.gid)
            || (!access.gids.is_empty()
                && uds::peer_groups(fd).is_ok_and(|g| g.iter().any(|g| access.gids.contains(g))))
    });
    tasks.push((
        "admin",
        spawn_grpc(router, admin_listener, Some(operators), shutdown.clone()),
    ));

    // 2. HTTP.
    let http_addr = tcp.local_addr().map_err(|source| AppError::Bind {
        what: "[http] listen",
        addr: cfg.http_listen.to_string(),
        source,
        hint: "",
    })?;
    let scheme = if cfg.http_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let issuer_url = cfg
        .http_issuer
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{http_addr}"));
    let exchanger = Arc::new(Exchanger::new(
        Arc::clone(&issuer),
        Arc::clone(&oidc),
        Arc::clone(&policy),
        Arc::clone(&approvals),
        exchange::Settings {
            token_ttl: cfg.task_ttl,
            max_ttl: cfg.task_max_ttl,
            issuer_url: issuer_url.clone(),
        },
    ));
    let app = http::router(
        Arc::clone(&ca),
        Arc::clone(&ready),
        Arc::clone(&leases),
        Arc::clone(&metrics),
        Arc::clone(&exchanger),
    );
    let tls_cfg = match &cfg.http_tls {
        None => None,
        Some(tls) => {
            let host = reqwest::Url::parse(&issuer_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            Some(http::tls::server_config(tls, &ca, &host).map_err(AppError::Tls)?)
        }
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AppError::Reflection(e.to_string()))?;
    let workload_listener = bind_uds("workload socket", &cfg.workload_socket, 0o666)?;
    // Nothing after this point refuses the start.
    // Before the first CRL, so that it lists them.
    match issuer.withdraw_unserved_default().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            revoked = n,
            "the built-in default entry is no longer served (entries are configured now, or \
             tesserad runs as another user): the credentials it granted are revoked"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "could not revoke what the built-in default entry granted; it no longer grants it"
        ),
    }
    let published = publish_crl(&ca, &leases, time::OffsetDateTime::now_utc());
    tasks.push((
        "crl",
        tokio::spawn(crl_publisher(
            Arc::clone(&ca),
            Arc::clone(&leases),
            !published,
            shutdown.clone(),
        )),
    ));

    tasks.push((
        if tls_cfg.is_some() { "https" } else { "http" },
        tokio::spawn(http::tls::serve(tcp, app, tls_cfg, shutdown.clone())),
    ));

    // Background: OIDC keys (now and every 15 minutes), policy reloads (SIGHUP, file change).
    tasks.push((
        "oidc",
        tokio::spawn(refresh_oidc(Arc::clone(&oidc), shutdown.clone())),
    ));
    let (reload, reload_rx) = tokio::sync::mpsc::channel(4);
    let audit_issuer = Arc::clone(&issuer);
    tasks.push((
        "policy",
        tokio::spawn(crate::policy::watch(
            Arc::clone(&policy),
            reload_rx,
            shutdown.clone(),
            Duration::from_secs(1),
            Duration::from_millis(300),
            move |r| report_policy(&audit_issuer, r),
        )),
    ));

    // 3. Workload API, last.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer<WorkloadApi>>()
        .await;
    let workload = WorkloadApi::new(
        Arc::clone(&issuer),
        shutdown.clone(),
        cfg.allow_unauthenticated_verifiers,
        cfg.crl_update_splay,
    );
    let router = Server::builder()
        .max_concurrent_streams(Some(limits::STREAMS_PER_CONNECTION))
        .layer(limits::InFlightLayer::new(
            limits::IN_FLIGHT_BYTES_PER_UID,
            limits::IN_FLIGHT_BYTES_TOTAL,
        ))
        .add_service(
            proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(workload)
                .max_decoding_message_size(limits::MAX_REQUEST_BYTES),
        )
        // The endpoint's security header (SPIFFE Workload Endpoint §3) is required of every
        // credential-bearing service on this socket, not only the Workload API's.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            proto::tessera::v1::tasks_server::TasksServer::new(TasksApi::new(Arc::clone(
                &exchanger,
            )))
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES),
            |req: tonic::Request<()>| {
                crate::api::workload::check_security_header(&req)?;
                Ok(req)
            },
        ))
        .add_service(health.max_decoding_message_size(limits::MAX_REQUEST_BYTES))
        .add_service(reflection.max_decoding_message_size(limits::MAX_REQUEST_BYTES));
    tasks.push((
        "workload",
        spawn_grpc(router, workload_listener, None, shutdown.clone()),
    ));
    ready.store(true, Ordering::Release);

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        workload_socket = %cfg.workload_socket.display(),
        admin_socket = %cfg.admin_socket.display(),
        http = %http_addr,
        issuer = %issuer_url,
        data_dir = %cfg.data_dir.display(),
        "tesserad serving"
    );
    Ok(Running {
        workload_socket: cfg.workload_socket,
        admin_socket: cfg.admin_socket,
        http_addr,
        issuer_url,
        reload,
        trigger,
        tasks,
        store,
        store_failed,
        ca,
    })
}

/// Warns of `unix:path` selectors that can never match: attestation reports the path the
/// kernel resolved (`/usr/bin/python3.11`, not the `/usr/bin/python3` link to it).
fn warn_unmatchable_paths<'a>(entries: impl Iterator<Item = &'a crate::registry::Entry>) {
    for e in entries {
        for s in &e.selectors {
            let crate::attest::Selector::Path(p) = s else {
                continue;
            };
            if let Ok(resolved) = std::fs::canonicalize(p)
                && resolved.as_os_str() != std::ffi::OsStr::new(p)
            {
                tracing::warn!(
                    entry = %e.id, selector = %s, resolved = %resolved.display(),
                    "this unix:path names a symbolic link (or a path through one), so no caller \
                     ever matches it: attestation reports the resolved path; use that instead"
                );
            }
        }
    }
}

/// What `tesserad --check-config` checks beyond the file itself, touching nothing: the
/// operator CA and the TLS files as start-up loads them (errors: start-up would fail), and
/// the OIDC key files and selector names (warnings: start-up would serve without them).
pub fn check_files(cfg: &Config) -> Result<Vec<String>, String> {
    match &cfg.ca_files {
        Some(files) => {
            Ca::check_operator_files(&cfg.trust_domain, files).map_err(|e| e.to_string())?;
        }
        None => Ca::check_generated(&cfg.trust_domain, &cfg.data_dir).map_err(|e| e.to_string())?,
    }
    Ca::check_data_files(&cfg.data_dir).map_err(|e| e.to_string())?;
    check_data_dir_above(&cfg.data_dir).map_err(|e| format!("data_dir: {e}"))?;
    if let Some(crate::config::HttpTls::Files { cert, key }) = &cfg.http_tls {
        crate::api::http::tls::check_files(cert, key)?;
    }
    let mut warnings = Vec::new();
    // Start-up serves without these keys and keeps trying, so only a warning here too.
    for o in &cfg.oidc_issuers {
        if let crate::config::KeySource::JwksFile(p) = &o.keys
            && let Err(e) = crate::oidc::check_jwks_file(p)
        {
            warnings.push(format!(
                "OIDC issuer {}: {e}; its tokens cannot be exchanged until the file reads",
                o.issuer
            ));
        }
    }
    warnings.extend(crate::registry::never_matching(cfg.entries.iter()));
    Ok(warnings)
}

/// Warns of entries whose `expires_at` has passed: they grant nothing. Not refused, as in
/// the API: an entry in the file would then stop the daemon from restarting once its date
/// passed.
fn warn_expired<'a>(entries: impl Iterator<Item = &'a crate::registry::Entry>) {
    let now = time::OffsetDateTime::now_utc();
    for e in entries {
        if let Some(t) = e.expires_at.filter(|&t| t <= now) {
            tracing::warn!(
                entry = %e.id, spiffe_id = %e.spiffe_id, expires_at = %t,
                "this entry has expired and grants nothing; remove it, or move its expires_at"
            );
        }
    }
}

/// Fetches every OIDC issuer's keys at start and every 15 minutes, so a key an issuer
/// withdrew stops being trusted (new keys are also fetched on an unknown `kid`).
async fn refresh_oidc(oidc: Arc<Verifier>, mut sd: Shutdown) {
    if oidc.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(15 * 60));
    loop {
        tokio::select! {
            () = sd.wait() => return,
            _ = tick.tick() => {}
        }
        for (issuer, r) in oidc.refresh_all().await {
            match r {
                Ok(n) => tracing::info!(%issuer, keys = n, "OIDC issuer keys fetched"),
                Err(e) => {
                    tracing::warn!(%issuer, error = %e, "cannot fetch OIDC issuer keys; will retry")
                }
            }
        }
    }
}

fn report_policy(issuer: &Issuer, r: Result<Option<usize>, &crate::policy::PolicyError>) {
    match r {
        Ok(Some(0)) => {
            tracing::warn!(
                "no policy in force (the policy file holds none, or is gone: a start refuses a \
                 missing file): every token exchange is denied"
            );
            issuer.record(
                "policy_reload",
                crate::audit::Actor::Daemon,
                "",
                vec![("policies", 0.into())],
            );
        }
        Ok(Some(n)) => {
            tracing::info!(policies = n, "policy reloaded");
            issuer.record(
                "policy_reload",
                crate::audit::Actor::Daemon,
                "",
                vec![("policies", n.into())],
            );
        }
        Ok(None) => tracing::info!("policy file unchanged"),
        Err(e) => {
            tracing::error!(error = %e, "policy file rejected; the previous policy stays in force");
            issuer.record(
                "policy_rejected",
                crate::audit::Actor::Daemon,
                "",
                vec![("error", e.to_string().into())],
            );
        }
    }
}

/// How long before the CA's expiry start-up warns.
const CA_EXPIRY_WARNING: time::Duration = time::Duration::days(30);

/// An operator CA (often a short-lived intermediate) stops X.509 issuance at its expiry, and
/// a generated one is replaced only at a start: say so while there is time to act.
fn warn_if_ca_expires_soon(ca: &Ca) {
    let left = ca.not_after() - time::OffsetDateTime::now_utc();
    if left < CA_EXPIRY_WARNING {
        tracing::warn!(
            not_after = %ca.not_after(),
            days_left = left.whole_days(),
            "the CA certificate expires soon: no X.509-SVID is issued after it; renew an \
             operator CA, or restart tesserad after it expires to replace a generated one \
             (tessera_ca_not_after_seconds in /metrics)"
        );
    }
}

/// Signs and publishes a CRL of the revoked certificates still within their validity, dated
/// `now`; false if it could not.
fn publish_crl(ca: &Ca, leases: &LeaseTable, now: time::OffsetDateTime) -> bool {
    let serials = leases.revoked_serials(now.unix_timestamp());
    match ca.publish_crl(&serials, now) {
        Ok(0) => true,
        Ok(left_out) => {
            tracing::warn!(
                left_out,
                listed = crate::ca::MAX_CRL_ENTRIES,
                "more revoked certificates than one CRL may list; those expiring soonest were left out"
            );
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot sign the CRL; trying again (1 s, doubling to 1 min)");
            false
        }
    }
}

/// Forgets task records past `[tasks] retention`: at start (records age while the daemon is
/// down too) and then every quarter of the retention, at least every 10 minutes.
async fn prune_tasks(issuer: Arc<Issuer>, retention: Duration, mut sd: Shutdown) {
    let every = (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = sd.wait() => return,
            _ = tick.tick() => {}
        }
        match issuer.prune_tasks(retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "task records past retention forgotten"),
            Err(e) => tracing::warn!(error = %e, "could not forget task records; retrying later"),
        }
    }
}

/// Wall-clock age at which the CRL in service is signed again whatever the refresh timer
/// says: half its validity.
const CRL_STALE_AFTER: time::Duration = time::Duration::minutes(30);

/// Re-publishes the CRL when the set of revoked serials changes (coalescing bursts such as a
/// kill), when the lease table asks for one (a revoked certificate's CRL dated after its
/// expiry), at least every 20 minutes, well before its one-hour `nextUpdate`, and when the
/// wall clock steps back or ahead of the CRL in service.
async fn crl_publisher(ca: Arc<Ca>, leases: Arc<LeaseTable>, failed: bool, mut sd: Shutdown) {
    let fingerprint = |l: &LeaseTable| {
        let s = l.revoked_serials(time::OffsetDateTime::now_utc().unix_timestamp());
        (
            s.len(),
            s.iter().fold(0u64, |a, r| {
                a ^ u64::from_le_bytes(r.serial[..8].try_into().unwrap_or_default())
            }),
        )
    };
    let mut rx = leases.subscribe();
    let mut last = fingerprint(&leases);
    let mut refresh = tokio::time::interval(Duration::from_secs(20 * 60));
    refresh.tick().await;
    // A CRL signed while the wall clock was ahead is dated in the future once it is back, and
    // relying parties refuse it as not yet valid; X.509-SVIDs minted then are not valid yet
    // either. The reaper sees steps at its wakes only (up to 30 s apart), so an excursion
    // shorter than that would leave both in service: checked here too, every few seconds.
    // A CRL signed again is a new bundle, on which X.509 streams replace SVIDs not yet valid.
    let mut signed_at = time::OffsetDateTime::now_utc();
    let mut watch = reaper::ClockWatch::new(signed_at.unix_timestamp());
    let mut clock_check = tokio::time::interval(Duration::from_secs(5));
    clock_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A publication that failed is retried until one succeeds: a revocation it carried must
    // not wait for the next change or refresh.
    let mut failed = failed;
    let mut retry = Duration::from_secs(1);
    loop {
        let forced = tokio::select! {
            () = sd.wait() => return,
            r = rx.changed() => { if r.is_err() { return; } false }
            _ = refresh.tick() => true,
            _ = clock_check.tick() => {
                let now = time::OffsetDateTime::now_utc();
                let (_, step) = watch.observe(now.unix_timestamp());
                let went_back = step <= -reaper::CLOCK_STEP_S;
                // A clock that jumped ahead (a suspended VM, an RTC on local time) would leave
                // the CRL in service past its `nextUpdate` until the next refresh on the
                // monotonic clock, up to 20 minutes of relying parties refusing every peer
                // (review BK-1). Half its validity is the mark: the refresh keeps it well
                // under that otherwise. A failing signer is left to its backoff.
                let stale = !failed && now - signed_at >= CRL_STALE_AFTER;
                if signed_at - crate::ca::CRL_BACKDATE <= now && !went_back && !stale {
                    continue;
                }
                tracing::info!(
                    signed_at = %signed_at,
                    "the wall clock went back or jumped ahead, or the CRL in service was \
                     signed by a clock ahead of it; signing it again"
                );
                true
            }
            () = tokio::time::sleep(retry), if failed => {
                retry = (retry * 2).min(Duration::from_secs(60));
                true
            }
        };
        // Let a burst of revocations settle into one CRL.
        tokio::time::sleep(Duration::from_millis(5)).await;
        rx.borrow_and_update();
        let now = fingerprint(&leases);
        if leases.take_crl_resign() || forced || now != last {
            let at = time::OffsetDateTime::now_utc();
            failed = !publish_crl(&ca, &leases, at);
            if !failed {
                signed_at = at;
                retry = Duration::from_secs(1);
            }
            last = now;
        }
    }
}

/// The rule for the directories above `data_dir` ([`uds::check_above_data`]): those of its
/// nearest existing ancestor (where it is about to be made, or its parent), and when it is a
/// symbolic link, those of its target too (either could be swapped).
fn check_data_dir_above(data_dir: &Path) -> std::io::Result<()> {
    let me = Some(nix::unistd::geteuid().as_raw());
    let lexical = data_dir
        .ancestors()
        .skip(1)
        .find(|d| d.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_owned);
    uds::check_above_data(&lexical, me, "data directory")?;
    if std::fs::symlink_metadata(data_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        let real = std::fs::canonicalize(data_dir)?;
        if let Some(up) = real.parent() {
            uds::check_above_data(up, me, "data directory")?;
        }
    }
    Ok(())
}

/// Binds the socket at `path` as start-up will, and lets it go at once: whatever would
/// refuse the bind (its directory, another daemon serving there) refuses the start before
/// `data_dir` is touched, while no connection waits on a socket nobody accepts from yet
/// (without `SO_PEERPIDFD` a connection's process is judged by when it was accepted).
fn probe_uds(what: &'static str, path: &Path, mode: u32) -> Result<(), AppError> {
    let probe = bind_uds(what, path, mode)?;
    // Removed while still listening: a daemon starting beside this one then finds it live
    // (and stops) or finds no file, never a dead socket it would replace just before this
    // removal took its own away.
    let _ = std::fs::remove_file(path);
    drop(probe);
    Ok(())
}

/// Binds `[http] listen`.
async fn bind_http(cfg: &Config) -> Result<tokio::net::TcpListener, AppError> {
    tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|source| AppError::Bind {
            what: "[http] listen",
            addr: cfg.http_listen.to_string(),
            // Every daemon on built-in defaults asks for the same port: a system one and a
            // user's, or two users'.
            hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                "; another program (another tesserad?) holds it: set [http] listen in a config \
                 file to another port, or to \"127.0.0.1:0\" for any free one (the daemon logs \
                 which)"
            } else {
                ""
            },
            source,
        })
}

fn bind_uds(
    what: &'static str,
    path: &Path,
    mode: u32,
) -> Result<tokio::net::UnixListener, AppError> {
    uds::bind(path, mode).map_err(|source| AppError::Bind {
        what,
        addr: path.display().to_string(),
        source,
        hint: "",
    })
}

fn spawn_grpc(
    router: tonic::transport::server::Router<
        tower::layer::util::Stack<limits::InFlightLayer, tower::layer::util::Identity>,
    >,
    listener: tokio::net::UnixListener,
    admit: Option<uds::Admit>,
    mut sd: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(
                uds::incoming(
                    listener,
                    limits::PerUid::new(limits::CONNECTIONS_PER_UID, limits::CONNECTIONS_TOTAL),
                    admit,
                ),
                async move { sd.wait().await },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}

impl Running {
    /// Asks for a policy reload (what SIGHUP does).
    pub fn reload(&self) {
        let _ = self.reload.try_send(());
    }

    /// Resolves with the reason once the lease store has stopped on a commit of unknown
    /// outcome ([`StoreError::Uncertain`]). The daemon must then stop: memory and disk may
    /// disagree about that change, and a restart reads the disk.
    pub async fn store_failed(&self) -> String {
        let mut failed = self.store_failed.clone();
        match failed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The writer ended without failing (shutdown): nothing to report, ever.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops accepting, ends streams, waits up to [`DRAIN_DEADLINE`] for connections to
    /// finish, then removes the socket files.
    pub async fn shutdown(self) {
        self.trigger.trigger();
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        for (name, mut task) in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    server = name,
                    "drain deadline passed; closing remaining connections"
                );
                task.abort();
            }
        }
        // Records submitted without waiting (refusals, approval decisions) are still queued
        // for the store's writer: a batch behind them returns once they are committed and in
        // the audit file, before the process exits and takes the queue with it. It also
        // leaves the whole store in its database file.
        if tokio::time::timeout(DRAIN_DEADLINE, commit(&*self.store, vec![Op::Checkpoint]))
            .await
            .is_err()
        {
            tracing::warn!("the lease store did not finish its queue before shutdown");
        }
        self.ca.settle_reservation();
        for p in [&self.workload_socket, &self.admin_socket] {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("tesserad stopped");
    }
}
