//! `tessera.v1.Tasks` on the Workload API socket: the token exchange for attested agents.
//!
//! Owns only the translation: protobuf ⇄ [`crate::exchange`] types. The actor is the attested
//! caller; errors become gRPC statuses in [`super::exchange_status`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::uds::PeerConn;
use super::{exchange_status, status};
use crate::exchange::{self, ActorRef, Exchanger};
use crate::proto::tessera::v1 as pb;
use crate::spiffe_id::SpiffeId;

/// Serves `tessera.v1.Tasks`.
#[derive(Debug, Clone)]
pub struct TasksApi {
    exchanger: Arc<Exchanger>,
}

impl TasksApi {
    /// A service over `exchanger`.
    pub fn new(exchanger: Arc<Exchanger>) -> Self {
        Self { exchanger }
    }
}

/// Protobuf exchange request to the domain request (`spiffe_id`, the acting identity, is
/// handled by the caller). Scopes come as a list here and as one space-separated string in
/// RFC 8693's form: an element that is empty or holds a space would be read as no scope, or
/// as several, so it is refused.
pub fn request_from_pb(r: pb::ExchangeRequest) -> Result<exchange::Request, Status> {
    if let Some((i, s)) = r
        .scopes
        .iter()
        .enumerate()
        .find(|(_, s)| s.is_empty() || s.chars().any(char::is_whitespace))
    {
        return Err(Status::invalid_argument(format!(
            "scopes[{i}] {:?}: a scope is one non-empty token without spaces (RFC 6749 §3.3); give each scope as its own element",
            s.chars().take(64).collect::<String>()
        )));
    }
    Ok(exchange::Request {
        subject_token: Some(r.subject_token),
        subject_token_type: Some(r.subject_token_type),
        audience: Some(r.audience),
        scope: Some(r.scopes.join(" ")),
        task_id: Some(r.task_id),
        expires_in: (r.expires_in > 0).then(|| r.expires_in.to_string()),
        requested_token_type: Some(r.requested_token_type),
        x509: r.x509_svid,
    })
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for TasksApi {
    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let started = std::time::Instant::now();
        let issuer = self.exchanger.issuer();
        let peer = req.extensions().get::<PeerConn>().and_then(|p| p.0.clone());
        let caller = issuer.attest(peer.as_deref()).await.map_err(status)?;
        let mut r = req.into_inner();
        let spiffe_id = std::mem::take(&mut r.spiffe_id);
        let request = request_from_pb(r)?;
        let actor = ActorRef::Attested {
            caller: &caller,
            spiffe_id: Some(spiffe_id.as_str()),
        };
        let g = self
            .exchanger
            .exchange(request, actor)
            .await
            .map_err(exchange_status)?;
        let x509_svid = g.credentials.x509.as_ref().map(|s| pb::TaskX509svid {
            spiffe_id: s.spiffe_id.to_string(),
            x509_svid: s.chain_der.clone(),
            x509_svid_key: s.key_pkcs8.clone(),
            bundle: issuer.ca().bundle().x509_der.clone(),
            lease_id: s.lease_id.to_string(),
            expires_at: s.expires_at.unix_timestamp(),
        });
        issuer.metrics().observe("TokenExchange", started.elapsed());
        Ok(Response::new(pb::ExchangeResponse {
            access_token: g.access_token,
            issued_token_type: g.issued_token_type.into(),
            token_type: "Bearer".into(),
            expires_in: g.expires_in,
            scopes: g.scope.split(' ').map(str::to_owned).collect(),
            lease_id: g.credentials.lease_id.to_string(),
            agent: g.agent.to_string(),
            x509_svid,
        }))
    }

    async fn complete(
        &self,
        req: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let issuer = self.exchanger.issuer();
        let peer = req.extensions().get::<PeerConn>().and_then(|p| p.0.clone());
        let caller = issuer.attest(peer.as_deref()).await.map_err(status)?;
        let pb::CompleteRequest { task_id, spiffe_id } = req.into_inner();
        exchange::validate_task_id(&task_id).map_err(Status::invalid_argument)?;
        let ids: Vec<SpiffeId> = issuer
            .identities(&caller)
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        if ids.is_empty() {
            return Err(Status::permission_denied(super::NO_IDENTITY));
        }
        let actor = crate::audit::Actor::Workload {
            uid: caller.uid,
            pid: caller.pid,
            exe: caller.exe_path.as_deref().map(str::to_owned),
        };
        let issuer = Arc::clone(issuer);
        let n = super::to_completion(async move {
            let chosen = (!spiffe_id.is_empty()).then_some(spiffe_id.as_str());
            issuer
                .complete_own_task(&ids, chosen, &task_id, actor)
                .await
        })
        .await
        .map_err(status)?;
        Ok(Response::new(pb::CompleteResponse { revoked: n as u32 }))
    }
}
