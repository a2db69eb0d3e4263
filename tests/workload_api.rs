//! The real daemon, on a temp socket, driven by the `spiffe` crate's `WorkloadApiClient`
//! (a client nobody here wrote) and by raw gRPC where the client would hide the wire.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Daemon, Secret, entry_for_uid, my_uid, with_header};
use ring::signature::KeyPair;
use spiffe::{JwtSvid, SpiffeId, TrustDomain, WorkloadApiError};
use tessera::proto::workload as pb;
use tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio_stream::StreamExt;
use x509_parser::prelude::*;

fn me_entry() -> String {
    entry_for_uid("me", my_uid(), "hint = \"internal\"")
}

/// A Python with py-spiffe (PyPI `spiffe`, the Python SPIFFE library over grpcio):
/// `TESSERA_PY_SPIFFE`, or `python3` if it has the package.
fn py_spiffe() -> Option<std::ffi::OsString> {
    if let Some(py) = std::env::var_os("TESSERA_PY_SPIFFE") {
        return Some(py);
    }
    std::process::Command::new("python3")
        .args(["-c", "import spiffe"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "python3".into())
}

/// A raw tonic client over the daemon's socket, for requests the spiffe crate will not send.
async fn raw_client(d: &Daemon) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(common::channel(&d.socket).await)
}

/// An entry for the `tessera` CLI run as this uid, and for no other program: the test itself
/// keeps no identity, yet can have the CLI fetch a JWT-SVID for it to present.
fn cli_entry() -> String {
    let cli = std::fs::canonicalize(common::tessera_bin()).unwrap();
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/cli\"\nselectors = [\"unix:uid:{}\", \"unix:path:{}\"]\n",
        my_uid(),
        cli.display()
    )
}

/// A JWT-SVID for `audience`, fetched by the CLI.
fn cli_jwt(d: &Daemon, audience: &str) -> String {
    let o = d.cli(&["svid", "jwt", "-a", audience]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// A certificate's subject and authority key identifiers.
fn key_ids<'a>(c: &'a X509Certificate) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    let (mut ski, mut aki) = (None, None);
    for e in c.extensions() {
        match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0);
            }
            _ => {}
        }
    }
    (ski, aki)
}

fn unix_now() -> i64 {
    ::time::OffsetDateTime::now_utc().unix_timestamp()
}

#[tokio::test]
async fn x509_svid_passes_the_spiffe_client_and_profile_checks() {
    let d = Daemon::start(&me_entry());
    let client = d.client().await;
    // The spiffe crate validates the leaf (URI SAN, cA=false, keyUsage) and the key on parse.
    let before = unix_now();
    let svid = client.fetch_x509_svid().await.unwrap();
    let after = unix_now();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://tessera.internal/me");
    assert_eq!(svid.hint(), Some("internal"));
    let leaf_der = svid.leaf().as_ref();
    let (_, leaf) = parse_x509_certificate(leaf_der).unwrap();

    // Profile: exactly one URI SAN, critical keyUsage with digitalSignature only, EKU, CA:false.
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.digital_signature()
            && !ku.value.key_cert_sign()
            && !ku.value.crl_sign()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    // notBefore backdated 30 s (for peers whose clocks lag), notAfter the default TTL of 15 min
    // after issuance; whole seconds, so a couple of seconds of slack either way.
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert!(
        (before - 30 - 2..=after - 30 + 2).contains(&not_before),
        "notBefore is {}s before issuance, not 30s",
        after - not_before
    );
    assert!(
        (before + 900 - 2..=after + 900 + 2).contains(&not_after),
        "notAfter is {}s after issuance, not the default 900s",
        not_after - before
    );

    // Chain: signed by the CA in the bundle; the CA is a proper signing certificate.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = TrustDomain::new("tessera.internal").unwrap();
    let bundle = bundles.get(&td).unwrap();
    let ca_der = bundle.authorities()[0].as_ref();
    let (_, ca) = parse_x509_certificate(ca_der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert!(leaf.validity().not_after.timestamp() <= ca.validity().not_after.timestamp());
    // Key identifiers: the leaf names its own key, and its issuer's by the CA's SKI (what
    // path building matches on when a trust domain holds more than one CA).
    let (ski, aki) = key_ids(&leaf);
    let ca_ski = key_ids(&ca).0.expect("the CA has a subject key identifier");
    let ski = ski.expect("the leaf has a subject key identifier");
    assert!(!ski.is_empty() && ski != ca_ski, "{ski:02x?}");
    assert_eq!(aki, Some(ca_ski), "authorityKeyIdentifier is the CA's");

    // The private key belongs to the certificate.
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        svid.private_key().as_ref(),
        &rng,
    )
    .unwrap();
    assert_eq!(
        key.public_key().as_ref(),
        leaf.public_key().subject_public_key.data.as_ref()
    );
    // And it went to the client only: not to the log, not to the audit file.
    common::assert_no_secret(&d, &[Secret::Key(svid.private_key().as_ref())]);
}

