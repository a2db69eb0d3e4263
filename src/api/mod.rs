//! API adapters: protobuf/HTTP ⇄ domain types.
//!
//! Owns: the translation at the edge, and the one mapping from domain errors to gRPC status
//! codes ([`status`]). Nothing here mints or matches; it all goes through [`crate::issuer`].

pub mod admin;
pub mod authority;
pub mod http;
pub mod limits;
pub mod tasks;
pub mod uds;
pub mod workload;

use tonic::Status;

use crate::ca::CaError;
use crate::exchange::ExchangeError;
use crate::issuer::IssueError;
use crate::lease::store::StoreError;

/// Maps an exchange refusal to a gRPC status: the RFC 6749/8693 error code leads the message
/// and is repeated in `tessera-oauth-error` metadata (and the approval id in
/// `tessera-request-id`), so gRPC clients can act on it like HTTP clients do.
pub fn exchange_status(e: ExchangeError) -> Status {
    let code = e.oauth_code();
    let msg = format!("{code}: {e}");
    let (mut s, request_id) = match e {
        ExchangeError::NoIdentity(i) => return status(i),
        // A full approval queue: to be retried later, and not `FailedPrecondition`, which
        // tells a client polling an approval that it is still pending.
        ExchangeError::Unavailable(IssueError::FailedPrecondition(m)) => {
            (Status::unavailable(format!("{code}: {m}")), None)
        }
        ExchangeError::Unavailable(i) => (status(i), None),
        ExchangeError::InvalidRequest(_) | ExchangeError::InvalidTarget(_) => {
            (Status::invalid_argument(msg), None)
        }
        ExchangeError::InvalidScope(_) | ExchangeError::AccessDenied(_) => {
            (Status::permission_denied(msg), None)
        }
        ExchangeError::MalformedScope(_) => (Status::invalid_argument(msg), None),
        ExchangeError::IssuerUnavailable(_) => (Status::unavailable(msg), None),
        ExchangeError::AuthorizationPending(id) => (Status::failed_precondition(msg), Some(id)),
    };
    if let Ok(v) = code.parse() {
        s.metadata_mut().insert("tessera-oauth-error", v);
    }
    if let Some(v) = request_id.and_then(|id| id.parse().ok()) {
        s.metadata_mut().insert("tessera-request-id", v);
    }
    s
}

/// The message SPIFFE clients string-match when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";

/// Maps a domain error to the gRPC status the SPIFFE Workload Endpoint standard prescribes.
pub fn status(e: IssueError) -> Status {
    match e {
        IssueError::NoIdentity => Status::permission_denied(NO_IDENTITY),
        // Attestation failures are reported like "no identity" (fail closed, and clients retry
        // with backoff); the detail goes to our log, not to a possibly hostile caller.
        IssueError::Attestation(err) if err.is_daemon_side() => {
            // Out of file descriptors, an I/O error: the daemon could not look, which says
            // nothing about the caller. Unavailable (Workload Endpoint §6: "unable to handle
            // the request"), so clients retry and operators see an availability problem.
            // At most one warning per 10 s: a caller can provoke these (a binary on its own
            // FUSE mount), and a log flood would bury the rest.
            static WARNED: limits::Throttle =
                limits::Throttle::new(std::time::Duration::from_secs(10));
            if WARNED.ready() {
                tracing::warn!(error = %err, "attestation could not read /proc (at most one such warning per 10 s)");
            }
            Status::unavailable("cannot attest the caller right now")
        }
        IssueError::Attestation(err) => {
            tracing::info!(error = %err, "attestation failed");
            Status::permission_denied(NO_IDENTITY)
        }
        IssueError::NotEntitled(id) => {
            Status::permission_denied(format!("caller is not entitled to {id}"))
        }
        IssueError::InvalidArgument(m) => Status::invalid_argument(m),
        // A killed identity is, to the workload, an identity it does not have.
        IssueError::Killed(_) => Status::permission_denied(NO_IDENTITY),
        IssueError::NotFound(m) => Status::not_found(m),
        IssueError::AlreadyExists(m) => Status::already_exists(m),
        IssueError::FailedPrecondition(m) | IssueError::TaskConflict(m) => {
            Status::failed_precondition(m)
        }
        IssueError::Store(StoreError::Uncertain(err)) => {
            tracing::error!(error = %err, "a lease store commit failed with an unknown outcome");
            Status::unavailable(
                "the lease store could not confirm this change, so it may or may not have taken \
                 effect; the daemon is restarting to read what the disk holds: check again once \
                 it is back",
            )
        }
        IssueError::Store(err) => {
            tracing::error!(error = %err, "lease store unavailable; refusing to issue unrecorded credentials");
            Status::unavailable("credentials cannot be recorded right now")
        }
        // Still Unavailable (Workload Endpoint: "unable to handle the request"), so clients
        // keep retrying and recover once it is renewed; but say what is wrong.
        IssueError::Ca(CaError::Expired) => {
            tracing::error!(error = %CaError::Expired, "CA cannot sign");
            Status::unavailable(
                "the CA certificate has expired, so no SVID can be issued until an operator \
                 renews it (or restarts tesserad to replace a generated CA)",
            )
        }
        IssueError::Ca(err) => {
            tracing::error!(error = %err, "CA cannot sign");
            Status::unavailable("the CA cannot sign right now")
        }
        IssueError::Interrupted(m) => Status::internal(format!("the change was interrupted: {m}")),
    }
}

/// Runs a state change to its end even if the caller goes away meanwhile. hyper drops a
/// handler's future when its client resets the stream or disconnects; dropped between the
/// commit and the memory update, a change (a revocation, a completed task) would be on disk
/// only, while memory went on honouring what it revoked until the next restart.
pub async fn to_completion<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, IssueError>> + Send + 'static,
) -> Result<T, IssueError> {
    tokio::spawn(change)
        .await
        .unwrap_or_else(|e| Err(IssueError::Interrupted(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_change_runs_to_its_end_when_its_caller_goes_away() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        // The handler, as hyper runs it: dropped once its client resets the stream.
        let handler = tokio::spawn(to_completion(async move {
            let _ = wait.await;
            d.store(true, Ordering::SeqCst);
            Ok(())
        }));
        tokio::task::yield_now().await;
        handler.abort();
        assert!(handler.await.unwrap_err().is_cancelled());
        go.send(()).unwrap();
        for _ in 0..200 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the change stopped with its caller");
    }
}
