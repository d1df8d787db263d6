//! The UDP fast path for the hot query: A / AAAA for `<svc>.<ns>.svc.<domain>` with healthy
//! instances. It reads the raw packet, answers from answer records encoded once per service
//! version, and patches in the ID, the question (copied verbatim, so 0x20 case is preserved) and
//! the rotation. No allocation and no lock per query.
//!
//! Anything else — another type, a negative answer, an answer that would not fit, EDNS options it
//! does not understand, any oddity — returns `None` and goes to hickory ([`crate::handler`]),
//! which applies the same [`crate::answer`] rules. Tests assert both paths give identical answers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use svcd_lb::WeightedSchedule;
use svcd_registry::ServiceEndpoints;

use hickory_proto::rr::RecordType;

use crate::answer::{answer_start, distinct_addresses, ZoneSettings};
use crate::handler::{DnsResponder, EDNS_PAYLOAD};
use crate::metrics::{rcode_index, Proto};
use crate::pending::LearnedAnswer;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// The most labels a fast-path name can have (svc, ns, "svc" and the domain).
const MAX_LABELS: usize = 16;
/// Cached services per worker before the cache is reset (bounds memory on a huge registry).
const CACHE_LIMIT: usize = 20_000;

/// Answer records of one service version, encoded once.
struct EncodedService {
    /// The snapshot's `Arc` these bytes were made from; a different pointer means stale.
    service: Arc<ServiceEndpoints>,
    /// The zone settings (TTL) they were made with.
    zone: Arc<ZoneSettings>,
    /// 16 bytes per healthy IPv4 instance: `C0 0C | type | class | ttl | rdlen | addr`.
    v4: Vec<u8>,
    /// 28 bytes per healthy IPv6 instance.
    v6: Vec<u8>,
    /// The instances' weights as a pick order, per family: the first record of an answer that
    /// `max_answers` cuts.
    v4_order: WeightedSchedule,
    v6_order: WeightedSchedule,
}

impl EncodedService {
    fn new(service: Arc<ServiceEndpoints>, zone: Arc<ZoneSettings>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let (mut w4, mut w6) = (Vec::new(), Vec::new());
        // The same distinct addresses, in the same order and weights, as the general path.
        let addresses = distinct_addresses(&service, RecordType::A)
            .into_iter()
            .chain(distinct_addresses(&service, RecordType::AAAA));
        for (ip, weight) in addresses {
            match ip {
                IpAddr::V4(_) => w4.push(weight),
                IpAddr::V6(_) => w6.push(weight),
            }
            let (out, rtype, addr): (&mut Vec<u8>, u16, Vec<u8>) = match ip {
                IpAddr::V4(ip) => (&mut v4, TYPE_A, ip.octets().to_vec()),
                IpAddr::V6(ip) => (&mut v6, TYPE_AAAA, ip.octets().to_vec()),
            };
            out.extend_from_slice(&[0xC0, 0x0C]);
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&zone.ttl.to_be_bytes());
            out.extend_from_slice(&(addr.len() as u16).to_be_bytes());
            out.extend_from_slice(&addr);
        }
        EncodedService {
            service,
            zone,
            v4,
            v6,
            v4_order: WeightedSchedule::new(w4),
            v6_order: WeightedSchedule::new(w6),
        }
    }
}

/// One per UDP worker thread: owns its output buffer and its caches, so nothing is shared.
pub struct FastPath {
    cache: HashMap<Box<str>, EncodedService>,
    /// Forwarded answers this worker saw, kept for a second (see [`ForwardedAnswer`]).
    forwarded: HashMap<Vec<u8>, ForwardedAnswer>,
    /// The key of the last query that missed `forwarded` but could be kept there.
    forward_miss: Option<Vec<u8>>,
    key: Vec<u8>,
    out: Vec<u8>,
}

/// A forwarded answer (a name outside the zone) as the general path encoded it, replayed by the
/// worker for up to [`crate::pending::FORWARD_CACHE_FOR`] (never past the records' smallest TTL): a hot outside
/// name is then answered like an inside one, in the worker's batch, instead of by a task per
/// query through hickory's parser, the resolver's cache and a send of its own. The TTLs it
/// carries can be up to that second older than hickory-resolver's own cache would say.
struct ForwardedAnswer {
    response: Vec<u8>,
    until: Instant,
    rcode: usize,
}

impl Default for FastPath {
    fn default() -> Self {
        Self::new()
    }
}

fn u16_at(p: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]))
}

/// Where the parts of a fast-path candidate sit in the packet.
struct Parsed {
    /// End of the question section.
    question_end: usize,
    qtype: u16,
    /// Client's EDNS payload size, if it sent an OPT record.
    edns_payload: Option<u16>,
    /// The client's DO bit (RFC 3225: copied into the response's OPT).
    dnssec_ok: bool,
    /// Label spans (start, len) of the query name.
    labels: [(usize, usize); MAX_LABELS],
    label_count: usize,
}

