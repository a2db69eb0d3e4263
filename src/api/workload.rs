//! The SPIFFE Workload API (`SpiffeWorkloadAPI`), exactly as the standard defines it.
//!
//! Streams send their first message at once and then the full state whenever it changes:
//! SVID rotation at about half-life (with jitter, so a fleet does not rotate in lockstep),
//! entry changes, revocations and kills, bundle or CRL changes. A change that is only a
//! re-signed CRL goes out on each stream after its own random delay (`[workload_api]
//! crl_update_splay`), so workloads that reload on every message do not all reload at once. A
//! stream whose caller has no identity left ends with `PermissionDenied`; every stream ends
//! promptly on shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::limits::{self, BUNDLE_STREAMS_PER_UID, PerUid, Slot, X509_STREAMS_PER_UID};
use super::uds::PeerConn;
use super::{NO_IDENTITY, status};
use crate::attest::{Attestation, PeerInfo};
use crate::ca::TrustBundle;
use crate::issuer::{IssueError, Issuer, X509Svid};
use crate::lease::Kind;
use crate::proto::workload as pb;
use crate::shutdown::Shutdown;

/// Streams are state machines polled by the connection that carries them: no task or channel
/// per stream, and when the client goes away the stream is simply dropped.
type StreamOf<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves the Workload API.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    issuer: Arc<Issuer>,
    shutdown: Shutdown,
    allow_unauthenticated_verifiers: bool,
    /// Longest delay of a CRL-only change on a stream.
    crl_update_splay: Duration,
    /// Open `FetchX509SVID` streams per uid.
    x509_streams: Arc<PerUid>,
    /// Open bundle streams (X.509 and JWT together) per uid.
    bundle_streams: Arc<PerUid>,
}

impl WorkloadApi {
    /// A service over `issuer`; streams end when `shutdown` fires, and send a change that is
    /// only a re-signed CRL after a random delay up to `crl_update_splay`.
    pub fn new(
        issuer: Arc<Issuer>,
        shutdown: Shutdown,
        allow_unauthenticated_verifiers: bool,
        crl_update_splay: Duration,
    ) -> Self {
        Self {
            issuer,
            shutdown,
            allow_unauthenticated_verifiers,
            crl_update_splay,
            x509_streams: PerUid::new(X509_STREAMS_PER_UID, usize::MAX),
            bundle_streams: PerUid::new(BUNDLE_STREAMS_PER_UID, usize::MAX),
        }
    }

    /// Security header check, then attestation.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Attestation>, Status> {
        check_security_header(req)?;
        let peer = req
            .extensions()
            .get::<PeerConn>()
            .and_then(|p| p.0.as_deref());
        self.issuer.attest(peer).await.map_err(status)
    }

    /// Callers with no identity may only verify when the operator allows it.
    fn check_verifier(&self, caller: &Attestation, kind: Kind) -> Result<(), Status> {
        if self.allow_unauthenticated_verifiers {
            return Ok(());
        }
        self.issuer.entitled(caller, kind).map(drop).map_err(status)
    }
}

/// Every Workload API request must carry `workload.spiffe.io: true`; a missing header is
/// `InvalidArgument` (a client bug, not to be retried).
pub fn check_security_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: set gRPC metadata \"workload.spiffe.io: true\"",
        )),
    }
}

/// The client side of [`check_security_header`], as a tonic interceptor: for clients of
/// `tessera.v1.Tasks`, which is served on the Workload API socket under the same rule.
pub fn with_security_header(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

/// A `tessera.v1.Tasks` client that sends the security header.
pub type TasksClient = crate::proto::tessera::v1::tasks_client::TasksClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(Request<()>) -> Result<Request<()>, Status>,
    >,
>;

/// Wraps `channel` in a [`TasksClient`].
pub fn tasks_client(channel: tonic::transport::Channel) -> TasksClient {
    crate::proto::tessera::v1::tasks_client::TasksClient::with_interceptor(
        channel,
        with_security_header as fn(Request<()>) -> Result<Request<()>, Status>,
    )
}

/// When one stream sends a change that is only a re-signed CRL: a moment drawn for it alone
/// within `splay` from now, and before the CRL it last sent (`sent`) reaches its
/// `nextUpdate` (review BK-2). Workload API §4.3 asks for splay on widespread updates: every
/// stream gets each CRL (re-signed every 20 minutes and on revocations), and a workload that
/// reloads on every message (spiffe-helper, say) would otherwise reload with all the others.
fn crl_send_at(splay: Duration, sent: &TrustBundle) -> Instant {
    let mut b = [0u8; 4];
    let _ = crate::entropy::fill(&mut b);
    let frac = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX); // 0..=1
    let left = sent.crl_window.map_or(0, |(_, next)| {
        next.saturating_sub(OffsetDateTime::now_utc().unix_timestamp())
    });
    let left = Duration::from_secs(u64::try_from(left).unwrap_or(0));
    Instant::now() + splay.mul_f64(frac).min(left)
}

