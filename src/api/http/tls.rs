//! TLS for the HTTP listener: an operator certificate, or the daemon's own X.509-SVID
//! (`spiffe://<td>/tesserad`) minted from its CA and renewed at half its lifetime.
//!
//! Owns the rustls server configuration and the HTTP listener's accept loop, with or without
//! TLS: handshakes run per connection, so a slow client cannot stall others; connections are
//! capped and timed out; they drain on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::either::Either;

use crate::ca::Ca;
use crate::config::HttpTls;
use crate::shutdown::Shutdown;
use crate::spiffe_id::SpiffeId;

/// Lifetime of the daemon's own serving SVID.
const SVID_TTL: Duration = Duration::from_secs(3600);
/// A TLS handshake must finish in this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("bad certificate in chain: {e}"))?;
        let len = der.len() - rest.len();
        out.push(CertificateDer::from(der[..len].to_vec()));
        der = rest;
    }
    Ok(out)
}

/// Serves the daemon's own SVID, re-minting it when half its life has passed.
#[derive(Debug)]
struct SvidResolver {
    ca: Arc<Ca>,
    id: SpiffeId,
    /// The issuer URL's host, named in the certificate too.
    host: String,
    current: ArcSwap<Serving>,
    /// Held by the one handshake that renews: the others meanwhile serve the current SVID
    /// rather than each minting one (review BD-10).
    renewing: std::sync::Mutex<()>,
}

/// The SVID being served, and when it is due for renewal.
#[derive(Debug)]
struct Serving {
    key: Arc<CertifiedKey>,
    /// Half its life from the mint, on the monotonic clock; 30 s after a failed renewal.
    renew_at: Instant,
    /// The wall-clock times within which it is served: from its `notBefore` to half its life.
    /// A step of the wall clock outside them (review AZ-12) makes it due at once, where the
    /// monotonic clock alone would serve a certificate expired, or not yet valid, by the new
    /// time for up to half its life.
    wall: (time::OffsetDateTime, time::OffsetDateTime),
    /// The wall-clock rule waits until then after a failed renewal, as `renew_at` does.
    hold_until: Instant,
}

impl Serving {
    fn due(&self, now: Instant, wall: time::OffsetDateTime) -> bool {
        now >= self.renew_at
            || (now >= self.hold_until && !(self.wall.0 <= wall && wall < self.wall.1))
    }

    /// The same certificate, tried again in 30 s.
    fn retry_later(&self, now: Instant) -> Self {
        let later = now + Duration::from_secs(30);
        Self {
            key: Arc::clone(&self.key),
            renew_at: later,
            wall: self.wall,
            hold_until: later,
        }
    }
}

impl SvidResolver {
    fn mint(ca: &Ca, id: &SpiffeId, host: &str) -> Result<Serving, String> {
        let wall = time::OffsetDateTime::now_utc();
        let m = ca
            .mint_x509_serving(id, host, SVID_TTL, wall)
            .map_err(|e| e.to_string())?;
        let chain = split_der(&m.chain_der)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(m.key_pkcs8.as_ref().to_vec()));
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("cannot use the SVID key: {e}"))?;
        let now = Instant::now();
        Ok(Serving {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            renew_at: now + SVID_TTL / 2,
            // Not past the CA's own end, which caps the certificate's: the renewal then fails
            // and says so, instead of serving an expired certificate in silence (review BD-10).
            wall: (
                wall - crate::ca::x509::BACKDATE,
                (wall + SVID_TTL / 2).min(ca.not_after()),
            ),
            hold_until: now,
        })
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.load();
        let now = Instant::now();
        if !cur.due(now, time::OffsetDateTime::now_utc()) {
            return Some(Arc::clone(&cur.key));
        }
        // A mint that panicked (poisoning the lock) must not stop renewals for good (review
        // BE-8): the lock guards no data.
        let _renewing = match self.renewing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Some(Arc::clone(&cur.key)),
        };
        // Another handshake may have renewed it between the load and the lock.
        let cur = self.current.load();
        if !cur.due(now, time::OffsetDateTime::now_utc()) {
            return Some(Arc::clone(&cur.key));
        }
        match Self::mint(&self.ca, &self.id, &self.host) {
            Ok(next) => {
                let key = Arc::clone(&next.key);
                self.current.store(Arc::new(next));
                Some(key)
            }
            Err(e) => {
                // Keep serving the current one (still valid for half its life, unless the
                // wall clock stepped), and try again in a while, not at every handshake:
                // remote clients would otherwise each start a mint and a log line.
                tracing::error!(error = %e, "cannot renew the HTTP serving SVID; retrying in 30 s");
                self.current.store(Arc::new(cur.retry_later(now)));
                Some(Arc::clone(&cur.key))
            }
        }
    }
}

