//! L4 proxy metrics, per listener, service and endpoint. Handles for an endpoint are created
//! once, when the listener's balancer first sees the endpoint, and kept in its slot
//! ([`L4Slots`]); a connection touches resolved handles only. Every handle set removes its series
//! when dropped: an endpoint's series go when it leaves the registry (the load balancer prunes
//! it after the publish), a listener's when the listener is removed or retargeted.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use svcd_lb::{ServiceName, SlotFactory};

use crate::fds::FdBudget;
use svcd_registry::Endpoint;

pub struct ProxyMetrics {
    connections: IntCounterVec,
    active: IntGaugeVec,
    connect_failures: IntCounterVec,
    bytes: IntCounterVec,
    datagrams: IntCounterVec,
    no_healthy: IntCounterVec,
    rejected: IntCounterVec,
    flows: IntGaugeVec,
    evictions: IntCounterVec,
    /// The descriptor budget, whose refusal series are per listener too.
    pub fds: Arc<FdBudget>,
}

/// Handles for one (listener, service, endpoint); the series go when the last handle does.
pub struct EndpointMetrics {
    all: Arc<ProxyMetrics>,
    labels: [String; 3],
    pub connections: IntCounter,
    pub active: IntGauge,
    pub connect_failures: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub datagrams_in: IntCounter,
    pub datagrams_out: IntCounter,
}

impl Drop for EndpointMetrics {
    fn drop(&mut self) {
        let [l, s, e] = &self.labels;
        let base = [l.as_str(), s.as_str(), e.as_str()];
        let m = &self.all;
        let _ = m.connections.remove_label_values(&base);
        let _ = m.active.remove_label_values(&base);
        let _ = m.connect_failures.remove_label_values(&base);
        for d in ["in", "out"] {
            let with = [base[0], base[1], base[2], d];
            let _ = m.bytes.remove_label_values(&with);
            let _ = m.datagrams.remove_label_values(&with);
        }
    }
}

/// Handles for one listener; its series go with it.
pub struct ListenerMetrics {
    all: Arc<ProxyMetrics>,
    labels: [String; 2],
    /// Connections or flows refused: no instance could be picked or reached.
    pub no_healthy: IntCounter,
    /// TCP connections closed at accept because `proxy.max_connections` was reached.
    pub rejected: IntCounter,
    /// Connections closed at accept, or flows refused: the descriptor budget was spent.
    pub fd_refusals: IntCounter,
    /// UDP: open flows, and flows evicted to make room (`max_flows` or the budget).
    pub flows: IntGauge,
    pub evictions: IntCounter,
}

impl Drop for ListenerMetrics {
    fn drop(&mut self) {
        let [l, s] = &self.labels;
        let _ = self.all.no_healthy.remove_label_values(&[l, s]);
        let _ = self.all.rejected.remove_label_values(&[l]);
        let _ = self.all.flows.remove_label_values(&[l]);
        let _ = self.all.evictions.remove_label_values(&[l]);
        self.all.fds.forget(l);
    }
}

impl ProxyMetrics {
    pub fn new(registry: &Registry, fds: Arc<FdBudget>) -> prometheus::Result<Arc<Self>> {
        let labels = &["listener", "service", "endpoint"];
        let with_direction = &["listener", "service", "endpoint", "direction"];
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
                with_direction,
            )?,
            datagrams: IntCounterVec::new(
                Opts::new(
                    "svcd_udp_datagrams_total",
                    "UDP datagrams proxied; direction in = client to instance.",
                ),
                with_direction,
            )?,
            no_healthy: IntCounterVec::new(
                Opts::new(
                    "svcd_proxy_no_healthy_endpoint_total",
                    "Connections or flows refused: no instance could be picked or reached.",
                ),
                &["listener", "service"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "svcd_tcp_connections_rejected_total",
                    "Connections closed at accept because proxy.max_connections was reached.",
                ),
                &["listener"],
            )?,
            flows: IntGaugeVec::new(
                Opts::new(
                    "svcd_udp_flows",
                    "Open UDP flows (client → instance), by listener.",
                ),
                &["listener"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "svcd_udp_flow_evictions_total",
                    "UDP flows closed to make room for a new client (max_flows reached, or the \
                     descriptor budget spent), by listener.",
                ),
                &["listener"],
            )?,
            fds,
        };
        registry.register(Box::new(m.flows.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.connect_failures.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.datagrams.clone()))?;
        registry.register(Box::new(m.no_healthy.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        Ok(Arc::new(m))
    }

    pub fn listener(self: &Arc<Self>, listener: &str, service: &str) -> ListenerMetrics {
        ListenerMetrics {
            all: self.clone(),
            labels: [listener.into(), service.into()],
            no_healthy: self.no_healthy.with_label_values(&[listener, service]),
            rejected: self.rejected.with_label_values(&[listener]),
            fd_refusals: self.fds.refusals(listener),
            flows: self.flows.with_label_values(&[listener]),
            evictions: self.evictions.with_label_values(&[listener]),
        }
    }

    fn endpoint(
        self: &Arc<Self>,
        listener: &str,
        service: &str,
        endpoint: &str,
    ) -> EndpointMetrics {
        let l = [listener, service, endpoint];
        let d = |dir| [listener, service, endpoint, dir];
        EndpointMetrics {
            all: self.clone(),
            labels: [listener.into(), service.into(), endpoint.into()],
            connections: self.connections.with_label_values(&l),
            active: self.active.with_label_values(&l),
            connect_failures: self.connect_failures.with_label_values(&l),
            bytes_in: self.bytes.with_label_values(&d("in")),
            bytes_out: self.bytes.with_label_values(&d("out")),
            datagrams_in: self.datagrams.with_label_values(&d("in")),
            datagrams_out: self.datagrams.with_label_values(&d("out")),
        }
    }
}

/// The L4 plane's [`SlotFactory`], one per listener: each endpoint's slot carries that listener's
/// handles for it.
pub struct L4Slots {
    pub metrics: Arc<ProxyMetrics>,
    /// `tcp/<addr>` or `udp/<addr>`.
    pub listener: String,
}

impl SlotFactory for L4Slots {
    type Extra = EndpointMetrics;
    type Service = ();

    fn make_service(&self, _: &ServiceName) {}

    fn make(
        &self,
        service: &ServiceName,
        endpoint: &Endpoint,
        _: SocketAddr,
    ) -> Option<EndpointMetrics> {
        Some(
            self.metrics
                .endpoint(&self.listener, service.as_str(), &endpoint.id),
        )
    }
}
