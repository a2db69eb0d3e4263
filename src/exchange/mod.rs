//! RFC 8693 token exchange: an agent trades its user's (or pipeline's) token for a
//! credential scoped to one task.
//!
//! Owns the exchange rules, in order: request checks → the acting agent (attested caller, or
//! its JWT-SVID as `actor_token`) → the subject token (trusted OIDC issuer) → lifetime →
//! task ownership → policy, each scope on its own → approval for high-risk agents. What is
//! decided is then minted by [`crate::issuer`], the one issuance path. Adapters (HTTP form,
//! gRPC `tessera.v1.Tasks`) only translate to and from [`Request`] and [`ExchangeError`].

pub mod approvals;

pub use crate::lease::validate_task_id;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::attest::Attestation;
use crate::audit::Actor;
use crate::issuer::task::{Holder, TaskCredentials, TaskGrant};
use crate::issuer::{IssueError, Issuer, REDACTED};
use crate::lease::Kind;
use crate::oidc::{Subject, Verifier};
use crate::policy::{self, Engine};
use crate::registry::{Entry, Risk};
use crate::spiffe_id::SpiffeId;
use approvals::{Approval, Approvals, Check, Status};

/// `grant_type` of a token exchange.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type URI: a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Token type URI: an OIDC ID token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Token type URI: an access token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

const MAX_SCOPES: usize = 32;
const MAX_SCOPE_LEN: usize = 256;
/// The longest scope string: every scope at its longest, one space apart.
const MAX_SCOPE_STRING: usize = MAX_SCOPES * (MAX_SCOPE_LEN + 1);
const MAX_AUDIENCE_LEN: usize = 512;

/// An exchange request, as received (every field optional so that a missing one gets its own
/// error message). Its `Debug` leaves the subject token out.
#[derive(Default, Clone)]
pub struct Request {
    /// The user's or pipeline's token.
    pub subject_token: Option<String>,
    /// Its type URI.
    pub subject_token_type: Option<String>,
    /// The tool or API.
    pub audience: Option<String>,
    /// Space-separated scopes.
    pub scope: Option<String>,
    /// Task id.
    pub task_id: Option<String>,
    /// Requested lifetime in seconds (can only shorten).
    pub expires_in: Option<String>,
    /// `requested_token_type`.
    pub requested_token_type: Option<String>,
    /// Also mint a task X.509-SVID (gRPC only).
    pub x509: bool,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field(
                "subject_token",
                &self.subject_token.as_ref().map(|_| REDACTED),
            )
            .field("subject_token_type", &self.subject_token_type)
            .field("audience", &self.audience)
            .field("scope", &self.scope)
            .field("task_id", &self.task_id)
            .field("expires_in", &self.expires_in)
            .field("requested_token_type", &self.requested_token_type)
            .field("x509", &self.x509)
            .finish()
    }
}

/// Who is acting. Its `Debug` leaves a token out.
#[derive(Clone, Copy)]
pub enum ActorRef<'a> {
    /// An attested caller on the Workload API socket, optionally choosing one of its
    /// identities.
    Attested {
        /// The caller.
        caller: &'a Attestation,
        /// One of its SPIFFE IDs; `None` = its default identity.
        spiffe_id: Option<&'a str>,
    },
    /// A JWT-SVID presented as `actor_token` (HTTP).
    Token {
        /// The token.
        token: &'a str,
        /// `actor_token_type`.
        token_type: Option<&'a str>,
    },
}

impl std::fmt::Debug for ActorRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Attested { caller, spiffe_id } => f
                .debug_struct("Attested")
                .field("caller", caller)
                .field("spiffe_id", spiffe_id)
                .finish(),
            Self::Token { token_type, .. } => f
                .debug_struct("Token")
                .field("token", &REDACTED)
                .field("token_type", token_type)
                .finish(),
        }
    }
}

