//! Task credentials on the issuance path: a task token (and optionally a task X.509-SVID)
//! minted for an agent, leased to its task, committed before it is handed out; task
//! completion; forgetting task records past their retention; and the checks on tokens
//! Tessera signed (introspection, revocation).
//!
//! The exchange rules (subject token, policy, approvals, TTL) are decided before this point by
//! [`crate::exchange`]; this module only mints what was decided, under the same barrier and
//! kill list as every other credential.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::{IssueError, Issuer, X509Svid, now_ms};
use crate::audit::{Actor, Event};
use crate::jose;
use crate::lease::store::{Op, commit, commit_issue};
use crate::lease::{Kind, Lease, LeaseId, Revocation, State, TaskClaim};
use crate::registry::Entry;
use crate::spiffe_id::SpiffeId;

/// Task records deleted per store commit (and per hold of the exclusive barrier).
const PRUNE_CHUNK: usize = 2_000;

/// Who holds a task credential, for its lease and audit records.
#[derive(Debug, Clone)]
pub struct Holder {
    /// uid of the agent process.
    pub uid: u32,
    /// pid of the agent process.
    pub pid: i32,
    /// Its executable, if known.
    pub exe: Option<Arc<str>>,
    /// Audit actor.
    pub actor: Actor,
    /// The lease of the JWT-SVID the agent authenticated with, when it did so by token.
    pub credential: Option<LeaseId>,
}

/// What to mint: decided by the exchange.
#[derive(Debug)]
pub struct TaskGrant<'a> {
    /// The agent.
    pub holder: Holder,
    /// The agent's entry.
    pub entry: Arc<Entry>,
    /// Task id (already validated).
    pub task_id: &'a str,
    /// Lifetime (already capped).
    pub ttl: Duration,
    /// Unix seconds the credentials may not outlive (the subject token's `exp`), checked
    /// again at mint: `ttl` was capped from an earlier clock reading. A subject token within
    /// its leeway still gets one second.
    pub not_after: i64,
    /// Token claims except `iat`, `exp` and `jti`, which are set here.
    pub claims: Map<String, Value>,
    /// Also mint a task X.509-SVID.
    pub x509: bool,
    /// Extra audit details (subject, audience, scopes, deciding policies).
    pub audit: Vec<(&'static str, Value)>,
}

/// What was minted. Its `Debug` leaves the token out (the X.509-SVID's hides its key).
pub struct TaskCredentials {
    /// Compact JWS.
    pub token: String,
    /// Its lease (= `jti`).
    pub lease_id: LeaseId,
    /// `iat`.
    pub issued_at: OffsetDateTime,
    /// `exp`.
    pub expires_at: OffsetDateTime,
    /// Task X.509-SVID, when asked for.
    pub x509: Option<X509Svid>,
}

impl std::fmt::Debug for TaskCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCredentials")
            .field("token", &super::REDACTED)
            .field("lease_id", &self.lease_id)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("x509", &self.x509)
            .finish()
    }
}

/// A token Tessera signed, with its signature verified.
#[derive(Debug, Clone)]
pub struct OwnToken {
    /// Its claims.
    pub claims: Map<String, Value>,
    /// Its lease (`jti`).
    pub lease_id: LeaseId,
    /// Not expired and its lease active: there is something left to revoke.
    pub revocable: bool,
    /// Its lease's kind (a task token or a JWT-SVID) when it is active: revocable, and the
    /// entry that granted it still exists, is live and is not refused as idle. Tessera itself
    /// would still honour it then (as [`crate::exchange`] does for actor tokens).
    pub active: Option<Kind>,
}

impl OwnToken {
    /// Who it was issued to: a task token's actor (`act.sub`), a JWT-SVID's subject.
    pub fn holder(&self) -> Option<&str> {
        self.claims
            .get("act")
            .and_then(|a| a.get("sub"))
            .or_else(|| self.claims.get("sub"))
            .and_then(Value::as_str)
    }
}

