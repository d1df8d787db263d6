//! Forwarding through a real upstream socket on loopback: identical questions asked once and
//! every client answered with its own ID and spelling; past the bounds SERVFAIL at once and
//! counted; the zone answered meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use svcd_registry::{EndpointSnapshot, SnapshotReader};
use tokio::net::UdpSocket;

use crate::handler::DnsResponder;
use crate::metrics::DnsMetrics;

/// A fake upstream: counts the queries it receives per lower-cased name and, unless `silent`,
/// answers each with `1.2.3.4` after `delay`.
struct Upstream {
    addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(delay: Duration, silent: bool) -> Upstream {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = received.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let name = query.queries[0].name().to_lowercase().to_ascii();
                seen.lock().unwrap().push(name);
                if silent {
                    continue;
                }
                let socket = socket.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut reply = query.clone();
                    reply.metadata.message_type = MessageType::Response;
                    reply.metadata.recursion_available = true;
                    reply.add_answer(Record::from_rdata(
                        query.queries[0].name().clone(),
                        60,
                        RData::A(A::new(1, 2, 3, 4)),
                    ));
                    let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
                });
            }
        });
        Upstream {
            addr,
            received,
            task,
        }
    }

    fn queries_for(&self, name: &str) -> usize {
        let received = self.received.lock().unwrap();
        received.iter().filter(|n| *n == name).count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn responder(dns_toml: &str) -> Arc<DnsResponder> {
    let config = svcd_config::parse(dns_toml).unwrap().dns;
    let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
    DnsResponder::new(
        &config,
        SnapshotReader::fixed(EndpointSnapshot::default()),
        metrics,
    )
}

fn query(id: u16, name: &str, dnssec_ok: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut e = Edns::new();
    e.set_max_payload(1232).set_dnssec_ok(dnssec_ok);
    m.set_edns(e);
    m.to_vec().unwrap()
}

/// Polls `done` every 5 ms, for up to 5 s.
async fn until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "condition not met in 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn src() -> SocketAddr {
    "127.0.0.1:5353".parse().unwrap()
}

#[tokio::test]
async fn identical_questions_waiting_together_are_asked_once_and_each_answered_as_asked() {
    let upstream = Upstream::start(Duration::from_millis(300), false).await;
    let r = responder(&format!("[dns]\nforward = [\"{}\"]\n", upstream.addr));
    // Twenty clients ask the same question at once, spelled three ways; two more ask it with
    // the DO bit (another question).
    let spellings = [
        "host.example.org.",
        "HOST.example.org.",
        "Host.Example.Org.",
    ];
    let mut asked = Vec::new();
    for id in 0..22u16 {
        let name = spellings[id as usize % 3];
        let packet = query(id, name, id >= 20);
        let r = r.clone();
        asked.push((
            id,
            name,
            tokio::spawn(async move { r.answer_udp(packet, src()).await }),
        ));
    }
    for (id, name, answer) in asked {
        let m = Message::from_vec(&answer.await.unwrap().expect("answered")).unwrap();
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            m.queries[0].name().to_ascii(),
            name,
            "the client's own spelling"
        );
        assert!(matches!(m.answers[0].data, RData::A(a) if a == A::new(1, 2, 3, 4)));
    }
    // Two questions led (one task each): the twenty, and the two with DO; the other twenty
    // joined them. (Upstream, hickory-resolver merges identical lookups in flight as well, and
    // does not send DO: at most one query per question reached it.)
    assert_eq!(r.metrics.forwarded_ok.get(), 2);
    assert_eq!(r.metrics.forward_coalesced.get(), 20);
    let upstream_queries = upstream.queries_for("host.example.org.");
    assert!((1..=2).contains(&upstream_queries), "{upstream_queries}");
    assert_eq!(r.metrics.forward_in_flight.get(), 0);
    assert_eq!(r.inflight.questions(), 0);
}

#[tokio::test]
async fn past_the_bounds_questions_get_servfail_at_once_and_the_zone_still_answers() {
    let upstream = Upstream::start(Duration::ZERO, true).await;
    let r = responder(&format!(
        "[dns]\nforward = [\"{}\"]\n[dns.forwarding]\nmax_in_flight = 3\nmax_in_flight_per_worker = 2\ntimeout = \"400ms\"\n",
        upstream.addr
    ));
    // Ten different names: the general lane leads two, the rest are refused at once.
    let started = Instant::now();
    let mut asked = Vec::new();
    for id in 0..10u16 {
        let packet = query(id, &format!("q{id}.silent.example."), false);
        let r = r.clone();
        asked.push(tokio::spawn(async move {
            let out = r.answer_udp(packet, src()).await;
            (out, Instant::now())
        }));
    }
    // Two led questions in flight, eight refused; the zone answers meanwhile at once.
    let overflow = || {
        r.metrics
            .forward_overflow(crate::inflight::Limit::Worker)
            .get()
    };
    until(|| overflow() == 8).await;
    assert_eq!(r.metrics.forward_in_flight.get(), 2);
    let zone = query(99, "nothing.default.svc.cluster.local.", false);
    let t = Instant::now();
    let m = Message::from_vec(&r.answer_udp(zone, src()).await.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    let mut quick = 0;
    for task in asked {
        let (out, at) = task.await.unwrap();
        let m = Message::from_vec(&out.expect("answered")).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        if at - started < Duration::from_millis(200) {
            quick += 1;
        } else {
            // The led ones: the silent upstream's whole budget, not more.
            assert!(
                at - started < Duration::from_millis(1500),
                "{:?}",
                at - started
            );
        }
    }
    assert_eq!(quick, 8, "refused at once");
    assert_eq!(overflow(), 8);
    assert_eq!(r.metrics.forwarded_failed.get(), 2);
    assert_eq!(r.metrics.forward_in_flight.get(), 0);
    assert!(upstream.queries_for("q0.silent.example.") >= 1);
}

#[tokio::test]
async fn shutdown_answers_questions_still_waiting() {
    let upstream = Upstream::start(Duration::ZERO, true).await;
    let r = responder(&format!(
        "[dns]\nforward = [\"{}\"]\n[dns.forwarding]\ntimeout = \"30s\"\n",
        upstream.addr
    ));
    let waiting = {
        let r = r.clone();
        tokio::spawn(async move { r.answer_udp(query(1, "slow.example.", false), src()).await })
    };
    until(|| r.metrics.forward_in_flight.get() == 1).await;
    let t = Instant::now();
    r.stop_forwarding();
    let m = Message::from_vec(&waiting.await.unwrap().unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(r.metrics.forward_in_flight.get(), 0);
}
