//! Fuzz harnesses: one function per untrusted-input surface, shared by the `cargo fuzz`
//! targets in `fuzz/` and by the corpus replay test (`tests/fuzz_corpus.rs`), so every input
//! the fuzzer ever kept is re-checked by `cargo test` on stable Rust.
//!
//! Each harness must not panic on any input; where a parser accepts an input, it also checks
//! what must then hold (round trips, bounds), so a silent mis-parse fails too.

use std::path::Path;

use prost::Message;
use serde_json::Value;

use crate::attest::Selector;
use crate::config::Config;
use crate::exchange::{self, Request};
use crate::jose::{self, Jwk};
use crate::proto::tessera::v1 as tpb;
use crate::proto::workload as wpb;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// SPIFFE IDs, trust domains and selectors: accepted values re-parse to themselves.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        let again = SpiffeId::parse(id.as_str()).expect("a parsed SPIFFE ID re-parses");
        assert_eq!(again, id);
        assert!(
            id.as_str().len() <= 2048,
            "SPIFFE IDs are at most 2048 bytes"
        );
        assert!(id.as_str().starts_with("spiffe://"));
    }
    if let Ok(td) = TrustDomain::parse(s) {
        assert_eq!(TrustDomain::parse(td.as_str()).expect("re-parses"), td);
    }
    if let Ok(sel) = Selector::parse(s) {
        let again = Selector::parse(&sel.to_string()).expect("a parsed selector re-parses");
        assert_eq!(again, sel);
    }
}

/// The config file: any text gives a config or an error naming the problem.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::from_toml(s, Path::new("fuzz.toml")) {
        assert!(!e.to_string().is_empty());
    }
}

/// JWS/JWT structure, algorithm and header checks, JWK and JWKS parsing, and verification
/// with a fixed key (which no fuzzed input can satisfy).
pub fn jwt(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(jws) = jose::decode(s) {
        assert!(s.len() <= jose::MAX_TOKEN_LEN);
        assert!(!matches!(
            jws.alg.as_str(),
            "none" | "HS256" | "HS384" | "HS512"
        ));
        let key = Jwk {
            kid: "fuzz".into(),
            key: jose::PublicKey::P256(fixed_p256_point()),
            alg: None,
        };
        assert!(
            key.verify(jws.alg, jws.signing_input.as_bytes(), &jws.signature)
                .is_err(),
            "a fuzzed token cannot carry a valid signature of a fixed key"
        );
    }
    if let Ok(v) = serde_json::from_str::<Value>(s) {
        if let Some(k) = Jwk::from_json(&v) {
            let _ = Jwk::thumbprint(&k.key);
        }
        if let Ok(keys) = crate::oidc::parse_jwks(&v) {
            assert!(keys.len() <= v["keys"].as_array().map_or(0, Vec::len));
        }
    }
}

/// A P-256 public point (the generator), valid for verification calls.
fn fixed_p256_point() -> Vec<u8> {
    let mut p = vec![4u8];
    p.extend_from_slice(&[
        0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
        0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98,
        0xc2, 0x96,
    ]);
    p.extend_from_slice(&[
        0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e,
        0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf,
        0x51, 0xf5,
    ]);
    p
}

/// The HTTP token-exchange form: decoding, then the request checks. What passes must be a
/// request Tessera can issue for.
pub fn token_exchange_form(data: &[u8]) {
    let Ok(form) = crate::api::http::parse_form_body(data) else {
        return;
    };
    let f = |k: &str| form.get(k).and_then(Value::as_str).map(str::to_owned);
    let req = Request {
        subject_token: f("subject_token"),
        subject_token_type: f("subject_token_type"),
        audience: f("audience"),
        scope: f("scope"),
        task_id: f("task_id"),
        expires_in: f("expires_in"),
        requested_token_type: f("requested_token_type"),
        x509: false,
    };
    check_exchange(req);
}

fn check_exchange(req: Request) {
    if let Ok(c) = exchange::check_request(req) {
        exchange::validate_task_id(&c.task_id).expect("an accepted task id is valid");
        assert!(!c.scopes.is_empty() && c.scopes.len() <= 32);
        let joined = c.scopes.join(" ");
        assert_eq!(
            exchange::parse_scopes(&joined).expect("accepted scopes re-parse"),
            c.scopes
        );
        assert!(!c.audience.is_empty() && !c.audience.chars().any(char::is_control));
        assert!(!c.subject_token.is_empty());
        // The task X.509-SVID's ID is always valid for an accepted task id.
        let agent = SpiffeId::parse("spiffe://fuzz.example/agent").expect("static ID");
        crate::issuer::task::task_spiffe_id(&agent, &c.task_id)
            .expect("an accepted task id makes a valid SPIFFE ID");
    }
}

/// Workload API and `tessera.v1.Tasks` request messages as they arrive on the socket:
/// protobuf decoding, then the request checks that run before any credential work.
pub fn workload_request(data: &[u8]) {
    if let Ok(r) = wpb::JwtsvidRequest::decode(data) {
        let requested = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
        if let Ok(Some(id)) = crate::issuer::check_jwt_request(&r.audience, requested) {
            assert_eq!(id.as_str(), r.spiffe_id);
        }
    }
    if let Ok(r) = wpb::ValidateJwtsvidRequest::decode(data) {
        let _ = jose::decode(&r.svid);
    }
    if let Ok(r) = tpb::ExchangeRequest::decode(data)
        && let Ok(req) = crate::api::tasks::request_from_pb(r)
    {
        check_exchange(req);
    }
}

/// The HTTP/2 `:authority` rewriter ([`crate::api::authority`]) on any client bytes after the
/// preface: cut into pieces of any size, they give the same output and the same outcome; a
/// connection it lets through reaches the server byte for byte.
pub fn http2_authority(data: &[u8]) {
    use crate::api::authority::AuthorityFix;
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(rest);
    let run = |step: usize| {
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        let mut failed = None;
        let mut all = Vec::new();
        'feed: for mut piece in input.chunks(step) {
            while !piece.is_empty() {
                match fix.process(piece, &mut out) {
                    Ok(n) => piece = &piece[n..],
                    Err(e) => {
                        failed = Some(e.kind());
                        break 'feed;
                    }
                }
                // What one call leaves for the server stays bounded.
                assert!(out.len() <= 256 * 1024, "{} bytes waiting", out.len());
                all.append(&mut out);
            }
        }
        all.append(&mut out);
        (all, failed, fix.passthrough())
    };
    let whole = run(input.len());
    assert_eq!(run(usize::from(cut).max(1)), whole);
    if whole.2 {
        assert_eq!(whole.0, input, "a connection let through is changed");
    }
}
