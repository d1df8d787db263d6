//! HTTP proxy metrics. Per-service and per-instance handles are resolved when a service or an
//! instance is first seen (see [`crate::balance`]); a request only touches resolved handles.
//!
//! `code` is the status class (`2xx` … `5xx`), as HAProxy's `hrsp_*` counters: bounded
//! cardinality whatever the upstream returns.

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    active: IntGaugeVec,
    retries: IntCounterVec,
    /// Open upstream connections (pooled or in use).
    pub upstream_open: IntGauge,
    /// Upstream connections opened.
    pub upstream_connects: IntCounter,
    /// Open downstream (client) connections.
    pub downstream_open: IntGauge,
    /// Requests refused before routing: ambiguous framing, no route.
    local: IntCounterVec,
}

/// Handles for one service.
#[derive(Clone)]
pub struct ServiceHttpMetrics {
    all: Arc<HttpMetrics>,
    service: Arc<str>,
    pub duration: Histogram,
    pub active: IntGauge,
    pub retries: IntCounter,
}

/// Handles for one instance: requests by status class, index = first digit - 1.
pub struct EndpointHttpMetrics {
    pub by_class: [IntCounter; 5],
}

impl EndpointHttpMetrics {
    #[inline]
    pub fn count(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl HttpMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let m = HttpMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "svcd_http_requests_total",
                    "HTTP requests proxied, by service, instance and status class.",
                ),
                &["service", "endpoint", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "svcd_http_request_duration_seconds",
                    "Time from request to response head, by service.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["service"],
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "svcd_http_requests_active",
                    "HTTP requests in flight (until the response body ends), by service.",
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
            local: IntCounterVec::new(
                Opts::new(
                    "svcd_http_local_responses_total",
                    "Responses svcd made itself without an instance (no route, no healthy \
                     instance, bad framing), by code.",
                ),
                &["code"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.upstream_open.clone()))?;
        registry.register(Box::new(m.upstream_connects.clone()))?;
        registry.register(Box::new(m.downstream_open.clone()))?;
        registry.register(Box::new(m.local.clone()))?;
        Ok(Arc::new(m))
    }

    /// Handles registered nowhere: for the L4 proxy's balancers, which keep per-instance
    /// state but count their traffic in `svcd_tcp_*`.
    pub fn detached() -> Arc<Self> {
        Self::new(&Registry::new()).expect("a fresh registry accepts the metrics")
    }

    pub fn service(self: &Arc<Self>, service: &str) -> ServiceHttpMetrics {
        ServiceHttpMetrics {
            all: self.clone(),
            service: service.into(),
            duration: self.duration.with_label_values(&[service]),
            active: self.active.with_label_values(&[service]),
            retries: self.retries.with_label_values(&[service]),
        }
    }

    /// A response svcd made itself (error path; label lookup is fine here).
    pub fn local(&self, code: u16) {
        self.local.with_label_values(&[&code.to_string()]).inc();
    }
}

impl ServiceHttpMetrics {
    pub fn endpoint(&self, id: &str) -> EndpointHttpMetrics {
        let r = &self.all.requests;
        EndpointHttpMetrics {
            by_class: CLASSES.map(|c| r.with_label_values(&[&*self.service, id, c])),
        }
    }
}