/// A successful exchange. Its `Debug` leaves the task token out.
pub struct Grant {
    /// The task token.
    pub access_token: String,
    /// `issued_token_type`.
    pub issued_token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Granted scopes (exactly those requested), space-separated.
    pub scope: String,
    /// The acting agent.
    pub agent: SpiffeId,
    /// Leases and the task X.509-SVID.
    pub credentials: TaskCredentials,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("access_token", &REDACTED)
            .field("issued_token_type", &self.issued_token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("agent", &self.agent)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Why an exchange was refused, in RFC 6749/8693 terms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// Missing or malformed parameter, or a bad or unacceptable subject or actor token.
    #[error("{0}")]
    InvalidRequest(String),
    /// The audience is refused.
    #[error("{0}")]
    InvalidTarget(String),
    /// Policy denied these scopes.
    #[error("scopes denied by policy: {}", .0.join(" "))]
    InvalidScope(Vec<String>),
    /// The scope parameter is missing or malformed (RFC 6749 §3.3: `invalid_scope`).
    #[error("{0}")]
    MalformedScope(String),
    /// A trusted OIDC issuer's keys cannot be fetched right now.
    #[error("{0}")]
    IssuerUnavailable(String),
    /// A high-risk agent's request waits for an operator.
    #[error("an operator must approve this request; retry the same request later (request_id {0})")]
    AuthorizationPending(String),
    /// An operator denied the request.
    #[error("an operator denied this request (request_id {0})")]
    AccessDenied(String),
    /// The attested caller has no identity (gRPC only).
    #[error("{0}")]
    NoIdentity(IssueError),
    /// The store or CA cannot record or sign now.
    #[error("{0}")]
    Unavailable(IssueError),
}

impl ExchangeError {
    /// The RFC 6749 §5.2 / RFC 8693 `error` code.
    pub fn oauth_code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::NoIdentity(_) => "invalid_request",
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidScope(_) | Self::MalformedScope(_) => "invalid_scope",
            Self::IssuerUnavailable(_) => "temporarily_unavailable",
            Self::AuthorizationPending(_) => "authorization_pending",
            Self::AccessDenied(_) => "access_denied",
            Self::Unavailable(_) => "temporarily_unavailable",
        }
    }
}

fn bad(m: impl Into<String>) -> ExchangeError {
    ExchangeError::InvalidRequest(m.into())
}

/// Settings from `[tasks]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Default task token lifetime.
    pub token_ttl: Duration,
    /// Daemon-wide cap.
    pub max_ttl: Duration,
    /// Tessera's issuer URL (`iss` of task tokens, audience of actor tokens).
    pub issuer_url: String,
}

/// The token exchange service.
#[derive(Debug)]
pub struct Exchanger {
    issuer: Arc<Issuer>,
    oidc: Arc<Verifier>,
    policy: Arc<Engine>,
    approvals: Arc<Approvals>,
    settings: Settings,
    /// Agent JWT-SVIDs whose signature, audience and subject were verified, by SHA-256 of the
    /// token: an agent presents the same JWT-SVID for many exchanges, and an ECDSA
    /// verification is most of an exchange's CPU. Expiry and the lease (revocation, kill) are
    /// still checked on every use.
    actors: dashmap::DashMap<[u8; 32], VerifiedActor>,
}

#[derive(Debug, Clone)]
struct VerifiedActor {
    id: SpiffeId,
    lease: crate::lease::LeaseId,
    exp: i64,
}

/// Bound on remembered actor tokens.
const ACTOR_CACHE_CAP: usize = 100_000;

