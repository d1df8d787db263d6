//! The L4 proxy through the real daemon: real TCP and UDP backends and clients.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::support::daemon::{metric_sum, Daemon};
use crate::support::{eventually, free_port};

/// A TCP backend that greets with its name and then echoes; returns its address.
pub(crate) async fn echo_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(name.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub(crate) async fn register(d: &Daemon, svc: &str, id: &str, addr: SocketAddr) {
    let body = format!(
        r#"{{"ip":"{}","ports":{{"tcp":{}}}}}"#,
        addr.ip(),
        addr.port()
    );
    d.put_instance(svc, id, &body).await;
}

pub(crate) fn tcp_listener(port: u16, svc: &str) -> String {
    format!("[[proxy.tcp]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"{svc}\"\nport = \"tcp\"\n")
}

/// Connects through the proxy and reads the backend's name (its greeting).
pub(crate) async fn greeting(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("greeting in 5s")
        .unwrap();
    String::from_utf8(buf.to_vec()).unwrap()
}

#[tokio::test]
async fn round_robin_is_exact_and_refused_backends_are_skipped() {
    let port = free_port();
    let d = Daemon::start(&tcp_listener(port, "echo")).await;
    for (name, id) in [("b1", "e1"), ("b2", "e2"), ("b3", "e3")] {
        register(&d, "echo", id, echo_backend(name).await).await;
    }
    d.wait_instances(
        "default",
        "echo",
        &["e1", "e2", "e3"],
        Duration::from_secs(5),
    )
    .await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *seen.entry(greeting(port).await).or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{seen:?}"
    );

    // A fourth instance that refuses connections: every client still gets through.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    register(&d, "echo", "e4", closed).await;
    d.wait_instances(
        "default",
        "echo",
        &["e1", "e2", "e3", "e4"],
        Duration::from_secs(5),
    )
    .await;
    for _ in 0..12 {
        let g = greeting(port).await;
        assert!(["b1", "b2", "b3"].contains(&g.as_str()), "{g}");
    }
    let failures = d
        .metric("svcd_tcp_connect_failures_total{endpoint=\"e4\",service=\"echo.default\"}")
        .await;
    assert_eq!(
        failures,
        Some(3.0),
        "the refusing instance was tried once per round"
    );
    // A refused pick falls through to the next instance in order: e4's turns went to e1.
    assert_eq!(
        d.metric("svcd_tcp_connections_total{endpoint=\"e1\",service=\"echo.default\"}")
            .await,
        Some(16.0)
    );
}

/// Deterministic bytes: 64 KiB blocks of a xorshift stream.
fn fill(block: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Order-sensitive checksum over a byte stream (FNV-1a over 8-byte words).
#[derive(Default)]
struct Checksum {
    h: u64,
    n: u64,
}

impl Checksum {
    fn update(&mut self, data: &[u8]) {
        for chunk in data.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.h = (self.h ^ u64::from_le_bytes(w)).wrapping_mul(0x100000001b3);
        }
        self.n += data.len() as u64;
    }
}

/// Sends `total` bytes through the proxy to an echo backend while reading the echo back;
/// returns (sent checksum, received checksum).
async fn transfer(port: u16, total: u64) -> ((u64, u64), (u64, u64)) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let mut greet = [0u8; 2];
    r.read_exact(&mut greet).await.unwrap();
    let writer = tokio::spawn(async move {
        // Block boundaries must not matter to the checksum: it runs over 8-byte words and every
        // block is a multiple of 8.
        let mut sum = Checksum::default();
        let mut block = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        let mut seed = 1u64;
        while sent < total {
            fill(&mut block, seed);
            seed += 1;
            w.write_all(&block).await.unwrap();
            sum.update(&block);
            sent += block.len() as u64;
        }
        w.shutdown().await.unwrap();
        (sum.h, sum.n)
    });
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        // Keep word alignment across reads.
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        sum.update(&pending[..whole]);
        pending.drain(..whole);
    }
    sum.update(&pending);
    (writer.await.unwrap(), (sum.h, sum.n))
}

