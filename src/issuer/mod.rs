//! THE issuance path. Every credential Tessera hands out, whichever API asked, comes from here:
//!
//! attest the caller → match registration entries (minus the kill list) → mint → lease
//! committed to the store (with its audit record) → lease live in memory → hand out.
//!
//! Keeping one path means a new endpoint cannot skip a step. The API adapters only translate
//! requests and errors; they never mint or match on their own. Operator actions (revocation,
//! kill switch, entries) live in [`control`] and share this module's barrier.
//!
//! The barrier: issuance holds it shared from the kill-list check until the lease is in the
//! table; a kill holds it exclusively. So a kill either sees a credential's lease (and revokes
//! it) or the credential was never handed out. Task completion and task-record pruning hold it
//! exclusively too, for the same reason.

pub mod control;
pub mod denials;
pub mod task;

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::RwLock;

use crate::attest::{AttestError, Attestation, Attestor, PeerInfo};
use crate::audit::{Actor, Event};
use crate::ca::{Ca, CaError};
use crate::config::EntrySpec;
use crate::lease::store::{Op, Store, StoreError, commit_issue};
use crate::lease::{Kind, Lease, LeaseId, LeaseTable, State};
use crate::metrics::Metrics;
use crate::registry::{Entry, Registry};
use crate::spiffe_id::{SpiffeId, TrustDomain};

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
    /// The identity is on the kill list.
    #[error("{0} is killed: it gets no credentials until an operator restores it")]
    Killed(String),
    /// Something named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot apply to the current state (e.g. editing a config-file entry).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The CA cannot sign.
    #[error("CA unavailable: {0}")]
    Ca(#[from] CaError),
    /// The task is complete.
    #[error("{0}")]
    TaskConflict(String),
    /// What the request would create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The lease could not be made durable, so nothing was handed out.
    #[error("lease store unavailable: {0}")]
    Store(#[from] StoreError),
    /// The change stopped before its end (a panic, or the daemon shutting down); whether it
    /// was recorded is unknown.
    #[error("the change was interrupted: {0}")]
    Interrupted(String),
}

/// An X.509-SVID ready to hand out.
pub struct X509Svid {
    /// Its lease.
    pub lease_id: LeaseId,
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

/// What `Debug` shows for a bearer token: a log line or error that formats a credential or a
/// request must not hand the token to whoever reads it.
pub(crate) const REDACTED: &str = "<redacted>";

/// A JWT-SVID ready to hand out. Its `Debug` leaves the token out.
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

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("token", &REDACTED)
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .field("entry", &self.entry.id)
            .finish()
    }
}

/// A stored entry that no longer validates against the daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry {
    /// The id it is stored under, by which it can be deleted or replaced.
    pub id: String,
    /// As stored, if it could be read: the inventory's clue to what the entry was.
    pub spiffe_id: Option<String>,
    /// Why it no longer validates.
    pub reason: String,
}

/// Daemon-wide issuance settings.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// Trust domain (for entries created through the admin API).
    pub trust_domain: TrustDomain,
    /// Default X.509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
    /// An entry with no issuance for this long is idle.
    pub idle_after: Duration,
    /// Idle entries grant nothing until reviewed.
    pub refuse_idle: bool,
}

/// Entry activity is made durable at most this often per entry: enough resolution for an
/// idle period measured in days, without a write per credential.
const ACTIVITY_RESOLUTION_MS: i64 = 3600 * 1000;

/// Maximum audiences per JWT request, and maximum length of one: bounds token size. An
/// audience may be a SPIFFE ID (the JWT-SVID standard suggests one), which implementations
/// must support up to 2048 bytes (review BG-4).
const MAX_AUDIENCES: usize = 16;
const MAX_AUDIENCE_LEN: usize = 2048;

/// The parameters of a JWT-SVID request alone: audiences present, bounded and printable; the
/// requested SPIFFE ID, if any, well-formed. Pure, so it is fuzzed directly.
pub fn check_jwt_request(
    audience: &[String],
    requested: Option<&str>,
) -> Result<Option<SpiffeId>, IssueError> {
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
    requested.map(check_requested_id).transpose()
}

/// A caller's choice among its identities (`spiffe_id` of a request) is a SPIFFE ID, or the
/// request is invalid: told apart from a well-formed identity the caller does not hold.
pub fn check_requested_id(s: &str) -> Result<SpiffeId, IssueError> {
    SpiffeId::parse(s).map_err(|e| {
        IssueError::InvalidArgument(format!(
            "spiffe_id {:?} {e}",
            s.chars().take(80).collect::<String>()
        ))
    })
}

