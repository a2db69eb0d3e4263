//! HTTP endpoints on `[http] listen`: health, readiness, the SPIFFE trust bundle, the CRL
//! (DER), Prometheus metrics, and the OAuth side of task credentials: discovery (OIDC and
//! RFC 8414), Tessera's JWKS, the RFC 8693 token endpoint, RFC 7662 introspection and
//! RFC 7009 revocation.
//!
//! Owns only translation: form bodies ⇄ [`crate::exchange`] types, and exchange errors to
//! RFC 6749 §5.2 JSON errors. TLS (operator certificate or the daemon's own SVID) is set up
//! in [`tls`].

pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use crate::audit::Actor;
use crate::ca::Ca;
use crate::exchange::{self, ActorRef, ExchangeError, Exchanger};
use crate::issuer::IssueError;
use crate::lease::Kind;
use crate::lease::LeaseTable;
use crate::metrics::Metrics;

/// How often relying parties should refetch the bundle (`spiffe_refresh_hint`).
const REFRESH_HINT: Duration = Duration::from_secs(300);
/// Largest form body accepted (tokens are at most 16 KiB each).
const MAX_FORM_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct HttpState {
    ca: Arc<Ca>,
    ready: Arc<AtomicBool>,
    leases: Arc<LeaseTable>,
    metrics: Arc<Metrics>,
    exchanger: Arc<Exchanger>,
}

/// The router. `ready` turns true once the workload socket is serving.
pub fn router(
    ca: Arc<Ca>,
    ready: Arc<AtomicBool>,
    leases: Arc<LeaseTable>,
    metrics: Arc<Metrics>,
    exchanger: Arc<Exchanger>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/bundle", get(bundle))
        .route("/crl", get(crl))
        .route("/metrics", get(metrics_text))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/jwks", get(jwks))
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/revoke", post(revoke))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::from_fn(answer_in_time))
        .with_state(HttpState {
            ca,
            ready,
            leases,
            metrics,
            exchanger,
        })
}

/// Answers 408 to a request not answered within [`tls::REQUEST_TIMEOUT`], its body read
/// included.
async fn answer_in_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(tls::REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => oauth_error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request",
            "the request was not complete in time",
        ),
    }
}

async fn crl(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        s.ca.bundle().crl.clone(),
    )
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    let body = s.metrics.render(&crate::metrics::Gauges {
        live_leases: s.leases.len(),
        active_leases: s.leases.active_count(),
        tasks: s.leases.task_count(),
        ca_not_after: s.ca.not_after().unix_timestamp(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let not_after = s.ca.not_after();
    if !s.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned())
    } else if not_after <= time::OffsetDateTime::now_utc() {
        // Not ready for what most callers come for: every X.509-SVID request fails.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the CA certificate expired at {}: no X.509-SVID can be issued; renew it \
                 (operator CA) or restart tesserad (a generated CA is replaced at start)\n",
                not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        )
    } else {
        (StatusCode::OK, "ready\n".to_owned())
    }
}

async fn bundle(State(s): State<HttpState>) -> impl IntoResponse {
    let doc = s.ca.bundle().federation_document(REFRESH_HINT);
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&doc).unwrap_or_default(),
    )
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response();
    // RFC 6749 §5.1: token responses must not be cached.
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// Public metadata (discovery, JWKS): relying parties and caches may keep it a few minutes
/// instead of fetching it for every token they verify. After a key change (a restart with a
/// new `jwt/signing.key`) a cache may serve the old set for up to five minutes; relying
/// parties refetch on an unknown `kid`, as OIDC clients do.
fn public_json(v: &Value) -> Response {
    let mut r = json_response(StatusCode::OK, v);
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.remove(header::PRAGMA);
    r
}