/// The SPIFFE ID of a task X.509-SVID: `<agent id>/task/<task id>`.
pub fn task_spiffe_id(agent: &SpiffeId, task_id: &str) -> Result<SpiffeId, IssueError> {
    SpiffeId::parse(&crate::lease::task_key(agent.as_str(), task_id)).map_err(|e| {
        IssueError::InvalidArgument(format!(
            "task X.509-SVID ID for task {task_id:?} is not valid: {e}"
        ))
    })
}

impl Issuer {
    /// Mints a task token (and task X.509-SVID) for `g`, claiming the task for the agent on
    /// first use. Nothing is handed out until the leases and the task record are durable.
    pub async fn issue_task(&self, mut g: TaskGrant<'_>) -> Result<TaskCredentials, IssueError> {
        let agent = g.entry.spiffe_id.as_str();
        // Claimed under the barrier, which task pruning holds exclusively: a task found here
        // keeps its record until this credential's lease is live (and then is not stale).
        let _shared = self.barrier.read().await;
        let task = match self.leases.claim_task(agent, g.task_id, now_ms()) {
            TaskClaim::Open(t) => t,
            TaskClaim::Completed => {
                return Err(IssueError::TaskConflict(format!(
                    "task {:?} is complete; it gets no more credentials",
                    g.task_id
                )));
            }
        };
        // The claim stays if minting fails: a concurrent request of the same agent may
        // already rely on it (undoing it let task pruning forget a task that held a lease).
        self.mint_task(&mut g, task).await
    }

