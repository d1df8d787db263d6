//! The zone rules end to end through both serving paths, on encoded packets: the fast path and
//! the hickory path must give the same answer, and no packet may panic either.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use svcd_config::DnsConfig;
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder, SnapshotReader};

use crate::fastpath::FastPath;
use crate::handler::DnsResponder;
use crate::metrics::DnsMetrics;

fn snapshot() -> EndpointSnapshot {
    let entries = [
        (
            "default/web/w1",
            r#"{"ip":"10.0.0.1","ports":{"http":8080},"weight":3}"#,
        ),
        (
            "default/web/w2",
            r#"{"ip":"10.0.0.2","ports":{"http":8081}}"#,
        ),
        (
            "default/web/w3",
            r#"{"ip":"10.0.0.3","ports":{"http":8082}}"#,
        ),
        (
            "default/web/sick",
            r#"{"ip":"10.0.0.99","state":"unhealthy"}"#,
        ),
        (
            "default/web/w6",
            r#"{"ip":"fd00::6","ports":{"grpc":9090}}"#,
        ),
        ("default/down/d1", r#"{"ip":"10.0.1.1","state":"draining"}"#),
    ];
    let entries: Vec<(String, String)> = entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    snapshot_of(&entries)
}

/// A snapshot of `entries` (key under /svcd/v1/endpoints/, JSON value).
fn snapshot_of(entries: &[(String, String)]) -> EndpointSnapshot {
    let mut b = SnapshotBuilder::new();
    for (i, (key, value)) in entries.iter().enumerate() {
        b.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/{key}"),
            value: value.as_bytes().to_vec(),
            mod_revision: i as i64 + 2,
        });
    }
    b.build(&EndpointSnapshot::default())
}

fn responder() -> Arc<DnsResponder> {
    let config = svcd_config::parse("").unwrap().dns;
    responder_with(&config)
}

fn responder_with(config: &DnsConfig) -> Arc<DnsResponder> {
    let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
    DnsResponder::new(config, SnapshotReader::fixed(snapshot()), metrics)
}

pub(crate) fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_bytes().unwrap()
}

fn src() -> SocketAddr {
    "127.0.0.1:5353".parse().unwrap()
}

fn slow(r: &DnsResponder, packet: &[u8]) -> Option<Message> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(r.answer_udp(packet.to_vec(), src()))
        .map(|bytes| Message::from_vec(&bytes).expect("hickory path emits valid DNS"))
}

fn fast(r: &DnsResponder, packet: &[u8]) -> Option<Message> {
    FastPath::new()
        .answer(packet, r)
        .map(|bytes| Message::from_vec(bytes).expect("fast path emits valid DNS"))
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other}"),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn fast_and_hickory_paths_agree() {
    let r = responder();
    for (name, rtype, edns) in [
        ("web.default.svc.cluster.local.", RecordType::A, None),
        ("WeB.DeFault.svc.Cluster.LOCAL.", RecordType::A, Some(1232)),
        (
            "web.default.svc.cluster.local.",
            RecordType::AAAA,
            Some(4096),
        ),
    ] {
        let packet = query(name, rtype, edns);
        r.rotation.store(7, Ordering::Relaxed);
        let f =
            fast(&r, &packet).unwrap_or_else(|| panic!("{name} {rtype} should take the fast path"));
        r.rotation.store(7, Ordering::Relaxed);
        let s = slow(&r, &packet).unwrap();
        assert_eq!(f.metadata.id, s.metadata.id);
        assert_eq!(f.metadata.response_code, s.metadata.response_code);
        assert_eq!(f.metadata.authoritative, s.metadata.authoritative);
        assert_eq!(f.metadata.recursion_desired, s.metadata.recursion_desired);
        assert_eq!(
            f.metadata.recursion_available,
            s.metadata.recursion_available
        );
        assert_eq!(f.metadata.truncation, s.metadata.truncation);
        assert_eq!(f.queries, s.queries, "question echoed with its case");
        assert_eq!(
            f.answers, s.answers,
            "same records in the same rotated order"
        );
        assert_eq!(
            f.edns.as_ref().map(|e| e.max_payload()),
            s.edns.as_ref().map(|e| e.max_payload())
        );
        assert_eq!(f.answers[0].name.to_string(), name, "0x20 case preserved");
    }
}

#[test]
fn only_healthy_and_rotated() {
    let r = responder();
    let packet = query("web.default.svc.cluster.local.", RecordType::A, None);
    let mut firsts = Vec::new();
    for _ in 0..3 {
        let m = fast(&r, &packet).unwrap();
        assert_eq!(
            addrs(&m),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            "unhealthy 10.0.0.99 never served"
        );
        firsts.push(m.answers[0].data.to_string());
    }
    firsts.sort();
    firsts.dedup();
    assert_eq!(firsts.len(), 3, "each query starts at the next instance");
}

