//! Trusted OIDC issuers: validation of the subject tokens agents exchange.
//!
//! Owns: each configured issuer's signing keys (from discovery, a `jwks_uri` or a local
//! `jwks_file`), their refresh (at start, periodically, and on an unknown `kid` with a rate
//! limit), and token validation: allowed algorithm (never `none` or HS*), signature, `iss`,
//! `aud`, `exp`, `nbf`, `iat` with a small leeway, and a `sub`.
//!
//! Keys are fetched over HTTPS only (plain HTTP only for loopback issuers), without following
//! redirects, with a size cap and a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde_json::{Map, Value};

use crate::config::{KeySource, OidcIssuerConfig, url_allowed};
use crate::jose::{self, JoseError, Jwk};

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_S: i64 = 30;
/// An unknown `kid` triggers at most one key fetch per issuer in this period.
const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Largest JWKS or discovery document accepted.
const MAX_DOC_BYTES: usize = 1 << 20;
/// Longest subject (`sub`) accepted in a subject token.
pub const MAX_SUB_LEN: usize = 1024;

/// Characters that change how the text around them is shown without showing themselves:
/// bidirectional controls (which can reorder what an approving operator reads), zero-width
/// and invisible format characters, line and paragraph separators, the soft hyphen, tag
/// characters and the byte-order mark.
pub(crate) fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{E0000}'..='\u{E007F}')
}
/// Validated tokens remembered (by SHA-256) so an agent reusing its user's token does not pay
/// for a signature check each time. Bounded; expiry is still checked on every use.
/// (10k tokens of at most 16 KiB of claims each bounds it at about 160 MiB.)
const CACHE_CAP: usize = 10_000;

