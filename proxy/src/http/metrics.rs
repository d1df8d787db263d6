//! HTTP proxy metrics, each documented in `docs/metrics.md`.
//!
//! * What clients saw: `svcd_http_responses_total{service,code}` — one per response sent to a
//!   client, svcd's own answers (404, 503, 502, 504, 400…) included; `service=""` when the
//!   request matched no service.
//! * What upstreams did: `svcd_http_upstream_requests_total{service,endpoint,code}` — one per
//!   attempt (a retried request counts twice), `code` the response's class or why there was
//!   none; `svcd_http_upstream_duration_seconds{service,outcome}` for every attempt.
//!
//! Per-service handles live in the service's balancer and per-endpoint ones in its slot data,
//! resolved when first seen; a request touches resolved handles only. Each handle set removes
//! its series when dropped, i.e. when the endpoint or service leaves the registry.
//!
//! `code` is the status class (`2xx` … `5xx`), as HAProxy's `hrsp_*` counters: bounded
//! cardinality whatever the upstream returns.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use svcd_lb::{ServiceName, SlotFactory};
use svcd_registry::Endpoint;

/// Buckets of every HTTP duration histogram: sub-millisecond to past the longest timeout a
/// config may set (`proxy.l7.request_timeout` and route timeouts are at most 300 s).
pub const DURATION_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0, 60.0, 120.0, 300.0,
];

/// How an upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived (any status).
    Response,
    /// No connection: refused, unreachable, connect timeout.
    ConnectError,
    /// The backend reset or closed the connection, or sent a malformed response.
    UpstreamError,
    /// No response head within the request timeout after the request was fully sent.
    Timeout,
    /// The client's request body failed (aborted, reset, malformed): not the backend's doing.
    ClientError,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Response, "response"),
    (Outcome::ConnectError, "connect_error"),
    (Outcome::UpstreamError, "upstream_error"),
    (Outcome::Timeout, "timeout"),
    (Outcome::ClientError, "client_error"),
];

/// `code` values of upstream attempts: the status classes, then the outcomes without a response.
const CODES: [&str; 9] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_error",
    "upstream_error",
    "timeout",
    "client_error",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[inline]
fn class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

pub struct HttpMetrics {
    responses: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    bytes: IntCounterVec,
    active: IntGaugeVec,
    retries: IntCounterVec,
    /// Open upstream connections (pooled or in use).
    pub upstream_open: IntGauge,
    /// Upstream connections opened.
    pub upstream_connects: IntCounter,
    /// Open downstream (client) connections.
    pub downstream_open: IntGauge,
    /// Idle pooled connections found closed, or holding bytes no request asked for, when taken
    /// for reuse: closed instead.
    pub upstream_stale: IntCounter,
    /// HTTP/2 streams the client cancelled (RST_STREAM) before their response head was ready.
    pub streams_cancelled: IntCounter,
    /// HTTP/2 client connections closed because most of their streams were cancelled early.
    pub reset_floods: IntCounter,
    /// Responses to requests that matched no service, by class (`service=""`).
    unrouted: [IntCounter; 5],
}

/// Handles for one service; the series go when it is dropped (the service left the registry).
pub struct ServiceHttpMetrics {
    all: Arc<HttpMetrics>,
    service: ServiceName,
    responses: [IntCounter; 5],
    duration: [Histogram; 5],
    pub active: IntGauge,
    pub retries: IntCounter,
}

/// The HTTP plane's data for one instance: its address as a URI authority (made once, not per
/// request) and its metric handles.
pub struct HttpSlot {
    pub authority: Authority,
    pub metrics: EndpointHttpMetrics,
}