/// True when `new` differs from `old`, the bundle a stream last sent, in nothing but a CRL
/// that can wait: the one `old` carried is still in force. A CRL replacing one dated ahead of
/// the clock (after it stepped back) or past its `nextUpdate` (after signing failed for long)
/// goes out at once, since relying parties that check CRLs refuse every peer meanwhile.
fn crl_can_wait(old: &TrustBundle, new: &TrustBundle) -> bool {
    old.x509_der == new.x509_der
        && old.jwt_jwks == new.jwt_jwks
        && old.crl_in_force(OffsetDateTime::now_utc())
}

/// When a stream that last sent `old` sends `new`: at a moment of its own within `splay`
/// ([`crl_send_at`]) if only a CRL that can wait changed, else `None`, at once.
fn crl_wait_until(splay: Duration, old: &TrustBundle, new: &TrustBundle) -> Option<Instant> {
    (!splay.is_zero() && crl_can_wait(old, new)).then(|| crl_send_at(splay, old))
}

/// When to renew an SVID: half its remaining lifetime, ±10% jitter.
fn refresh_at(svid: &X509Svid, now: Instant) -> Instant {
    let left = (svid.expires_at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    let half = left.unsigned_abs() / 2;
    let mut b = [0u8; 2];
    let _ = crate::entropy::fill(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..=1
    now + half
        .mul_f64(0.9 + 0.2 * frac)
        .max(Duration::from_millis(500))
}

fn crl_of(b: &TrustBundle) -> Vec<Vec<u8>> {
    if b.crl.is_empty() {
        Vec::new()
    } else {
        vec![b.crl.clone()]
    }
}

fn x509_response(svids: &[(X509Svid, Instant)], bundle: &TrustBundle) -> pb::X509svidResponse {
    let mut hints = HashSet::new();
    pb::X509svidResponse {
        svids: svids
            .iter()
            .map(|(s, _)| pb::X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain_der.clone(),
                x509_svid_key: s.key_pkcs8.clone(),
                bundle: bundle.x509_der.clone(),
                hint: unique_hint(&mut hints, s.entry.hint.as_deref()),
            })
            .collect(),
        crl: crl_of(bundle),
        federated_bundles: HashMap::new(),
    }
}

/// Hints must be unique within a response; a repeated one is dropped (the first keeps it).
fn unique_hint(seen: &mut HashSet<String>, hint: Option<&str>) -> String {
    match hint {
        Some(h) if seen.insert(h.to_owned()) => h.to_owned(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        let slot = self.x509_streams.take(caller.uid).map_err(|_| {
            limits::shed(format_args!(
                "{} holds {X509_STREAMS_PER_UID} FetchX509SVID streams, the most allowed; close some (one stream per process is enough)",
                crate::attest::principal::describe(caller.uid)
            ))
        })?;
        let peer = req.extensions().get::<PeerConn>().and_then(|p| p.0.clone());
        // Subscribed before anything is issued: a kill or entry change that lands while the
        // first SVIDs are minted must still reach this stream.
        let mut entries_rx = self.issuer.registry().subscribe();
        let mut leases_rx = self.issuer.leases().subscribe();
        entries_rx.borrow_and_update();
        leases_rx.borrow_and_update();
        let kills_seen = self.issuer.leases().kill_generation();
        let entries = self.issuer.entitled(&caller, Kind::X509).map_err(status)?;
        let now = Instant::now();
        let mut svids = Vec::with_capacity(entries.len());
        // One identity killed (or its entry changed) while the others are minted does not end
        // the call: the caller is matched again below.
        let mut rematch = false;
        for e in &entries {
            match self.issuer.issue_x509(&caller, e).await {
                Ok(s) => {
                    let at = refresh_at(&s, now);
                    svids.push((s, at));
                }
                Err(IssueError::NoIdentity | IssueError::Killed(_)) => rematch = true,
                Err(err) => return Err(status(err)),
            }
        }
        let mut w = X509Watch {
            issuer: Arc::clone(&self.issuer),
            bundle_rx: self.issuer.ca().subscribe_bundle(),
            entries_rx,
            leases_rx,
            shutdown: self.shutdown.clone(),
            caller,
            peer,
            svids,
            _slot: slot,
            kills_seen,
            sent: Sent::default(),
            crl_splay: self.crl_update_splay,
            crl_due: None,
        };
        if rematch {
            w.reconcile().await?;
        }
        let first = w.message().await?;
        self.issuer.metrics().observe("FetchX509SVID", t0.elapsed());
        let updates = stream::unfold(Some(w), |w| async move { w?.next().await });
        Ok(Response::new(
            stream::once(async { Ok(first) }).chain(updates).boxed(),
        ))
    }

    type FetchX509BundlesStream = StreamOf<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        self.check_verifier(&caller, Kind::X509)?;
        let peer = req.extensions().get::<PeerConn>().and_then(|p| p.0.clone());
        let s = self.bundle_stream(peer, caller, |b| pb::X509BundlesResponse {
            crl: crl_of(b),
            bundles: HashMap::from([(b.trust_domain.id_string(), b.x509_der.clone())]),
        })?;
        self.issuer
            .metrics()
            .observe("FetchX509Bundles", t0.elapsed());
        Ok(Response::new(s))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let requested = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
        let issued = self
            .issuer
            .issue_jwts(&caller, &r.audience, requested)
            .await
            .map_err(status)?;
        let mut hints = HashSet::new();
        let resp = pb::JwtsvidResponse {
            svids: issued
                .into_iter()
                .map(|s| pb::Jwtsvid {
                    spiffe_id: s.spiffe_id.to_string(),
                    hint: unique_hint(&mut hints, s.entry.hint.as_deref()),
                    svid: s.token,
                })
                .collect(),
        };
        self.issuer.metrics().observe("FetchJWTSVID", t0.elapsed());
        Ok(Response::new(resp))
    }

    type FetchJWTBundlesStream = StreamOf<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        self.check_verifier(&caller, Kind::Jwt)?;
        let peer = req.extensions().get::<PeerConn>().and_then(|p| p.0.clone());
        let s = self.bundle_stream(peer, caller, |b| pb::JwtBundlesResponse {
            bundles: HashMap::from([(b.trust_domain.id_string(), b.jwt_jwks.clone())]),
        })?;
        self.issuer
            .metrics()
            .observe("FetchJWTBundles", t0.elapsed());
        Ok(Response::new(s))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        check_validate_request(&r)?;
        self.check_verifier(&caller, Kind::Jwt)?;
        let (id, claims) = self
            .issuer
            .validate_jwt(&r.svid, &r.audience)
            .map_err(status)?;
        self.issuer
            .metrics()
            .observe("ValidateJWTSVID", t0.elapsed());
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(json_to_struct(claims)),
        }))
    }

    type FetchWITSVIDStream = StreamOf<pb::WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        req: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(&req)?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    type FetchWITBundlesStream = StreamOf<pb::WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        req: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(&req)?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

