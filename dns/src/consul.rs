//! Consul-style names under `consul.dns_domain` (default `consul`), served when `[consul]` is on.
//! Healthy instances only, as every other svcd name.
//!
//! ```text
//! [<tag>.]<svc>.service[.<ns>.ns][.<dc>.dc | .<dc>].<domain>   A / AAAA (and SRV)
//! _<svc>._<tag|tcp>.service[...].<domain>                      SRV (RFC 2782), A/AAAA glue
//! <node>.node[.<dc>.dc | .<dc>].<domain>                       A / AAAA of the node's instances
//! ```
//!
//! SRV targets are the instances' own names (`<id>.<svc>.<ns>.svc.<cluster domain>`), which
//! resolve here too. Unlike Consul, an answer cut to `dns.max_answers` over UDP sets TC, so a
//! client that wants every instance retries over TCP and gets them (Consul cuts UDP answers
//! silently unless `enable_truncate` is set).
//!
//! Not on the fast path: it answers `<svc>.<ns>.svc.<domain>` only; these names go through
//! hickory like SRV and PTR queries do.

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use svcd_registry::{Endpoint, EndpointSnapshot};

use crate::answer::{instance_name, Answer, Question, Resolution, ZoneSettings};

/// The Consul zone's settings, from `[consul]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulZone {
    /// Lower-case labels of `consul.dns_domain`.
    pub labels: Vec<String>,
    /// `consul.dns_domain` as a name: the owner of the SOA in this zone's negative answers.
    pub domain: Name,
    /// `consul.datacenter`, the only one `.<dc>` / `.<dc>.dc` may name.
    pub datacenter: String,
    /// `consul.port_name`: the port SRV answers give (else the instance's first by name), as
    /// the API's `Port`.
    pub port_name: String,
}

impl ConsulZone {
    pub fn new(config: &svcd_config::ConsulConfig) -> Option<Self> {
        config.enabled().then(|| ConsulZone {
            labels: config.dns_domain.split('.').map(str::to_string).collect(),
            domain: Name::from_str(&format!("{}.", config.dns_domain)).expect("validated domain"),
            datacenter: config.datacenter.clone(),
            port_name: config.port_name.clone(),
        })
    }
}

/// What a Consul name asks for.
#[derive(Debug, PartialEq, Eq)]
enum Lookup<'a> {
    Service {
        svc: &'a str,
        ns: &'a str,
        tag: Option<&'a str>,
        /// `_<svc>._<tag|tcp>` (RFC 2782): SRV only.
        rfc2782: bool,
    },
    Node(&'a str),
    /// In the Consul zone but no such name.
    Unknown,
}

/// Strips an optional `.<dc>.dc` or `.<dc>` (the configured datacenter) from the right.
fn strip_dc<'a, 'b>(rest: &'b [&'a str], dc: &str) -> Option<&'b [&'a str]> {
    match rest {
        [head @ .., d, "dc"] if *d == dc => Some(head),
        [head @ .., d] if *d == dc => Some(head),
        _ => None,
    }
}

fn classify<'a>(rel: &[&'a str], zone: &ConsulZone) -> Lookup<'a> {
    let rel = strip_dc(rel, &zone.datacenter).unwrap_or(rel);
    // Namespace: `…service.<ns>.ns`.
    let (rel, ns) = match rel {
        [head @ .., ns, "ns"] => (head, *ns),
        _ => (rel, svcd_config::names::DEFAULT_NAMESPACE),
    };
    match rel {
        [node, "node"] => Lookup::Node(node),
        [svc, proto, "service"] if svc.starts_with('_') && proto.starts_with('_') => {
            let tag = &proto[1..];
            Lookup::Service {
                svc: &svc[1..],
                ns,
                tag: (tag != "tcp").then_some(tag),
                rfc2782: true,
            }
        }
        [svc, "service"] => Lookup::Service {
            svc,
            ns,
            tag: None,
            rfc2782: false,
        },
        [tag, svc, "service"] => Lookup::Service {
            svc,
            ns,
            tag: Some(tag),
            rfc2782: false,
        },
        _ => Lookup::Unknown,
    }
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, rdata)
}

