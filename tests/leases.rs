//! Leases, revocation, the kill switch, the admin API and the audit log, on the real daemon.

mod common;

use std::time::Duration;

use common::{Daemon, Secret, entry_for_uid, my_uid, with_header};
use spiffe::WorkloadApiError;
use tessera::proto::tessera::v1 as admin_pb;
use tessera::proto::tessera::v1::admin_client::AdminClient;
use tessera::proto::workload as pb;
use tokio_stream::StreamExt;

fn two_identities() -> String {
    format!(
        "{}{}",
        entry_for_uid("agent", my_uid(), ""),
        entry_for_uid("other", my_uid(), "")
    )
}

async fn admin(d: &Daemon) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(common::channel(&d.admin_socket).await)
}

fn serial_hex(cert_der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert_der).unwrap();
    common::serial_key(c.raw_serial())
}

fn jti(token: &str) -> String {
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

fn lease_list(d: &Daemon, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["lease", "list", "--json"];
    a.extend_from_slice(args);
    let o = d.cli(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_lease_revocation_or_kill() {
    let d = Daemon::start(&two_identities());
    let client = d.client().await;
    let mut serials = Vec::new();
    let mut keys = Vec::new();
    let mut jtis = Vec::new();
    let mut tokens = Vec::new();
    for _ in 0..10 {
        let all = client.fetch_all_x509_svids().await.unwrap();
        serials.extend(all.iter().map(|s| serial_hex(s.leaf().as_ref())));
        keys.extend(all.iter().map(|s| s.private_key().as_ref().to_vec()));
        let agent = spiffe::SpiffeId::new("spiffe://tessera.internal/agent").unwrap();
        let t = client
            .fetch_jwt_svid(["svc"], Some(&agent))
            .await
            .unwrap()
            .token()
            .to_owned();
        jtis.push(jti(&t));
        tokens.push(t);
    }
    assert_eq!(serials.len(), 20);
    // Revoke one JWT lease and kill the second identity.
    let o = d.cli(&["lease", "revoke", &jtis[0], "--reason", "test revoke"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.cli(&[
        "kill",
        "spiffe://tessera.internal/other",
        "--reason",
        "compromised",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("revoked 10 lease(s)"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Checked now: the crash takes this daemon's log with it.
    let secrets: Vec<Secret> = keys
        .iter()
        .map(|k| Secret::Key(k))
        .chain(tokens.iter().map(|t| Secret::Token(t)))
        .collect();
    common::assert_no_secret(&d, &secrets);

    // Crash: no shutdown path runs.
    let mut d = d;
    let status = d.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    assert!(!status.success());
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);

    // Power loss on top: the audit file loses what the background sync had not made durable
    // yet. The store committed those records with the leases; the restart appends them.
    let data = dir.path().join("data");
    let audit = data.join("audit.jsonl");
    let full = std::fs::read_to_string(&audit).unwrap();
    let held: i64 = rusqlite::Connection::open(data.join("tessera.db"))
        .unwrap()
        .query_row("SELECT min(seq) FROM audit_pending", [], |r| r.get(0))
        .expect("the last batch's audit records are still held by the store");
    let lines: Vec<&str> = full.lines().collect();
    assert!((held as usize) < lines.len());
    std::fs::write(
        &audit,
        lines[..held as usize]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let verify = || {
        std::process::Command::new(common::tessera_bin())
            .args(["audit", "verify"])
            .arg(&audit)
            .output()
            .unwrap()
    };
    let o = verify();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tail was deleted") && err.contains("store still holds"),
        "{err}"
    );
    let d = Daemon::start_in(dir, &two_identities());
    let now = std::fs::read_to_string(&audit).unwrap();
    assert!(now.starts_with(&full), "restart restores the audit tail");
    let o = verify();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let leases = lease_list(&d, &[]);
    let listed_serials: Vec<&str> = leases.iter().filter_map(|l| l["serial"].as_str()).collect();
    for s in &serials {
        assert!(
            listed_serials.contains(&s.as_str()),
            "X.509 lease {s} lost in the crash"
        );
    }
    for j in &jtis {
        let l = leases
            .iter()
            .find(|l| l["id"] == j.as_str())
            .unwrap_or_else(|| panic!("JWT lease {j} lost in the crash"));
        assert_eq!(l["kind"], "jwt-svid");
        assert!(l["task_id"].is_null(), "task_id is present and null");
    }
    let revoked = leases.iter().find(|l| l["id"] == jtis[0].as_str()).unwrap();
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["revoke_reason"], "test revoke");
    let others: Vec<_> = leases
        .iter()
        .filter(|l| l["spiffe_id"] == "spiffe://tessera.internal/other")
        .collect();
    assert_eq!(others.len(), 10);
    assert!(
        others.iter().all(|l| l["state"] == "revoked"),
        "killed identity's leases stay revoked"
    );
    // Still killed: the agent gets only its own identity, the kill list survived.
    let all = d.client().await.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, ["spiffe://tessera.internal/agent"]);
    let killed = d.cli(&["killed", "--json"]);
    let killed: serde_json::Value = serde_json::from_slice(&killed.stdout).unwrap();
    assert_eq!(killed[0]["spiffe_id"], "spiffe://tessera.internal/other");
    assert_eq!(killed[0]["reason"], "compromised");
    // The revoked JWT does not validate after the restart either; the others still do.
    let c = d.client().await;
    let e = c.validate_jwt_token("svc", &tokens[0]).await.unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(c.validate_jwt_token("svc", &tokens[1]).await.is_ok());
}

/// The stream ends with `PermissionDenied` within 2 s.
async fn ends_with_no_identity<S, T>(stream: &mut S)
where
    S: futures_util::Stream<Item = Result<T, WorkloadApiError>> + Unpin,
    T: std::fmt::Debug,
{
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("stream reacts at once");
    assert!(
        matches!(end, Some(Err(WorkloadApiError::NoIdentityIssued))),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_live_stream_and_restore_reopens() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let client = d.client().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let t0 = std::time::Instant::now();
    let o = d.cli(&[
        "kill",
        "spiffe://tessera.internal/agent",
        "--reason",
        "incident 42",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ends_with_no_identity(&mut stream).await;
    eprintln!(
        "stream ended {:?} after the kill command started",
        t0.elapsed()
    );
    assert!(matches!(
        client.fetch_x509_svid().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    assert!(matches!(
        client.fetch_jwt_svid(["a"], None).await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    let o = d.cli(&["restore", "spiffe://tessera.internal/agent"]);
    assert!(o.status.success());
    assert!(client.fetch_x509_svid().await.is_ok());
}

#[tokio::test]
async fn killing_the_trust_domain_refuses_every_identity_in_it() {
    let d = Daemon::start(&two_identities());
    let client = d.client().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let o = d.cli(&["kill", "spiffe://tessera.internal", "--reason", "all hands"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The stream ends rather than receiving fresh SVIDs for the identities just revoked.
    ends_with_no_identity(&mut stream).await;
    assert!(matches!(
        client.fetch_jwt_svid(["a"], None).await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    assert!(matches!(
        client.fetch_x509_svid().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    let o = d.cli(&["restore", "spiffe://tessera.internal"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(client.fetch_x509_svid().await.is_ok());
}

/// The kill answers once it is durable and marks leases one by one afterwards; a restore sent
/// at once must not bring any of them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_right_after_a_kill_leaves_every_lease_revoked() {
    let d = Daemon::start(&two_identities());
    let client = std::sync::Arc::new(d.client().await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = std::sync::Arc::clone(&client);
            tokio::spawn(async move {
                let mut jtis = Vec::new();
                for _ in 0..100 {
                    let svid = c
                        .fetch_jwt_svid(
                            ["a"],
                            Some(&"spiffe://tessera.internal/agent".parse().unwrap()),
                        )
                        .await
                        .unwrap();
                    jtis.push(jti(svid.token()));
                }
                jtis
            })
        })
        .collect();
    let mut issued = Vec::new();
    for t in tasks {
        issued.extend(t.await.unwrap());
    }
    let other = client
        .fetch_jwt_svid(
            ["a"],
            Some(&"spiffe://tessera.internal/other".parse().unwrap()),
        )
        .await
        .unwrap();
    let mut a = admin(&d).await;
    let killed = a
        .kill_identity(admin_pb::KillIdentityRequest {
            spiffe_id: "spiffe://tessera.internal/agent".into(),
            reason: "incident 43".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(killed.revoked as usize, issued.len());
    a.restore_identity(admin_pb::RestoreIdentityRequest {
        spiffe_id: "spiffe://tessera.internal/agent".into(),
    })
    .await
    .unwrap();
    let states: std::collections::HashMap<_, _> = common::all_leases(&d.admin_socket)
        .await
        .into_iter()
        .map(|l| (l.id, l.state))
        .collect();
    for j in &issued {
        assert_eq!(states.get(j).map(String::as_str), Some("revoked"), "{j}");
    }
    assert_eq!(
        states.get(&jti(other.token())).map(String::as_str),
        Some("active"),
        "another identity is untouched"
    );
    // Restored: new credentials again.
    client.fetch_jwt_svid(["a"], None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_identity_updates_a_stream_that_has_others() {
    let d = Daemon::start(&two_identities());
    let mut stream = d.client().await.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 2);
    // Kill matches whole path segments: killing /agen touches neither /agent nor /other. It
    // stands, but the operator is told that nothing has that identity (a typo, perhaps).
    let typo = d.cli(&["kill", "spiffe://tessera.internal/agen"]);
    assert!(typo.status.success());
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("no entry grants"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );
    let real = d.cli(&["kill", "spiffe://tessera.internal/other"]);
    assert!(real.status.success());
    assert!(
        real.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&real.stderr)
    );
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: Vec<String> = next
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, ["spiffe://tessera.internal/agent"]);
    // A restore gives the identity back to the live stream (not only at its next rotation).
    assert!(
        d.cli(&["restore", "spiffe://tessera.internal/other"])
            .status
            .success()
    );
    let back = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            if ctx.svids().len() == 2 {
                return ctx;
            }
        }
    })
    .await
    .expect("the restored identity reaches the stream");
    assert_eq!(
        back.svids()[1].spiffe_id().to_string(),
        "spiffe://tessera.internal/other"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_change_reaches_each_stream_after_its_own_delay() {
    // Workload API §4.3: widespread updates may be splayed, as workloads that reload on every
    // message would otherwise reload together. A re-signed CRL, certificates unchanged, goes
    // out on each stream at its own moment within `crl_update_splay`.
    const SPLAY: Duration = Duration::from_secs(3);
    let d = Daemon::start(&format!(
        "workload_api.crl_update_splay = \"3s\"\n{}",
        entry_for_uid("agent", my_uid(), "")
    ));
    let mut raw =
        tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            common::channel(&d.socket).await,
        );
    let mut svid_streams = Vec::new();
    for _ in 0..9 {
        let req = with_header(pb::X509svidRequest {});
        let mut s = raw.fetch_x509svid(req).await.unwrap().into_inner();
        let first = s.message().await.unwrap().unwrap();
        svid_streams.push((serial_hex(&first.svids[0].x509_svid), s));
    }
    let mut bundle_streams = Vec::new();
    for _ in 0..4 {
        let req = with_header(pb::X509BundlesRequest {});
        let mut s = raw.fetch_x509_bundles(req).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        bundle_streams.push(s);
    }
    // The last stream's SVID, its stream closed, is revoked: nothing the others hold changes
    // but the CRL.
    let (gone, closed) = svid_streams.pop().unwrap();
    drop(closed);
    let lease = lease_list(&d, &["--kind", "x509-svid"])
        .into_iter()
        .find(|l| l["serial"] == gone.as_str())
        .unwrap();
    let o = d.cli(&["lease", "revoke", lease["id"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t0 = std::time::Instant::now();
    let wait = Duration::from_secs(6);
    let svids = svid_streams.into_iter().map(|(serial, mut s)| {
        let gone = gone.clone();
        async move {
            let m = tokio::time::timeout(wait, s.message())
                .await
                .expect("a stream hears of the CRL within its splay")
                .unwrap()
                .unwrap();
            assert_eq!(
                serial_hex(&m.svids[0].x509_svid),
                serial,
                "a CRL change re-minted nothing"
            );
            assert!(listed(&m.crl[0], &gone), "the revoked serial is listed");
            t0.elapsed()
        }
    });
    let bundles = bundle_streams.into_iter().map(|mut s| {
        let gone = gone.clone();
        async move {
            let m = tokio::time::timeout(wait, s.message())
                .await
                .expect("a bundle stream hears of the CRL within its splay")
                .unwrap()
                .unwrap();
            assert!(listed(&m.crl[0], &gone), "the revoked serial is listed");
            t0.elapsed()
        }
    });
    let (mut at, b) = futures_util::future::join(
        futures_util::future::join_all(svids),
        futures_util::future::join_all(bundles),
    )
    .await;
    at.extend(b);
    at.sort();
    let (first, last) = (at[0], at[at.len() - 1]);
    // Twelve moments drawn in 3 s all within 300 ms of each other: about 1 in 10^10.
    assert!(
        last - first > Duration::from_millis(300),
        "the streams heard of the CRL together: {at:?}"
    );
    assert!(last < SPLAY + Duration::from_millis(1500), "{at:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_svid_is_replaced_at_once_and_listed_in_the_crl() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let mut raw =
        tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            common::channel(&d.socket).await,
        );
    let req = with_header(pb::X509svidRequest {});
    let mut stream = raw.fetch_x509svid(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let serial = serial_hex(&first.svids[0].x509_svid);
    // Bundle streams of both kinds, open before the revocation.
    let req = with_header(pb::X509BundlesRequest {});
    let mut x509_bundles = raw.fetch_x509_bundles(req).await.unwrap().into_inner();
    x509_bundles.message().await.unwrap().unwrap();
    let req = with_header(pb::JwtBundlesRequest {});
    let mut jwt_bundles = raw.fetch_jwt_bundles(req).await.unwrap().into_inner();
    jwt_bundles.message().await.unwrap().unwrap();
    let lease = lease_list(&d, &["--kind", "x509-svid"])
        .into_iter()
        .find(|l| l["serial"] == serial.as_str())
        .unwrap();
    let o = d.cli(&[
        "lease",
        "revoke",
        lease["id"].as_str().unwrap(),
        "--reason",
        "key leaked",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The stream gets a fresh SVID at once. The CRL listing the old one comes in that message
    // or, if it was signed after, after the stream's CRL splay (5 s by default).
    let m = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("the revoked SVID is replaced at once")
        .unwrap()
        .unwrap();
    assert_ne!(
        serial_hex(&m.svids[0].x509_svid),
        serial,
        "the stream received a fresh SVID"
    );
    let fresh = serial_hex(&m.svids[0].x509_svid);
    let mut crl = m.crl.first().cloned().unwrap_or_default();
    while !listed(&crl, &serial) {
        let m = tokio::time::timeout(Duration::from_secs(8), stream.message())
            .await
            .expect("the revoked serial is in a CRL sent on the stream within the splay")
            .unwrap()
            .unwrap();
        assert_eq!(serial_hex(&m.svids[0].x509_svid), fresh);
        if let Some(c) = m.crl.first() {
            crl = c.clone();
        }
    }
    // The X.509 bundle stream carries the new CRL; the JWT bundle, unchanged, is not sent
    // again (Workload API §4.3: messages follow changes).
    let mut heard = false;
    while !heard {
        let m = tokio::time::timeout(Duration::from_secs(8), x509_bundles.message())
            .await
            .expect("the X.509 bundle stream hears of the CRL")
            .unwrap()
            .unwrap();
        heard = m.crl.iter().any(|c| listed(c, &serial));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(800), jwt_bundles.message())
            .await
            .is_err(),
        "the JWT bundle stream sent an unchanged bundle"
    );
    // The CRL over HTTP is the same kind of document, signed by the CA.
    let body = common::http_get(d.http, "/crl").1;
    assert!(listed(&body, &serial));
    let (_, parsed) = x509_parser::parse_x509_crl(&body).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&first.svids[0].bundle).unwrap();
    parsed.verify_signature(ca.public_key()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_entry_revokes_what_the_default_entry_granted() {
    // Nothing configured: the built-in default entry serves the user who started it.
    let d = Daemon::start("");
    let c = d.client().await;
    let svid = c.fetch_x509_svid().await.unwrap();
    let default_id = format!("spiffe://tessera.internal/unix/uid/{}", my_uid());
    assert_eq!(svid.spiffe_id().to_string(), default_id);
    let serial = serial_hex(svid.cert_chain()[0].as_ref());
    c.fetch_jwt_svid(&["db"], None).await.unwrap();
    d.create_entry("spiffe://tessera.internal/svc/web", "unix:uid:47099");
    // Both of its credentials are revoked, with the reason, and the certificate is on the CRL.
    let held: Vec<_> = common::all_leases(&d.admin_socket)
        .await
        .into_iter()
        .filter(|l| l.spiffe_id == default_id)
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    for l in &held {
        assert_eq!(l.state, "revoked", "{l:?}");
        assert!(l.revoke_reason.contains("default entry"), "{l:?}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listed(&common::http_get(d.http, "/crl").1, &serial) {
        assert!(
            std::time::Instant::now() < deadline,
            "the default entry's certificate is not on the CRL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The audit record of the create says so.
    let create = audit_records(&d)
        .into_iter()
        .find(|v| v["event"] == "entry_create")
        .expect("an entry_create record");
    assert_eq!(create["detail"]["revoked"], 2, "{create}");
    assert_eq!(
        create["detail"]["default_entry_withdrawn"],
        default_id.as_str()
    );
    // A second entry revokes nothing more, and says nothing of the default entry.
    d.create_entry("spiffe://tessera.internal/svc/api", "unix:uid:47098");
    let second = audit_records(&d)
        .into_iter()
        .filter(|v| v["event"] == "entry_create")
        .nth(1)
        .expect("a second entry_create record");
    assert!(second["detail"].get("revoked").is_none(), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_configured_entries_revokes_what_the_default_entry_granted() {
    let d = Daemon::start("");
    let svid = d.client().await.fetch_x509_svid().await.unwrap();
    let serial = serial_hex(svid.cert_chain()[0].as_ref());
    // An entry put in the config file ends the default entry at the next start.
    let d = Daemon::start_in(d.stop(), &entry_for_uid("svc", 47_099, ""));
    let held: Vec<_> = common::all_leases(&d.admin_socket)
        .await
        .into_iter()
        .filter(|l| l.serial == serial)
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].state, "revoked", "{:?}", held[0]);
    assert!(
        held[0].revoke_reason.contains("default entry"),
        "{:?}",
        held[0]
    );
    assert!(listed(&common::http_get(d.http, "/crl").1, &serial));
    let withdrawn = audit_records(&d)
        .into_iter()
        .find(|v| v["event"] == "default_entry_withdrawn")
        .expect("a default_entry_withdrawn record");
    assert_eq!(withdrawn["detail"]["revoked"], 1, "{withdrawn}");
    // Once revoked, a later start has nothing more to do.
    let d = Daemon::start_in(d.stop(), &entry_for_uid("svc", 47_099, ""));
    let withdrawals = audit_records(&d)
        .into_iter()
        .filter(|v| v["event"] == "default_entry_withdrawn")
        .count();
    assert_eq!(withdrawals, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_on_a_crl_dated_after_its_expiry() {
    // RFC 5280 §3.3: the serial stays until one CRL issued beyond the certificate's validity
    // lists it; CRLs are dated 30 s back, so that one is signed 31 s after notAfter.
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), "x509_svid_ttl = \"2s\""));
    let svid = d.client().await.fetch_x509_svid().await.unwrap();
    let cert = svid.cert_chain()[0].as_ref().to_vec();
    let serial = serial_hex(&cert);
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    let not_after = parsed.validity().not_after.timestamp();
    let lease = lease_list(&d, &["--kind", "x509-svid"])
        .into_iter()
        .find(|l| l["serial"] == serial.as_str())
        .unwrap();
    let o = d.cli(&["lease", "revoke", lease["id"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = common::http_get(d.http, "/crl").1;
        let (_, crl) = x509_parser::parse_x509_crl(&body).unwrap();
        if crl.last_update().timestamp() > not_after {
            assert!(
                listed(&body, &serial),
                "the first CRL dated after the expiry lacks the revoked serial"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no CRL dated after the certificate's expiry was signed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The daemon's audit log, one JSON value per record.
fn audit_records(d: &Daemon) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.data_dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn listed(crl: &[u8], serial: &str) -> bool {
    let Ok((_, c)) = x509_parser::parse_x509_crl(crl) else {
        return false;
    };
    c.iter_revoked_certificates()
        .any(|r| common::serial_key(r.raw_serial()) == serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_jwt_no_longer_validates() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let client = d.client().await;
    let token = client
        .fetch_jwt_svid(["svc"], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    assert!(client.validate_jwt_token("svc", &token).await.is_ok());
    let o = d.cli(&["lease", "revoke", &jti(&token)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = client.validate_jwt_token("svc", &token).await.unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
    // Revoking again is a clear error that changes nothing.
    let o = d.cli(&["lease", "revoke", &jti(&token)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already revoked"));
}

/// Whether every thread of `pid` is traced by `tracer`.
fn all_threads_traced_by(pid: i32, tracer: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let tracer = tracer.to_string();
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
            s.lines().any(|l| {
                l.starts_with("TracerPid:") && l.split_whitespace().nth(1) == Some(&tracer)
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_is_answered_only_after_an_fdatasync_of_the_store_log() {
    // An fsync() of the log also makes its new mtime durable: on a journaled ext4 one more
    // device write and flush per commit. The bundled SQLite uses fsync() unless built with
    // HAVE_FDATASYNC (.cargo/config.toml), which a build can lose with only a warning.
    use std::io::Read;
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        common::skip("strace is not installed");
        return;
    }
    // Every fdatasync() returns this late: an answer that came sooner did not wait for it.
    const DELAY: Duration = Duration::from_millis(250);
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let client = d.client().await;
    // The log exists once something is committed.
    client.fetch_jwt_svid(["svc"], None).await.unwrap();
    let out = d.dir.path().join("syncs.txt");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-e"])
        .arg(format!("inject=fdatasync:delay_exit={}", DELAY.as_micros()))
        .arg("-o")
        .arg(&out)
        .args(["-p", &d.pid().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !all_threads_traced_by(d.pid(), strace.id()) {
        if let Some(status) = strace.try_wait().unwrap() {
            let mut why = String::new();
            let _ = strace.stderr.take().unwrap().read_to_string(&mut why);
            if why.contains("Operation not permitted") {
                // Yama's ptrace_scope, or a container without CAP_SYS_PTRACE.
                common::skip(&format!("strace may not attach here: {why}"));
                return;
            }
            panic!("strace stopped ({status}): {why}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "strace did not attach"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..5 {
        let asked = std::time::Instant::now();
        client
            .fetch_jwt_svid([format!("svc{i}")], None)
            .await
            .unwrap();
        assert!(
            asked.elapsed() >= DELAY,
            "answered before the sync returned"
        );
    }
    let asked = std::time::Instant::now();
    client.fetch_x509_svid().await.unwrap();
    assert!(
        asked.elapsed() >= DELAY,
        "answered before the sync returned"
    );
    // SAFETY: kill(2) on our child; strace detaches and exits on SIGINT.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    strace.wait().unwrap();
    let trace = std::fs::read_to_string(&out).unwrap();
    let log: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("tessera.db-wal>"))
        .collect();
    // Six credentials asked one after another: six commits, each with its own sync.
    let data_syncs = log.iter().filter(|l| l.contains(" fdatasync(")).count();
    assert!(data_syncs >= 6, "{trace}");
    assert!(!log.iter().any(|l| l.contains(" fsync(")), "{trace}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_bad_input_and_changes_nothing() {
    let cfg = entry_for_uid("agent", my_uid(), "");
    let d = Daemon::start(&cfg);
    // A live credential of the identity the bad kills name: a request refused after it had
    // revoked or killed would show on it.
    let token = d
        .client()
        .await
        .fetch_jwt_svid(["svc"], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    let lease = jti(&token);
    let audit = d.data_dir.join("audit.jsonl");
    let audited = std::fs::read_to_string(&audit).unwrap().lines().count();
    let mut a = admin(&d).await;
    let e = a
        .revoke_lease(admin_pb::RevokeLeaseRequest {
            id: "AAAAAAAAAAAAAAAAAAAAAA".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = a
        .revoke_lease(admin_pb::RevokeLeaseRequest {
            id: "not-a-lease".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    for (id, reason, says) in [
        ("spiffe://Bad/ID", "x".to_owned(), "trust domain"),
        // A kill in another trust domain would match nothing here yet be listed as in force.
        (
            "spiffe://elsewhere.example/agent",
            "x".to_owned(),
            "tessera.internal",
        ),
        (
            "spiffe://tessera.internal/agent",
            "x".repeat(5000),
            "reason",
        ),
        // An empty reason is given the default one; a blank one is refused.
        (
            "spiffe://tessera.internal/agent",
            " \t".to_owned(),
            "reason is required",
        ),
    ] {
        let e = a
            .kill_identity(admin_pb::KillIdentityRequest {
                spiffe_id: id.into(),
                reason,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{id}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    let e = a
        .revoke_task(admin_pb::RevokeTaskRequest {
            task_id: "no such/task".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // An empty id is the caller's mistake, not a missing object.
    let e = a
        .delete_entry(admin_pb::DeleteEntryRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = a
        .complete_task(admin_pb::CompleteTaskRequest {
            task_id: "bad task!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A well-formed id of no task: a typo must not look revoked.
    let e = a
        .revoke_task(admin_pb::RevokeTaskRequest {
            task_id: "job-never-seen".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = a
        .create_entry(admin_pb::CreateEntryRequest {
            entry: Some(admin_pb::Entry {
                spiffe_id: "spiffe://tessera.internal/x".into(),
                selectors: vec!["unix:uid:1".into()],
                jwt_svid_ttl_seconds: -5,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("jwt_svid_ttl_seconds"),
        "{}",
        e.message()
    );
    // Out of bounds: named as sent (the checks are the config file's, with its key names).
    for (entry, field) in [
        (
            admin_pb::Entry {
                x509_svid_ttl_seconds: 1,
                ..Default::default()
            },
            "x509_svid_ttl_seconds (--x509-ttl): must be at least 2s",
        ),
        (
            admin_pb::Entry {
                max_task_ttl_seconds: 1,
                ..Default::default()
            },
            "max_task_ttl_seconds (--max-task-ttl): must be at least 10s, as task lifetimes are",
        ),
    ] {
        let e = a
            .create_entry(admin_pb::CreateEntryRequest {
                entry: Some(admin_pb::Entry {
                    spiffe_id: "spiffe://tessera.internal/x".into(),
                    selectors: vec!["unix:uid:1".into()],
                    ..entry
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), field);
    }
    // An expired lease is not listed: an empty list would read as "nothing expired".
    let e = a
        .list_leases(admin_pb::ListLeasesRequest {
            state: "expired".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("leaves the table"), "{}", e.message());
    // An entry that could never grant.
    let e = a
        .create_entry(admin_pb::CreateEntryRequest {
            entry: Some(admin_pb::Entry {
                spiffe_id: "spiffe://tessera.internal/x".into(),
                selectors: vec!["unix:uid:1".into()],
                expires_at: "2020-01-01T00:00:00Z".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("expires_at") && e.message().contains("in the past"),
        "{}",
        e.message()
    );
    let e = a
        .restore_identity(admin_pb::RestoreIdentityRequest {
            spiffe_id: "spiffe://tessera.internal/never-killed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = a
        .list_leases(admin_pb::ListLeasesRequest {
            state: "zombie".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let no_selectors = admin_pb::Entry {
        spiffe_id: "spiffe://tessera.internal/x".into(),
        ..Default::default()
    };
    let e = a
        .create_entry(admin_pb::CreateEntryRequest {
            entry: Some(no_selectors),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("selectors"), "{}", e.message());
    let bad_sel = admin_pb::Entry {
        spiffe_id: "spiffe://tessera.internal/x".into(),
        selectors: vec!["unix:uid:-1".into()],
        ..Default::default()
    };
    assert_eq!(
        a.create_entry(admin_pb::CreateEntryRequest {
            entry: Some(bad_sel)
        })
        .await
        .unwrap_err()
        .code(),
        tonic::Code::InvalidArgument
    );
    // The file's entry, by the id the daemon gave it.
    let config_id = a
        .list_entries(admin_pb::ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries[0]
        .id
        .clone();
    assert!(config_id.starts_with("config-"), "{config_id}");
    let e = a
        .update_entry(admin_pb::UpdateEntryRequest {
            entry: Some(admin_pb::Entry {
                id: config_id,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // Nothing was changed by any of that.
    assert_eq!(
        a.list_entries(admin_pb::ListEntriesRequest {})
            .await
            .unwrap()
            .into_inner()
            .entries
            .len(),
        1
    );
    assert!(
        a.list_killed(admin_pb::ListKilledRequest {})
            .await
            .unwrap()
            .into_inner()
            .killed
            .is_empty()
    );
    assert!(
        d.client().await.fetch_x509_svid().await.is_ok(),
        "still serving"
    );
    // Nor in the store: the list above is memory, a kill refused after its commit would be
    // in force from the next start. No change was audited (records reach the file before the
    // answer), the credential is active, and after a restart nothing is killed and it still
    // validates.
    let changes: Vec<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .skip(audited)
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["event"].as_str().unwrap().to_owned()
        })
        .filter(|ev| {
            ["kill", "restore", "revoke"].contains(&ev.as_str()) || ev.starts_with("entry_")
        })
        .collect();
    assert!(changes.is_empty(), "audited changes: {changes:?}");
    async fn state(d: &Daemon, lease: &str) -> Option<String> {
        common::all_leases(&d.admin_socket)
            .await
            .into_iter()
            .find(|l| l.id == lease)
            .map(|l| l.state)
    }
    assert_eq!(state(&d, &lease).await.as_deref(), Some("active"));
    common::assert_no_secret(&d, &[Secret::Token(&token)]);
    let d = Daemon::start_in(d.stop(), &cfg);
    let killed: Vec<String> = admin(&d)
        .await
        .list_killed(admin_pb::ListKilledRequest {})
        .await
        .unwrap()
        .into_inner()
        .killed
        .into_iter()
        .map(|k| k.spiffe_id)
        .collect();
    assert!(killed.is_empty(), "killed after a restart: {killed:?}");
    assert_eq!(state(&d, &lease).await.as_deref(), Some("active"));
    d.client()
        .await
        .validate_jwt_token("svc", &token)
        .await
        .expect("the credential still validates after a restart");
}

/// Asserts the lease of `token`, a credential of `spiffe_id`, is listed revoked for `reason`.
fn assert_revoked_for(d: &Daemon, spiffe_id: &str, token: &str, reason: &str) {
    let revoked = lease_list(d, &["--state", "revoked", "--spiffe-id", spiffe_id]);
    assert!(
        revoked
            .iter()
            .any(|l| l["id"] == jti(token).as_str() && l["revoke_reason"] == reason),
        "{revoked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_reach_live_streams_and_survive_restart() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let mut stream = d.client().await.stream_x509_contexts().await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().svids().len(), 1);
    let uid_sel = format!("unix:uid:{}", my_uid());
    let o = d.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://tessera.internal/added",
        "--selector",
        &uid_sel,
        "--owner",
        "ops",
        "--risk",
        "medium",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.svids().len(), 2);
    // Update reaches the stream too (new hint → new SVID set).
    assert!(
        d.cli(&["entry", "update", &id, "--hint", "extra"])
            .status
            .success()
    );
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.svids()[1].hint(), Some("extra"));
    // Edits that change no certificate of this caller send nothing (Workload API §4.3: some
    // clients reload on every message): the entry's owner, an entry another uid matches.
    assert!(
        d.cli(&["entry", "update", &id, "--owner", "ops2"])
            .status
            .success()
    );
    let o = d.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://tessera.internal/someone-else",
        "--selector",
        "unix:uid:4242",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        tokio::time::timeout(Duration::from_millis(800), stream.next())
            .await
            .is_err(),
        "a message although the response is as it was"
    );

    // A JWT-SVID of the entry survives an edit of its owner, not one of its selectors: a
    // caller the entry no longer matches must not keep a token of it.
    let added: spiffe::SpiffeId = "spiffe://tessera.internal/added".parse().unwrap();
    let client = d.client().await;
    let token = client
        .fetch_jwt_svid(["svc"], Some(&added))
        .await
        .unwrap()
        .token()
        .to_owned();
    assert!(
        d.cli(&["entry", "update", &id, "--owner", "team"])
            .status
            .success()
    );
    assert!(client.validate_jwt_token("svc", &token).await.is_ok());
    // SAFETY: no preconditions.
    let gid = unsafe { libc::getegid() };
    let o = d.cli(&[
        "entry",
        "update",
        &id,
        "--selector",
        &uid_sel,
        "--selector",
        &format!("unix:gid:{gid}"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = client.validate_jwt_token("svc", &token).await.unwrap_err();
    assert!(e.to_string().contains("revoked"), "{e}");
    assert_revoked_for(
        &d,
        "spiffe://tessera.internal/added",
        &token,
        "entry identity or selectors changed",
    );
    // Still matched by the new selectors: it gets a new token.
    let again = client.fetch_jwt_svid(["svc"], Some(&added)).await.unwrap();
    assert!(
        client
            .validate_jwt_token("svc", again.token())
            .await
            .is_ok()
    );

    let dir = d.stop();
    let d = Daemon::start_in(dir, &entry_for_uid("agent", my_uid(), ""));
    let list = d.cli(&["entry", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let added = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .expect("stored entry survives restart");
    assert_eq!(added["owner"], "team");
    assert_eq!(added["hint"], "extra");
    let client = d.client().await;
    let added_id: spiffe::SpiffeId = "spiffe://tessera.internal/added".parse().unwrap();
    let kept = client
        .fetch_jwt_svid(["svc"], Some(&added_id))
        .await
        .unwrap();
    assert!(d.cli(&["entry", "delete", &id]).status.success());
    // What it granted goes with it, on the CRL and in the store, not only in validation.
    assert_revoked_for(
        &d,
        "spiffe://tessera.internal/added",
        kept.token(),
        "entry deleted",
    );
    assert_eq!(
        d.client().await.fetch_all_x509_svids().await.unwrap().len(),
        1
    );
}

/// A record that continues `prev` (seq `seq`), hashed as the daemon hashes its records: what
/// anyone who can write the file can make, since the chain has no key.
fn forged_record(seq: u64, prev: &str) -> String {
    let body = serde_json::json!({
        "seq": seq,
        "time": "2026-12-07T13:40:00.000Z",
        "event": "kill",
        "actor": {"operator_uid": 1001, "operator_pid": 4242},
        "spiffe_id": "spiffe://tessera.internal/prod",
        "prev": prev,
    })
    .to_string();
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()));
    format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1])
}

#[test]
fn records_forged_into_a_log_the_store_never_committed_to_fail_verify() {
    // A daemon that has recorded nothing: its store holds no chain head yet.
    let dir = Daemon::start("").stop();
    let audit = dir.path().join("data/audit.jsonl");
    std::fs::write(&audit, forged_record(0, &"0".repeat(64)) + "\n").unwrap();
    let o = std::process::Command::new(common::tessera_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("past the head the store committed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_everything_and_detects_tampering() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let client = d.client().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    let token = client
        .fetch_jwt_svid(["svc"], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    assert!(d.cli(&["lease", "revoke", &jti(&token)]).status.success());
    assert!(
        d.cli(&[
            "kill",
            "spiffe://tessera.internal/agent",
            "--reason",
            "drill"
        ])
        .status
        .success()
    );
    assert!(client.fetch_x509_svid().await.is_err());
    assert!(
        d.cli(&["restore", "spiffe://tessera.internal/agent"])
            .status
            .success()
    );
    // Neither the key nor the token reached the log or the audit file, which by now holds
    // every event above (records are appended before the answer).
    common::assert_no_secret(
        &d,
        &[
            Secret::Key(svid.private_key().as_ref()),
            Secret::Token(&token),
        ],
    );
    // The chain head goes to the daemon's log too (an anchor outside the data directory).
    let logs = d.log_text();
    let (logged_records, logged_head) = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "audit chain head")
        .and_then(|l| {
            Some((
                l["fields"]["records"].as_u64()?,
                l["fields"]["head"].as_str()?.to_owned(),
            ))
        })
        .unwrap_or_else(|| panic!("no audit chain head in the log:\n{logs}"));
    let mut d = d;
    assert!(
        d.signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
            .success()
    );
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    // A clean stop logs the head too, so the newest records are anchored off the host.
    let records = std::fs::read_to_string(dir.path().join("data/audit.jsonl"))
        .unwrap()
        .lines()
        .count() as u64;
    let head_at = |logs: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["fields"]["message"] == "audit chain head")
            .filter_map(|l| l["fields"]["records"].as_u64())
            .next_back()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while head_at(&d.log_text()) != Some(records) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(head_at(&d.log_text()), Some(records), "{}", d.log_text());
    drop(d);
    let audit = dir.path().join("data/audit.jsonl");
    let text = std::fs::read_to_string(&audit).unwrap();
    for ev in [
        "\"issue\"",
        "\"revoke\"",
        "\"kill\"",
        "\"restore\"",
        "\"deny\"",
    ] {
        assert!(text.contains(ev), "audit has an {ev} record");
    }
    assert!(
        text.contains(&format!("\"hash\":\"{logged_head}\"")),
        "the logged head {logged_head} is a record of the chain"
    );
    let verify = |file: &std::path::Path| {
        std::process::Command::new(common::tessera_bin())
            .args(["audit", "verify"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = verify(&audit);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A head the daemon logged is an anchor verify can check the chain against.
    let anchored = |anchor: &str| {
        std::process::Command::new(common::tessera_bin())
            .args(["audit", "verify", "--anchor", anchor])
            .arg(&audit)
            .output()
            .unwrap()
    };
    let o = anchored(&format!("{logged_records}:{logged_head}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = anchored(&format!("{logged_records}:{}", "0".repeat(64)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is not the one in the logged head"),
        "{err}"
    );

    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let original = lines.clone();
    lines[1] = lines[1].replace("\"issue\"", "\"isuse\"");
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let bad = verify(&audit);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // So is deleting the first record: the chain must start at record 0.
    std::fs::write(&audit, original[1..].join("\n") + "\n").unwrap();
    let bad = verify(&audit);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("starts at record 1"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Records that continue the chain past the head the store committed were not written by
    // the daemon (which commits each record before appending it), though anyone can compute
    // their hashes.
    let last: serde_json::Value = serde_json::from_str(original.last().unwrap()).unwrap();
    let forged = forged_record(
        last["seq"].as_u64().unwrap() + 1,
        last["hash"].as_str().unwrap(),
    );
    std::fs::write(&audit, original.join("\n") + "\n" + &forged + "\n").unwrap();
    let bad = verify(&audit);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("past the head the store committed"),
        "{err}"
    );

    // Deleting the last record is caught against the head the store committed.
    std::fs::write(&audit, original[..original.len() - 1].join("\n") + "\n").unwrap();
    let bad = verify(&audit);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("tail was deleted"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // With the store's copies wiped too, nothing can bring the record back: the restarted
    // daemon serves, goes on from the file and writes the gap into the chain, where verify
    // keeps reporting it.
    rusqlite::Connection::open(dir.path().join("data/tessera.db"))
        .unwrap()
        .execute("DELETE FROM audit_pending", [])
        .unwrap();
    let d = Daemon::start_in(dir, &entry_for_uid("agent", my_uid(), ""));
    d.client().await.fetch_x509_svid().await.unwrap();
    let text = std::fs::read_to_string(&audit).unwrap();
    let gap: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "audit_gap")
        .expect("an audit_gap record");
    assert_eq!(gap["seq"].as_u64(), Some(original.len() as u64 - 1));
    assert_eq!(
        gap["detail"]["recorded_records"].as_u64(),
        Some(original.len() as u64)
    );
    let bad = verify(&audit);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("chain is intact") && err.contains("1 gap(s)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let d = Daemon::start(&entry_for_uid("agent", my_uid(), ""));
    let client = d.client().await;
    for _ in 0..3 {
        client.fetch_x509_svid().await.unwrap();
    }
    client.fetch_jwt_svid(["a"], None).await.unwrap();
    let body = String::from_utf8(common::http_get(d.http, "/metrics").1).unwrap();
    // Whole lines: `… 3` as a prefix would also pass for 30 or 300.
    for line in [
        "tessera_issued_total{kind=\"x509-svid\"} 3",
        "tessera_issued_total{kind=\"jwt-svid\"} 1",
        "tessera_leases{state=\"active\"} 4",
        "tessera_request_duration_seconds_count{rpc=\"FetchX509SVID\"} 3",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "no line {line:?} in:\n{body}"
        );
    }
    assert!(
        body.lines()
            .any(|l| l.starts_with("tessera_reaper_lag_seconds ")),
        "{body}"
    );
    // Each credential was committed before it was handed out, and the client waited for
    // each before asking again: one commit each at least.
    let commits: u64 = common::metric(&body, "tessera_store_commit_duration_seconds_count");
    assert!(commits >= 4, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_from_one_caller_are_limited_in_the_audit_log() {
    // Nothing is granted to this uid: every request is refused.
    let d = Daemon::start(&entry_for_uid("someone-else", my_uid() + 1, ""));
    let client = d.client().await;
    for _ in 0..30 {
        assert!(matches!(
            client.fetch_jwt_svid(["a"], None).await,
            Err(WorkloadApiError::NoIdentityIssued)
        ));
    }
    let body = String::from_utf8(common::http_get(d.http, "/metrics").1).unwrap();
    for line in [
        "tessera_denied_total{kind=\"jwt-svid\"} 30",
        "tessera_audit_refusals_left_out_total 20",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "no line {line:?} in:\n{body}"
        );
    }
    let dir = d.stop();
    let denials = std::fs::read_to_string(dir.path().join("data/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "deny" && r["actor"]["uid"] == my_uid())
        .count();
    assert_eq!(denials, tessera::issuer::denials::BURST as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_after_the_clock_stepped_back_still_revokes_at_the_next_start() {
    let cfg = entry_for_uid("agent", my_uid(), "");
    let d = Daemon::start(&cfg);
    // The lease id of a fresh JWT-SVID.
    async fn issue(d: &Daemon) -> String {
        let c = d.client().await;
        jti(c.fetch_jwt_svid(&["svc"], None).await.unwrap().token())
    }
    let first = issue(&d).await;
    let dir = d.stop();
    // As if the lease had been issued an hour ahead of the clock the kill then reads (an NTP
    // step back, a VM restored from a snapshot).
    rusqlite::Connection::open(dir.path().join("data/tessera.db"))
        .unwrap()
        .execute(
            "UPDATE leases SET issued_at = issued_at + 3600, expires_at = expires_at + 3600",
            [],
        )
        .unwrap();
    let d = Daemon::start_in(dir, &cfg);
    let o = d.cli(&[
        "kill",
        "spiffe://tessera.internal/agent",
        "--reason",
        "leak",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.cli(&["restore", "spiffe://tessera.internal/agent"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Issued after the restore, though the clock reads earlier than the first lease's time.
    let after = issue(&d).await;
    let d = Daemon::start_in(d.stop(), &cfg);
    let state = |id: &str| {
        lease_list(&d, &[])
            .into_iter()
            .find(|l| l["id"] == id)
            .expect("the lease is stored")["state"]
            .clone()
    };
    assert_eq!(state(&first), "revoked", "issued before the kill");
    assert_eq!(state(&after), "active", "issued after the restore");
}