async fn gigabyte_through(splice: bool) {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[proxy]\nsplice = {splice}\n{}",
        tcp_listener(port, "echo")
    ))
    .await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    d.wait_instances("default", "echo", &["e1"], Duration::from_secs(5))
        .await;
    let (sent, received) = transfer(port, 1 << 30).await;
    assert_eq!(sent.1, 1 << 30);
    assert_eq!(
        received, sent,
        "1 GiB each way, same bytes in the same order (splice = {splice})"
    );
    let bytes_in = d
        .metric("svcd_tcp_bytes_total{direction=\"in\",endpoint=\"e1\",service=\"echo.default\"}")
        .await;
    assert_eq!(bytes_in, Some((1u64 << 30) as f64));
    // Both directions moved the way the test's name says: no silent fallback.
    let (used, other) = if splice {
        ("splice", "copy")
    } else {
        ("copy", "splice")
    };
    let selector = |path: &str| format!("svcd_tcp_relay_directions_total{{path=\"{path}\"}}");
    assert_eq!(d.metric(&selector(used)).await, Some(2.0), "{used}");
    assert_eq!(d.metric(&selector(other)).await, Some(0.0), "{other}");
}

#[tokio::test]
async fn gigabyte_both_ways_through_the_splice_path() {
    gigabyte_through(true).await;
}

#[tokio::test]
async fn gigabyte_both_ways_through_the_copy_path() {
    gigabyte_through(false).await;
}

#[tokio::test]
async fn half_close_lets_the_reply_flow() {
    // The backend reads the whole request (until the client's FIN), then answers and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                s.read_to_end(&mut req).await.unwrap();
                s.write_all(format!("got {} bytes", req.len()).as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    let port = free_port();
    let d = Daemon::start(&tcp_listener(port, "rr")).await;
    register(&d, "rr", "r1", backend).await;
    d.wait_instances("default", "rr", &["r1"], Duration::from_secs(5))
        .await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&[7u8; 100_000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 100000 bytes");
    eventually(
        Duration::from_secs(2),
        "connection fully closed",
        || async {
            (d.metric("svcd_tcp_connections_active{endpoint=\"r1\",service=\"rr.default\"}")
                .await
                == Some(0.0))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn two_thousand_concurrent_connections() {
    let port = free_port();
    let d = Daemon::start(&tcp_listener(port, "echo")).await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    register(&d, "echo", "e2", echo_backend("b2").await).await;
    d.wait_instances("default", "echo", &["e1", "e2"], Duration::from_secs(5))
        .await;
    let mut open = Vec::new();
    for _ in 0..2000 {
        open.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in open.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut greet = [0u8; 2];
            s.read_exact(&mut greet).await.unwrap();
            let msg = format!("hello {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
            s
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r.unwrap());
    }
    assert_eq!(held.len(), 2000);
    let active = d
        .metric("svcd_tcp_connections_active{endpoint=\"e1\",service=\"echo.default\"}")
        .await
        .unwrap()
        + d.metric("svcd_tcp_connections_active{endpoint=\"e2\",service=\"echo.default\"}")
            .await
            .unwrap();
    assert_eq!(active, 2000.0);
}

#[tokio::test]
async fn max_connections_is_enforced() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[proxy]\nmax_connections = 2\n{}",
        tcp_listener(port, "echo")
    ))
    .await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    d.wait_instances("default", "echo", &["e1"], Duration::from_secs(5))
        .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut greet = [0u8; 2];
        s.read_exact(&mut greet).await.unwrap();
        held.push(s);
    }
    let mut extra = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 2];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "excess connection closed, got {n:?}"
    );
    assert_eq!(
        d.metric("svcd_tcp_connections_rejected_total").await,
        Some(1.0)
    );
    drop(held);
    eventually(Duration::from_secs(2), "slots free again", || async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut greet = [0u8; 2];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut greet))
            .await
            .ok()?
            .ok()
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn removed_instance_keeps_open_connections_until_the_drain_timeout() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[shutdown]\ndrain_timeout = \"1s\"\n{}",
        tcp_listener(port, "echo")
    ))
    .await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    d.wait_instances("default", "echo", &["e1"], Duration::from_secs(5))
        .await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut greet = [0u8; 2];
    s.read_exact(&mut greet).await.unwrap();
    assert_eq!(
        d.request("DELETE", "/v1/services/default/echo/instances/e1", None)
            .await
            .status,
        200
    );
    d.wait_instances("default", "echo", &[], Duration::from_secs(5))
        .await;
    s.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(
        &back, b"still",
        "open connection continues after deregistration"
    );
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed after drain");
    assert!(matches!(closed, Ok(0) | Err(_)));
    // New connections find no instance.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(matches!(s.read(&mut buf).await, Ok(0) | Err(_)));
    assert!(
        d.metric("svcd_proxy_no_healthy_endpoint_total{service=\"echo.default\"}")
            .await
            .unwrap()
            >= 1.0
    );
}

