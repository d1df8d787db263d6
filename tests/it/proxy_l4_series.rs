//! L4 metric series per listener, scraped from a live daemon: a TCP listener has the TCP
//! families only and a UDP listener the UDP families only, and a reload that removes a listener
//! removes every series that names it.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::proxy_l4::{echo_backend, register, tcp_listener, udp_backend};
use crate::support::daemon::Daemon;
use crate::support::{eventually, free_port};

/// The metric families on /metrics with a series labelled `listener="<listener>"`.
async fn families_of(d: &Daemon, listener: &str) -> BTreeSet<String> {
    let label = format!("listener=\"{listener}\"");
    d.get("/metrics")
        .await
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test]
async fn each_l4_listener_has_its_own_transports_series_and_they_go_with_it() {
    let (tcp_port, udp_port) = (free_port(), free_port());
    let listeners = format!(
        "{}[[proxy.udp]]\nlisten = \"127.0.0.1:{udp_port}\"\nservice = \"cache\"\nport = \"tcp\"\n",
        tcp_listener(tcp_port, "echo")
    );
    let d = Daemon::start(&listeners).await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    register(&d, "cache", "c1", udp_backend("u1").await).await;
    d.wait_instances("default", "echo", &["e1"], Duration::from_secs(5))
        .await;
    d.wait_instances("default", "cache", &["c1"], Duration::from_secs(5))
        .await;
    // Traffic through each, so the per-endpoint series exist too.
    let mut tcp = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let mut greeting = [0u8; 2];
    tcp.read_exact(&mut greeting).await.unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(b"ping", ("127.0.0.1", udp_port)).await.unwrap();
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buf))
        .await
        .expect("UDP reply")
        .unwrap();

    let (tcp_label, udp_label) = (
        format!("tcp/127.0.0.1:{tcp_port}"),
        format!("udp/127.0.0.1:{udp_port}"),
    );
    let both = [
        "svcd_proxy_no_healthy_endpoint_total",
        "svcd_proxy_descriptor_refusals_total",
    ];
    let tcp_families = set(&[
        &both[..],
        &[
            "svcd_tcp_connections_total",
            "svcd_tcp_connections_active",
            "svcd_tcp_connect_failures_total",
            "svcd_tcp_bytes_total",
            "svcd_tcp_connections_rejected_total",
        ],
    ]
    .concat());
    let udp_families = set(&[
        &both[..],
        &[
            "svcd_udp_datagrams_total",
            "svcd_udp_flows",
            "svcd_udp_flow_evictions_total",
        ],
    ]
    .concat());
    assert_eq!(families_of(&d, &tcp_label).await, tcp_families);
    assert_eq!(families_of(&d, &udp_label).await, udp_families);

    // Both listeners removed by a reload: every series naming them goes (the TCP listener's
    // once its last connection has closed).
    drop(tcp);
    d.reload_with("").await;
    eventually(
        Duration::from_secs(5),
        "the listeners' series gone",
        || async {
            let left = [
                families_of(&d, &tcp_label).await,
                families_of(&d, &udp_label).await,
            ];
            left.iter().all(BTreeSet::is_empty).then_some(())
        },
    )
    .await;
}