/// Why a subject token was refused. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// Structure, algorithm or signature.
    #[error("{0}")]
    Jose(#[from] JoseError),
    /// `iss` is not a configured issuer.
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    /// A required claim is missing or has the wrong type.
    #[error("claim {0:?} is missing or not valid")]
    Claim(&'static str),
    /// Past `exp`.
    #[error("token has expired")]
    Expired,
    /// Before `nbf`, or `iat` in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `aud` has none of the configured audiences.
    #[error("token audience is not one Tessera accepts")]
    Audience,
    /// No key with that `kid` even after refetching the issuer's keys.
    #[error("no key with kid {0:?} among the issuer's keys")]
    UnknownKey(String),
    /// The issuer's keys could not be fetched.
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
}

/// A validated subject token.
#[derive(Debug, Clone)]
pub struct Subject {
    /// `iss`.
    pub iss: String,
    /// `sub`.
    pub sub: String,
    /// `exp`, Unix seconds.
    pub exp: i64,
    /// `iss`, `sub` and every other top-level string claim (for policy).
    pub string_claims: Vec<(String, String)>,
    /// The token's own `act` claim, to nest beneath ours.
    pub act: Option<Value>,
}

struct Trusted {
    cfg: OidcIssuerConfig,
    keys: ArcSwap<Vec<Jwk>>,
    /// Serializes fetches and remembers the last on-demand attempt (rate limit; scheduled
    /// refreshes do not count, so a key rotated in just after one is found at once) and
    /// why the last fetch failed, if it did.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    last_on_demand: Option<Instant>,
    failed: Option<String>,
}

/// The configured issuers.
pub struct Verifier {
    issuers: Vec<Arc<Trusted>>,
    http: reqwest::Client,
    cache: DashMap<[u8; 32], Cached>,
}

/// A validated subject token, with what verified it: it stays valid only while its issuer
/// still publishes that key (a key withdrawn after a compromise takes its tokens with it).
struct Cached {
    subject: Arc<Subject>,
    issuer: usize,
    key: Jwk,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "issuers",
                &self
                    .issuers
                    .iter()
                    .map(|t| &t.cfg.issuer)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn jwks_file_json(p: &std::path::Path, text: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(text).map_err(|e| format!("{}: not JSON ({e})", p.display()))
}

/// Reads a `jwks_file`: only one nobody but the daemon's user or root can change (whoever
/// could would sign subject tokens the daemon accepts; review AY-6), at most 1 MiB as a
/// fetched document.
fn read_jwks_file(p: &std::path::Path) -> Result<Vec<u8>, String> {
    crate::fsutil::read_trusted_file(p, MAX_DOC_BYTES as u64, "jwks_file")
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Reads a `jwks_file` as the daemon does: what `tesserad --check-config` runs.
pub fn check_jwks_file(p: &std::path::Path) -> Result<usize, String> {
    let text = read_jwks_file(p)?;
    parse_jwks(&jwks_file_json(p, &text)?)
        .map(|keys| keys.len())
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Parses a JWKS document. Keys without a `kid` get their RFC 7638 thumbprint; encryption
/// keys and key types we cannot verify with are skipped.
pub fn parse_jwks(doc: &Value) -> Result<Vec<Jwk>, String> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS document (no \"keys\" array)")?;
    let mut out = Vec::new();
    for k in keys {
        // RFC 7517 §4.2/§4.3: a key for something other than verifying signatures is not
        // one to verify with.
        if k.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
            || k.get("key_ops").is_some_and(|ops| {
                !ops.as_array()
                    .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")))
            })
        {
            continue;
        }
        let mut k = k.clone();
        if k.get("kid").is_none()
            && let Some(obj) = k.as_object_mut()
        {
            obj.insert("kid".into(), "".into());
            if let Some(j) = Jwk::from_json(&Value::Object(obj.clone())) {
                obj.insert("kid".into(), Jwk::thumbprint(&j.key).into());
            }
        }
        if let Some(j) = Jwk::from_json(&k) {
            out.push(j);
        }
    }
    Ok(out)
}

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Verifier {
    /// Builds the verifier; keys are not fetched yet (see [`Verifier::refresh_all`]).
    pub fn new(issuers: &[OidcIssuerConfig]) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .user_agent(concat!("tesserad/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with static settings");
        Self {
            issuers: issuers
                .iter()
                .map(|c| {
                    Arc::new(Trusted {
                        cfg: c.clone(),
                        keys: ArcSwap::from_pointee(Vec::new()),
                        fetch: tokio::sync::Mutex::new(FetchState::default()),
                    })
                })
                .collect(),
            http,
            cache: DashMap::new(),
        }
    }

    /// True when no issuer is configured (every exchange fails).
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Fetches every issuer's keys. Failures are returned per issuer (and logged by the
    /// caller); an issuer whose keys are unavailable is retried on its next token.
    pub async fn refresh_all(&self) -> Vec<(String, Result<usize, String>)> {
        let mut out = Vec::new();
        for t in &self.issuers {
            // Forced, so never held back.
            let r = self.refresh(t, true).await.map(|n| n.unwrap_or_default());
            out.push((t.cfg.issuer.clone(), r));
        }
        out
    }

    /// Fetches `t`'s keys and returns how many; on demand (`!force`) at most once per
    /// [`MIN_REFETCH`], answering in between with the last fetch's outcome (so while the
    /// issuer is down every request learns it is, not only the one that tried): `Ok(None)`
    /// when that fetch succeeded, as nothing was fetched now.
    async fn refresh(&self, t: &Trusted, force: bool) -> Result<Option<usize>, String> {
        let mut st = t.fetch.lock().await;
        if !force {
            if st
                .last_on_demand
                .is_some_and(|at| at.elapsed() < MIN_REFETCH)
            {
                return match &st.failed {
                    Some(e) => Err(e.clone()),
                    None => Ok(None),
                };
            }
            st.last_on_demand = Some(Instant::now());
        }
        match self.fetch_keys(&t.cfg).await {
            Ok(keys) => {
                st.failed = None;
                let n = keys.len();
                t.keys.store(Arc::new(keys));
                Ok(Some(n))
            }
            Err(e) => {
                st.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        url_allowed(url)?;
        let resp = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_DOC_BYTES as u64)
        {
            return Err(format!("GET {url}: document larger than 1 MiB"));
        }
        // Read chunk by chunk: a chunked response has no length to check up front.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
            if body.len() + chunk.len() > MAX_DOC_BYTES {
                return Err(format!("GET {url}: document larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON ({e})"))
    }

    async fn fetch_keys(&self, cfg: &OidcIssuerConfig) -> Result<Vec<Jwk>, String> {
        let doc = match &cfg.keys {
            KeySource::JwksFile(p) => {
                let path = p.clone();
                let text = tokio::task::spawn_blocking(move || read_jwks_file(&path))
                    .await
                    .map_err(|e| format!("{}: {e}", p.display()))??;
                jwks_file_json(p, &text)?
            }
            KeySource::JwksUri(u) => self.get_json(u).await?,
            KeySource::Discovery => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    cfg.issuer.trim_end_matches('/')
                );
                let d = self.get_json(&url).await?;
                // OpenID Connect Discovery 1.0 §4.3: the document's issuer MUST be identical
                // to the issuer it was fetched for.
                if d.get("issuer").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
                    return Err(format!(
                        "{url}: \"issuer\" does not match {:?} exactly",
                        cfg.issuer
                    ));
                }
                let jwks = d
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{url}: no \"jwks_uri\""))?;
                crate::config::jwks_uri_allowed(&cfg.issuer, jwks)
                    .map_err(|e| format!("{url}: {e}"))?;
                self.get_json(jwks).await?
            }
        };
        parse_jwks(&doc)
    }

    /// Validates a subject token.
    pub async fn validate(&self, token: &str) -> Result<Arc<Subject>, OidcError> {
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = now_s();
        if let Some(c) = self.cache.get(&digest) {
            if now > c.subject.exp.saturating_add(LEEWAY_S) {
                return Err(OidcError::Expired);
            }
            if self.issuers[c.issuer].keys.load().contains(&c.key) {
                return Ok(Arc::clone(&c.subject));
            }
            // The key is gone from the issuer's set: validate again, which refuses the token
            // unless the key is back.
        }
        let (subject, issuer, key) = self.validate_uncached(token, now).await?;
        let subject = Arc::new(subject);
        if self.cache.len() >= CACHE_CAP {
            self.cache
                .retain(|_, c| c.subject.exp.saturating_add(LEEWAY_S) >= now);
            if self.cache.len() >= CACHE_CAP {
                self.cache.clear();
            }
        }
        self.cache.insert(
            digest,
            Cached {
                subject: Arc::clone(&subject),
                issuer,
                key,
            },
        );
        Ok(subject)
    }

    /// The subject, the index of its issuer and the key that verified it.
    async fn validate_uncached(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Subject, usize, Jwk), OidcError> {
        // ID tokens, other JWTs, and RFC 9068 JWT access tokens (`typ` at+jwt) alike: the
        // subject token is whatever the issuer signed for this user.
        let jws = jose::decode_own(token)?;
        let iss = issuer_claim(&jws)?;
        let (issuer, t) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, t)| t.cfg.issuer == iss)
            .ok_or_else(|| OidcError::UnknownIssuer(iss.chars().take(200).collect()))?;
        // Keys: the cached set, refetched (rate-limited) when the kid is unknown or no key
        // has been fetched yet.
        let mut keys = t.keys.load_full();
        let has_kid = |keys: &[Jwk]| match &jws.kid {
            Some(k) => keys.iter().any(|j| &j.kid == k),
            None => !keys.is_empty(),
        };
        if !has_kid(&keys) {
            let refreshed = self.refresh(t, false).await;
            keys = t.keys.load_full();
            // The key may be one the issuer rotated in: while its keys cannot be fetched the
            // token cannot be judged (503, retry), rather than refused as unknown (400). That
            // includes a fetch the rate limit held back (review AY-3): any caller's token with
            // a made-up kid would otherwise have every rotated-in key refused for good for the
            // rest of the window.
            if !has_kid(&keys) {
                match refreshed {
                    Err(e) => return Err(OidcError::KeysUnavailable(e)),
                    Ok(None) => {
                        return Err(OidcError::KeysUnavailable(format!(
                            "the issuer's keys were fetched less than {}s ago and do not hold \
                             this kid; retry shortly",
                            MIN_REFETCH.as_secs()
                        )));
                    }
                    Ok(Some(_)) => {}
                }
            }
        }
        let verified_by = match &jws.kid {
            Some(kid) => verify_by_kid(&jws, &keys, kid)?,
            None => {
                // No kid: some issuers publish one key. Try each that fits the algorithm,
                // and on no match the issuer's current set (it may have rotated); while
                // that cannot be fetched the token cannot be judged (503, as with a kid).
                match verify_by_any(&jws, &keys) {
                    Some(k) => k,
                    None => {
                        if let Err(e) = self.refresh(t, false).await {
                            return Err(OidcError::KeysUnavailable(e));
                        }
                        verify_by_any(&jws, &t.keys.load_full()).ok_or(JoseError::BadSignature)?
                    }
                }
            }
        };
        let subject = subject_of(&jws, iss, &t.cfg.audiences, now)?;
        Ok((subject, issuer, verified_by))
    }
}