/// Builds the rustls server configuration for `tls`. `host` is the issuer URL's host, which
/// the daemon's own SVID names beside its SPIFFE ID, so that HTTPS clients that check the
/// name they connected to accept it (once they trust the bundle).
pub fn server_config(
    tls: &HttpTls,
    ca: &Arc<Ca>,
    host: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = builder()?;
    let mut cfg = match tls {
        HttpTls::Files { cert, key } => from_files(builder, cert, key)?,
        HttpTls::Svid => {
            let id = SpiffeId::new(ca.trust_domain(), "/tesserad").map_err(|e| e.to_string())?;
            let first = SvidResolver::mint(ca, &id, host)?;
            builder.with_cert_resolver(Arc::new(SvidResolver {
                ca: Arc::clone(ca),
                id,
                host: host.to_owned(),
                current: ArcSwap::from_pointee(first),
                renewing: std::sync::Mutex::new(()),
            }))
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn builder()
-> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>, String> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth())
}

/// The operator's certificate chain and key (`[http] tls_cert`, `tls_key`; the key 0600).
fn from_files(
    builder: rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, String> {
    let key_text =
        crate::fsutil::read_pem_file(key, true).map_err(|e| format!("{}: {e}", key.display()))?;
    let cert_text = crate::fsutil::read_pem_file(cert, false)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    // The key's bytes never reach an error message.
    let k = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|_| format!("{}: not a PEM private key", key.display()))?;
    builder
        .with_single_cert(certs, k)
        .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))
}

/// Checks the operator's TLS files as start-up loads them: what `tesserad --check-config`
/// runs.
pub fn check_files(cert: &std::path::Path, key: &std::path::Path) -> Result<(), String> {
    from_files(builder()?, cert, key).map(|_| ())
}

/// Request body bytes all HTTP callers together may have sent and the daemon not consumed.
pub const HTTP_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Connections the HTTP listener holds at once; more wait in the kernel's backlog. Each
/// holds a descriptor, and the daemon's descriptors also serve the Workload API and admin
/// sockets, the store and the audit log.
pub const MAX_CONNECTIONS: usize = 4096;
/// A request's headers must arrive within this time of the connection waiting for them
/// (idle and slow-header connections are closed).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included, must be answered within this time (a body trickled in
/// a byte at a time held its connection for ever). The slowest legitimate request, an
/// exchange whose issuer's keys must be fetched, takes at most 15 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 connections are pinged this often, and closed when a ping goes unanswered for
/// [`HEADER_TIMEOUT`].
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// A connection with no request in flight is closed after this long without one (the first
/// within [`HEADER_TIMEOUT`]): hyper's header timeout starts only once the protocol is known,
/// and HTTP/2 clients answer pings, so neither closes a connection that sends nothing.
/// Longer than common clients keep idle pooled connections (reqwest: 90 s), so that a client
/// rarely sends a request on a connection being closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What one connection is doing, for its idle timeout.
struct Activity {
    born: Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// When the last request ended, in ns since `born` (0: none yet).
    last_ns: std::sync::atomic::AtomicU64,
}

/// A request in flight on a connection, until its response body has been sent (or the
/// request was abandoned).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let a = &self.0;
        a.last_ns
            .store(a.born.elapsed().as_nanos().max(1) as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            in_flight: Default::default(),
            last_ns: Default::default(),
        })
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// When the connection goes idle for good, if nothing happens before; `None` while a
    /// request is in flight.
    fn idle_deadline(&self) -> Option<Instant> {
        use std::sync::atomic::Ordering;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_ns.load(Ordering::Acquire) {
            // The TLS handshake, if any, comes out of the same connection's first window.
            0 => self.born + HANDSHAKE_TIMEOUT + HEADER_TIMEOUT,
            ns => self.born + Duration::from_nanos(ns) + IDLE_TIMEOUT,
        })
    }
}