/// Splits and checks an RFC 6749 §3.3 scope string; duplicates are dropped, order kept.
pub fn parse_scopes(s: &str) -> Result<Vec<String>, String> {
    // Checked before any work, and the count inside the loop: this runs before the caller
    // is authenticated, and dropping duplicates is quadratic in the number kept.
    if s.len() > MAX_SCOPE_STRING {
        return Err(format!(
            "scope must be at most {MAX_SCOPE_STRING} characters ({MAX_SCOPES} scopes of at most {MAX_SCOPE_LEN})"
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for tok in s.split(' ').filter(|t| !t.is_empty()) {
        if tok.len() > MAX_SCOPE_LEN {
            return Err(format!(
                "each scope must be at most {MAX_SCOPE_LEN} characters"
            ));
        }
        // scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        if !tok
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
        {
            return Err(format!(
                "scope {:?} has a character RFC 6749 does not allow (no quotes, backslashes or control characters)",
                tok.chars().take(64).collect::<String>()
            ));
        }
        if !out.iter().any(|o| o == tok) {
            if out.len() == MAX_SCOPES {
                return Err(format!("at most {MAX_SCOPES} scopes per request"));
            }
            out.push(tok.to_owned());
        }
    }
    if out.is_empty() {
        return Err("scope is required: list the space-separated scopes the task needs".into());
    }
    Ok(out)
}

/// A token type parameter must be present and one of `allowed`.
fn check_token_type(
    name: &str,
    value: Option<&str>,
    allowed: &[&str],
) -> Result<(), ExchangeError> {
    match value {
        Some(v) if allowed.contains(&v) => Ok(()),
        None | Some("") => Err(bad(format!("{name} is required (e.g. {})", allowed[0]))),
        Some(other) => Err(bad(format!(
            "{name} {:?} is not supported; use {} (a JWT)",
            other.chars().take(100).collect::<String>(),
            allowed.join(", ")
        ))),
    }
}

/// A request whose parameters passed [`check_request`]. Its `Debug` leaves the subject
/// token out.
#[derive(Clone)]
pub struct Checked {
    /// The subject token (not yet validated).
    pub subject_token: String,
    /// What will be issued.
    pub issued_token_type: &'static str,
    /// Valid task id.
    pub task_id: String,
    /// Audience.
    pub audience: String,
    /// Scopes, deduplicated, in order.
    pub scopes: Vec<String>,
    /// Requested lifetime.
    pub expires_in: Option<Duration>,
    /// Task X.509-SVID wanted.
    pub x509: bool,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("subject_token", &REDACTED)
            .field("issued_token_type", &self.issued_token_type)
            .field("task_id", &self.task_id)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("expires_in", &self.expires_in)
            .field("x509", &self.x509)
            .finish()
    }
}

/// Step 1 of an exchange: the parameters alone, before any token or state is looked at.
/// Pure, so it is fuzzed directly.
pub fn check_request(req: Request) -> Result<Checked, ExchangeError> {
    let subject_token = req.subject_token.filter(|s| !s.is_empty()).ok_or_else(|| {
        bad("subject_token is required: the OIDC token of the user or pipeline the agent acts for")
    })?;
    check_token_type(
        "subject_token_type",
        req.subject_token_type.as_deref(),
        &[TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN],
    )?;
    let issued_token_type = match req.requested_token_type.as_deref() {
        None | Some("") | Some(TOKEN_TYPE_ACCESS_TOKEN) => TOKEN_TYPE_ACCESS_TOKEN,
        Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
        Some(other) => {
            return Err(bad(format!(
                "requested_token_type {:?} cannot be issued; Tessera issues {TOKEN_TYPE_ACCESS_TOKEN} (a JWT)",
                other.chars().take(100).collect::<String>()
            )));
        }
    };
    let task_id = req
            .task_id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("task_id is required: the id of the task this credential is for ([A-Za-z0-9_-], 1 to 128 characters)"))?;
    validate_task_id(&task_id).map_err(bad)?;
    let audience = req
        .audience
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("audience is required: the tool or API the token is for"))?;
    // Shown to approving operators and written to the audit log, as the subject's `sub` is.
    if audience.len() > MAX_AUDIENCE_LEN
        || audience
            .chars()
            .any(|c| c.is_control() || crate::oidc::is_invisible_format(c))
    {
        return Err(ExchangeError::InvalidTarget(format!(
            "audience must be at most {MAX_AUDIENCE_LEN} printable characters, without \
             invisible or text-direction characters"
        )));
    }
    let scopes =
        parse_scopes(req.scope.as_deref().unwrap_or("")).map_err(ExchangeError::MalformedScope)?;
    let expires_in = match req.expires_in.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Some(Duration::from_secs(n)),
            _ => {
                return Err(bad(
                    "expires_in must be a positive number of seconds (it can only shorten the token's lifetime)",
                ));
            }
        },
    };

    Ok(Checked {
        subject_token,
        issued_token_type,
        task_id,
        audience,
        scopes,
        expires_in,
        x509: req.x509,
    })
}