/// Validates a subject token of the issuer `cfg` against its keys `keys` as they are, with
/// no fetch: the checks [`Verifier::validate`] makes once it has the keys (signature by the
/// key the `kid` names, or by any when there is none; times, audiences, `sub`). For offline
/// checks and the fuzzer.
pub fn validate_with_keys(
    token: &str,
    cfg: &OidcIssuerConfig,
    keys: &[Jwk],
    now: i64,
) -> Result<Subject, OidcError> {
    let jws = jose::decode_own(token)?;
    let iss = issuer_claim(&jws)?;
    if iss != cfg.issuer {
        return Err(OidcError::UnknownIssuer(iss.chars().take(200).collect()));
    }
    match &jws.kid {
        Some(kid) => verify_by_kid(&jws, keys, kid)?,
        None => verify_by_any(&jws, keys).ok_or(JoseError::BadSignature)?,
    };
    subject_of(&jws, iss, &cfg.audiences, now)
}

/// The `iss` claim, which must be a string.
fn issuer_claim(jws: &jose::Jws<'_>) -> Result<String, OidcError> {
    match jws.claims.get("iss") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(OidcError::Claim("iss")),
    }
}

/// The key named `kid` that verifies the token. RFC 7517 §4.5 lets keys of different types
/// share a kid (an RSA and an EC key of one rotation, say): each is tried. A bad signature by
/// a key that fits is what to report, not another key's type mismatch.
fn verify_by_kid(jws: &jose::Jws<'_>, keys: &[Jwk], kid: &str) -> Result<Jwk, OidcError> {
    let input = jws.signing_input.as_bytes();
    let mut first_err = None;
    let found = keys.iter().filter(|j| j.kid == kid).find(|key| {
        match key.verify(jws.alg, input, &jws.signature) {
            Ok(()) => true,
            Err(e) => {
                if first_err.is_none() || matches!(e, JoseError::BadSignature) {
                    first_err = Some(e);
                }
                false
            }
        }
    });
    match (found, first_err) {
        (Some(k), _) => Ok(k.clone()),
        (None, Some(e)) => Err(e.into()),
        (None, None) => Err(OidcError::UnknownKey(kid.chars().take(64).collect())),
    }
}