/// The issuance path and the parts it needs.
#[derive(Debug)]
pub struct Issuer {
    attestor: Arc<Attestor>,
    registry: Arc<Registry>,
    ca: Arc<Ca>,
    leases: Arc<LeaseTable>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    settings: IssuerSettings,
    barrier: RwLock<()>,
    /// Held shared while a kill marks its leases in the background; a restore takes it
    /// exclusively so that it never lifts a kill whose leases are not yet marked revoked.
    kill_marking: Arc<RwLock<()>>,
    /// Entries from the config file (read-only) and from the store (editable).
    config_entries: Vec<Entry>,
    stored_entries: std::sync::Mutex<Vec<(Entry, EntrySpec)>>,
    /// Stored entries that no longer validate (say, after a trust-domain change): they grant
    /// nothing, but can be deleted or replaced through the admin API.
    invalid_entries: std::sync::Mutex<Vec<InvalidEntry>>,
    /// Per entry id: last issuance or review, and when that was last made durable (Unix ms).
    activity: dashmap::DashMap<Arc<str>, (i64, i64)>,
    /// How many refusals each caller may still write to the audit log.
    denials: denials::DenialLimiter,
    /// One entry change (create, update, delete) at a time, check to publish.
    entry_edits: tokio::sync::Mutex<()>,
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The audit actor of an attested caller.
pub fn workload_actor(c: &Attestation) -> Actor {
    Actor::Workload {
        uid: c.uid,
        pid: c.pid,
        exe: c.exe_path.as_deref().map(str::to_owned),
    }
}

impl Issuer {
    /// Assembles the path. `stored_entries` come from the lease store.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        attestor: Arc<Attestor>,
        registry: Arc<Registry>,
        ca: Arc<Ca>,
        leases: Arc<LeaseTable>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        settings: IssuerSettings,
        config_entries: Vec<Entry>,
        stored_entries: Vec<(Entry, EntrySpec)>,
    ) -> Self {
        let this = Self {
            attestor,
            registry,
            ca,
            leases,
            store,
            metrics,
            settings,
            barrier: RwLock::new(()),
            kill_marking: Arc::new(RwLock::new(())),
            config_entries,
            stored_entries: std::sync::Mutex::new(stored_entries),
            invalid_entries: std::sync::Mutex::default(),
            activity: dashmap::DashMap::new(),
            denials: denials::DenialLimiter::default(),
            entry_edits: tokio::sync::Mutex::new(()),
        };
        this.publish_entries();
        this
    }

