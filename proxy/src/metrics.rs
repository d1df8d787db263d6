//! L4 proxy metrics, per listener, service and endpoint. Handles for an endpoint are created
//! once, when the listener's balancer first sees the endpoint, and kept in its slot
//! ([`L4Slots`]); a connection touches resolved handles only. Every handle set removes its series
//! when dropped: an endpoint's series go when it leaves the registry (the load balancer prunes
//! it after the publish), a listener's when the listener is removed or retargeted. A listener
//! has the series of its own transport only: a TCP listener no `svcd_udp_*`, a UDP listener no
//! `svcd_tcp_*`.

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
    /// Directions of proxied TCP connections moved by splice(2) (`[0]`) or by the user-space
    /// copy (`[1]`: splice off, or no pipe could be had), so a silent fallback shows.
    pub relay_paths: [IntCounter; 2],
    /// The descriptor budget, whose refusal series are per listener too.
    pub fds: Arc<FdBudget>,
}

/// The L4 transport a listener serves: which families its series belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    /// The config key of its listeners.
    pub fn key(self) -> &'static str {
        match self {
            Transport::Tcp => "proxy.tcp",
            Transport::Udp => "proxy.udp",
        }
    }

    /// The prefix of its listeners' `listener` label.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Handles for one (listener, service, endpoint), of the listener's transport; the series go
/// when the last handle does.
pub struct EndpointMetrics {
    all: Arc<ProxyMetrics>,
    labels: [String; 3],
    counters: EndpointCounters,
}

enum EndpointCounters {
    Tcp(TcpEndpointCounters),
    Udp(UdpEndpointCounters),
}

/// A TCP listener's counts for one endpoint.
pub struct TcpEndpointCounters {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub connect_failures: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

/// A UDP listener's counts for one endpoint.
pub struct UdpEndpointCounters {
    pub datagrams_in: IntCounter,
    pub datagrams_out: IntCounter,
}

impl EndpointMetrics {
    /// The counts of a TCP listener; `None` on a UDP listener's endpoint.
    pub fn tcp(&self) -> Option<&TcpEndpointCounters> {
        match &self.counters {
            EndpointCounters::Tcp(c) => Some(c),
            EndpointCounters::Udp(_) => None,
        }
    }

    /// The counts of a UDP listener; `None` on a TCP listener's endpoint.
    pub fn udp(&self) -> Option<&UdpEndpointCounters> {
        match &self.counters {
            EndpointCounters::Udp(c) => Some(c),
            EndpointCounters::Tcp(_) => None,
        }
    }
}

impl Drop for EndpointMetrics {
    fn drop(&mut self) {
        let [l, s, e] = &self.labels;
        let base = [l.as_str(), s.as_str(), e.as_str()];
        let m = &self.all;
        let directions = |dir| [base[0], base[1], base[2], dir];
        match self.counters {
            EndpointCounters::Tcp(_) => {
                let _ = m.connections.remove_label_values(&base);
                let _ = m.active.remove_label_values(&base);
                let _ = m.connect_failures.remove_label_values(&base);
                for d in ["in", "out"] {
                    let _ = m.bytes.remove_label_values(&directions(d));
                }
            }
            EndpointCounters::Udp(_) => {
                for d in ["in", "out"] {
                    let _ = m.datagrams.remove_label_values(&directions(d));
                }
            }
        }
    }
}

/// Handles for one listener, of its transport; its series go with it.
pub struct ListenerMetrics {
    all: Arc<ProxyMetrics>,
    labels: [String; 2],
    /// Connections or flows refused: no instance could be picked or reached.
    pub no_healthy: IntCounter,
    /// Connections closed at accept, or flows refused: the descriptor budget was spent.
    pub fd_refusals: IntCounter,
    counters: ListenerCounters,
}

enum ListenerCounters {
    /// TCP connections closed at accept because `proxy.max_connections` was reached.
    Tcp { rejected: IntCounter },
    /// UDP: open flows, and flows evicted to make room (`max_flows` or the budget).
    Udp {
        flows: IntGauge,
        evictions: IntCounter,
    },
}

impl ListenerMetrics {
    /// A TCP connection closed at accept by `proxy.max_connections`.
    pub fn rejected(&self) {
        if let ListenerCounters::Tcp { rejected } = &self.counters {
            rejected.inc();
        }
    }

