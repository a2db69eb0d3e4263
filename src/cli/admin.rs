//! Operator-side commands over the admin socket.

use serde_json::json;

use super::{Cli, connect, status_err};
use crate::proto::tessera::v1 as pb;
use crate::proto::tessera::v1::admin_client::AdminClient;

async fn client(cli: &Cli) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    Ok(AdminClient::new(connect(&cli.admin_socket()).await?))
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
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<44} {:<7} {:<16} {:<21} SELECTORS",
        "ID", "SPIFFE ID", "RISK", "OWNER", "EXPIRES"
    );
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for e in &r.entries {
        println!(
            "{:<10} {:<44} {:<7} {:<16} {:<21} {}",
            e.id,
            e.spiffe_id,
            dash(&e.risk),
            dash(&e.owner),
            dash(&e.expires_at),
            e.selectors.join(",")
        );
    }
    Ok(())
}