#[tokio::test]
async fn every_fetch_gets_a_fresh_key() {
    let d = Daemon::start(&me_entry());
    let a = d.client().await.fetch_x509_svid().await.unwrap();
    let b = d.client().await.fetch_x509_svid().await.unwrap();
    let c = d.client().await.fetch_x509_svid().await.unwrap();
    assert_ne!(a.private_key().as_ref(), b.private_key().as_ref());
    assert_ne!(b.private_key().as_ref(), c.private_key().as_ref());
    assert_ne!(a.leaf().as_ref(), b.leaf().as_ref());
}

#[tokio::test]
async fn openssl_accepts_what_the_cli_writes() {
    let d = Daemon::start(&me_entry());
    // A directory others could write to is refused before anything is minted: no lease
    // nobody holds, and nothing created in it.
    use std::os::unix::fs::PermissionsExt;
    let shared = d.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = d.cli(&[
        "svid",
        "x509",
        "--out",
        shared.join("out").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("output directory"), "{err}");
    assert!(!shared.join("out").exists());
    assert!(common::all_leases(&d.admin_socket).await.is_empty());

    let out = d.dir.path().join("svid-out/nested");
    let o = d.cli(&["svid", "x509", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("spiffe://tessera.internal/me"), "{stdout}");
    assert!(stdout.contains("Expires:"), "{stdout}");
    let mode = std::fs::metadata(out.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .expect("openssl is installed");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // openssl reads the key and finds it matches the certificate.
    let key_pub = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(out.join("svid.key"))
        .output()
        .unwrap();
    let cert_pub = std::process::Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(key_pub.status.success());
    assert_eq!(key_pub.stdout, cert_pub.stdout);
}

#[tokio::test]
async fn jwt_svid_validates_offline_and_through_the_daemon() {
    let d = Daemon::start(&me_entry());
    let client = d.client().await;
    let jwt = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://tessera.internal/me");
    let token = jwt.token().to_owned();

    // Header and claims exactly as the issue and the JWT-SVID standard ask.
    let parts: Vec<&str> = token.split('.').collect();
    use base64::Engine;
    let dec = |s: &str| -> serde_json::Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap(),
        )
        .unwrap()
    };
    let (h, c) = (dec(parts[0]), dec(parts[1]));
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["typ"], "JWT");
    assert!(h["kid"].is_string());
    assert_eq!(c["sub"], "spiffe://tessera.internal/me");
    assert_eq!(c["aud"], serde_json::json!(["backend"]));
    assert!(c["exp"].as_i64().unwrap() > c["iat"].as_i64().unwrap());
    assert!(c["jti"].as_str().unwrap().len() >= 16);

    // Offline validation by the spiffe crate against the JWT bundle from FetchJWTBundles.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let checked = JwtSvid::parse_and_validate(&token, &bundles, &["backend"]).unwrap();
    assert_eq!(checked.spiffe_id(), jwt.spiffe_id());
    assert!(JwtSvid::parse_and_validate(&token, &bundles, &["other"]).is_err());

    // The bundle carries only jwt-svid keys, each with a kid.
    let raw = raw_client(&d)
        .await
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap();
    let msg = raw.into_inner().message().await.unwrap().unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&msg.bundles["spiffe://tessera.internal"]).unwrap();
    for k in jwks["keys"].as_array().unwrap() {
        assert_eq!(k["use"], "jwt-svid");
        assert!(k["kid"].is_string());
    }

    // ValidateJWTSVID through the daemon.
    let validated = client.validate_jwt_token("backend", &token).await.unwrap();
    assert_eq!(validated.spiffe_id(), jwt.spiffe_id());

    // Each token has its own jti.
    let again = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    let c2 = dec(again.token().split('.').nth(1).unwrap());
    assert_ne!(c["jti"], c2["jti"]);
    // Bearer tokens: never logged or audited whole.
    common::assert_no_secret(&d, &[Secret::Token(&token), Secret::Token(again.token())]);
}

