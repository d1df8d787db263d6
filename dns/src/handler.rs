//! The general DNS request path, on hickory: every query the fast path does not take (and every
//! TCP query) is answered here, from the same [`crate::answer`] rules. Nothing here waits: a
//! question for the upstream comes back as [`Step::Forward`] for [`crate::forwarding`] to ask.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use svcd_config::DnsConfig;
use svcd_registry::SnapshotReader;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::answer::{resolve, Answer, Question, Resolution, ZoneSettings};
use crate::forward::Forwarder;
use crate::inflight::{InFlight, Lane, QuestionKey};
use crate::metrics::{qtype_index, rcode_index, DnsMetrics, Proto};
use crate::pending::{PendingQuery, Step, Waiter};

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
    /// What the current forwarder was built for (upstreams, timeout), to rebuild only when that
    /// changes.
    forward_config: ArcSwap<(Vec<SocketAddr>, Duration)>,
    /// The addresses this server listens on, never used as upstreams (set once bound).
    own: ArcSwap<Vec<SocketAddr>>,
    pub metrics: DnsMetrics,
    /// UDP response rate limiting (`dns.rrl`), consulted by the UDP workers per packet.
    pub rrl: crate::rrl::RateLimiter,
    /// DNS-over-TCP limits (`dns.tcp`), read at each accept.
    pub tcp_limits: ArcSwap<svcd_config::DnsTcpConfig>,
    /// Forwarded questions under way, within `dns.forwarding`'s bounds.
    pub inflight: Arc<InFlight<Waiter>>,
    /// The lane of DNS over TCP (all connections together) and of callers without a worker.
    pub(crate) general_lane: Arc<Lane>,
    /// Cancelled at shutdown: questions still waiting on an upstream are answered SERVFAIL.
    pub(crate) forward_stop: CancellationToken,
}

impl DnsResponder {
    pub fn new(config: &DnsConfig, snapshot: SnapshotReader, metrics: DnsMetrics) -> Arc<Self> {
        let inflight = InFlight::new(
            config.forwarding.max_in_flight,
            config.forwarding.max_in_flight_per_worker,
            metrics.forward_in_flight.clone(),
        );
        let responder = Arc::new(DnsResponder {
            zone: ArcSwap::from_pointee(ZoneSettings::new(config)),
            snapshot,
            rotation: AtomicUsize::new(0),
            forwarder: ArcSwapOption::empty(),
            forward_config: ArcSwap::from_pointee((Vec::new(), Duration::ZERO)),
            own: ArcSwap::from_pointee(Vec::new()),
            metrics,
            rrl: crate::rrl::RateLimiter::new(&config.rrl),
            tcp_limits: ArcSwap::from_pointee(config.tcp.clone()),
            inflight,
            general_lane: Lane::new(),
            forward_stop: CancellationToken::new(),
        });
        responder.reconfigure(config);
        responder
    }