/// Whether OPT rdata is a whole sequence of options (code, length, that many bytes).
fn options_fit(mut rdata: &[u8]) -> bool {
    while !rdata.is_empty() {
        let Some(len) = u16_at(rdata, 2) else {
            return false;
        };
        let Some(rest) = rdata.get(4 + len as usize..) else {
            return false;
        };
        rdata = rest;
    }
    true
}

fn parse(p: &[u8]) -> Option<Parsed> {
    if p.len() < HEADER + 5 {
        return None;
    }
    // QR=0, OPCODE=0, TC=0; exactly one question, no answer/authority, at most the OPT.
    if p[2] & 0xFA != 0 || u16_at(p, 4)? != 1 || u16_at(p, 6)? != 0 || u16_at(p, 8)? != 0 {
        return None;
    }
    let arcount = u16_at(p, 10)?;
    if arcount > 1 {
        return None;
    }
    let mut labels = [(0usize, 0usize); MAX_LABELS];
    let mut label_count = 0;
    let mut i = HEADER;
    loop {
        let len = *p.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        // No compression pointers (or reserved label types) in a fast-path question.
        if len & 0xC0 != 0
            || label_count == MAX_LABELS
            || i + 1 + len > p.len()
            || i + 1 + len - HEADER > 254
        {
            return None;
        }
        labels[label_count] = (i + 1, len);
        label_count += 1;
        i += 1 + len;
    }
    let qtype = u16_at(p, i)?;
    if (qtype != TYPE_A && qtype != TYPE_AAAA) || u16_at(p, i + 2)? != CLASS_IN {
        return None;
    }
    let question_end = i + 4;
    let edns_payload = if arcount == 1 {
        // OPT: root name, type 41, class = payload, ttl = ext-rcode/version/flags, rdata.
        let o = question_end;
        if *p.get(o)? != 0 || u16_at(p, o + 1)? != TYPE_OPT || *p.get(o + 6)? != 0 {
            return None; // not an OPT, or EDNS version ≠ 0 (BADVERS is hickory's job)
        }
        let rdlen = u16_at(p, o + 9)? as usize;
        if o + 11 + rdlen != p.len() || !options_fit(&p[o + 11..]) {
            return None; // malformed OPT: the general path answers FORMERR
        }
        Some(u16_at(p, o + 3)?)
    } else {
        if question_end != p.len() {
            return None;
        }
        None
    };
    let dnssec_ok = edns_payload.is_some() && p[question_end + 7] & 0x80 != 0;
    Some(Parsed {
        question_end,
        qtype,
        edns_payload,
        dnssec_ok,
        labels,
        label_count,
    })
}

impl FastPath {
    pub fn new() -> Self {
        FastPath {
            cache: HashMap::new(),
            forwarded: HashMap::new(),
            forward_miss: None,
            key: Vec::with_capacity(264),
            out: Vec::with_capacity(EDNS_PAYLOAD as usize),
        }
    }

    /// Keeps a forwarded answer the general path made for this worker's query.
    pub fn learn(&mut self, learned: LearnedAnswer) {
        if self.forwarded.len() >= CACHE_LIMIT {
            self.forwarded.clear();
        }
        self.forwarded.insert(
            learned.key,
            ForwardedAnswer {
                response: learned.response,
                until: learned.until,
                rcode: learned.rcode,
            },
        );
    }

    /// After [`Self::answer`] returned `None`: the key under which the general path's answer
    /// may be kept (a forwardable query this worker has no fresh answer for).
    pub fn take_forward_miss(&mut self) -> Option<Vec<u8>> {
        self.forward_miss.take()
    }