/// The next stream item and the state after it; `None` state ends the stream.
type Step<T, S> = Option<(Result<T, Status>, Option<S>)>;

/// State of one `FetchX509SVID` stream after its first message.
struct X509Watch {
    issuer: Arc<Issuer>,
    caller: Arc<Attestation>,
    /// The connection's peer: attested again before every new SVID, so a stream does not
    /// outlive the process (or the executable) it was opened for.
    peer: Option<Arc<PeerInfo>>,
    svids: Vec<(X509Svid, Instant)>,
    bundle_rx: watch::Receiver<Arc<TrustBundle>>,
    entries_rx: watch::Receiver<crate::registry::Entries>,
    leases_rx: watch::Receiver<u64>,
    shutdown: Shutdown,
    /// Counted against the caller's uid while the stream is open.
    _slot: Slot,
    /// The kill list generation last looked at.
    kills_seen: u64,
    /// What the last message held. A change that leaves it as it was sends nothing (Workload
    /// API §4.3: messages follow changes to the response, and some clients reload on each).
    sent: Sent,
    /// Longest delay of a CRL-only change.
    crl_splay: Duration,
    /// When a CRL-only change is due on this stream, if one waits. Any message sent before
    /// carries the newest CRL, and clears it.
    crl_due: Option<Instant>,
}

