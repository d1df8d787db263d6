//! Proxy metrics, per service and per endpoint. Handles for an endpoint are created once, when
//! the endpoint first appears in a snapshot the listener sees, and kept in the listener's
//! [`EndpointMetricsCache`]; a connection does a hash lookup, never a label lookup.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use svcd_registry::ServiceEndpoints;

pub struct ProxyMetrics {
    connections: IntCounterVec,
    active: IntGaugeVec,
    connect_failures: IntCounterVec,
    bytes: IntCounterVec,
    datagrams: IntCounterVec,
    no_healthy: IntCounterVec,
    /// Connections closed at accept because `proxy.max_connections` was reached.
    pub rejected: IntCounter,
}

/// Handles for one (service, endpoint).
pub struct EndpointMetrics {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub connect_failures: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub datagrams_in: IntCounter,
    pub datagrams_out: IntCounter,
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let labels = &["service", "endpoint"];
        let m = ProxyMetrics {
            connections: IntCounterVec::new(
                Opts::new("svcd_tcp_connections_total", "TCP connections proxied."),
                labels,
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "svcd_tcp_connections_active",
                    "Open proxied TCP connections.",
                ),
                labels,
            )?,
            connect_failures: IntCounterVec::new(
                Opts::new(
                    "svcd_tcp_connect_failures_total",
                    "Upstream connects refused or timed out.",
                ),
                labels,
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "svcd_tcp_bytes_total",
                    "Bytes proxied; direction in = client to instance.",
                ),
                &["service", "endpoint", "direction"],
            )?,
            datagrams: IntCounterVec::new(
                Opts::new(
                    "svcd_udp_datagrams_total",
                    "UDP datagrams proxied; direction in = client to instance.",
                ),
                &["service", "endpoint", "direction"],
            )?,
            no_healthy: IntCounterVec::new(
                Opts::new(
                    "svcd_proxy_no_healthy_endpoint_total",
                    "Connections or flows refused: no healthy instance.",
                ),
                &["service"],
            )?,
            rejected: IntCounter::new(
                "svcd_tcp_connections_rejected_total",
                "Connections closed at accept because proxy.max_connections was reached.",
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.connect_failures.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.datagrams.clone()))?;
        registry.register(Box::new(m.no_healthy.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        Ok(Arc::new(m))
    }

    pub fn no_healthy(&self, service: &str) -> IntCounter {
        self.no_healthy.with_label_values(&[service])
    }

    fn endpoint(&self, service: &str, endpoint: &str) -> EndpointMetrics {
        let l = [service, endpoint];
        EndpointMetrics {
            connections: self.connections.with_label_values(&l),
            active: self.active.with_label_values(&l),
            connect_failures: self.connect_failures.with_label_values(&l),
            bytes_in: self.bytes.with_label_values(&[service, endpoint, "in"]),
            bytes_out: self.bytes.with_label_values(&[service, endpoint, "out"]),
            datagrams_in: self.datagrams.with_label_values(&[service, endpoint, "in"]),
            datagrams_out: self
                .datagrams
                .with_label_values(&[service, endpoint, "out"]),
        }
    }
}

/// Endpoint id → handles for one listener's service, swapped whole when the service changes.
pub struct EndpointMetricsCache {
    service_label: String,
    by_endpoint: ArcSwap<HashMap<Box<str>, Arc<EndpointMetrics>>>,
    /// The `ServiceEndpoints` the map was built from.
    built_from: ArcSwap<Option<Arc<ServiceEndpoints>>>,
}

impl EndpointMetricsCache {
    pub fn new(service_label: String) -> Self {
        EndpointMetricsCache {
            service_label,
            by_endpoint: ArcSwap::from_pointee(HashMap::new()),
            built_from: ArcSwap::from_pointee(None),
        }
    }

    pub fn service_label(&self) -> &str {
        &self.service_label
    }

    /// Handles for `id`; refreshes the map (off the per-connection path) when `service` is a
    /// newer snapshot entry than the one it was built from.
    pub fn get(
        &self,
        metrics: &ProxyMetrics,
        service: &Arc<ServiceEndpoints>,
        id: &str,
    ) -> Arc<EndpointMetrics> {
        let current = self.built_from.load();
        if !current
            .as_ref()
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, service))
        {
            let old = self.by_endpoint.load();
            let map: HashMap<Box<str>, Arc<EndpointMetrics>> = service
                .all
                .iter()
                .map(|e| {
                    let handles = old
                        .get(&e.id)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(metrics.endpoint(&self.service_label, &e.id)));
                    (e.id.clone(), handles)
                })
                .collect();
            self.by_endpoint.store(Arc::new(map));
            self.built_from.store(Arc::new(Some(service.clone())));
        }
        self.by_endpoint
            .load()
            .get(id)
            .cloned()
            .unwrap_or_else(|| Arc::new(metrics.endpoint(&self.service_label, id)))
    }
}
