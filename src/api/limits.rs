//! Owns: how much of the daemon one local user can hold at once.
//!
//! The Workload API socket is open to every local uid (attestation decides identity), so
//! connections and long-lived streams are counted per uid: one user's loop of `connect()`
//! calls cannot use up the daemon's file descriptors, and one workload cannot open streams
//! without end (each `FetchX509SVID` stream holds leases and mints again at every rotation).

use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Connections one uid may hold open on one socket.
pub const CONNECTIONS_PER_UID: usize = 1024;
/// Connections all uids together may hold open on one socket.
pub const CONNECTIONS_TOTAL: usize = 16_384;
/// `FetchX509SVID` streams one uid may hold open.
pub const X509_STREAMS_PER_UID: usize = 256;
/// Bundle streams (`FetchX509Bundles`, `FetchJWTBundles`) one uid may hold open: each holds
/// memory and a task for as long as the caller likes.
pub const BUNDLE_STREAMS_PER_UID: usize = 256;
/// Concurrent HTTP/2 streams (requests) per connection; tonic would otherwise allow any
/// number.
pub const STREAMS_PER_CONNECTION: u32 = 256;
/// Concurrent streams per admin connection: the CLI uses one.
pub const ADMIN_STREAMS_PER_CONNECTION: u32 = 16;
/// Largest request message on the Workload API and admin sockets, as the HTTP API's body limit: the
/// largest legitimate one (a token exchange with two 16 KiB tokens and 32 scopes) needs
/// under half of it, and tonic's default of 4 MiB let any local process hand the daemon
/// megabytes to parse.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// At most one "go" per interval: for warnings a caller can provoke (refused connections,
/// attestation failures of the daemon's own), so a log flood does not bury the rest.
#[derive(Debug)]
pub struct Throttle {
    every_ms: i64,
    last_ms: std::sync::atomic::AtomicI64,
}

impl Throttle {
    /// Lets one call through per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        Self {
            every_ms: every.as_millis() as i64,
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// True for the first call of each interval.
    pub fn ready(&self) -> bool {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.every_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The share counter, and who a uid counts as: see [`crate::attest::principal`].
pub use crate::attest::principal::{PerUid, Slot, principal};

/// The start of the message of every refusal for load (the per-uid stream and byte limits).
/// They are `Unavailable`: the SPIFFE Workload Endpoint (§6) has a client retry with a backoff
/// when the endpoint sheds load, and lists no other code for it. The prefix tells them from the
/// daemon's failures, which are `Unavailable` too.
pub const SHED: &str = "shedding load: ";

/// A refusal for load: `Unavailable`, its message [`SHED`] and then `detail`.
pub fn shed(detail: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unavailable(format!("{SHED}{detail}"))
}

/// Whether `s` is a refusal for load ([`shed`]) rather than a failure.
pub fn is_shed(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().starts_with(SHED)
}

/// Request bytes one uid may have received on the Unix sockets and not yet seen made into
/// messages: sixteen requests of the largest size. HTTP/2 lets each connection carry many
/// streams and each holds a partly received message, so without this a caller with no
/// identity at all could make the daemon hold 64 KiB × 256 streams × 1,024 connections.
pub const IN_FLIGHT_BYTES_PER_UID: usize = 16 * MAX_REQUEST_BYTES;
/// Same, for all uids together.
pub const IN_FLIGHT_BYTES_TOTAL: usize = 256 << 20;

/// Counts request body bytes per caller uid ([`PerUid`] in bytes) while a request is being
/// received: a body that would go past its caller's share or everyone's fails with
/// [`shed`], and what a body counted is given back when it is dropped (once its
/// message is decoded, or the stream ends).
#[derive(Debug, Clone)]
pub struct InFlightLayer(Arc<PerUid>);

impl InFlightLayer {
    /// At most `per_uid` bytes per uid and `total` in all.
    pub fn new(per_uid: usize, total: usize) -> Self {
        Self(PerUid::new(per_uid, total))
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;
    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            budget: Arc::clone(&self.0),
        }
    }
}

/// The service [`InFlightLayer`] makes.
#[derive(Debug, Clone)]
pub struct InFlight<S> {
    inner: S,
    budget: Arc<PerUid>,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for InFlight<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // Without credentials the request counts against one shared uid.
        let uid = req
            .extensions()
            .get::<crate::api::uds::PeerConn>()
            .and_then(|p| p.0.as_ref())
            .map_or(u32::MAX, |p| p.uid);
        let budget = Arc::clone(&self.budget);
        self.inner
            .call(req.map(|inner| tonic::body::Body::new(CountedBody::grpc(inner, budget, uid))))
    }
}

