//! The operator API (`tessera.v1.Admin`) on the admin socket.
//!
//! Owns: who may operate the daemon. Only root, the daemon's own uid, and uids or gids named
//! in `[admin]` are served; the kernel's peer credentials decide, checked on every request.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::status;
use super::uds::PeerConn;
use crate::attest::{Attestor, Selector};
use crate::audit::Actor;
use crate::config::EntrySpec;
use crate::exchange::approvals::{Approval, ApprovalError, Approvals, Status as ApprovalStatus};
use crate::issuer::Issuer;
use crate::lease::{Filter, Kind, Lease, LeaseId, State};
use crate::proto::tessera::v1 as pb;
use crate::registry::Entry;
use crate::spiffe_id::SpiffeId;

/// Who may use the admin socket.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    /// Allowed uids (root and the daemon's uid are added by [`AdminAccess::new`]).
    pub uids: Vec<u32>,
    /// Allowed gids (primary or supplementary).
    pub gids: Vec<u32>,
}

impl AdminAccess {
    /// Root, the daemon's uid, plus the configured ones.
    pub fn new(mut uids: Vec<u32>, gids: Vec<u32>) -> Self {
        uids.push(0);
        uids.push(nix::unistd::geteuid().as_raw());
        uids.sort_unstable();
        uids.dedup();
        Self { uids, gids }
    }
}

/// Serves `tessera.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    issuer: Arc<Issuer>,
    approvals: Arc<Approvals>,
    attestor: Arc<Attestor>,
    access: AdminAccess,
    started_at: SystemTime,
    workload_socket: String,
}

impl AdminApi {
    /// A service over `issuer`.
    pub fn new(
        issuer: Arc<Issuer>,
        approvals: Arc<Approvals>,
        attestor: Arc<Attestor>,
        access: AdminAccess,
        workload_socket: String,
    ) -> Self {
        Self {
            issuer,
            approvals,
            attestor,
            access,
            started_at: SystemTime::now(),
            workload_socket,
        }
    }

    /// Checks access and returns the operator, for audit records.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<Actor, Status> {
        let result = self.admit(req).await;
        if result.is_err() {
            // Probing the operator API is worth a record (within the caller's share).
            let peer = req
                .extensions()
                .get::<PeerConn>()
                .and_then(|p| p.0.as_ref());
            self.issuer.deny_operator(
                peer.map_or(u32::MAX, |p| p.uid),
                peer.map(|p| p.pid),
                "not an operator: the admin API refused the call",
            );
        }
        result
    }

    async fn admit<T>(&self, req: &Request<T>) -> Result<Actor, Status> {
        let denied = || {
            Status::permission_denied(
                "the admin API is open to root and to uids/gids named in [admin] only",
            )
        };
        let peer = req
            .extensions()
            .get::<PeerConn>()
            .and_then(|p| p.0.clone())
            .ok_or_else(denied)?;
        let actor = |gid| Actor::Operator {
            uid: peer.uid,
            pid: Some(peer.pid),
            gid,
        };
        if self.access.uids.contains(&peer.uid) {
            return Ok(actor(None));
        }
        if self.access.gids.contains(&peer.gid) {
            return Ok(actor(Some(peer.gid)));
        }
        // By a supplementary group: one the kernel reported at connect time (the admission
        // check at accept, `SO_PEERGROUPS`, the same moment as the uid and gid), and still held
        // now. /proc alone would admit a process that gained the group after it connected
        // (a setuid helper calling setgroups), and pair it with the uid of another moment.
        if self.access.gids.is_empty() || !peer.admitted.load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(denied());
        }
        // Supplementary groups come from /proc, read with the same PID-reuse checks as
        // workload attestation.
        // Only groups count here, so no executable is hashed.
        let att = self
            .attestor
            .attest(&peer, |_| false)
            .await
            .map_err(|_| denied())?;
        let group = att.selectors.iter().find_map(|s| match s {
            Selector::SupplementaryGid(g) if self.access.gids.contains(g) => Some(*g),
            _ => None,
        });
        group.map(|g| actor(Some(g))).ok_or_else(denied)
    }
}

