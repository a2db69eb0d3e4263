//! The operator API (`tessera.v1.Admin`) on the admin socket.
//!
//! Owns: who may operate the daemon. Only root, the daemon's own uid, and uids or gids named
//! in `[admin]` are served; the kernel's peer credentials decide, checked on every request.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::uds::PeerConn;
use crate::attest::{Attestor, Selector};
use crate::issuer::Issuer;
use crate::proto::tessera::v1 as pb;
use crate::registry::Entry;

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
    attestor: Arc<Attestor>,
    access: AdminAccess,
    started_at: SystemTime,
    workload_socket: String,
}

impl AdminApi {
    /// A service over `issuer`.
    pub fn new(
        issuer: Arc<Issuer>,
        attestor: Arc<Attestor>,
        access: AdminAccess,
        workload_socket: String,
    ) -> Self {
        Self {
            issuer,
            attestor,
            access,
            started_at: SystemTime::now(),
            workload_socket,
        }
    }

    async fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
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
        if self.access.uids.contains(&peer.uid) || self.access.gids.contains(&peer.gid) {
            return Ok(());
        }
        if self.access.gids.is_empty() {
            return Err(denied());
        }
        // Supplementary groups come from /proc, read with the same PID-reuse checks as
        // workload attestation.
        let att = self.attestor.attest(&peer).await.map_err(|_| denied())?;
        let in_group = att
            .selectors
            .iter()
            .any(|s| matches!(s, Selector::SupplementaryGid(g) if self.access.gids.contains(g)));
        if in_group { Ok(()) } else { Err(denied()) }
    }
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// Domain entry to protobuf.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl_seconds: e.x509_svid_ttl.map_or(0, |d| d.as_secs() as i64),
        jwt_svid_ttl_seconds: e.jwt_svid_ttl.map_or(0, |d| d.as_secs() as i64),
        owner: e.owner.clone().unwrap_or_default(),
        purpose: e.purpose.clone().unwrap_or_default(),
        risk: e.risk.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        expires_at: e
            .expires_at
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default(),
        hint: e.hint.clone().unwrap_or_default(),
    }
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
        Ok(Response::new(pb::ListEntriesResponse {
            entries: self
                .issuer
                .registry()
                .snapshot()
                .iter()
                .map(|e| entry_to_pb(e))
                .collect(),
        }))
    }
}
