//! UDP proxy memory: a flood of sources (each its own flow) costs little per flow, and when the
//! flows idle out the flow table empties and the memory comes back (to the allocator, which
//! serves the next flood from it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::proxy_l4::{register, udp_backend};
use crate::support::daemon::Daemon;
use crate::support::{eventually, free_port};

/// Source ports (flows) opened, in batches of [`BATCH`] sockets held at once.
const FLOWS: usize = 5_000;
const BATCH: usize = 250;

/// One datagram from each of `n` new sockets on `ip` to `proxy`; returns how many got their echo
/// back (which means the proxy opened their flow). The sockets are closed on return; their flows
/// stay until they idle out. (Each batch on its own address: a port freed by one batch may be
/// handed to the next, which would make it the same client.)
async fn open_flows(proxy: SocketAddr, ip: IpAddr, n: usize) -> usize {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let s = UdpSocket::bind((ip, 0)).await.unwrap();
        s.send_to(b"hello", proxy).await.unwrap();
        sockets.push(s);
    }
    let mut answered = 0;
    let mut buf = [0u8; 64];
    for s in &sockets {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
            answered += 1;
        }
    }
    answered
}

#[tokio::test]
async fn many_udp_flows_cost_little_each_and_their_memory_comes_back_when_they_end() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.udp]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"cache\"\nport = \"tcp\"\nidle_timeout = \"3s\"\nmax_flows = 8192\n"
    ))
    .await;
    register(&d, "cache", "c1", udp_backend("u1").await).await;
    d.wait_instances("default", "cache", &["c1"], Duration::from_secs(5))
        .await;
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let flows = format!("svcd_udp_flows{{listener=\"udp/{proxy}\"}}");
    // Warm up (the listener, the runtime's threads, the balancer) and let those flows go.
    assert_eq!(
        open_flows(proxy, "127.0.0.1".parse().unwrap(), 50).await,
        50
    );
    let all_gone = || async {
        eventually(Duration::from_secs(15), "every flow idled out", || async {
            (d.metric(&flows).await == Some(0.0)).then_some(())
        })
        .await
    };
    all_gone().await;
    let baseline = d.rss_kib();

    // Two rounds: the second reuses what the first gave back (where a buffer allocated zeroed
    // is written whole).
    let mut rounds = Vec::new();
    for round in 0..2u8 {
        let started = Instant::now();
        let mut answered = 0;
        for batch in 0..(FLOWS / BATCH) as u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 10 + round, batch, 1));
            answered += open_flows(proxy, ip, BATCH).await;
        }
        let opened_in = started.elapsed();
        let open_now = d.metric(&flows).await.unwrap_or(0.0);
        let peak = d.rss_kib();
        // Flows idle out 3 s after their datagram; the sweep runs every second.
        all_gone().await;
        let settle = Instant::now();
        let mut after = d.rss_kib();
        while after > baseline + 4 * 1024 && settle.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = d.rss_kib();
        }
        let cost = peak.saturating_sub(baseline) as f64 / FLOWS as f64;
        eprintln!(
            "udp flows, round {round}: {answered} of {FLOWS} answered in {opened_in:?}, {open_now} \
             open; RSS baseline {baseline} KiB, with the flows {peak} KiB ({cost:.1} KiB a \
             flow), after they ended {after} KiB"
        );
        assert_eq!(answered, FLOWS, "every source got its flow");
        // All of them open at once (none idled out or was evicted while the flood ran).
        assert_eq!(open_now, FLOWS as f64, "flows open");
        rounds.push((cost, peak, after));
    }
    for &(cost, _, after) in &rounds {
        // A flow is a socket, a reply task and a table entry: a few KiB, not a 64 KiB buffer.
        assert!(cost < 8.0, "{cost:.1} KiB a flow");
        // What the flows held is back with the allocator (which keeps the small pieces for
        // reuse rather than returning each page): close to the baseline, not 64 KiB a flow.
        assert!(
            after < baseline + 16 * 1024,
            "RSS {after} KiB after the flows ended, from {baseline} KiB"
        );
    }
    // And reused: the second flood took no more than the first.
    let (first_peak, second_peak) = (rounds[0].1, rounds[1].1);
    assert!(
        second_peak < first_peak + 4 * 1024,
        "the second flood peaked at {second_peak} KiB, the first at {first_peak} KiB"
    );
}
