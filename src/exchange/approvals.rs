//! Human approval of high-risk exchanges.
//!
//! Owns: pending, approved and denied requests, keyed by what was asked (agent, task,
//! subject, audience, scopes) so the agent's retry of the same request finds its approval.
//! An approval is single-use: the exchange that uses it consumes it. Everything expires after
//! `[tasks] approval_ttl`. Held in memory: a restart drops pending requests and the agent's
//! next try files a new one (no credential depends on them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Waiting for an operator.
    Pending,
    /// Approved by `by`; the next identical exchange uses it.
    Approved {
        /// Operator label.
        by: String,
    },
    /// Denied by `by`.
    Denied {
        /// Operator label.
        by: String,
    },
}

/// One request for approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Id operators approve or deny.
    pub id: String,
    /// Agent SPIFFE ID.
    pub agent: String,
    /// Task.
    pub task_id: String,
    /// Subject `iss`.
    pub subject_iss: String,
    /// Subject `sub`.
    pub subject_sub: String,
    /// Audience.
    pub audience: String,
    /// Scopes, sorted.
    pub scopes: Vec<String>,
    /// Lifetime the token would get, seconds (at filing: it shrinks with the subject token).
    pub ttl_seconds: u64,
    /// The lifetime the agent asked for (`expires_in`), if it did: part of what is approved,
    /// where `ttl_seconds` is not, since it shortens as the subject token ages.
    pub requested_ttl: Option<u64>,
    /// Whether a task X.509-SVID (with its key) is asked for as well.
    pub x509: bool,
    /// Unix ms.
    pub created_ms: i64,
    /// Unix ms; after this the request is forgotten.
    pub expires_ms: i64,
    /// State.
    pub status: Status,
}

impl Approval {
    fn key(&self) -> String {
        // NUL cannot occur in any of these fields (they are validated printable text). The
        // lifetime and the X.509-SVID are part of what the operator approved: a retry asking
        // for a longer token or a certificate as well is another request.
        format!(
            "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
            self.agent,
            self.task_id,
            self.subject_iss,
            self.subject_sub,
            self.audience,
            self.scopes.join(" "),
            self.requested_ttl.map_or(String::new(), |t| t.to_string()),
            self.x509
        )
    }
}

/// The answer to an exchange that needs approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Filed now; tell the agent to wait.
    Filed(String),
    /// Still waiting.
    Pending(String),
    /// Approved: consumed by this call; go ahead (and [`Approvals::put_back`] on failure).
    Approved(Taken),
    /// Denied.
    Denied(String),
}

/// An approval consumed by an exchange, with what [`Approvals::put_back`] needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    approval: Box<Approval>,
    /// [`Inner::withdrawals`] when it was taken.
    withdrawals: u64,
}

impl std::ops::Deref for Taken {
    type Target = Approval;
    fn deref(&self) -> &Approval {
        &self.approval
    }
}

/// Operator-facing errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// Unknown or expired id.
    #[error("no pending request {0:?} (it may have expired or been used)")]
    NotFound(String),
    /// Already decided.
    #[error("request {0:?} was already decided")]
    Decided(String),
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Approval>,
    by_key: HashMap<String, String>,
    /// How many times a kill withdrew requests.
    withdrawals: u64,
}

impl Inner {
    fn purge(&mut self, now_ms: i64) {
        let expired: Vec<String> = self
            .by_id
            .values()
            .filter(|a| a.expires_ms <= now_ms)
            .map(|a| a.id.clone())
            .collect();
        for id in expired {
            if let Some(a) = self.by_id.remove(&id) {
                // Only if the key still names this request (a newer one may have taken it).
                let k = a.key();
                if self.by_key.get(&k) == Some(&id) {
                    self.by_key.remove(&k);
                }
            }
        }
    }
}

/// Pending and decided requests.
#[derive(Debug)]
pub struct Approvals {
    ttl: Duration,
    inner: Mutex<Inner>,
}

/// Most requests held at once: a flood of distinct high-risk requests must not grow memory
/// without bound. Beyond it new requests are refused until some expire.
const MAX_PENDING: usize = 10_000;
/// Most requests one agent may have waiting: one agent filing thousands must not shut every
/// other high-risk agent out of the queue.
const MAX_PENDING_PER_AGENT: usize = 100;