/// Any key that verifies a token with no `kid`.
fn verify_by_any(jws: &jose::Jws<'_>, keys: &[Jwk]) -> Option<Jwk> {
    let input = jws.signing_input.as_bytes();
    keys.iter()
        .find(|k| k.verify(jws.alg, input, &jws.signature).is_ok())
        .cloned()
}

/// The checks after the signature (times, audiences, `sub`), and the subject they leave.
fn subject_of(
    jws: &jose::Jws<'_>,
    iss: String,
    audiences: &[String],
    now: i64,
) -> Result<Subject, OidcError> {
    let exp = check_claims(&jws.claims, audiences, now)?;
    // Shown to approving operators and written to the audit log: no control characters
    // (a crafted sub could redraw the approval prompt), and a bounded length.
    let sub = match jws.claims.get("sub") {
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= MAX_SUB_LEN
                && !s.chars().any(|c| c.is_control() || is_invisible_format(c)) =>
        {
            s.clone()
        }
        _ => return Err(OidcError::Claim("sub")),
    };
    let mut string_claims: Vec<(String, String)> = jws
        .claims
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .filter(|(k, _)| k != "aud")
        .collect();
    // Booleans such as email_verified and numbers such as auth_time are useful in policy;
    // they reach it as strings ("true", "1700000000"), as the schema check requires.
    for (k, v) in &jws.claims {
        match v {
            Value::Bool(b) => string_claims.push((k.clone(), b.to_string())),
            Value::Number(n) => string_claims.push((k.clone(), n.to_string())),
            _ => {}
        }
    }
    Ok(Subject {
        iss,
        sub,
        exp,
        string_claims,
        act: jws.claims.get("act").cloned(),
    })
}