/// What an X.509-SVID message held: its SVIDs' leases and the bundle it carried (the same
/// one, not an equal one: a re-signed CRL is a new bundle).
#[derive(Clone, Default)]
struct Sent {
    leases: Vec<crate::lease::LeaseId>,
    bundle: Option<Arc<TrustBundle>>,
}

impl PartialEq for Sent {
    fn eq(&self, other: &Self) -> bool {
        self.leases == other.leases
            && match (&self.bundle, &other.bundle) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl X509Watch {
    /// Waits for the next change that affects this stream (rotation due, entries, a
    /// revocation or kill touching its SVIDs, bundle or CRL, shutdown) and returns the full
    /// new state, or a final error.
    async fn next(mut self) -> Step<pb::X509svidResponse, Self> {
        let end = |s: Status| Some((Err(s), None));
        loop {
            let next = self.svids.iter().map(|(_, at)| *at).min()?;
            tokio::select! {
                () = self.shutdown.wait() => return end(Status::unavailable("tesserad is shutting down")),
                changed = self.entries_rx.changed() => {
                    changed.ok()?;
                    self.entries_rx.borrow_and_update();
                    if let Err(s) = self.reconcile().await { return end(s); }
                }
                changed = self.leases_rx.changed() => {
                    changed.ok()?;
                    self.leases_rx.borrow_and_update();
                    let now = OffsetDateTime::now_utc().unix_timestamp();
                    let leases = self.issuer.leases();
                    let touched = self.svids.iter().any(|(s, _)| {
                        !leases.is_active(&s.lease_id, now) || leases.is_killed(&s.spiffe_id)
                    });
                    // A restore can give back an identity this stream dropped; only kills and
                    // restores change that, not the revocations most changes are.
                    let kills_now = leases.kill_generation();
                    let kills_changed = std::mem::replace(&mut self.kills_seen, kills_now) != kills_now;
                    let gained = kills_changed && self.gained_identity();
                    if !touched && !gained {
                        continue;
                    }
                    if let Err(s) = self.reconcile().await { return end(s); }
                }
                changed = self.bundle_rx.changed() => {
                    changed.ok()?;
                    // A bundle re-signed after the wall clock went back (see the reaper):
                    // SVIDs minted while it was ahead are not valid yet for anyone, so they
                    // are replaced at once rather than at their rotation, in the message
                    // that carries the new bundle.
                    let now = OffsetDateTime::now_utc();
                    let mut replace = false;
                    for (s, at) in &mut self.svids {
                        if s.not_before > now {
                            *at = Instant::now();
                            replace = true;
                        }
                    }
                    if replace {
                        continue;
                    }
                    // What this stream last sent is the bundle to compare with.
                    let due = self.sent.bundle.as_ref().and_then(|b| {
                        crl_wait_until(self.crl_splay, b, &self.bundle_rx.borrow())
                    });
                    if let Some(due) = due {
                        // Further re-signs before it is due go out with it.
                        self.crl_due.get_or_insert(due);
                        continue;
                    }
                }
                () = tokio::time::sleep_until(self.crl_due.unwrap_or(next)), if self.crl_due.is_some() => {}
                () = tokio::time::sleep_until(next) => {
                    // Attested again first: an exited, replaced or re-exec'd caller gets no
                    // fresh key, and identities it no longer has are dropped.
                    if let Err(s) = self.reconcile().await { return end(s); }
                    let now = Instant::now();
                    let mut rematch = false;
                    for (s, at) in &mut self.svids {
                        if *at <= now {
                            match self.issuer.issue_x509(&self.caller, &s.entry).await {
                                Ok(fresh) => { *at = refresh_at(&fresh, now); *s = fresh; }
                                // Its entry was edited or deleted, or its identity killed, since
                                // the match above: match again rather than end a stream the
                                // caller may still be entitled to.
                                Err(IssueError::NoIdentity | IssueError::Killed(_)) => { rematch = true; break; }
                                Err(err) => return end(status(err)),
                            }
                        }
                    }
                    if rematch && let Err(s) = self.reconcile().await { return end(s); }
                }
            }
            let before = self.sent.clone();
            return match self.message().await {
                Ok(_) if self.sent == before => continue,
                Ok(msg) => Some((Ok(msg), Some(self))),
                Err(s) => end(s),
            };
        }
    }

    /// The full state as a message, with no SVID whose lease stopped being active since it
    /// was minted. The SVIDs are minted one identity at a time, and a kill or revocation can
    /// land between two mints: without this, a certificate and key of an identity killed
    /// before the send would still go out after `tessera kill` had returned.
    async fn message(&mut self) -> Result<pb::X509svidResponse, Status> {
        for _ in 0..3 {
            if self.inactive().is_empty() {
                return Ok(self.response());
            }
            self.reconcile().await?;
        }
        // Changes keep landing during the reconciles: what is not active now stays out of
        // this message (the change that made it so wakes the stream for the next one).
        let gone = self.inactive();
        self.svids.retain(|(s, _)| !gone.contains(&s.lease_id));
        if self.svids.is_empty() {
            return Err(status(IssueError::NoIdentity));
        }
        Ok(self.response())
    }

    /// Leases of this stream's SVIDs that are no longer active (revoked, killed, expired).
    fn inactive(&self) -> Vec<crate::lease::LeaseId> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let leases = self.issuer.leases();
        self.svids
            .iter()
            .map(|(s, _)| s.lease_id)
            .filter(|id| !leases.is_active(id, now))
            .collect()
    }

    /// The message for the current state, noted as sent.
    fn response(&mut self) -> pb::X509svidResponse {
        let bundle = Arc::clone(&self.bundle_rx.borrow_and_update());
        self.crl_due = None;
        let msg = x509_response(&self.svids, &bundle);
        self.sent = Sent {
            leases: self.svids.iter().map(|(s, _)| s.lease_id).collect(),
            bundle: Some(bundle),
        };
        msg
    }

    /// True when the caller now holds an identity this stream has no SVID for. Uses the
    /// stream's last attestation; `reconcile` attests again before minting anything.
    fn gained_identity(&self) -> bool {
        self.issuer
            .identities(&self.caller)
            .iter()
            .any(|e| !self.svids.iter().any(|(s, _)| s.spiffe_id == e.spiffe_id))
    }

    /// Attests the caller again and brings the SVID set in line with its identities now:
    /// drops identities that are gone or killed, replaces revoked SVIDs, mints for new
    /// identities. A failed attestation or no identity left ends the stream with
    /// `PermissionDenied`.
    async fn reconcile(&mut self) -> Result<(), Status> {
        // An entry edited or deleted between the match and the mint refuses the mint: one
        // more match settles whether the caller still has an identity.
        // Likewise an identity killed between the match and its mint.
        match self.reconcile_once().await {
            Err(IssueError::NoIdentity | IssueError::Killed(_)) => {
                self.reconcile_once().await.map_err(status)
            }
            r => r.map_err(status),
        }
    }

    async fn reconcile_once(&mut self) -> Result<(), IssueError> {
        self.caller = self.issuer.attest(self.peer.as_deref()).await?;
        let current = self.issuer.identities(&self.caller);
        if current.is_empty() {
            return Err(IssueError::NoIdentity);
        }
        let now_s = OffsetDateTime::now_utc().unix_timestamp();
        let mut old = std::mem::take(&mut self.svids);
        for e in &current {
            // Same entry, settings that make the same certificate, lease still active: the SVID
            // already issued is right (an edit of the entry's owner, say, re-mints nothing).
            let keep = old.iter().position(|(s, _)| {
                s.entry.mints_same_x509(e) && self.issuer.leases().is_active(&s.lease_id, now_s)
            });
            if let Some(i) = keep {
                let (mut s, at) = old.swap_remove(i);
                s.entry = Arc::clone(e);
                self.svids.push((s, at));
            } else {
                let s = self.issuer.issue_x509(&self.caller, e).await?;
                let at = refresh_at(&s, Instant::now());
                self.svids.push((s, at));
            }
        }
        Ok(())
    }
}

/// State of one bundle stream after its first message.
struct BundleWatch<T, F> {
    issuer: Arc<Issuer>,
    /// The last message sent: a change that leaves this kind of bundle as it was (a JWT
    /// bundle when only the CRL was re-signed) sends nothing (Workload API §4.3: messages
    /// follow changes to the response).
    last: T,
    /// The bundle `last` was made from.
    from: Arc<TrustBundle>,
    /// Longest delay of a CRL-only change.
    crl_splay: Duration,
    /// When a CRL-only change is due on this stream, if one waits.
    crl_due: Option<Instant>,
    /// The connection's peer, attested again when entries change: the attestation
    /// keeps only the supplementary groups entries named when it was made, so after an edit
    /// naming a group the caller holds, the old one would find no identity.
    peer: Option<Arc<PeerInfo>>,
    caller: Arc<Attestation>,
    allow_unauthenticated: bool,
    bundle_rx: watch::Receiver<Arc<TrustBundle>>,
    entries_rx: watch::Receiver<crate::registry::Entries>,
    leases_rx: watch::Receiver<u64>,
    shutdown: Shutdown,
    render: F,
    /// Counted against the caller's uid while the stream lasts.
    _slot: Slot,
}

impl<T: Clone + PartialEq, F: Fn(&TrustBundle) -> T> BundleWatch<T, F> {
    async fn next(mut self) -> Step<T, Self> {
        loop {
            tokio::select! {
                () = self.shutdown.wait() => {
                    return Some((Err(Status::unavailable("tesserad is shutting down")), None));
                }
                changed = self.entries_rx.changed() => {
                    changed.ok()?;
                    self.entries_rx.borrow_and_update();
                    // As for any request: the connection's cached attestation if under
                    // 30 s old and the entries name no other groups, else a full one (which
                    // ends the stream, as an X.509 stream's, if the process is gone).
                    if !self.allow_unauthenticated {
                        match self.issuer.attest(self.peer.as_deref()).await {
                            Ok(c) => self.caller = c,
                            Err(e) => return Some((Err(status(e)), None)),
                        }
                    }
                }
                changed = self.leases_rx.changed() => {
                    changed.ok()?;
                    self.leases_rx.borrow_and_update();
                }
                changed = self.bundle_rx.changed() => {
                    changed.ok()?;
                    let b = Arc::clone(&self.bundle_rx.borrow_and_update());
                    let msg = (self.render)(&b);
                    if msg != self.last {
                        match crl_wait_until(self.crl_splay, &self.from, &b) {
                            Some(due) => {
                                self.crl_due.get_or_insert(due);
                            }
                            None => return self.send(msg, b),
                        }
                    }
                }
                () = tokio::time::sleep_until(self.crl_due.unwrap_or_else(Instant::now)), if self.crl_due.is_some() => {
                    self.crl_due = None;
                    let b = Arc::clone(&self.bundle_rx.borrow_and_update());
                    let msg = (self.render)(&b);
                    if msg != self.last {
                        return self.send(msg, b);
                    }
                }
            }
            if !self.allow_unauthenticated && self.issuer.identities(&self.caller).is_empty() {
                return Some((Err(Status::permission_denied(NO_IDENTITY)), None));
            }
        }
    }