    async fn mint_task(
        &self,
        g: &mut TaskGrant<'_>,
        task_record: crate::lease::Task,
    ) -> Result<TaskCredentials, IssueError> {
        let entry = &g.entry;
        if self.leases.is_killed(&entry.spiffe_id) {
            return Err(IssueError::Killed(entry.spiffe_id.to_string()));
        }
        // The task's own identity can be killed by itself (it is what `lease list` shows for
        // the task's certificate): the task then gets nothing more, token or certificate. A
        // name too long to be a SPIFFE ID cannot have been killed, and needs to be one only
        // for a certificate.
        let task_id = task_spiffe_id(&entry.spiffe_id, g.task_id);
        if let Ok(id) = &task_id
            && self.leases.is_killed(id)
        {
            return Err(IssueError::Killed(id.to_string()));
        }
        let x509_id = if g.x509 { Some(task_id?) } else { None };
        // The agent's JWT-SVID was checked when the exchange began, but a subject token's key
        // fetch may have taken seconds since. Revocation holds the barrier exclusively, so
        // under it the token is either still active here, or this is refused.
        let now = OffsetDateTime::now_utc();
        if let Some(l) = g.holder.credential
            && !self.leases.is_active(&l, now.unix_timestamp())
        {
            return Err(IssueError::FailedPrecondition(
                "actor_token is not valid: the agent's JWT-SVID was revoked or expired during the exchange"
                    .into(),
            ));
        }
        // Checked under the barrier: completion holds it exclusively, so a token is either
        // minted before completion (and revoked by it) or refused.
        if self
            .leases
            .task(&task_record.id)
            .is_some_and(|t| t.completed_ms.is_some())
        {
            return Err(IssueError::TaskConflict(format!(
                "task {:?} is complete; it gets no more credentials",
                g.task_id
            )));
        }
        // Authenticated a moment ago, but a subject token's key fetch may have taken seconds:
        // an entry that expired meanwhile grants nothing (as for SVIDs).
        // As in force now: an edit of its lifetime or expiry meanwhile applies.
        let Some(current) = self.registry.current(entry).filter(|e| e.is_live(now)) else {
            return Err(IssueError::NoIdentity);
        };
        // The policy decision and the approval rule were made from the entry as it was
        // (owner, purpose, risk): an edit of those meanwhile (an agent raised to high risk,
        // say) must not mint under the old decisions (review AY-2). Asked again, the request
        // is decided under the entry as it is now.
        if (&current.owner, &current.purpose, current.risk)
            != (&entry.owner, &entry.purpose, entry.risk)
        {
            return Err(IssueError::FailedPrecondition(
                "the agent's entry (owner, purpose or risk) changed during the exchange; ask \
                 again to have the request decided under it as it is now"
                    .into(),
            ));
        }
        // Past the CA's expiry every token would be expired when issued (as for JWT-SVIDs).
        if now >= self.ca.not_after() {
            return Err(crate::ca::CaError::Expired.into());
        }
        let ttl = current.cap_ttl(g.ttl, now).max(Duration::from_secs(1));
        let exp = crate::ca::credential_expiry(now, ttl, self.ca.not_after());
        // Not after the subject token's own expiry; one past what a date can hold (year 10000
        // on) caps nothing, rather than making the token expire as it is issued.
        let exp = OffsetDateTime::from_unix_timestamp(g.not_after.max(now.unix_timestamp() + 1))
            .map_or(exp, |t| exp.min(t));
        let lease_id = LeaseId::random();
        let jti = lease_id.to_string();
        // Taken, not cloned: the grant is not used after minting.
        let mut claims = std::mem::take(&mut g.claims);
        claims.insert("iat".into(), now.unix_timestamp().into());
        claims.insert("exp".into(), exp.unix_timestamp().into());
        claims.insert("jti".into(), jti.clone().into());
        let token = self.ca.sign_jwt_claims(&Value::Object(claims))?;
        let task = Arc::clone(&task_record.id);
        let lease = |id: LeaseId, kind: Kind, spiffe_id: &str, exp: i64| Lease {
            id,
            kind,
            state: State::Active,
            uid: g.holder.uid,
            pid: g.holder.pid,
            issued_at: now.unix_timestamp(),
            expires_at: exp,
            spiffe_id: self.leases.intern_identity(spiffe_id),
            entry_id: Arc::clone(&entry.id),
            exe: g.holder.exe.clone(),
            task_id: Some(Arc::clone(&task)),
            serial: None,
            revocation: None,
            kill_epoch: self.leases.kill_epoch(),
        };
        let mut leases = vec![lease(
            lease_id,
            Kind::Task,
            entry.spiffe_id.as_str(),
            exp.unix_timestamp(),
        )];
        // With every credential, not only the first: the first may have failed while this
        // one succeeds (the store keeps the record it has).
        let mut ops = Vec::with_capacity(6);
        ops.push(Op::PutTask(task_record));
        let mut ev = Event::now("exchange", g.holder.actor.clone())
            .spiffe_id(entry.spiffe_id.as_str())
            .lease(jti)
            .detail("kind", Kind::Task.as_str())
            .detail("task_id", g.task_id)
            .detail("entry", &*entry.id)
            .detail("expires_at", exp.unix_timestamp());
        for (k, v) in std::mem::take(&mut g.audit) {
            ev = ev.detail(k, v);
        }
        let x509 = if let Some(id) = x509_id {
            // The token's lifetime, as capped above (entry in force, subject token).
            let ttl = Duration::try_from(exp - now).unwrap_or(Duration::from_secs(1));
            let m = self.ca.mint_x509(&id, ttl, now)?;
            let mut l = lease(
                LeaseId::random(),
                Kind::X509,
                id.as_str(),
                m.not_after.unix_timestamp(),
            );
            l.serial = Some(Box::new(m.serial));
            let serial = hex::encode(m.serial);
            ev = ev
                .detail("x509_lease", l.id.to_string())
                .detail("x509_serial", serial.clone());
            let svid = X509Svid {
                lease_id: l.id,
                spiffe_id: id,
                chain_der: m.chain_der,
                key_pkcs8: m.key_pkcs8.as_ref().to_vec(),
                serial,
                not_before: m.not_before,
                expires_at: m.not_after,
                ttl: g.ttl,
                entry: Arc::clone(entry),
            };
            leases.push(l);
            Some(svid)
        } else {
            None
        };
        for l in &leases {
            ops.push(Op::PutLease(l.clone()));
        }
        ops.push(Op::Audit(ev));
        let now_ms = now_ms();
        let record = self.activity_op(entry, now_ms);
        let recorded = record.is_some();
        ops.extend(record);
        commit_issue(&self.store, ops, leases.iter().map(|l| l.id).collect()).await?;
        self.touched(entry, now_ms, recorded);
        let n_x509 = u64::from(x509.is_some());
        for l in leases {
            self.leases.insert(l);
        }
        self.metrics.issued(Kind::Task, 1);
        if n_x509 > 0 {
            self.metrics.issued(Kind::X509, n_x509);
        }
        Ok(TaskCredentials {
            token,
            lease_id,
            issued_at: now,
            expires_at: exp,
            x509,
        })
    }