impl Exchanger {
    /// Assembles the service.
    pub fn new(
        issuer: Arc<Issuer>,
        oidc: Arc<Verifier>,
        policy: Arc<Engine>,
        approvals: Arc<Approvals>,
        settings: Settings,
    ) -> Self {
        Self {
            issuer,
            oidc,
            policy,
            approvals,
            settings,
            actors: dashmap::DashMap::new(),
        }
    }

    /// Tessera's issuer URL.
    pub fn issuer_url(&self) -> &str {
        &self.settings.issuer_url
    }

    /// The issuance path (for introspection and revocation).
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// Pending and decided approvals.
    pub fn approvals(&self) -> &Arc<Approvals> {
        &self.approvals
    }

    /// Authenticates an agent by a JWT-SVID whose audience is Tessera's issuer (actor tokens
    /// and the Bearer token of introspection and revocation; `what` names which, for the
    /// record). Returns its entry and lease holder details. A token Tessera signed that is
    /// refused (expired, revoked, its identity killed or gone, another audience) is recorded as
    /// that agent's denial; one that does not verify names nobody and is not recorded.
    pub fn authenticate_agent(
        &self,
        token: &str,
        what: &'static str,
    ) -> Result<(Arc<Entry>, Holder), String> {
        let mut agent = None;
        let r = self.authenticate_agent_inner(token, &mut agent);
        if let (Err(e), Some(id)) = (&r, agent) {
            self.issuer.deny_actor(
                Actor::Presenter {
                    token_of: id.clone(),
                },
                &id,
                Kind::Task,
                &format!("{what} refused: {e}"),
                Vec::new(),
            );
        }
        r
    }

    /// [`Self::authenticate_agent`]; sets `agent` once the token is known to be Tessera's.
    fn authenticate_agent_inner(
        &self,
        token: &str,
        agent: &mut Option<String>,
    ) -> Result<(Arc<Entry>, Holder), String> {
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cached = self.actors.get(&digest).map(|v| v.clone());
        let VerifiedActor { id, lease, exp } = match cached {
            Some(v) => v,
            None => {
                let (id, claims) = self
                    .issuer
                    .validate_jwt(token, &self.settings.issuer_url)
                    .map_err(|e| {
                        // Signed by Tessera, refused for its audience, lifetime or lease: the
                        // holder it was issued to (an agent's task token: its actor).
                        *agent = self
                            .issuer
                            .verify_own_token(token)
                            .and_then(|t| t.holder().map(str::to_owned));
                        e.to_string()
                    })?;
                *agent = Some(id.to_string());
                // Tessera's issuer alone: another audience (a tool the agent called) could
                // otherwise replay the token here as the agent.
                let sole = match claims.get("aud") {
                    Some(Value::String(_)) => true,
                    Some(Value::Array(a)) => a.len() == 1,
                    _ => false,
                };
                if !sole {
                    return Err(format!(
                        "the JWT-SVID must have {} as its only audience; fetch one for it alone",
                        self.settings.issuer_url
                    ));
                }
                let lease = claims
                    .get("jti")
                    .and_then(Value::as_str)
                    .and_then(crate::lease::LeaseId::parse)
                    .ok_or("JWT-SVID has no jti")?;
                let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
                let v = VerifiedActor { id, lease, exp };
                if self.actors.len() >= ACTOR_CACHE_CAP {
                    self.actors.retain(|_, a| a.exp > now);
                    if self.actors.len() >= ACTOR_CACHE_CAP {
                        self.actors.clear();
                    }
                }
                self.actors.insert(digest, v.clone());
                v
            }
        };
        // Verified now or before: refused from here on, it is a known agent's token.
        *agent = Some(id.to_string());
        if exp <= now {
            return Err("JWT-SVID is not valid: it has expired".into());
        }
        if !self.issuer.leases().is_active(&lease, now) {
            return Err("JWT-SVID is not valid: it has been revoked".into());
        }
        let (l, entry) = self
            .issuer
            .entry_of_lease(&lease)
            .filter(|(l, _)| l.kind == Kind::Jwt)
            .ok_or_else(|| format!("{id} is no longer registered, has expired or is idle"))?;
        Ok((
            entry,
            Holder {
                uid: l.uid,
                pid: l.pid,
                exe: l.exe.clone(),
                actor: Actor::Agent {
                    spiffe_id: id.to_string(),
                },
                credential: Some(lease),
            },
        ))
    }

