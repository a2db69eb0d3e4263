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

/// SPIFFE IDs, trust domains and selectors. Acceptance is compared with the SPIFFE-ID
/// standard's grammar written out apart from the parser ([`is_spiffe_id`]); an accepted ID's
/// parts rebuild it; `within` is compared with its meaning (the same trust domain, and the
/// other's path segments a prefix of this one's) on the input split at its first newline; an
/// accepted selector is already in the form it prints as (hashes in lower case).
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = SpiffeId::parse(s);
    assert_eq!(
        parsed.is_ok(),
        is_spiffe_id(s.as_bytes()),
        "{s:?}: {parsed:?}"
    );
    if let Ok(id) = parsed {
        assert_eq!(id.as_str(), s);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
            s
        );
        assert!(id.path().is_empty() || id.path().starts_with('/'));
        assert_eq!(
            SpiffeId::new(&id.trust_domain(), id.path()).as_ref(),
            Ok(&id)
        );
        let own = SpiffeId::parse(&id.trust_domain().id_string()).expect("a trust domain's ID");
        assert!(id.is_within(&id) && id.is_within(&own));
    }
    let name = s.strip_prefix("spiffe://").unwrap_or(s);
    let td = TrustDomain::parse(s);
    assert_eq!(td.is_ok(), is_trust_domain_name(name.as_bytes()), "{s:?}");
    if let Ok(td) = td {
        assert_eq!(td.as_str(), name);
    }
    if let Some((a, b)) = s.split_once('\n')
        && let (Ok(a), Ok(b)) = (SpiffeId::parse(a), SpiffeId::parse(b))
    {
        let segments = |id: &SpiffeId| {
            id.path()
                .split('/')
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let meant = a.trust_domain_name() == b.trust_domain_name()
            && segments(&a).starts_with(&segments(&b));
        assert_eq!(a.is_within(&b), meant, "{a} within {b}");
        assert_eq!(crate::spiffe_id::within(a.as_str(), b.as_str()), meant);
    }
    if let Ok(sel) = Selector::parse(s) {
        let printed = sel.to_string();
        match sel {
            Selector::Sha256(_) => assert_eq!(printed, s.to_ascii_lowercase()),
            _ => assert_eq!(
                printed, s,
                "a selector is accepted only in its printed form"
            ),
        }
        let again = Selector::parse(&printed).expect("a parsed selector re-parses");
        assert_eq!(again, sel);
    }
}

/// The SPIFFE-ID standard's grammar (§2.1, §2.2, §2.3), written apart from [`SpiffeId::parse`]
/// to check it: `spiffe://`, a trust domain name, then segments of `/` and one or more of
/// `[A-Za-z0-9._-]`, none `.` or `..`; at most 2048 bytes in all.
fn is_spiffe_id(s: &[u8]) -> bool {
    let Some(rest) = s.strip_prefix(b"spiffe://") else {
        return false;
    };
    let mut segments = rest.split(|&b| b == b'/');
    let name = segments.next().unwrap_or_default();
    s.len() <= 2048
        && is_trust_domain_name(name)
        && segments.all(|seg| {
            !seg.is_empty()
                && seg != b"."
                && seg != b".."
                && seg
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
        })
}