/// How long a gRPC request message may take to arrive whole once its first bytes came, on
/// the Unix sockets: what it held in the caller's share is given back when it fails, so an
/// unfinished message cannot hold it for ever (HTTP has its own request timeout).
pub const MESSAGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body counted against its caller's share (by uid, or one key for callers that
/// have none) until dropped. With gRPC framing, a message's bytes are given back as soon as
/// it is whole (a long request stream is not refused for what it sent long ago), and a
/// message that does not arrive whole within [`MESSAGE_DEADLINE`] fails the request.
pub struct CountedBody<B> {
    inner: B,
    budget: Arc<PerUid>,
    uid: u32,
    held: usize,
    grpc: Option<Framing>,
}

/// Where a gRPC request body is in its length-prefixed messages.
#[derive(Default)]
struct Framing {
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: Vec<u8>,
    /// Bytes of the current message's payload still to come.
    left: usize,
    /// Bytes of the current message seen so far, its prefix included.
    seen: usize,
    /// Until when the current, partly received message may take to arrive.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Framing {
    /// Walks `data`; returns how many of its bytes belong to messages it completes (those
    /// started before it included: the caller gives back what it counted for them).
    fn complete(&mut self, mut data: &[u8]) -> usize {
        let mut done = 0;
        while !data.is_empty() {
            if self.left == 0 && self.prefix.len() < 5 {
                let n = (5 - self.prefix.len()).min(data.len());
                self.prefix.extend_from_slice(&data[..n]);
                data = &data[n..];
                self.seen += n;
                if self.prefix.len() == 5 {
                    self.left = u32::from_be_bytes([
                        self.prefix[1],
                        self.prefix[2],
                        self.prefix[3],
                        self.prefix[4],
                    ]) as usize;
                }
            } else {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                self.seen += n;
            }
            if self.prefix.len() == 5 && self.left == 0 {
                self.prefix.clear();
                done += self.seen;
                self.seen = 0;
            }
        }
        done
    }

    fn partial(&self) -> bool {
        !self.prefix.is_empty() || self.left > 0
    }
}

impl<B> CountedBody<B> {
    /// `inner`, counted against `uid`'s share of `budget`.
    pub fn new(inner: B, budget: Arc<PerUid>, uid: u32) -> Self {
        Self {
            inner,
            budget,
            uid,
            held: 0,
            grpc: None,
        }
    }

    /// Same, for a gRPC request body ([`CountedBody`]'s framing rules).
    pub fn grpc(inner: B, budget: Arc<PerUid>, uid: u32) -> Self {
        let mut body = Self::new(inner, budget, uid);
        body.grpc = Some(Framing::default());
        body
    }
}

fn refused(status: tonic::Status) -> tower::BoxError {
    // A Status, so that gRPC callers see its code (tonic recovers it).
    Box::new(status)
}

