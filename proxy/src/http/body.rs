//! Response bodies handed to the client: the upstream body streamed through (ending the request's
//! in-flight accounting when it finishes or is dropped), or a short local one.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::balance::EndpointStats;

pub type ProxyBody = Either<TrackedBody, Full<Bytes>>;

/// One request in flight on an instance; counted down when dropped, however the request ends.
pub struct InFlight {
    stats: Arc<EndpointStats>,
    active: prometheus::IntGauge,
}

impl InFlight {
    pub fn start(stats: &Arc<EndpointStats>, active: &prometheus::IntGauge) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        active.inc();
        InFlight {
            stats: stats.clone(),
            active: active.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.active.dec();
    }
}

/// The upstream response body, trailers included, frame by frame.
pub struct TrackedBody {
    inner: Incoming,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub fn new(inner: Incoming, in_flight: InFlight) -> Self {
        TrackedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