    /// Restores entry activity at start; entries never seen before start their idle clock
    /// now (recorded, so a restart does not reset it).
    pub fn init_activity(&self, recorded: Vec<(String, i64)>) {
        let mut ops = Vec::new();
        let known: std::collections::HashSet<&str> =
            recorded.iter().map(|(i, _)| i.as_str()).collect();
        for (id, ms) in &recorded {
            // Upgrade from positional ids (`config-N`): the clock of the N-th file entry
            // moves to its id, so an entry refused as idle stays refused until reviewed.
            let legacy = id
                .strip_prefix("config-")
                .filter(|n| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(e) = legacy.and_then(|n| self.config_entries.get(n))
                && !known.contains(&*e.id)
            {
                self.activity.insert(Arc::clone(&e.id), (*ms, *ms));
                ops.push(Op::EntryActive {
                    id: e.id.to_string(),
                    at_ms: *ms,
                });
                ops.push(Op::DeleteEntry(id.clone()));
                continue;
            }
            self.activity.insert(Arc::from(id.as_str()), (*ms, *ms));
        }
        let now = now_ms();
        for (e, _) in self.entries() {
            if !self.activity.contains_key(&e.id) {
                self.activity.insert(Arc::clone(&e.id), (now, now));
                ops.push(Op::EntryActive {
                    id: e.id.to_string(),
                    at_ms: now,
                });
            }
        }
        if !ops.is_empty() {
            drop(self.store.submit(ops));
        }
    }

    /// A durable record of `entry`'s activity at `now_ms`, if one is due (at most hourly).
    /// Memory moves only once the issuance is committed ([`Self::touched`]): a failed commit
    /// issued nothing, and must neither make the entry look active nor hold back its record.
    fn activity_op(&self, entry: &Entry, now_ms: i64) -> Option<Op> {
        let recorded = self.activity.get(&*entry.id).map_or(0, |slot| slot.1);
        (now_ms - recorded >= ACTIVITY_RESOLUTION_MS).then(|| Op::EntryActive {
            id: entry.id.to_string(),
            at_ms: now_ms,
        })
    }

    /// After an issuance under `entry` was committed: its idle clock, and, when the commit
    /// carried [`Self::activity_op`]'s record, when the clock was last made durable.
    fn touched(&self, entry: &Entry, now_ms: i64, recorded: bool) {
        let mut slot = self.activity.entry(Arc::clone(&entry.id)).or_insert((0, 0));
        slot.0 = slot.0.max(now_ms);
        if recorded {
            slot.1 = slot.1.max(now_ms);
        }
    }

    /// Last issuance or review of an entry, Unix ms.
    pub fn last_active(&self, entry_id: &str) -> Option<i64> {
        self.activity.get(entry_id).map(|v| v.0)
    }

    /// Idle: no issuance or review for `[inventory] idle_after`.
    pub fn is_idle(&self, entry: &Entry, now_ms: i64) -> bool {
        self.last_active(&entry.id).is_some_and(|t| {
            now_ms.saturating_sub(t)
                > i64::try_from(self.settings.idle_after.as_millis()).unwrap_or(i64::MAX)
        })
    }

    fn is_idle_refused(&self, entry: &Entry, now_ms: i64) -> bool {
        self.settings.refuse_idle && self.is_idle(entry, now_ms)
    }

    /// The CA (bundles, validation).
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The registry (entries and their change feed).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The lease table.
    pub fn leases(&self) -> &Arc<LeaseTable> {
        &self.leases
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Step 1: who is calling. A failure is recorded as a denial.
    pub async fn attest(&self, peer: Option<&PeerInfo>) -> Result<Arc<Attestation>, IssueError> {
        let result = match peer {
            Some(p) => self
                .attestor
                .attest(p, |a| {
                    self.registry.wants_hash(a, OffsetDateTime::now_utc())
                })
                .await
                .map_err(IssueError::from),
            None => Err(AttestError::NoPid.into()),
        };
        if let Err(e) = &result {
            let (uid, pid) = peer.map_or((u32::MAX, 0), |p| (p.uid, p.pid));
            self.audit_denial(
                Event::now(
                    "deny",
                    Actor::Workload {
                        uid,
                        pid,
                        exe: None,
                    },
                )
                .reason(e.to_string()),
            );
        }
        result
    }

    /// Step 2: which identities the caller holds now, in match order (first is the default),
    /// without killed ones. Two entries granting the same SPIFFE ID are one identity: the
    /// first in match order (its TTLs and hint) grants it, so no response carries duplicates.
    pub fn identities(&self, caller: &Attestation) -> Vec<Arc<Entry>> {
        let mut v = self.registry.matching(caller, OffsetDateTime::now_utc());
        let now = now_ms();
        v.retain(|e| !self.leases.is_killed(&e.spiffe_id) && !self.is_idle_refused(e, now));
        if v.len() > 1 {
            let mut seen = std::collections::HashSet::with_capacity(v.len());
            v.retain(|e| seen.insert(e.spiffe_id.as_str().to_owned()));
        }
        v
    }

    /// Like [`Issuer::identities`], but no identity is an error, recorded as a denial of `kind`.
    pub fn entitled(
        &self,
        caller: &Attestation,
        kind: Kind,
    ) -> Result<Vec<Arc<Entry>>, IssueError> {
        let v = self.identities(caller);
        if v.is_empty() {
            self.deny(caller, kind, "no identity issued");
            return Err(IssueError::NoIdentity);
        }
        Ok(v)
    }

    /// Records a refusal (audit and metrics), without waiting for the disk.
    pub fn deny(&self, caller: &Attestation, kind: Kind, reason: &str) {
        self.metrics.denied(kind);
        self.audit_denial(
            Event::now("deny", workload_actor(caller))
                .reason(reason)
                .detail("kind", kind.as_str()),
        );
    }

    /// Records a refusal by an actor other than an attested caller (token exchange).
    pub fn deny_actor(
        &self,
        actor: Actor,
        spiffe_id: &str,
        kind: Kind,
        reason: &str,
        details: Vec<(&'static str, serde_json::Value)>,
    ) {
        self.metrics.denied(kind);
        let mut ev = Event::now("deny", actor)
            .spiffe_id(spiffe_id)
            .reason(reason)
            .detail("kind", kind.as_str());
        for (k, v) in details {
            ev = ev.detail(k, v);
        }
        self.audit_denial(ev);
    }

    /// Records a refused call on the admin API.
    pub fn deny_operator(&self, uid: u32, pid: Option<i32>, reason: &str) {
        let actor = Actor::Operator {
            uid,
            pid,
            gid: None,
        };
        self.audit_denial(Event::now("deny", actor).reason(reason));
    }

    /// Records a refusal within the caller's share of the audit log ([`denials`]); past it,
    /// the refusal is counted and reported with the caller's next recorded one.
    fn audit_denial(&self, ev: Event) {
        let caller = match &ev.actor {
            Actor::Workload { uid, .. } => format!("uid:{uid}"),
            Actor::Operator { uid, .. } => format!("operator:{uid}"),
            Actor::Agent { spiffe_id } => spiffe_id.clone(),
            // A share of its own: a copy of an agent's old token replayed by anyone must not
            // use up the share of the agent's own refusals.
            Actor::Presenter { token_of } => format!("presented:{token_of}"),
            Actor::Daemon => return self.audit_only(ev),
        };
        match self.denials.admit(&caller, std::time::Instant::now()) {
            Some(0) => self.audit_only(ev),
            Some(n) => self.audit_only(ev.detail("refusals_left_out_before", n)),
            None => self.metrics.refusal_left_out(),
        }
    }

    /// Records an event that hands out nothing (approval requests and decisions).
    pub fn record(
        &self,
        event: &'static str,
        actor: Actor,
        spiffe_id: &str,
        details: Vec<(&'static str, serde_json::Value)>,
    ) {
        let mut ev = Event::now(event, actor);
        if !spiffe_id.is_empty() {
            ev = ev.spiffe_id(spiffe_id);
        }
        for (k, v) in details {
            ev = ev.detail(k, v);
        }
        self.audit_only(ev);
    }

    fn audit_only(&self, ev: Event) {
        // Fire and forget: a denial must not wait for an fsync, and losing the last few
        // denials in a crash loses no credential.
        drop(self.store.submit(vec![Op::Audit(ev)]));
    }

    fn new_lease(
        &self,
        caller: &Attestation,
        entry: &Entry,
        kind: Kind,
        issued_at: i64,
        expires_at: i64,
    ) -> Lease {
        Lease {
            id: LeaseId::random(),
            kind,
            state: State::Active,
            uid: caller.uid,
            pid: caller.pid,
            issued_at,
            expires_at,
            spiffe_id: self.leases.intern_identity(entry.spiffe_id.as_str()),
            entry_id: Arc::clone(&entry.id),
            exe: caller.exe_path.clone(),
            task_id: None,
            serial: None,
            revocation: None,
            // Under the issuance barrier, which a kill holds until its epoch is in force.
            kill_epoch: self.leases.kill_epoch(),
        }
    }

    /// Steps 3–5 for X.509: mint one SVID with a fresh key for `entry`, commit its lease,
    /// hand it out.
    pub async fn issue_x509(
        &self,
        caller: &Attestation,
        entry: &Arc<Entry>,
    ) -> Result<X509Svid, IssueError> {
        let _shared = self.barrier.read().await;
        if self.leases.is_killed(&entry.spiffe_id) {
            self.deny(caller, Kind::X509, "identity is killed");
            return Err(IssueError::Killed(entry.spiffe_id.to_string()));
        }
        let now = OffsetDateTime::now_utc();
        // Matched a moment ago; it may have been edited, deleted or have expired since.
        let Some(entry) = &self.registry.current(entry) else {
            self.deny(caller, Kind::X509, "entry changed");
            return Err(IssueError::NoIdentity);
        };
        if !entry.is_live(now) {
            self.deny(caller, Kind::X509, "entry expired");
            return Err(IssueError::NoIdentity);
        }
        let ttl = entry.cap_ttl(
            entry.x509_svid_ttl.unwrap_or(self.settings.x509_svid_ttl),
            now,
        );
        let m = self.ca.mint_x509(&entry.spiffe_id, ttl, now)?;
        let serial = hex::encode(m.serial);
        let mut lease = self.new_lease(
            caller,
            entry,
            Kind::X509,
            now.unix_timestamp(),
            m.not_after.unix_timestamp(),
        );
        lease.serial = Some(Box::new(m.serial));
        let ev = Event::now("issue", workload_actor(caller))
            .spiffe_id(entry.spiffe_id.as_str())
            .lease(lease.id.to_string())
            .detail("kind", Kind::X509.as_str())
            .detail("serial", serial.clone())
            .detail("entry", &*entry.id)
            .detail("expires_at", lease.expires_at);
        let lease_id = lease.id;
        let mut ops = vec![Op::PutLease(lease.clone()), Op::Audit(ev)];
        let now_ms = now_ms();
        let record = self.activity_op(entry, now_ms);
        let recorded = record.is_some();
        ops.extend(record);
        commit_issue(&self.store, ops, vec![lease_id]).await?;
        self.touched(entry, now_ms, recorded);
        self.leases.insert(lease);
        self.metrics.issued(Kind::X509, 1);
        Ok(X509Svid {
            lease_id,
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
    /// All tokens' leases are committed together before any token is returned.
    pub async fn issue_jwts(
        &self,
        caller: &Attestation,
        audience: &[String],
        requested: Option<&str>,
    ) -> Result<Vec<JwtSvid>, IssueError> {
        let wanted = check_jwt_request(audience, requested)?;
        let mut entries = self.entitled(caller, Kind::Jwt)?;
        if let Some(w) = &wanted {
            entries.retain(|e| &e.spiffe_id == w);
            entries.truncate(1);
            if entries.is_empty() {
                self.deny(caller, Kind::Jwt, "not entitled to the requested identity");
                return Err(IssueError::NotEntitled(w.to_string()));
            }
        }
        let _shared = self.barrier.read().await;
        let now = OffsetDateTime::now_utc();
        // As they are in force now (edited or deleted meanwhile), unless killed or expired.
        let entries: Vec<Arc<Entry>> = entries
            .iter()
            .filter_map(|e| self.registry.current(e))
            .filter(|e| !self.leases.is_killed(&e.spiffe_id) && e.is_live(now))
            .collect();
        if entries.is_empty() {
            return Err(IssueError::NoIdentity);
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut ops = Vec::with_capacity(entries.len() * 2);
        let mut leases = Vec::with_capacity(entries.len());
        for entry in &entries {
            let ttl = entry.cap_ttl(
                entry.jwt_svid_ttl.unwrap_or(self.settings.jwt_svid_ttl),
                now,
            );
            let lease_id = LeaseId::random();
            let jti = lease_id.to_string();
            let (token, exp) = self
                .ca
                .mint_jwt(&entry.spiffe_id, audience, ttl, now, &jti)?;
            let mut lease = self.new_lease(
                caller,
                entry,
                Kind::Jwt,
                now.unix_timestamp(),
                exp.unix_timestamp(),
            );
            lease.id = lease_id;
            ops.push(Op::PutLease(lease.clone()));
            ops.push(Op::Audit(
                Event::now("issue", workload_actor(caller))
                    .spiffe_id(entry.spiffe_id.as_str())
                    .lease(jti.clone())
                    .detail("kind", Kind::Jwt.as_str())
                    .detail("audience", audience.to_vec())
                    .detail("entry", &*entry.id)
                    .detail("expires_at", lease.expires_at),
            ));
            leases.push(lease);
            out.push(JwtSvid {
                spiffe_id: entry.spiffe_id.clone(),
                token,
                id: jti,
                expires_at: exp,
                entry: Arc::clone(entry),
            });
        }
        let now_ms = now_ms();
        let recorded: Vec<bool> = entries
            .iter()
            .map(|entry| {
                let record = self.activity_op(entry, now_ms);
                let due = record.is_some();
                ops.extend(record);
                due
            })
            .collect();
        commit_issue(&self.store, ops, leases.iter().map(|l| l.id).collect()).await?;
        for (entry, recorded) in entries.iter().zip(recorded) {
            self.touched(entry, now_ms, recorded);
        }
        for l in leases {
            self.leases.insert(l);
        }
        self.metrics.issued(Kind::Jwt, out.len() as u64);
        Ok(out)
    }

    /// Validates a JWT-SVID: signature, audience and expiry (the standard), and that its lease
    /// is still active (Tessera's revocation).
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), IssueError> {
        let now = OffsetDateTime::now_utc();
        let (id, claims) = self
            .ca
            .validate_jwt(token, audience, now)
            .map_err(|e| IssueError::InvalidArgument(format!("JWT-SVID is not valid: {e}")))?;
        // The lease must be this identity's JWT-SVID: a task token or another identity's
        // credential signed by the same key does not pass for one.
        let active = claims
            .get("jti")
            .and_then(|v| v.as_str())
            .and_then(LeaseId::parse)
            .is_some_and(|l| {
                self.leases
                    .is_active_for(&l, Kind::Jwt, id.as_str(), now.unix_timestamp())
                    // And the entry that granted it still grants (as for introspection): a
                    // deleted, expired or idle-refused entry's tokens stop validating.
                    && self.entry_of_lease(&l).is_some()
            });
        if !active {
            return Err(IssueError::InvalidArgument(
                "JWT-SVID is not valid: it has been revoked, its entry no longer grants it, or \
                 its jti is not a JWT-SVID lease of its subject"
                    .into(),
            ));
        }
        Ok((id, claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::store::Held;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_audience_may_be_a_spiffe_id_of_the_longest_length() {
        // SPIFFE IDs are supported up to 2048 bytes, and the JWT-SVID standard suggests them as
        // audiences (review BG-4).
        let id = |len: usize| {
            let head = "spiffe://td.test/";
            format!("{head}{}", "a".repeat(len - head.len()))
        };
        check_jwt_request(&[id(2048)], None).unwrap();
        assert!(check_jwt_request(&[id(2049)], None).is_err());
    }

    fn issuer(dir: &std::path::Path, store: Arc<dyn Store>, config: Vec<Entry>) -> Arc<Issuer> {
        let td = TrustDomain::parse("td.test").unwrap();
        let ca = Arc::new(Ca::load_or_create(&td, dir, None, Duration::from_secs(3600)).unwrap());
        Arc::new(Issuer::new(
            Arc::new(Attestor::new(1 << 30)),
            Arc::new(Registry::new(Vec::new())),
            ca,
            Arc::new(LeaseTable::new()),
            store,
            Arc::new(Metrics::with_store_commits(Default::default())),
            IssuerSettings {
                trust_domain: td,
                x509_svid_ttl: Duration::from_secs(600),
                jwt_svid_ttl: Duration::from_secs(300),
                idle_after: Duration::from_secs(86_400),
                refuse_idle: false,
            },
            config,
            Vec::new(),
        ))
    }

    /// Answers the next job the held store gets (waiting for it), and returns its ops.
    async fn answer_next(held: &Held) -> Vec<Op> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((ops, done)) = held.jobs.lock().unwrap().pop() {
                let _ = done.send(Ok(()));
                return ops;
            }
            assert!(std::time::Instant::now() < deadline, "no commit came");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_certificate_reaped_while_its_revocation_commits_is_kept_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::default());
        let i = issuer(dir.path(), held.clone(), Vec::new());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let l = Lease {
            id: LeaseId::random(),
            kind: Kind::X509,
            state: State::Active,
            uid: 1,
            pid: 2,
            issued_at: now - 60,
            expires_at: now,
            spiffe_id: i.leases().intern_identity("spiffe://td.test/w"),
            entry_id: "e".into(),
            exe: None,
            task_id: None,
            serial: Some(Box::new([9; 16])),
            revocation: None,
            kill_epoch: 0,
        };
        let id = l.id;
        i.leases().insert(l);
        let revoking = tokio::spawn({
            let i = Arc::clone(&i);
            async move {
                i.revoke_lease(&id.to_string(), Actor::Daemon, "leaked")
                    .await
            }
        });
        // The revocation waits for its commit; the reaper retires the lease meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (removed, _) = i.leases().expire_due(now + 1, 16);
        assert_eq!(removed, vec![id]);
        assert!(matches!(answer_next(&held).await[0], Op::Revoke(..)));
        // Put back, revoked, in the store and in memory: on the CRL past its expiry.
        let ops = answer_next(&held).await;
        assert!(
            matches!(&ops[..], [Op::PutLease(p)] if p.id == id && p.state == State::Revoked),
            "{ops:?}"
        );
        let revoked = revoking.await.unwrap().unwrap();
        assert_eq!(revoked.state, State::Revoked);
        assert_eq!(i.leases().get(&id).map(|l| l.state), Some(State::Revoked));
        assert_eq!(i.leases().revoked_serials(now + 1).len(), 1);
    }

    #[tokio::test]
    async fn a_positional_config_entry_clock_moves_to_the_entry_at_that_place() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::default());
        let td = TrustDomain::parse("td.test").unwrap();
        let entry = |id: &str| Entry {
            id: id.into(),
            ..crate::config::default_entry_for_current_user(&td)
        };
        let i = issuer(
            dir.path(),
            held.clone(),
            vec![entry("config-aaaaaaaaaaaa"), entry("config-bbbbbbbbbbbb")],
        );
        i.init_activity(vec![("config-1".into(), 1_000)]);
        assert_eq!(i.last_active("config-bbbbbbbbbbbb"), Some(1_000));
        assert!(
            i.last_active("config-aaaaaaaaaaaa").unwrap() > 1_000,
            "a new clock"
        );
        assert_eq!(i.last_active("config-1"), None);
        let ops = held.jobs.lock().unwrap().pop().unwrap().0;
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::DeleteEntry(id) if id == "config-1"))
        );
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_the_idle_clock_and_its_record_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::default());
        let td = TrustDomain::parse("td.test").unwrap();
        let entry = crate::config::default_entry_for_current_user(&td);
        let issuer = issuer(dir.path(), held.clone(), vec![entry.clone()]);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        let caller = issuer.attest(Some(&peer)).await.unwrap();
        // Answers the next commit with `result`; returns whether it carried an activity record.
        let answer = |result: Result<(), crate::lease::store::StoreError>| {
            let held = Arc::clone(&held);
            async move {
                let job = loop {
                    if let Some(j) = held.jobs.lock().unwrap().pop() {
                        break j;
                    }
                    tokio::task::yield_now().await;
                };
                let recorded = job.0.iter().any(|op| matches!(op, Op::EntryActive { .. }));
                job.1.send(result).unwrap();
                recorded
            }
        };
        let issuing = tokio::spawn({
            let (issuer, caller) = (Arc::clone(&issuer), Arc::clone(&caller));
            async move { issuer.issue_jwts(&caller, &["aud".into()], None).await }
        });
        assert!(answer(Err(crate::lease::store::StoreError::Closed)).await);
        assert!(issuing.await.unwrap().is_err());
        assert_eq!(issuer.last_active(&entry.id), None, "nothing was issued");
        // The next issuance still carries the record the failed one did not make durable.
        let issuing = tokio::spawn({
            let (issuer, caller) = (Arc::clone(&issuer), Arc::clone(&caller));
            async move { issuer.issue_jwts(&caller, &["aud".into()], None).await }
        });
        assert!(answer(Ok(())).await);
        assert_eq!(issuing.await.unwrap().unwrap().len(), 1);
        assert!(issuer.last_active(&entry.id).is_some());
    }

    #[tokio::test]
    async fn a_credential_is_handed_out_only_once_its_lease_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let held = Arc::new(Held::default());
        let td = TrustDomain::parse("td.test").unwrap();
        let issuer = issuer(
            dir.path(),
            held.clone(),
            vec![crate::config::default_entry_for_current_user(&td)],
        );
        let leases = Arc::clone(issuer.leases());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(a.as_raw_fd()).unwrap();
        let caller = issuer.attest(Some(&peer)).await.unwrap();
        for x509 in [false, true] {
            let minting = tokio::spawn({
                let (issuer, caller) = (Arc::clone(&issuer), Arc::clone(&caller));
                async move {
                    if x509 {
                        let entry = issuer.entitled(&caller, Kind::X509)?.remove(0);
                        issuer.issue_x509(&caller, &entry).await.map(|_| 1)
                    } else {
                        issuer
                            .issue_jwts(&caller, &["aud".into()], None)
                            .await
                            .map(|v| v.len())
                    }
                }
            });
            // The lease is submitted, and nothing comes back while it is not on disk.
            let job = loop {
                if let Some(j) = held.jobs.lock().unwrap().pop() {
                    break j;
                }
                tokio::task::yield_now().await;
            };
            let id = job.0.iter().find_map(|op| match op {
                Op::PutLease(l) => Some(l.id),
                _ => None,
            });
            let id = id.expect("the issuance submits its lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!minting.is_finished(), "handed out before the commit");
            assert!(leases.get(&id).is_none(), "in the table before the commit");
            job.1.send(Ok(())).unwrap();
            assert_eq!(minting.await.unwrap().unwrap(), 1);
            assert!(leases.get(&id).is_some());
        }
    }
}