impl Approvals {
    /// When a request filed or decided at `now_ms` expires; saturates rather than wrapping
    /// for an absurd `approval_ttl`.
    fn expiry(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX))
    }

    /// Requests expire `ttl` after filing (or after approval).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks up the request `proto` describes (its `id`, times and status are ignored),
    /// filing it if new. `None` when too many requests are pending.
    pub fn check(&self, mut proto: Approval, now_ms: i64, new_id: String) -> Option<Check> {
        proto.scopes.sort();
        let mut g = self.lock();
        g.purge(now_ms);
        let key = proto.key();
        if let Some(id) = g.by_key.get(&key).cloned() {
            let a = g.by_id.get(&id)?.clone();
            return Some(match a.status {
                Status::Pending => Check::Pending(id),
                Status::Denied { .. } => Check::Denied(id),
                Status::Approved { .. } => {
                    g.by_id.remove(&id);
                    g.by_key.remove(&key);
                    Check::Approved(Taken {
                        approval: Box::new(a),
                        withdrawals: g.withdrawals,
                    })
                }
            });
        }
        if g.by_id.len() >= MAX_PENDING
            || g.by_id.values().filter(|a| a.agent == proto.agent).count() >= MAX_PENDING_PER_AGENT
        {
            return None;
        }
        proto.id = new_id.clone();
        proto.created_ms = now_ms;
        proto.expires_ms = self.expiry(now_ms);
        proto.status = Status::Pending;
        g.by_key.insert(key, new_id.clone());
        g.by_id.insert(new_id.clone(), proto);
        Some(Check::Filed(new_id))
    }

    /// Returns a consumed approval whose exchange then failed (store or CA unavailable), so
    /// the agent's retry can use it.
    pub fn put_back(&self, taken: Taken) {
        let mut g = self.lock();
        // A kill since it was taken may have withdrawn it (the kill could not see it while
        // the exchange held it): a restored agent starts from fresh decisions. Any kill
        // counts, not only one of this agent; the cost of the rare coincidence is one more
        // approval, where bringing a withdrawn one back would override the kill.
        if g.withdrawals != taken.withdrawals {
            return;
        }
        let a = *taken.approval;
        // A retry may have filed the same request anew meanwhile. Still pending, the approval
        // supersedes it; decided (say, denied since), the newer decision stands.
        let key = a.key();
        if let Some(newer) = g.by_key.get(&key).cloned()
            && newer != a.id
        {
            if g.by_id
                .get(&newer)
                .is_some_and(|n| n.status != Status::Pending)
            {
                return;
            }
            g.by_id.remove(&newer);
        }
        g.by_key.insert(key, a.id.clone());
        g.by_id.insert(a.id.clone(), a);
    }

    /// Drops every request (pending or approved) of `agent` and of identities under its path,
    /// as a kill does: a restored agent starts from fresh decisions. Returns their ids.
    pub fn withdraw_within(&self, agent: &crate::spiffe_id::SpiffeId) -> Vec<String> {
        let mut g = self.lock();
        g.withdrawals += 1;
        let gone: Vec<String> = g
            .by_id
            .values()
            .filter(|a| {
                crate::spiffe_id::SpiffeId::parse(&a.agent).is_ok_and(|id| id.is_within(agent))
            })
            .map(|a| a.id.clone())
            .collect();
        for id in &gone {
            if let Some(a) = g.by_id.remove(id) {
                g.by_key.remove(&a.key());
            }
        }
        gone
    }

    /// One live request.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Approval> {
        let mut g = self.lock();
        g.purge(now_ms);
        g.by_id.get(id).cloned()
    }

    /// Every live request, oldest first.
    pub fn list(&self, now_ms: i64) -> Vec<Approval> {
        let mut g = self.lock();
        g.purge(now_ms);
        let mut v: Vec<Approval> = g.by_id.values().cloned().collect();
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        v
    }

    /// Approves a pending request; it stays usable for the approval period.
    pub fn approve(&self, id: &str, by: String, now_ms: i64) -> Result<Approval, ApprovalError> {
        self.decide(id, Status::Approved { by }, now_ms)
    }

    /// Denies a pending request.
    pub fn deny(&self, id: &str, by: String, now_ms: i64) -> Result<Approval, ApprovalError> {
        self.decide(id, Status::Denied { by }, now_ms)
    }

    fn decide(&self, id: &str, status: Status, now_ms: i64) -> Result<Approval, ApprovalError> {
        let mut g = self.lock();
        g.purge(now_ms);
        let a = g
            .by_id
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound(id.chars().take(64).collect()))?;
        if a.status != Status::Pending {
            return Err(ApprovalError::Decided(id.to_owned()));
        }
        a.status = status;
        a.expires_ms = self.expiry(now_ms);
        Ok(a.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(scopes: &[&str]) -> Approval {
        Approval {
            id: String::new(),
            agent: "spiffe://td/a".into(),
            task_id: "t".into(),
            subject_iss: "https://idp".into(),
            subject_sub: "ann".into(),
            audience: "api".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ttl_seconds: 60,
            requested_ttl: None,
            x509: false,
            created_ms: 0,
            expires_ms: 0,
            status: Status::Pending,
        }
    }

    #[test]
    fn one_agent_cannot_fill_the_queue_and_a_put_back_approval_supersedes_a_refiling() {
        let a = Approvals::new(Duration::from_secs(60));
        for i in 0..MAX_PENDING_PER_AGENT {
            let mut r = req(&["a"]);
            r.task_id = format!("t{i}");
            assert!(matches!(
                a.check(r, 0, format!("r{i}")),
                Some(Check::Filed(_))
            ));
        }
        let mut r = req(&["a"]);
        r.task_id = "one-more".into();
        assert_eq!(a.check(r, 0, "x".into()), None);
        let mut other = req(&["a"]);
        other.agent = "spiffe://td/b".into();
        assert!(matches!(
            a.check(other, 0, "b1".into()),
            Some(Check::Filed(_))
        ));

        // Approved, consumed, then the mint failed: meanwhile a retry filed it again.
        a.approve("r0", "op".into(), 1).unwrap();
        let mut r0 = req(&["a"]);
        r0.task_id = "t0".into();
        let Some(Check::Approved(got)) = a.check(r0.clone(), 2, "n1".into()) else {
            panic!()
        };
        assert!(matches!(
            a.check(r0.clone(), 3, "n2".into()),
            Some(Check::Filed(_))
        ));
        a.put_back(got.clone());
        assert!(a.get("n2", 4).is_none(), "the refiling is superseded");
        assert!(matches!(
            a.check(r0.clone(), 5, "n3".into()),
            Some(Check::Approved(_))
        ));
        // A refiling the operator denied meanwhile is not overridden by a put-back approval.
        assert!(matches!(
            a.check(r0.clone(), 6, "n4".into()),
            Some(Check::Filed(_))
        ));
        a.deny("n4", "op".into(), 7).unwrap();
        a.put_back(got);
        assert_eq!(
            a.check(r0, 8, "n5".into()),
            Some(Check::Denied("n4".into()))
        );
    }

    #[test]
    fn an_approval_a_kill_withdrew_while_it_was_in_use_stays_withdrawn() {
        let a = Approvals::new(Duration::from_secs(60));
        a.check(req(&["a"]), 0, "r0".into());
        a.approve("r0", "op".into(), 1).unwrap();
        let Some(Check::Approved(got)) = a.check(req(&["a"]), 2, "n1".into()) else {
            panic!()
        };
        // The kill runs while the exchange holds the approval, and its mint then fails.
        a.withdraw_within(&crate::spiffe_id::SpiffeId::parse("spiffe://td/a").unwrap());
        a.put_back(got);
        assert_eq!(
            a.check(req(&["a"]), 3, "n2".into()),
            Some(Check::Filed("n2".into())),
            "a restored agent starts from a fresh decision"
        );
    }

    #[test]
    fn file_approve_consume_once() {
        let a = Approvals::new(Duration::from_secs(60));
        let Some(Check::Filed(id)) = a.check(req(&["b", "a"]), 0, "r1".into()) else {
            panic!()
        };
        // Same request (scope order does not matter): same id, still pending. The lifetime
        // it would get has shrunk with the subject token meanwhile; that is not a new request.
        let mut later = req(&["a", "b"]);
        later.ttl_seconds = 42;
        assert_eq!(
            a.check(later, 1, "r2".into()),
            Some(Check::Pending(id.clone()))
        );
        // Asking for another lifetime, or for an X.509-SVID as well, is.
        let mut longer = req(&["a", "b"]);
        longer.requested_ttl = Some(3600);
        assert!(matches!(
            a.check(longer, 1, "r2b".into()),
            Some(Check::Filed(_))
        ));
        let mut with_cert = req(&["a", "b"]);
        with_cert.x509 = true;
        assert!(matches!(
            a.check(with_cert, 1, "r2c".into()),
            Some(Check::Filed(_))
        ));
        // A different request is separate.
        assert!(matches!(
            a.check(req(&["a"]), 1, "r3".into()),
            Some(Check::Filed(_))
        ));
        a.approve(&id, "op".into(), 2).unwrap();
        assert_eq!(
            a.approve(&id, "op".into(), 2),
            Err(ApprovalError::Decided(id.clone()))
        );
        let Some(Check::Approved(got)) = a.check(req(&["a", "b"]), 3, "r4".into()) else {
            panic!()
        };
        assert_eq!(got.id, id);
        // Single use: the next identical request files anew.
        assert_eq!(
            a.check(req(&["a", "b"]), 4, "r5".into()),
            Some(Check::Filed("r5".into()))
        );
    }

    #[test]
    fn deny_and_expiry() {
        let a = Approvals::new(Duration::from_secs(1));
        let Some(Check::Filed(id)) = a.check(req(&["x"]), 0, "r1".into()) else {
            panic!()
        };
        a.deny(&id, "op".into(), 10).unwrap();
        assert_eq!(
            a.check(req(&["x"]), 20, "r2".into()),
            Some(Check::Denied(id.clone()))
        );
        // Expired (1 s after the decision): forgotten, so a retry files a new request.
        assert_eq!(
            a.check(req(&["x"]), 1_011, "r3".into()),
            Some(Check::Filed("r3".into()))
        );
        assert!(matches!(
            a.approve("nope", "op".into(), 0),
            Err(ApprovalError::NotFound(_))
        ));
        assert_eq!(a.list(1_012).len(), 1);
    }

    #[test]
    fn an_absurd_ttl_never_expires_instead_of_wrapping() {
        let a = Approvals::new(Duration::MAX);
        let now = 1_800_000_000_000;
        let Some(Check::Filed(id)) = a.check(req(&["x"]), now, "r1".into()) else {
            panic!()
        };
        // Wrapped, it would have expired at once and the retry filed a new request.
        assert_eq!(
            a.check(req(&["x"]), now + 1, "r2".into()),
            Some(Check::Pending(id))
        );
    }
}