impl AdminApi {
    /// Approves or denies a pending high-risk exchange, and records who did.
    async fn decide(
        &self,
        req: Request<pb::DecideApprovalRequest>,
        approve: bool,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let actor = self.authorize(&req).await?;
        if approve {
            self.check_approver(&req).await?;
        }
        let id = required("id", req.into_inner().id)?;
        let a = if approve {
            self.approvals.approve(&id, actor.label(), now_ms())
        } else {
            self.approvals.deny(&id, actor.label(), now_ms())
        }
        .map_err(approval_status)?;
        self.issuer.record(
            if approve { "approve" } else { "deny_approval" },
            actor,
            &a.agent,
            vec![
                ("request_id", a.id.clone().into()),
                ("task_id", a.task_id.clone().into()),
                ("audience", a.audience.clone().into()),
                ("scopes", a.scopes.clone().into()),
                ("ttl_seconds", a.ttl_seconds.into()),
                ("x509_svid", a.x509.into()),
            ],
        );
        Ok(Response::new(approval_to_pb(&a)))
    }

    /// The human in the loop must not be the agent: a process that itself holds the identity
    /// of a request's agent (its attestation matches that agent's entry) cannot approve it,
    /// and nothing is approved for an agent that is killed. Checked against every pending
    /// request of the id in `req`.
    async fn check_approver(&self, req: &Request<pb::DecideApprovalRequest>) -> Result<(), Status> {
        let id = &req.get_ref().id;
        let Some(a) = self.approvals.get(id, now_ms()) else {
            return Ok(()); // the decision itself answers NotFound
        };
        let agent = SpiffeId::parse(&a.agent).map_err(|e| Status::internal(e.to_string()))?;
        if self.issuer.leases().is_killed(&agent) {
            return Err(Status::failed_precondition(format!(
                "{} is killed: restore it before approving its requests",
                a.agent
            )));
        }
        let peer = req
            .extensions()
            .get::<PeerConn>()
            .and_then(|p| p.0.as_deref());
        // Fail closed: a connection handed over by a process that has exited cannot be
        // attested, and must not pass for "holds no identity".
        let me = self.issuer.attest(peer).await.map_err(|e| {
            Status::permission_denied(format!(
                "cannot attest the approving process ({e}); approve from a process that opened its own connection"
            ))
        })?;
        // Every entry it matches, killed or idle ones too: an idle agent that approved itself
        // could use the approval after a review.
        let holds_it = self
            .issuer
            .registry()
            .matching(&me, time::OffsetDateTime::now_utc())
            .iter()
            .any(|e| e.spiffe_id.as_str() == a.agent);
        if holds_it {
            return Err(Status::permission_denied(format!(
                "this process holds {} itself, so it could be the agent approving its own request; approve from a process that does not match the agent's entry, best as another uid (run high-risk agents under a uid of their own that is not an operator: a child process of the agent would not match a unix:path or unix:sha256 selector)",
                a.agent
            )));
        }
        Ok(())
    }

    /// An entry with its inventory state.
    fn entry_pb(&self, e: &Entry, from_config: bool) -> pb::Entry {
        let mut p = entry_to_pb(e, from_config);
        p.last_active = self.issuer.last_active(&e.id).map_or(0, |ms| ms / 1000);
        p.idle = self.issuer.is_idle(e, now_ms());
        p
    }
}

/// `id`, which must not be empty: an empty id is a caller's mistake (InvalidArgument), not an
/// object that is missing (NotFound).
fn required(field: &str, id: String) -> Result<String, Status> {
    if id.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(id)
}