/// RFC 6749 §5.2: `error_description` may hold only %x20-21 / %x23-5B / %x5D-7E. Quotes and
/// backslashes become `'` and `/`, anything else `?`; long messages are cut.
fn description(s: &str) -> String {
    s.chars()
        .take(400)
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

fn oauth_error(status: StatusCode, code: &str, desc: &str) -> Response {
    json_response(
        status,
        &json!({"error": code, "error_description": description(desc)}),
    )
}

async fn discovery(State(s): State<HttpState>) -> Response {
    let iss = s.exchanger.issuer_url();
    // RFC 8414 §3: a terminating "/" is not part of the paths beneath the issuer.
    let base = iss.trim_end_matches('/');
    public_json(&json!({
        "issuer": iss,
        "jwks_uri": format!("{base}/jwks"),
        "token_endpoint": format!("{base}/token"),
        "introspection_endpoint": format!("{base}/introspect"),
        "revocation_endpoint": format!("{base}/revoke"),
        "grant_types_supported": [exchange::GRANT_TYPE],
        "response_types_supported": ["none"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer_jwt_svid"],
        "revocation_endpoint_auth_methods_supported": ["bearer_jwt_svid"],
    }))
}

async fn jwks(State(s): State<HttpState>) -> Response {
    let keys: Vec<Value> =
        s.ca.bundle()
            .jwt_authorities
            .iter()
            .map(|k| {
                let mut m = k.public_members();
                m.insert("kid".into(), k.kid.clone().into());
                m.insert("use".into(), "sig".into());
                if m.get("crv").and_then(Value::as_str) == Some("P-256") {
                    m.insert("alg".into(), "ES256".into());
                }
                Value::Object(m)
            })
            .collect();
    public_json(&json!({ "keys": keys }))
}

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormError {
    /// The content type is not `application/x-www-form-urlencoded`.
    NotForm,
    /// A parameter appears more than once (RFC 6749 §3.2); its name, cut to 40 characters.
    Repeated(String),
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotForm => f.write_str("the body must be application/x-www-form-urlencoded"),
            Self::Repeated(k) => write!(f, "parameter {k} appears more than once"),
        }
    }
}

/// Parses an `application/x-www-form-urlencoded` body. RFC 6749 §3.2: parameters must not
/// repeat, so a repeated one is an error rather than silently picking one.
fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, FormError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(FormError::NotForm);
    }
    parse_form_body(body)
}

/// Decodes a form body into parameters; a repeated parameter is an error, and one without a
/// value is left out (RFC 6749 §3.2: "treated as if they were omitted"). Pure, so it is
/// fuzzed directly.
pub fn parse_form_body(body: &[u8]) -> Result<Map<String, Value>, FormError> {
    let mut m = Map::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        if v.is_empty() {
            continue;
        }
        if m.insert(k.to_string(), Value::String(v.into_owned()))
            .is_some()
        {
            return Err(FormError::Repeated(k.chars().take(40).collect()));
        }
    }
    Ok(m)
}

/// The 400 for a form that could not be read.
fn form_error(e: &FormError) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string())
}

/// The body of a form POST, read within [`MAX_FORM_BYTES`]. What stops it is answered as an
/// OAuth error (axum's own extractor answered every failure `400` in plain text): the
/// listener's shared budget for bodies in flight (`api::http::tls`) is `503` with
/// `Retry-After`, since it is other callers' load, not this request, that is at fault.
struct FormBody(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for FormBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Response> {
        axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
            .await
            .map(Self)
            .map_err(|e| body_error(&e))
    }
}

fn body_error(e: &axum::Error) -> Response {
    let causes = std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |c| {
        c.source()
    });
    for c in causes {
        if c.downcast_ref::<tonic::Status>()
            .is_some_and(crate::api::limits::is_shed)
        {
            return with_retry_after(oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the daemon is receiving too many request bodies at once; retry shortly",
            ));
        }
        if c.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!("the request body is larger than {MAX_FORM_BYTES} bytes"),
            );
        }
    }
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the request body could not be read",
    )
}

fn field(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_owned)
}

/// A token parameter, without the whitespace around it that no compact JWS holds: a file
/// written by `tessera svid jwt > FILE` or `echo` ends with a newline, which `curl
/// --data-urlencode token@FILE` sends along.
fn token_field(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k)
        .and_then(Value::as_str)
        .map(|t| t.trim_matches(|c: char| c.is_ascii_whitespace()).to_owned())
}

/// A token-exchange form refused before any token is looked at: the OAuth error code and
/// what to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct FormRefusal {
    /// RFC 6749 §5.2 / RFC 8693 §2.2.2 error code.
    pub error: &'static str,
    /// `error_description`.
    pub description: String,
}