fn family(ip: IpAddr, qtype: RecordType) -> bool {
    matches!(
        (ip, qtype),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

/// Rotated, limited selection out of `n` items: the indices to answer with, and whether the
/// limit cut the set (then TC is set over UDP).
fn window(n: usize, rotation: usize, limit: Option<usize>) -> (impl Iterator<Item = usize>, bool) {
    let take = limit.unwrap_or(n).min(n);
    let start = if n == 0 { 0 } else { rotation % n };
    ((0..take).map(move |i| (start + i) % n.max(1)), take < n)
}

/// Distinct addresses of `endpoints` that fit `qtype`, in order.
fn addresses<'e>(endpoints: impl Iterator<Item = &'e Endpoint>, qtype: RecordType) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for e in endpoints.filter(|e| family(e.ip, qtype)) {
        if !out.contains(&e.ip) {
            out.push(e.ip);
        }
    }
    out
}

fn addresses_answer(q: &Question<'_>, ttl: u32, ips: &[IpAddr]) -> Answer {
    let (picked, cut) = window(ips.len(), q.rotation, q.limit);
    Answer {
        answers: picked
            .map(|i| address_record(q.name.clone(), ttl, ips[i]))
            .collect(),
        truncated: cut,
        ..Answer::default()
    }
}

/// The answer for a name in the Consul zone, or `None` when `labels` are not in it.
pub fn resolve(
    zone: &ZoneSettings,
    consul: &ConsulZone,
    snapshot: &EndpointSnapshot,
    q: &Question<'_>,
    labels: &[&str],
) -> Option<Resolution> {
    let d = consul.labels.len();
    if labels.len() < d
        || labels[labels.len() - d..]
            .iter()
            .zip(&consul.labels)
            .any(|(a, b)| *a != b)
    {
        return None;
    }
    let rel = &labels[..labels.len() - d];
    // This zone's SOA: the cluster zone's, owned by the Consul domain.
    let soa = |ttl| {
        let mut record = zone.soa(snapshot.revision, ttl);
        record.name = consul.domain.clone();
        record
    };
    let negative = |rcode| {
        Resolution::Authoritative(Answer {
            rcode,
            authorities: vec![soa(zone.negative_ttl)],
            ..Answer::default()
        })
    };
    let nxdomain = || negative(ResponseCode::NXDomain);
    let nodata = || negative(ResponseCode::NoError);
    if rel.is_empty() {
        return Some(match q.qtype {
            RecordType::SOA => Resolution::Authoritative(Answer {
                answers: vec![soa(zone.ttl)],
                ..Answer::default()
            }),
            _ => nodata(),
        });
    }
    Some(match classify(rel, consul) {
        Lookup::Unknown => nxdomain(),
        Lookup::Node(node) => {
            let on_node = snapshot
                .services()
                .flat_map(|s| s.healthy.iter())
                .filter(|e| &*e.node == node);
            let mut ips = addresses(on_node.map(|e| &**e), q.qtype);
            if ips.is_empty() {
                let known = snapshot
                    .services()
                    .flat_map(|s| s.healthy.iter())
                    .any(|e| &*e.node == node);
                return Some(if known { nodata() } else { nxdomain() });
            }
            ips.sort();
            Resolution::Authoritative(addresses_answer(q, zone.ttl, &ips))
        }
        Lookup::Service {
            svc,
            ns,
            tag,
            rfc2782,
        } => {
            let Some(service) = snapshot.service(ns, svc) else {
                return Some(nxdomain());
            };
            let matching: Vec<&Endpoint> = service
                .healthy
                .iter()
                .map(|e| &**e)
                .filter(|e| tag.is_none_or(|t| e.tags().iter().any(|have| **have == *t)))
                .collect();
            if matching.is_empty() {
                return Some(nxdomain());
            }
            match q.qtype {
                RecordType::SRV => {
                    Resolution::Authoritative(srv_answer(zone, consul, q, ns, svc, &matching))
                }
                RecordType::A | RecordType::AAAA if !rfc2782 => {
                    let ips = addresses(matching.iter().copied(), q.qtype);
                    if ips.is_empty() {
                        nodata()
                    } else {
                        Resolution::Authoritative(addresses_answer(q, zone.ttl, &ips))
                    }
                }
                _ => nodata(),
            }
        }
    })
}