#[tokio::test]
async fn bad_jwts_are_rejected_by_validate() {
    let d = Daemon::start(&me_entry());
    let client = d.client().await;
    let token = client
        .fetch_jwt_svid(["backend"], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    let mut raw = raw_client(&d).await;
    let validate = |aud: &str, svid: String| pb::ValidateJwtsvidRequest {
        audience: aud.into(),
        svid,
    };

    let wrong_aud = raw
        .validate_jwtsvid(with_header(validate("elsewhere", token.clone())))
        .await
        .unwrap_err();
    assert_eq!(wrong_aud.code(), tonic::Code::InvalidArgument);
    assert!(
        wrong_aud.message().contains("audience"),
        "{}",
        wrong_aud.message()
    );

    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = "spiffe://tessera.internal/admin".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    let e = raw
        .validate_jwtsvid(with_header(validate("backend", tampered)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("signature"), "{}", e.message());

    let none_header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    let e = raw
        .validate_jwtsvid(with_header(validate("backend", alg_none)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("none"), "{}", e.message());

    // Algorithm confusion: HS256 under the real kid, MACed with the published public key as
    // the secret. Refused for the algorithm (an unknown kid would be refused anyway).
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let kid = header["kid"].as_str().unwrap();
    let msg = raw
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&msg.bundles["spiffe://tessera.internal"]).unwrap();
    let public = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("the token's kid is in the bundle")
        .to_string();
    let hs_input = format!(
        "{}.{}",
        b64.encode(serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": kid}).to_string()),
        parts[1]
    );
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public.as_bytes()),
        hs_input.as_bytes(),
    );
    let hs = format!("{hs_input}.{}", b64.encode(mac.as_ref()));
    let e = raw
        .validate_jwtsvid(with_header(validate("backend", hs)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("\"HS256\" is not allowed"),
        "{}",
        e.message()
    );

    for garbage in ["", "not-a-jwt", "a.b.c"] {
        let e = raw
            .validate_jwtsvid(with_header(validate("backend", garbage.into())))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    }
    let e = raw
        .validate_jwtsvid(with_header(validate("", token.clone())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("audience is required"));

    // Still serving, and the genuine token still validates.
    assert!(client.validate_jwt_token("backend", &token).await.is_ok());
}

#[tokio::test]
async fn missing_security_header_is_invalid_argument_on_every_rpc() {
    let d = Daemon::start(&me_entry());
    let mut raw = raw_client(&d).await;
    let codes = [
        raw.fetch_x509svid(pb::X509svidRequest {})
            .await
            .err()
            .map(|e| e.code()),
        raw.fetch_x509_bundles(pb::X509BundlesRequest {})
            .await
            .err()
            .map(|e| e.code()),
        raw.fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .err()
        .map(|e| e.code()),
        raw.fetch_jwt_bundles(pb::JwtBundlesRequest {})
            .await
            .err()
            .map(|e| e.code()),
        raw.validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".into(),
        })
        .await
        .err()
        .map(|e| e.code()),
    ];
    for c in codes {
        assert_eq!(c, Some(tonic::Code::InvalidArgument));
    }
    // tessera.v1.Tasks shares the socket and its rule, for Complete as for Exchange.
    use tessera::proto::tessera::v1 as tpb;
    let ch = common::channel(&d.socket).await;
    let complete = || tpb::CompleteRequest {
        task_id: "job-1".into(),
        ..Default::default()
    };
    let e = tpb::tasks_client::TasksClient::new(ch.clone())
        .complete(complete())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("workload.spiffe.io"),
        "{}",
        e.message()
    );
    // With the header the same request is answered on its merits: there is no such task.
    let e = tessera::api::workload::tasks_client(ch)
        .complete(complete())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    // A wrong header value is the same as none.
    let mut r = tonic::Request::new(pb::X509svidRequest {});
    r.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(
        raw.fetch_x509svid(r).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}

#[tokio::test]
async fn caller_without_entry_gets_permission_denied() {
    // No entry is for this uid and program; one is for the CLI.
    let other = my_uid().wrapping_add(4242);
    let d = Daemon::start(&format!(
        "{}{}",
        entry_for_uid("someone-else", other, ""),
        cli_entry()
    ));
    let client = d.client().await;
    assert!(matches!(
        client.fetch_x509_svid().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    assert!(matches!(
        client.fetch_jwt_svid(["a"], None).await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    assert!(matches!(
        client.fetch_x509_bundles().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    assert!(matches!(
        client.fetch_jwt_bundles().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
    // Nor may it validate a JWT-SVID, even a genuine one (the CLI's).
    let e = raw_client(&d)
        .await
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: cli_jwt(&d, "svc"),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
}

#[tokio::test]
async fn unauthenticated_verifiers_can_be_allowed() {
    let other = my_uid().wrapping_add(4242);
    let d = Daemon::start(&format!(
        "workload_api.allow_unauthenticated_verifiers = true\n{}{}",
        entry_for_uid("someone-else", other, ""),
        cli_entry()
    ));
    let client = d.client().await;
    assert!(client.fetch_x509_bundles().await.is_ok());
    assert!(client.fetch_jwt_bundles().await.is_ok());
    let token = cli_jwt(&d, "svc");
    let checked = client.validate_jwt_token("svc", &token).await.unwrap();
    assert_eq!(
        checked.spiffe_id().to_string(),
        "spiffe://tessera.internal/cli"
    );
    assert!(matches!(
        client.fetch_x509_svid().await,
        Err(WorkloadApiError::NoIdentityIssued)
    ));
}

#[tokio::test]
async fn jwt_requests_are_checked() {
    let d = Daemon::start(&format!(
        "{}{}",
        me_entry(),
        entry_for_uid("me-too", my_uid(), "")
    ));
    let mut raw = raw_client(&d).await;
    let e = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("audience is required"),
        "{}",
        e.message()
    );
    let e = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "not an id".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "spiffe://tessera.internal/not-mine".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // Two identities: one token each, default first; asking for one gives only that one.
    let all = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = all.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://tessera.internal/me",
            "spiffe://tessera.internal/me-too"
        ]
    );
    let one = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "spiffe://tessera.internal/me-too".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(one.svids[0].spiffe_id, "spiffe://tessera.internal/me-too");
    let id = SpiffeId::new("spiffe://tessera.internal/me-too").unwrap();
    let via_client = d
        .client()
        .await
        .fetch_jwt_svid(["a"], Some(&id))
        .await
        .unwrap();
    assert_eq!(via_client.spiffe_id(), &id);
}

#[tokio::test]
async fn several_identities_arrive_in_one_message_with_unique_hints() {
    let d = Daemon::start(&format!(
        "{}{}{}{}",
        entry_for_uid("a", my_uid(), "hint = \"same\""),
        entry_for_uid("b", my_uid(), "hint = \"same\""),
        entry_for_uid("c", my_uid(), "hint = \"other\""),
        // A second entry granting `a`: still one identity, one SVID (the first entry's).
        entry_for_uid("a", my_uid(), "hint = \"dup\"")
    ));
    let all = d.client().await.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://tessera.internal/a",
            "spiffe://tessera.internal/b",
            "spiffe://tessera.internal/c"
        ]
    );
    let hints: Vec<Option<&str>> = all.iter().map(|s| s.hint()).collect();
    assert_eq!(hints, [Some("same"), None, Some("other")]);
    // Different identities never share a key.
    assert_ne!(all[0].private_key().as_ref(), all[1].private_key().as_ref());
}

#[tokio::test]
async fn path_and_hash_selectors_match_the_calling_executable() {
    let exe = common::current_exe();
    let hash = tessera::attest::sha256_file(&exe).unwrap();
    let d = Daemon::start(&format!(
        "[[entries]]\nspiffe_id = \"spiffe://tessera.internal/by-path\"\nselectors = [\"unix:uid:{uid}\", \"unix:path:{path}\"]\n\
         [[entries]]\nspiffe_id = \"spiffe://tessera.internal/by-hash\"\nselectors = [\"unix:sha256:{hash}\"]\n\
         [[entries]]\nspiffe_id = \"spiffe://tessera.internal/wrong-path\"\nselectors = [\"unix:path:/usr/bin/true\"]\n\
         [[entries]]\nspiffe_id = \"spiffe://tessera.internal/wrong-hash\"\nselectors = [\"unix:sha256:{zero}\"]\n",
        uid = my_uid(),
        path = exe.display(),
        zero = "0".repeat(64)
    ));
    let all = d.client().await.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://tessera.internal/by-path",
            "spiffe://tessera.internal/by-hash"
        ]
    );
    // The CLI is a different executable: it gets only what its own hash/path allow (nothing).
    let o = d.cli(&["svid", "x509"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no identity issued"));
}

#[tokio::test]
async fn stream_rotates_at_half_life_with_fresh_keys() {
    let d = Daemon::start(&entry_for_uid("short", my_uid(), "x509_svid_ttl = \"6s\""));
    let client = d.client().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let t0 = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(8), stream.next())
        .await
        .expect("rotation within TTL")
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    // Half of the remaining lifetime, ±10% jitter. notAfter is whole seconds (rounded down),
    // so a 6s TTL leaves 5 to 6s: rotation falls between 0.9 × 2.5s and 1.1 × 3s. The leaf's
    // 30s backdating for clock skew does not count toward rotation.
    assert!(
        waited >= Duration::from_millis(2150) && waited <= Duration::from_millis(3400),
        "rotated after {waited:?}"
    );
    assert_eq!(first.spiffe_id(), second.spiffe_id());
    assert_ne!(first.private_key().as_ref(), second.private_key().as_ref());
    assert_ne!(first.leaf().as_ref(), second.leaf().as_ref());
}

/// A connection opened by a short-lived helper process and handed to this one over
/// `SCM_RIGHTS`: the daemon saw the helper connect, so its attestation is the helper's.
async fn connection_opened_by_helper(
    socket: &std::path::Path,
) -> (std::process::Child, std::os::unix::net::UnixStream) {
    connection_opened_by_helper_with_groups(socket, &[]).await
}

/// Same, the helper holding exactly these supplementary groups (needs root) if any are given.
async fn connection_opened_by_helper_with_groups(
    socket: &std::path::Path,
    groups: &'static [libc::gid_t],
) -> (std::process::Child, std::os::unix::net::UnixStream) {
    use std::os::fd::FromRawFd;
    let dir = common::open_tempdir();
    let handoff = dir.path().join("handoff.sock");
    let listener = std::os::unix::net::UnixListener::bind(&handoff).unwrap();
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
         c=socket.socket(socket.AF_UNIX)\nc.connect({:?})\n\
         socket.send_fds(c,[b'x'],[s.fileno()])\nc.recv(1)",
        socket.to_str().unwrap(),
        handoff.to_str().unwrap()
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    if !groups.is_empty() {
        use std::os::unix::process::CommandExt;
        // SAFETY: setgroups(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(groups.len(), groups.as_ptr()) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let helper = cmd.spawn().unwrap();
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&conn),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let fd = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .expect("the helper sent its connection");
    // Closing `conn` would end the helper's wait and let it exit before the daemon attests
    // it; the test decides when it goes, so `conn` stays open (one leaked fd per test).
    std::mem::forget(conn);
    // SAFETY: `fd` was just received over SCM_RIGHTS and nothing else owns it.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    (helper, stream)
}

/// A gRPC client over a connection handed over by [`connection_opened_by_helper`].
async fn client_over(
    stream: std::os::unix::net::UnixStream,
) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    stream.set_nonblocking(true).unwrap();
    let once = std::sync::Mutex::new(Some(tokio::net::UnixStream::from_std(stream).unwrap()));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = once.lock().unwrap().take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the handed-over connection is used"))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_stream_is_reattested_when_an_edit_names_a_group_its_caller_holds() {
    if my_uid() != 0 {
        common::skip("needs root to give the helper supplementary groups");
        return;
    }
    let d = Daemon::start("");
    let id = d.create_entry("spiffe://tessera.internal/grouped", "unix:uid:0");
    // The helper holds group 4242, which no entry names yet: its attestation leaves it out.
    let (mut helper, stream) = connection_opened_by_helper_with_groups(&d.socket, &[4242]).await;
    let mut client = client_over(stream).await;
    let mut bundles = client
        .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
        .await
        .expect("attested as the helper")
        .into_inner();
    bundles.next().await.unwrap().unwrap();
    let edit = |group: &str| {
        let o = d.cli(&[
            "entry",
            "update",
            &id,
            "--selector",
            "unix:uid:0",
            "--selector",
            &format!("unix:supplementary_gid:{group}"),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Now the entry requires the group the helper holds: still entitled, the stream goes on.
    edit("4242");
    match tokio::time::timeout(Duration::from_millis(1500), bundles.next()).await {
        Err(_) | Ok(Some(Ok(_))) => {}
        Ok(other) => panic!("the stream of an entitled caller ended: {other:?}"),
    }
    // A group it does not hold: no identity left, the stream ends.
    edit("4243");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match bundles.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream went on without an identity");
    match end {
        Some(Err(s)) => assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}"),
        other => panic!("{other:?}"),
    }
    helper.kill().unwrap();
    helper.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_rotation_once_its_process_is_gone() {
    // The helper connects and passes the connection here, then exits: the stream it opened
    // must not go on minting fresh keys for a process that no longer exists.
    let d = Daemon::start(&entry_for_uid("short", my_uid(), "x509_svid_ttl = \"6s\""));
    let (mut helper, stream) = connection_opened_by_helper(&d.socket).await;
    let mut client = client_over(stream).await;
    let mut svids = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .expect("attested as the helper while it runs")
        .into_inner();
    let first = svids.next().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    helper.kill().unwrap();
    helper.wait().unwrap();
    // Rotation is due at about half the 6 s lifetime: it attests again and ends the stream.
    let next = tokio::time::timeout(Duration::from_secs(8), svids.next())
        .await
        .expect("the stream did not move at rotation time");
    match next {
        Some(Err(s)) => assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}"),
        // Only the count: the response holds a private key.
        other => panic!(
            "a fresh SVID for a process that is gone: {:?}",
            other.map(|r| r.map(|m| m.svids.len()))
        ),
    }
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_stop_the_daemon() {
    let d = Daemon::start(&me_entry());
    let mut rng_state = 0x1234_5678_u64;
    for round in 0..20 {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let mut buf = vec![0u8; 64 + round * 97];
        for b in &mut buf {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            *b = rng_state as u8;
        }
        if round % 2 == 0 {
            // A valid HTTP/2 preface followed by nonsense frames.
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        }
        let _ = s.write_all(&buf);
        drop(s);
    }
    // Half-open connection that never speaks.
    let _idle = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let svid = d.client().await.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://tessera.internal/me");
}

#[tokio::test]
async fn wit_profile_is_unimplemented() {
    let d = Daemon::start(&me_entry());
    let mut raw = raw_client(&d).await;
    let e = raw
        .fetch_witsvid(with_header(pb::WitsvidRequest {
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let e = raw
        .fetch_wit_bundles(with_header(pb::WitBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let d = Daemon::start(&me_entry());
    let ch = common::channel(&d.socket).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"SpiffeWorkloadAPI".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_promptly() {
    let mut d = Daemon::start(&me_entry());
    let client = d.client().await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let t0 = std::time::Instant::now();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    // The stream ends (Unavailable or EOF) at once; it does not hang until the drain deadline.
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("stream ended");
    assert!(!matches!(end, Some(Ok(_))));
    drop((stream, client));
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(4)));
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t0.elapsed()
    );
    assert!(!d.socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn restart_reuses_the_ca_and_replaces_a_stale_socket() {
    let d = Daemon::start(&me_entry());
    let before = d.client().await.fetch_x509_bundles().await.unwrap();
    // kill -9 leaves the socket file behind; the next start must replace it.
    let pid = d.pid();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.socket.exists());
    let mut d = d;
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);
    let d2 = Daemon::start_in(dir, &me_entry());
    let after = d2.client().await.fetch_x509_bundles().await.unwrap();
    let td = TrustDomain::new("tessera.internal").unwrap();
    assert_eq!(
        before.get(&td).unwrap().authorities()[0].as_ref(),
        after.get(&td).unwrap().authorities()[0].as_ref()
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let d = Daemon::start(&me_entry());
    let out = std::process::Command::new(common::tesserad_bin())
        .arg("--config")
        .arg(&d.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(d.client().await.fetch_x509_svid().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_holds_a_bounded_number_of_x509_streams() {
    use tessera::api::limits::X509_STREAMS_PER_UID;
    let d = Daemon::start(&me_entry());
    // Two connections: the per-connection stream limit is not what is tested here.
    let clients = [raw_client(&d).await, raw_client(&d).await];
    let mut open = Vec::new();
    for i in 0..X509_STREAMS_PER_UID {
        let mut c = clients[i % 2].clone();
        let mut s = c
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        open.push(s);
    }
    let mut c = clients[0].clone();
    let err = c
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap_err();
    assert!(tessera::api::limits::is_shed(&err), "{err:?}");
    // Unary calls are not affected, and a closed stream makes room.
    d.client().await.fetch_jwt_svid(["a"], None).await.unwrap();
    drop(open.pop());
    room_within_5s(|| {
        let mut c = c.clone();
        async move {
            c.fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .map(drop)
        }
    })
    .await;
}

/// Retries `open` while it is refused for load: a closed stream's slot is given
/// back once the daemon has seen it go.
async fn room_within_5s<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open().await {
            Ok(()) => return,
            Err(e) if tessera::api::limits::is_shed(&e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no room after a stream closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_holds_a_bounded_number_of_bundle_streams() {
    use tessera::api::limits::BUNDLE_STREAMS_PER_UID;
    let d = Daemon::start(&me_entry());
    let clients = [raw_client(&d).await, raw_client(&d).await];
    let mut open = Vec::new();
    // X.509 and JWT bundle streams count together.
    for i in 0..BUNDLE_STREAMS_PER_UID {
        let mut c = clients[i % 2].clone();
        if i % 2 == 0 {
            let mut s = c
                .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
                .await
                .unwrap()
                .into_inner();
            s.message().await.unwrap().unwrap();
            open.push(Ok(s));
        } else {
            let mut s = c
                .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
                .await
                .unwrap()
                .into_inner();
            s.message().await.unwrap().unwrap();
            open.push(Err(s));
        }
    }
    let mut c = clients[0].clone();
    let err = c
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap_err();
    assert!(tessera::api::limits::is_shed(&err), "{err:?}");
    // A closed stream makes room.
    drop(open.pop());
    room_within_5s(|| {
        let mut c = c.clone();
        async move {
            c.fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
                .await
                .map(drop)
        }
    })
    .await;
}

#[tokio::test]
async fn svids_never_outlive_their_entry() {
    let ends = ::time::OffsetDateTime::now_utc() + ::time::Duration::seconds(120);
    let ends_s = ends.unix_timestamp();
    let rfc3339 = ends
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap();
    let d = Daemon::start(&entry_for_uid(
        "short-lived",
        my_uid(),
        &format!("expires_at = \"{rfc3339}\"\nx509_svid_ttl = \"1h\"\njwt_svid_ttl = \"1h\""),
    ));
    let c = d.client().await;
    let jwt = c.fetch_jwt_svid(["a"], None).await.unwrap();
    let exp = jwt.expiry().unix_timestamp();
    assert!(
        exp <= ends_s && exp > ends_s - 10,
        "exp {exp}, entry ends {ends_s}"
    );
    let svid = c.fetch_x509_svid().await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
    let not_after = cert.validity().not_after.timestamp();
    assert!(
        not_after <= ends_s && not_after > ends_s - 10,
        "notAfter {not_after}, entry ends {ends_s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_holds_a_bounded_number_of_connections() {
    use std::io::Read;
    use tessera::api::limits::CONNECTIONS_PER_UID;
    // Room for the connections on both ends (the daemon inherits this process's limit).
    let want = (CONNECTIONS_PER_UID as u64) * 2 + 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            // Root may raise the hard limit too; anyone may raise the soft one up to it.
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else if lim.rlim_max >= want {
                lim.rlim_cur = want;
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
            }
        }
    }
    if lim.rlim_cur < want {
        // As the root-only halves elsewhere: the environment cannot host the test.
        common::skip(&format!(
            "this test needs {want} descriptors; the hard limit is {}",
            lim.rlim_max
        ));
        return;
    }
    let d = Daemon::start(&me_entry());
    let mut held: Vec<std::os::unix::net::UnixStream> = (0..CONNECTIONS_PER_UID)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap())
        .collect();
    // One more is accepted and closed at once: the uid holds its share.
    let mut over = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        over.read(&mut [0u8; 16]).expect("closed, not left waiting"),
        0
    );
    // The held ones are served: the daemon's HTTP/2 settings arrive, not an end of file.
    for i in [0, CONNECTIONS_PER_UID - 1] {
        held[i]
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(held[i].read(&mut [0u8; 16]).expect("served") > 0);
    }
    // Closing one makes room.
    held.truncate(CONNECTIONS_PER_UID - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Connecting may fail until the daemon has seen the close.
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            spiffe::WorkloadApiClient::connect_to(d.endpoint())
                .await?
                .fetch_x509_svid()
                .await
        })
        .await;
        if matches!(attempt, Ok(Ok(_))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a connection closed: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// py-spiffe, over grpcio: gRPC C-core sends the %-encoded socket path as `:authority`, which
/// the HTTP/2 server refuses unless the daemon rewrites it; before, every call of this client
/// (and of c-spiffe and java-spiffe) ended in a stream reset.
#[test]
fn the_python_spiffe_library_fetches_and_validates() {
    let Some(py) = py_spiffe() else {
        common::skip("py-spiffe is not installed (pip install spiffe, or set TESSERA_PY_SPIFFE)");
        return;
    };
    let d = Daemon::start(&me_entry());
    let script = r#"
import json, sys, warnings
warnings.simplefilter("ignore")
from spiffe import WorkloadApiClient
c = WorkloadApiClient(socket_path="unix://" + sys.argv[1])
for _ in range(2):
    svid = c.fetch_x509_svid()
    print(json.dumps({"x509": str(svid.spiffe_id), "chain": len(svid.cert_chain)}))
jwt = c.fetch_jwt_svid(audience={"svc"})
print(json.dumps({"jwt": str(jwt.spiffe_id)}))
print(json.dumps({"validated": str(c.validate_jwt_svid(jwt.token, "svc").spiffe_id)}))
print(json.dumps({"x509_bundles": len(c.fetch_x509_bundles().bundles)}))
print(json.dumps({"jwt_bundles": len(c.fetch_jwt_bundles().bundles)}))
"#;
    let o = std::process::Command::new(py)
        .args(["-c", script])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log_text()
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let me = "spiffe://tessera.internal/me";
    assert_eq!(
        lines,
        [
            serde_json::json!({"x509": me, "chain": 1}),
            serde_json::json!({"x509": me, "chain": 1}),
            serde_json::json!({"jwt": me}),
            serde_json::json!({"validated": me}),
            serde_json::json!({"x509_bundles": 1}),
            serde_json::json!({"jwt_bundles": 1}),
        ]
    );
}

#[test]
fn the_cli_validates_a_token_read_from_stdin() {
    let d = Daemon::start(&me_entry());
    let o = d.cli(&["svid", "jwt", "--audience", "backend"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).unwrap();
    // `-`: from stdin, so the token is not in the process list.
    let mut child = std::process::Command::new(common::tessera_bin())
        .args(["svid", "validate", "--audience", "backend", "-"])
        .env("SPIFFE_ENDPOINT_SOCKET", d.endpoint())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("spiffe://tessera.internal/me"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