/// Time and audience checks (RFC 7519 §4.1, OIDC Core §3.1.3.7). Returns `exp`.
fn check_claims(
    claims: &Map<String, Value>,
    audiences: &[String],
    now: i64,
) -> Result<i64, OidcError> {
    // NumericDate (RFC 7519 §2) is any JSON number: compared as one, so that a fractional
    // `nbf` of now + 30.9 is not taken as now + 30. Timestamps are far below 2^53, where f64
    // holds every integer exactly.
    let num = |k: &'static str| -> Result<Option<f64>, OidcError> {
        match claims.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(OidcError::Claim(k)),
        }
    };
    let (now_f, leeway) = (now as f64, LEEWAY_S as f64);
    let exp = num("exp")?.ok_or(OidcError::Claim("exp"))?;
    if now_f > exp + leeway {
        return Err(OidcError::Expired);
    }
    if num("nbf")?.is_some_and(|nbf| nbf > now_f + leeway) {
        return Err(OidcError::NotYetValid);
    }
    if num("iat")?.is_some_and(|iat| iat > now_f + leeway) {
        return Err(OidcError::NotYetValid);
    }
    // Whole seconds, rounded down: a task credential never outlives the token.
    let exp = exp.floor() as i64;
    // OIDC Core §3.1.3.7 (3): Tessera must be an audience, and a token that also names
    // audiences Tessera does not trust is rejected.
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => audiences.contains(a),
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .all(|a| a.as_str().is_some_and(|a| audiences.iter().any(|x| x == a))),
        _ => return Err(OidcError::Claim("aud")),
    };
    if !ok {
        return Err(OidcError::Audience);
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn es256() -> jose::Es256Signer {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        jose::Es256Signer::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn jwks_of(signer: &jose::Es256Signer) -> String {
        let jwk = signer.jwk();
        let mut m = jwk.public_members();
        m.insert("kid".into(), jwk.kid.clone().into());
        json!({ "keys": [m] }).to_string()
    }

    #[tokio::test]
    async fn keys_sharing_a_kid_are_all_tried_and_a_held_back_fetch_is_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        let (a, b) = (es256(), es256());
        // RFC 7517 §4.5: two keys under one kid (b's), a's first (review AY-4).
        let member = |s: &jose::Es256Signer| {
            let mut m = s.jwk().public_members();
            m.insert("kid".into(), b.jwk().kid.clone().into());
            m
        };
        std::fs::write(
            &file,
            json!({ "keys": [member(&a), member(&b)] }).to_string(),
        )
        .unwrap();
        let v = Verifier::new(&[OidcIssuerConfig {
            issuer: "https://idp.example".into(),
            audiences: vec!["tessera".into()],
            keys: KeySource::JwksFile(file.clone()),
        }]);
        assert!(v.refresh_all().await[0].1.is_ok());
        let claims = json!({"iss": "https://idp.example", "sub": "alice", "aud": "tessera",
                            "exp": now_s() + 600});
        assert_eq!(
            v.validate(&b.sign(&claims).unwrap()).await.unwrap().sub,
            "alice"
        );
        // A token under a kid nobody publishes uses up the on-demand fetch (review AY-3) ...
        let junk = es256();
        assert!(matches!(
            v.validate(&junk.sign(&claims).unwrap()).await,
            Err(OidcError::UnknownKey(_))
        ));
        // ... so a key the issuer rotates in just after cannot be fetched yet: a retry, not a
        // refusal.
        let c = es256();
        std::fs::write(&file, jwks_of(&c)).unwrap();
        assert!(matches!(
            v.validate(&c.sign(&claims).unwrap()).await,
            Err(OidcError::KeysUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_cached_token_goes_with_its_withdrawn_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        let old = es256();
        std::fs::write(&file, jwks_of(&old)).unwrap();
        let v = Verifier::new(&[OidcIssuerConfig {
            issuer: "https://idp.example".into(),
            audiences: vec!["tessera".into()],
            keys: KeySource::JwksFile(file.clone()),
        }]);
        assert!(v.refresh_all().await[0].1.is_ok());
        // A key file others could write would let them sign any subject token (review AY-6):
        // neither fetched nor passed by --check-config.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = v.refresh_all().await.remove(0).1.unwrap_err();
        assert!(e.contains("not writable by"), "{e}");
        assert!(check_jwks_file(&file).is_err());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check_jwks_file(&file), Ok(1));
        let token = old
            .sign(
                &json!({"iss": "https://idp.example", "sub": "alice", "aud": "tessera",
                          "exp": now_s() + 600}),
            )
            .unwrap();
        assert_eq!(v.validate(&token).await.unwrap().sub, "alice");
        assert_eq!(v.validate(&token).await.unwrap().sub, "alice", "cached");
        // An issuer's RFC 9068 access token is a subject token too.
        let access = old
            .sign_access_token(&json!({"iss": "https://idp.example", "sub": "bob",
                                       "aud": "tessera", "exp": now_s() + 600}))
            .unwrap();
        assert_eq!(v.validate(&access).await.unwrap().sub, "bob");
        // Booleans and numbers reach policies as strings; objects and arrays do not.
        let claims = old
            .sign(
                &json!({"iss": "https://idp.example", "sub": "carol", "aud": "tessera",
                          "exp": now_s() + 600, "auth_time": 1_700_000_000,
                          "email_verified": true, "groups": ["a"], "addr": {"c": "d"}}),
            )
            .unwrap();
        let got = v.validate(&claims).await.unwrap().string_claims.clone();
        let get = |k: &str| got.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("auth_time"), Some("1700000000"));
        assert_eq!(get("email_verified"), Some("true"));
        assert_eq!(get("sub"), Some("carol"));
        assert_eq!((get("groups"), get("addr"), get("aud")), (None, None, None));
        // A subject that could redraw an operator's approval prompt is refused.
        for sub in [
            "bob\n1  ok  tickets:read".to_owned(),
            "\u{1b}[2K".into(),
            "b".repeat(1025),
            "bob\u{202E}daer:stekcit".into(),
        ] {
            let t = old
                .sign(
                    &json!({"iss": "https://idp.example", "sub": sub, "aud": "tessera",
                              "exp": now_s() + 600}),
                )
                .unwrap();
            assert!(
                matches!(v.validate(&t).await, Err(OidcError::Claim("sub"))),
                "{sub:?}"
            );
        }
        // The issuer withdraws the key (say, after a leak) and publishes another.
        std::fs::write(&file, jwks_of(&es256())).unwrap();
        assert!(v.refresh_all().await[0].1.is_ok());
        let e = v.validate(&token).await.unwrap_err();
        assert!(matches!(e, OidcError::UnknownKey(_)), "{e}");
    }

    #[test]
    fn claim_checks() {
        let aud = vec!["tessera".to_owned()];
        let now = 1_000_000;
        let ok = json!({"exp": now + 60, "aud": ["tessera"], "iat": now});
        assert_eq!(
            check_claims(ok.as_object().unwrap(), &aud, now),
            Ok(now + 60)
        );
        let fractional = json!({"exp": (now + 60) as f64 + 0.5, "aud": "tessera"});
        assert_eq!(
            check_claims(fractional.as_object().unwrap(), &aud, now),
            Ok(now + 60)
        );
        let cases = [
            (json!({"aud": "tessera"}), OidcError::Claim("exp")),
            (
                json!({"exp": now - 31, "aud": "tessera"}),
                OidcError::Expired,
            ),
            (
                json!({"exp": now + 60, "aud": "other"}),
                OidcError::Audience,
            ),
            (json!({"exp": now + 60}), OidcError::Claim("aud")),
            (
                json!({"exp": now + 60, "aud": "tessera", "nbf": now + 100}),
                OidcError::NotYetValid,
            ),
            (
                json!({"exp": now + 60, "aud": "tessera", "iat": now + 100}),
                OidcError::NotYetValid,
            ),
            (
                json!({"exp": "soon", "aud": "tessera"}),
                OidcError::Claim("exp"),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(
                check_claims(c.as_object().unwrap(), &aud, now),
                Err(want),
                "{c}"
            );
        }
        // Within the leeway.
        let skew = json!({"exp": now - 10, "aud": "tessera", "nbf": now + 10});
        check_claims(skew.as_object().unwrap(), &aud, now).unwrap();
        // The largest `exp` (or a huge float, saturated to it) is checked, not overflowed.
        for far in [json!(i64::MAX), json!(1e300)] {
            let c = json!({"exp": far, "aud": "tessera"});
            assert_eq!(
                check_claims(c.as_object().unwrap(), &aud, now),
                Ok(i64::MAX)
            );
        }
    }

    #[test]
    fn jwks_parsing_skips_encryption_keys_and_names_kidless_keys() {
        let doc = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "use": "enc", "kid": "e",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-256", "kid": "ops-enc", "key_ops": ["encrypt"],
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "ops-verify", "key_ops": ["verify"],
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]});
        let keys = parse_jwks(&doc).unwrap();
        assert_eq!(keys.len(), 2, "the unnamed key and the one for verifying");
        assert_eq!(keys[1].kid, "ops-verify");
        assert_eq!(keys[0].kid, Jwk::thumbprint(&keys[0].key));
        assert!(parse_jwks(&json!({"nokeys": []})).is_err());
    }
}