    /// `msg`, made from `from`, as the next message; any CRL change waiting goes with it.
    fn send(mut self, msg: T, from: Arc<TrustBundle>) -> Step<T, Self> {
        self.crl_due = None;
        self.from = from;
        self.last = msg.clone();
        Some((Ok(msg), Some(self)))
    }
}

impl WorkloadApi {
    /// A bundle stream: first message now, then one per bundle or CRL change (a CRL-only one
    /// after this stream's splay); ends with
    /// `PermissionDenied` if the caller loses its last identity (unless unauthenticated
    /// verifiers are allowed), and on shutdown.
    fn bundle_stream<T: Clone + PartialEq + Send + Sync + 'static>(
        &self,
        peer: Option<Arc<PeerInfo>>,
        caller: Arc<Attestation>,
        render: impl Fn(&TrustBundle) -> T + Send + Sync + 'static,
    ) -> Result<StreamOf<T>, Status> {
        let slot = self.bundle_streams.take(caller.uid).map_err(|_| {
            limits::shed(format_args!(
                "{} holds {BUNDLE_STREAMS_PER_UID} bundle streams, the most allowed; close some (one per process is enough)",
                crate::attest::principal::describe(caller.uid)
            ))
        })?;
        let mut bundle_rx = self.issuer.ca().subscribe_bundle();
        let from = Arc::clone(&bundle_rx.borrow_and_update());
        let first = render(&from);
        let mut w = BundleWatch {
            issuer: Arc::clone(&self.issuer),
            last: first.clone(),
            from,
            crl_splay: self.crl_update_splay,
            crl_due: None,
            peer,
            caller,
            allow_unauthenticated: self.allow_unauthenticated_verifiers,
            bundle_rx,
            entries_rx: self.issuer.registry().subscribe(),
            leases_rx: self.issuer.leases().subscribe(),
            shutdown: self.shutdown.clone(),
            render,
            _slot: slot,
        };
        w.entries_rx.borrow_and_update();
        w.leases_rx.borrow_and_update();
        let updates = stream::unfold(Some(w), |w| async move { w?.next().await });
        Ok(stream::once(async { Ok(first) }).chain(updates).boxed())
    }
}

