//! The general DNS request path, on hickory: every query the fast path does not take (and every
//! TCP query) is answered here, from the same [`crate::answer`] rules.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use svcd_config::DnsConfig;
use svcd_registry::SnapshotReader;
use tracing::{debug, warn};

use crate::answer::{resolve, Answer, Question, Resolution, ZoneSettings};
use crate::forward::Forwarder;
use crate::metrics::{qtype_index, rcode_index, DnsMetrics, Proto};

/// Our advertised EDNS UDP payload size (DNS flag day 2020), and the most we send over UDP.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Shared by both serving paths. Readers never lock: settings and the forwarder are swapped
/// whole on reload; the snapshot comes from the registry's arc-swap.
pub struct DnsResponder {
    pub zone: ArcSwap<ZoneSettings>,
    pub snapshot: SnapshotReader,
    /// Round-robin position shared by all queries: `Relaxed` is enough, only spread matters.
    pub rotation: AtomicUsize,
    forwarder: ArcSwapOption<Forwarder>,
    /// Upstreams the current forwarder was built for, to rebuild only when they change.
    forward_config: ArcSwap<Vec<std::net::SocketAddr>>,
    /// The addresses this server listens on, never used as upstreams (set once bound).
    own: ArcSwap<Vec<std::net::SocketAddr>>,
    pub metrics: DnsMetrics,
    /// UDP response rate limiting (`dns.rrl`), consulted by the UDP workers per packet.
    pub rrl: crate::rrl::RateLimiter,
    /// DNS-over-TCP limits (`dns.tcp`), read at each accept.
    pub tcp_limits: ArcSwap<svcd_config::DnsTcpConfig>,
}

impl DnsResponder {
    pub fn new(config: &DnsConfig, snapshot: SnapshotReader, metrics: DnsMetrics) -> Arc<Self> {
        let responder = Arc::new(DnsResponder {
            zone: ArcSwap::from_pointee(ZoneSettings::new(config)),
            snapshot,
            rotation: AtomicUsize::new(0),
            forwarder: ArcSwapOption::empty(),
            forward_config: ArcSwap::from_pointee(Vec::new()),
            own: ArcSwap::from_pointee(Vec::new()),
            metrics,
            rrl: crate::rrl::RateLimiter::new(&config.rrl),
            tcp_limits: ArcSwap::from_pointee(config.tcp.clone()),
        });
        responder.reconfigure(config);
        responder
    }

    /// Applies reloadable DNS settings (domain, TTLs, limits, upstreams).
    pub fn reconfigure(&self, config: &DnsConfig) {
        self.zone.store(Arc::new(ZoneSettings::new(config)));
        self.rrl.reconfigure(&config.rrl);
        self.tcp_limits.store(Arc::new(config.tcp.clone()));
        // resolv.conf files are read again on every reload.
        let upstreams = crate::forward::upstreams(&config.forward, &self.own.load());
        if **self.forward_config.load() != upstreams {
            let forwarder = if upstreams.is_empty() {
                if !config.forward.is_empty() {
                    warn!(
                        "dns.forward names no usable upstream; out-of-zone queries will be refused"
                    );
                }
                None
            } else {
                match Forwarder::new(&upstreams) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        warn!(error = %e, "cannot build DNS forwarder; out-of-zone queries will be refused");
                        None
                    }
                }
            };
            self.forwarder.store(forwarder);
            self.metrics.forward_loop.set(0);
            self.forward_config.store(Arc::new(upstreams));
        }
    }

    /// Records where this server listens (its own addresses are never upstreams) and applies
    /// `config` again with that known.
    pub fn set_own_addresses(&self, own: Vec<std::net::SocketAddr>, config: &DnsConfig) {
        self.own.store(Arc::new(own));
        self.reconfigure(config);
    }

    /// The current forwarder's loop probe name, if forwarding is on.
    pub fn loop_probe(&self) -> Option<hickory_proto::rr::Name> {
        self.forwarder.load().as_ref().map(|f| f.probe.clone())
    }

    /// Counts a probe about to be sent; false when forwarding is off or a loop is already found
    /// (no probe needed).
    pub fn probe_sending(&self) -> bool {
        match self.forwarder.load().as_ref() {
            Some(f) if !f.looped.load(Ordering::Relaxed) => {
                f.probe_sending();
                true
            }
            _ => false,
        }
    }

    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// Answers one parsed request through `handle`.
    pub async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let proto = if request.protocol() == Protocol::Udp {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        let zone = self.zone.load_full();
        let query = request.queries.queries().first();
        let qtype = query.map(|q| qtype_index(q.query_type())).unwrap_or(9);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = zone.forward;
        let edns_version = request.edns.as_ref().map(Edns::version).unwrap_or(0);

        // Protocol-level refusals first, then the question.
        let early = if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if edns_version > 0 {
            Some(ResponseCode::BADVERS)
        } else if request.queries.len() != 1 {
            Some(ResponseCode::FormErr)
        } else if query
            .is_some_and(|q| q.query_class() != DNSClass::IN && q.query_class() != DNSClass::ANY)
        {
            Some(ResponseCode::Refused)
        } else {
            None
        };

        let answer = match (early, query) {
            (Some(_), _) | (None, None) => Answer {
                rcode: early.unwrap_or(ResponseCode::FormErr),
                ..Answer::default()
            },
            (None, Some(q)) => {
                let limit = (proto == Proto::Udp).then_some(zone.max_answers);
                let question = Question {
                    name: q.original().name(),
                    qtype: q.query_type(),
                    rotation: self.next_rotation(),
                    limit,
                };
                let snapshot = self.snapshot.load();
                match resolve(&zone, &snapshot, &question) {
                    Resolution::Authoritative(answer) => {
                        meta.authoritative = true;
                        answer
                    }
                    Resolution::Refused => Answer {
                        rcode: ResponseCode::Refused,
                        ..Answer::default()
                    },
                    Resolution::Forward => self.forward(&question).await,
                }
            }
        };
        meta.response_code = answer.rcode;

        let response_edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD)
                .set_version(0)
                .set_dnssec_ok(req.flags().dnssec_ok); // RFC 3225
            e
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &response_edns {
            builder.edns(e);
        }
        let response = builder.build(
            meta,
            answer.answers.iter(),
            answer.authorities.iter(),
            std::iter::empty::<&Record>(),
            answer.additionals.iter(),
        );
        let info = match handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "DNS response not sent");
                let mut header = Metadata::response_from_request(&request.metadata);
                header.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata: header,
                    counts: Default::default(),
                })
            }
        };
        self.metrics
            .record(proto, qtype, rcode_index(answer.rcode), started.elapsed());
        info
    }

    async fn forward(&self, question: &Question<'_>) -> Answer {
        let Some(forwarder) = self.forwarder.load_full() else {
            return Answer {
                rcode: ResponseCode::Refused,
                ..Answer::default()
            };
        };
        let (rcode, answers) = forwarder.forward(question.name, question.qtype).await;
        if forwarder.looped.load(Ordering::Relaxed) {
            self.metrics.forward_loop.set(1);
        }
        if rcode == ResponseCode::ServFail {
            self.metrics.forwarded_failed.inc();
        } else {
            self.metrics.forwarded_ok.inc();
        }
        Answer {
            rcode,
            answers,
            ..Answer::default()
        }
    }
}
