//! Resource limits: a flood on one listener never stops the others or the admin API. UDP flows
//! are capped per listener (the oldest evicted), and the proxies' descriptor budget leaves a
//! reserve, so admin and DNS answer even when the proxies have spent theirs.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use tokio::net::UdpSocket;

use crate::proxy_l4::udp_backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::{register, wait_routable, H1};
use crate::support::{dns, free_port};

/// One datagram from each of `sources` new client sockets (distinct source ports), each
/// waiting for its reply, so every one opens a flow (none is lost in a socket buffer).
async fn flood(port: u16, sources: usize) {
    for i in 0..sources {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(("127.0.0.1", port)).await.unwrap();
        let _ = s.send(format!("{i}").as_bytes()).await;
        let mut buf = [0u8; 64];
        let reply = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await;
        assert!(matches!(reply, Ok(Ok(_))), "source {i} got no reply");
    }
}

async fn cache_listener(max_flows: usize) -> (String, u16) {
    let port = free_port();
    (
        format!(
            "[[proxy.udp]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"cache\"\nport = \"tcp\"\nmax_flows = {max_flows}\n"
        ),
        port,
    )
}

async fn register_cache(d: &Daemon) -> SocketAddr {
    let addr = udp_backend("u1").await;
    d.put_instance(
        "cache",
        "c1",
        &format!(r#"{{"ip":"127.0.0.1","ports":{{"tcp":{}}}}}"#, addr.port()),
    )
    .await;
    d.wait_instances("default", "cache", &["c1"], Duration::from_secs(5))
        .await;
    addr
}

#[tokio::test]
async fn a_udp_flood_is_capped_per_listener_and_http_and_admin_keep_answering() {
    let (listener, port) = cache_listener(50).await;
    let d = Daemon::start(&listener).await;
    register_cache(&d).await;
    let web = crate::support::backend::Backend::start("b1").await;
    register(&d, "web", "w1", web.addr, "http").await;
    wait_routable(&d, "web", 1).await;
    let flooding = tokio::spawn(flood(port, 2000));
    // While the flood runs: new HTTP connections, the admin API and DNS all answer.
    let mut answered = 0;
    while !flooding.is_finished() {
        let (status, body) = H1::connect(d.http).await.get("web", "/").await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "b1"));
        assert_eq!(d.get("/healthz").await.status, 200);
        let m = dns::udp(d.dns, "web.default.svc.cluster.local.", RecordType::A, None).await;
        assert_eq!(dns::addrs(&m), ["127.0.0.1"]);
        answered += 1;
    }
    flooding.await.unwrap();
    assert!(answered >= 1);
    let label = format!("listener=\"udp/127.0.0.1:{port}\"");
    let flows = d
        .metric(&format!("svcd_udp_flows{{{label}}}"))
        .await
        .unwrap();
    assert!(flows <= 50.0, "{flows} flows");
    let evicted = d
        .metric(&format!("svcd_udp_flow_evictions_total{{{label}}}"))
        .await
        .unwrap();
    assert!(
        evicted >= 1940.0,
        "flows past the 50th evicted the oldest: {evicted}"
    );
    let held = d.metric("svcd_proxy_descriptors_in_use").await.unwrap();
    assert!(held <= 60.0, "{held} descriptors held by the proxies");
}

#[tokio::test]
async fn one_listener_takes_at_most_half_the_budget_and_admin_and_dns_keep_their_reserve() {
    // 300 descriptors: 128 stay in reserve, the proxies get 172, one listener at most 86 — even
    // a UDP listener allowed far more flows than that.
    let (listener, port) = cache_listener(100_000).await;
    let d = Daemon::start_with_nofile(&listener, 300).await;
    register_cache(&d).await;
    let web = crate::support::backend::Backend::start("b1").await;
    register(&d, "web", "w1", web.addr, "http").await;
    wait_routable(&d, "web", 1).await;
    let limit = d.metric("svcd_proxy_descriptor_limit").await.unwrap();
    assert_eq!(limit, 172.0);
    flood(port, 600).await;
    let udp = format!("listener=\"udp/127.0.0.1:{port}\"");
    let flows = d.metric(&format!("svcd_udp_flows{{{udp}}}")).await.unwrap();
    assert!(flows <= 86.0, "{flows} flows");
    let evicted = d
        .metric(&format!("svcd_udp_flow_evictions_total{{{udp}}}"))
        .await
        .unwrap();
    assert!(
        evicted >= 600.0 - 86.0 - 10.0,
        "the listener recycled its own flows: {evicted}"
    );
    // The UDP flood left the HTTP listener its room.
    let (status, _) = H1::connect(d.http).await.get("web", "/").await;
    assert_eq!(status, 200);
    // A second flood, of idle HTTP connections: past its own half, clients are closed at once
    // and counted...
    let mut idle = Vec::new();
    for _ in 0..120 {
        idle.push(tokio::net::TcpStream::connect(d.http).await.unwrap());
    }
    let http = format!("listener=\"http/{}\"", d.http);
    let selector = format!("svcd_proxy_descriptor_refusals_total{{{http}}}");
    crate::support::eventually(Duration::from_secs(5), "idle clients refused", || async {
        (d.metric(&selector).await >= Some(20.0)).then_some(())
    })
    .await;
    let held = d.metric("svcd_proxy_descriptors_in_use").await.unwrap();
    assert!(held <= limit, "{held} > {limit}");
    // ...while the admin API and DNS, outside the budget, answer.
    for _ in 0..20 {
        assert_eq!(d.get("/healthz").await.status, 200);
        let m = dns::tcp(d.dns, "cache.default.svc.cluster.local.", RecordType::A).await;
        assert_eq!(dns::addrs(&m), ["127.0.0.1"]);
    }
    drop(idle);
}
