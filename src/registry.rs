//! Registration entries: which callers get which SPIFFE IDs. Entries double as the inventory
//! (owner, purpose, risk tier, expiry).
//!
//! Owns: the current set of entries and selector matching. The set is published through a
//! `watch` channel so that live Workload API streams see changes at once.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::attest::{Attestation, Selector};
use crate::spiffe_id::SpiffeId;

/// Risk tier of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Risk {
    /// Low risk.
    Low,
    /// Medium risk.
    Medium,
    /// High risk.
    High,
}

impl Risk {
    /// Parses `"low"`, `"medium"` or `"high"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// One registration entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Stable id (`config-<hash of spiffe_id and selectors>` for entries from the file).
    pub id: std::sync::Arc<str>,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// All must be among the caller's selectors. Never empty.
    pub selectors: Vec<Selector>,
    /// Overrides the daemon's X.509-SVID lifetime.
    pub x509_svid_ttl: Option<Duration>,
    /// Overrides the daemon's JWT-SVID lifetime.
    pub jwt_svid_ttl: Option<Duration>,
    /// Who is accountable for this identity.
    pub owner: Option<String>,
    /// What it is for.
    pub purpose: Option<String>,
    /// Risk tier.
    pub risk: Option<Risk>,
    /// After this instant the entry grants nothing.
    pub expires_at: Option<OffsetDateTime>,
    /// Workload API `hint`.
    pub hint: Option<String>,
    /// Cap on this agent's task credential lifetime.
    pub max_task_ttl: Option<Duration>,
}

impl Entry {
    /// Grants the same identity to the same callers as `other`: the same SPIFFE ID and the
    /// same selectors, in any order (an entry's are few and distinct).
    pub fn same_grant(&self, other: &Entry) -> bool {
        self.spiffe_id == other.spiffe_id
            && self.selectors.len() == other.selectors.len()
            && self.selectors.iter().all(|s| other.selectors.contains(s))
    }

    /// True when an X.509-SVID minted under `other` would be the same as one minted under this
    /// entry: same entry, grant, lifetime, hint and expiry. Its owner, purpose, risk and JWT
    /// and task settings do not enter the certificate.
    pub fn mints_same_x509(&self, other: &Entry) -> bool {
        self.id == other.id
            && self.same_grant(other)
            && self.x509_svid_ttl == other.x509_svid_ttl
            && self.hint == other.hint
            && self.expires_at == other.expires_at
    }

    /// True when the entry can grant at `now`: at least a whole second before its expiry, as
    /// credentials state their expiry in whole seconds and one granted in the last fraction of
    /// a second would be expired when issued.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.expires_at
            .is_none_or(|t| t - now >= time::Duration::SECOND)
    }

    /// `ttl`, cut short so that nothing granted at `now` outlives the entry's `expires_at`.
    pub fn cap_ttl(&self, ttl: Duration, now: OffsetDateTime) -> Duration {
        match self.expires_at {
            Some(t) => ttl.min((t - now).try_into().unwrap_or(Duration::ZERO)),
            None => ttl,
        }
    }
}

/// An immutable set of entries, in match order (the first match is the default identity).
pub type Entries = Arc<Vec<Arc<Entry>>>;

/// The entry set, shared and observable.
#[derive(Debug)]
pub struct Registry {
    tx: watch::Sender<Entries>,
    /// Whether any entry has a `unix:sha256` selector: most deployments have none, and then
    /// no caller needs hashing, without a look at every entry per request.
    any_sha256: std::sync::atomic::AtomicBool,
}

fn has_sha256(entries: &[Entry]) -> bool {
    entries
        .iter()
        .any(|e| e.selectors.iter().any(|s| matches!(s, Selector::Sha256(_))))
}

impl Registry {
    /// A registry holding `entries`.
    pub fn new(entries: Vec<Entry>) -> Self {
        let any_sha256 = has_sha256(&entries).into();
        let (tx, _) = watch::channel(Arc::new(entries.into_iter().map(Arc::new).collect()));
        Self { tx, any_sha256 }
    }