    /// Forgets the records of tasks first used more than `retention` ago of which no lease is
    /// held (active, or revoked and not yet expired), from the store and then from memory;
    /// returns how many. After that a task id is
    /// free again, as if never used.
    ///
    /// Candidates are found without blocking issuance, then re-checked and deleted in chunks
    /// under the exclusive barrier: a task cannot gain a credential between its re-check and
    /// its deletion, and issuance waits for one chunk's commit at most, not for the whole set.
    pub async fn prune_tasks(&self, retention: Duration) -> Result<usize, IssueError> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let candidates = self.leases.stale_tasks(cutoff, None);
        let mut pruned = 0;
        for chunk in candidates.chunks(PRUNE_CHUNK) {
            let _excl = self.barrier.write().await;
            let stale = self.leases.stale_tasks(cutoff, Some(chunk));
            if stale.is_empty() {
                continue;
            }
            if let Err(e) = commit(&*self.store, vec![Op::DeleteTasks(stale.clone())]).await {
                if pruned > 0 {
                    tracing::info!(pruned, "task records past retention forgotten");
                }
                return Err(e.into());
            }
            self.leases.forget_tasks(&stale);
            pruned += stale.len();
        }
        if pruned > 0 {
            self.leases.compact();
        }
        Ok(pruned)
    }

    /// Completes the task `task_id` of one of `agents` (the caller's identities), or of the
    /// one `chosen` among them: every lease of it is revoked and it gets no more credentials.
    /// Several of them with a task of that id are refused, naming them: each is its own task.
    /// Returns how many leases were revoked. Completing a completed task is not an error.
    pub async fn complete_own_task(
        &self,
        agents: &[SpiffeId],
        chosen: Option<&str>,
        task_id: &str,
        actor: Actor,
    ) -> Result<usize, IssueError> {
        if let Some(c) = chosen {
            super::check_requested_id(c)?;
        }
        if let Some(c) = chosen
            && !agents.iter().any(|a| a.as_str() == c)
        {
            return Err(IssueError::NotEntitled(c.chars().take(2048).collect()));
        }
        let tasks: Vec<_> = agents
            .iter()
            .filter(|a| chosen.is_none_or(|c| a.as_str() == c))
            .filter_map(|a| {
                self.leases
                    .task(&crate::lease::task_key(a.as_str(), task_id))
            })
            .collect();
        match tasks.as_slice() {
            [] => Err(IssueError::NotFound(format!(
                "no task {task_id:?} of this workload"
            ))),
            [t] => self.complete_task(t, actor).await,
            several => Err(IssueError::InvalidArgument(format!(
                "{} of this workload's identities have a task {task_id:?} ({}); say which with \
                 spiffe_id (tessera task complete --spiffe-id)",
                several.len(),
                several
                    .iter()
                    .map(|t| &*t.agent)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Completes task `t` (found a moment ago): every lease of it is revoked and it gets no
    /// more credentials. Returns how many leases were revoked.
    pub async fn complete_task(
        &self,
        t: &crate::lease::Task,
        actor: Actor,
    ) -> Result<usize, IssueError> {
        let task = &*t.id;
        let _excl = self.barrier.write().await;
        // Again under the barrier: the record may have been forgotten (task pruning) and the
        // id used afresh while this call waited; that is another task.
        if self
            .leases
            .task(task)
            .is_none_or(|now| now.created_ms != t.created_ms)
        {
            return Err(IssueError::NotFound(format!("no task {task:?}")));
        }
        let ids = self.leases.active_of_task(task);
        // A repeat changes nothing: no second `complete` record naming another actor and
        // time than the completion the store keeps.
        if ids.is_empty()
            && self
                .leases
                .task(task)
                .is_some_and(|now| now.completed_ms.is_some())
        {
            return Ok(0);
        }
        let at_ms = now_ms();
        let rev = Revocation {
            at_ms,
            by: actor.label(),
            reason: "task completed".into(),
        };
        let ev = Event::now("complete", actor)
            .spiffe_id(&*t.agent)
            .detail("task_id", crate::lease::task_id_of(task))
            .detail("count", ids.len());
        let certs = self.active_certificates(&ids);
        commit(
            &*self.store,
            vec![
                // The record may be in memory only: claimed by an exchange that was then
                // refused or failed to commit. Written here (a no-op if stored), or the
                // completion would update nothing and the task be open again after a restart.
                Op::PutTask(crate::lease::Task {
                    completed_ms: None,
                    ..t.clone()
                }),
                Op::CompleteTask {
                    id: task.to_owned(),
                    at_ms,
                    by: rev.by.clone(),
                },
                Op::Revoke(ids.clone(), rev.clone()),
                Op::Audit(ev),
            ],
        )
        .await?;
        self.leases.complete_task(task, at_ms);
        let rev = Arc::new(rev);
        let n = super::control::count_by_kind(&self.metrics, self.leases.revoke(&ids, &rev));
        Ok(n + self.keep_retired(certs, &rev).await)
    }

    /// Verifies that `token` is a JWT Tessera signed (task token or JWT-SVID) and says whether
    /// it is revocable and active. `None` for anything else: malformed, foreign, bad
    /// signature, no `jti`.
    pub fn verify_own_token(&self, token: &str) -> Option<OwnToken> {
        let jws = jose::decode_own(token).ok()?;
        let kid = jws.kid.as_deref()?;
        let bundle = self.ca.bundle();
        let key = bundle.jwt_authorities.iter().find(|k| k.kid == kid)?;
        key.verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature)
            .ok()?;
        let lease_id = jws
            .claims
            .get("jti")
            .and_then(Value::as_str)
            .and_then(LeaseId::parse)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let exp = jws.claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let revocable = exp > now && self.leases.is_active(&lease_id, now);
        let active = revocable
            .then(|| self.entry_of_lease(&lease_id))
            .flatten()
            .map(|(l, _)| l.kind);
        Some(OwnToken {
            claims: jws.claims,
            lease_id,
            revocable,
            active,
        })
    }

    /// The lease behind an active JWT-SVID's `jti`, and the entry that granted it (if the
    /// entry still exists and is live).
    pub fn entry_of_lease(&self, id: &LeaseId) -> Option<(Lease, Arc<Entry>)> {
        let l = self.leases.get(id)?;
        let now = OffsetDateTime::now_utc();
        let entries = self.registry.snapshot();
        let e = entries
            .iter()
            .find(|e| e.id == l.entry_id && e.spiffe_id.as_str() == &*l.spiffe_id)?;
        if !e.is_live(now) || self.is_idle_refused(e, now_ms()) {
            return None;
        }
        Some((l, Arc::clone(e)))
    }
}