/// An RFC 8693 §2.1 form as `/token` reads it: the grant type and `resource` checked, the
/// rest mapped to the exchange request, the actor token and its type. Pure, so the fuzzer
/// drives the handler's own mapping.
pub fn exchange_from_form(
    form: &Map<String, Value>,
) -> Result<(exchange::Request, String, Option<String>), FormRefusal> {
    let refuse = |error, description: String| Err(FormRefusal { error, description });
    match field(form, "grant_type").as_deref() {
        Some(exchange::GRANT_TYPE) => {}
        None | Some("") => {
            return refuse(
                "invalid_request",
                format!("grant_type is required ({})", exchange::GRANT_TYPE),
            );
        }
        Some(_) => {
            return refuse(
                "unsupported_grant_type",
                format!("only {} is supported", exchange::GRANT_TYPE),
            );
        }
    }
    if form.contains_key("resource") {
        return refuse(
            "invalid_target",
            "resource is not supported; name the tool or API with audience".into(),
        );
    }
    let req = exchange::Request {
        subject_token: token_field(form, "subject_token"),
        subject_token_type: field(form, "subject_token_type"),
        audience: field(form, "audience"),
        scope: field(form, "scope"),
        task_id: field(form, "task_id"),
        expires_in: field(form, "expires_in"),
        requested_token_type: field(form, "requested_token_type"),
        x509: false,
    };
    let actor_token = token_field(form, "actor_token").unwrap_or_default();
    Ok((req, actor_token, field(form, "actor_token_type")))
}

async fn token(
    State(s): State<HttpState>,
    headers: HeaderMap,
    FormBody(body): FormBody,
) -> Response {
    let started = std::time::Instant::now();
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(FormError::Repeated(k)) if k == "audience" || k == "resource" => {
            // RFC 8693 allows several; Tessera issues a token for one audience.
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "one audience per exchange: ask for a token per tool",
            );
        }
        Err(e) => return form_error(&e),
    };
    let (req, actor_token, actor_token_type) = match exchange_from_form(&form) {
        Ok(r) => r,
        Err(r) => return oauth_error(StatusCode::BAD_REQUEST, r.error, &r.description),
    };
    let actor = ActorRef::Token {
        token: &actor_token,
        token_type: actor_token_type.as_deref(),
    };
    match s.exchanger.exchange(req, actor).await {
        Ok(g) => {
            s.metrics.observe("TokenExchange", started.elapsed());
            json_response(
                StatusCode::OK,
                &json!({
                    "access_token": g.access_token,
                    "issued_token_type": g.issued_token_type,
                    "token_type": "Bearer",
                    "expires_in": g.expires_in,
                    "scope": g.scope,
                }),
            )
        }
        Err(e) => exchange_error(&e),
    }
}

/// What a client is told when Tessera itself cannot issue or record: the detail (database
/// errors, file paths) goes to the daemon's log, not to the network.
fn unavailable_description(e: &IssueError) -> String {
    let generic = match e {
        IssueError::Ca(_) => "the CA cannot sign right now",
        IssueError::Interrupted(_) => "the request was interrupted; retry",
        IssueError::Store(_) => "credentials cannot be recorded right now",
        // Written for the client (a full approval queue, say).
        other => return other.to_string(),
    };
    tracing::error!(error = %e, "cannot serve an HTTP request");
    generic.to_owned()
}

fn exchange_error(e: &ExchangeError) -> Response {
    let text = match e {
        ExchangeError::Unavailable(inner) => unavailable_description(inner),
        other => other.to_string(),
    };
    let mut body = json!({
        "error": e.oauth_code(),
        "error_description": description(&text),
    });
    let unavailable = matches!(
        e,
        ExchangeError::Unavailable(_) | ExchangeError::IssuerUnavailable(_)
    );
    if let ExchangeError::AuthorizationPending(id) | ExchangeError::AccessDenied(id) = e {
        body["request_id"] = id.clone().into();
    }
    if matches!(e, ExchangeError::AuthorizationPending(_)) {
        // As in RFC 8628 §3.5: how many seconds to wait before retrying.
        body["interval"] = 5.into();
    }
    if let ExchangeError::InvalidScope(denied) = e {
        body["denied_scopes"] = denied.clone().into();
    }
    if !unavailable {
        return json_response(StatusCode::BAD_REQUEST, &body);
    }
    let r = json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
    // Only the store is known to come back in about this time; an expired CA, a full
    // approval queue or an unreachable OIDC issuer are not, and a fixed hint would only
    // have every client retry at once.
    if matches!(e, ExchangeError::Unavailable(IssueError::Store(_))) {
        with_retry_after(r)
    } else {
        r
    }
}

