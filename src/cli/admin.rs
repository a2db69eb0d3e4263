//! Operator-side commands over the admin socket.

use serde_json::json;

use super::{Cli, connect, status_err};
use crate::proto::tessera::v1 as pb;
use crate::proto::tessera::v1::admin_client::AdminClient;

/// Whether two paths name one socket: the same file (through symlinks, `/var/run` and `/run`,
/// or a bind mount), else, when either cannot be looked at, the same resolved path.
fn same_socket(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => {
            let real =
                |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            real(a) == real(b)
        }
    }
}

async fn client(cli: &Cli) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let admin = cli.admin_socket();
    // As for --socket: a relative path would name a different socket from each directory.
    anyhow::ensure!(
        admin.is_absolute(),
        "admin socket {:?} must be an absolute path",
        admin.display().to_string()
    );
    let mut c = AdminClient::new(connect(&admin, true).await?);
    // Only a workload socket named (--socket, SPIFFE_ENDPOINT_SOCKET): the admin socket is
    // then the default one, which may belong to another daemon, and reading or changing that
    // one unasked is worse than stopping.
    if cli.admin_socket.is_none()
        && let Ok(Some(asked)) = cli.explicit_workload_socket()
    {
        let s = c
            .status(pb::StatusRequest {})
            .await
            .map_err(status_err)?
            .into_inner();
        anyhow::ensure!(
            same_socket(&asked, std::path::Path::new(&s.workload_socket)),
            "the default admin socket {} belongs to the daemon serving {}, not {}; give the \
             admin socket of the daemon you mean (--admin-socket or TESSERA_ADMIN_SOCKET)",
            admin.display(),
            s.workload_socket,
            asked.display()
        );
    }
    Ok(c)
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub(super) async fn status(cli: &Cli) -> anyhow::Result<()> {
    let s = client(cli)
        .await?
        .status(pb::StatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    // An admin socket given on its own (--admin-socket, TESSERA_ADMIN_SOCKET) beside a
    // workload socket of another daemon: say so (without one, `client` refused already).
    if let Ok(Some(asked)) = cli.explicit_workload_socket()
        && !same_socket(&asked, std::path::Path::new(&s.workload_socket))
    {
        eprintln!(
            "tessera: warning: this admin socket belongs to the daemon serving {}, not {}; give that daemon's --admin-socket",
            s.workload_socket,
            asked.display()
        );
    }
    if cli.json {
        let v = json!({
            "version": s.version,
            "trust_domain": s.trust_domain,
            "started_at": rfc3339(s.started_at),
            "workload_socket": s.workload_socket,
            "entry_count": s.entry_count,
            "jwt_key_ids": s.jwt_key_ids,
            "x509_authorities": s.x509_authorities.iter().map(|a| json!({
                "fingerprint_sha256": a.fingerprint,
                "subject": a.subject,
                "not_before": rfc3339(a.not_before),
                "not_after": rfc3339(a.not_after),
                "operator_supplied": a.operator_supplied,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("tesserad {}", s.version);
    println!("trust domain:     {}", s.trust_domain);
    println!("started:          {}", rfc3339(s.started_at));
    println!("workload socket:  {}", s.workload_socket);
    println!("entries:          {}", s.entry_count);
    for a in &s.x509_authorities {
        let origin = if a.operator_supplied {
            "operator"
        } else {
            "generated"
        };
        println!(
            "X.509 authority:  {} ({origin}), valid until {}",
            a.subject,
            rfc3339(a.not_after)
        );
        println!("                  sha256 {}", a.fingerprint);
    }
    for k in &s.jwt_key_ids {
        println!("JWT key:          {k}");
    }
    Ok(())
}

pub(super) async fn entry_list(cli: &Cli) -> anyhow::Result<()> {
    let r = client(cli)
        .await?
        .list_entries(pb::ListEntriesRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        let v: Vec<_> = r
            .entries
            .iter()
            .map(|e| {
                let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
                json!({
                    "id": e.id,
                    "spiffe_id": e.spiffe_id,
                    "selectors": e.selectors,
                    "x509_svid_ttl_seconds": (e.x509_svid_ttl_seconds > 0).then_some(e.x509_svid_ttl_seconds),
                    "jwt_svid_ttl_seconds": (e.jwt_svid_ttl_seconds > 0).then_some(e.jwt_svid_ttl_seconds),
                    "owner": opt(&e.owner),
                    "purpose": opt(&e.purpose),
                    "risk": opt(&e.risk),
                    "expires_at": opt(&e.expires_at),
                    "hint": opt(&e.hint),
                    "max_task_ttl_seconds": (e.max_task_ttl_seconds > 0).then_some(e.max_task_ttl_seconds),
                    "from_config": e.from_config,
                    "last_active": (e.last_active > 0).then(|| rfc3339(e.last_active)),
                    "idle": e.idle,
                    "invalid": opt(&e.invalid),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    // Ids are 19 to 24 characters and SPIFFE IDs any length: the columns fit the data.
    let width = |of: fn(&pb::Entry) -> usize, heading: &str| {
        r.entries
            .iter()
            .map(of)
            .max()
            .unwrap_or(0)
            .max(heading.len())
    };
    let idw = width(|e| e.id.len(), "ID");
    let sidw = width(|e| e.spiffe_id.len(), "SPIFFE ID");
    println!(
        "{:<idw$} {:<sidw$} {:<7} {:<16} {:<21} {:<11} SELECTORS",
        "ID", "SPIFFE ID", "RISK", "OWNER", "EXPIRES", "ACTIVE"
    );
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for e in &r.entries {
        if !e.invalid.is_empty() {
            println!(
                "{:<idw$} {:<sidw$} INVALID, grants nothing until deleted: {}",
                e.id,
                dash(&e.spiffe_id),
                e.invalid
            );
            continue;
        }
        let active = if e.idle {
            "IDLE".to_owned()
        } else if e.last_active > 0 {
            rfc3339(e.last_active).get(..10).unwrap_or("-").to_owned()
        } else {
            "-".to_owned()
        };
        println!(
            "{:<idw$} {:<sidw$} {:<7} {:<16} {:<21} {:<11} {}",
            e.id,
            e.spiffe_id,
            dash(&e.risk),
            dash(&e.owner),
            dash(&e.expires_at),
            active,
            e.selectors.join(",")
        );
    }
    Ok(())
}

fn lease_json(l: &pb::Lease) -> serde_json::Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    json!({
        "id": l.id,
        "kind": l.kind,
        "spiffe_id": l.spiffe_id,
        "task_id": opt(&l.task_id),
        "issued_at": rfc3339(l.issued_at),
        "expires_at": rfc3339(l.expires_at),
        "state": l.state,
        "entry_id": l.entry_id,
        "holder": {"uid": l.uid, "pid": l.pid, "exe": opt(&l.exe)},
        "serial": opt(&l.serial),
        "revoked_at": (l.revoked_at_ms > 0).then(|| rfc3339(l.revoked_at_ms / 1000)),
        "revoked_by": opt(&l.revoked_by),
        "revoke_reason": opt(&l.revoke_reason),
    })
}

pub(super) async fn lease_list(
    cli: &Cli,
    mut req: pb::ListLeasesRequest,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let mut all = Vec::new();
    loop {
        let page = c
            .list_leases(req.clone())
            .await
            .map_err(status_err)?
            .into_inner();
        all.extend(page.leases);
        if page.next_page_token.is_empty() || limit.is_some_and(|l| all.len() >= l) {
            break;
        }
        req.page_token = page.next_page_token;
    }
    if let Some(l) = limit {
        all.truncate(l);
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all.iter().map(lease_json).collect::<Vec<_>>())?
        );
        return Ok(());
    }
    println!(
        "{:<22}  {:<10} {:<8} {:<20} {:<20} {:<12} SPIFFE ID",
        "ID", "KIND", "STATE", "ISSUED", "EXPIRES", "TASK"
    );
    for l in &all {
        println!(
            "{:<22}  {:<10} {:<8} {:<20} {:<20} {:<12} {}",
            l.id,
            l.kind,
            l.state,
            rfc3339(l.issued_at),
            rfc3339(l.expires_at),
            // The agent's part: the SPIFFE ID column names the agent (or is the full name).
            if l.task_id.is_empty() {
                "-"
            } else {
                crate::lease::task_id_of(&l.task_id)
            },
            l.spiffe_id
        );
    }
    eprintln!("{} lease(s)", all.len());
    Ok(())
}

fn print_lease(cli: &Cli, l: &pb::Lease) -> anyhow::Result<()> {
    let v = lease_json(l);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (k, v) in v.as_object().into_iter().flatten() {
            if !v.is_null() {
                println!(
                    "{k:<14} {}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                );
            }
        }
    }
    Ok(())
}

pub(super) async fn lease_show(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let l = client(cli)
        .await?
        .get_lease(pb::GetLeaseRequest { id: id.into() })
        .await
        .map_err(status_err)?
        .into_inner();
    print_lease(cli, &l)
}

pub(super) async fn lease_revoke(cli: &Cli, id: &str, reason: &str) -> anyhow::Result<()> {
    let l = client(cli)
        .await?
        .revoke_lease(pb::RevokeLeaseRequest {
            id: id.into(),
            reason: reason.into(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    print_lease(cli, &l)
}

pub(super) async fn task_revoke(cli: &Cli, task: &str, reason: &str) -> anyhow::Result<()> {
    let r = client(cli)
        .await?
        .revoke_task(pb::RevokeTaskRequest {
            task_id: task.into(),
            reason: reason.into(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        println!("{}", json!({"task_id": task, "revoked": r.revoked}));
    } else {
        println!("revoked {} lease(s) of task {task}", r.revoked);
    }
    Ok(())
}

pub(super) async fn task_complete(cli: &Cli, task: &str) -> anyhow::Result<()> {
    let r = client(cli)
        .await?
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.into(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        println!("{}", json!({"task_id": task, "revoked": r.revoked}));
    } else {
        println!("task {task} complete: revoked {} lease(s)", r.revoked);
    }
    Ok(())
}

fn approval_json(a: &pb::ApprovalRequest) -> serde_json::Value {
    json!({
        "id": a.id,
        "status": a.status,
        "agent": a.agent,
        "task_id": a.task_id,
        "subject": {"iss": a.subject_iss, "sub": a.subject_sub},
        "audience": a.audience,
        "scopes": a.scopes,
        "ttl_seconds": a.ttl_seconds,
        "x509_svid": a.x509_svid,
        "created_at": rfc3339(a.created_at),
        "expires_at": rfc3339(a.expires_at),
        "decided_by": (!a.decided_by.is_empty()).then(|| a.decided_by.clone()),
    })
}

pub(super) async fn approvals(cli: &Cli) -> anyhow::Result<()> {
    let r = client(cli)
        .await?
        .list_approvals(pb::ListApprovalsRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        let v: Vec<_> = r.requests.iter().map(approval_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if r.requests.is_empty() {
        println!("no requests waiting for approval");
        return Ok(());
    }
    // Everything an approval grants is shown: two requests that differ only in lifetime, in
    // whether a task X.509-SVID (with its private key) comes too, or in the subject's issuer
    // must not look alike to the operator deciding.
    println!(
        "{:<22} {:<8} {:<40} {:<16} {:<40} {:<28} {:>6} {:<4} SCOPES",
        "ID", "STATUS", "AGENT", "TASK", "SUBJECT (ISSUER)", "AUDIENCE", "TTL", "X509"
    );
    for a in &r.requests {
        println!(
            "{:<22} {:<8} {:<40} {:<16} {:<40} {:<28} {:>6} {:<4} {}",
            a.id,
            a.status,
            a.agent,
            a.task_id,
            format!("{} ({})", a.subject_sub, a.subject_iss),
            a.audience,
            format!("{}s", a.ttl_seconds),
            if a.x509_svid { "yes" } else { "no" },
            a.scopes.join(" ")
        );
    }
    Ok(())
}

pub(super) async fn decide(cli: &Cli, id: &str, approve: bool) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let req = pb::DecideApprovalRequest { id: id.into() };
    let a = if approve {
        c.approve(req).await
    } else {
        c.deny(req).await
    }
    .map_err(status_err)?
    .into_inner();
    if cli.json {
        println!("{}", approval_json(&a));
    } else {
        println!(
            "{} request {} ({} for task {} of {}, acting for {} of {}, {} s{}); it expires at {}",
            a.status,
            a.id,
            a.scopes.join(" "),
            a.task_id,
            a.agent,
            a.subject_sub,
            a.subject_iss,
            a.ttl_seconds,
            if a.x509_svid {
                ", with a task X.509-SVID and its key"
            } else {
                ""
            },
            rfc3339(a.expires_at)
        );
    }
    Ok(())
}

pub(super) async fn entry_review(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let e = client(cli)
        .await?
        .review_entry(pb::ReviewEntryRequest { id: id.into() })
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        println!(
            "{}",
            json!({"id": e.id, "spiffe_id": e.spiffe_id, "last_active": rfc3339(e.last_active), "idle": e.idle})
        );
    } else {
        println!("entry {} reviewed: {} is active again", e.id, e.spiffe_id);
    }
    Ok(())
}

pub(super) async fn kill(cli: &Cli, id: &str, reason: &str) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let r = c
        .kill_identity(pb::KillIdentityRequest {
            spiffe_id: id.into(),
            reason: reason.into(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    // A kill ahead of time is legitimate, so it stands; but in an incident a mistyped ID
    // that matches nothing must not read as done.
    if r.revoked == 0 {
        let entries = c
            .list_entries(pb::ListEntriesRequest {})
            .await
            .map_err(status_err)?
            .into_inner()
            .entries;
        let under = format!("{}/", id.trim_end_matches('/'));
        // An entry's identity, one under the ID, or an entry's agent's task identities (all
        // of them, or one).
        let task_of_agent = |e: &pb::Entry| {
            id.strip_prefix(e.spiffe_id.as_str()).is_some_and(|rest| {
                rest == "/task"
                    || rest
                        .strip_prefix("/task/")
                        .is_some_and(|t| crate::lease::validate_task_id(t).is_ok())
            })
        };
        if !entries
            .iter()
            .any(|e| e.spiffe_id == id || e.spiffe_id.starts_with(&under) || task_of_agent(e))
        {
            eprintln!(
                "tessera: warning: no entry grants {id} or an identity under it, and it held no \
                 credentials: check the spelling (tessera entry list); the kill stays in force"
            );
        }
    }
    if cli.json {
        println!("{}", json!({"spiffe_id": id, "revoked": r.revoked}));
    } else {
        println!(
            "killed {id}: revoked {} lease(s); it gets no credentials until `tessera restore {id}`",
            r.revoked
        );
    }
    Ok(())
}

pub(super) async fn restore(cli: &Cli, id: &str) -> anyhow::Result<()> {
    client(cli)
        .await?
        .restore_identity(pb::RestoreIdentityRequest {
            spiffe_id: id.into(),
        })
        .await
        .map_err(status_err)?;
    if cli.json {
        println!("{}", json!({"spiffe_id": id, "restored": true}));
    } else {
        println!("restored {id}");
    }
    Ok(())
}

pub(super) async fn killed(cli: &Cli) -> anyhow::Result<()> {
    let r = client(cli)
        .await?
        .list_killed(pb::ListKilledRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if cli.json {
        let v: Vec<_> = r
            .killed
            .iter()
            .map(|k| json!({"spiffe_id": k.spiffe_id, "killed_at": rfc3339(k.killed_at_ms / 1000), "killed_by": k.killed_by, "reason": k.reason}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<50} {:<21} {:<20} REASON",
        "SPIFFE ID", "KILLED AT", "BY"
    );
    for k in &r.killed {
        println!(
            "{:<50} {:<21} {:<20} {}",
            k.spiffe_id,
            rfc3339(k.killed_at_ms / 1000),
            k.killed_by,
            k.reason
        );
    }
    Ok(())
}

fn apply_args(e: &mut pb::Entry, a: &super::EntryArgs) -> anyhow::Result<()> {
    // Whole seconds, at least one: 0 means "the default" to the daemon, so a sub-second or
    // zero value would silently become the default lifetime.
    let secs = |s: &str| -> anyhow::Result<i64> {
        let d = humantime::parse_duration(s)
            .map_err(|err| anyhow::anyhow!("{s:?} is not a duration like 10m: {err}"))?;
        anyhow::ensure!(
            d.as_secs() >= 1 && d.subsec_nanos() == 0,
            "{s:?}: give a whole number of seconds, at least 1s (leave the flag out for the default)"
        );
        i64::try_from(d.as_secs()).map_err(|_| anyhow::anyhow!("{s:?} is too long"))
    };
    if let Some(v) = &a.spiffe_id {
        e.spiffe_id = v.clone();
    }
    if !a.selectors.is_empty() {
        e.selectors = a.selectors.clone();
    }
    if let Some(v) = &a.x509_ttl {
        e.x509_svid_ttl_seconds = secs(v)?;
    }
    if let Some(v) = &a.jwt_ttl {
        e.jwt_svid_ttl_seconds = secs(v)?;
    }
    if let Some(v) = &a.max_task_ttl {
        e.max_task_ttl_seconds = secs(v)?;
    }
    for (field, v) in [
        (&mut e.owner, &a.owner),
        (&mut e.purpose, &a.purpose),
        (&mut e.risk, &a.risk),
        (&mut e.expires_at, &a.expires_at),
        (&mut e.hint, &a.hint),
    ] {
        if let Some(v) = v {
            *field = v.clone();
        }
    }
    Ok(())
}

fn print_entry(cli: &Cli, e: &pb::Entry) -> anyhow::Result<()> {
    for w in &e.warnings {
        eprintln!("tessera: warning: {w}");
    }
    if cli.json {
        println!(
            "{}",
            json!({"id": e.id, "spiffe_id": e.spiffe_id, "selectors": e.selectors, "warnings": e.warnings})
        );
    } else {
        println!(
            "entry {}: {} [{}]",
            e.id,
            e.spiffe_id,
            e.selectors.join(",")
        );
    }
    Ok(())
}

pub(super) async fn entry_create(cli: &Cli, a: &super::EntryArgs) -> anyhow::Result<()> {
    let mut e = pb::Entry::default();
    apply_args(&mut e, a)?;
    let created = client(cli)
        .await?
        .create_entry(pb::CreateEntryRequest { entry: Some(e) })
        .await
        .map_err(status_err)?
        .into_inner();
    print_entry(cli, &created)
}

pub(super) async fn entry_update(cli: &Cli, id: &str, a: &super::EntryArgs) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let list = c
        .list_entries(pb::ListEntriesRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let mut e = list
        .entries
        .into_iter()
        .find(|e| e.id == id)
        .ok_or_else(|| anyhow::anyhow!("NotFound: no entry {id}"))?;
    // The daemon no longer knows this entry's other fields, so an update would drop them
    // unseen.
    if !e.invalid.is_empty() {
        anyhow::bail!(
            "entry {id} no longer validates ({}) and grants nothing; delete it \
             (tessera entry delete {id}) and create what it should be",
            e.invalid
        );
    }
    let before = e.clone();
    apply_args(&mut e, a)?;
    // An update that changes nothing would still be audited as one.
    anyhow::ensure!(
        e != before,
        "nothing to change: entry {id} already is what these options say (give at least one \
         option that differs; see tessera entry update --help)"
    );
    let updated = c
        .update_entry(pb::UpdateEntryRequest { entry: Some(e) })
        .await
        .map_err(status_err)?
        .into_inner();
    print_entry(cli, &updated)
}

pub(super) async fn entry_delete(cli: &Cli, id: &str) -> anyhow::Result<()> {
    client(cli)
        .await?
        .delete_entry(pb::DeleteEntryRequest { id: id.into() })
        .await
        .map_err(status_err)?;
    if !cli.json {
        println!("deleted entry {id}");
    }
    Ok(())
}

pub(super) fn audit_verify(
    cli: &Cli,
    file: Option<&std::path::Path>,
    no_store: bool,
    anchors: &[String],
) -> anyhow::Result<()> {
    let path = file.map_or_else(
        || {
            crate::config::Defaults::for_current_user()
                .data_dir
                .join("audit.jsonl")
        },
        std::path::Path::to_path_buf,
    );
    // The live file stands for the whole chain: every rotated file before it, from the first
    // record. A rotated file given by name is checked on its own.
    let whole_chain = path.file_name().is_some_and(|n| n == "audit.jsonl");
    // The store beside the file records the chain head: that also catches a deleted tail.
    let read_head = |dir: &std::path::Path| {
        crate::lease::store::recorded_audit_head(dir)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}: without the chain head the store recorded, a deleted tail goes unnoticed; run this as the daemon's user, or pass --no-store to check the chain alone"
                )
            })
            // A store that has committed no record yet has none: every record in the file
            // is then past its head.
            .map(|h| h.unwrap_or_else(|| (0, crate::audit::GENESIS.to_owned())))
    };
    let store_dir = path.parent().filter(|_| whole_chain && !no_store);
    let head = store_dir.map(read_head).transpose()?;
    let expected = head.as_ref().map(|(s, h)| (*s, h.as_str()));
    let result = if whole_chain {
        crate::audit::verify_chain(&path, expected)
    } else {
        crate::audit::verify(&path, None)
    };
    let scope = if whole_chain {
        ""
    } else {
        " (this file alone; give the live audit.jsonl, or no FILE, to check the whole chain)"
    };
    if !anchors.is_empty() && !whole_chain {
        anyhow::bail!("--anchor checks the whole chain: give the live audit.jsonl, or no FILE");
    }
    for a in anchors {
        let parsed = a
            .split_once(':')
            .and_then(|(n, h)| Some((n.parse::<u64>().ok().filter(|&n| n > 0)?, h)))
            .filter(|(_, h)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let Some((records, hash)) = parsed else {
            anyhow::bail!(
                "--anchor {a:?}: give RECORDS:HASH from an `audit chain head` log line (records=N head=<64 hex digits>)"
            );
        };
        match crate::audit::verify_chain(&path, Some((records, hash))) {
            Err(e) if e.missing_from.is_some() => anyhow::bail!(
                "{}: the chain ends before record {} of the logged head {records}:{hash}: the tail was deleted",
                e.file.display(),
                records - 1
            ),
            Err(e) if e.why.contains("differs from the one the store recorded") => anyhow::bail!(
                "{}: record {} is not the one in the logged head {records}:{hash}: records up to it were replaced",
                e.file.display(),
                records - 1
            ),
            Err(e) => anyhow::bail!("against the logged head {records}:{hash}: {e}"),
            Ok(_) => {}
        }
    }
    // Read again after the walk: whatever the daemon appended meanwhile it committed first.
    let past_head = match (&result, store_dir) {
        (Ok(v), Some(dir)) => v.past_head(read_head(dir)?.0),
        _ => None,
    };
    if let Some((first, last)) = past_head {
        if cli.json {
            println!(
                "{}",
                json!({"file": path, "ok": false, "past_head": [first, last]})
            );
        }
        anyhow::bail!(
            "{}: records {first} to {last} continue the chain but are past the head the store committed: tesserad commits every record to its store before it appends it, so either they were added to the file by hand, or the store is older than the log (restored from a copy; the daemon then refuses to start); the records before them check out",
            path.display()
        )
    }
    match result {
        Ok(v) if !v.gaps.is_empty() => {
            if cli.json {
                println!(
                    "{}",
                    json!({"file": path, "ok": false, "records": v.records, "head": v.head, "gaps": v.gaps})
                );
            }
            anyhow::bail!(
                "{}: the chain is intact ({} records), but it records {} gap(s), at seq {}: at start-up the daemon found audit records the store had committed missing from the file; each `{}` record says what was missing, and stored records that no longer continued the file are kept in the store's audit_rejected table",
                path.display(),
                v.records,
                v.gaps.len(),
                v.gaps
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::audit::GAP_EVENT
            )
        }
        Ok(v) => {
            if cli.json {
                println!(
                    "{}",
                    json!({"file": path, "ok": true, "records": v.records, "head": v.head})
                );
            } else {
                println!(
                    "{}: OK, {} records in {} file(s), chain head {}{scope}",
                    path.display(),
                    v.records,
                    v.files.len(),
                    v.head
                );
                if v.unfinished_tail {
                    println!("(the last line is still being written; it was not checked)");
                }
            }
            Ok(())
        }
        Err(e) => {
            let held = e
                .missing_from
                .zip(path.parent())
                .is_some_and(|(seq, dir)| crate::lease::store::holds_audit_record(dir, seq));
            if held {
                anyhow::bail!(
                    "{e}; the store still holds the missing records: if the daemon crashed or the machine lost power, its next start appends them"
                )
            }
            anyhow::bail!("{e}")
        }
    }
}