/// A trust domain name: 1 to 255 bytes of `[a-z0-9._-]`.
fn is_trust_domain_name(s: &[u8]) -> bool {
    (1..=255).contains(&s.len())
        && s.iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

/// The config file: any text gives a config or an error naming the problem, and a config
/// accepted holds to the rules its checks promise.
pub fn config(data: &[u8]) {
    use crate::config as c;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match Config::from_toml(s, Path::new("fuzz.toml")) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_ne!(cfg.workload_socket, cfg.admin_socket);
    let svid_ttls = c::MIN_SVID_TTL..=std::time::Duration::from_secs(30 * 24 * 3600);
    assert!(svid_ttls.contains(&cfg.x509_svid_ttl) && svid_ttls.contains(&cfg.jwt_svid_ttl));
    assert!(cfg.crl_update_splay <= c::MAX_CRL_UPDATE_SPLAY);
    for e in &cfg.entries {
        assert_eq!(e.spiffe_id.trust_domain_name(), cfg.trust_domain.as_str());
        assert!(!e.selectors.is_empty(), "an entry selecting every caller");
        assert!(e.hint.as_ref().is_none_or(|h| h.len() <= c::MAX_HINT_BYTES));
        for ttl in [e.x509_svid_ttl, e.jwt_svid_ttl].into_iter().flatten() {
            assert!(svid_ttls.contains(&ttl));
        }
    }
    for i in &cfg.oidc_issuers {
        assert!(!i.audiences.is_empty() && i.audiences.iter().all(|a| !a.is_empty()));
    }
}

/// JWS/JWT structure, algorithm and header checks, JWK and JWKS parsing, and verification
/// with a key made when the harness starts (which no fuzzed input can satisfy).
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
            key: fuzz_keys().public[3].clone(),
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

/// The HTTP token-exchange form: decoding, then the request checks. What passes must be a
/// request Tessera can issue for.
pub fn token_exchange_form(data: &[u8]) {
    let Ok(form) = crate::api::http::parse_form_body(data) else {
        return;
    };
    // What the parser keeps: no empty value (RFC 6749 §3.2), and written out again as a form
    // it reads back the same.
    assert!(
        form.values()
            .all(|v| v.as_str().is_some_and(|s| !s.is_empty()))
    );
    let mut again = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in &form {
        again.append_pair(k, v.as_str().unwrap_or_default());
    }
    assert_eq!(
        crate::api::http::parse_form_body(again.finish().as_bytes()).as_ref(),
        Ok(&form)
    );
    match crate::api::http::exchange_from_form(&form) {
        Ok((req, actor, _)) => {
            assert_eq!(
                form.get("grant_type").and_then(Value::as_str),
                Some(exchange::GRANT_TYPE)
            );
            assert!(!form.contains_key("resource"));
            // Tokens lose the whitespace around them, and nothing else.
            let trimmed = |k: &str| {
                form.get(k)
                    .and_then(Value::as_str)
                    .map(|v| v.trim_matches(|c: char| c.is_ascii_whitespace()).to_owned())
            };
            assert_eq!(req.subject_token, trimmed("subject_token"));
            assert_eq!(actor, trimmed("actor_token").unwrap_or_default());
            check_exchange(req);
        }
        Err(r) => assert!(!r.description.is_empty()),
    }
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
    if let Ok(r) = wpb::ValidateJwtsvidRequest::decode(data)
        && crate::api::workload::check_validate_request(&r).is_ok()
    {
        // The handler's checks past its own fields, up to the signature (no fuzzed token
        // carries one by these keys: `jwt_validate` signs its own to go further).
        let keys = fuzz_keys();
        let now = time::OffsetDateTime::from_unix_timestamp(FUZZ_NOW).expect("a fixed time");
        let r = crate::ca::validate_jwt_svid(
            &keys.trust_domain,
            &keys.svid_keys,
            &r.svid,
            &r.audience,
            now,
        );
        assert!(r.is_err(), "a token no key here signed is accepted");
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

/// `now` of [`jwt_validate`] before the input's offset: tokens in the corpus are dated
/// around it.
pub const FUZZ_NOW: i64 = 1_800_000_000;

/// Keys the [`jwt_validate`] harness signs with, and the key sets it validates against.
struct FuzzKeys {
    rng: ring::rand::SystemRandom,
    p256: ring::signature::EcdsaKeyPair,
    p384: ring::signature::EcdsaKeyPair,
    rsa: ring::signature::RsaKeyPair,
    /// In no key set.
    stranger: ring::signature::EcdsaKeyPair,
    /// Public keys of the four, in that order.
    public: [jose::PublicKey; 4],
    trust_domain: TrustDomain,
    /// JWT-SVID authorities: P-256 `a`, P-384 `b`, RSA `r` (for RS256 only).
    svid_keys: Vec<Jwk>,
    issuer: crate::config::OidcIssuerConfig,
    /// The OIDC issuer's JWKS: the P-256 and the RSA key share `k1` (RFC 7517 §4.5), the P-384
    /// key is `k2` for ES384 only, and `k3` is the P-256 key published for RS256, which no
    /// token can satisfy.
    oidc_keys: Vec<Jwk>,
}

fn fuzz_keys() -> &'static FuzzKeys {
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        RsaKeyPair,
    };
    static KEYS: std::sync::OnceLock<FuzzKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let ec = |alg| {
            let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key generation");
            EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).expect("a key just made")
        };
        let p256 = ec(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let p384 = ec(&ECDSA_P384_SHA384_FIXED_SIGNING);
        let stranger = ec(&ECDSA_P256_SHA256_FIXED_SIGNING);
        // ring makes no RSA keys: a fixed one, made for the fuzzer with openssl (not a secret).
        let rsa = RsaKeyPair::from_der(include_bytes!("../fuzz/keys/rsa-2048.der"))
            .expect("the fuzzer's RSA key");
        let rsa_public: ring::rsa::PublicKeyComponents<Vec<u8>> = rsa.public().into();
        let public = [
            jose::PublicKey::P256(p256.public_key().as_ref().to_vec()),
            jose::PublicKey::P384(p384.public_key().as_ref().to_vec()),
            jose::PublicKey::Rsa {
                n: rsa_public.n,
                e: rsa_public.e,
            },
            jose::PublicKey::P256(stranger.public_key().as_ref().to_vec()),
        ];
        let jwk = |kid: &str, i: usize, alg: Option<jose::Alg>| Jwk {
            kid: kid.into(),
            key: public[i].clone(),
            alg,
        };
        let svid_keys = vec![
            jwk("a", 0, None),
            jwk("b", 1, None),
            jwk("r", 2, Some(jose::Alg::Rs256)),
        ];
        let oidc_keys = vec![
            jwk("k1", 0, None),
            jwk("k1", 2, None),
            jwk("k2", 1, Some(jose::Alg::Es384)),
            jwk("k3", 0, Some(jose::Alg::Rs256)),
        ];
        FuzzKeys {
            rng,
            p256,
            p384,
            rsa,
            stranger,
            public,
            trust_domain: TrustDomain::parse("fuzz.example").expect("static"),
            svid_keys,
            issuer: crate::config::OidcIssuerConfig {
                issuer: "https://idp.fuzz.example".into(),
                audiences: vec!["tessera".into(), "other".into()],
                keys: crate::config::KeySource::Discovery,
            },
            oidc_keys,
        }
    })
}

