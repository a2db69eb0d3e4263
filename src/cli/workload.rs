//! Workload-side commands: fetch SVIDs, show bundles, validate tokens.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tonic::Request;
use x509_parser::parse_x509_certificate;

use super::{Cli, connect, status_err};
use crate::proto::workload as pb;
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

type Client = SpiffeWorkloadApiClient<tonic::transport::Channel>;

async fn client(cli: &Cli) -> anyhow::Result<Client> {
    Ok(SpiffeWorkloadApiClient::new(
        connect(&cli.workload_socket()?, false).await?,
    ))
}

/// Every Workload API request carries the security header.
fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        "true".parse().expect("static header value"),
    );
    r
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("bad certificate from the daemon: {e}"))?;
        out.push(&der[..der.len() - rest.len()]);
        der = rest;
    }
    Ok(out)
}

/// PEM with Unix line endings (the pem crate defaults to CRLF).
pub(crate) fn pem_lf(p: &pem::Pem) -> String {
    pem::encode_config(
        p,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn pem_certs(der: &[u8]) -> anyhow::Result<String> {
    Ok(split_der(der)?
        .into_iter()
        .map(|c| pem_lf(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect())
}

fn expiry(chain: &[u8]) -> anyhow::Result<(String, i64)> {
    let (_, c) =
        parse_x509_certificate(chain).map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?;
    let na = c.validity().not_after;
    Ok((
        na.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)?,
        na.timestamp(),
    ))
}

/// Created with its final mode (a key never exists on disk with looser permissions), through
/// an exclusively created temp file ([`crate::fsutil::write_atomic`]).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` if needed and refuses one that others could change under us: in a directory
/// group or others may write to (without the sticky bit), another user could swap the
/// files, or the key, after they are written. Called before the daemon is asked for
/// anything: credentials minted for a directory refused afterwards would be leases nobody
/// holds, and an approval used up for nothing.
fn output_dir(dir: &Path) -> anyhow::Result<()> {
    let me = Some(nix::unistd::geteuid().as_raw());
    let refused = |e: std::io::Error| {
        anyhow::anyhow!(
            "{e}: another user could replace the files written there; choose a directory only you control"
        )
    };
    // The nearest directory that exists (as the kernel resolves it: a symlinked /var/run is
    // fine if its target passes) is checked before anything is created in it, so a refused
    // place is left as it was.
    if std::fs::symlink_metadata(dir).is_err()
        && let Some(existing) = dir
            .ancestors()
            .skip(1)
            .find(|a| !a.as_os_str().is_empty() && a.exists())
    {
        crate::api::uds::check_above(existing, me, &format!("output directory {}", dir.display()))
            .map_err(refused)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // The daemon's rule for its socket directory: owned by this user or root, not writable
    // by group or others, and no directory above writable by others unless sticky.
    crate::api::uds::check_private_dir(dir, me, "output directory").map_err(refused)
}

pub(super) async fn x509(cli: &Cli, out: Option<&Path>) -> anyhow::Result<()> {
    if let Some(dir) = out {
        output_dir(dir)?;
    }
    let mut c = client(cli).await?;
    let mut stream = c
        .fetch_x509svid(req(pb::X509svidRequest {}))
        .await
        .map_err(status_err)?
        .into_inner();
    let resp = stream
        .message()
        .await
        .map_err(status_err)?
        .context("the daemon closed the stream without sending SVIDs")?;
    anyhow::ensure!(!resp.svids.is_empty(), "the daemon sent no SVIDs");
    let mut summary = Vec::new();
    for (i, s) in resp.svids.iter().enumerate() {
        let (exp, exp_ts) = expiry(&s.x509_svid)?;
        let suffix = if i == 0 {
            String::new()
        } else {
            format!(".{i}")
        };
        if let Some(dir) = out {
            write_file(
                &dir.join(format!("svid{suffix}.pem")),
                pem_certs(&s.x509_svid)?.as_bytes(),
                0o644,
            )?;
            let key = pem_lf(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
            write_file(
                &dir.join(format!("svid{suffix}.key")),
                key.as_bytes(),
                0o600,
            )?;
            if i == 0 {
                write_file(
                    &dir.join("bundle.pem"),
                    pem_certs(&s.bundle)?.as_bytes(),
                    0o644,
                )?;
            }
        }
        let mut item = json!({
            "spiffe_id": s.spiffe_id,
            "expires_at": exp,
            "expires_at_unix": exp_ts,
            "hint": (!s.hint.is_empty()).then_some(&s.hint),
            "files": out.map(|d| json!({
                "certificate": d.join(format!("svid{suffix}.pem")),
                "key": d.join(format!("svid{suffix}.key")),
                "bundle": d.join("bundle.pem"),
            })),
        });
        // Without --out, what the human form prints: the chain and the bundle, never the key.
        if out.is_none() {
            item["certificate_pem"] = pem_certs(&s.x509_svid)?.into();
            item["bundle_pem"] = pem_certs(&s.bundle)?.into();
        }
        summary.push(item);
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    for (s, raw) in summary.iter().zip(&resp.svids) {
        println!(
            "SPIFFE ID:  {}",
            s["spiffe_id"].as_str().unwrap_or_default()
        );
        println!(
            "Expires:    {}",
            s["expires_at"].as_str().unwrap_or_default()
        );
        if let Some(h) = s["hint"].as_str() {
            println!("Hint:       {h}");
        }
        match &s["files"] {
            serde_json::Value::Null => print!("{}", pem_certs(&raw.x509_svid)?),
            f => {
                for k in ["certificate", "key", "bundle"] {
                    println!("Wrote:      {}", f[k].as_str().unwrap_or_default());
                }
            }
        }
    }
    if out.is_none() {
        eprintln!(
            "(private key not printed; use --out DIR to write svid.pem, svid.key and bundle.pem)"
        );
    }
    Ok(())
}

pub(super) async fn jwt(
    cli: &Cli,
    audience: &[String],
    spiffe_id: Option<&str>,
) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let resp = c
        .fetch_jwtsvid(req(pb::JwtsvidRequest {
            audience: audience.to_vec(),
            spiffe_id: spiffe_id.unwrap_or_default().to_owned(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let first = resp.svids.first().context("the daemon sent no JWT-SVIDs")?;
    if cli.json {
        let all: Vec<_> = resp
            .svids
            .iter()
            .map(|s| json!({"spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        // Token alone on stdout so that TOKEN=$(tessera svid jwt -a x) works.
        eprintln!("SPIFFE ID: {}", first.spiffe_id);
        println!("{}", first.svid);
    }
    Ok(())
}

/// A token given as an argument, or `-` to read it from stdin: command lines are readable by
/// every local user (`/proc/<pid>/cmdline`), stdin is not.
fn token_arg(arg: &str, what: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_owned());
    }
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .with_context(|| format!("reading {what} from stdin"))?;
    Ok(s.trim().to_owned())
}

pub(super) async fn validate(cli: &Cli, audience: &str, token: &str) -> anyhow::Result<()> {
    let token = token_arg(token, "the token")?;
    let mut c = client(cli).await?;
    let resp = c
        .validate_jwtsvid(req(pb::ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token,
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let claims = resp.claims.map(struct_to_json).unwrap_or_default();
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"spiffe_id": resp.spiffe_id, "claims": claims}))?
        );
    } else {
        println!("valid: {}", resp.spiffe_id);
        println!("{}", serde_json::to_string_pretty(&claims)?);
    }
    Ok(())
}

pub(super) async fn bundle_show(cli: &Cli) -> anyhow::Result<()> {
    let mut c = client(cli).await?;
    let x = c
        .fetch_x509_bundles(req(pb::X509BundlesRequest {}))
        .await
        .map_err(status_err)?
        .into_inner()
        .message()
        .await
        .map_err(status_err)?
        .context("no X.509 bundle message")?;
    let j = c
        .fetch_jwt_bundles(req(pb::JwtBundlesRequest {}))
        .await
        .map_err(status_err)?
        .into_inner()
        .message()
        .await
        .map_err(status_err)?
        .context("no JWT bundle message")?;
    let mut tds: Vec<&String> = x.bundles.keys().chain(j.bundles.keys()).collect();
    tds.sort();
    tds.dedup();
    if cli.json {
        let mut out = serde_json::Map::new();
        for td in tds {
            out.insert(
                td.clone(),
                json!({
                    "x509_authorities": x.bundles.get(td).map(|d| pem_certs(d)).transpose()?,
                    "jwt_authorities": j.bundles.get(td).map(|b| serde_json::from_slice::<serde_json::Value>(b)).transpose()?,
                }),
            );
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for td in tds {
        println!("# Trust domain {td}");
        if let Some(d) = x.bundles.get(td) {
            println!("## X.509 authorities");
            print!("{}", pem_certs(d)?);
        }
        if let Some(b) = j.bundles.get(td) {
            println!("## JWT authorities (JWKS)");
            let v: serde_json::Value = serde_json::from_slice(b)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9e15 => (n as i64).into(),
        Some(Kind::NumberValue(n)) => n.into(),
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Arguments of `tessera task exchange`.
#[derive(Debug)]
pub(super) struct ExchangeArgs<'a> {
    pub subject_token: &'a str,
    pub subject_token_type: &'a str,
    pub audience: &'a str,
    pub scopes: &'a [String],
    pub task: &'a str,
    pub expires_in: Option<u64>,
    pub x509_out: Option<&'a Path>,
    pub spiffe_id: Option<&'a str>,
}

async fn tasks_client(cli: &Cli) -> anyhow::Result<crate::api::workload::TasksClient> {
    Ok(crate::api::workload::tasks_client(
        connect(&cli.workload_socket()?, false).await?,
    ))
}

pub(super) async fn task_exchange(cli: &Cli, a: ExchangeArgs<'_>) -> anyhow::Result<()> {
    use crate::proto::tessera::v1 as tpb;
    let subject_token = token_arg(a.subject_token, "the subject token")?;
    if let Some(dir) = a.x509_out {
        output_dir(dir)?;
    }
    let r = tasks_client(cli)
        .await?
        .exchange(tpb::ExchangeRequest {
            subject_token,
            subject_token_type: a.subject_token_type.into(),
            audience: a.audience.into(),
            scopes: a.scopes.to_vec(),
            task_id: a.task.into(),
            expires_in: a.expires_in.unwrap_or(0),
            x509_svid: a.x509_out.is_some(),
            spiffe_id: a.spiffe_id.unwrap_or_default().into(),
            requested_token_type: String::new(),
        })
        .await
        .map_err(|s| {
            let id = s
                .metadata()
                .get("tessera-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match id {
                Some(id) => anyhow::anyhow!(
                    "{}\nan operator can approve it with: tessera approve {id}",
                    s.message()
                ),
                None => status_err(s),
            }
        })?
        .into_inner();
    if let (Some(dir), Some(s)) = (a.x509_out, &r.x509_svid) {
        write_file(
            &dir.join("svid.pem"),
            pem_certs(&s.x509_svid)?.as_bytes(),
            0o644,
        )?;
        let key = pem_lf(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
        write_file(&dir.join("svid.key"), key.as_bytes(), 0o600)?;
        write_file(
            &dir.join("bundle.pem"),
            pem_certs(&s.bundle)?.as_bytes(),
            0o644,
        )?;
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "access_token": r.access_token,
                "issued_token_type": r.issued_token_type,
                "token_type": r.token_type,
                "expires_in": r.expires_in,
                "scope": r.scopes.join(" "),
                "lease_id": r.lease_id,
                "agent": r.agent,
                "x509_svid": r.x509_svid.as_ref().map(|s| json!({
                    "spiffe_id": s.spiffe_id,
                    "lease_id": s.lease_id,
                    "expires_at": s.expires_at,
                })),
            }))?
        );
    } else {
        println!("{}", r.access_token);
    }
    Ok(())
}

pub(super) async fn task_complete(
    cli: &Cli,
    task: &str,
    spiffe_id: Option<&str>,
) -> anyhow::Result<()> {
    let r = tasks_client(cli)
        .await?
        .complete(crate::proto::tessera::v1::CompleteRequest {
            task_id: task.into(),
            spiffe_id: spiffe_id.unwrap_or_default().into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_directory_others_could_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = output_dir(&shared).unwrap_err().to_string();
        assert!(e.contains("group or others"), "{e}");
        assert!(e.starts_with("output directory"), "{e}");
        // Inside a directory anyone may rename things in: refused too, before anything is
        // created there.
        let e = output_dir(&shared.join("out/deeper"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("above the output directory"), "{e}");
        assert!(!shared.join("out").exists());
        std::fs::create_dir(shared.join("out")).unwrap();
        let e = output_dir(&shared.join("out")).unwrap_err().to_string();
        assert!(e.contains("unless sticky"), "{e}");
        // In a sticky world-writable directory (/tmp), a new directory of our own is fine.
        let sticky = d.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        output_dir(&sticky.join("mine")).unwrap();
        // Through a symbolic link to a sound directory (a symlinked /var/run or home).
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        output_dir(&d.path().join("link/new")).unwrap();
        assert!(real.join("new").is_dir());
        output_dir(&d.path().join("new/dir")).unwrap();
        // Another user's directory (as root, which can make one).
        if nix::unistd::geteuid().is_root() {
            let theirs = d.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4711)), None).unwrap();
            let e = output_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("must be owned by"), "{e}");
        }
    }
}