#[test]
fn negative_answers_carry_the_soa() {
    let r = responder();
    for (name, rtype, rcode) in [
        (
            "nope.default.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "down.default.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ), // none healthy
        (
            "web.default.svc.cluster.local.",
            RecordType::TXT,
            ResponseCode::NoError,
        ), // NODATA
        (
            "w1.web.default.svc.cluster.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        (
            "sick.web.default.svc.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "_nope._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
            ResponseCode::NXDomain,
        ),
        (
            "a.b.c.d.e.f.cluster.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
    ] {
        let packet = query(name, rtype, None);
        assert!(
            fast(&r, &packet).is_none(),
            "{name}: negative answers take the general path"
        );
        let m = slow(&r, &packet).unwrap();
        assert_eq!(m.metadata.response_code, rcode, "{name} {rtype}");
        assert!(m.answers.is_empty(), "{name}");
        assert!(m.metadata.authoritative);
        let soa = m
            .authorities
            .first()
            .unwrap_or_else(|| panic!("{name}: SOA in authority"));
        assert_eq!(soa.record_type(), RecordType::SOA);
        assert_eq!(soa.ttl, 5, "negative TTL");
    }
}

#[test]
fn srv_with_glue_instance_ptr_txt_soa_ns() {
    let r = responder();
    let m = slow(
        &r,
        &query(
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
            None,
        ),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 3);
    assert_eq!(m.additionals.len(), 3, "glue A records");
    let w1 = m
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SRV(s) if s.target.to_string() == "w1.web.default.svc.cluster.local." => {
                Some(s.clone())
            }
            _ => None,
        })
        .expect("SRV for w1");
    assert_eq!((w1.port, w1.weight, w1.priority), (8080, 3, 0));

    let m = slow(
        &r,
        &query("w2.web.default.svc.cluster.local.", RecordType::A, None),
    )
    .unwrap();
    assert_eq!(addrs(&m), ["10.0.0.2"]);
    let m = slow(
        &r,
        &query("w6.web.default.svc.cluster.local.", RecordType::AAAA, None),
    )
    .unwrap();
    assert_eq!(addrs(&m), ["fd00::6"]);
    let m = slow(&r, &query("2.0.0.10.in-addr.arpa.", RecordType::PTR, None)).unwrap();
    assert_eq!(
        m.answers[0].data.to_string(),
        "w2.web.default.svc.cluster.local."
    );
    let m = slow(&r, &query("99.0.0.10.in-addr.arpa.", RecordType::PTR, None)).unwrap();
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "unhealthy IP is not ours to name"
    );
    let m = slow(
        &r,
        &query("dns-version.cluster.local.", RecordType::TXT, None),
    )
    .unwrap();
    assert!(m.answers[0].data.to_string().contains("svcd"));
    let m = slow(&r, &query("cluster.local.", RecordType::SOA, None)).unwrap();
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    let m = slow(&r, &query("cluster.local.", RecordType::NS, None)).unwrap();
    assert_eq!(m.answers[0].data.to_string(), "ns.dns.cluster.local.");
    let m = slow(
        &r,
        &query("web.default.svc.cluster.local.", RecordType::ANY, None),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        m.answers[0].record_type(),
        RecordType::HINFO,
        "RFC 8482 minimal ANY"
    );
}

#[test]
fn out_of_zone_refused_without_forwarders() {
    let r = responder();
    let m = slow(&r, &query("example.com.", RecordType::A, None)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.recursion_available);
}

#[test]
fn max_answers_and_truncation() {
    let mut config = svcd_config::parse("").unwrap().dns;
    config.max_answers = 2;
    let r = responder_with(&config);
    let m = fast(
        &r,
        &query("web.default.svc.cluster.local.", RecordType::A, None),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 2);
    let m = slow(
        &r,
        &query(
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
            None,
        ),
    )
    .unwrap();
    assert_eq!(m.answers.len(), 2);
}