impl<B> http_body::Body for CountedBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let frame = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(d) = this.grpc.as_mut().and_then(|g| g.deadline.as_mut())
                    && d.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(refused(tonic::Status::deadline_exceeded(
                        format!(
                            "a request message did not arrive whole within {} s",
                            MESSAGE_DEADLINE.as_secs()
                        ),
                    )))));
                }
                return Poll::Pending;
            }
        };
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            let n = data.len();
            if this.budget.add(this.uid, n).is_err() {
                return Poll::Ready(Some(Err(refused(shed(
                    "too many request bytes in flight from this uid (or from all callers); \
                     retry once earlier requests are answered",
                )))));
            }
            this.held += n;
            if let Some(g) = this.grpc.as_mut() {
                let done = g.complete(data).min(this.held);
                if done > 0 {
                    this.budget.give(this.uid, done);
                    this.held -= done;
                }
                if !g.partial() {
                    g.deadline = None;
                } else if g.deadline.is_none() {
                    g.deadline = Some(Box::pin(tokio::time::sleep(MESSAGE_DEADLINE)));
                }
            }
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.budget.give(self.uid, self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_interval() {
        let t = Throttle::new(std::time::Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        assert!(Throttle::new(std::time::Duration::ZERO).ready());
    }

    /// A body yielding these byte chunks; then it ends, or, with `stall`, waits for ever.
    struct Chunks {
        chunks: Vec<Vec<u8>>,
        stall: bool,
    }

    impl Chunks {
        /// Chunks of zero bytes of these sizes, then the end.
        fn zeros(sizes: &[usize]) -> Self {
            Self {
                chunks: sizes.iter().map(|&n| vec![0u8; n]).collect(),
                stall: false,
            }
        }
    }

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            if self.chunks.is_empty() && self.stall {
                return std::task::Poll::Pending;
            }
            let next = (!self.chunks.is_empty()).then(|| self.chunks.remove(0));
            std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(bytes::Bytes::from(c)))))
        }
    }

    /// Reads `chunks` as `uid`'s request body; the body, kept, and whether it was refused.
    async fn receive(
        budget: &Arc<PerUid>,
        uid: u32,
        chunks: &[usize],
    ) -> (CountedBody<Chunks>, bool) {
        use http_body_util::BodyExt;
        let mut body = CountedBody::new(Chunks::zeros(chunks), Arc::clone(budget), uid);
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                let s = e.downcast::<tonic::Status>().unwrap();
                assert!(is_shed(&s), "{s:?}");
                return (body, true);
            }
        }
        (body, false)
    }

    #[tokio::test]
    async fn request_bytes_in_flight_are_capped_per_uid_and_given_back_when_dropped() {
        let budget = PerUid::new(100, 150);
        let (a, refused) = receive(&budget, 1, &[60, 30]).await;
        assert!(!refused);
        assert_eq!(budget.held(1), 90);
        let (_, refused) = receive(&budget, 1, &[20]).await;
        assert!(refused, "past the uid's share");
        // The refused body counted nothing.
        assert_eq!(budget.held(1), 90);
        let (c, refused) = receive(&budget, 2, &[50]).await;
        assert!(!refused);
        let (_, refused) = receive(&budget, 3, &[20]).await;
        assert!(refused, "past everyone's");
        drop(a);
        let (b, refused) = receive(&budget, 1, &[20]).await;
        assert!(!refused, "given back when the first body went");
        drop((b, c));
        assert_eq!((budget.total(), budget.principals()), (0, 0));
    }

    /// A gRPC message: the 5-byte prefix and `n` payload bytes.
    fn message(n: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(n as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, n));
        m
    }

    #[tokio::test(start_paused = true)]
    async fn whole_grpc_messages_are_given_back_and_a_partial_one_has_a_deadline() {
        use http_body_util::BodyExt;
        let budget = PerUid::new(1000, 1000);
        // Two whole messages, the second cut across frames, then half of a third.
        let mut two = message(10);
        let second = message(20);
        two.extend_from_slice(&second[..8]);
        let third = message(100);
        let mut body = CountedBody::grpc(
            Chunks {
                chunks: vec![two, second[8..].to_vec(), third[..50].to_vec()],
                stall: true,
            },
            Arc::clone(&budget),
            1,
        );
        body.frame().await.unwrap().unwrap();
        assert_eq!(
            budget.held(1),
            8,
            "the first message went back, the second's start is held"
        );
        body.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(1), 0, "both whole: nothing held");
        body.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(1), 50);
        // The rest never comes: the request fails at the deadline, and its bytes go back.
        let waited = tokio::time::Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(waited.elapsed() >= MESSAGE_DEADLINE);
        let s = e.downcast::<tonic::Status>().unwrap();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        drop(body);
        assert_eq!(budget.held(1), 0);
    }

    #[tokio::test]
    async fn the_grpc_layer_gives_back_a_whole_message_while_the_request_lasts() {
        use http_body_util::BodyExt;
        use tower::{Layer, Service, ServiceExt};
        let layer = InFlightLayer::new(1000, 1000);
        let budget = Arc::clone(&layer.0);
        // A service that reads one frame and keeps the request open while it looks.
        let seen = Arc::clone(&budget);
        let mut svc = layer.layer(tower::service_fn(
            move |req: http::Request<tonic::body::Body>| {
                let seen = Arc::clone(&seen);
                async move {
                    let mut body = req.into_body();
                    body.frame().await.unwrap().unwrap();
                    Ok::<_, std::convert::Infallible>(seen.held(u32::MAX))
                }
            },
        ));
        // Fifteen zero bytes: three whole, empty gRPC messages (a prefix of zeros each).
        let req = http::Request::new(tonic::body::Body::new(Chunks::zeros(&[15])));
        let held = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(held, 0, "the layer counted whole messages as in flight");
    }
}
