//! Bodies on their way through: the client's request body going upstream (watched, so a failure
//! can be blamed on the right side and the request timeout starts once it is all sent), the
//! upstream response body going back (ending the request's in-flight accounting when it finishes
//! or is dropped), and short local answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;
use std::future::Future;
use std::time::Duration;
use svcd_lb::{Detector, EndpointHealth, ServiceBalancer, View};

use tokio::sync::Notify;
use tokio::time::Sleep;

use super::metrics::{HttpSlot, HttpSlots};

pub type ProxyBody = Either<TrackedBody, Full<Bytes>>;

/// Errors a response body ends with: the upstream's, or svcd's own (the body stalled).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request in flight on an instance; counted down when dropped, however the request ends.
pub struct InFlight {
    health: Arc<EndpointHealth>,
    active: prometheus::IntGauge,
}

impl InFlight {
    pub fn start(health: &Arc<EndpointHealth>, active: &prometheus::IntGauge) -> Self {
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        active.inc();
        InFlight {
            health: health.clone(),
            active: active.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.active.dec();
    }
}

/// What became of the client's request body, shared between the body (writer) and the request
/// handler (reader).
#[derive(Default)]
pub struct Upload {
    /// `SENDING`, `SENT` (end of stream reached) or `FAILED` (the client's side broke: an abort,
    /// an HTTP/2 reset, a malformed chunked body).
    state: AtomicU8,
    /// Woken when the state leaves `SENDING`.
    done: Notify,
}

const SENDING: u8 = 0;
const SENT: u8 = 1;
const FAILED: u8 = 2;

impl Upload {
    /// A request with no body to send: its timeout starts at once. One per thread, shared: it
    /// starts `SENT` and nothing changes it, so a bodiless request allocates none.
    pub fn nothing_to_send() -> Arc<Upload> {
        thread_local! {
            static NOTHING: Arc<Upload> = {
                let upload = Upload::default();
                upload.state.store(SENT, Ordering::Relaxed);
                Arc::new(upload)
            };
        }
        NOTHING.with(Arc::clone)
    }

    fn finish(&self, state: u8) {
        if self
            .state
            .compare_exchange(SENDING, state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.done.notify_waiters();
        }
    }

    /// Whether the client's body failed: then an upstream error is the client's doing.
    pub fn client_failed(&self) -> bool {
        self.state.load(Ordering::Acquire) == FAILED
    }

    /// Resolves once the whole request has gone upstream (never if the client's body fails).
    pub async fn sent(&self) {
        loop {
            let notified = self.done.notified();
            match self.state.load(Ordering::Acquire) {
                SENT => return,
                FAILED => return std::future::pending().await,
                _ => notified.await,
            }
        }
    }
}

/// The client's request body on its way upstream: counts bytes and records how it ended.
pub struct RequestBody {
    inner: Either<Incoming, Empty<Bytes>>,
    upload: Arc<Upload>,
    bytes_in: IntCounter,
}

impl RequestBody {
    /// `inner` streamed; an empty one is sent at once.
    pub fn new(
        inner: Either<Incoming, Empty<Bytes>>,
        upload: Arc<Upload>,
        bytes_in: IntCounter,
    ) -> Self {
        if inner.is_end_stream() {
            upload.finish(SENT);
        }
        RequestBody {
            inner,
            upload,
            bytes_in,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = match &mut self.inner {
            Either::Left(body) => Pin::new(body).poll_frame(cx),
            Either::Right(empty) => Pin::new(empty)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_in.inc_by(data.len() as u64);
                }
                if self.inner.is_end_stream() {
                    self.upload.finish(SENT);
                }
            }
            Poll::Ready(None) => self.upload.finish(SENT),
            Poll::Ready(Some(Err(_))) => self.upload.finish(FAILED),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where an upstream response body comes from: hyper-util's client, or an HTTP/1.1
/// connection read directly (see [`crate::http::h1::bridge`]).
pub enum ResponseSource {
    Hyper(Incoming),
    /// Boxed: the reader's state (connection, buffer, framing) is ten times a hyper body's, and
    /// the response is moved several times on its way to hyper.
    Direct(Box<crate::http::h1::bridge::DirectBody>),
}

impl Body for ResponseSource {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseSource::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ResponseSource::Direct(b) => Pin::new(&mut **b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseSource::Hyper(b) => b.is_end_stream(),
            ResponseSource::Direct(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseSource::Hyper(b) => b.size_hint(),
            ResponseSource::Direct(b) => b.size_hint(),
        }
    }
}

/// Where a response body reports a backend failure mid-stream.
pub struct Blame {
    pub balancer: Arc<ServiceBalancer<HttpSlots>>,
    pub view: Arc<View<HttpSlot>>,
    /// The pick came from `view.fallback` (panic), else from `view.usable`.
    pub panic: bool,
    /// The instance's index in that slice.
    pub index: usize,
}

/// The upstream response body, trailers included, frame by frame. A read error is the backend's
/// (a reset or a malformed body mid-response) and counts against it; a client that goes away
/// drops the body without reading, which counts nothing. A body with no frame for
/// `proxy.l7.idle_timeout` ends with an error: the HTTP/2 stream is reset, the HTTP/1.1
/// connection closed, so a backend that stalls after its head holds nothing longer than that.
pub struct TrackedBody {
    inner: ResponseSource,
    bytes_out: IntCounter,
    blame: Option<Blame>,
    idle: Duration,
    /// Ends the body after `idle` without a frame. Made when the body first waits (a body
    /// read whole at once, most small responses, costs no timer or allocation), then re-armed
    /// only when the body waits after having made progress, so a burst of ready frames reads no
    /// clock.
    stall: Option<Pin<Box<Sleep>>>,
    progressed: bool,
    _in_flight: InFlight,
    /// The client connection's count of requests being answered, held until the body ends.
    _conn: Option<crate::http::framing::ConnBusy>,
}

impl TrackedBody {
    pub fn new(
        inner: ResponseSource,
        bytes_out: IntCounter,
        blame: Blame,
        in_flight: InFlight,
        idle: Duration,
    ) -> Self {
        TrackedBody {
            inner,
            bytes_out,
            blame: Some(blame),
            idle,
            stall: None,
            progressed: false,
            _in_flight: in_flight,
            _conn: None,
        }
    }

    /// Keeps the client connection counted busy until this body ends.
    pub fn holding(mut self, busy: crate::http::framing::ConnBusy) -> Self {
        self._conn = Some(busy);
        self
    }
}

/// The error a stalled response body ends with.
#[derive(Debug)]
pub struct Stalled(pub Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream response body idle for {:?}", self.0)
    }
}

impl std::error::Error for Stalled {}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out.inc_by(data.len() as u64);
                }
                this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(b) = this.blame.take() {
                    let slots = if b.panic {
                        &b.view.fallback
                    } else {
                        &b.view.usable
                    };
                    if let Some(slot) = slots.get(b.index) {
                        b.balancer
                            .failure(&b.view, slot, Detector::Http, "response body failed");
                    }
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let progressed = std::mem::take(&mut this.progressed);
                let idle = this.idle;
                let stall = match &mut this.stall {
                    Some(stall) => {
                        if progressed {
                            stall.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        stall
                    }
                    None => this.stall.insert(Box::pin(tokio::time::sleep(idle))),
                };
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Stalled(this.idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A short plain-text response made by svcd.
pub fn local(status: http::StatusCode, text: String, close: bool) -> http::Response<ProxyBody> {
    let mut r = http::Response::new(Either::Right(Full::new(Bytes::from(text))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    r
}
