//! The authoritative answer for one question, computed from the registry snapshot. Pure: no I/O,
//! no clocks, so every rule of the zone is unit-tested here and both serving paths (the
//! pre-encoded fast path and hickory) agree by construction.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, HINFO, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use svcd_config::DnsConfig;
use svcd_lb::WeightedSchedule;
use svcd_registry::{Endpoint, EndpointSnapshot, ServiceEndpoints};

use crate::consul::ConsulZone;
use crate::zone::{classify, Target};

/// Zone parameters derived once from the config (and again on reload).
#[derive(Debug, Clone)]
pub struct ZoneSettings {
    /// Lower-case domain labels, e.g. `["cluster", "local"]`.
    pub labels: Vec<String>,
    pub domain: Name,
    pub ttl: u32,
    pub negative_ttl: u32,
    pub max_answers: usize,
    pub forward: bool,
    /// Consul-style names (`[consul]` on): see [`crate::consul`].
    pub consul: Option<Arc<ConsulZone>>,
    ns_name: Name,
    hostmaster: Name,
}

impl ZoneSettings {
    pub fn new(config: &DnsConfig) -> Self {
        let domain = Name::from_str(&format!("{}.", config.domain)).expect("validated domain");
        ZoneSettings {
            labels: config.domain.split('.').map(str::to_string).collect(),
            ns_name: Name::from_str(&format!("ns.dns.{}.", config.domain))
                .expect("validated domain"),
            hostmaster: Name::from_str(&format!("hostmaster.{}.", config.domain))
                .expect("validated domain"),
            domain,
            ttl: config.ttl.as_secs().min(u32::MAX as u64) as u32,
            negative_ttl: config.negative_ttl.as_secs().min(u32::MAX as u64) as u32,
            max_answers: config.max_answers,
            forward: !config.forward.is_empty(),
            consul: None,
        }
    }

    /// The SOA; its serial is the snapshot revision, so a change in the registry is visible to
    /// anyone who compares serials.
    pub fn soa(&self, revision: i64, ttl: u32) -> Record {
        let soa = SOA::new(
            self.ns_name.clone(),
            self.hostmaster.clone(),
            revision as u32,
            7200,
            1800,
            86400,
            self.negative_ttl,
        );
        Record::from_rdata(self.domain.clone(), ttl, RData::SOA(soa))
    }

    fn ns(&self) -> Record {
        Record::from_rdata(
            self.domain.clone(),
            self.ttl,
            RData::NS(NS(self.ns_name.clone())),
        )
    }
}

/// What to send back for one question.
#[derive(Debug, Default)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// Records were left out to fit `dns.max_answers` over UDP: the response sets TC so the
    /// client can ask again over TCP for all of them (Consul-style names).
    pub truncated: bool,
}

impl Answer {
    /// No records, only `rcode`.
    pub fn rcode(rcode: ResponseCode) -> Self {
        Answer {
            rcode,
            ..Answer::default()
        }
    }
}

#[derive(Debug)]
pub enum Resolution {
    /// We are authoritative: this is the answer.
    Authoritative(Answer),
    /// Not our name; ask upstream (only when forwarding is configured).
    Forward,
    /// Not our name and no forwarding: never an open resolver.
    Refused,
}

/// One question to answer.
pub struct Question<'a> {
    /// As the client spelled it (0x20 case preserved in answers).
    pub name: &'a Name,
    pub qtype: RecordType,
    /// Rotation offset for this query (round robin across queries).
    pub rotation: usize,
    /// Most address records to return (UDP); `None` for all (TCP).
    pub limit: Option<usize>,
}

fn family_matches(ip: IpAddr, qtype: RecordType) -> bool {
    matches!(
        (ip, qtype),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, rdata)
}

/// RFC 8482: ANY gets one synthesized HINFO instead of everything.
fn any_answer(name: &Name, ttl: u32) -> Record {
    Record::from_rdata(
        name.clone(),
        ttl,
        RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
    )
}

/// `<id>.<svc>.<ns>.svc.<domain>.`
pub fn instance_name(zone: &ZoneSettings, id: &str, svc: &str, ns: &str) -> Name {
    Name::from_str(&format!("{id}.{svc}.{ns}.svc.{}", zone.domain))
        .expect("labels are validated DNS labels")
}