    /// Runs an exchange.
    pub async fn exchange(
        &self,
        req: Request,
        actor: ActorRef<'_>,
    ) -> Result<Grant, ExchangeError> {
        // 1. The request itself.
        let Checked {
            subject_token,
            issued_token_type,
            task_id,
            audience,
            scopes,
            expires_in,
            x509,
        } = check_request(req)?;

        // 2. The acting agent.
        let (entry, holder) = self.agent(actor)?;

        // 3. The subject.
        let subject = match self.oidc.validate(&subject_token).await {
            Ok(s) => s,
            Err(crate::oidc::OidcError::KeysUnavailable(e)) => {
                return Err(ExchangeError::IssuerUnavailable(format!(
                    "the subject token's issuer keys cannot be fetched right now: {e}"
                )));
            }
            Err(e) => {
                return Err(self.refuse(
                    &holder,
                    &entry,
                    &task_id,
                    format!("subject_token is not valid: {e}"),
                ));
            }
        };
        // RFC 8693 §4.1: a prior `act` must be an object naming its actor to be nested.
        if let Some(prev) = &subject.act
            && !prev.get("sub").is_some_and(Value::is_string)
        {
            return Err(self.refuse(
                &holder,
                &entry,
                &task_id,
                "subject_token has an act claim that is not an object with a sub".into(),
            ));
        }
        // The task token carries the subject's `sub` and is signed with the JWT-SVID key: a
        // `sub` naming a workload of this trust domain would make it read as that workload's
        // JWT-SVID to a verifier that ignores `typ` (RFC 8725 §2.8). Compared loosely (case,
        // a trailing slash), as a lenient verifier might: not only IDs that parse.
        let own = format!("spiffe://{}", entry.spiffe_id.trust_domain_name());
        let sub = subject.sub.to_ascii_lowercase();
        if sub == own
            || sub
                .strip_prefix(&own)
                .is_some_and(|rest| rest.starts_with('/'))
        {
            return Err(self.refuse(
                &holder,
                &entry,
                &task_id,
                "subject_token's sub is a SPIFFE ID of this trust domain; a task token \
                 cannot be issued for a workload identity"
                    .into(),
            ));
        }
        // Tessera's own tokens (were its issuer listed among the trusted ones) would pass
        // here without their leases being looked at: revoked, completed or killed, they
        // could be exchanged again. Delegation goes through actor tokens instead.
        if subject.iss.trim_end_matches('/') == self.settings.issuer_url.trim_end_matches('/') {
            return Err(self.refuse(
                &holder,
                &entry,
                &task_id,
                "subject_token was issued by this Tessera; its own tokens are not subject \
                 tokens (remove its issuer from [[oidc_issuers]])"
                    .into(),
            ));
        }

        // 4. Lifetime: the default, shortened by the request, the entry, the daemon's cap,
        //    and never past the subject token itself or the agent's entry.
        let mut ttl = self.settings.token_ttl.min(self.settings.max_ttl);
        if let Some(e) = expires_in {
            ttl = ttl.min(e);
        }
        if let Some(m) = entry.max_task_ttl {
            ttl = ttl.min(m);
        }
        let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
        let subject_left = u64::try_from(subject.exp - now_s).unwrap_or(0).max(1);
        ttl = ttl.min(Duration::from_secs(subject_left));
        ttl = entry
            .cap_ttl(ttl, time::OffsetDateTime::now_utc())
            .max(Duration::from_secs(1));

        // 5. A completed task gets nothing (checked again at issuance, under the barrier; this
        //    gives the early answer). Task ids are the agent's own: no other agent's task is
        //    in the way.
        let key = crate::lease::task_key(entry.spiffe_id.as_str(), &task_id);
        if self
            .issuer
            .leases()
            .task(&key)
            .is_some_and(|t| t.completed_ms.is_some())
        {
            return Err(self.refuse(
                &holder,
                &entry,
                &task_id,
                format!("task {task_id:?} is complete; it gets no more credentials"),
            ));
        }

        // 6. Policy: each scope on its own.
        let input = policy::Input {
            agent: entry.spiffe_id.as_str(),
            owner: entry.owner.as_deref().unwrap_or(""),
            purpose: entry.purpose.as_deref().unwrap_or(""),
            risk: entry.risk.map_or("", Risk::as_str),
            audience: &audience,
            task_id: &task_id,
            ttl_seconds: ttl.as_secs() as i64,
            subject: &subject.string_claims,
        };
        let decisions = self.policy.decide(&input, &scopes);
        let mut deciding: Vec<String> = Vec::new();
        for d in &decisions {
            for p in &d.policies {
                if !deciding.contains(p) {
                    deciding.push(p.clone());
                }
            }
        }
        let denied: Vec<String> = decisions
            .iter()
            .filter(|d| !d.allowed)
            .map(|d| d.scope.clone())
            .collect();
        let audit_details = vec![
            ("subject", json!({"iss": subject.iss, "sub": subject.sub})),
            ("audience", Value::from(audience.clone())),
            ("scopes", Value::from(scopes.clone())),
            ("policies", Value::from(deciding.clone())),
            ("ttl_seconds", Value::from(ttl.as_secs())),
        ];
        if !denied.is_empty() {
            let errors: Vec<String> = decisions.iter().flat_map(|d| d.errors.clone()).collect();
            let mut details = audit_details.clone();
            details.push(("denied_scopes", Value::from(denied.clone())));
            if !errors.is_empty() {
                details.push(("policy_errors", Value::from(errors)));
            }
            self.issuer.deny_actor(
                holder.actor.clone(),
                entry.spiffe_id.as_str(),
                Kind::Task,
                "scopes denied by policy",
                details,
            );
            return Err(ExchangeError::InvalidScope(denied));
        }

        // 7. A human in the loop for high-risk agents.
        let mut approval = None;
        if entry.risk == Some(Risk::High) {
            let proto = Approval {
                id: String::new(),
                agent: entry.spiffe_id.to_string(),
                task_id: task_id.clone(),
                subject_iss: subject.iss.clone(),
                subject_sub: subject.sub.clone(),
                audience: audience.clone(),
                scopes: scopes.clone(),
                ttl_seconds: ttl.as_secs(),
                requested_ttl: expires_in.map(|d| d.as_secs()),
                x509,
                created_ms: 0,
                expires_ms: 0,
                status: Status::Pending,
            };
            let new_id = crate::lease::LeaseId::random().to_string();
            match self.approvals.check(proto, now_s * 1000, new_id) {
                None => {
                    self.issuer.deny_actor(
                        holder.actor.clone(),
                        entry.spiffe_id.as_str(),
                        Kind::Task,
                        "approval queue full: too many requests are waiting for approval",
                        audit_details.clone(),
                    );
                    return Err(ExchangeError::Unavailable(IssueError::FailedPrecondition(
                        "too many requests are waiting for approval".into(),
                    )));
                }
                Some(Check::Filed(id)) => {
                    let mut details = audit_details.clone();
                    details.push(("request_id", Value::from(id.clone())));
                    self.issuer.record(
                        "approval_requested",
                        holder.actor.clone(),
                        entry.spiffe_id.as_str(),
                        details,
                    );
                    return Err(ExchangeError::AuthorizationPending(id));
                }
                Some(Check::Pending(id)) => return Err(ExchangeError::AuthorizationPending(id)),
                Some(Check::Denied(id)) => return Err(ExchangeError::AccessDenied(id)),
                Some(Check::Approved(a)) => {
                    // Never longer than the lifetime the operator was shown.
                    ttl = ttl.min(Duration::from_secs(a.ttl_seconds.max(1)));
                    approval = Some(a);
                }
            }
        }

        // 8. Mint, through the one issuance path.
        let claims = task_claims(
            &self.settings.issuer_url,
            &subject,
            &entry.spiffe_id,
            &audience,
            &scopes,
            &task_id,
        );
        let mut details = audit_details;
        if let Some(a) = &approval {
            details.push((
                "approval",
                json!({"request_id": a.id, "status": format!("{:?}", a.status)}),
            ));
        }
        let grant = TaskGrant {
            holder: holder.clone(),
            entry: Arc::clone(&entry),
            task_id: &task_id,
            ttl,
            not_after: subject.exp,
            claims,
            x509,
            audit: details,
        };
        match self.issuer.issue_task(grant).await {
            Ok(c) => {
                let expires_in =
                    u64::try_from(c.expires_at.unix_timestamp() - c.issued_at.unix_timestamp())
                        .unwrap_or(0);
                Ok(Grant {
                    access_token: c.token.clone(),
                    issued_token_type,
                    expires_in,
                    scope: scopes.join(" "),
                    agent: entry.spiffe_id.clone(),
                    credentials: c,
                })
            }
            Err(e) => {
                if let Some(a) = approval
                    && matches!(e, IssueError::Store(_) | IssueError::Ca(_))
                {
                    self.approvals.put_back(a);
                }
                Err(match e {
                    e @ (IssueError::Store(_) | IssueError::Ca(_)) => ExchangeError::Unavailable(e),
                    IssueError::Killed(id) => self.refuse(
                        &holder,
                        &entry,
                        &task_id,
                        format!("identity {id} is killed: it gets no credentials until an operator restores it"),
                    ),
                    other => self.refuse(&holder, &entry, &task_id, other.to_string()),
                })
            }
        }
    }

