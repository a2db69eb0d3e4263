//! Operator control: revocation, the kill switch, and registration entries.
//!
//! Every action is made durable (with its audit record) before it takes effect in memory, and
//! takes the issuance barrier exclusively so that no credential slips past it.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{InvalidEntry, IssueError, Issuer, now_ms};
use crate::attest::Selector;
use crate::audit::{Actor, Event};
use crate::config::EntrySpec;
use crate::lease::store::{Op, commit};
use crate::lease::{Kill, Kind, Lease, LeaseId, Revocation, State};
use crate::registry::Entry;
use crate::spiffe_id::SpiffeId;

/// Why the built-in default entry's credentials were revoked, at a create or at start.
const DEFAULT_WITHDRAWN: &str = "the built-in default entry is no longer served";

pub(super) fn count_by_kind(m: &crate::metrics::Metrics, counts: [usize; 3]) -> usize {
    for k in [Kind::X509, Kind::Jwt, Kind::Task] {
        let n = counts[k as usize - 1] as u64;
        if n > 0 {
            m.revoked(k, n);
        }
    }
    counts.iter().sum()
}

/// Longest reason accepted: it is stored with the revocation and in the audit log.
const MAX_REASON_LEN: usize = 1024;

fn check_reason(reason: &str) -> Result<(), IssueError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(IssueError::InvalidArgument(format!(
            "reason is {} bytes; at most {MAX_REASON_LEN} are kept",
            reason.len()
        )));
    }
    Ok(())
}