impl FuzzKeys {
    /// A signature of `input` by key `signer` (0 to 3); an RSA key pads as `alg` says (the
    /// header's, whatever it is).
    fn sign(&self, signer: u8, alg: Option<&str>, input: &[u8]) -> Vec<u8> {
        use ring::signature as sig;
        let ec = |k: &sig::EcdsaKeyPair| {
            k.sign(&self.rng, input)
                .expect("ECDSA signing")
                .as_ref()
                .to_vec()
        };
        match signer {
            0 => ec(&self.p256),
            1 => ec(&self.p384),
            2 => {
                let pad: &'static dyn sig::RsaEncoding = match alg {
                    Some("RS384") => &sig::RSA_PKCS1_SHA384,
                    Some("RS512") => &sig::RSA_PKCS1_SHA512,
                    Some("PS256") => &sig::RSA_PSS_SHA256,
                    Some("PS384") => &sig::RSA_PSS_SHA384,
                    Some("PS512") => &sig::RSA_PSS_SHA512,
                    _ => &sig::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(pad, &self.rng, input, &mut out)
                    .expect("RSA signing");
                out
            }
            _ => ec(&self.stranger),
        }
    }
}

/// Whether a signature by key `signer` can be a valid one under the header's `alg`.
fn alg_fits(signer: u8, alg: &str) -> bool {
    match signer {
        0 => alg == "ES256",
        1 => alg == "ES384",
        2 => matches!(
            alg,
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512"
        ),
        _ => false,
    }
}

