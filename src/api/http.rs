//! HTTP endpoints on `[http] listen`: health, readiness, the SPIFFE trust bundle, the CRL
//! (DER) and Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::ca::Ca;
use crate::lease::LeaseTable;
use crate::metrics::Metrics;

/// How often relying parties should refetch the bundle (`spiffe_refresh_hint`).
const REFRESH_HINT: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct HttpState {
    ca: Arc<Ca>,
    ready: Arc<AtomicBool>,
    leases: Arc<LeaseTable>,
    metrics: Arc<Metrics>,
}

/// The router. `ready` turns true once the workload socket is serving.
pub fn router(
    ca: Arc<Ca>,
    ready: Arc<AtomicBool>,
    leases: Arc<LeaseTable>,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/bundle", get(bundle))
        .route("/crl", get(crl))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState {
            ca,
            ready,
            leases,
            metrics,
        })
}

async fn crl(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        s.ca.bundle().crl.clone(),
    )
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    let body = s.metrics.render(s.leases.len(), s.leases.active_count());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn bundle(State(s): State<HttpState>) -> impl IntoResponse {
    let doc = s.ca.bundle().federation_document(REFRESH_HINT);
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&doc).unwrap_or_default(),
    )
}