    /// The full response for `packet`, or `None` to take the general path.
    pub fn answer(&mut self, packet: &[u8], responder: &DnsResponder) -> Option<&[u8]> {
        let started = Instant::now();
        self.forward_miss = None;
        let parsed = parse(packet)?;
        let zone = responder.zone.load();
        let n = parsed.label_count;
        let label = |k: usize| {
            let (start, len) = parsed.labels[k];
            &packet[start..start + len]
        };
        let in_zone = n >= zone.labels.len()
            && zone.labels.iter().enumerate().all(|(k, want)| {
                label(n - zone.labels.len() + k).eq_ignore_ascii_case(want.as_bytes())
            });
        if !in_zone {
            return if zone.forward {
                self.replay_forwarded(packet, &parsed, responder, started)
            } else {
                None
            };
        }
        // <svc>.<ns>.svc.<domain…>
        if n != 3 + zone.labels.len() {
            return None;
        }
        if !label(2).eq_ignore_ascii_case(b"svc") {
            return None;
        }
        for (k, want) in zone.labels.iter().enumerate() {
            if !label(3 + k).eq_ignore_ascii_case(want.as_bytes()) {
                return None;
            }
        }
        // "svc.ns", lower-cased on the stack.
        let (svc, ns) = (label(0), label(1));
        let mut key = [0u8; 127];
        let key_len = svc.len() + 1 + ns.len();
        if key_len > key.len() {
            return None;
        }
        key[..svc.len()].copy_from_slice(svc);
        key[svc.len()] = b'.';
        key[svc.len() + 1..key_len].copy_from_slice(ns);
        key[..key_len].make_ascii_lowercase();
        let key = std::str::from_utf8(&key[..key_len]).ok()?;

        let snapshot = responder.snapshot.load();
        let service = snapshot.service_by_name(key)?;
        let fresh = self
            .cache
            .get(key)
            .is_some_and(|c| Arc::ptr_eq(&c.service, service) && Arc::ptr_eq(&c.zone, &zone));
        if !fresh {
            if self.cache.len() >= CACHE_LIMIT {
                self.cache.clear();
            }
            self.cache.insert(
                key.into(),
                EncodedService::new(service.clone(), Arc::clone(&zone)),
            );
        }
        let encoded = self.cache.get(key)?;
        let (records, rr_len, order) = if parsed.qtype == TYPE_A {
            (&encoded.v4, 16, &encoded.v4_order)
        } else {
            (&encoded.v6, 28, &encoded.v6_order)
        };
        let count = records.len() / rr_len;
        if count == 0 {
            return None; // NODATA: hickory answers it with the SOA
        }
        let take = count.min(zone.max_answers);
        let opt_len = if parsed.edns_payload.is_some() { 11 } else { 0 };
        let limit = match parsed.edns_payload {
            Some(payload) => payload.clamp(512, EDNS_PAYLOAD) as usize,
            None => 512,
        };
        let size = parsed.question_end + take * rr_len + opt_len;
        if size > limit {
            return None; // would truncate: hickory sets TC with what fits
        }

        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(&packet[..2]); // ID
                                             // QR | AA | RD (copied); RA when forwarding; RCODE 0.
        out.push(0x80 | 0x04 | (packet[2] & 0x01));
        out.push(if zone.forward { 0x80 } else { 0x00 });
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&(take as u16).to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&u16::from(parsed.edns_payload.is_some()).to_be_bytes());
        out.extend_from_slice(&packet[HEADER..parsed.question_end]);
        let start = answer_start(order, count, take, responder.next_rotation());
        for k in 0..take {
            let idx = (start + k) % count;
            out.extend_from_slice(&records[idx * rr_len..(idx + 1) * rr_len]);
        }
        if parsed.edns_payload.is_some() {
            let flags = if parsed.dnssec_ok { 0x80 } else { 0 };
            out.extend_from_slice(&[
                0,
                0,
                TYPE_OPT as u8,
                (EDNS_PAYLOAD >> 8) as u8,
                EDNS_PAYLOAD as u8,
                0,
                0,
                flags,
                0,
                0,
                0,
            ]);
        }
        let qtype_idx = if parsed.qtype == TYPE_A { 0 } else { 1 };
        responder.metrics.record(
            Proto::Udp,
            qtype_idx,
            rcode_index(ResponseCode::NoError),
            started.elapsed(),
        );
        Some(&self.out)
    }

    /// A kept forwarded answer to `packet`, with its ID, RD bit and question (0x20 case) the
    /// query's. On a miss, notes the key for [`Self::take_forward_miss`].
    fn replay_forwarded(
        &mut self,
        packet: &[u8],
        parsed: &Parsed,
        responder: &DnsResponder,
        started: Instant,
    ) -> Option<&[u8]> {
        // The key: the question lower-cased, and what shapes the answer (EDNS, DO).
        self.key.clear();
        self.key
            .extend_from_slice(&packet[HEADER..parsed.question_end]);
        self.key.make_ascii_lowercase();
        self.key
            .push(match (parsed.edns_payload, parsed.dnssec_ok) {
                (None, _) => 0,
                (Some(_), false) => 1,
                (Some(_), true) => 2,
            });
        let limit = match parsed.edns_payload {
            Some(payload) => payload.clamp(512, EDNS_PAYLOAD) as usize,
            None => 512,
        };
        let fresh = self
            .forwarded
            .get(self.key.as_slice())
            .filter(|kept| kept.until > started && kept.response.len() <= limit);
        let Some(kept) = fresh else {
            self.forward_miss = Some(self.key.clone());
            return None;
        };
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(&kept.response);
        out[..2].copy_from_slice(&packet[..2]);
        out[2] = (out[2] & !0x01) | (packet[2] & 0x01);
        out[HEADER..parsed.question_end].copy_from_slice(&packet[HEADER..parsed.question_end]);
        let qtype_idx = if parsed.qtype == TYPE_A { 0 } else { 1 };
        responder
            .metrics
            .record(Proto::Udp, qtype_idx, kept.rcode, started.elapsed());
        Some(&self.out)
    }
}
