//! xDS metrics (docs/metrics.md): streams, pushes, ACKs and NACKs by type, push-to-ACK latency,
//! and the bounds' counters.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::names::ResourceType;

#[derive(Clone)]
pub struct XdsMetrics {
    /// Open ADS/CDS/EDS streams.
    pub streams: IntGauge,
    /// Streams refused at `xds.max_streams`.
    pub streams_refused: IntCounter,
    /// Connections closed at accept: `xds.max_streams` connections were open.
    pub connections_refused: IntCounter,
    /// Streams ended by a request past `xds.max_names`, or naming a type svcd does not serve.
    pub requests_rejected: IntCounterVec,
    /// Responses sent, by type.
    pub pushes: IntCounterVec,
    /// Changes folded into a push still waiting for a slow client (newest state wins).
    pub pushes_superseded: IntCounter,
    pub acks: IntCounterVec,
    pub nacks: IntCounterVec,
    /// From sending a response to its ACK, by type.
    pub push_ack_seconds: HistogramVec,
    /// Time to build one response (select and copy the encoded resources).
    pub build_seconds: Histogram,
}

impl XdsMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let by_type = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["type"]);
        let m = XdsMetrics {
            streams: IntGauge::new("svcd_xds_streams", "Open xDS streams (ADS, CDS, EDS).")?,
            connections_refused: IntCounter::new(
                "svcd_xds_connections_refused_total",
                "xDS connections closed at accept because xds.max_streams connections were open.",
            )?,
            streams_refused: IntCounter::new(
                "svcd_xds_streams_refused_total",
                "xDS streams refused because xds.max_streams were open.",
            )?,
            requests_rejected: IntCounterVec::new(
                Opts::new(
                    "svcd_xds_requests_rejected_total",
                    "xDS requests rejected (the stream is ended), by reason: too_many_names \
                     (past xds.max_names), unknown_type, malformed (not a DiscoveryRequest), \
                     too_large (past 16 MiB), compressed.",
                ),
                &["reason"],
            )?,
            pushes: by_type(
                "svcd_xds_pushes_total",
                "xDS responses sent, by resource type.",
            )?,
            pushes_superseded: IntCounter::new(
                "svcd_xds_pushes_superseded_total",
                "Changes folded into a push still waiting for a slow client (its queue holds the \
                 newest state only).",
            )?,
            acks: by_type(
                "svcd_xds_acks_total",
                "xDS responses ACKed, by resource type.",
            )?,
            nacks: by_type(
                "svcd_xds_nacks_total",
                "xDS responses NACKed (rejected by the client), by resource type.",
            )?,
            push_ack_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "svcd_xds_push_ack_seconds",
                    "Time from sending an xDS response to its ACK, by resource type.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["type"],
            )?,
            build_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "svcd_xds_response_build_seconds",
                    "Time to build one xDS response from the cached resources.",
                )
                .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
            )?,
        };
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.streams_refused.clone()))?;
        registry.register(Box::new(m.connections_refused.clone()))?;
        registry.register(Box::new(m.requests_rejected.clone()))?;
        registry.register(Box::new(m.pushes.clone()))?;
        registry.register(Box::new(m.pushes_superseded.clone()))?;
        registry.register(Box::new(m.acks.clone()))?;
        registry.register(Box::new(m.nacks.clone()))?;
        registry.register(Box::new(m.push_ack_seconds.clone()))?;
        registry.register(Box::new(m.build_seconds.clone()))?;
        // Every type's series exist from the start (a dashboard sees zeros, not gaps).
        for t in ResourceType::ALL {
            m.pushes.with_label_values(&[t.as_str()]);
            m.acks.with_label_values(&[t.as_str()]);
            m.nacks.with_label_values(&[t.as_str()]);
        }
        for reason in [
            "too_many_names",
            "unknown_type",
            "malformed",
            "too_large",
            "compressed",
        ] {
            m.requests_rejected.with_label_values(&[reason]);
        }
        Ok(m)
    }
}
