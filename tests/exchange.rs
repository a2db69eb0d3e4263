//! Task credentials end to end: a real OIDC issuer started here (real RSA and P-256 keys,
//! discovery and JWKS over loopback HTTP), the real daemon, RFC 8693 exchanges over HTTP and
//! gRPC, Cedar policy (with reloads), approvals, introspection, revocation, completion and the
//! kill switch. Issued tokens are checked with the `jsonwebtoken` crate, not our own code.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::idp::{Idp, now};
use common::{Daemon, Secret, form, http_get, http_post, my_uid, open_tempdir, write_fixture};
use serde_json::{Value, json};
use tessera::proto::tessera::v1 as pb;

const TT_ID: &str = "urn:ietf:params:oauth:token-type:id_token";
const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TICKETS: &str = "https://tickets.example";

const POLICY: &str = r#"
@id("read-tickets")
permit(principal, action == Tessera::Action::"exchange", resource == Tessera::Audience::"https://tickets.example")
when { context.scope == "tickets:read" && context.subject has email && context.subject.email like "*@example.com" };

@id("write-short")
permit(principal, action == Tessera::Action::"exchange", resource == Tessera::Audience::"https://tickets.example")
when { context.scope == "tickets:write" && context.ttl_seconds <= 120 };

@id("never-delete")
forbid(principal, action, resource) when { context.scope == "tickets:delete" };
"#;

/// Starts the daemon trusting `idp`, with `POLICY` (or `policy`) in force and two agent
/// entries for this uid: `agents/a` (default) and `agents/b`.
fn daemon(idp: &Idp, policy: &str, agent_extra: &str, extra: &str) -> Daemon {
    daemon_with(idp, policy, "", agent_extra, extra)
}

/// As [`daemon`], with more selectors for `agents/a` (`, "unix:..."`).
fn daemon_with(
    idp: &Idp,
    policy: &str,
    agent_selectors: &str,
    agent_extra: &str,
    extra: &str,
) -> Daemon {
    let dir = open_tempdir();
    let policy_path = dir.path().join("policy.cedar");
    // Whatever the umask: tesserad refuses a policy others (a shared group) could change.
    write_fixture(&policy_path, policy);
    let uid = my_uid();
    Daemon::start_in(
        dir,
        &format!(
            "policy.file = {policy_path:?}\n{extra}\n\
             [[oidc_issuers]]\nissuer = {iss:?}\naudiences = [\"tessera\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://tessera.internal/agents/a\"\nselectors = [\"unix:uid:{uid}\"{agent_selectors}]\nowner = \"platform\"\n{agent_extra}\n\
             [[entries]]\nspiffe_id = \"spiffe://tessera.internal/agents/b\"\nselectors = [\"unix:uid:{uid}\"]\n",
            iss = idp.issuer
        ),
    )
}

/// Creates a stored entry for `agents/c` (this uid) with `extra` flags; returns its id.
fn stored_agent_c(d: &Daemon, extra: &[&str]) -> String {
    let uid = format!("unix:uid:{}", my_uid());
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://tessera.internal/agents/c",
        "--selector",
        &uid,
    ];
    args.extend_from_slice(extra);
    cli_json(d, &args)["id"].as_str().unwrap().to_owned()
}

/// Runs the CLI with `--json`, asserts success, parses stdout.
fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = d.cli(&all);
    assert!(
        out.status.success(),
        "tessera {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn issuer_url(d: &Daemon) -> String {
    format!("http://{}", d.http)
}

/// The agent's JWT-SVID for Tessera's issuer (its actor token), from the spiffe crate's client.
async fn actor_token(d: &Daemon, agent: &str) -> String {
    let c = d.client().await;
    let id: spiffe::SpiffeId = format!("spiffe://tessera.internal/agents/{agent}")
        .parse()
        .unwrap();
    c.fetch_jwt_svid(&[issuer_url(d)], Some(&id))
        .await
        .unwrap()
        .token()
        .to_owned()
}

/// POSTs a token exchange: (status, JSON body).
fn exchange(d: &Daemon, fields: &[(&str, &str)]) -> (u16, Value) {
    let (code, head, body) = http_post(
        d.http,
        "/token",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &form(fields),
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: no-store"),
        "{head}"
    );
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn base_fields<'a>(
    subject: &'a str,
    actor: &'a str,
    task: &'a str,
    scope: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", GRANT),
        ("subject_token", subject),
        ("subject_token_type", TT_ID),
        ("actor_token", actor),
        ("actor_token_type", TT_JWT),
        ("audience", TICKETS),
        ("scope", scope),
        ("task_id", task),
    ]
}

fn post_auth(d: &Daemon, path: &str, bearer: Option<&str>, token: &str) -> (u16, Value) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (code, _, body) = http_post(d.http, path, &headers, &form(&[("token", token)]));
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `token` with one byte of its signature flipped; its header and payload are untouched.
fn with_bad_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    let mid = sig.len() / 2;
    sig[mid] ^= 1;
    format!("{input}.{}", B64.encode(sig))
}

/// `claims` signed ES256, with no `kid`, by a fresh P-256 key no issuer publishes (the test
/// IdP signs only with the keys it publishes).
fn sign_with_unpublished_key(claims: &Value) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING as P256, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&P256, pkcs8.as_ref(), &rng).unwrap();
    let header = json!({"alg": "ES256", "typ": "JWT"});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// Verifies a task token with the `jsonwebtoken` crate against Tessera's published JWKS.