impl Answer {
    fn negative(zone: &ZoneSettings, snapshot: &EndpointSnapshot, rcode: ResponseCode) -> Self {
        Answer {
            rcode,
            authorities: vec![zone.soa(snapshot.revision, zone.negative_ttl)],
            ..Answer::default()
        }
    }

    fn records(records: Vec<Record>) -> Self {
        Answer {
            answers: records,
            ..Answer::default()
        }
    }
}

/// Where a rotated answer of `take` out of `n` records starts for query number `rotation`. With
/// the whole set returned, a plain rotation; when `take` cuts it, the first record is chosen by
/// the instances' weights (smooth weighted round robin, as the proxies pick), so clients that use
/// the first address split their traffic by weight.
pub fn answer_start(order: &WeightedSchedule, n: usize, take: usize, rotation: usize) -> usize {
    if n == 0 {
        0
    } else if take < n {
        order.at(rotation).unwrap_or(0)
    } else {
        rotation % n
    }
}

/// The distinct addresses of the healthy endpoints of a service that fit `qtype`, in instance
/// order, each with the summed weight of the instances behind it: an RRset holds no duplicate
/// records (RFC 2181 §5), and an address two instances share carries both their shares. Both
/// serving paths build their answers from this.
pub fn distinct_addresses(service: &ServiceEndpoints, qtype: RecordType) -> Vec<(IpAddr, u32)> {
    let mut out: Vec<(IpAddr, u32)> = Vec::new();
    for e in service
        .healthy
        .iter()
        .filter(|e| family_matches(e.ip, qtype))
    {
        match out.iter_mut().find(|(ip, _)| *ip == e.ip) {
            Some((_, weight)) => *weight = weight.saturating_add(e.weight),
            None => out.push((e.ip, e.weight)),
        }
    }
    out
}

/// The distinct healthy addresses of `svc.ns` that fit `qtype`, rotated and limited.
pub fn rotated_addresses(
    service: &ServiceEndpoints,
    qtype: RecordType,
    rotation: usize,
    limit: Option<usize>,
) -> impl Iterator<Item = IpAddr> {
    let matching = distinct_addresses(service, qtype);
    let n = matching.len();
    let take = limit.unwrap_or(n).min(n);
    let order = if take < n {
        WeightedSchedule::new(matching.iter().map(|(_, w)| *w))
    } else {
        WeightedSchedule::default()
    };
    let start = answer_start(&order, n, take, rotation);
    (0..take).map(move |i| matching[(start + i) % n].0)
}