#[test]
fn weights_choose_the_first_answer_when_max_answers_cuts_the_set() {
    // w1 has weight 3, w2 and w3 weight 1: with one answer per query, 3:1:1 within 5 %, on both
    // paths, over 10,000 queries.
    let mut config = svcd_config::parse("").unwrap().dns;
    config.max_answers = 1;
    let r = responder_with(&config);
    let packet = query("web.default.svc.cluster.local.", RecordType::A, None);
    let mut fastpath = FastPath::new();
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for i in 0..10_000 {
        let m = if i % 10 == 0 {
            slow(&r, &packet).unwrap()
        } else {
            Message::from_vec(fastpath.answer(&packet, &r).unwrap()).unwrap()
        };
        assert_eq!(m.answers.len(), 1);
        *counts.entry(addrs(&m)[0].clone()).or_default() += 1;
    }
    let share = |ip: &str| counts[ip] as f64 / 10_000.0;
    assert!((share("10.0.0.1") - 0.6).abs() <= 0.03, "{counts:?}");
    assert!((share("10.0.0.2") - 0.2).abs() <= 0.01, "{counts:?}");
    assert!((share("10.0.0.3") - 0.2).abs() <= 0.01, "{counts:?}");
}

#[test]
fn protocol_errors() {
    let r = responder();
    // EDNS version 1 → BADVERS (with an OPT carrying the high rcode bits).
    let mut m = Message::new(1, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let packet = m.to_bytes().unwrap();
    assert!(fast(&r, &packet).is_none());
    let resp = slow(&r, &packet).unwrap();
    // BADVERS and BADSIG share code 16; the parser names it BADSIG.
    assert_eq!(u16::from(resp.metadata.response_code), 16);
    // Unknown opcode → NOTIMP.
    let mut m = Message::new(2, MessageType::Query, OpCode::Status);
    m.add_query(Query::query(
        Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        slow(&r, &m.to_bytes().unwrap())
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    // No question, two questions → FORMERR.
    let m = Message::new(3, MessageType::Query, OpCode::Query);
    assert_eq!(
        slow(&r, &m.to_bytes().unwrap())
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let mut m = Message::new(4, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("a.cluster.local.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("b.cluster.local.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        slow(&r, &m.to_bytes().unwrap())
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
}

/// Every hand-made seed and every input the fuzzer kept, replayed through both paths: no panic,
/// and any answer is a well-formed DNS message no larger than the client may receive.
#[test]
fn fuzz_corpus_replays_cleanly() {
    let r = responder();
    let mut count = 0;
    for dir in ["seeds", "corpus/packet"] {
        let dir = format!("{}/fuzz/{dir}", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let packet = std::fs::read(entry.unwrap().path()).unwrap();
            crate::fuzz_one(&r, &packet);
            count += 1;
        }
    }
    assert!(count >= 500, "corpus has {count} files");
}

/// A responder over `entries` (key under /svcd/v1/endpoints/, JSON value).
fn responder_over(entries: &[(String, String)], config: &DnsConfig) -> Arc<DnsResponder> {
    let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
    DnsResponder::new(config, SnapshotReader::fixed(snapshot_of(entries)), metrics)
}

#[test]
fn instances_sharing_an_address_give_one_record_on_both_paths() {
    let entries: Vec<(String, String)> = [("a", "10.0.0.1"), ("b", "10.0.0.1"), ("c", "10.0.0.2")]
        .iter()
        .map(|(id, ip)| (format!("default/web/{id}"), format!(r#"{{"ip":"{ip}"}}"#)))
        .collect();
    let config = svcd_config::parse("").unwrap().dns;
    let r = responder_over(&entries, &config);
    let packet = query("web.default.svc.cluster.local.", RecordType::A, None);
    for m in [fast(&r, &packet).unwrap(), slow(&r, &packet).unwrap()] {
        assert_eq!(
            addrs(&m),
            ["10.0.0.1", "10.0.0.2"],
            "no duplicate in the RRset"
        );
    }
    // With one answer per query, the shared address carries both instances' shares: 2 of 3.
    let mut config = config;
    config.max_answers = 1;
    let r = responder_over(&entries, &config);
    let firsts: Vec<String> = (0..300)
        .map(|_| addrs(&fast(&r, &packet).unwrap())[0].clone())
        .collect();
    let shared = firsts.iter().filter(|a| *a == "10.0.0.1").count();
    assert_eq!(shared, 200);
}

#[test]
fn the_do_bit_is_copied_on_both_paths() {
    let r = responder();
    let mut m = Message::new(0x77, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_max_payload(1232).set_dnssec_ok(true);
    m.set_edns(e);
    let packet = m.to_bytes().unwrap();
    for reply in [fast(&r, &packet).unwrap(), slow(&r, &packet).unwrap()] {
        assert!(reply.edns.as_ref().unwrap().flags().dnssec_ok, "DO copied");
    }
    let plain = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    for reply in [fast(&r, &plain).unwrap(), slow(&r, &plain).unwrap()] {
        assert!(!reply.edns.as_ref().unwrap().flags().dnssec_ok);
    }
}

#[test]
fn an_opt_option_overrunning_its_rdata_is_formerr_on_both_paths() {
    let r = responder();
    let mut packet = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    // The OPT ends the packet with rdlen 0: give it 4 bytes of rdata whose one option claims 9.
    let len = packet.len();
    packet[len - 2..].copy_from_slice(&4u16.to_be_bytes());
    packet.extend_from_slice(&[0x00, 0x0a, 0x00, 0x09]);
    assert!(
        fast(&r, &packet).is_none(),
        "the fast path leaves it to hickory"
    );
    let reply = slow(&r, &packet).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
}

#[test]
fn a_truncated_answer_without_edns_ends_at_a_record_boundary() {
    let entries: Vec<(String, String)> = (1..=60)
        .map(|i| {
            (
                format!("default/big/b{i}"),
                format!(r#"{{"ip":"10.2.0.{i}"}}"#),
            )
        })
        .collect();
    let mut config = svcd_config::parse("").unwrap().dns;
    config.max_answers = 60;
    let r = responder_over(&entries, &config);
    let packet = query("big.default.svc.cluster.local.", RecordType::A, None);
    assert!(
        fast(&r, &packet).is_none(),
        "60 records do not fit 512 bytes"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bytes = rt.block_on(r.answer_udp(packet, src())).unwrap();
    assert!(bytes.len() <= 512, "{}", bytes.len());
    // Parsed strictly: every record whole, nothing trailing.
    let m = Message::from_vec(&bytes).expect("a valid message");
    assert!(m.metadata.truncation, "TC set");
    assert!(
        !m.answers.is_empty() && m.answers.len() < 60,
        "{}",
        m.answers.len()
    );
    // Walk it as kdig does: header, question, the counted records — and then the end.
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    let mut d = BinDecoder::new(&bytes);
    d.read_slice(12).unwrap();
    Query::read(&mut d).unwrap();
    for _ in 0..m.answers.len() + m.authorities.len() + m.additionals.len() {
        hickory_proto::rr::Record::read(&mut d).unwrap();
    }
    assert_eq!(d.index(), bytes.len(), "no trailing bytes");
}

/// A forwarded answer the general path made comes back to the worker and is replayed for its
/// next queries (their ID, RD bit and 0x20 case), for at most a second and never past a TTL.
#[test]
fn workers_replay_forwarded_answers_briefly() {
    use crate::pending::LearnedAnswer;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};

    let config = svcd_config::parse("[dns]\nforward = [\"127.0.0.1:1\"]\n")
        .unwrap()
        .dns;
    let r = responder_with(&config);
    let mut fast = FastPath::new();
    let ask = |name: &str, id: u16| {
        let mut q = query(name, RecordType::A, Some(1232));
        q[..2].copy_from_slice(&id.to_be_bytes());
        q
    };
    // The first query misses and notes where its answer may be kept.
    let first = ask("host.example.org.", 7);
    assert!(fast.answer(&first, &r).is_none());
    let key = fast.take_forward_miss().expect("a forwardable miss");
    // What the general path answered (built here: no upstream in a unit test).
    let answer_with_ttl = |ttl: u32| {
        let mut m = Message::from_vec(&first).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.metadata.recursion_available = true;
        m.add_answer(Record::from_rdata(
            Name::from_ascii("host.example.org.").unwrap(),
            ttl,
            RData::A(A::new(10, 9, 9, 9)),
        ));
        m.to_vec().unwrap()
    };
    assert!(
        LearnedAnswer::of(key.clone(), &answer_with_ttl(0)).is_none(),
        "TTL 0: not kept"
    );
    fast.learn(LearnedAnswer::of(key, &answer_with_ttl(300)).unwrap());
    // Another query, another ID and case: replayed with both.
    let again = ask("HoSt.Example.ORG.", 8);
    let replayed = Message::from_vec(fast.answer(&again, &r).expect("replayed")).unwrap();
    assert_eq!(replayed.metadata.id, 8);
    assert_eq!(replayed.queries[0].name().to_ascii(), "HoSt.Example.ORG.");
    assert_eq!(addrs(&replayed), vec!["10.9.9.9"]);
    // Without EDNS it is another answer (no OPT): not replayed from the EDNS one.
    let plain = query("host.example.org.", RecordType::A, None);
    assert!(fast.answer(&plain, &r).is_none());
    // In-zone names never take this path.
    let inside = query("web.default.svc.cluster.local.", RecordType::A, None);
    assert!(fast.answer(&inside, &r).is_some());
    assert!(fast.take_forward_miss().is_none());
}

mod consul;