fn verify_independently(d: &Daemon, token: &str) -> Value {
    let (code, body) = http_get(d.http, "/jwks");
    assert_eq!(code, 200);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&body).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("kid is in /jwks");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[TICKETS]);
    v.set_issuer(&[issuer_url(d)]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread")]
async fn http_exchange_full_flow() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let iss = issuer_url(&d);

    // Discovery lists every endpoint under the issuer.
    for path in [
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server",
    ] {
        let (code, body) = http_get(d.http, path);
        assert_eq!(code, 200);
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["issuer"], iss);
        for (k, suffix) in [
            ("jwks_uri", "/jwks"),
            ("token_endpoint", "/token"),
            ("introspection_endpoint", "/introspect"),
            ("revocation_endpoint", "/revoke"),
        ] {
            assert_eq!(doc[k], format!("{iss}{suffix}"), "{k}");
        }
        assert_eq!(doc["grant_types_supported"], json!([GRANT]));
    }

    let actor = actor_token(&d, "a").await;
    let subject = idp.token("alice");
    let (code, r) = exchange(&d, &base_fields(&subject, &actor, "task-1", "tickets:read"));
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(r["token_type"], "Bearer");
    assert_eq!(r["scope"], "tickets:read");
    let expires_in = r["expires_in"].as_u64().unwrap();
    assert!(
        (295..=300).contains(&expires_in),
        "default 5 minutes, got {expires_in}"
    );
    let token = r["access_token"].as_str().unwrap().to_owned();

    let c = verify_independently(&d, &token);
    assert_eq!(c["iss"], iss);
    assert_eq!(c["sub"], "alice");
    assert_eq!(
        c["sub_id"],
        json!({"format": "iss_sub", "iss": idp.issuer, "sub": "alice"})
    );
    assert_eq!(
        c["act"],
        json!({"sub": "spiffe://tessera.internal/agents/a"})
    );
    assert_eq!(c["aud"], TICKETS);
    assert_eq!(c["scope"], "tickets:read");
    assert_eq!(c["txn"], "task-1");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
    let jti = c["jti"].as_str().unwrap().to_owned();
    // Typed as a JWT access token (RFC 9068), so it never passes for a JWT-SVID, which is
    // signed with the same key: the Workload API's validation refuses it.
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().typ.as_deref(),
        Some("at+jwt")
    );
    let refused = d
        .client()
        .await
        .validate_jwt_token(TICKETS, &token)
        .await
        .expect_err("a task token is not a JWT-SVID");
    // Refused for its type, before anything else about it is looked at.
    assert!(
        format!("{refused:?}").contains("typ must be JWT or JOSE"),
        "{refused:?}"
    );
    // Every token sent or issued, none of which may be logged or audited (checked at the end).
    let mut secrets = vec![actor.clone(), subject.clone(), token.clone()];
    // Nor is a task token issued for a subject that names a workload of this trust domain,
    // however it is spelled.
    for sub in [
        "spiffe://tessera.internal/agents/b",
        "SPIFFE://Tessera.Internal/agents/b",
        "spiffe://tessera.internal/agents/b/",
    ] {
        let mut claims = idp.claims("alice");
        claims["sub"] = sub.into();
        let spiffe_subject = idp.sign("RS256", Some("rsa-1"), &claims);
        let (code, e) = exchange(
            &d,
            &base_fields(&spiffe_subject, &actor, "task-1", "tickets:read"),
        );
        secrets.push(spiffe_subject);
        assert_eq!(
            (code, e["error"].as_str()),
            (400, Some("invalid_request")),
            "{sub}: {e}"
        );
        assert!(
            e["error_description"]
                .as_str()
                .unwrap()
                .contains("SPIFFE ID"),
            "{sub}: {e}"
        );
    }

    // The token is a lease of the task, listed for operators.
    let leases = cli_json(&d, &["lease", "list", "--task", "task-1"]);
    assert_eq!(leases.as_array().unwrap().len(), 1);
    assert_eq!(leases[0]["id"], jti);
    assert_eq!(leases[0]["kind"], "task-token");

    // An ES256 subject token with a prior actor: the chain nests beneath the agent.
    let mut claims = idp.claims("bob");
    claims["act"] = json!({"sub": "pipeline-7"});
    let subject2 = idp.sign("ES256", Some("ec-1"), &claims);
    let mut f = base_fields(&subject2, &actor, "task-1", "tickets:read tickets:write");
    f.push(("expires_in", "60"));
    let (code, r2) = exchange(&d, &f);
    assert_eq!(code, 200, "{r2}");
    // Exactly what was asked: shortened, and the answer is the token's own lifetime.
    assert_eq!(r2["expires_in"], 60, "{r2}");
    let c2 = verify_independently(&d, r2["access_token"].as_str().unwrap());
    assert_eq!(
        c2["exp"].as_i64().unwrap() - c2["iat"].as_i64().unwrap(),
        60
    );
    assert_eq!(
        c2["act"],
        json!({"sub": "spiffe://tessera.internal/agents/a", "act": {"sub": "pipeline-7"}})
    );
    assert_eq!(c2["scope"], "tickets:read tickets:write");
    secrets.extend([subject2, r2["access_token"].as_str().unwrap().to_owned()]);

    // Introspection needs an authenticated caller; its 401s follow RFC 6750 §3.
    let body = form(&[("token", token.as_str())]);
    // POSTs `body` to `path` with `auth`; asserts a 401 and returns its challenge and body.
    let refused = |path: &str, auth: Option<&str>| {
        let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
        h.extend(auth.map(|a| ("Authorization", a)));
        let (code, head, b) = http_post(d.http, path, &h, &body);
        assert_eq!(code, 401, "{path} {auth:?}");
        let challenge = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("www-authenticate: ")
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no challenge: {head}"));
        (challenge, serde_json::from_slice::<Value>(&b).unwrap())
    };
    for auth in [None, Some("Basic dTpw")] {
        // No credentials (or another scheme): a bare challenge, no error code anywhere.
        let (challenge, b) = refused("/introspect", auth);
        assert_eq!(challenge, "bearer realm=\"tessera\"");
        assert!(b.get("error").is_none(), "{b}");
        assert!(b["error_description"].as_str().unwrap().contains("Bearer"));
    }
    let (challenge, b) = refused("/introspect", Some("Bearer not-a-jwt"));
    assert_eq!(
        challenge,
        "bearer realm=\"tessera\", error=\"invalid_token\""
    );
    assert_eq!(
        b["error"], "invalid_token",
        "the body's code is the challenge's"
    );
    // Revocation is a client's call: RFC 7009 §2.2.1 gives RFC 6749 §5.2's invalid_client,
    // with a challenge for the scheme, and revokes nothing.
    for auth in [None, Some("Bearer not-a-jwt")] {
        let (challenge, b) = refused("/revoke", auth);
        assert_eq!(challenge, "bearer realm=\"tessera\"");
        assert_eq!(b["error"], "invalid_client", "{b}");
    }
    let relying_party = actor_token(&d, "b").await;
    secrets.push(relying_party.clone());
    let (code, i) = post_auth(&d, "/introspect", Some(&relying_party), &token);
    assert_eq!(code, 200);
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["sub"], "alice");
    // Which issuer's alice (review AY-5).
    assert_eq!(i["sub_id"]["sub"], "alice", "{i}");
    assert_eq!(i["sub_id"]["format"], "iss_sub", "{i}");
    assert_eq!(i["scope"], "tickets:read");
    assert_eq!(i["client_id"], "spiffe://tessera.internal/agents/a");
    assert_eq!(i["jti"], jti);
    let (_, i) = post_auth(&d, "/introspect", Some(&relying_party), "garbage");
    assert_eq!(i, json!({"active": false}));

    // Revocation: only the agent the token was issued to; unknown tokens are fine (200).
    let (code, e) = post_auth(&d, "/revoke", Some(&relying_party), &token);
    assert_eq!(
        (code, e["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
    let (code, _) = post_auth(&d, "/revoke", Some(&actor), "garbage");
    assert_eq!(code, 200);
    let (code, _) = post_auth(&d, "/revoke", Some(&actor), &token);
    assert_eq!(code, 200);
    let (_, i) = post_auth(&d, "/introspect", Some(&relying_party), &token);
    assert_eq!(i, json!({"active": false}));
    // Once revoked there is nothing left to refuse: another agent gets 200 as well.
    let (code, _) = post_auth(&d, "/revoke", Some(&relying_party), &token);
    assert_eq!(code, 200);
    // The other token of the task is untouched.
    let (_, i) = post_auth(
        &d,
        "/introspect",
        Some(&relying_party),
        r2["access_token"].as_str().unwrap(),
    );
    assert_eq!(i["active"], true);

    // The audit log has the exchange with the deciding policy.
    let audit = std::fs::read_to_string(d.data_dir.join("audit.jsonl")).unwrap();
    let ev: Value = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event"] == "exchange" && e["lease_id"] == jti)
        .expect("exchange audited");
    assert_eq!(ev["detail"]["policies"], json!(["read-tickets"]), "{ev}");
    assert_no_secret(&d, &secrets, &[]);

    // Tokens read from files keep their final newline through `curl --data-urlencode
    // subject_token@FILE`: whitespace around a token is no part of it, and is ignored.
    let (subject_nl, actor_nl) = (format!("{subject}\n"), format!("{actor}\r\n"));
    let (code, r) = exchange(
        &d,
        &base_fields(&subject_nl, &actor_nl, "task-nl", "tickets:read"),
    );
    assert_eq!(code, 200, "{r}");
    let nl = format!("{}\n", r["access_token"].as_str().unwrap());
    let (_, i) = post_auth(&d, "/introspect", Some(&relying_party), &nl);
    assert_eq!(i["active"], true, "{i}");
}

/// Asserts that neither the daemon's log nor its audit files hold any of `tokens` or `keys`
/// (PKCS#8 DER), in any of the forms [`common::assert_no_secret`] looks for.
fn assert_no_secret(d: &Daemon, tokens: &[String], keys: &[&[u8]]) {
    let secrets: Vec<Secret<'_>> = tokens
        .iter()
        .map(|t| Secret::Token(t))
        .chain(keys.iter().map(|k| Secret::Key(k)))
        .collect();
    common::assert_no_secret(d, &secrets);
}

/// Introspection says `active` only while Tessera itself would honour the token: deleting the
/// entry that granted it ends it at once, as it ends the agent's own authentication.
#[tokio::test(flavor = "multi_thread")]
async fn introspection_answers_for_task_tokens_only_and_ends_with_the_entry() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let sel = format!("unix:uid:{}", my_uid());
    let created = cli_json(
        &d,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://tessera.internal/agents/c",
            "--selector",
            &sel,
            "--owner",
            "ops",
        ],
    );
    let c_token = actor_token(&d, "c").await;
    let rp = actor_token(&d, "b").await;
    // A live JWT-SVID is a workload's credential, not an access token of this server: inactive
    // to introspection, whatever its audience; ValidateJWTSVID is its check.
    let (code, i) = post_auth(&d, "/introspect", Some(&rp), &c_token);
    assert_eq!((code, i), (200, json!({"active": false})));
    let c = d.client().await;
    assert!(
        c.validate_jwt_token(&issuer_url(&d), &c_token)
            .await
            .is_ok()
    );
    let (code, r) = exchange(
        &d,
        &base_fields(&idp.token("frank"), &c_token, "c-1", "tickets:read"),
    );
    assert_eq!(code, 200, "{r}");
    let task_token = r["access_token"].as_str().unwrap();
    let (code, i) = post_auth(&d, "/introspect", Some(&rp), task_token);
    assert_eq!((code, &i["active"]), (200, &json!(true)), "{i}");
    assert_eq!(i["client_id"], "spiffe://tessera.internal/agents/c");

    let out = d.cli(&["entry", "delete", created["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let (code, i) = post_auth(&d, "/introspect", Some(&rp), task_token);
    assert_eq!((code, i), (200, json!({"active": false})));
    // The Workload API agrees: ValidateJWTSVID refuses it too.
    assert!(
        c.validate_jwt_token(&issuer_url(&d), &c_token)
            .await
            .is_err()
    );
    // Its holder can no longer authenticate with it either.
    let (code, e) = post_auth(&d, "/introspect", Some(&c_token), &rp);
    assert_eq!((code, e["error"].as_str()), (401, Some("invalid_token")));
}

/// A task token lives `[tasks] token_ttl` (5 minutes here), cut short by the entry's
/// `max_task_ttl`, the subject token's `exp` and the entry's `expires_at`; the answer's
/// `expires_in` is the token's own lifetime.
#[tokio::test(flavor = "multi_thread")]
async fn task_token_lifetime_is_capped_by_the_entry_the_subject_and_expires_at() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    // A stored entry, so that its caps can be changed while it holds its actor token.
    let id = &stored_agent_c(&d, &["--max-task-ttl", "90s"]);
    let actor = actor_token(&d, "c").await;
    // Exchanges `subject` as c; asserts success and returns (exp, exp - iat).
    let lifetime = |subject: &str| {
        let (code, r) = exchange(&d, &base_fields(subject, &actor, "life", "tickets:read"));
        assert_eq!(code, 200, "{r}");
        let c = verify_independently(&d, r["access_token"].as_str().unwrap());
        let (exp, iat) = (c["exp"].as_i64().unwrap(), c["iat"].as_i64().unwrap());
        assert_eq!(r["expires_in"], exp - iat, "the token's own lifetime: {r}");
        (exp, exp - iat)
    };
    let update = |flag: &str, value: &str| {
        let out = d.cli(&["entry", "update", id, flag, value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // The entry's cap, under a subject token that lives longer.
    let mut claims = idp.claims("alice");
    claims["exp"] = (now() + 100).into();
    let short_subject = idp.sign("RS256", Some("rsa-1"), &claims);
    assert_eq!(lifetime(&short_subject).1, 90);

    // With the entry's cap raised, the subject token's own exp (checked again at minting, so
    // not even a clock second turning between the exchange and the mint takes it past).
    update("--max-task-ttl", "1h");
    let sub_exp = now() + 100;
    claims["exp"] = sub_exp.into();
    let (exp, ttl) = lifetime(&idp.sign("RS256", Some("rsa-1"), &claims));
    assert!((95..=100).contains(&ttl), "{ttl}");
    assert!(exp <= sub_exp, "{exp} > {sub_exp}");
    // A subject token just past exp, within the leeway, still gets a token, of 1 second.
    claims["exp"] = (now() - 10).into();
    assert_eq!(lifetime(&idp.sign("RS256", Some("rsa-1"), &claims)).1, 1);
    // A subject token that expires after year 9999 (past what a date holds) caps nothing: the
    // default 5 minutes, not a token expired as it is issued.
    claims["exp"] = 253_402_300_800_i64.into();
    assert_eq!(lifetime(&idp.sign("RS256", Some("rsa-1"), &claims)).1, 300);

    // The entry's expires_at, a minute away, under a 10-minute subject token.
    let expires_at = now() + 60;
    let rfc3339 = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    update("--expires-at", &rfc3339);
    let (exp, ttl) = lifetime(&idp.token("alice"));
    assert!(exp <= expires_at, "{exp} > {expires_at}");
    assert!(ttl >= 55, "{ttl}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_rfc_errors_and_change_nothing() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let actor = actor_token(&d, "a").await;
    let good = idp.token("alice");
    let mut c = idp.claims("alice");

    let expired = {
        c["exp"] = (now() - 120).into();
        c["iat"] = (now() - 720).into();
        idp.sign("RS256", Some("rsa-1"), &c)
    };
    let mut wrong_iss = idp.claims("alice");
    wrong_iss["iss"] = "https://evil.example".into();
    let wrong_iss = idp.sign("RS256", Some("rsa-1"), &wrong_iss);
    let mut wrong_aud = idp.claims("alice");
    wrong_aud["aud"] = "someone-else".into();
    let wrong_aud = idp.sign("RS256", Some("rsa-1"), &wrong_aud);
    let unknown_kid = idp.sign("RS256", Some("rsa-9"), &idp.claims("alice"));
    let mut extra_aud = idp.claims("alice");
    extra_aud["aud"] = json!(["tessera", "untrusted-client"]);
    let extra_aud = idp.sign("RS256", Some("rsa-1"), &extra_aud);
    let mut bad_act = idp.claims("alice");
    bad_act["act"] = json!("pipeline");
    let bad_act = idp.sign("RS256", Some("rsa-1"), &bad_act);
    let alg_none = idp.sign("none", Some("rsa-1"), &idp.claims("alice"));
    let pss_under_rs256_key = idp.sign("PS256", Some("rsa-1"), &idp.claims("alice"));
    let hs256 = idp.sign("HS256", Some("rsa-1"), &idp.claims("alice"));
    // Refused as malformed JSON, before any key is looked at (the signature cases follow).
    let mut bad_payload = good.clone();
    bad_payload.insert(good.find('.').unwrap() + 2, 'x');
    // No kid: the daemon tries each of the issuer's keys, which none of these must pass.
    let kidless = idp.sign("RS256", None, &idp.claims("alice"));
    let kidless_forged = with_bad_signature(&kidless);
    let kidless_unpublished = sign_with_unpublished_key(&idp.claims("alice"));
    // A JWT-SVID for the wrong audience is not an actor token.
    let client = d.client().await;
    let wrong_aud_svid = client
        .fetch_jwt_svid(&["https://not-tessera"], None)
        .await
        .unwrap()
        .token()
        .to_owned();
    // Nor is one for Tessera and another audience, which that audience could replay here.
    let shared_aud_svid = client
        .fetch_jwt_svid(&[issuer_url(&d).as_str(), "https://tool.example"], None)
        .await
        .unwrap()
        .token()
        .to_owned();

    let fetches_before = idp.fetches.load(Ordering::SeqCst);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "expired subject",
            base_fields(&expired, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "wrong issuer",
            base_fields(&wrong_iss, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "wrong audience",
            base_fields(&wrong_aud, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "unknown key",
            base_fields(&unknown_kid, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "untrusted extra audience",
            base_fields(&extra_aud, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "act that is not an object",
            base_fields(&bad_act, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "alg none",
            base_fields(&alg_none, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "HS256",
            base_fields(&hs256, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "PS256 under a key published for RS256",
            base_fields(&pss_under_rs256_key, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "malformed payload",
            base_fields(&bad_payload, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "no kid, bad signature",
            base_fields(&kidless_forged, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "no kid, a key the issuer does not publish",
            base_fields(&kidless_unpublished, &actor, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "missing actor token",
            base_fields(&good, "", "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "invalid actor token",
            base_fields(&good, "abc.def.ghi", "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "actor token for another audience",
            base_fields(&good, &wrong_aud_svid, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "actor token for Tessera and another audience",
            base_fields(&good, &shared_aud_svid, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "subject token as actor",
            base_fields(&good, &good, "t1", "tickets:read"),
            "invalid_request",
        ),
        (
            "missing task_id",
            base_fields(&good, &actor, "", "tickets:read"),
            "invalid_request",
        ),
        (
            "bad task_id",
            base_fields(&good, &actor, "a/b", "tickets:read"),
            "invalid_request",
        ),
        (
            "missing scope",
            base_fields(&good, &actor, "t1", ""),
            "invalid_scope",
        ),
        (
            "malformed scope",
            base_fields(&good, &actor, "t1", "a\"b"),
            "invalid_scope",
        ),
        (
            "denied scope",
            base_fields(&good, &actor, "t1", "tickets:read tickets:delete"),
            "invalid_scope",
        ),
        (
            "unknown scope",
            base_fields(&good, &actor, "t1", "tickets:admin"),
            "invalid_scope",
        ),
        (
            "ttl too long for policy",
            base_fields(&good, &actor, "t1", "tickets:write"),
            "invalid_scope",
        ),
    ];
    for (name, fields, want) in &cases {
        let (code, r) = exchange(&d, fields);
        assert_eq!(code, 400, "{name}: {r}");
        assert_eq!(
            r["error"].as_str().unwrap_or_default(),
            *want,
            "{name}: {r}"
        );
        let desc = r["error_description"].as_str().unwrap_or_default();
        assert!(!desc.is_empty(), "{name}");
        // RFC 6749 §5.2 character set.
        assert!(
            desc.bytes()
                .all(|b| matches!(b, 0x20 | 0x21 | 0x23..=0x5b | 0x5d..=0x7e)),
            "{name}: {desc}"
        );
        assert!(!r.to_string().contains(&good), "{name}: no token echoed");
    }
    // Denied scopes are named, and only those.
    let (_, r) = exchange(
        &d,
        &base_fields(&good, &actor, "t1", "tickets:read tickets:delete"),
    );
    assert_eq!(r["denied_scopes"], json!(["tickets:delete"]));
    assert!(
        r["error_description"]
            .as_str()
            .unwrap()
            .contains("tickets:delete")
    );
    // The unknown kid caused at most one (rate-limited) refetch of the issuer's keys.
    let after = idp.fetches.load(Ordering::SeqCst);
    assert!(after - fetches_before <= 1, "{fetches_before} -> {after}");

    // Malformed requests.
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f[0].1 = "client_credentials";
    assert_eq!(exchange(&d, &f).1["error"], "unsupported_grant_type");
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f.push(("audience", "https://other"));
    assert_eq!(exchange(&d, &f).1["error"], "invalid_target");
    // An audience that reorders what the approving operator reads (review AA).
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f[5].1 = "https://tickets.example/\u{202E}etirw";
    let (code, r) = exchange(&d, &f);
    assert_eq!(
        (code, r["error"].as_str()),
        (400, Some("invalid_target")),
        "{r}"
    );
    // RFC 8693 `resource` is not supported: refused, not ignored (the token would not be
    // limited to it).
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f.push(("resource", TICKETS));
    let (code, r) = exchange(&d, &f);
    assert_eq!(
        (code, r["error"].as_str()),
        (400, Some("invalid_target")),
        "{r}"
    );
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f.push(("task_id", "t2"));
    assert_eq!(exchange(&d, &f).1["error"], "invalid_request");
    let mut f = base_fields(&good, &actor, "t1", "tickets:read");
    f[2].1 = "urn:x:unknown";
    assert_eq!(exchange(&d, &f).1["error"], "invalid_request");
    let (code, _, body) = http_post(
        d.http,
        "/token",
        &[("Content-Type", "application/json")],
        b"{}",
    );
    assert_eq!(code, 400);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["error"],
        "invalid_request"
    );

    // Nothing was issued by any refusal, and no task was claimed: agent b can take t1.
    let out = d.cli(&["--json", "lease", "list", "--kind", "task-token"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );
    let actor_b = actor_token(&d, "b").await;
    let (code, r) = exchange(&d, &base_fields(&good, &actor_b, "t1", "tickets:read"));
    assert_eq!(code, 200, "{r}");
    // Task ids are each agent's own: a's t1 is another task, not b's.
    let (code, r) = exchange(&d, &base_fields(&good, &actor, "t1", "tickets:read"));
    assert_eq!(code, 200, "{r}");

    // A correctly signed token without a kid is accepted.
    let (code, r) = exchange(&d, &base_fields(&kidless, &actor_b, "t1", "tickets:read"));
    assert_eq!(code, 200, "{r}");
    // Both tokens are now validated and remembered: the same header and payload under a
    // forged signature must still be checked, not matched to what was validated.
    for (name, forged) in [
        ("kid", with_bad_signature(&good)),
        ("no kid", kidless_forged),
    ] {
        let (code, r) = exchange(&d, &base_fields(&forged, &actor_b, "t1", "tickets:read"));
        assert_eq!(code, 400, "{name}: {r}");
        assert_refused(&r, "signature");
    }
    let out = d.cli(&["--json", "lease", "list", "--kind", "task-token"]);
    let leases: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(leases.as_array().unwrap().len(), 3, "{leases}");
}

/// An issuer, a daemon trusting it once its start-up key fetch is done (an exchange before
/// it would fetch on demand, and the rate limit would then hold back the fetch a test is
/// about), and agent a's actor token.
async fn daemon_after_its_key_fetch() -> (Idp, Daemon, String) {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let actor = actor_token(&d, "a").await;
    eventually("the start-up key fetch", || {
        idp.fetches.load(Ordering::SeqCst) >= 1
    })
    .await;
    // (The daemon stores the keys just after the issuer has served them.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    (idp, d, actor)
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_issuers_keys_cannot_be_fetched_a_new_key_is_unavailable_not_invalid() {
    let (idp, d, actor) = daemon_after_its_key_fetch().await;
    // The issuer goes down just as it rotates: tokens signed with the new key cannot be
    // judged, so clients are told to retry (503), not that their token is bad (400) -- also
    // within the refetch rate limit, when no fetch is tried.
    idp.down.store(true, Ordering::SeqCst);
    let t = idp.sign("RS256", Some("rsa-2"), &idp.claims("a1"));
    for round in 0..2 {
        let (code, r) = exchange(&d, &base_fields(&t, &actor, "r1", "tickets:read"));
        assert_eq!(code, 503, "round {round}: {r}");
        assert_eq!(r["error"], "temporarily_unavailable", "round {round}: {r}");
    }
    // So with no kid: a token that none of the keys it has verifies may be under a key
    // rotated in.
    let t = sign_with_unpublished_key(&idp.claims("a1"));
    let (code, r) = exchange(&d, &base_fields(&t, &actor, "r1", "tickets:read"));
    assert_eq!(
        (code, r["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{r}"
    );
    // Tokens under the keys it already has are not affected, with a kid or without.
    for t in [idp.token("a1"), idp.sign("RS256", None, &idp.claims("a1"))] {
        let (code, r) = exchange(&d, &base_fields(&t, &actor, "r1", "tickets:read"));
        assert_eq!(code, 200, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_issuer_keys_are_fetched_on_first_sight_with_a_rate_limit() {
    let (idp, d, actor) = daemon_after_its_key_fetch().await;
    // Then rotate: the issuer publishes its key under a new kid.
    let (code, _) = exchange(
        &d,
        &base_fields(&idp.token("a1"), &actor, "r1", "tickets:read"),
    );
    assert_eq!(code, 200);
    let before = idp.fetches.load(Ordering::SeqCst);
    let mut rotated = idp.jwks.lock().unwrap()[0].clone();
    rotated["kid"] = "rsa-2".into();
    idp.jwks.lock().unwrap().push(rotated);
    let t = idp.sign("RS256", Some("rsa-2"), &idp.claims("a1"));
    let (code, r) = exchange(&d, &base_fields(&t, &actor, "r1", "tickets:read"));
    assert_eq!(code, 200, "new kid fetched on first sight: {r}");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), before + 1);
    // Unknown kids right after do not make the daemon hammer the issuer. Their keys cannot
    // be fetched yet, so they may be keys rotated in just now: a retry (503), not a refusal.
    for i in 0..5 {
        let t = idp.sign("RS256", Some(&format!("nope-{i}")), &idp.claims("a1"));
        let (code, r) = exchange(&d, &base_fields(&t, &actor, "r1", "tickets:read"));
        assert_eq!(
            (code, r["error"].as_str()),
            (503, Some("temporarily_unavailable")),
            "{r}"
        );
    }
    assert_eq!(idp.fetches.load(Ordering::SeqCst), before + 1);
}

/// Starts an exchange as `actor` for `task_id` that waits in the subject token's key fetch:
/// the issuer rotates in a key and is slow to serve it. Returns once the fetch has begun; the
/// caller acts, opens the issuer (`idp.open`) and joins the exchange.
async fn exchange_held_in_key_fetch(
    idp: &Idp,
    d: Daemon,
    actor: String,
    task_id: &'static str,
) -> (
    Arc<Daemon>,
    Arc<String>,
    std::thread::JoinHandle<(u16, Value)>,
) {
    let mut rotated = idp.jwks.lock().unwrap()[0].clone();
    rotated["kid"] = "rsa-2".into();
    idp.jwks.lock().unwrap().push(rotated);
    idp.open.send_replace(false);
    let before = idp.fetches.load(Ordering::SeqCst);
    let t = idp.sign("RS256", Some("rsa-2"), &idp.claims("a1"));
    let (d, actor) = (Arc::new(d), Arc::new(actor));
    let pending = std::thread::spawn({
        let (d, actor) = (Arc::clone(&d), Arc::clone(&actor));
        move || exchange(&d, &base_fields(&t, &actor, task_id, "tickets:read"))
    });
    eventually("the exchange's key fetch", || {
        idp.fetches.load(Ordering::SeqCst) > before
    })
    .await;
    (d, actor, pending)
}

/// Lets the issuer answer an exchange of [`exchange_held_in_key_fetch`], and expects it
/// refused for `why` with no task token minted.
fn refused_once_the_issuer_answers(
    idp: &Idp,
    d: &Daemon,
    pending: std::thread::JoinHandle<(u16, Value)>,
    why: &str,
) {
    idp.open.send_replace(true);
    let (code, r) = pending.join().unwrap();
    assert_eq!(code, 400, "a task token minted: {r}");
    assert_refused(&r, why);
    let tasks = cli_json(d, &["lease", "list", "--json", "--kind", "task-token"]);
    assert!(tasks.as_array().unwrap().is_empty(), "{tasks}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_raised_to_high_risk_during_the_exchange_mints_nothing_unapproved() {
    // Review AY-2: the approval rule and the policy were decided from the entry as it was
    // before the subject token's (slow) key fetch; an edit meanwhile must not be bypassed.
    let (idp, d, _) = daemon_after_its_key_fetch().await;
    let id = stored_agent_c(&d, &["--owner", "platform"]);
    let actor = actor_token(&d, "c").await;
    let (d, actor, pending) = exchange_held_in_key_fetch(&idp, d, actor, "r-raised").await;
    let out = d.cli(&["entry", "update", &id, "--risk", "high"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused_once_the_issuer_answers(&idp, &d, pending, "changed during the exchange");
    // Asked again, it is decided under the entry as it is: a high-risk agent waits for a
    // human.
    let t = idp.sign("RS256", Some("rsa-2"), &idp.claims("a1"));
    let (_, r) = exchange(&d, &base_fields(&t, &actor, "r-raised", "tickets:read"));
    assert_eq!(r["error"], "authorization_pending", "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_actor_token_revoked_during_the_exchange_gets_nothing() {
    let (idp, d, actor) = daemon_after_its_key_fetch().await;
    // The exchange waits in its key fetch, after the actor token was checked.
    let (d, actor, pending) = exchange_held_in_key_fetch(&idp, d, actor, "r-revoked").await;
    // The agent's JWT-SVID leaked: the operator revokes it, and the revocation returns.
    revoke_token_lease(&d, &actor);
    refused_once_the_issuer_answers(&idp, &d, pending, "revoked or expired during the exchange");
}

fn tasks_req(subject: &str, task: &str, scopes: &[&str], x509: bool) -> pb::ExchangeRequest {
    pb::ExchangeRequest {
        subject_token: subject.into(),
        subject_token_type: TT_ID.into(),
        audience: TICKETS.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        task_id: task.into(),
        expires_in: 0,
        x509_svid: x509,
        spiffe_id: String::new(),
        requested_token_type: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_exchange_task_svid_complete_and_kill() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let rp = actor_token(&d, "b").await;
    let channel = common::channel(&d.socket).await;
    // Without the endpoint's security header, the Tasks service refuses like the Workload API.
    let err = pb::tasks_client::TasksClient::new(channel.clone())
        .exchange(tasks_req(
            &idp.token("carol"),
            "job-0",
            &["tickets:read"],
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("workload.spiffe.io"),
        "{}",
        err.message()
    );
    // A request far beyond any legitimate one (100k distinct scopes, 1 MiB) is refused before
    // it is parsed, and the daemon goes on serving (below).
    let huge: Vec<String> = (0..100_000).map(|i| format!("s{i:08}")).collect();
    let huge: Vec<&str> = huge.iter().map(String::as_str).collect();
    let err = tessera::api::workload::tasks_client(channel.clone())
        .exchange(tasks_req(&idp.token("carol"), "job-0", &huge, false))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("message length too large"),
        "{err:?}"
    );
    let mut tasks = tessera::api::workload::tasks_client(channel);
    let subject = idp.token("carol");
    // Every token sent or issued, none of which may be logged or audited (checked at the end).
    let mut secrets = vec![rp.clone(), subject.clone()];

    let r = tasks
        .exchange(tasks_req(&subject, "job-42", &["tickets:read"], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.agent, "spiffe://tessera.internal/agents/a");
    assert_eq!(r.token_type, "Bearer");
    secrets.push(r.access_token.clone());
    let svid = r.x509_svid.clone().expect("task X.509-SVID");
    assert_eq!(
        svid.spiffe_id,
        "spiffe://tessera.internal/agents/a/task/job-42"
    );
    // The certificate carries exactly that URI SAN and verifies against the bundle (openssl).
    let dir = tempfile::tempdir().unwrap();
    let to_pem = |der: &[u8]| {
        let mut out = String::new();
        let mut rest = der;
        while !rest.is_empty() {
            let (r2, _) = x509_parser::parse_x509_certificate(rest).unwrap();
            let one = &rest[..rest.len() - r2.len()];
            out.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", one.to_vec())));
            rest = r2;
        }
        out
    };
    std::fs::write(dir.path().join("leaf.pem"), to_pem(&svid.x509_svid)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), to_pem(&svid.bundle)).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI({:?})]", svid.spiffe_id)
    );

    // A list element is one scope: one holding a space, or an empty one, is refused.
    for scopes in [&["tickets:read tickets:write"][..], &["tickets:read", ""]] {
        let err = tasks
            .exchange(tasks_req(&subject, "job-sc", scopes, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{scopes:?}");
        assert!(err.message().contains("scopes["), "{}", err.message());
    }

    // Errors carry the OAuth code.
    let err = tasks
        .exchange(tasks_req(&subject, "", &["tickets:read"], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("invalid_request:"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata().get("tessera-oauth-error").unwrap(),
        "invalid_request"
    );
    let err = tasks
        .exchange(tasks_req(&subject, "job-x", &["tickets:delete"], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().starts_with("invalid_scope:"),
        "{}",
        err.message()
    );

    // Completing the task makes its token inactive at once and revokes the task SVID.
    let n = tasks
        .complete(pb::CompleteRequest {
            task_id: "job-42".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(n, 2);
    let (_, i) = post_auth(&d, "/introspect", Some(&rp), &r.access_token);
    assert_eq!(i, json!({"active": false}));
    let l = cli_json(&d, &["lease", "show", &svid.lease_id]);
    assert_eq!(l["state"], "revoked");
    // A completed task gets nothing more.
    let err = tasks
        .exchange(tasks_req(&subject, "job-42", &["tickets:read"], false))
        .await
        .unwrap_err();
    assert!(err.message().contains("complete"), "{}", err.message());
    // Unknown task.
    let err = tasks
        .complete(pb::CompleteRequest {
            task_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // This workload is agents a and b: each with a task "dual", which are two tasks. Completing
    // "dual" must say which; naming b completes b's alone.
    for agent in ["a", "b"] {
        let mut req = tasks_req(&subject, "dual", &["tickets:read"], false);
        req.spiffe_id = format!("spiffe://tessera.internal/agents/{agent}");
        tasks.exchange(req).await.unwrap();
    }
    let err = tasks
        .complete(pb::CompleteRequest {
            task_id: "dual".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("say which"), "{}", err.message());
    // A malformed choice of identity is bad input, not an identity the caller lacks; a
    // well-formed one it lacks is refused.
    let mut req = tasks_req(&subject, "dual", &["tickets:read"], false);
    req.spiffe_id = "bogus".into();
    let err = tasks.exchange(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("spiffe://"), "{}", err.message());
    let err = tasks
        .complete(pb::CompleteRequest {
            task_id: "dual".into(),
            spiffe_id: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = tasks
        .complete(pb::CompleteRequest {
            task_id: "dual".into(),
            spiffe_id: "spiffe://tessera.internal/agents/z".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let n = tasks
        .complete(pb::CompleteRequest {
            task_id: "dual".into(),
            spiffe_id: "spiffe://tessera.internal/agents/b".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(n, 1);
    let open = cli_json(
        &d,
        &["lease", "list", "--task", "dual", "--state", "active"],
    );
    assert_eq!(
        open.as_array().unwrap()[0]["task_id"],
        "spiffe://tessera.internal/agents/a/task/dual",
        "{open}"
    );
    assert_eq!(open.as_array().unwrap().len(), 1, "{open}");

    // The CLI does the same for agents (as this uid, over the Workload API socket).
    let g = cli_json(
        &d,
        &[
            "task",
            "exchange",
            "--subject-token",
            &subject,
            "--audience",
            TICKETS,
            "--scope",
            "tickets:read",
            "--task",
            "cli-1",
        ],
    );
    assert_eq!(g["agent"], "spiffe://tessera.internal/agents/a");
    assert_eq!(g["scope"], "tickets:read");
    secrets.push(g["access_token"].as_str().unwrap().to_owned());
    let done = cli_json(&d, &["task", "complete", "cli-1"]);
    assert_eq!(done["revoked"], 1);
    // Again: nothing to do, and nothing recorded as if it were a second completion.
    let again = cli_json(&d, &["task", "complete", "cli-1"]);
    assert_eq!(again["revoked"], 0);
    let audit = std::fs::read_to_string(d.data_dir.join("audit.jsonl")).unwrap();
    let completions = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"complete\"") && l.contains("\"cli-1\""))
        .count();
    assert_eq!(completions, 1, "{audit}");

    // A task's own identity can be killed: no new certificate or token for the task, the agent
    // is otherwise unaffected.
    let r46 = tasks
        .exchange(tasks_req(&subject, "job-46", &["tickets:read"], true))
        .await
        .unwrap()
        .into_inner();
    secrets.push(r46.access_token);
    let task_id = "spiffe://tessera.internal/agents/a/task/job-46";
    let out = d.cli(&["kill", task_id, "--reason", "leaked key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for x509 in [true, false] {
        let err = tasks
            .exchange(tasks_req(&subject, "job-46", &["tickets:read"], x509))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{}",
            err.message()
        );
        assert!(err.message().contains(task_id), "{}", err.message());
    }
    let other = tasks
        .exchange(tasks_req(&subject, "job-48", &["tickets:read"], false))
        .await
        .unwrap()
        .into_inner();
    secrets.push(other.access_token);
    assert!(d.cli(&["restore", task_id]).status.success());
    let r46 = tasks
        .exchange(tasks_req(&subject, "job-46", &["tickets:read"], false))
        .await
        .unwrap()
        .into_inner();
    secrets.push(r46.access_token);

    // Kill switch: the agent's live task token goes inactive, and it gets nothing new.
    let r = tasks
        .exchange(tasks_req(&subject, "job-43", &["tickets:read"], false))
        .await
        .unwrap()
        .into_inner();
    secrets.push(r.access_token.clone());
    let (_, i) = post_auth(&d, "/introspect", Some(&rp), &r.access_token);
    assert_eq!(i["active"], true);
    let out = d.cli(&[
        "kill",
        "spiffe://tessera.internal/agents/a",
        "--reason",
        "test",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, i) = post_auth(&d, "/introspect", Some(&rp), &r.access_token);
    assert_eq!(i, json!({"active": false}));
    // The caller's default identity is now b (a is killed); ask for a explicitly.
    let mut req = tasks_req(&subject, "job-44", &["tickets:read"], false);
    req.spiffe_id = "spiffe://tessera.internal/agents/a".into();
    let err = tasks.exchange(req).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );

    // Operators complete tasks through the admin API too.
    let r = tasks
        .exchange(tasks_req(&subject, "job-45", &["tickets:read"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.agent, "spiffe://tessera.internal/agents/b");
    secrets.push(r.access_token.clone());
    let out = d.cli(&["task", "complete", "--operator", "job-45"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, i) = post_auth(&d, "/introspect", Some(&rp), &r.access_token);
    assert_eq!(i, json!({"active": false}));
    assert_no_secret(&d, &secrets, &[&svid.x509_svid_key]);
}

/// Asserts that an exchange was refused as `invalid_request` with `why` in its description.
fn assert_refused(r: &Value, why: &str) {
    assert_eq!(r["error"], "invalid_request", "{r}");
    assert!(
        r["error_description"]
            .as_str()
            .is_some_and(|d| d.contains(why)),
        "wanted {why:?}: {r}"
    );
}

/// `kill -9` (no graceful shutdown), then the daemon again on the same directory and config.
fn crash_and_restart(mut d: Daemon) -> Daemon {
    d.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    drop(d);
    let config = std::fs::read_to_string(dir.path().join("tesserad.toml")).unwrap();
    Daemon::start_in(dir, &config)
}

/// Polls until `f` holds (policy reloads are asynchronous).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reloads_good_files_and_keeps_the_last_good_one() {
    let idp = Idp::start().await;
    let read_only =
        r#"permit(principal, action, resource) when { context.scope == "tickets:read" };"#;
    let d = daemon(&idp, read_only, "", "");
    let policy_path = d.dir.path().join("policy.cedar");
    let actor = actor_token(&d, "a").await;
    let subject = idp.token("dave");
    let scope_ok = |scope: &str, task: &str| {
        let (code, r) = exchange(&d, &base_fields(&subject, &actor, task, scope));
        (code == 200, r)
    };
    assert!(scope_ok("tickets:read", "p1").0);
    assert!(!scope_ok("tickets:write", "p1").0);

    // A new good file is picked up on change.
    std::fs::write(
        &policy_path,
        r#"permit(principal, action, resource) when { context.scope like "tickets:*" };"#,
    )
    .unwrap();
    eventually("the new policy is in force", || {
        scope_ok("tickets:write", "p1").0
    })
    .await;

    // A broken file is reported and the previous policy stays in force.
    std::fs::write(&policy_path, "permit(principal, action, resource").unwrap();
    eventually("the broken file is reported", || {
        d.log_text().contains("policy file rejected")
    })
    .await;
    assert!(scope_ok("tickets:write", "p1").0);
    // So is a file that parses but does not match the schema.
    std::fs::write(
        &policy_path,
        r#"permit(principal, action, resource) when { principal.team == "x" };"#,
    )
    .unwrap();
    eventually("the invalid file is reported", || {
        d.log_text().matches("policy file rejected").count() >= 2
    })
    .await;
    assert!(scope_ok("tickets:write", "p1").0);
    // So is a file others could write (review AY-6); once its mode is fixed it is loaded,
    // although nothing else about it changed (review BD-4).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&policy_path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(
        &policy_path,
        r#"permit(principal, action, resource) when { context.scope like "*" };"#,
    )
    .unwrap();
    eventually("the file others could write is reported", || {
        d.log_text().contains("not writable by")
    })
    .await;
    assert!(!scope_ok("admin:all", "p1").0);
    std::fs::set_permissions(&policy_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    eventually("the file is loaded once its mode is fixed", || {
        scope_ok("admin:all", "p1").0
    })
    .await;

    // SIGHUP reloads too.
    std::fs::write(&policy_path, "forbid(principal, action, resource);").unwrap();
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    eventually("the forbid-all policy is in force", || {
        !scope_ok("tickets:read", "p1").0
    })
    .await;
    let (_, r) = scope_ok("tickets:read", "p1");
    assert_eq!(r["error"], "invalid_scope");
    let audit = std::fs::read_to_string(d.data_dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"policy_reload\""));
    assert!(audit.contains("\"policy_rejected\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn high_risk_agents_wait_for_a_single_use_approval() {
    let idp = Idp::start().await;
    // The agent is this test binary; the operator's `tessera` CLI (same uid) is not.
    let exe = common::current_exe();
    let d = daemon_with(
        &idp,
        POLICY,
        &format!(", \"unix:path:{}\"", exe.display()),
        "risk = \"high\"",
        "",
    );
    let actor = actor_token(&d, "a").await;
    let subject = idp.token("erin");
    let f = base_fields(&subject, &actor, "deploy-1", "tickets:read");

    let (code, r) = exchange(&d, &f);
    assert_eq!(
        (code, r["error"].as_str()),
        (400, Some("authorization_pending")),
        "{r}"
    );
    assert_eq!(r["interval"], 5);
    let id = r["request_id"].as_str().unwrap().to_owned();
    // The same request waits on the same approval.
    let (_, r) = exchange(&d, &f);
    assert_eq!(r["request_id"], id);

    let list = cli_json(&d, &["approvals"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["agent"], "spiffe://tessera.internal/agents/a");
    assert_eq!(list[0]["scopes"], json!(["tickets:read"]));
    assert_eq!(list[0]["subject"]["sub"], "erin");

    // The agent cannot approve its own request: this process holds agents/a.
    let mut admin = pb::admin_client::AdminClient::new(common::channel(&d.admin_socket).await);
    let err = admin
        .approve(pb::DecideApprovalRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    assert!(err.message().contains("agents/a"), "{}", err.message());
    let out = d.cli(&["approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A retry asking for another lifetime, or for an X.509-SVID too, is another request: the
    // approval covers what the operator saw.
    let mut longer = f.clone();
    longer.push(("expires_in", "240"));
    let (_, r) = exchange(&d, &longer);
    assert_eq!(r["error"], "authorization_pending", "{r}");
    assert_ne!(r["request_id"], id);
    // The operator's table tells such requests apart (review AA): lifetime, task
    // X.509-SVID, and the subject's issuer are shown.
    let out = d.cli(&["approvals"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(" 240s ") && table.contains(&idp.issuer) && table.contains("X509"),
        "{table}"
    );
    // Approving twice is an error, and says why.
    let out = d.cli(&["approve", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already decided"),
        "{err}"
    );
    // A different request (other scopes) is not covered by the approval.
    let other = base_fields(&subject, &actor, "deploy-1", "tickets:read tickets:write");
    let mut other = other;
    other.push(("expires_in", "60"));
    let (_, r) = exchange(&d, &other);
    assert_eq!(r["error"], "authorization_pending");
    let other_id = r["request_id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, id);

    let (code, r) = exchange(&d, &f);
    assert_eq!(code, 200, "{r}");
    let audit = std::fs::read_to_string(d.data_dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"approval_requested\""));
    assert!(audit.contains("\"approve\""));
    // Single use: the next identical request waits again, under a new id.
    let (_, r) = exchange(&d, &f);
    assert_eq!(r["error"], "authorization_pending");
    assert_ne!(r["request_id"], id);

    // Denied requests are answered access_denied.
    let out = d.cli(&["deny", &other_id]);
    assert!(out.status.success());
    let (code, r) = exchange(&d, &other);
    assert_eq!(
        (code, r["error"].as_str()),
        (400, Some("access_denied")),
        "{r}"
    );
    let out = d.cli(&["approve", "no-such-request"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no pending request \"no-such-request\""),
        "{err}"
    );

    // A kill withdraws the agent's requests, pending or decided: after a restore it asks
    // again.
    assert!(!cli_json(&d, &["approvals"]).as_array().unwrap().is_empty());
    let out = d.cli(&[
        "kill",
        "spiffe://tessera.internal/agents/a",
        "--reason",
        "drill",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cli_json(&d, &["approvals"]), json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_expired_and_idle_entries_get_nothing() {
    let idp = Idp::start().await;
    let d = daemon(
        &idp,
        POLICY,
        "expires_at = \"2020-01-01T00:00:00Z\"",
        "inventory.idle_after = \"4s\"\ninventory.refuse_idle = true",
    );
    let c = d.client().await;
    // agents/a expired: only agents/b is served.
    let svids = c
        .fetch_all_jwt_svids(&[issuer_url(&d)], None)
        .await
        .unwrap();
    let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, ["spiffe://tessera.internal/agents/b"]);
    // The operator is told at start-up.
    assert!(
        d.log_text()
            .lines()
            .any(|l| l.contains("has expired and grants nothing")
                && l.contains("spiffe://tessera.internal/agents/a")),
        "{}",
        d.log_text()
    );

    let entries = cli_json(&d, &["entry", "list"]);
    let b = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == "spiffe://tessera.internal/agents/b")
        .unwrap()
        .clone();
    assert_eq!(b["idle"], false);
    assert!(b["last_active"].is_string());

    // Idle for longer than idle_after: flagged and refused.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let entries = cli_json(&d, &["entry", "list"]);
    let b2 = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == b["id"])
        .unwrap()
        .clone();
    assert_eq!(b2["idle"], true, "{b2}");
    let out = d.cli(&["entry", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("IDLE"));
    let c = d.client().await;
    // Refused for want of an identity, as the Workload API says it (not, say, a broken
    // connection).
    let refused = c.fetch_jwt_svid(&["x"], None).await;
    assert!(
        matches!(refused, Err(spiffe::WorkloadApiError::NoIdentityIssued)),
        "idle entry refused: {refused:?}"
    );
    // Reviewing it lets it issue again.
    let out = d.cli(&["entry", "review", b["id"].as_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.fetch_jwt_svid(&["x"], None).await.is_ok());
}

/// Sends one HTTP request through `openssl s_client` (an independent TLS client) trusting
/// `ca`, and checking that the certificate names the address's IP, as an HTTPS client checks
/// the host it connected to; returns everything it printed (handshake summary and the HTTP
/// response).
fn https_via_openssl(addr: std::net::SocketAddr, ca: &std::path::Path, path: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-verify_return_error",
            "-verify_ip",
            &addr.ip().to_string(),
            "-CAfile",
        ])
        .arg(ca)
        .args(["-quiet", "-ign_eof"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    write!(
        child.stdin.as_mut().unwrap(),
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_the_daemons_own_svid_and_with_operator_files() {
    // The daemon's own SVID, verified against the trust bundle from the Workload API.
    let d = Daemon::start("http.tls_svid = true");
    let c = d.client().await;
    let bundle = c.fetch_x509_context().await.unwrap();
    let td: spiffe::TrustDomain = "tessera.internal".parse().unwrap();
    let roots = bundle.bundle_set().get(&td).unwrap();
    let ca = d.dir.path().join("bundle.pem");
    let pem_text: String = roots
        .authorities()
        .iter()
        .map(|a| pem::encode(&pem::Pem::new("CERTIFICATE", a.as_ref().to_vec())))
        .collect();
    std::fs::write(&ca, pem_text).unwrap();
    let out = https_via_openssl(d.http, &ca, "/.well-known/openid-configuration");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("\"issuer\":\"https://{}\"", d.http)),
        "{out}"
    );
    // Plain HTTP is not served on a TLS listener, and trying does no harm: TLS still is.
    let plain = std::panic::catch_unwind(|| http_get(d.http, "/healthz"));
    assert!(plain.is_err() || plain.unwrap().0 != 200);
    let out = https_via_openssl(d.http, &ca, "/healthz");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    drop(d);

    // An operator certificate and key from files (the key must be 0600).
    let dir = open_tempdir();
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tessera-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = Daemon::start_in(
        dir,
        &format!(
            "http.tls_cert = {cert:?}\nhttp.tls_key = {key:?}\nhttp.issuer = \"https://tessera.example:8443\""
        ),
    );
    let out = https_via_openssl(d.http, &cert, "/.well-known/oauth-authorization-server");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("\"token_endpoint\":\"https://tessera.example:8443/token\""),
        "{out}"
    );
}

#[test]
fn tls_key_readable_by_others_is_refused_at_start() {
    let dir = open_tempdir();
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=t",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("t.toml");
    write_fixture(
        &cfg,
        format!(
            "data_dir = {:?}\nworkload_api.socket = {:?}\nadmin.socket = {:?}\nhttp.listen = \"127.0.0.1:0\"\nhttp.tls_cert = {cert:?}\nhttp.tls_key = {key:?}\n",
            dir.path().join("data"),
            dir.path().join("w.sock"),
            dir.path().join("a.sock")
        ),
    );
    let out = std::process::Command::new(common::tesserad_bin())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.key") && err.contains("TLS"), "{err}");
    assert!(
        !err.contains("PRIVATE KEY"),
        "no key material in errors: {err}"
    );
    // And nothing was left listening.
    assert!(!dir.path().join("w.sock").exists());
}

/// `a`'s and `b`'s task `id` by its full name.
fn task_name(agent: &str, id: &str) -> String {
    format!("spiffe://tessera.internal/agents/{agent}/task/{id}")
}

#[tokio::test(flavor = "multi_thread")]
async fn task_ids_are_each_agents_own_and_completion_survives_a_restart() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let actor_a = actor_token(&d, "a").await;
    let actor_b = actor_token(&d, "b").await;
    let subject = idp.token("frank");
    // b uses the id first; a uses it too, and gets its own task.
    let mut tokens = HashMap::new();
    for (agent, actor) in [("b", &actor_b), ("a", &actor_a)] {
        let (code, r) = exchange(&d, &base_fields(&subject, actor, "T-101", "tickets:read"));
        assert_eq!(code, 200, "{agent}: {r}");
        tokens.insert(agent, r["access_token"].as_str().unwrap().to_owned());
    }
    let listed = cli_json(&d, &["lease", "list", "--task", "T-101"]);
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["task_id"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [task_name("a", "T-101"), task_name("b", "T-101")]);
    // An operator's bare id is ambiguous now: refused with both names, nothing revoked.
    let out = d.cli(&["task", "complete", "--operator", "T-101"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("used by 2 agents")
            && err.contains(&task_name("a", "T-101"))
            && err.contains(&task_name("b", "T-101")),
        "{err}"
    );
    let out = d.cli(&["task", "revoke", "T-101"]);
    assert!(!out.status.success());
    for agent in ["a", "b"] {
        let (_, i) = post_auth(&d, "/introspect", Some(&actor_a), &tokens[agent]);
        assert_eq!(i["active"], true, "{agent}: {i}");
    }
    // Completing a's task by its full name leaves b's alone.
    let done = cli_json(
        &d,
        &["task", "complete", "--operator", &task_name("a", "T-101")],
    );
    assert_eq!(done["revoked"], 1);
    let (_, i) = post_auth(&d, "/introspect", Some(&actor_a), &tokens["a"]);
    assert_eq!(i["active"], false, "{i}");
    let (_, i) = post_auth(&d, "/introspect", Some(&actor_a), &tokens["b"]);
    assert_eq!(i["active"], true, "{i}");
    // A bare id that only one agent used is enough.
    let (code, _) = exchange(&d, &base_fields(&subject, &actor_a, "solo", "tickets:read"));
    assert_eq!(code, 200);
    assert_eq!(
        cli_json(&d, &["task", "complete", "--operator", "solo"])["revoked"],
        1
    );
    // A task whose first exchange was refused (its identity killed) exists in memory only;
    // completing it must still hold after the restart.
    let first_refused = task_name("a", "T-202");
    assert!(d.cli(&["kill", &first_refused]).status.success());
    let (_, r) = exchange(
        &d,
        &base_fields(&subject, &actor_a, "T-202", "tickets:read"),
    );
    assert_refused(&r, "is killed");
    let done = cli_json(&d, &["task", "complete", "--operator", &first_refused]);
    assert_eq!(done["revoked"], 0, "{done}");
    assert!(d.cli(&["restore", &first_refused]).status.success());

    let d = crash_and_restart(d);

    let actor_a = actor_token(&d, "a").await;
    let actor_b = actor_token(&d, "b").await;
    // a's tasks stay complete; b's task of the same id is still open, and its token live.
    for task in ["T-101", "solo", "T-202"] {
        let (_, r) = exchange(&d, &base_fields(&subject, &actor_a, task, "tickets:read"));
        assert_refused(&r, "complete");
    }
    let (code, r) = exchange(
        &d,
        &base_fields(&subject, &actor_b, "T-101", "tickets:read"),
    );
    assert_eq!(code, 200, "{r}");
    let (_, i) = post_auth(&d, "/introspect", Some(&actor_b), &tokens["b"]);
    assert_eq!(
        i["active"], true,
        "the token from before the crash is live: {i}"
    );
    let (code, r) = exchange(&d, &base_fields(&subject, &actor_b, "solo", "tickets:read"));
    assert_eq!(code, 200, "b's solo is b's own: {r}");
}

/// The daemon's `tessera_tasks` gauge.
/// An agent token Tessera signed that is refused (here revoked after it was used), as the
/// actor token of an exchange or the Bearer token of introspection and revocation, is
/// recorded as presented by someone holding that agent's token; a token that does not verify
/// names nobody and is not recorded.
#[tokio::test(flavor = "multi_thread")]
async fn refused_agent_tokens_are_recorded_denials() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "");
    let actor = actor_token(&d, "a").await;
    // Used once: verified and remembered, so the refusals below come from the cached path.
    let (code, r) = exchange(
        &d,
        &base_fields(&idp.token("alice"), &actor, "t-0", "tickets:read"),
    );
    assert_eq!(code, 200, "{r}");
    revoke_token_lease(&d, &actor);
    let denied = || -> u64 {
        let (_, body) = http_get(d.http, "/metrics");
        common::metric(
            &String::from_utf8(body).unwrap(),
            "tessera_denied_total{kind=\"task-token\"}",
        )
    };
    let before = denied();
    let (code, r) = exchange(
        &d,
        &base_fields(&idp.token("alice"), &actor, "t-1", "tickets:read"),
    );
    assert_eq!(code, 400, "{r}");
    assert_refused(&r, "revoked");
    let (code, _) = post_auth(&d, "/introspect", Some(&actor), "x");
    assert_eq!(code, 401);
    let (code, _) = post_auth(&d, "/revoke", Some(&actor), "x");
    assert_eq!(code, 401);
    let (code, _) = exchange(
        &d,
        &base_fields(&idp.token("alice"), "junk", "t-1", "tickets:read"),
    );
    assert_eq!(code, 400);
    // Denials are recorded without waiting for the disk: looked for until they are there.
    let denials = || -> Vec<Value> {
        let audit = std::fs::read_to_string(d.data_dir.join("audit.jsonl")).unwrap();
        audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["event"] == "deny")
            .collect()
    };
    eventually("three denials recorded", || denials().len() >= 3).await;
    assert_eq!(denied(), before + 3);
    let denials = denials();
    let agent = "spiffe://tessera.internal/agents/a";
    for what in ["actor_token", "/introspect", "/revoke"] {
        assert!(
            denials
                .iter()
                .any(|e| e["actor"]["presented_token_of"] == agent
                    && e["spiffe_id"] == agent
                    && e["reason"].as_str().is_some_and(|r| r.contains(what))),
            "{what}: {denials:?}"
        );
    }
    assert_eq!(denials.len(), 3, "junk is not recorded: {denials:?}");
}

/// Revokes the lease of `token` (its `jti`) as an operator would.
fn revoke_token_lease(d: &Daemon, token: &str) {
    let claims: Value =
        serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let jti = claims["jti"].as_str().unwrap();
    let o = d.cli(&["lease", "revoke", jti, "--reason", "leaked"]);
    assert!(o.status.success(), "{o:?}");
}

fn task_records(d: &Daemon) -> u64 {
    let (code, body) = http_get(d.http, "/metrics");
    assert_eq!(code, 200);
    common::metric(&String::from_utf8(body).unwrap(), "tessera_tasks")
}

#[tokio::test(flavor = "multi_thread")]
async fn task_records_are_forgotten_after_retention_while_no_credential_exists() {
    let idp = Idp::start().await;
    let d = daemon(&idp, POLICY, "", "[tasks]\nretention = \"3s\"");
    let actor_a = actor_token(&d, "a").await;
    let subject = idp.token("frank");
    // "short": a 1-second token that expires. "live": a 5-minute token. "revoked": a 5-minute
    // token revoked by completing the task; revoked, it still exists until it expires.
    for (task, expires_in) in [("short", "1"), ("live", "300"), ("revoked", "300")] {
        let mut f = base_fields(&subject, &actor_a, task, "tickets:read");
        f.push(("expires_in", expires_in));
        let (code, r) = exchange(&d, &f);
        assert_eq!(code, 200, "{r}");
    }
    assert_eq!(task_records(&d), 3);
    assert_eq!(cli_json(&d, &["task", "complete", "revoked"])["revoked"], 1);

    // Once 3 s old, the task whose only token expired is forgotten; the other two stay a's
    // however old they are.
    eventually("the expired task's record to be forgotten", || {
        task_records(&d) == 2
    })
    .await;
    assert!(
        d.log_text()
            .contains("task records past retention forgotten")
    );
    // The completed task is remembered while its revoked token exists.
    let (_, r) = exchange(
        &d,
        &base_fields(&subject, &actor_a, "revoked", "tickets:read"),
    );
    assert_refused(&r, "complete");

    // The store forgot it too: after kill -9 there are the same two records.
    let d = crash_and_restart(d);
    assert_eq!(task_records(&d), 2);
    let actor_a = actor_token(&d, "a").await;
    let (_, r) = exchange(
        &d,
        &base_fields(&subject, &actor_a, "revoked", "tickets:read"),
    );
    assert_refused(&r, "complete");
    let (code, r) = exchange(&d, &base_fields(&subject, &actor_a, "live", "tickets:read"));
    assert_eq!(code, 200, "{r}");
}