    /// Applies reloadable DNS settings (domain, TTLs, limits, upstreams).
    pub fn reconfigure(&self, config: &DnsConfig) {
        let mut zone = ZoneSettings::new(config);
        zone.consul = self.zone.load().consul.clone();
        self.zone.store(Arc::new(zone));
        self.rrl.reconfigure(&config.rrl);
        self.tcp_limits.store(Arc::new(config.tcp.clone()));
        let limits = &config.forwarding;
        self.inflight
            .set_limits(limits.max_in_flight, limits.max_in_flight_per_worker);
        // resolv.conf files are read again on every reload.
        let upstreams = crate::forward::upstreams(&config.forward, &self.own.load());
        let wanted = (upstreams, limits.timeout);
        if **self.forward_config.load() != wanted {
            let forwarder = if wanted.0.is_empty() {
                if !config.forward.is_empty() {
                    warn!(
                        "dns.forward names no usable upstream; out-of-zone queries will be refused"
                    );
                }
                None
            } else {
                match Forwarder::new(&wanted.0, wanted.1) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        warn!(error = %e, "cannot build DNS forwarder; out-of-zone queries will be refused");
                        None
                    }
                }
            };
            self.forwarder.store(forwarder);
            self.metrics.forward_loop.set(0);
            self.forward_config.store(Arc::new(wanted));
        }
    }

    /// Serves Consul-style names per `[consul]` (none when it is off); on start and reload.
    pub fn set_consul(&self, consul: &svcd_config::ConsulConfig) {
        let wanted = crate::consul::ConsulZone::new(consul).map(Arc::new);
        let current = self.zone.load();
        if current.consul.as_deref() == wanted.as_deref() {
            return;
        }
        let mut zone = (**current).clone();
        zone.consul = wanted;
        self.zone.store(Arc::new(zone));
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

    /// One query's answer, or the question to ask upstream (see [`crate::forwarding`]), over
    /// `protocol` (UDP: sized to what the client can receive; TCP: up to 64 KiB). Never waits:
    /// everything in the zone, every refusal and every error is answered here, on the caller's
    /// thread. `Done(None)` means drop.
    pub fn answer_now(&self, packet: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Step {
        let started = Instant::now();
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            self.metrics.dropped.inc();
            return Step::Done(None); // no header, or a response: never answer (reflection loops)
        }
        let proto = match protocol {
            Protocol::Udp => Proto::Udp,
            _ => Proto::Tcp,
        };
        let request = match Request::from_bytes(packet.clone(), src, protocol) {
            Ok(r) => r,
            Err(e) => {
                debug!(%src, error = %e, "malformed DNS packet");
                self.metrics
                    .record(proto, 9, rcode_index(ResponseCode::FormErr), Duration::ZERO);
                return Step::Done(Some(formerr(&packet)));
            }
        };
        let max_size = match (&request.edns, protocol) {
            (_, Protocol::Tcp) => u16::MAX,
            (Some(edns), _) => edns.max_payload().clamp(512, EDNS_PAYLOAD),
            (None, _) => 512,
        };
        let zone = self.zone.load_full();
        let query = request.queries.queries().first();
        let qtype = query.map(|q| qtype_index(q.query_type())).unwrap_or(9);
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

        let (answer, authoritative) = match (early, query) {
            (Some(_), _) | (None, None) => {
                (Answer::rcode(early.unwrap_or(ResponseCode::FormErr)), false)
            }
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
                    Resolution::Authoritative(answer) => (answer, true),
                    Resolution::Refused => (Answer::rcode(ResponseCode::Refused), false),
                    Resolution::Forward => match self.forwardable(&request) {
                        Ok(key) => {
                            return Step::Forward(Box::new(PendingQuery {
                                request,
                                key,
                                max_size,
                                proto,
                                qtype,
                                recursion_available: zone.forward,
                                started,
                            }))
                        }
                        Err(answer) => (answer, false),
                    },
                }
            }
        };
        let out = self.reply(&request, zone.forward, authoritative, &answer, max_size);
        self.metrics
            .record(proto, qtype, rcode_index(answer.rcode), started.elapsed());
        Step::Done(out)
    }

    /// The answer to a query that waited on the upstream: `answer` is what came back for its
    /// question (shared by every query that asked it), the ID, question spelling and EDNS are
    /// the query's own.
    pub fn finish(&self, query: &PendingQuery, answer: &Answer) -> Option<Vec<u8>> {
        let out = self.reply(
            &query.request,
            query.recursion_available,
            false,
            answer,
            query.max_size,
        );
        self.metrics.record(
            query.proto,
            query.qtype,
            rcode_index(answer.rcode),
            query.started.elapsed(),
        );
        out
    }

    /// Encodes the response to `request` carrying `answer`, within `max_size` (cut at a record
    /// boundary with TC set when it does not fit). `None` when it cannot be encoded at all.
    fn reply(
        &self,
        request: &Request,
        recursion_available: bool,
        authoritative: bool,
        answer: &Answer,
        max_size: u16,
    ) -> Option<Vec<u8>> {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = recursion_available;
        meta.authoritative = authoritative;
        meta.response_code = answer.rcode;
        meta.truncation = answer.truncated;
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
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max_size);
        if let Err(e) = response.destructive_emit(&mut encoder) {
            debug!(error = %e, "DNS response not encoded");
            return None;
        }
        cut_at_record_boundary(&mut bytes);
        Some(bytes)
    }

    /// The question of `request`, for a name outside the zone, as it is asked upstream; or the
    /// answer when it is not: REFUSED without forwarding (never an open resolver), SERVFAIL while
    /// forwarding is stopped by a loop.
    fn forwardable(&self, request: &Request) -> Result<QuestionKey, Answer> {
        let Some(forwarder) = self.forwarder.load_full() else {
            return Err(Answer::rcode(ResponseCode::Refused));
        };
        let q = request.queries.queries().first().expect("one question");
        if forwarder.stopped_for(q.original().name()) {
            self.metrics.forward_loop.set(1);
            self.metrics.forwarded_failed.inc();
            return Err(Answer::rcode(ResponseCode::ServFail));
        }
        let dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        Ok(QuestionKey::new(
            q.original().name(),
            q.query_type(),
            q.query_class(),
            dnssec_ok,
        ))
    }

    /// Asks the upstream `key`'s question (SERVFAIL when forwarding was switched off meanwhile
    /// or nothing answered in time) and counts the result.
    pub(crate) async fn ask_upstream(&self, key: &QuestionKey) -> Answer {
        let Some(forwarder) = self.forwarder.load_full() else {
            return Answer::rcode(ResponseCode::Refused);
        };
        let (rcode, answers) = forwarder.lookup(&key.name, key.qtype).await;
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

/// A response that did not fit the client's UDP size may end in a cut-off record (hickory
/// stops mid-record without EDNS, counting only the whole ones). Keep only whole, counted
/// records: truncate after the last one that decodes, fix the section counts and set TC, so
/// strict clients (kdig) read a valid message and retry over TCP.
fn cut_at_record_boundary(bytes: &mut Vec<u8>) {
    use hickory_proto::op::Query;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    if bytes.len() < 12 {
        return;
    }
    let count = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let sections = [count(bytes, 6), count(bytes, 8), count(bytes, 10)];
    // Decode over the whole message: compression pointers count from its first byte.
    let cut = {
        let mut decoder = BinDecoder::new(bytes);
        if decoder.read_slice(12).is_err() {
            return;
        }
        for _ in 0..count(bytes, 4) {
            if Query::read(&mut decoder).is_err() {
                return; // the question is ours and whole; nothing sensible to cut
            }
        }
        let mut kept = [0u16; 3];
        let mut cut = None;
        'sections: for (section, &n) in sections.iter().enumerate() {
            for _ in 0..n {
                let start = decoder.index();
                if Record::read(&mut decoder).is_err() {
                    cut = Some((start, kept));
                    break 'sections;
                }
                kept[section] += 1;
            }
        }
        // Every counted record is whole, but bytes of one left out may follow them.
        cut.or((decoder.index() < bytes.len()).then_some((decoder.index(), kept)))
    };
    if let Some((end, kept)) = cut {
        bytes.truncate(end);
        bytes[2] |= 0x02; // TC
        for (i, k) in kept.iter().enumerate() {
            bytes[6 + 2 * i..8 + 2 * i].copy_from_slice(&k.to_be_bytes());
        }
    }
}

/// FORMERR for a packet whose header parsed but whose body did not.
fn formerr(packet: &[u8]) -> Vec<u8> {
    let mut out = packet[..12].to_vec();
    out[2] = 0x80 | (packet[2] & 0x78) | (packet[2] & 0x01); // QR, request opcode, RD
    out[3] = 0x01; // FORMERR
    out[4..12].fill(0);
    out
}