/// JWT validation as `ValidateJWTSVID` (and actor tokens) and token exchange's subject tokens
/// run it, on tokens the harness signs: the input chooses the header, the claims, the
/// audience asked for, the clock, the signing key (one of the key set's, or a stranger's) and
/// whether the signature is kept, has a bit flipped or is replaced by input bytes. So the
/// checks past the signature are reached, and whatever is accepted is checked against the
/// standards' rules, read here from the input itself:
/// - only a genuine signature by a key of the set, under the `kid` the token names and an
///   `alg` that key allows, is accepted;
/// - a JWT-SVID: `sub` a SPIFFE ID of the trust domain, `aud` the audience or a non-empty list
///   of strings holding it, `exp` after now, `nbf` (if any) at most 30 s ahead;
/// - a subject token: its issuer's `iss`, every `aud` one of the issuer's audiences, `exp` no
///   more than 30 s past, `nbf` and `iat` no more than 30 s ahead, a `sub` of 1 to 1024
///   characters with no control character.
///
/// Input: mode byte (signature kept / a bit flipped, chosen by the fourth text part / replaced
/// by the fourth text part / a byte appended / its last byte cut), signer byte, 4 bytes of
/// clock offset (i32, little-endian, from [`FUZZ_NOW`]), then UTF-8: header JSON, claims
/// JSON, audience and a fourth part, separated by newlines.
pub fn jwt_validate(data: &[u8]) -> Accepted {
    let mut accepted = Accepted::default();
    let [mode, signer, a, b, c, d, rest @ ..] = data else {
        return accepted;
    };
    let (mode, signer) = (mode % 5, signer % 4);
    let now = FUZZ_NOW + i64::from(i32::from_le_bytes([*a, *b, *c, *d]));
    let Ok(text) = std::str::from_utf8(rest) else {
        return accepted;
    };
    let mut parts = text.splitn(4, '\n');
    let mut part = || parts.next().unwrap_or("");
    let (header, claims, audience, replacement) = (part(), part(), part(), part());
    let header_json: Option<serde_json::Map<String, Value>> = serde_json::from_str(header).ok();
    let alg = header_json
        .as_ref()
        .and_then(|h| h.get("alg"))
        .and_then(Value::as_str);
    let keys = fuzz_keys();
    let input = format!(
        "{}.{}",
        jose::b64_encode(header.as_bytes()),
        jose::b64_encode(claims.as_bytes())
    );
    let mut signature = match mode {
        2 => replacement.as_bytes().to_vec(),
        _ => keys.sign(signer, alg, input.as_bytes()),
    };
    match mode {
        1 => {
            let pick = replacement.bytes().fold(0usize, |a, b| {
                a.wrapping_mul(257).wrapping_add(usize::from(b))
            });
            let bit = pick % (signature.len() * 8);
            signature[bit / 8] ^= 1 << (bit % 8);
        }
        3 => signature.push(0),
        4 => {
            signature.pop();
        }
        _ => {}
    }
    let token = format!("{input}.{}", jose::b64_encode(&signature));
    let genuine = mode == 0 && signer < 3;

    // Explicit typing (RFC 8725 §3.11) keeps Tessera's task tokens, signed by the same key,
    // from passing as JWT-SVIDs: `decode` takes `typ` JWT or JOSE only, `decode_own` also
    // access tokens', and neither a `crit` header.
    let plain = jose::decode(&token).is_ok();
    let own = jose::decode_own(&token).is_ok();
    let typ = header_json.as_ref().and_then(|h| h.get("typ"));
    let typ_str = typ.and_then(Value::as_str);
    let svid_typ = typ.is_none() || matches!(typ_str, Some("JWT" | "JOSE"));
    let access_typ = typ_str.is_some_and(|t| {
        t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
    });
    let crit = header_json.as_ref().is_some_and(|h| h.contains_key("crit"));
    assert!(!plain || own, "decode accepts what decode_own refuses");
    assert!(
        !plain || (svid_typ && !crit),
        "decode took typ {typ:?} or crit"
    );
    assert!(
        !own || ((svid_typ || access_typ) && !crit),
        "decode_own took typ {typ:?} or crit"
    );
    assert!(
        !own || plain || access_typ,
        "only an access token's typ tells the two apart"
    );

    // Whatever is accepted was signed by a key of `set` under the kid and alg it claims.
    let signed_as_claimed = |set: &[Jwk]| {
        let h = header_json.as_ref().expect("an accepted header is JSON");
        let alg = h
            .get("alg")
            .and_then(Value::as_str)
            .expect("alg is a string");
        let kid = h.get("kid").map(|k| k.as_str().expect("kid is a string"));
        assert!(genuine, "accepted with a signature that is not the key's");
        assert!(alg_fits(signer, alg), "accepted {alg} from key {signer}");
        assert!(
            set.iter().any(|j| kid.is_none_or(|k| j.kid == k)
                && j.key == keys.public[usize::from(signer)]
                && j.alg.is_none_or(|a| a.as_str() == alg)),
            "accepted under kid {kid:?} and {alg} from a key the set does not have so"
        );
    };
    let claims_json = || -> serde_json::Map<String, Value> {
        serde_json::from_str(claims).expect("accepted claims are a JSON object")
    };

    let at = time::OffsetDateTime::from_unix_timestamp(now).expect("a time near 2027");
    if let Ok((id, out)) =
        crate::ca::validate_jwt_svid(&keys.trust_domain, &keys.svid_keys, &token, audience, at)
    {
        accepted.jwt_svid = true;
        signed_as_claimed(&keys.svid_keys);
        assert!(
            header_json.as_ref().is_some_and(|h| h.contains_key("kid")),
            "a JWT-SVID needs a kid"
        );
        assert!(svid_typ && !crit, "a JWT-SVID with typ {typ:?} or crit");
        let c = claims_json();
        assert_eq!(out, c);
        assert_eq!(c.get("sub").and_then(Value::as_str), Some(id.as_str()));
        assert_eq!(id.trust_domain_name(), keys.trust_domain.as_str());
        // NumericDate (RFC 7519 §2): any JSON number, fractions included.
        let exp = c
            .get("exp")
            .and_then(Value::as_f64)
            .expect("exp is a number");
        assert!((now as f64) < exp, "accepted at {now}, expired at {exp}");
        if let Some(nbf) = c.get("nbf") {
            let nbf = nbf.as_f64().expect("nbf is a number");
            let latest = (now + crate::ca::NBF_LEEWAY_SECS) as f64;
            assert!(nbf <= latest, "nbf {nbf} at {now}");
        }
        match c.get("aud") {
            Some(Value::String(a)) => assert_eq!(a, audience),
            Some(Value::Array(list)) => {
                assert!(!list.is_empty() && list.iter().all(Value::is_string));
                assert!(list.iter().any(|a| a.as_str() == Some(audience)));
            }
            other => panic!("accepted with aud {other:?}"),
        }
    }

    if let Ok(subject) = crate::oidc::validate_with_keys(&token, &keys.issuer, &keys.oidc_keys, now)
    {
        accepted.subject_token = true;
        signed_as_claimed(&keys.oidc_keys);
        let c = claims_json();
        assert_eq!(
            c.get("iss").and_then(Value::as_str),
            Some(keys.issuer.issuer.as_str())
        );
        assert!(!crit, "a subject token with crit");
        // NumericDate (RFC 7519 §2): any JSON number, fractions included.
        let time = |k: &str| {
            c.get(k)
                .map(|v| v.as_f64().unwrap_or_else(|| panic!("{k} is a number")))
        };
        let (now_f, leeway) = (now as f64, crate::oidc::LEEWAY_S as f64);
        let exp = time("exp").expect("exp is required");
        assert!(now_f <= exp + leeway, "expired at {exp}, now {now}");
        // The lifetime the token lends a task credential: its own, in whole seconds.
        if exp.abs() < 9.0e18 {
            assert_eq!(subject.exp, exp.floor() as i64, "exp {exp}");
        }
        for k in ["nbf", "iat"] {
            assert!(
                time(k).is_none_or(|t| t <= now_f + leeway),
                "{k} ahead of {now}"
            );
        }
        let trusted = |a: &Value| {
            a.as_str()
                .is_some_and(|a| keys.issuer.audiences.iter().any(|x| x == a))
        };
        match c.get("aud") {
            Some(a @ Value::String(_)) => assert!(trusted(a)),
            Some(Value::Array(list)) => assert!(!list.is_empty() && list.iter().all(trusted)),
            other => panic!("accepted with aud {other:?}"),
        }
        let sub = c
            .get("sub")
            .and_then(Value::as_str)
            .expect("sub is a string");
        assert_eq!(subject.sub, sub);
        assert!(!sub.is_empty() && sub.len() <= crate::oidc::MAX_SUB_LEN);
        assert!(!sub.chars().any(char::is_control));
    }
    accepted
}

/// What [`jwt_validate`] saw accepted: the replay test checks that its corpus reaches past
/// the signature.
#[derive(Debug, Default, Clone, Copy)]
pub struct Accepted {
    /// As a JWT-SVID.
    pub jwt_svid: bool,
    /// As a subject token.
    pub subject_token: bool,
}