impl Issuer {
    /// Revokes one lease. Unknown id → `NotFound`; not active → `FailedPrecondition`.
    pub async fn revoke_lease(
        &self,
        id: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<Lease, IssueError> {
        let lease_id = LeaseId::parse(id).ok_or_else(|| {
            IssueError::InvalidArgument(format!(
                "{id:?} is not a lease id (22 base64url characters)"
            ))
        })?;
        check_reason(reason)?;
        let _excl = self.barrier.write().await;
        let l = self.leases.get(&lease_id).ok_or_else(|| {
            IssueError::NotFound(format!("no live lease {id} (unknown, or already expired)"))
        })?;
        if l.state != State::Active {
            return Err(IssueError::FailedPrecondition(format!(
                "lease {id} is already {}",
                l.state.as_str()
            )));
        }
        let rev = Revocation {
            at_ms: now_ms(),
            by: actor.label(),
            reason: reason.to_owned(),
        };
        let ev = Event::now("revoke", actor)
            .spiffe_id(&*l.spiffe_id)
            .lease(id)
            .reason(reason)
            .detail("kind", l.kind.as_str());
        let (_, rev) = self.revoke_durably(vec![lease_id], rev, ev).await?;
        // Reaped at its expiry meanwhile (the reaper takes no barrier): what was stored.
        Ok(self.leases.get(&lease_id).unwrap_or(Lease {
            state: State::Revoked,
            revocation: Some(rev),
            ..l
        }))
    }

    /// The one task an operator names by `given` (a task id or a task's full name). A task
    /// id that several agents used is refused with their tasks' full names: an operator acts
    /// on one agent's task at a time.
    pub fn resolve_task(&self, given: &str) -> Result<crate::lease::Task, IssueError> {
        crate::lease::validate_task_name(given).map_err(IssueError::InvalidArgument)?;
        let shown: String = given.chars().take(128).collect();
        let mut found = self.leases.find_tasks(given);
        match found.len() {
            0 => Err(IssueError::NotFound(format!("no task {shown:?}"))),
            1 => Ok(found.remove(0)),
            n => Err(IssueError::InvalidArgument(format!(
                "task id {shown:?} is used by {n} agents; name one of their tasks in full: {}",
                found.iter().map(|t| &*t.id).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Revokes every active lease of the task an operator names (see
    /// [`Issuer::resolve_task`]); returns how many.
    pub async fn revoke_task(
        &self,
        given: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<usize, IssueError> {
        // A mistyped id must not look revoked (and leave a record saying so) in an incident.
        let t = self.resolve_task(given)?;
        check_reason(reason)?;
        let task = &*t.id;
        let _excl = self.barrier.write().await;
        let ids = self.leases.active_of_task(task);
        let rev = Revocation {
            at_ms: now_ms(),
            by: actor.label(),
            reason: reason.to_owned(),
        };
        let ev = Event::now("revoke", actor)
            .reason(reason)
            .spiffe_id(&*t.agent)
            .detail("task_id", crate::lease::task_id_of(task))
            .detail("count", ids.len());
        Ok(self.revoke_durably(ids, rev, ev).await?.0)
    }

    /// Makes the revocation of `ids` durable with its audit record, then puts it in force in
    /// memory and counts it by kind in the metrics. Returns how many were revoked and the
    /// shared revocation record.
    async fn revoke_durably(
        &self,
        ids: Vec<LeaseId>,
        rev: Revocation,
        ev: Event,
    ) -> Result<(usize, Arc<Revocation>), IssueError> {
        let certs = self.active_certificates(&ids);
        commit(
            &*self.store,
            vec![Op::Revoke(ids.clone(), rev.clone()), Op::Audit(ev)],
        )
        .await?;
        let rev = Arc::new(rev);
        let n = count_by_kind(&self.metrics, self.leases.revoke(&ids, &rev));
        let kept = self.keep_retired(certs, &rev).await;
        Ok((n + kept, rev))
    }

    /// Copies of the active certificate leases among `ids`, taken before their revocation
    /// commits (see [`Issuer::keep_retired`]).
    pub(super) fn active_certificates(&self, ids: &[LeaseId]) -> Vec<Lease> {
        ids.iter()
            .filter_map(|id| self.leases.get(id))
            .filter(|l| l.serial.is_some() && l.state == State::Active)
            .collect()
    }

    /// The reaper takes no barrier: it can retire a certificate at its expiry while its
    /// revocation commits, and the revocation then finds no lease to mark. Its serial must
    /// still reach a CRL dated after the expiry (RFC 5280 §3.3), so such a lease is put back,
    /// revoked, in memory and in the store (whose reaper delete keeps a revoked certificate's
    /// row). Returns how many.
    pub(super) async fn keep_retired(&self, certs: Vec<Lease>, rev: &Arc<Revocation>) -> usize {
        let gone: Vec<Lease> = certs
            .into_iter()
            .filter(|l| self.leases.get(&l.id).is_none())
            .map(|l| Lease {
                state: State::Revoked,
                revocation: Some(Arc::clone(rev)),
                ..l
            })
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let ops = gone.iter().cloned().map(Op::PutLease).collect();
        if let Err(e) = commit(&*self.store, ops).await {
            // In memory all the same: listed until a restart.
            tracing::warn!(error = %e, "cannot store the revocation of certificates retired while it committed");
        }
        let n = gone.len();
        for l in gone {
            self.leases.insert(l);
        }
        // The CRL is signed again now, not at the next change: relying parties whose clocks
        // run behind must find the serial listed before they stop accepting the certificate.
        self.leases.announce_change();
        self.metrics.revoked(Kind::X509, n as u64);
        n
    }

    /// Kill switch: revokes every lease of `id` and of identities under its path, and refuses
    /// them new credentials until [`Issuer::restore`]. Live streams drop the identity at once
    /// (they watch the lease table). Returns how many leases were revoked.
    pub async fn kill(&self, id: &str, actor: Actor, reason: &str) -> Result<usize, IssueError> {
        let id = SpiffeId::parse(id)
            .map_err(|e| IssueError::InvalidArgument(format!("spiffe_id {id:?} {e}")))?;
        // A kill elsewhere would match nothing here, yet read as in force.
        if id.trust_domain_name() != self.settings.trust_domain.as_str() {
            return Err(IssueError::InvalidArgument(format!(
                "spiffe_id {id} is not in this daemon's trust domain ({}); nothing here holds it",
                self.settings.trust_domain.as_str()
            )));
        }
        if reason.trim().is_empty() {
            return Err(IssueError::InvalidArgument(
                "a reason is required for a kill: it goes to the audit log".into(),
            ));
        }
        check_reason(reason)?;
        let t0 = std::time::Instant::now();
        // Taken before the barrier, the order restore takes them in: a restore cannot run
        // between this kill and its marking, which would then revoke leases issued after the
        // restore (in memory only).
        let marking = Arc::clone(&self.kill_marking).read_owned().await;
        let excl = self.barrier.write().await;
        let at_ms = now_ms();
        let revoked = self.leases.active_in_tree(&id);
        let t_found = t0.elapsed();
        let kill = Kill {
            // Every lease issued so far holds a lower epoch; the kill is in force (and the
            // epoch raised) before the barrier lets another issue.
            seq: self.leases.kill_epoch() + 1,
            spiffe_id: id.to_string(),
            at_ms,
            by: actor.label(),
            reason: reason.to_owned(),
        };
        let ev = Event::now("kill", actor.clone())
            .spiffe_id(id.as_str())
            .reason(reason)
            .detail("revoked", revoked);
        // One row for the kill, however many leases it revokes: at load, leases issued before
        // a kill that covers them come back revoked.
        commit(&*self.store, vec![Op::Kill(kill.clone()), Op::Audit(ev)]).await?;
        let t_durable = t0.elapsed();
        // From here on the identity gets nothing new, and every reader of the lease table
        // (introspection, streams, listings, single revocations) sees its leases revoked.
        self.leases.add_kill(kill);
        drop(excl);
        // Marking each lease (state, CRL serials, task index, metrics) costs time in the
        // number of leases, ~0.5 µs each; it runs off the request path. A restore waits for it.
        let (leases, metrics) = (Arc::clone(&self.leases), Arc::clone(&self.metrics));
        let killed = id.to_string();
        let rev = Arc::new(Revocation {
            at_ms,
            by: format!("kill by {}", actor.label()),
            reason: reason.to_owned(),
        });
        tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let marked = count_by_kind(&metrics, leases.revoke_identity_tree(&id, &rev));
            tracing::debug!(spiffe_id = %id, marked, us = t.elapsed().as_micros() as u64, "killed leases marked");
            drop(marking);
        });
        tracing::warn!(
            spiffe_id = %killed, revoked, reason,
            found_us = t_found.as_micros() as u64, durable_us = t_durable.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64, "identity killed"
        );
        Ok(revoked)
    }

    /// Takes an identity off the kill list. Its revoked leases stay revoked.
    pub async fn restore(&self, id: &str, actor: Actor) -> Result<(), IssueError> {
        let id = SpiffeId::parse(id)
            .map_err(|e| IssueError::InvalidArgument(format!("spiffe_id {id:?} {e}")))?;
        // The kill's leases must be marked revoked before it leaves the kill list, or they
        // would read as active again.
        let _marked = self.kill_marking.write().await;
        let _excl = self.barrier.write().await;
        if !self
            .leases
            .kills()
            .iter()
            .any(|k| k.spiffe_id == id.as_str())
        {
            return Err(IssueError::NotFound(format!(
                "{id} is not on the kill list"
            )));
        }
        let ev = Event::now("restore", actor.clone()).spiffe_id(id.as_str());
        commit(
            &*self.store,
            vec![
                Op::Restore {
                    spiffe_id: id.to_string(),
                    at_ms: now_ms(),
                    by: actor.label(),
                },
                Op::Audit(ev),
            ],
        )
        .await?;
        self.leases.remove_kill(id.as_str());
        tracing::info!(spiffe_id = %id, "identity restored");
        Ok(())
    }

    /// All entries: config file first, then stored, or the built-in default if there are none.
    pub fn entries(&self) -> Vec<(Arc<Entry>, bool)> {
        self.registry
            .snapshot()
            .iter()
            .map(|e| {
                (
                    Arc::clone(e),
                    self.config_entries.iter().any(|c| c.id == e.id),
                )
            })
            .collect()
    }

    /// Stored entries that failed validation at start: they grant nothing, may be deleted or
    /// replaced by id, and, while any is held, the built-in default entry is not served in
    /// their place.
    pub fn hold_invalid_entries(&self, invalid: Vec<InvalidEntry>) {
        *self
            .invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = invalid;
        self.publish_entries();
    }

    fn is_invalid_entry(&self, id: &str) -> bool {
        self.invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|e| e.id == id)
    }

    /// The stored entries held because they no longer validate, for the inventory.
    pub fn invalid_entries(&self) -> Vec<InvalidEntry> {
        self.invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn publish_entries(&self) {
        let stored = self
            .stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Entry> = self.config_entries.clone();
        all.extend(stored.iter().map(|(e, _)| e.clone()));
        let invalid_held = !self
            .invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        // The default identity is for a daemon nobody configured, not one whose entries
        // stopped validating.
        if all.is_empty() && !invalid_held {
            all.push(crate::config::default_entry_for_current_user(
                &self.settings.trust_domain,
            ));
        }
        // Before the entries are visible: a caller matched against them is attested with
        // the groups they name.
        let (mut gids, mut names) = (std::collections::HashSet::new(), BTreeSet::new());
        for s in all.iter().flat_map(|e| &e.selectors) {
            match s {
                Selector::SupplementaryGid(g) => {
                    gids.insert(*g);
                }
                Selector::SupplementaryGroup(n) => {
                    names.insert(n.clone());
                }
                _ => {}
            }
        }
        self.attestor.want_groups(gids, names);
        self.registry.replace(all);
    }

    fn validate_spec(&self, id: &str, spec: &EntrySpec) -> Result<Entry, IssueError> {
        let bad = |e| match e {
            crate::config::ConfigError::Invalid { key, message } => {
                IssueError::InvalidArgument(format!("{key}: {message}"))
            }
            other => IssueError::InvalidArgument(other.to_string()),
        };
        // New input only, and first: stored entries load with the wider bounds they were
        // written under, which the entry's own checks apply.
        crate::config::check_task_cap("max_task_ttl", spec.max_task_ttl.as_deref()).map_err(bad)?;
        let entry = spec
            .validate(id, "", &self.settings.trust_domain)
            .map_err(bad)?;
        // Such an entry could never grant. Nor would it withdraw anything already granted:
        // that is what deleting the entry does.
        if entry
            .expires_at
            .is_some_and(|t| t <= time::OffsetDateTime::now_utc())
        {
            return Err(IssueError::InvalidArgument(format!(
                "expires_at: {} is in the past, so the entry could never grant; give a later \
                 expires_at (--expires-at), or an empty one to remove the expiry; to stop an \
                 entry and revoke what it granted, delete it",
                spec.expires_at.as_deref().unwrap_or_default()
            )));
        }
        Ok(entry)
    }

    /// Creates a stored entry; live streams see it at once.
    pub async fn create_entry(
        &self,
        spec: EntrySpec,
        actor: Actor,
    ) -> Result<Arc<Entry>, IssueError> {
        let id = format!("e-{}", LeaseId::random());
        let entry = self.validate_spec(&id, &spec)?;
        let _one_edit = self.entry_edits.lock().await;
        self.refuse_twin(&entry, "creating another")?;
        // The built-in default identity stands in only while nothing is configured or stored:
        // the first entry takes it away from the user who started the daemon.
        let default_served = self.config_entries.is_empty()
            && self
                .stored_entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            && self
                .invalid_entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
        // What it granted is revoked with the create, as a deleted entry's is: otherwise the
        // inventory lists those credentials as active under an entry that no longer exists,
        // and its X.509-SVIDs stay off the CRL until they expire.
        let default = default_served
            .then(|| crate::config::default_entry_for_current_user(&self.settings.trust_domain));
        let created = self
            .put_entry(entry, spec, actor, "entry_create", default.as_ref())
            .await?;
        if let Some(default) = default {
            tracing::warn!(
                spiffe_id = %default.spiffe_id,
                "the built-in default entry is no longer served now that an entry exists, and \
                 the credentials it granted are revoked; create an entry for that identity if \
                 its user still needs it"
            );
        }
        Ok(created)
    }

    /// At start: revokes what the built-in default entry granted and no longer grants (entries
    /// were configured since, or tesserad now runs as another user), as `entry create` does
    /// while running; otherwise those leases stay active in the inventory and their
    /// X.509-SVIDs off the CRL. Returns how many were revoked.
    pub async fn withdraw_unserved_default(&self) -> Result<usize, IssueError> {
        let served = self
            .registry
            .snapshot()
            .iter()
            .find(|e| &*e.id == "default")
            .map(|e| e.spiffe_id.to_string());
        let ids = self.leases.active_of_entry("default", |id| {
            served
                .as_deref()
                .is_none_or(|d| !crate::spiffe_id::within(id, d))
        });
        if ids.is_empty() {
            return Ok(0);
        }
        let rev = Revocation {
            at_ms: now_ms(),
            by: Actor::Daemon.label(),
            reason: DEFAULT_WITHDRAWN.into(),
        };
        let ev = Event::now("default_entry_withdrawn", Actor::Daemon)
            .detail("entry", "default")
            .detail("revoked", ids.len());
        let n = ids.len();
        self.revoke_durably(ids, rev, ev).await?;
        Ok(n)
    }

    /// Refuses `entry` when another entry grants the same identity to the same selectors: a
    /// twin would keep granting it after the entry an operator knows of is deleted, and a
    /// provisioning script run on every deploy would add one each time.
    fn refuse_twin(&self, entry: &Entry, instead_of: &str) -> Result<(), IssueError> {
        let selectors = |e: &Entry| {
            e.selectors
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>()
        };
        let wanted = selectors(entry);
        let stored = self
            .stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // An update that keeps the grant as it was is no new twin: a twin from before (a
        // config entry, an earlier version) must not stop an owner or expiry change.
        if stored.iter().any(|(e, _)| {
            e.id == entry.id && e.spiffe_id == entry.spiffe_id && selectors(e) == wanted
        }) {
            return Ok(());
        }
        let twin = self
            .config_entries
            .iter()
            .chain(stored.iter().map(|(e, _)| e))
            .find(|e| e.id != entry.id && e.spiffe_id == entry.spiffe_id && selectors(e) == wanted);
        let Some(t) = twin else { return Ok(()) };
        let way = if self.config_entries.iter().any(|c| c.id == t.id) {
            "change it in the config file".to_owned()
        } else {
            format!("update it (tessera entry update {})", t.id)
        };
        Err(IssueError::AlreadyExists(format!(
            "entry {} already grants {} to the same selectors; {way} instead of {instead_of}",
            t.id, entry.spiffe_id
        )))
    }

    /// Replaces a stored entry. Entries from the config file are changed in the file.
    pub async fn update_entry(
        &self,
        id: &str,
        spec: EntrySpec,
        actor: Actor,
    ) -> Result<Arc<Entry>, IssueError> {
        // From the check to the entry set published: a delete committed in between would
        // otherwise be undone by this update, or memory and disk end in different orders.
        let _one_edit = self.entry_edits.lock().await;
        self.check_editable(id)?;
        let entry = self.validate_spec(id, &spec)?;
        self.refuse_twin(&entry, "making this one its twin")?;
        self.put_entry(entry, spec, actor, "entry_update", None)
            .await
    }

    fn check_editable(&self, id: &str) -> Result<(), IssueError> {
        if self.config_entries.iter().any(|e| &*e.id == id) {
            return Err(IssueError::FailedPrecondition(format!(
                "entry {id} comes from the config file; change it there"
            )));
        }
        if !self
            .stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(e, _)| &*e.id == id)
            && !self.is_invalid_entry(id)
        {
            // Listed by `entry list`, so "no entry" would contradict what the operator sees.
            if id == "default" && self.registry.snapshot().iter().any(|e| &*e.id == id) {
                return Err(IssueError::FailedPrecondition(
                    "entry default is built in: it is served only while no other entry \
                     exists, and cannot be edited or deleted; create an entry (tessera entry \
                     create --spiffe-id ... --selector unix:uid:N), which replaces it and \
                     revokes what it granted"
                        .into(),
                ));
            }
            return Err(IssueError::NotFound(format!("no entry {id}")));
        }
        Ok(())
    }

    /// Stores `entry` (created or updated). `withdrawn`: the built-in default entry, which
    /// this one ends, and whose credentials are revoked in the same commit.
    async fn put_entry(
        &self,
        entry: Entry,
        spec: EntrySpec,
        actor: Actor,
        what: &'static str,
        withdrawn: Option<&Entry>,
    ) -> Result<Arc<Entry>, IssueError> {
        let json =
            serde_json::to_string(&spec).map_err(|e| IssueError::InvalidArgument(e.to_string()))?;
        // An edit of who gets what (identity or selectors) revokes what the entry granted
        // before: a caller it no longer matches would otherwise keep validating JWT-SVIDs
        // and minting task tokens with them until they expire (up to 30 days). Live streams
        // of callers it still matches get new SVIDs at once. The barrier keeps issuances
        // under the old entry out from the scan to the new entry set's publication.
        let previous = self
            .stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(e, _)| e.id == entry.id)
            .map(|(e, _)| e.clone());
        let regrants = previous.as_ref().is_some_and(|p| !p.same_grant(&entry));
        // Every edit: an issuance under way reads the entry in force (its lifetime and expiry
        // included) under the barrier, so none mints from the old one after this returns.
        let _excl = self.barrier.write().await;
        let (revoked, reason): (Vec<LeaseId>, &str) = match (&previous, regrants, withdrawn) {
            (Some(p), true, _) => (
                self.leases_of_entry(p),
                "entry identity or selectors changed",
            ),
            (_, _, Some(d)) => (self.leases_of_entry(d), DEFAULT_WITHDRAWN),
            _ => (Vec::new(), ""),
        };
        let mut ev = Event::now(what, actor.clone())
            .spiffe_id(entry.spiffe_id.as_str())
            .detail("entry", &*entry.id)
            .detail("spec", serde_json::to_value(&spec).unwrap_or_default());
        if regrants {
            ev = ev.detail("revoked", revoked.len());
        }
        if let Some(d) = withdrawn {
            ev = ev
                .detail("default_entry_withdrawn", d.spiffe_id.as_str())
                .detail("revoked", revoked.len());
        }
        let rev = Revocation {
            at_ms: now_ms(),
            by: actor.label(),
            reason: reason.into(),
        };
        let mut ops = vec![
            Op::PutEntry {
                id: entry.id.to_string(),
                spec: json,
            },
            Op::Audit(ev),
        ];
        if !revoked.is_empty() {
            ops.push(Op::Revoke(revoked.clone(), rev.clone()));
        }
        // A new entry's idle clock starts at its creation.
        let now = now_ms();
        let fresh = !self.activity.contains_key(&entry.id);
        if fresh {
            ops.push(Op::EntryActive {
                id: entry.id.to_string(),
                at_ms: now,
            });
        }
        let certs = self.active_certificates(&revoked);
        commit(&*self.store, ops).await?;
        if fresh {
            self.activity.insert(Arc::clone(&entry.id), (now, now));
        }
        {
            let mut stored = self
                .stored_entries
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match stored.iter_mut().find(|(e, _)| e.id == entry.id) {
                Some(slot) => *slot = (entry.clone(), spec),
                None => stored.push((entry.clone(), spec)),
            }
        }
        // A valid spec given for an entry that no longer validated replaces it.
        self.invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| *e.id != *entry.id);
        self.publish_entries();
        // After the new entry set is out: a stream woken by the revocation re-matches its
        // caller against the edited entry, not the old one (which no longer grants).
        if !revoked.is_empty() {
            let rev = Arc::new(rev);
            count_by_kind(&self.metrics, self.leases.revoke(&revoked, &rev));
            self.keep_retired(certs, &rev).await;
        }
        Ok(Arc::new(entry))
    }

    /// Active leases `entry` granted: its SVIDs and its agents' task credentials (stored
    /// under `<id>/task/<task id>`).
    fn leases_of_entry(&self, entry: &Entry) -> Vec<LeaseId> {
        self.leases
            .active_of_identity(&entry.spiffe_id, true)
            .into_iter()
            .filter(|id| self.leases.get(id).is_some_and(|l| l.entry_id == entry.id))
            .collect()
    }

    /// Deletes a stored entry; streams that held only its identity end with PermissionDenied.
    pub async fn delete_entry(&self, id: &str, actor: Actor) -> Result<(), IssueError> {
        let _one_edit = self.entry_edits.lock().await;
        self.check_editable(id)?;
        // What it granted goes with it (as for an edit of who gets what), and no issuance
        // that matched it before can mint after: the barrier is held until the entry set
        // without it is out.
        let _excl = self.barrier.write().await;
        let gone = self
            .stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(e, _)| &*e.id == id)
            .map(|(e, _)| e.clone());
        let revoked = match &gone {
            Some(e) => self.leases_of_entry(e),
            // One that no longer validates (held by id): its identity is not known here, so
            // every active lease is looked at; a rare operation, after a trust-domain change.
            None => self
                .leases
                .list(&crate::lease::Filter {
                    state: Some(State::Active),
                    ..Default::default()
                })
                .into_iter()
                .filter(|l| &*l.entry_id == id)
                .map(|l| l.id)
                .collect(),
        };
        let rev = Revocation {
            at_ms: now_ms(),
            by: actor.label(),
            reason: "entry deleted".into(),
        };
        let mut ev = Event::now("entry_delete", actor)
            .detail("entry", id)
            .detail("revoked", revoked.len());
        if let Some(e) = &gone {
            ev = ev.spiffe_id(e.spiffe_id.as_str());
        }
        let mut ops = vec![Op::DeleteEntry(id.to_owned()), Op::Audit(ev)];
        if !revoked.is_empty() {
            ops.push(Op::Revoke(revoked.clone(), rev.clone()));
        }
        let certs = self.active_certificates(&revoked);
        commit(&*self.store, ops).await?;
        self.stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(e, _)| &*e.id != id);
        self.invalid_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| e.id != id);
        self.publish_entries();
        if !revoked.is_empty() {
            let rev = Arc::new(rev);
            count_by_kind(&self.metrics, self.leases.revoke(&revoked, &rev));
            self.keep_retired(certs, &rev).await;
        }
        // Ids are fresh per created entry: under create/delete churn the clocks would grow
        // without bound (the store drops its row with the entry's).
        self.activity.remove(id);
        Ok(())
    }