    /// Records a refusal of the request and returns it as `invalid_request`.
    fn refuse(
        &self,
        holder: &Holder,
        entry: &Entry,
        task_id: &str,
        reason: String,
    ) -> ExchangeError {
        self.issuer.deny_actor(
            holder.actor.clone(),
            entry.spiffe_id.as_str(),
            Kind::Task,
            &reason,
            vec![("task_id", Value::from(task_id))],
        );
        ExchangeError::InvalidRequest(reason)
    }

    fn agent(&self, actor: ActorRef<'_>) -> Result<(Arc<Entry>, Holder), ExchangeError> {
        match actor {
            ActorRef::Attested { caller, spiffe_id } => {
                let mut entries = self
                    .issuer
                    .entitled(caller, Kind::Task)
                    .map_err(ExchangeError::NoIdentity)?;
                if let Some(want) = spiffe_id.filter(|s| !s.is_empty()) {
                    crate::issuer::check_requested_id(want).map_err(ExchangeError::NoIdentity)?;
                    entries.retain(|e| e.spiffe_id.as_str() == want);
                    if entries.is_empty() {
                        let want: String = want.chars().take(200).collect();
                        self.issuer.deny_actor(
                            crate::issuer::workload_actor(caller),
                            &want,
                            Kind::Task,
                            "the caller holds no such identity",
                            Vec::new(),
                        );
                        return Err(ExchangeError::NoIdentity(IssueError::NotEntitled(want)));
                    }
                }
                let entry = Arc::clone(&entries[0]);
                Ok((
                    entry,
                    Holder {
                        uid: caller.uid,
                        pid: caller.pid,
                        exe: caller.exe_path.clone(),
                        actor: Actor::Workload {
                            uid: caller.uid,
                            pid: caller.pid,
                            exe: caller.exe_path.as_deref().map(str::to_owned),
                        },
                        credential: None,
                    },
                ))
            }
            ActorRef::Token { token, token_type } => {
                if token.is_empty() {
                    return Err(bad(
                        "actor_token is required: the agent's JWT-SVID whose audience is Tessera's issuer",
                    ));
                }
                check_token_type("actor_token_type", token_type, &[TOKEN_TYPE_JWT])?;
                self.authenticate_agent(token, "actor_token")
                    .map_err(|e| bad(format!("actor_token is not valid: {e}")))
            }
        }
    }
}

