//! DNS abuse limits through the real daemon, with clients on several loopback networks (all of
//! 127/8 is local): a UDP flood from one /24 is rate limited (some answers truncated, the rest
//! dropped) while a client on another network keeps every answer; TCP connections are capped
//! per client and in total, and idle ones are closed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::support::daemon::Daemon;
use crate::support::{dns, eventually};

const WEB: &str = "web.default.svc.cluster.local.";

/// A UDP socket with source address `ip`.
async fn udp_from(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap()
}

/// Sends `n` queries from each of `sources` as fast as it can, then counts what came back:
/// `(answered, truncated)`.
async fn flood(server: SocketAddr, sources: &[&str], n: usize) -> (usize, usize) {
    let mut sockets = Vec::new();
    for ip in sources {
        let s = udp_from(ip).await;
        for _ in 0..n {
            s.send_to(&dns::query(WEB, RecordType::A, None), server)
                .await
                .unwrap();
        }
        sockets.push(s);
    }
    let (mut answered, mut truncated) = (0, 0);
    let mut buf = vec![0u8; 4096];
    for s in &sockets {
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
        {
            let m = Message::from_vec(&buf[..len]).unwrap();
            if m.metadata.truncation {
                assert!(m.answers.is_empty());
                truncated += 1;
            } else {
                answered += 1;
            }
        }
    }
    (answered, truncated)
}

#[tokio::test]
async fn a_udp_flood_from_one_network_is_rate_limited_and_other_clients_keep_their_answers() {
    let d = Daemon::start("[dns.rrl]\nrate = 20\nslip = 2\n").await;
    d.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;
    let server = d.dns;
    // A legitimate client on 127.2.0.0/24: ten queries a second, each waiting for its answer.
    let legit = tokio::spawn(async move {
        let s = udp_from("127.2.0.1").await;
        let mut answered = 0;
        let mut buf = vec![0u8; 4096];
        for _ in 0..20 {
            s.send_to(&dns::query(WEB, RecordType::A, None), server)
                .await
                .unwrap();
            if let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::from_secs(1), s.recv_from(&mut buf)).await
            {
                let m = Message::from_vec(&buf[..len]).unwrap();
                if !m.metadata.truncation && dns::addrs(&m) == vec!["10.0.0.1"] {
                    answered += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answered
    });
    // The flood: 2,000 queries from four addresses of 127.1.0.0/24.
    let sources = ["127.1.0.1", "127.1.0.2", "127.1.0.3", "127.1.0.4"];
    let (answered, truncated) = flood(server, &sources, 500).await;
    let legit = legit.await.unwrap();
    eprintln!("flood of 2000: {answered} answered, {truncated} truncated; legit {legit}/20");
    assert_eq!(legit, 20, "the other network kept every answer");
    // One second of burst plus the rate over the flood's duration; nowhere near 2,000.
    assert!(answered <= 80, "{answered} answered");
    assert!(answered >= 15, "{answered} answered");
    assert!(
        truncated >= 200,
        "every second limited answer truncated: {truncated}"
    );
    let dropped = d
        .metric("svcd_dns_rrl_limited_total{action=\"dropped\"}")
        .await
        .unwrap();
    let slipped = d
        .metric("svcd_dns_rrl_limited_total{action=\"truncated\"}")
        .await
        .unwrap();
    assert!(dropped >= 500.0 && slipped >= 500.0, "{dropped} {slipped}");
    // TCP is not rate limited: the flooding network still gets its answer there.
    let m = dns::tcp(server, WEB, RecordType::A).await;
    assert_eq!(dns::addrs(&m), vec!["10.0.0.1"]);
}

/// A TCP connection to `server` from `ip`.
async fn tcp_from(ip: &str, server: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind((ip.parse::<IpAddr>().unwrap(), 0).into()).unwrap();
    s.connect(server).await.unwrap()
}

/// Whether the server closed `s` within `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn tcp_connections_are_capped_per_client_and_in_total_and_idle_ones_closed() {
    let d = Daemon::start(
        "[dns.tcp]\nmax_connections = 5\nmax_per_client = 3\nidle_timeout = \"1s\"\n",
    )
    .await;
    d.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;
    let server = d.dns;
    // One client opens five: the first three stay, the others are closed at once.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tcp_from("127.1.0.1", server).await);
    }
    let mut refused = 0;
    for s in &mut held[3..] {
        refused += usize::from(closed(s, Duration::from_millis(300)).await);
    }
    assert_eq!(refused, 2);
    // A second client takes the remaining two; past that the total limit closes the next one.
    let mut second = Vec::new();
    for _ in 0..3 {
        second.push(tcp_from("127.3.0.1", server).await);
    }
    assert!(closed(&mut second[2], Duration::from_millis(300)).await);
    assert_eq!(
        d.metric("svcd_dns_tcp_refused_total{limit=\"per_client\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        d.metric("svcd_dns_tcp_refused_total{limit=\"total\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(d.metric("svcd_dns_tcp_connections").await, Some(5.0));
    // The held connections send nothing: closed after the idle timeout, and a legitimate
    // client gets its answer over TCP.
    assert!(closed(&mut held[0], Duration::from_secs(3)).await);
    eventually(
        Duration::from_secs(3),
        "idle connections closed",
        || async { (d.metric("svcd_dns_tcp_connections").await == Some(0.0)).then_some(()) },
    )
    .await;
    assert!(d.metric("svcd_dns_tcp_idle_closed_total").await.unwrap() >= 5.0);
    let m = dns::tcp(server, WEB, RecordType::A).await;
    assert_eq!(dns::addrs(&m), vec!["10.0.0.1"]);
}