    /// The open flows of a UDP listener.
    pub fn set_flows(&self, n: usize) {
        if let ListenerCounters::Udp { flows, .. } = &self.counters {
            flows.set(n as i64);
        }
    }

    /// A UDP flow closed to make room for a new client.
    pub fn evicted(&self) {
        if let ListenerCounters::Udp { evictions, .. } = &self.counters {
            evictions.inc();
        }
    }
}

impl Drop for ListenerMetrics {
    fn drop(&mut self) {
        let [l, s] = &self.labels;
        let _ = self.all.no_healthy.remove_label_values(&[l, s]);
        match self.counters {
            ListenerCounters::Tcp { .. } => {
                let _ = self.all.rejected.remove_label_values(&[l]);
            }
            ListenerCounters::Udp { .. } => {
                let _ = self.all.flows.remove_label_values(&[l]);
                let _ = self.all.evictions.remove_label_values(&[l]);
            }
        }
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
            relay_paths: {
                let paths = IntCounterVec::new(
                    Opts::new(
                        "svcd_tcp_relay_directions_total",
                        "Directions of proxied TCP connections, by how their bytes moved: \
                         splice (zero-copy) or copy (user space).",
                    ),
                    &["path"],
                )?;
                registry.register(Box::new(paths.clone()))?;
                [
                    paths.with_label_values(&["splice"]),
                    paths.with_label_values(&["copy"]),
                ]
            },
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

    /// The handles of `transport` listener `listener` (`tcp/<addr>` or `udp/<addr>`) targeting
    /// `service`.
    pub fn listener(
        self: &Arc<Self>,
        transport: Transport,
        listener: &str,
        service: &str,
    ) -> ListenerMetrics {
        let counters = match transport {
            Transport::Tcp => ListenerCounters::Tcp {
                rejected: self.rejected.with_label_values(&[listener]),
            },
            Transport::Udp => ListenerCounters::Udp {
                flows: self.flows.with_label_values(&[listener]),
                evictions: self.evictions.with_label_values(&[listener]),
            },
        };
        ListenerMetrics {
            all: self.clone(),
            labels: [listener.into(), service.into()],
            no_healthy: self.no_healthy.with_label_values(&[listener, service]),
            fd_refusals: self.fds.refusals(listener),
            counters,
        }
    }

    /// `svcd_proxy_no_healthy_total{listener, service}` of one of a listener's targets.
    pub fn no_healthy(&self, listener: &str, service: &str) -> IntCounter {
        self.no_healthy.with_label_values(&[listener, service])
    }

    /// Removes that series (an SNI route's target a reload removed).
    pub fn forget_no_healthy(&self, listener: &str, service: &str) {
        let _ = self.no_healthy.remove_label_values(&[listener, service]);
    }

    fn endpoint(
        self: &Arc<Self>,
        transport: Transport,
        listener: &str,
        service: &str,
        endpoint: &str,
    ) -> EndpointMetrics {
        let l = [listener, service, endpoint];
        let d = |dir| [listener, service, endpoint, dir];
        let counters = match transport {
            Transport::Tcp => EndpointCounters::Tcp(TcpEndpointCounters {
                connections: self.connections.with_label_values(&l),
                active: self.active.with_label_values(&l),
                connect_failures: self.connect_failures.with_label_values(&l),
                bytes_in: self.bytes.with_label_values(&d("in")),
                bytes_out: self.bytes.with_label_values(&d("out")),
            }),
            Transport::Udp => EndpointCounters::Udp(UdpEndpointCounters {
                datagrams_in: self.datagrams.with_label_values(&d("in")),
                datagrams_out: self.datagrams.with_label_values(&d("out")),
            }),
        };
        EndpointMetrics {
            all: self.clone(),
            labels: [listener.into(), service.into(), endpoint.into()],
            counters,
        }
    }
}

/// The L4 plane's [`SlotFactory`], one per listener: each endpoint's slot carries that listener's
/// handles for it.
pub struct L4Slots {
    pub metrics: Arc<ProxyMetrics>,
    /// The listener's transport: its endpoints get that transport's series only.
    pub transport: Transport,
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
        Some(self.metrics.endpoint(
            self.transport,
            &self.listener,
            service.as_str(),
            &endpoint.id,
        ))
    }
}