    /// The current entries.
    pub fn snapshot(&self) -> Entries {
        self.tx.borrow().clone()
    }

    /// A receiver that is notified whenever the entry set changes.
    pub fn subscribe(&self) -> watch::Receiver<Entries> {
        self.tx.subscribe()
    }

    /// Replaces the entry set and notifies every subscriber.
    pub fn replace(&self, entries: Vec<Entry>) {
        // Set before the entries are visible: a caller that sees a new sha256 entry also sees
        // the flag (a caller still on the old set for a moment is as stale as any reader).
        self.any_sha256
            .store(has_sha256(&entries), std::sync::atomic::Ordering::Release);
        self.tx
            .send_replace(Arc::new(entries.into_iter().map(Arc::new).collect()));
    }

    /// The entry in force for `e`, matched from an earlier snapshot: `e` itself, or the
    /// entry with its id, SPIFFE ID and selectors (an edit of its lifetime, expiry or owner
    /// leaves it granting, under the values now in force). `None` once an edit of its
    /// identity or selectors, or its deletion, took it away. Read under the issuance barrier,
    /// which every entry edit holds until the new entry set is out.
    pub fn current(&self, e: &Arc<Entry>) -> Option<Arc<Entry>> {
        self.tx
            .borrow()
            .iter()
            .find(|c| Arc::ptr_eq(c, e) || (c.id == e.id && c.same_grant(e)))
            .cloned()
    }

    /// Live entries whose selectors the caller satisfies, in match order.
    pub fn matching(&self, caller: &Attestation, now: OffsetDateTime) -> Vec<Arc<Entry>> {
        matching(&self.snapshot(), caller, now)
    }

    /// True when the caller's executable must be hashed: some live entry asks for a
    /// `unix:sha256` selector and the caller holds all of that entry's other selectors.
    /// Hashing an executable reads up to `max_exe_hash_mib` of it, so callers that no entry
    /// could match by hash are not made to pay for it, nor can they make the daemon pay.
    pub fn wants_hash(&self, caller: &Attestation, now: OffsetDateTime) -> bool {
        if !self.any_sha256.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        self.tx.borrow().iter().any(|e| {
            e.is_live(now)
                && e.selectors.iter().any(|s| matches!(s, Selector::Sha256(_)))
                && e.selectors
                    .iter()
                    .all(|s| matches!(s, Selector::Sha256(_)) || caller.selectors.contains(s))
        })
    }
}

/// Live entries of `entries` whose selectors the caller satisfies, in order.
pub fn matching(entries: &Entries, caller: &Attestation, now: OffsetDateTime) -> Vec<Arc<Entry>> {
    entries
        .iter()
        .filter(|e| e.is_live(now) && caller.satisfies(&e.selectors))
        .cloned()
        .collect()
}