/// A response body that keeps its request counted as in flight until it has been sent: a
/// slow reader of a large body (the CRL) is not idle.
struct Counted {
    body: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Counted {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one connection until it ends or has been idle too long (then it is dropped, which
/// closes it).
async fn drive(conn: impl std::future::Future, activity: &Activity) {
    tokio::pin!(conn);
    loop {
        let wake = activity
            .idle_deadline()
            .unwrap_or_else(|| Instant::now() + IDLE_TIMEOUT);
        tokio::select! {
            _ = &mut conn => return,
            () = tokio::time::sleep_until(wake.into()) => {
                if activity.idle_deadline().is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
        }
    }
}

/// Accepts connections (TLS when `tls` is given) and serves `app` until shutdown, then lets
/// open connections finish (the caller bounds that with the drain deadline). Hyper has no
/// timeouts without a timer, and axum's `serve` sets none: every bound here is explicit.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut sd: Shutdown,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Request bytes received and not yet consumed, across connections: each HTTP/2 stream
    // may hold a partly sent body until REQUEST_TIMEOUT, which without a bound let
    // unauthenticated callers make the daemon hold gigabytes.
    let in_flight = crate::api::limits::PerUid::new(HTTP_IN_FLIGHT_BYTES, HTTP_IN_FLIGHT_BYTES);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(crate::api::limits::STREAMS_PER_CONNECTION)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(HEADER_TIMEOUT);
    loop {
        let slot = tokio::select! {
            () = sd.wait() => break,
            s = Arc::clone(&slots).acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let (tcp, _) = tokio::select! {
            () = sd.wait() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, builder) = (acceptor.clone(), builder.clone());
        // Born at accept: the TLS handshake has its own, shorter bound.
        let activity = Activity::new();
        let svc = {
            let (app, activity) = (TowerToHyperService::new(app.clone()), Arc::clone(&activity));
            let in_flight = Arc::clone(&in_flight);
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let busy = activity.begin();
                // Callers here have no uid: one share for all.
                let req = req.map(|b| {
                    axum::body::Body::new(crate::api::limits::CountedBody::new(
                        b,
                        Arc::clone(&in_flight),
                        0,
                    ))
                });
                let answer = hyper::service::Service::call(&app, req);
                async move {
                    let r = answer.await;
                    r.map(|resp| {
                        resp.map(|body| axum::body::Body::new(Counted { body, _busy: busy }))
                    })
                }
            })
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let io = match acceptor {
                None => Either::Left(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => Either::Right(stream),
                        _ => return,
                    }
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            drive(watcher.watch(conn.into_owned()), &activity).await;
        });
    }
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_svid_is_renewed_when_either_clock_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe_id::TrustDomain::parse("example.org").unwrap();
        let ca = Ca::load_or_create(&td, dir.path(), None, Duration::from_secs(86_400)).unwrap();
        let id = SpiffeId::new(ca.trust_domain(), "/tesserad").unwrap();
        let s = SvidResolver::mint(&ca, &id, "localhost").unwrap();
        let (now, wall) = (Instant::now(), time::OffsetDateTime::now_utc());
        assert!(!s.due(now, wall));
        assert!(
            s.due(now + SVID_TTL / 2, wall),
            "half its life on the monotonic clock"
        );
        // The wall clock steps ahead past half its life, or back before its notBefore
        // (review AZ-12): due although the monotonic clock has hardly moved.
        assert!(s.due(now, wall + SVID_TTL / 2));
        assert!(s.due(now, wall - Duration::from_secs(120)));
        assert!(
            !s.due(now, wall - Duration::from_secs(10)),
            "within the backdating"
        );
        // After a failed renewal both rules wait 30 s, so that each handshake does not mint.
        let held = s.retry_later(now);
        assert!(!held.due(now, wall + SVID_TTL));
        assert!(held.due(now + Duration::from_secs(30), wall + SVID_TTL));
        assert!(held.due(now + Duration::from_secs(30), wall));
    }
}