/// Handles for one instance; the series go when it is dropped (the instance left).
pub struct EndpointHttpMetrics {
    all: Arc<HttpMetrics>,
    labels: [String; 2],
    attempts: [IntCounter; 9],
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let responses = IntCounterVec::new(
            Opts::new(
                "svcd_http_responses_total",
                "Responses sent to HTTP clients, by service and status class; svcd's own \
                 answers included, service=\"\" when no service matched.",
            ),
            &["service", "code"],
        )?;
        let m = HttpMetrics {
            unrouted: CLASSES.map(|c| responses.with_label_values(&["", c])),
            responses,
            upstream_requests: IntCounterVec::new(
                Opts::new(
                    "svcd_http_upstream_requests_total",
                    "Attempts sent to instances (each retry counts), by status class or why no \
                     response came.",
                ),
                &["service", "endpoint", "code"],
            )?,
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "svcd_http_upstream_duration_seconds",
                    "Time from sending an attempt to its response head or its failure, by \
                     outcome.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["service", "outcome"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "svcd_http_bytes_total",
                    "HTTP body bytes proxied; direction in = client to instance.",
                ),
                &["service", "endpoint", "direction"],
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "svcd_http_requests_active",
                    "HTTP requests in flight to instances (until the response body ends).",
                ),
                &["service"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "svcd_http_retries_total",
                    "HTTP requests retried on another instance, by service.",
                ),
                &["service"],
            )?,
            upstream_open: IntGauge::new(
                "svcd_http_upstream_connections",
                "Open upstream connections of the HTTP proxy pools (idle or in use).",
            )?,
            upstream_connects: IntCounter::new(
                "svcd_http_upstream_connects_total",
                "Upstream connections opened by the HTTP proxy pools.",
            )?,
            downstream_open: IntGauge::new(
                "svcd_http_downstream_connections",
                "Open client connections of the HTTP proxy.",
            )?,
            upstream_stale: IntCounter::new(
                "svcd_http_upstream_stale_total",
                "Idle upstream connections found closed or holding stray bytes when taken for \
                 reuse, and closed.",
            )?,
            streams_cancelled: IntCounter::new(
                "svcd_http_streams_cancelled_total",
                "HTTP/2 streams cancelled by the client before their response head.",
            )?,
            reset_floods: IntCounter::new(
                "svcd_http_reset_flood_closes_total",
                "HTTP/2 client connections closed because most of their streams were \
                 cancelled early.",
            )?,
        };
        registry.register(Box::new(m.responses.clone()))?;
        registry.register(Box::new(m.upstream_requests.clone()))?;
        registry.register(Box::new(m.upstream_duration.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.upstream_open.clone()))?;
        registry.register(Box::new(m.upstream_connects.clone()))?;
        registry.register(Box::new(m.downstream_open.clone()))?;
        registry.register(Box::new(m.upstream_stale.clone()))?;
        registry.register(Box::new(m.streams_cancelled.clone()))?;
        registry.register(Box::new(m.reset_floods.clone()))?;
        Ok(Arc::new(m))
    }

    /// A response to a request that matched no service.
    pub fn unrouted(&self, status: u16) {
        self.unrouted[class(status)].inc();
    }

    pub fn service(self: &Arc<Self>, service: &ServiceName) -> ServiceHttpMetrics {
        let s = service.as_str();
        ServiceHttpMetrics {
            all: self.clone(),
            service: service.clone(),
            responses: CLASSES.map(|c| self.responses.with_label_values(&[s, c])),
            duration: OUTCOMES.map(|(_, o)| self.upstream_duration.with_label_values(&[s, o])),
            active: self.active.with_label_values(&[s]),
            retries: self.retries.with_label_values(&[s]),
        }
    }

    fn endpoint(self: &Arc<Self>, service: &ServiceName, id: &str) -> EndpointHttpMetrics {
        let s = service.as_str();
        EndpointHttpMetrics {
            all: self.clone(),
            labels: [s.into(), id.into()],
            attempts: CODES.map(|c| self.upstream_requests.with_label_values(&[s, id, c])),
            bytes_in: self.bytes.with_label_values(&[s, id, "in"]),
            bytes_out: self.bytes.with_label_values(&[s, id, "out"]),
        }
    }
}

impl ServiceHttpMetrics {
    /// A response sent to the client.
    #[inline]
    pub fn response(&self, status: u16) {
        self.responses[class(status)].inc();
    }

    /// How long an attempt took, by how it ended.
    #[inline]
    pub fn attempt(&self, outcome: Outcome, seconds: f64) {
        self.duration[outcome as usize].observe(seconds);
    }
}

impl Drop for ServiceHttpMetrics {
    fn drop(&mut self) {
        let s = self.service.as_str();
        let m = &self.all;
        for c in CLASSES {
            let _ = m.responses.remove_label_values(&[s, c]);
        }
        for (_, o) in OUTCOMES {
            let _ = m.upstream_duration.remove_label_values(&[s, o]);
        }
        let _ = m.active.remove_label_values(&[s]);
        let _ = m.retries.remove_label_values(&[s]);
    }
}

impl EndpointHttpMetrics {
    /// One attempt: its response status, or the outcome that left it without one.
    #[inline]
    pub fn attempt(&self, outcome: Outcome, status: u16) {
        let i = match outcome {
            Outcome::Response => class(status),
            other => 4 + other as usize,
        };
        self.attempts[i].inc();
    }
}

impl Drop for EndpointHttpMetrics {
    fn drop(&mut self) {
        let [s, e] = &self.labels;
        let m = &self.all;
        for c in CODES {
            let _ = m.upstream_requests.remove_label_values(&[s, e, c]);
        }
        for d in ["in", "out"] {
            let _ = m.bytes.remove_label_values(&[s, e, d]);
        }
    }
}

/// The HTTP plane's [`SlotFactory`]: per-service and per-endpoint handles.
pub struct HttpSlots {
    pub metrics: Arc<HttpMetrics>,
}

impl SlotFactory for HttpSlots {
    type Extra = HttpSlot;
    type Service = ServiceHttpMetrics;

    fn make_service(&self, service: &ServiceName) -> ServiceHttpMetrics {
        self.metrics.service(service)
    }

    fn make(
        &self,
        service: &ServiceName,
        endpoint: &Endpoint,
        addr: SocketAddr,
    ) -> Option<HttpSlot> {
        Some(HttpSlot {
            authority: Authority::try_from(addr.to_string()).ok()?,
            metrics: self.metrics.endpoint(service, &endpoint.id),
        })
    }
}