/// SRV records for `matching` on their `consul.port_name` port (else their first by name;
/// instances without ports are left out), each with its A/AAAA as glue.
fn srv_answer(
    zone: &ZoneSettings,
    consul: &ConsulZone,
    q: &Question<'_>,
    ns: &str,
    svc: &str,
    matching: &[&Endpoint],
) -> Answer {
    let with_port: Vec<(&Endpoint, u16)> = matching
        .iter()
        .filter_map(|e| {
            e.port(&consul.port_name)
                .or_else(|| e.ports().first().map(|(_, p)| *p))
                .map(|p| (*e, p))
        })
        .collect();
    let (picked, cut) = window(with_port.len(), q.rotation, q.limit);
    let mut answer = Answer {
        truncated: cut,
        ..Answer::default()
    };
    for i in picked {
        let (e, port) = with_port[i];
        let target = instance_name(zone, &e.id, svc, ns);
        let srv = SRV::new(1, e.weight.min(65535) as u16, port, target.clone());
        answer.answers.push(Record::from_rdata(
            q.name.clone(),
            zone.ttl,
            RData::SRV(srv),
        ));
        answer
            .additionals
            .push(address_record(target, zone.ttl, e.ip));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> ConsulZone {
        ConsulZone {
            labels: vec!["consul".into()],
            domain: Name::from_str("consul.").unwrap(),
            datacenter: "dc1".into(),
            port_name: "http".into(),
        }
    }

    fn lookup(text: &str) -> Lookup<'_> {
        let labels: Vec<&str> = text.split('.').collect();
        let rel = &labels[..labels.len() - 1];
        // Leak for the test's lifetime: the labels borrow from `text`.
        classify(Box::leak(rel.to_vec().into_boxed_slice()), &zone())
    }

    #[test]
    fn consul_names_classify() {
        let svc = |svc, ns, tag, rfc2782| Lookup::Service {
            svc,
            ns,
            tag,
            rfc2782,
        };
        assert_eq!(
            lookup("web.service.consul"),
            svc("web", "default", None, false)
        );
        assert_eq!(
            lookup("v2.web.service.dc1.consul"),
            svc("web", "default", Some("v2"), false)
        );
        assert_eq!(
            lookup("web.service.team.ns.dc1.dc.consul"),
            svc("web", "team", None, false)
        );
        assert_eq!(
            lookup("_web._tcp.service.consul"),
            svc("web", "default", None, true)
        );
        assert_eq!(
            lookup("_web._v2.service.consul"),
            svc("web", "default", Some("v2"), true)
        );
        assert_eq!(lookup("n1.node.consul"), Lookup::Node("n1"));
        assert_eq!(lookup("n1.node.dc1.consul"), Lookup::Node("n1"));
        assert_eq!(lookup("web.service.eu1.consul"), Lookup::Unknown);
        assert_eq!(lookup("x.y.z.service.consul"), Lookup::Unknown);
    }

    #[test]
    fn a_cut_window_reports_truncation() {
        let (picked, cut) = window(5, 7, Some(2));
        assert_eq!(picked.collect::<Vec<_>>(), [2, 3]);
        assert!(cut);
        let (picked, cut) = window(2, 1, Some(20));
        assert_eq!(picked.collect::<Vec<_>>(), [1, 0]);
        assert!(!cut);
    }
}
