//! The load balancer as one owner of endpoint health, through the real daemon: both proxy planes
//! ejecting one instance keep every view of it equal; a reload keeps per-endpoint state; UDP
//! honours ejection and panic; weights split traffic in TCP, HTTP and DNS; and per-endpoint
//! series leave with their endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use tokio::net::UdpSocket;

use crate::proxy_l4::{echo_backend, greeting, tcp_listener, udp_backend};
use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::{register, wait_routable, H1};
use crate::support::{dns, eventually, free_port};

/// Registers `id` of `svc` at `addr` with one port named `tcp` and the given weight.
async fn put(d: &Daemon, svc: &str, id: &str, addr: SocketAddr, extra: &str) {
    let body = format!(
        r#"{{"ip":"{}","ports":{{"tcp":{}}}{extra}}}"#,
        addr.ip(),
        addr.port()
    );
    d.put_instance(svc, id, &body).await;
}

/// Every view of instance `id` of `web` at one moment: API served state, DNS, `svcd list`,
/// `svcd resolve`, and the metrics' ejected count. `None` if the API's state changed while the
/// others were read (a transition, not a disagreement).
async fn views(d: &Daemon, id: &str, port: u16) -> Option<(String, bool, String, bool, f64)> {
    let path = format!("/v1/services/default/web/instances/{id}");
    let api = || async {
        d.get(&path).await.json()["served_state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = api().await;
    // Both instances share 127.0.0.1 (one A record): SRV tells them apart by port.
    let answer = dns::tcp(
        d.dns,
        "_tcp._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    let in_dns = answer.answers.iter().any(|r| match &r.data {
        hickory_proto::rr::RData::SRV(srv) => srv.port == port,
        _ => false,
    });
    let list = String::from_utf8(d.cli(&["list", "web"]).stdout).unwrap();
    let listed = list
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_string();
    let resolve = String::from_utf8(d.cli(&["resolve", "web", "--port", "tcp"]).stdout).unwrap();
    let resolved = resolve.contains(&format!(":{port}"));
    let ejected = d
        .metric(r#"svcd_service_endpoints{service="web.default",state="ejected"}"#)
        .await
        .unwrap();
    (api().await == before).then_some((before, in_dns, listed, resolved, ejected))
}

#[tokio::test]
async fn both_planes_ejecting_one_instance_keep_every_view_equal_until_both_let_go() {
    let tcp_port = free_port();
    // Panic at 100 %: with one instance out, picks still spread over both, so the second plane
    // sees the dead instance fail too and adds its own hold.
    let d = Daemon::start(&format!(
        "{}[proxy.outlier]\nconsecutive_failures = 2\nbase_ejection_time = \"3s\"\n\
         max_ejection_percent = 100\npanic_threshold = 100\n[proxy.l7]\nretries = 1\n",
        tcp_listener(tcp_port, "web")
    ))
    .await;
    // Both planes send to the port named "tcp": w1 is an HTTP backend (the TCP client only
    // connects to it), w2 an address nobody listens on.
    let live = Backend::start("b1").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    put(&d, "web", "w1", live.addr, r#","protocol":"http""#).await;
    put(&d, "web", "w2", dead, r#","protocol":"http""#).await;
    d.wait_instances("default", "web", &["w1", "w2"], Duration::from_secs(5))
        .await;
    // Phase 1: TCP connects to w2 fail (the client is moved to w1): the tcp detector ejects it.
    eventually(Duration::from_secs(3), "tcp hold", || async {
        let _ = greeting_or_close(tcp_port).await;
        let w2 = d.get("/v1/services/default/web/instances/w2").await.json();
        (w2["ejection"]["holders"] == serde_json::json!(["tcp"])).then_some(())
    })
    .await;
    // Phase 2: HTTP requests, in panic, reach w2 too and fail: the http detector holds it as well.
    let mut c = H1::connect(d.http).await;
    for _ in 0..6 {
        let (s, _) = c.get("web", "/").await;
        assert_eq!(s, 200, "the failed attempt is retried on w1");
    }
    let w2 = d.get("/v1/services/default/web/instances/w2").await.json();
    assert_eq!(
        w2["ejection"]["holders"],
        serde_json::json!(["tcp", "http"]),
        "{w2}"
    );
    assert_eq!(w2["ejection"]["count"], 1, "one record, two holders");
    // Now no traffic: watch every view until both holds have ended. They never disagree; the
    // instance stays out while the http hold outlives the tcp one.
    let started = Instant::now();
    let (mut samples, mut ejected_samples) = (0, 0);
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "ejection never ended"
        );
        let Some((api, in_dns, listed, resolved, ejected)) = views(&d, "w2", dead.port()).await
        else {
            continue;
        };
        samples += 1;
        let out = api == "ejected";
        assert_eq!(listed, api, "svcd list agrees with the API");
        assert_eq!(in_dns, !out, "DNS agrees with the API ({api})");
        assert_eq!(resolved, !out, "svcd resolve agrees with the API ({api})");
        assert_eq!(
            ejected,
            if out { 1.0 } else { 0.0 },
            "metrics agree ({api})"
        );
        if out {
            ejected_samples += 1;
        } else {
            break;
        }
    }
    assert!(
        ejected_samples >= 2 && samples > ejected_samples,
        "{samples} samples"
    );
    // Each hold lasted its own 3 s; the instance came back only after the later one.
    let back_after = started.elapsed();
    assert!(back_after >= Duration::from_millis(1500), "{back_after:?}");
}

#[tokio::test]
async fn a_reload_keeps_in_flight_counts_and_ejections() {
    let (b1, b2) = (Backend::start("b1").await, Backend::start("b2").await);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(
        "[proxy.outlier]\nconsecutive_failures = 2\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n",
    )
    .await;
    register(&d, "web", "w1", b1.addr, "http").await;
    register(&d, "web", "w3", dead, "http").await;
    wait_routable(&d, "web", 1).await;
    // Eject w3 (connect refused), then hold five requests open on w1.
    let mut c = H1::connect(d.http).await;
    for _ in 0..6 {
        c.get("web", "/").await;
    }
    let before = d.get("/v1/services/default/web/instances/w3").await.json();
    assert_eq!(before["served_state"], "ejected", "{before}");
    let hanging: Vec<_> = (0..5)
        .map(|_| {
            let addr = d.http;
            tokio::spawn(async move { H1::connect(addr).await.get("web", "/hang").await })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "five requests in flight",
        || async {
            (d.metric(r#"svcd_http_requests_active{service="web.default"}"#)
                .await
                == Some(5.0))
            .then_some(())
        },
    )
    .await;
    // A second instance joins, and a reload switches to least request.
    register(&d, "web", "w2", b2.addr, "http").await;
    d.wait_instances(
        "default",
        "web",
        &["w1", "w2", "w3"],
        Duration::from_secs(5),
    )
    .await;
    d.reload_with(
        "[proxy.outlier]\nconsecutive_failures = 3\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n\
         [proxy.l7]\nbalance = \"least_request\"\n",
    )
    .await;
    // The ejection is the same record (same end), still applied.
    let after = d.get("/v1/services/default/web/instances/w3").await.json();
    assert_eq!(after["ejection"], before["ejection"], "{after}");
    assert_eq!(
        d.metric(r#"svcd_http_requests_active{service="web.default"}"#)
            .await,
        Some(5.0)
    );
    // Least request knows w1 still has five in flight: every new request goes to w2.
    let (w1_before, w2_before) = (b1.count(), b2.count());
    for _ in 0..20 {
        let (s, body) = c.get("web", "/").await;
        assert_eq!((s.as_u16(), body.as_str()), (200, "b2"));
    }
    assert_eq!((b1.count() - w1_before, b2.count() - w2_before), (0, 20));
    for h in hanging {
        h.abort();
    }
    eventually(Duration::from_secs(5), "in-flight back to zero", || async {
        (d.metric(r#"svcd_http_requests_active{service="web.default"}"#)
            .await
            == Some(0.0))
        .then_some(())
    })
    .await;
}

/// Sends one datagram from a new client socket; returns the backend's name.
async fn udp_ask(port: u16) -> String {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    client.send(b"hi").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .expect("UDP reply")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .split(':')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn udp_honours_ejection_and_panic() {
    let (tcp_port, udp_port) = (free_port(), free_port());
    let listeners = format!(
        "{}[[proxy.udp]]\nlisten = \"127.0.0.1:{udp_port}\"\nservice = \"cache\"\nport = \"tcp\"\n",
        tcp_listener(tcp_port, "cache")
    );
    let outlier = "[proxy.outlier]\nconsecutive_failures = 2\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n";
    let d = Daemon::start(&format!("{listeners}{outlier}panic_threshold = 0\n")).await;
    // c1 answers UDP and TCP on one port; c2 answers UDP only, so its TCP connects are refused.
    let c1 = udp_and_tcp_backend("u1").await;
    put(&d, "cache", "c1", c1, "").await;
    put(&d, "cache", "c2", udp_backend("u2").await, "").await;
    d.wait_instances("default", "cache", &["c1", "c2"], Duration::from_secs(5))
        .await;
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        *seen.entry(udp_ask(udp_port).await).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both serve UDP at first: {seen:?}");
    // The TCP plane ejects c2; new UDP flows avoid it.
    eventually(
        Duration::from_secs(5),
        "c2 ejected by the TCP plane",
        || async {
            // The proxy connects upstream after accepting: read its greeting-less close to be sure
            // the attempt was made.
            let _ = greeting_or_close(tcp_port).await;
            let c2 = d
                .get("/v1/services/default/cache/instances/c2")
                .await
                .json();
            (c2["served_state"] == "ejected").then_some(())
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(udp_ask(udp_port).await, "u1");
    }
    // Panic: with 1 of 2 usable below a 60 % threshold, flows spread over both again.
    d.reload_with(&format!("{listeners}{outlier}panic_threshold = 60\n"))
        .await;
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        *seen.entry(udp_ask(udp_port).await).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "panic spreads UDP flows over both: {seen:?}");
    assert_eq!(
        d.metric(r#"svcd_lb_panic{service="cache.default"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        d.metric(r#"svcd_lb_panic_total{service="cache.default"}"#)
            .await,
        Some(1.0)
    );
}

fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    counts.get(name).copied().unwrap_or(0) as f64 / counts.values().sum::<usize>() as f64
}

/// Weights 1:3 split TCP connections and HTTP requests one to three (DNS answers: the next test).
#[tokio::test]
async fn weights_split_tcp_and_http_one_to_three() {
    let tcp_port = free_port();
    let d = Daemon::start(&tcp_listener(tcp_port, "light")).await;
    put(&d, "light", "a", echo_backend("la").await, r#","weight":1"#).await;
    put(&d, "light", "b", echo_backend("lb").await, r#","weight":3"#).await;
    let (h1, h2) = (Backend::start("ha").await, Backend::start("hb").await);
    for (id, b, w) in [("a", &h1, 1), ("b", &h2, 3)] {
        let body = format!(
            r#"{{"ip":"127.0.0.1","ports":{{"http":{}}},"weight":{w}}}"#,
            b.addr.port()
        );
        d.put_instance("web", id, &body).await;
    }
    d.wait_instances("default", "light", &["a", "b"], Duration::from_secs(5))
        .await;
    wait_routable(&d, "web", 2).await;
    // TCP: 400 connections.
    let mut tcp = BTreeMap::new();
    for _ in 0..400 {
        *tcp.entry(greeting(tcp_port).await).or_insert(0) += 1;
    }
    assert!((share(&tcp, "la") - 0.25).abs() <= 0.0125, "{tcp:?}");
    // HTTP: 400 requests on one keep-alive connection.
    let mut http = BTreeMap::new();
    let mut c = H1::connect(d.http).await;
    for _ in 0..400 {
        let (_, body) = c.get("web", "/").await;
        *http.entry(body).or_insert(0) += 1;
    }
    assert!((share(&http, "ha") - 0.25).abs() <= 0.0125, "{http:?}");
    let _ = (h1, h2);
}

#[tokio::test]
async fn dns_answers_follow_weights_when_max_answers_cuts_the_set() {
    let d = Daemon::start("").await;
    // One address per answer (a reload applies it: DNS settings are live).
    d.reload_with_dns("max_answers = 1\n", "").await;
    for (id, ip, w) in [("a", "10.1.0.1", 1), ("b", "10.1.0.2", 3)] {
        d.put_instance("web", id, &format!(r#"{{"ip":"{ip}","weight":{w}}}"#))
            .await;
    }
    d.wait_instances("default", "web", &["a", "b"], Duration::from_secs(5))
        .await;
    let mut counts = BTreeMap::new();
    for _ in 0..400 {
        let m = dns::udp(d.dns, "web.default.svc.cluster.local.", RecordType::A, None).await;
        let addrs = dns::addrs(&m);
        assert_eq!(addrs.len(), 1);
        *counts.entry(addrs[0].clone()).or_insert(0) += 1;
    }
    assert!(
        (share(&counts, "10.1.0.1") - 0.25).abs() <= 0.0125,
        "{counts:?}"
    );
}

/// Sample lines of an exposition (series), `process_*` left out (the process collector's).
fn series(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_string())
        .collect()
}

#[tokio::test]
async fn series_return_to_baseline_after_a_thousand_register_traffic_deregister_cycles() {
    let tcp_port = free_port();
    let d = Daemon::start(&tcp_listener(tcp_port, "cyc")).await;
    let backend = Backend::start("cb").await;
    let echo = echo_backend("ce").await;
    // Warm every family that exists regardless of services (unrouted responses, DNS).
    H1::connect(d.http).await.get("nothing-here", "/").await;
    let baseline = series(&d.get("/metrics").await.body);
    let started = Instant::now();
    for i in 0..1000 {
        // As `svcd exec` restarts would: a new instance id each time.
        let id = format!("run-{i}");
        let body = format!(
            r#"{{"ip":"127.0.0.1","ports":{{"http":{},"tcp":{}}}}}"#,
            backend.addr.port(),
            echo.port()
        );
        d.put_instance("cyc", &id, &body).await;
        // (A PUT does not yet wait for this daemon's snapshot: wait for it here.)
        visible(&d, &[id.as_str()]).await;
        let mut c = H1::connect(d.http).await;
        assert_eq!(c.get("cyc", "/").await.0, 200, "cycle {i}");
        assert_eq!(greeting(tcp_port).await, "ce", "cycle {i}");
        let r = d
            .request(
                "DELETE",
                &format!("/v1/services/default/cyc/instances/{id}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200);
        visible(&d, &[]).await;
    }
    eprintln!("1000 cycles in {:.1?}", started.elapsed());
    let after = eventually(
        Duration::from_secs(5),
        "series back to baseline",
        || async {
            let now = series(&d.get("/metrics").await.body);
            (now.len() == baseline.len()).then_some(now)
        },
    )
    .await;
    assert_eq!(after, baseline);
}

/// Waits (polling every millisecond) until `cyc`'s instances are exactly `ids`.
async fn visible(d: &Daemon, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.instance_ids("default", "cyc").await != ids {
        assert!(Instant::now() < deadline, "cyc never became {ids:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Connects through a TCP listener and waits until the proxy has made its upstream attempt: the
/// connection is closed (nothing reachable) or stays open with nothing to read for 200 ms.
async fn greeting_or_close(port: u16) {
    use tokio::io::AsyncReadExt;
    if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
    }
}

/// A UDP backend answering `<name>:<datagram>`, with a TCP listener on the same port number that
/// accepts and holds connections.
async fn udp_and_tcp_backend(name: &'static str) -> SocketAddr {
    loop {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let Ok(udp) = UdpSocket::bind(addr).await else {
            continue; // that number is taken for UDP: try another
        };
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = tcp.accept().await {
                held.push(s);
            }
        });
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let reply = [name.as_bytes(), b":", &buf[..n]].concat();
                let _ = udp.send_to(&reply, from).await;
            }
        });
        return addr;
    }
}
