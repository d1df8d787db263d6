//! svcd as a node's only nameserver: several listen addresses (one on :53, as NodeLocal
//! DNSCache does), names outside the zone forwarded to the nameservers of a resolv.conf file
//! (svcd's own address in it skipped), and a forwarding loop found and stopped.

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::support::daemon::Daemon;
use crate::support::{dns, eventually};

/// A loopback address of its own for this test process (all of 127/8 is local), so tests that
/// listen on port 53 do not collide.
fn own_loopback(second: u8) -> String {
    let third = (std::process::id() % 250) as u8 + 1;
    format!("127.{second}.{third}.1")
}

#[tokio::test]
async fn names_outside_the_zone_go_to_the_resolv_conf_nameservers_skipping_svcd_itself() {
    // The upstream: another svcd, on port 53 (resolv.conf cannot name another port).
    let upstream_ip = own_loopback(53);
    let upstream_addr = format!("{upstream_ip}:53");
    let upstream =
        Daemon::start_with_dns(&[&upstream_addr], "domain = \"upstream.test\"\n", "").await;
    upstream
        .put_instance("api", "a1", r#"{"ip":"10.9.9.9"}"#)
        .await;
    // This node's svcd also answers on its own :53, which its resolv.conf lists first.
    let node_ip = own_loopback(54);
    let node_addr = format!("{node_ip}:53");
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("# as the node has it\nnameserver {node_ip}\nnameserver {upstream_ip}\noptions ndots:5\n"),
    )
    .unwrap();
    let node = Daemon::start_with_dns(
        &[&node_addr],
        &format!("forward = [{:?}]\n", resolv.to_str().unwrap()),
        "",
    )
    .await;
    node.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;

    for server in [node.dns, node_addr.parse().unwrap()] {
        let m = dns::udp(
            server,
            "api.default.svc.upstream.test.",
            RecordType::A,
            None,
        )
        .await;
        assert_eq!(dns::addrs(&m), vec!["10.9.9.9"], "forwarded via {server}");
        assert!(m.metadata.recursion_available);
        let m = dns::tcp(server, "web.default.svc.cluster.local.", RecordType::A).await;
        assert_eq!(dns::addrs(&m), vec!["10.0.0.1"], "own zone on {server}");
    }
    assert!(
        node.log().contains("skipping svcd's own address"),
        "{}",
        node.log()
    );
    assert_eq!(node.metric("svcd_dns_forward_loop").await, Some(0.0));
    assert!(
        node.metric("svcd_dns_forwarded_total{result=\"ok\"}")
            .await
            .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn a_forwarding_loop_is_found_and_forwarding_stops() {
    let a = Daemon::start("").await;
    let b = Daemon::start("").await;
    // A forwards to B, then B to A: a query for any outside name would circle.
    a.reload_with_dns(&format!("forward = [\"{}\"]\n", b.dns), "")
        .await;
    b.reload_with_dns(&format!("forward = [\"{}\"]\n", a.dns), "")
        .await;
    // Whichever daemon's probe comes back first finds the loop and stops forwarding; the other's
    // probe then ends at a daemon that no longer forwards, so only one of them may report it.
    let found = eventually(Duration::from_secs(10), "the loop found", || async {
        if b.metric("svcd_dns_forward_loop").await == Some(1.0) {
            Some(&b)
        } else if a.metric("svcd_dns_forward_loop").await == Some(1.0) {
            Some(&a)
        } else {
            None
        }
    })
    .await;
    assert!(
        found.log().contains("DNS forwarding loop"),
        "{}",
        found.log()
    );
    // Outside names now fail at once, asked of either daemon, instead of circling until they
    // time out.
    for daemon in [&a, &b] {
        let started = Instant::now();
        let m = dns::udp(daemon.dns, "example.org.", RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    // The zone itself still answers.
    b.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;
    let m = dns::udp(b.dns, "web.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(dns::addrs(&m), vec!["10.0.0.1"]);
}
