//! API adapters: protobuf/HTTP ⇄ domain types.
//!
//! Owns: the translation at the edge, and the one mapping from domain errors to gRPC status
//! codes ([`status`]). Nothing here mints or matches; it all goes through [`crate::issuer`].

pub mod admin;
pub mod http;
pub mod uds;
pub mod workload;

use tonic::Status;

use crate::issuer::IssueError;

/// The message SPIFFE clients string-match when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";

/// Maps a domain error to the gRPC status the SPIFFE Workload Endpoint standard prescribes.
pub fn status(e: IssueError) -> Status {
    match e {
        IssueError::NoIdentity => Status::permission_denied(NO_IDENTITY),
        // Attestation failures are reported like "no identity" (fail closed, and clients retry
        // with backoff); the detail goes to our log, not to a possibly hostile caller.
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
        IssueError::FailedPrecondition(m) => Status::failed_precondition(m),
        IssueError::Store(err) => {
            tracing::error!(error = %err, "lease store unavailable; refusing to issue unrecorded credentials");
            Status::unavailable("credentials cannot be recorded right now")
        }
        IssueError::Ca(err) => {
            tracing::error!(error = %err, "CA cannot sign");
            Status::unavailable("the CA cannot sign right now")
        }
    }
}