/// Seconds a client should wait before retrying when the lease store could not commit
/// (RFC 9110 §10.2.3; RFC 7009 §2.2.1 names it for revocation).
const RETRY_AFTER_SECS: &str = "1";

fn with_retry_after(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

/// How an endpoint's caller authenticates, which decides the shape of its 401s.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// A protected resource calling introspection with a Bearer token: RFC 7662 §2.1 sends
    /// its 401s per RFC 6750 §3.
    Resource,
    /// A client calling revocation: RFC 7009 §2.2.1 sends RFC 6749 §5.2 errors, so a failed
    /// or missing authentication is `invalid_client`, with a challenge for the scheme used.
    Client,
}

/// Authenticates the caller of introspection and revocation: a JWT-SVID of this trust domain
/// whose audience is Tessera's issuer, as a Bearer token.
fn bearer_agent(s: &HttpState, headers: &HeaderMap, how: Caller) -> Result<String, Box<Response>> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let refuse = |desc: &str, challenge: &'static str, code: Option<&str>| {
        let mut r = match code {
            Some(code) => oauth_error(StatusCode::UNAUTHORIZED, code, desc),
            None => json_response(
                StatusCode::UNAUTHORIZED,
                &json!({ "error_description": description(desc) }),
            ),
        };
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        Box::new(r)
    };
    let token = match auth.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => {
            // RFC 6750 §3.1: without credentials (or with another scheme), a bare challenge
            // and no error code; the description is only for the person reading the body.
            return Err(refuse(
                "authenticate with a JWT-SVID whose audience is Tessera's issuer, as a Bearer token",
                "Bearer realm=\"tessera\"",
                (how == Caller::Client).then_some("invalid_client"),
            ));
        }
    };
    let what = match how {
        Caller::Resource => "the Bearer token of /introspect",
        Caller::Client => "the Bearer token of /revoke",
    };
    s.exchanger
        .authenticate_agent(token, what)
        .map(|(e, _)| e.spiffe_id.to_string())
        .map_err(|e| {
            let desc = format!("the Bearer JWT-SVID is not accepted: {e}");
            match how {
                // The same code in the body as in the challenge.
                Caller::Resource => refuse(
                    &desc,
                    "Bearer realm=\"tessera\", error=\"invalid_token\"",
                    Some("invalid_token"),
                ),
                Caller::Client => refuse(&desc, "Bearer realm=\"tessera\"", Some("invalid_client")),
            }
        })
}

async fn introspect(
    State(s): State<HttpState>,
    headers: HeaderMap,
    FormBody(body): FormBody,
) -> Response {
    if let Err(r) = bearer_agent(&s, &headers, Caller::Resource) {
        return *r;
    }
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => return form_error(&e),
    };
    let Some(token) = token_field(&form, "token").filter(|t| !t.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
        );
    };
    let inactive = || json_response(StatusCode::OK, &json!({"active": false}));
    let Some(t) = s.exchanger.issuer().verify_own_token(&token) else {
        return inactive();
    };
    // Only task tokens are this server's access tokens. A JWT-SVID is a workload's own
    // credential, minted without subject token, policy or approval: answered active, a
    // resource server checking "active and aud is me" would take one for a task token.
    // Its check is the Workload API's ValidateJWTSVID.
    if t.active != Some(crate::lease::Kind::Task) {
        return inactive();
    }
    let mut out = Map::new();
    out.insert("active".into(), true.into());
    out.insert("token_type".into(), "Bearer".into());
    // `sub_id` too: a `sub` means something only with its issuer, and a resource server that
    // introspects must be able to tell one issuer's "alice" from another's.
    for k in [
        "scope", "sub", "sub_id", "aud", "iss", "exp", "iat", "nbf", "jti", "act", "txn",
    ] {
        if let Some(v) = t.claims.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    // The acting agent is the party the token was issued to.
    if let Some(agent) = t
        .claims
        .get("act")
        .and_then(|a| a.get("sub"))
        .and_then(Value::as_str)
    {
        out.insert("client_id".into(), agent.into());
    }
    json_response(StatusCode::OK, &Value::Object(out))
}