/// A `ValidateJWTSVID` request's own fields (Workload API §6.2.3: both required).
pub fn check_validate_request(r: &pb::ValidateJwtsvidRequest) -> Result<(), Status> {
    if r.audience.is_empty() {
        return Err(Status::invalid_argument(
            "audience is required: the audience of the validating party",
        ));
    }
    if r.svid.is_empty() {
        return Err(Status::invalid_argument(
            "svid is required: the JWT-SVID to validate",
        ));
    }
    Ok(())
}

/// JSON claims to `google.protobuf.Struct`.
pub fn json_to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(roots: &[u8], crl: &[u8], window: Option<(i64, i64)>) -> TrustBundle {
        TrustBundle {
            trust_domain: crate::spiffe_id::TrustDomain::parse("example.org").unwrap(),
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 1,
            x509_der: roots.to_vec(),
            jwt_jwks: b"{\"keys\":[]}".to_vec(),
            crl: crl.to_vec(),
            crl_window: window,
        }
    }

    #[test]
    fn a_new_crl_waits_only_while_the_one_sent_is_in_force() {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let fresh = Some((now - 30, now + 3600));
        let next = bundle(b"root", b"new", fresh);
        let sent = |window| bundle(b"root", b"old", window);
        assert!(crl_can_wait(&sent(fresh), &next));
        // Relying parties refuse the one sent: dated ahead (the clock went back), expired
        // (signing failed for an hour), or none yet.
        let ahead = Some((now + 60, now + 3600));
        let expired = Some((now - 7200, now - 1));
        assert!(!crl_can_wait(&sent(ahead), &next));
        assert!(!crl_can_wait(&sent(expired), &next));
        assert!(!crl_can_wait(&bundle(b"root", b"", None), &next));
        // New roots never wait.
        assert!(!crl_can_wait(
            &sent(fresh),
            &bundle(b"root2", b"new", fresh)
        ));
    }

    #[test]
    fn each_stream_draws_its_own_moment_within_the_splay() {
        let splay = Duration::from_secs(5);
        let start = Instant::now();
        let now_s = OffsetDateTime::now_utc().unix_timestamp();
        let sent = bundle(b"root", b"old", Some((now_s - 30, now_s + 3600)));
        let at: Vec<Instant> = (0..64).map(|_| crl_send_at(splay, &sent)).collect();
        let end = Instant::now() + splay;
        assert!(at.iter().all(|t| (start..=end).contains(t)));
        let spread = *at.iter().max().unwrap() - *at.iter().min().unwrap();
        // 64 draws over 5 s within 1 s of each other: about 1 in 10^40.
        assert!(spread > Duration::from_secs(1), "{spread:?}");
        assert!(crl_send_at(Duration::ZERO, &sent) <= Instant::now());
        // Never after the CRL sent expires: 2 s left caps a 5-s splay.
        let ending = bundle(b"root", b"old", Some((now_s - 3598, now_s + 2)));
        let at: Vec<Instant> = (0..64).map(|_| crl_send_at(splay, &ending)).collect();
        let cap = Instant::now() + Duration::from_secs(2);
        assert!(at.iter().all(|t| *t <= cap));
    }
}
