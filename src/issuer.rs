//! THE issuance path. Every credential Tessera hands out, whichever API asked, comes from here:
//!
//! attest the caller → match registration entries → mint → record → hand out.
//!
//! Keeping one path means a new endpoint cannot skip a step. The API adapters only translate
//! requests and errors; they never mint or match on their own.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::attest::{AttestError, Attestation, Attestor, PeerInfo};
use crate::ca::{Ca, CaError};
use crate::registry::{Entry, Registry};
use crate::spiffe_id::SpiffeId;

/// Issuance failures, in domain terms. `api` maps them to gRPC status codes in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The caller could not be attested; we fail closed.
    #[error("caller attestation failed: {0}")]
    Attestation(#[from] AttestError),
    /// No entry grants the caller an identity.
    #[error("no identity issued")]
    NoIdentity,
    /// The caller asked for an identity it is not entitled to.
    #[error("caller is not entitled to {0}")]
    NotEntitled(String),
    /// A request field is missing or malformed; the message says which and how.
    #[error("{0}")]
    InvalidArgument(String),
    /// The CA cannot sign.
    #[error("CA unavailable: {0}")]
    Ca(#[from] CaError),
}

/// An X.509-SVID ready to hand out.
pub struct X509Svid {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// Leaf then intermediates, DER.
    pub chain_der: Vec<u8>,
    /// Unencrypted PKCS#8 DER private key, fresh for this SVID.
    pub key_pkcs8: Vec<u8>,
    /// Certificate serial (hex).
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub expires_at: OffsetDateTime,
    /// Lifetime the SVID was minted with (rotation is planned from it).
    pub ttl: Duration,
    /// The entry that granted it.
    pub entry: Arc<Entry>,
}

impl std::fmt::Debug for X509Svid {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A JWT-SVID ready to hand out.
#[derive(Debug)]
pub struct JwtSvid {
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// Compact JWS.
    pub token: String,
    /// `jti`.
    pub id: String,
    /// `exp`.
    pub expires_at: OffsetDateTime,
    /// The entry that granted it.
    pub entry: Arc<Entry>,
}

/// Daemon-wide issuance settings.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// Default X.509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
}

/// Maximum audiences per JWT request, and maximum length of one: bounds token size.
const MAX_AUDIENCES: usize = 16;
const MAX_AUDIENCE_LEN: usize = 512;

/// The issuance path and the parts it needs.
#[derive(Debug)]
pub struct Issuer {
    attestor: Arc<Attestor>,
    registry: Arc<Registry>,
    ca: Arc<Ca>,
    settings: IssuerSettings,
}

impl Issuer {
    /// Assembles the path.
    pub fn new(
        attestor: Arc<Attestor>,
        registry: Arc<Registry>,
        ca: Arc<Ca>,
        settings: IssuerSettings,
    ) -> Self {
        Self {
            attestor,
            registry,
            ca,
            settings,
        }
    }

    /// The CA (bundles, validation).
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The registry (entries and their change feed).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Step 1: who is calling.
    pub async fn attest(&self, peer: Option<&PeerInfo>) -> Result<Arc<Attestation>, IssueError> {
        let peer = peer.ok_or(AttestError::NoPid)?;
        Ok(self.attestor.attest(peer).await?)
    }

    /// Step 2: which identities the caller holds now, in match order (first is the default).
    pub fn identities(&self, caller: &Attestation) -> Vec<Arc<Entry>> {
        self.registry.matching(caller, OffsetDateTime::now_utc())
    }

    /// Steps 3–5 for X.509: mint one SVID with a fresh key for `entry`.
    pub fn issue_x509(
        &self,
        caller: &Attestation,
        entry: &Arc<Entry>,
    ) -> Result<X509Svid, IssueError> {
        let now = OffsetDateTime::now_utc();
        let ttl = entry.x509_svid_ttl.unwrap_or(self.settings.x509_svid_ttl);
        let m = self.ca.mint_x509(&entry.spiffe_id, ttl, now)?;
        let serial = hex::encode(m.serial);
        tracing::debug!(
            spiffe_id = %entry.spiffe_id, entry = %entry.id, serial = %serial,
            uid = caller.uid, pid = caller.pid, expires_at = %m.not_after,
            "issued X.509-SVID"
        );
        Ok(X509Svid {
            spiffe_id: entry.spiffe_id.clone(),
            chain_der: m.chain_der,
            key_pkcs8: m.key_pkcs8.as_ref().to_vec(),
            serial,
            not_before: m.not_before,
            expires_at: m.not_after,
            ttl,
            entry: Arc::clone(entry),
        })
    }

    /// Steps 2–5 for JWT: one JWT-SVID per identity (or only `requested`), for `audience`.
    pub fn issue_jwts(
        &self,
        caller: &Attestation,
        audience: &[String],
        requested: Option<&str>,
    ) -> Result<Vec<JwtSvid>, IssueError> {
        if audience.is_empty() {
            return Err(IssueError::InvalidArgument(
                "audience is required: give at least one audience the JWT-SVID is for".into(),
            ));
        }
        if audience.len() > MAX_AUDIENCES {
            return Err(IssueError::InvalidArgument(format!(
                "at most {MAX_AUDIENCES} audiences per request"
            )));
        }
        for a in audience {
            if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
                return Err(IssueError::InvalidArgument(format!(
                    "each audience must be 1 to {MAX_AUDIENCE_LEN} printable characters"
                )));
            }
        }
        let wanted = requested
            .map(|s| {
                SpiffeId::parse(s).map_err(|e| {
                    IssueError::InvalidArgument(format!(
                        "spiffe_id {:?} {e}",
                        s.chars().take(80).collect::<String>()
                    ))
                })
            })
            .transpose()?;
        let mut entries = self.identities(caller);
        if entries.is_empty() {
            return Err(IssueError::NoIdentity);
        }
        if let Some(w) = &wanted {
            entries.retain(|e| &e.spiffe_id == w);
            entries.truncate(1);
            if entries.is_empty() {
                return Err(IssueError::NotEntitled(w.to_string()));
            }
        } else {
            // One token per identity, not per entry: two entries granting the same ID would
            // otherwise produce indistinguishable duplicates.
            let mut seen = std::collections::HashSet::new();
            entries.retain(|e| seen.insert(e.spiffe_id.clone()));
        }
        let now = OffsetDateTime::now_utc();
        entries
            .iter()
            .map(|entry| {
                let ttl = entry.jwt_svid_ttl.unwrap_or(self.settings.jwt_svid_ttl);
                let jti = self.ca.random_id()?;
                let (token, exp) = self
                    .ca
                    .mint_jwt(&entry.spiffe_id, audience, ttl, now, &jti)?;
                tracing::debug!(
                    spiffe_id = %entry.spiffe_id, entry = %entry.id, jti = %jti,
                    uid = caller.uid, pid = caller.pid, "issued JWT-SVID"
                );
                Ok(JwtSvid {
                    spiffe_id: entry.spiffe_id.clone(),
                    token,
                    id: jti,
                    expires_at: exp,
                    entry: Arc::clone(entry),
                })
            })
            .collect()
    }
}