/// Answers one question from the snapshot.
pub fn resolve(zone: &ZoneSettings, snapshot: &EndpointSnapshot, q: &Question<'_>) -> Resolution {
    let lower = q.name.to_lowercase();
    let labels: Vec<&str> = lower
        .iter()
        .map(|l| std::str::from_utf8(l).unwrap_or("\u{0}"))
        .collect();
    let domain: Vec<&str> = zone.labels.iter().map(String::as_str).collect();
    if let Some(consul) = &zone.consul {
        if let Some(resolution) = crate::consul::resolve(zone, consul, snapshot, q, &labels) {
            return resolution;
        }
    }
    let target = classify(&labels, &domain);
    let nxdomain =
        || Resolution::Authoritative(Answer::negative(zone, snapshot, ResponseCode::NXDomain));
    let nodata =
        || Resolution::Authoritative(Answer::negative(zone, snapshot, ResponseCode::NoError));
    let any = || Resolution::Authoritative(Answer::records(vec![any_answer(q.name, zone.ttl)]));
    match target {
        Target::OutOfZone if zone.forward => Resolution::Forward,
        Target::OutOfZone => Resolution::Refused,
        Target::Unknown => nxdomain(),
        Target::Apex => match q.qtype {
            RecordType::SOA => Resolution::Authoritative(Answer::records(vec![
                zone.soa(snapshot.revision, zone.ttl)
            ])),
            RecordType::NS => Resolution::Authoritative(Answer::records(vec![zone.ns()])),
            RecordType::ANY => any(),
            _ => nodata(),
        },
        Target::Version => match q.qtype {
            RecordType::TXT => {
                let txt = TXT::new(vec![format!("svcd {}", env!("CARGO_PKG_VERSION"))]);
                Resolution::Authoritative(Answer::records(vec![Record::from_rdata(
                    q.name.clone(),
                    zone.ttl,
                    RData::TXT(txt),
                )]))
            }
            RecordType::ANY => any(),
            _ => nodata(),
        },
        Target::ServiceRoot => nodata(),
        Target::Namespace(ns) => {
            if snapshot
                .services()
                .any(|s| s.namespace == ns && !s.healthy.is_empty())
            {
                nodata()
            } else {
                nxdomain()
            }
        }
        Target::Service { svc, ns } => {
            let Some(service) = snapshot.service(ns, svc).filter(|s| !s.healthy.is_empty()) else {
                return nxdomain();
            };
            match q.qtype {
                RecordType::A | RecordType::AAAA => {
                    let records: Vec<Record> =
                        rotated_addresses(service, q.qtype, q.rotation, q.limit)
                            .map(|ip| address_record(q.name.clone(), zone.ttl, ip))
                            .collect();
                    if records.is_empty() {
                        nodata()
                    } else {
                        Resolution::Authoritative(Answer::records(records))
                    }
                }
                RecordType::ANY => any(),
                _ => nodata(),
            }
        }
        Target::Instance { id, svc, ns } => {
            let endpoint = snapshot
                .service(ns, svc)
                .and_then(|s| s.healthy.iter().find(|e| &*e.id == id));
            let Some(endpoint) = endpoint else {
                return nxdomain();
            };
            match q.qtype {
                RecordType::A | RecordType::AAAA if family_matches(endpoint.ip, q.qtype) => {
                    Resolution::Authoritative(Answer::records(vec![address_record(
                        q.name.clone(),
                        zone.ttl,
                        endpoint.ip,
                    )]))
                }
                RecordType::ANY => any(),
                _ => nodata(),
            }
        }
        Target::Srv { port, svc, ns } => {
            let Some(service) = snapshot.service(ns, svc) else {
                return nxdomain();
            };
            let with_port: Vec<(&Arc<Endpoint>, u16)> = service
                .healthy
                .iter()
                .filter_map(|e| e.port(port).map(|p| (e, p)))
                .collect();
            if with_port.is_empty() {
                return nxdomain();
            }
            match q.qtype {
                RecordType::SRV => {
                    let mut answer = Answer::default();
                    let n = with_port.len();
                    let take = q.limit.unwrap_or(n).min(n);
                    for i in 0..take {
                        let (e, p) = with_port[(q.rotation + i) % n];
                        let target = instance_name(zone, &e.id, svc, ns);
                        let srv = SRV::new(0, e.weight.min(65535) as u16, p, target.clone());
                        answer.answers.push(Record::from_rdata(
                            q.name.clone(),
                            zone.ttl,
                            RData::SRV(srv),
                        ));
                        answer
                            .additionals
                            .push(address_record(target, zone.ttl, e.ip));
                    }
                    Resolution::Authoritative(answer)
                }
                RecordType::ANY => any(),
                _ => nodata(),
            }
        }
        Target::ReverseV4(ip) => reverse(zone, snapshot, q, IpAddr::V4(ip)),
        Target::ReverseV6(ip) => reverse(zone, snapshot, q, IpAddr::V6(ip)),
    }
}

/// PTR for a registered, healthy instance IP. Unregistered addresses are not ours: forwarded or
/// refused like any other foreign name.
fn reverse(
    zone: &ZoneSettings,
    snapshot: &EndpointSnapshot,
    q: &Question<'_>,
    ip: IpAddr,
) -> Resolution {
    // A scan: PTR queries are rare, and an index would cost every publish.
    let mut names = Vec::new();
    for service in snapshot.services() {
        for e in service.healthy.iter().filter(|e| e.ip == ip) {
            names.push(instance_name(
                zone,
                &e.id,
                &service.service,
                &service.namespace,
            ));
        }
    }
    if names.is_empty() {
        return if zone.forward {
            Resolution::Forward
        } else {
            Resolution::Refused
        };
    }
    names.sort();
    match q.qtype {
        RecordType::PTR => Resolution::Authoritative(Answer::records(
            names
                .into_iter()
                .map(|n| Record::from_rdata(q.name.clone(), zone.ttl, RData::PTR(PTR(n))))
                .collect(),
        )),
        RecordType::ANY => {
            Resolution::Authoritative(Answer::records(vec![any_answer(q.name, zone.ttl)]))
        }
        _ => Resolution::Authoritative(Answer::negative(zone, snapshot, ResponseCode::NoError)),
    }
}