/// An entry change's error, with a lifetime named as the caller sent it: the checks are the
/// config file's and name its keys (`x509_svid_ttl: must be at least 2s`), where this API's
/// field is `x509_svid_ttl_seconds` and the CLI's flag `--x509-ttl`.
fn entry_status(e: crate::issuer::IssueError) -> Status {
    use crate::issuer::IssueError;
    const SENT_AS: [(&str, &str); 3] = [
        ("x509_svid_ttl:", "x509_svid_ttl_seconds (--x509-ttl):"),
        ("jwt_svid_ttl:", "jwt_svid_ttl_seconds (--jwt-ttl):"),
        ("max_task_ttl:", "max_task_ttl_seconds (--max-task-ttl):"),
    ];
    match e {
        IssueError::InvalidArgument(m) => {
            let m = SENT_AS
                .iter()
                .find_map(|(key, field)| m.strip_prefix(key).map(|rest| format!("{field}{rest}")))
                .unwrap_or(m);
            status(IssueError::InvalidArgument(m))
        }
        other => status(other),
    }
}

/// Runs an operator change to its end even if the caller goes away meanwhile
/// ([`super::to_completion`]).
async fn to_completion<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, crate::issuer::IssueError>> + Send + 'static,
) -> Result<T, Status> {
    super::to_completion(change).await.map_err(status)
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn approval_to_pb(a: &Approval) -> pb::ApprovalRequest {
    let (status, by) = match &a.status {
        ApprovalStatus::Pending => ("pending", String::new()),
        ApprovalStatus::Approved { by } => ("approved", by.clone()),
        ApprovalStatus::Denied { by } => ("denied", by.clone()),
    };
    pb::ApprovalRequest {
        id: a.id.clone(),
        agent: a.agent.clone(),
        task_id: a.task_id.clone(),
        subject_iss: a.subject_iss.clone(),
        subject_sub: a.subject_sub.clone(),
        audience: a.audience.clone(),
        scopes: a.scopes.clone(),
        ttl_seconds: a.ttl_seconds,
        created_at: a.created_ms / 1000,
        expires_at: a.expires_ms / 1000,
        status: status.into(),
        decided_by: by,
        x509_svid: a.x509,
    }
}

fn approval_status(e: ApprovalError) -> Status {
    match e {
        ApprovalError::NotFound(_) => Status::not_found(e.to_string()),
        _ => Status::failed_precondition(e.to_string()),
    }
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Domain entry to protobuf.
pub fn entry_to_pb(e: &Entry, from_config: bool) -> pb::Entry {
    pb::Entry {
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl_seconds: e.x509_svid_ttl.map_or(0, |d| d.as_secs() as i64),
        jwt_svid_ttl_seconds: e.jwt_svid_ttl.map_or(0, |d| d.as_secs() as i64),
        owner: e.owner.clone().unwrap_or_default(),
        purpose: e.purpose.clone().unwrap_or_default(),
        risk: e.risk.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        expires_at: e.expires_at.map(rfc3339).unwrap_or_default(),
        hint: e.hint.clone().unwrap_or_default(),
        from_config,
        max_task_ttl_seconds: e.max_task_ttl.map_or(0, |d| d.as_secs() as i64),
        last_active: 0,
        idle: false,
        invalid: String::new(),
        warnings: Vec::new(),
    }
}

/// Protobuf entry to the spec people write (validation happens in the issuer).
/// Zero TTLs mean "the default"; negative ones are refused.
fn entry_spec(e: pb::Entry) -> Result<EntrySpec, Status> {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    let ttl = |field: &str, n: i64| match n {
        0 => Ok(None),
        1.. => Ok(Some(format!("{n}s"))),
        _ => Err(Status::invalid_argument(format!(
            "{field} is {n}: give a positive number of seconds, or 0 for the default"
        ))),
    };
    Ok(EntrySpec {
        x509_svid_ttl: ttl("x509_svid_ttl_seconds", e.x509_svid_ttl_seconds)?,
        jwt_svid_ttl: ttl("jwt_svid_ttl_seconds", e.jwt_svid_ttl_seconds)?,
        max_task_ttl: ttl("max_task_ttl_seconds", e.max_task_ttl_seconds)?,
        spiffe_id: opt(e.spiffe_id),
        selectors: e.selectors,
        owner: opt(e.owner),
        purpose: opt(e.purpose),
        risk: opt(e.risk),
        expires_at: opt(e.expires_at),
        hint: opt(e.hint),
    })
}

/// Domain lease to protobuf.
pub fn lease_to_pb(l: &Lease) -> pb::Lease {
    let r = l.revocation.as_deref();
    pb::Lease {
        id: l.id.to_string(),
        kind: l.kind.as_str().into(),
        spiffe_id: l.spiffe_id.to_string(),
        entry_id: l.entry_id.to_string(),
        uid: l.uid,
        pid: l.pid,
        exe: l.exe.as_deref().unwrap_or_default().into(),
        task_id: l.task_id.as_deref().unwrap_or_default().into(),
        issued_at: l.issued_at,
        expires_at: l.expires_at,
        serial: l.serial.as_deref().map(hex::encode).unwrap_or_default(),
        state: l.state.as_str().into(),
        revoked_at_ms: r.map_or(0, |r| r.at_ms),
        revoked_by: r.map(|r| r.by.clone()).unwrap_or_default(),
        revoke_reason: r.map(|r| r.reason.clone()).unwrap_or_default(),
    }
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn page_token(l: &Lease) -> String {
    format!("{}.{}", l.issued_at, l.id)
}

fn parse_page_token(t: &str) -> Result<(i64, LeaseId), Status> {
    t.split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, LeaseId::parse(b)?)))
        .ok_or_else(|| Status::invalid_argument("page_token is not one this server returned"))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authorize(&req).await?;
        let ca = self.issuer.ca();
        let bundle = ca.bundle();
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            trust_domain: ca.trust_domain().to_string(),
            started_at: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            x509_authorities: bundle
                .x509_authorities
                .iter()
                .map(|a| pb::Authority {
                    fingerprint: a.fingerprint(),
                    subject: a.subject.clone(),
                    not_before: unix(a.not_before),
                    not_after: unix(a.not_after),
                    operator_supplied: a.operator_supplied,
                })
                .collect(),
            jwt_key_ids: bundle
                .jwt_authorities
                .iter()
                .map(|k| k.kid.clone())
                .collect(),
            entry_count: self.issuer.registry().snapshot().len() as u32,
            workload_socket: self.workload_socket.clone(),
        }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.authorize(&req).await?;
        let mut entries: Vec<pb::Entry> = self
            .issuer
            .entries()
            .iter()
            .map(|(e, cfg)| self.entry_pb(e, *cfg))
            .collect();
        // The inventory shows every stored entry, those that grant nothing included.
        entries.extend(
            self.issuer
                .invalid_entries()
                .into_iter()
                .map(|e| pb::Entry {
                    id: e.id,
                    spiffe_id: e.spiffe_id.unwrap_or_default(),
                    invalid: e.reason,
                    ..Default::default()
                }),
        );
        Ok(Response::new(pb::ListEntriesResponse { entries }))
    }

    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let actor = self.authorize(&req).await?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let (issuer, spec) = (Arc::clone(&self.issuer), entry_spec(e)?);
        let created = super::to_completion(async move { issuer.create_entry(spec, actor).await })
            .await
            .map_err(entry_status)?;
        Ok(Response::new(
            with_warnings(self.entry_pb(&created, false), created, &self.access).await,
        ))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let actor = self.authorize(&req).await?;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        if e.id.is_empty() {
            return Err(Status::invalid_argument("entry.id is required"));
        }
        let (issuer, id, spec) = (Arc::clone(&self.issuer), e.id.clone(), entry_spec(e)?);
        let updated =
            super::to_completion(async move { issuer.update_entry(&id, spec, actor).await })
                .await
                .map_err(entry_status)?;
        Ok(Response::new(
            with_warnings(self.entry_pb(&updated, false), updated, &self.access).await,
        ))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let actor = self.authorize(&req).await?;
        let (issuer, id) = (
            Arc::clone(&self.issuer),
            required("id", req.into_inner().id)?,
        );
        to_completion(async move { issuer.delete_entry(&id, actor).await }).await?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let mut f = Filter {
            prefix: r.prefix,
            ..Default::default()
        };
        if !r.spiffe_id.is_empty() {
            f.spiffe_id = Some(SpiffeId::parse(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id {:?} {e}", r.spiffe_id))
            })?);
        }
        if !r.task_id.is_empty() {
            crate::lease::validate_task_name(&r.task_id).map_err(Status::invalid_argument)?;
            f.task_id = Some(r.task_id);
        }
        if !r.state.is_empty() {
            f.state = match State::parse(&r.state) {
                Some(State::Expired) => {
                    // An empty answer would read as "nothing expired".
                    return Err(Status::invalid_argument(
                        "state \"expired\" cannot be listed: a lease leaves the table when \
                         it expires (a revoked certificate stays a day, listed as revoked); \
                         state must be \"active\" or \"revoked\"",
                    ));
                }
                Some(s) => Some(s),
                None => {
                    return Err(Status::invalid_argument(
                        "state must be \"active\" or \"revoked\"",
                    ));
                }
            };
        }
        if !r.kind.is_empty() {
            f.kind = Some(Kind::parse(&r.kind).ok_or_else(|| {
                Status::invalid_argument(
                    "kind must be \"x509-svid\", \"jwt-svid\" or \"task-token\"",
                )
            })?);
        }
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(&r.page_token)?)
        };
        let all = self.issuer.leases().list(&f);
        let start = after.map_or(0, |cursor| {
            all.partition_point(|l| (l.issued_at, l.id) <= cursor)
        });
        let page: Vec<&Lease> = all[start..].iter().take(size).collect();
        let next = if start + page.len() < all.len() {
            page.last().map(|l| page_token(l)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListLeasesResponse {
            leases: page.into_iter().map(lease_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn get_lease(
        &self,
        req: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        self.authorize(&req).await?;
        let id = req.into_inner().id;
        let lid = LeaseId::parse(&id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{id:?} is not a lease id (22 base64url characters)"
            ))
        })?;
        let l = self.issuer.leases().get(&lid).ok_or_else(|| {
            Status::not_found(format!("no live lease {id} (unknown, or already expired)"))
        })?;
        Ok(Response::new(lease_to_pb(&l)))
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "revoked by operator".to_owned()
        } else {
            r.reason
        };
        let issuer = Arc::clone(&self.issuer);
        let l =
            to_completion(async move { issuer.revoke_lease(&r.id, actor, &reason).await }).await?;
        Ok(Response::new(lease_to_pb(&l)))
    }

    async fn revoke_task(
        &self,
        req: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::RevokeTaskResponse>, Status> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "task revoked by operator".to_owned()
        } else {
            r.reason
        };
        let issuer = Arc::clone(&self.issuer);
        let n = to_completion(async move { issuer.revoke_task(&r.task_id, actor, &reason).await })
            .await?;
        Ok(Response::new(pb::RevokeTaskResponse { revoked: n as u32 }))
    }

    async fn kill_identity(
        &self,
        req: Request<pb::KillIdentityRequest>,
    ) -> Result<Response<pb::KillIdentityResponse>, Status> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "killed by operator".to_owned()
        } else {
            r.reason
        };
        let (issuer, approvals) = (Arc::clone(&self.issuer), Arc::clone(&self.approvals));
        let n = to_completion(async move {
            let n = issuer.kill(&r.spiffe_id, actor.clone(), &reason).await?;
            // Decisions made for a killed agent do not outlive the kill: after a restore it
            // asks again. (The kill parsed the id.)
            if let Ok(id) = SpiffeId::parse(&r.spiffe_id) {
                let withdrawn = approvals.withdraw_within(&id);
                if !withdrawn.is_empty() {
                    issuer.record(
                        "approvals_withdrawn",
                        actor,
                        id.as_str(),
                        vec![("request_ids", withdrawn.into())],
                    );
                }
            }
            Ok(n)
        })
        .await?;
        Ok(Response::new(pb::KillIdentityResponse {
            revoked: n as u32,
        }))
    }

    async fn restore_identity(
        &self,
        req: Request<pb::RestoreIdentityRequest>,
    ) -> Result<Response<pb::RestoreIdentityResponse>, Status> {
        let actor = self.authorize(&req).await?;
        let (issuer, id) = (Arc::clone(&self.issuer), req.into_inner().spiffe_id);
        to_completion(async move { issuer.restore(&id, actor).await }).await?;
        Ok(Response::new(pb::RestoreIdentityResponse {}))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let actor = self.authorize(&req).await?;
        let given = required("task_id", req.into_inner().task_id)?;
        let task = self.issuer.resolve_task(&given).map_err(super::status)?;
        let issuer = Arc::clone(&self.issuer);
        let n = to_completion(async move { issuer.complete_task(&task, actor).await }).await?;
        Ok(Response::new(pb::CompleteTaskResponse {
            revoked: n as u32,
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.authorize(&req).await?;
        Ok(Response::new(pb::ListApprovalsResponse {
            requests: self
                .approvals
                .list(now_ms())
                .iter()
                .map(approval_to_pb)
                .collect(),
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide(req, true).await
    }

    async fn deny(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        self.decide(req, false).await
    }

    async fn review_entry(
        &self,
        req: Request<pb::ReviewEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let actor = self.authorize(&req).await?;
        let id = required("id", req.into_inner().id)?;
        let issuer = Arc::clone(&self.issuer);
        let e = {
            let id = id.clone();
            to_completion(async move { issuer.review_entry(&id, actor).await }).await?
        };
        let from_config = self
            .issuer
            .entries()
            .iter()
            .any(|(x, cfg)| x.id == e.id && *cfg);
        Ok(Response::new(self.entry_pb(&e, from_config)))
    }

    async fn list_killed(
        &self,
        req: Request<pb::ListKilledRequest>,
    ) -> Result<Response<pb::ListKilledResponse>, Status> {
        self.authorize(&req).await?;
        Ok(Response::new(pb::ListKilledResponse {
            killed: self
                .issuer
                .leases()
                .kills()
                .into_iter()
                .map(|k| pb::Killed {
                    spiffe_id: k.spiffe_id,
                    killed_at_ms: k.at_ms,
                    killed_by: k.by,
                    reason: k.reason,
                })
                .collect(),
        }))
    }
}

/// An entry as answered to its creation or update: with what about it can never match.
/// Off the async workers: a user or group lookup may ask a directory service (LDAP, sssd).
async fn with_warnings(
    mut pb: pb::Entry,
    e: Arc<crate::registry::Entry>,
    access: &AdminAccess,
) -> pb::Entry {
    let operator = operator_uid_of_high_risk(&e, access);
    pb.warnings =
        tokio::task::spawn_blocking(move || crate::registry::never_matching(std::iter::once(&*e)))
            .await
            .unwrap_or_default();
    pb.warnings.extend(operator);
    pb
}

/// A high-risk entry that selects an operator's uid: the approval check is per process, so
/// such an agent can approve its own requests through a `tessera approve` it starts.
fn operator_uid_of_high_risk(e: &crate::registry::Entry, access: &AdminAccess) -> Option<String> {
    if e.risk != Some(crate::registry::Risk::High) {
        return None;
    }
    let uid = e.selectors.iter().find_map(|s| match s {
        Selector::Uid(u) if access.uids.contains(u) => Some(*u),
        _ => None,
    })?;
    Some(format!(
        "risk is high but the entry selects uid {uid}, which may use the admin socket: the agent \
         could approve its own requests with a `tessera approve` it starts; run it under a uid of \
         its own that is not an operator"
    ))
}