    /// Marks an entry reviewed: its idle clock restarts, so `refuse_idle` lets it issue again.
    pub async fn review_entry(&self, id: &str, actor: Actor) -> Result<Arc<Entry>, IssueError> {
        // As the other edits: a review racing a delete would bring back the deleted entry's
        // activity row.
        let _one_edit = self.entry_edits.lock().await;
        let entry = self
            .registry
            .snapshot()
            .iter()
            .find(|e| &*e.id == id)
            .cloned()
            .ok_or_else(|| IssueError::NotFound(format!("no entry {id}")))?;
        let now = now_ms();
        let ev = Event::now("entry_review", actor)
            .spiffe_id(entry.spiffe_id.as_str())
            .detail("entry", id)
            .detail("was_idle", self.is_idle(&entry, now));
        commit(
            &*self.store,
            vec![
                Op::EntryActive {
                    id: id.to_owned(),
                    at_ms: now,
                },
                Op::Audit(ev),
            ],
        )
        .await?;
        self.activity.insert(Arc::clone(&entry.id), (now, now));
        Ok(entry)
    }

    /// The spec an entry was created from (stored entries only).
    pub fn entry_spec(&self, id: &str) -> Option<EntrySpec> {
        self.stored_entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(e, _)| &*e.id == id)
            .map(|(_, s)| s.clone())
    }
}