/// The task token's claims (without `iat`, `exp`, `jti`).
fn task_claims(
    iss: &str,
    subject: &Subject,
    agent: &SpiffeId,
    audience: &str,
    scopes: &[String],
    task_id: &str,
) -> Map<String, Value> {
    let mut act = Map::new();
    act.insert("sub".into(), agent.as_str().into());
    // RFC 8693 §4.1: a prior actor chain nests beneath the current actor.
    if let Some(prev) = &subject.act {
        act.insert("act".into(), prev.clone());
    }
    let mut m = Map::new();
    m.insert("iss".into(), iss.into());
    m.insert("sub".into(), subject.sub.clone().into());
    // `sub` alone is ambiguous when several issuers are trusted (each has its own "alice"):
    // RFC 9493's issuer-and-subject identifier says whose subject it is.
    m.insert(
        "sub_id".into(),
        serde_json::json!({"format": "iss_sub", "iss": subject.iss, "sub": subject.sub}),
    );
    m.insert("act".into(), Value::Object(act));
    // RFC 9068 §2.2 requires client_id in an at+jwt: the client is the agent, as
    // introspection reports it.
    m.insert("client_id".into(), agent.as_str().into());
    m.insert("aud".into(), audience.into());
    m.insert("scope".into(), scopes.join(" ").into());
    m.insert("txn".into(), task_id.into());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_token() {
        let secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0.c2lnbmF0dXJl";
        let req = Request {
            subject_token: Some(secret.into()),
            subject_token_type: Some(TOKEN_TYPE_ID_TOKEN.into()),
            audience: Some("https://api.example".into()),
            scope: Some("read".into()),
            task_id: Some("job-1".into()),
            ..Default::default()
        };
        let checked = check_request(req.clone()).unwrap();
        let actor = ActorRef::Token {
            token: secret,
            token_type: None,
        };
        for shown in [
            format!("{req:?}"),
            format!("{checked:?}"),
            format!("{actor:?}"),
        ] {
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn task_ids() {
        for ok in ["a", "task-1_B", &"x".repeat(128)] {
            validate_task_id(ok).unwrap();
        }
        for bad in ["", "a b", "a/b", "ü", ".", &"x".repeat(129)] {
            assert!(validate_task_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes() {
        assert_eq!(parse_scopes("b a  b").unwrap(), ["b", "a"]);
        assert!(parse_scopes("").is_err());
        assert!(parse_scopes("   ").is_err());
        assert!(parse_scopes("a\"b").is_err());
        assert!(parse_scopes("a\\b").is_err());
        assert!(parse_scopes("a\tb").is_err());
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        let err = parse_scopes(&many.join(" ")).unwrap_err();
        assert!(err.contains("at most 32 scopes"), "{err}");
        // 32 distinct scopes however often repeated are fine, within the length bound...
        let repeated = vec![many[..32].join(" "); 4].join(" ");
        assert_eq!(parse_scopes(&repeated).unwrap().len(), 32);
        // ...but a string longer than 32 scopes at their longest is refused before any work.
        let long = "a ".repeat(MAX_SCOPE_STRING / 2 + 1);
        let err = parse_scopes(&long).unwrap_err();
        assert!(err.contains("at most 8224 characters"), "{err}");
    }
}