/// Selectors naming a user or group this host cannot resolve, or a path the daemon cannot see:
/// they never match.
pub fn never_matching<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<String> {
    use crate::attest::Selector;
    let mut out = Vec::new();
    for e in entries {
        for s in &e.selectors {
            let known = match s {
                Selector::User(n) => nix::unistd::User::from_name(n).map(|u| u.is_some()),
                Selector::Group(n) | Selector::SupplementaryGroup(n) => {
                    nix::unistd::Group::from_name(n).map(|g| g.is_some())
                }
                // Matched in the daemon's own view of the file system: a unit's PrivateTmp,
                // or another mount namespace, can hide the caller's binary from it.
                Selector::Path(p) => {
                    if std::fs::symlink_metadata(p)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                    {
                        out.push(format!(
                            "entry {} ({}): {s} names no file the daemon can see (not installed yet, or hidden from it by PrivateTmp or another mount namespace), so no caller matches it until it does",
                            e.id, e.spiffe_id
                        ));
                    }
                    continue;
                }
                _ => continue,
            };
            if !known.unwrap_or(true) {
                out.push(format!(
                    "entry {} ({}): {s} names no user or group on this host, so it never matches",
                    e.id, e.spiffe_id
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn entry(id: &str, sels: &[&str], expires_at: Option<OffsetDateTime>) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://td/{id}")).unwrap(),
            selectors: sels.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            owner: None,
            purpose: None,
            risk: None,
            expires_at,
            hint: None,
            max_task_ttl: None,
        }
    }

    fn caller(sels: &[&str]) -> Attestation {
        Attestation {
            uid: 1000,
            gid: 1000,
            pid: 1,
            exe_path: None,
            exe_sha256: None,
            selectors: sels
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect::<BTreeSet<_>>(),
        }
    }

    #[test]
    fn an_entry_grants_until_its_last_whole_second() {
        let now = OffsetDateTime::now_utc();
        let at = |ms| entry("a", &[], Some(now + time::Duration::milliseconds(ms)));
        // Less than a second left: a credential stating its expiry in whole seconds could be
        // expired as it is issued.
        assert!(!at(999).is_live(now));
        assert!(!at(-1).is_live(now));
        assert!(at(1000).is_live(now));
        assert!(entry("a", &[], None).is_live(now));
    }

    #[test]
    fn all_selectors_must_match_and_order_is_kept() {
        let now = OffsetDateTime::now_utc();
        let r = Registry::new(vec![
            entry("a", &["unix:uid:1000"], None),
            entry("b", &["unix:uid:1000", "unix:path:/bin/agent"], None),
            entry("c", &["unix:uid:1001"], None),
            entry(
                "d",
                &["unix:uid:1000"],
                Some(now - time::Duration::seconds(1)),
            ),
        ]);
        let ids = |c: &Attestation| -> Vec<String> {
            r.matching(c, now)
                .iter()
                .map(|e| e.id.to_string())
                .collect()
        };
        assert_eq!(ids(&caller(&["unix:uid:1000", "unix:gid:1000"])), ["a"]);
        assert_eq!(
            ids(&caller(&["unix:uid:1000", "unix:path:/bin/agent"])),
            ["a", "b"]
        );
        assert!(ids(&caller(&["unix:uid:7"])).is_empty());
    }

    #[test]
    fn a_hash_is_wanted_only_where_an_entry_could_match_by_it() {
        let now = OffsetDateTime::now_utc();
        let h = "a".repeat(64);
        let r = Registry::new(vec![
            entry("a", &["unix:uid:1000"], None),
            entry("b", &["unix:uid:1001", &format!("unix:sha256:{h}")], None),
            entry(
                "c",
                &["unix:uid:1002", &format!("unix:sha256:{h}")],
                Some(now - time::Duration::seconds(1)),
            ),
        ]);
        assert!(!r.wants_hash(&caller(&["unix:uid:1000"]), now));
        assert!(r.wants_hash(&caller(&["unix:uid:1001"]), now));
        // An expired entry asks for nothing.
        assert!(!r.wants_hash(&caller(&["unix:uid:1002"]), now));
        r.replace(vec![entry("d", &[&format!("unix:sha256:{h}")], None)]);
        assert!(r.wants_hash(&caller(&["unix:uid:1000"]), now));
    }

    #[test]
    fn lifetimes_end_with_the_entry() {
        let now = OffsetDateTime::now_utc();
        let hour = Duration::from_secs(3600);
        let forever = entry("a", &["unix:uid:1"], None);
        assert_eq!(forever.cap_ttl(hour, now), hour);
        let soon = entry(
            "b",
            &["unix:uid:1"],
            Some(now + time::Duration::seconds(90)),
        );
        assert_eq!(soon.cap_ttl(hour, now), Duration::from_secs(90));
        assert_eq!(
            soon.cap_ttl(Duration::from_secs(30), now),
            Duration::from_secs(30)
        );
        let gone = entry("c", &["unix:uid:1"], Some(now - time::Duration::seconds(1)));
        assert_eq!(gone.cap_ttl(hour, now), Duration::ZERO);
    }

    #[tokio::test]
    async fn subscribers_see_replacements() {
        let r = Registry::new(vec![entry("a", &["unix:uid:1"], None)]);
        let mut rx = r.subscribe();
        r.replace(vec![]);
        rx.changed().await.unwrap();
        assert!(rx.borrow().is_empty());
    }
}