async fn revoke(
    State(s): State<HttpState>,
    headers: HeaderMap,
    FormBody(body): FormBody,
) -> Response {
    let caller = match bearer_agent(&s, &headers, Caller::Client) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => return form_error(&e),
    };
    let Some(token) = token_field(&form, "token").filter(|t| !t.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
        );
    };
    let ok = || json_response(StatusCode::OK, &json!({}));
    let issuer = s.exchanger.issuer();
    // RFC 7009 §2.2: an invalid or unknown token is not an error, nor is one that has expired
    // or was revoked already, whoever holds it: there is nothing left to revoke.
    let Some(t) = issuer.verify_own_token(&token) else {
        return ok();
    };
    if !t.revocable {
        return ok();
    }
    if t.holder() != Some(caller.as_str()) {
        s.exchanger.issuer().deny_actor(
            Actor::Agent {
                spiffe_id: caller.clone(),
            },
            &caller,
            Kind::Task,
            "/revoke refused: the token was not issued to this agent",
            vec![("lease_id", Value::from(t.lease_id.to_string()))],
        );
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "this token was not issued to the authenticated agent",
        );
    }
    let (issuer, lease) = (Arc::clone(issuer), t.lease_id.to_string());
    match super::to_completion(async move {
        issuer
            .revoke_lease(
                &lease,
                Actor::Agent { spiffe_id: caller },
                "revoked by its agent (RFC 7009)",
            )
            .await
    })
    .await
    {
        // Revoked now, revoked or completed by someone else meanwhile, or reaped at its
        // expiry since the check above: in each case the token is no longer valid.
        Ok(_) | Err(IssueError::FailedPrecondition(_) | IssueError::NotFound(_)) => ok(),
        // RFC 7009 §2.2.1: on a 503 the client must assume the token still exists.
        // Interrupted: whether the revocation was recorded is unknown; a retry settles it.
        Err(e @ (IssueError::Store(_) | IssueError::Interrupted(_))) => {
            with_retry_after(oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                &unavailable_description(&e),
            ))
        }
        Err(e) => oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn form_bodies_refused_by_the_shared_budget_are_503_and_oversized_ones_413() {
        use axum::extract::FromRequest;
        let refused = |r: Response| {
            let code = r.status();
            let retry = r.headers().contains_key(header::RETRY_AFTER);
            (code, retry)
        };
        // Others' bodies hold the listener's whole share (review X L1: this was a plain-text
        // 400, which tells a client its request is wrong and not to retry).
        let budget = crate::api::limits::PerUid::new(100, 100);
        let body = crate::api::limits::CountedBody::new(
            http_body_util::Full::new(Bytes::from(vec![b'a'; 1000])),
            budget,
            0,
        );
        let req = axum::http::Request::post("/token")
            .body(axum::body::Body::new(body))
            .unwrap();
        let r = FormBody::from_request(req, &()).await.err().unwrap();
        assert_eq!(refused(r), (StatusCode::SERVICE_UNAVAILABLE, true));
        let big = axum::http::Request::post("/token")
            .body(axum::body::Body::from(vec![b'a'; MAX_FORM_BYTES + 1]))
            .unwrap();
        let r = FormBody::from_request(big, &()).await.err().unwrap();
        assert_eq!(refused(r), (StatusCode::PAYLOAD_TOO_LARGE, false));
        let fits = axum::http::Request::post("/token")
            .body(axum::body::Body::from(vec![b'a'; MAX_FORM_BYTES]))
            .unwrap();
        let FormBody(b) = FormBody::from_request(fits, &()).await.ok().unwrap();
        assert_eq!(b.len(), MAX_FORM_BYTES);
    }

    #[test]
    fn form_parameters_without_a_value_are_omitted_and_repeats_refused() {
        let m = parse_form_body(b"resource=&audience=&audience=https%3A%2F%2Ft&scope=a+b").unwrap();
        assert!(!m.contains_key("resource"));
        assert_eq!(m["audience"], "https://t");
        assert_eq!(m["scope"], "a b");
        assert!(matches!(
            parse_form_body(b"audience=x&audience=y"),
            Err(FormError::Repeated(k)) if k == "audience"
        ));
    }
}