/// A UDP backend that answers every datagram with `<name>:<datagram>`.
pub(crate) async fn udp_backend(name: &'static str) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let reply = [name.as_bytes(), b":", &buf[..n]].concat();
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn udp_flows_and_flow_dropped_when_its_instance_leaves() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.udp]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"cache\"\nport = \"tcp\"\n"
    ))
    .await;
    register(&d, "cache", "c1", udp_backend("u1").await).await;
    d.wait_instances("default", "cache", &["c1"], Duration::from_secs(5))
        .await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    let ask = |msg: &'static str| {
        let client = &client;
        async move {
            client.send(msg.as_bytes()).await.unwrap();
            let mut buf = [0u8; 2048];
            let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    };
    assert_eq!(ask("ping").await.as_deref(), Some("u1:ping"));
    assert_eq!(ask("again").await.as_deref(), Some("u1:again"), "same flow");
    let c1_out =
        "svcd_udp_datagrams_total{direction=\"out\",endpoint=\"c1\",service=\"cache.default\"}";
    // Counted as the reply is sent: the client may read it first.
    eventually(
        Duration::from_secs(5),
        "two datagrams out counted",
        || async { (d.metric(c1_out).await == Some(2.0)).then_some(()) },
    )
    .await;
    // Replace the instance: the flow to u1 is dropped at once, the next datagram goes to u2.
    register(&d, "cache", "c2", udp_backend("u2").await).await;
    assert_eq!(
        d.request("DELETE", "/v1/services/default/cache/instances/c1", None)
            .await
            .status,
        200
    );
    d.wait_instances("default", "cache", &["c2"], Duration::from_secs(5))
        .await;
    let reply = eventually(
        Duration::from_secs(3),
        "reply from the new instance",
        || async { ask("moved").await.filter(|r| r.starts_with("u2")) },
    )
    .await;
    assert_eq!(reply, "u2:moved");
    assert_eq!(d.metric(c1_out).await, None, "c1's series left with it");
}

#[tokio::test]
async fn tcp_listener_added_by_reload_without_dropping_open_connections() {
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::start(&tcp_listener(p1, "echo")).await;
    register(&d, "echo", "e1", echo_backend("b1").await).await;
    d.wait_instances("default", "echo", &["e1"], Duration::from_secs(5))
        .await;
    let mut open = TcpStream::connect(("127.0.0.1", p1)).await.unwrap();
    let mut greet = [0u8; 2];
    open.read_exact(&mut greet).await.unwrap();
    let text = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace(&tcp_listener(p1, "echo"), &tcp_listener(p2, "echo"));
    std::fs::write(&d.config_path, text).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let g = eventually(Duration::from_secs(5), "new listener", || async {
        let mut s = TcpStream::connect(("127.0.0.1", p2)).await.ok()?;
        let mut greet = [0u8; 2];
        s.read_exact(&mut greet).await.ok()?;
        Some(greet)
    })
    .await;
    assert_eq!(&g, b"b1");
    assert!(
        TcpStream::connect(("127.0.0.1", p1)).await.is_err(),
        "removed listener stopped accepting"
    );
    open.write_all(b"alive").await.unwrap();
    let mut back = [0u8; 5];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(
        &back, b"alive",
        "connection of the removed listener still open"
    );
}

#[tokio::test]
async fn refusing_instance_is_ejected_after_consecutive_connect_failures() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "{}[proxy.outlier]\nconsecutive_failures = 2\n",
        tcp_listener(port, "echo")
    ))
    .await;
    let live = echo_backend("ok").await;
    register(&d, "echo", "live", live).await;
    // Nothing listens here: every connect is refused.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    register(&d, "echo", "dead", dead).await;
    eventually(Duration::from_secs(5), "both registered", || async {
        let v = d.get("/v1/services/default/echo").await.json();
        (v["instances"].as_array().map_or(0, Vec::len) == 2).then_some(())
    })
    .await;
    // Refusals move on to the next instance: the client never sees them.
    for _ in 0..6 {
        assert_eq!(greeting(port).await, "ok");
    }
    let v = d
        .get("/v1/services/default/echo/instances/dead")
        .await
        .json();
    assert!(
        v["ejection"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("connect failed"),
        "{v}"
    );
    let m = d.get("/metrics").await.body;
    assert_eq!(
        metric_sum(
            &m,
            r#"svcd_outlier_ejections_total{detector="tcp",service="echo.default"}"#
        ),
        Some(1.0),
        "{m}"
    );
}
