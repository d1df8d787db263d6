//! DNS metrics. Label sets are closed (known query types and rcodes, "other" for the rest) so a
//! client cannot grow the series count, and every handle is resolved at start-up: counting a
//! query is one atomic add.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

pub const PROTOS: [&str; 2] = ["udp", "tcp"];
const QTYPES: [&str; 10] = [
    "A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "ANY", "HINFO", "other",
];
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp = 0,
    Tcp = 1,
}

pub fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::SRV => 2,
        RecordType::PTR => 3,
        RecordType::TXT => 4,
        RecordType::SOA => 5,
        RecordType::NS => 6,
        RecordType::ANY => 7,
        RecordType::HINFO => 8,
        _ => 9,
    }
}

pub fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

pub struct DnsMetrics {
    /// [proto][qtype][rcode]
    requests: Vec<IntCounter>,
    pub duration: Histogram,
    pub forwarded_ok: IntCounter,
    pub forwarded_failed: IntCounter,
    pub dropped: IntCounter,
    /// Answers over a client network's rate: sent truncated, or dropped.
    pub rrl_truncated: IntCounter,
    pub rrl_dropped: IntCounter,
    /// Open DNS-over-TCP connections.
    pub tcp_open: prometheus::IntGauge,
    /// Connections closed at accept: over the total or the per-client limit.
    pub tcp_refused_total: IntCounter,
    pub tcp_refused_client: IntCounter,
    /// Connections closed for sitting without a complete query for the idle timeout.
    pub tcp_idle_closed: IntCounter,
    /// 1 while forwarding is stopped because a forwarded query came back (a loop).
    pub forward_loop: prometheus::IntGauge,
    /// Questions waiting on an upstream now (identical ones once).
    pub forward_in_flight: prometheus::IntGauge,
    /// Questions answered SERVFAIL at once, by the bound they met (see [`crate::inflight::Limit`]).
    forward_overflow: [IntCounter; 3],
    /// Queries that joined an identical question already waiting on the upstream.
    pub forward_coalesced: IntCounter,
}

impl DnsMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "svcd_dns_requests_total",
                "DNS requests answered, by transport, query type and rcode.",
            ),
            &["proto", "qtype", "rcode"],
        )?;
        let mut requests = Vec::with_capacity(PROTOS.len() * QTYPES.len() * RCODES.len());
        for p in PROTOS {
            for q in QTYPES {
                for r in RCODES {
                    requests.push(requests_vec.with_label_values(&[p, q, r]));
                }
            }
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "svcd_dns_request_duration_seconds",
                "Time from request received to response sent.",
            )
            .buckets(vec![
                0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0,
            ]),
        )?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "svcd_dns_forwarded_total",
                "Queries for names outside the zone sent upstream, by result.",
            ),
            &["result"],
        )?;
        let dropped = IntCounter::new(
            "svcd_dns_dropped_total",
            "Packets dropped unanswered (shorter than a header, or a response).",
        )?;
        let rrl = IntCounterVec::new(
            Opts::new(
                "svcd_dns_rrl_limited_total",
                "UDP answers over their client network's rate (dns.rrl), by what was sent instead.",
            ),
            &["action"],
        )?;
        let tcp_open = prometheus::IntGauge::new(
            "svcd_dns_tcp_connections",
            "Open DNS-over-TCP connections.",
        )?;
        let tcp_refused = IntCounterVec::new(
            Opts::new(
                "svcd_dns_tcp_refused_total",
                "DNS-over-TCP connections closed at accept, by the limit they met.",
            ),
            &["limit"],
        )?;
        let tcp_idle_closed = IntCounter::new(
            "svcd_dns_tcp_idle_closed_total",
            "DNS-over-TCP connections closed after dns.tcp.idle_timeout without a complete query.",
        )?;
        let forward_loop = prometheus::IntGauge::new(
            "svcd_dns_forward_loop",
            "1 while forwarding is stopped because a query svcd forwarded came back to it.",
        )?;
        let forward_in_flight = prometheus::IntGauge::new(
            "svcd_dns_forward_in_flight",
            "Questions for names outside the zone waiting on an upstream now (identical questions \
             asked together count once).",
        )?;
        let forward_overflow = IntCounterVec::new(
            Opts::new(
                "svcd_dns_forward_overflow_total",
                "Queries for names outside the zone answered SERVFAIL at once, not forwarded, by the \
                 bound they met (dns.forwarding).",
            ),
            &["limit"],
        )?;
        let forward_coalesced = IntCounter::new(
            "svcd_dns_forward_coalesced_total",
            "Queries for names outside the zone answered from an identical question already \
             waiting on the upstream, instead of a query of their own.",
        )?;
        registry.register(Box::new(forward_in_flight.clone()))?;
        registry.register(Box::new(forward_overflow.clone()))?;
        registry.register(Box::new(forward_coalesced.clone()))?;
        registry.register(Box::new(forward_loop.clone()))?;
        registry.register(Box::new(requests_vec))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(rrl.clone()))?;
        registry.register(Box::new(tcp_open.clone()))?;
        registry.register(Box::new(tcp_refused.clone()))?;
        registry.register(Box::new(tcp_idle_closed.clone()))?;
        Ok(DnsMetrics {
            requests,
            duration,
            forwarded_ok: forwarded.with_label_values(&["ok"]),
            forwarded_failed: forwarded.with_label_values(&["error"]),
            dropped,
            rrl_truncated: rrl.with_label_values(&["truncated"]),
            rrl_dropped: rrl.with_label_values(&["dropped"]),
            tcp_open,
            tcp_refused_total: tcp_refused.with_label_values(&["total"]),
            tcp_refused_client: tcp_refused.with_label_values(&["per_client"]),
            tcp_idle_closed,
            forward_loop,
            forward_in_flight,
            forward_overflow: [
                forward_overflow.with_label_values(&["worker"]),
                forward_overflow.with_label_values(&["total"]),
                forward_overflow.with_label_values(&["waiters"]),
            ],
            forward_coalesced,
        })
    }

    /// Counts a query refused by the forwarding bound `limit`.
    pub fn forward_overflow(&self, limit: crate::inflight::Limit) -> &IntCounter {
        use crate::inflight::Limit;
        &self.forward_overflow[match limit {
            Limit::Worker => 0,
            Limit::Total => 1,
            Limit::Waiters => 2,
        }]
    }

    #[inline]
    pub fn request(&self, proto: Proto, qtype: usize, rcode: usize) -> &IntCounter {
        &self.requests[(proto as usize * QTYPES.len() + qtype) * RCODES.len() + rcode]
    }

    #[inline]
    pub fn record(&self, proto: Proto, qtype: usize, rcode: usize, took: Duration) {
        self.request(proto, qtype, rcode).inc();
        self.duration.observe(took.as_secs_f64());
    }
}
