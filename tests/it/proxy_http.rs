//! The HTTP proxy through the real daemon: real hyper backends, real clients over real sockets.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::backend::Backend;
use crate::support::daemon::{metric_sum, Daemon};
use crate::support::eventually;
use crate::support::proxy::{
    h2_connect, on_path, raw_exchange, register, register_state, wait_routable, web_service,
    FAST_PATH, H1, HYPER_PATH,
};

async fn metrics(d: &Daemon) -> String {
    d.get("/metrics").await.body
}

#[tokio::test]
async fn requests_not_connections_are_balanced_round_robin() {
    for path in [FAST_PATH, HYPER_PATH] {
        requests_not_connections_are_balanced_round_robin_on(path).await;
    }
}

async fn requests_not_connections_are_balanced_round_robin_on(path: &str) {
    let (d, backends) = web_service(&on_path("", path), &["b1", "b2", "b3"]).await;
    let before: Vec<usize> = backends.iter().map(Backend::count).collect();
    // One keep-alive connection, 30 requests: each backend gets exactly 10.
    let mut c = H1::connect(d.http).await;
    for _ in 0..30 {
        let (s, _) = c.get("web.default.svc.cluster.local:8080", "/").await;
        assert_eq!(s, StatusCode::OK);
    }
    let spread: Vec<usize> = backends
        .iter()
        .zip(&before)
        .map(|(b, n)| b.count() - n)
        .collect();
    assert_eq!(spread, [10, 10, 10], "requests per backend");
    let m = metrics(&d).await;
    // No retries: one attempt per response, every attempt timed.
    let attempts = metric_sum(
        &m,
        r#"svcd_http_upstream_requests_total{code="2xx",service="web.default"}"#,
    );
    assert!(attempts >= Some(30.0), "{m}");
    assert!(
        metric_sum(
            &m,
            r#"svcd_http_upstream_requests_total{endpoint="w1",code="2xx"}"#
        ) >= Some(10.0)
    );
    assert_eq!(
        metric_sum(
            &m,
            r#"svcd_http_responses_total{code="2xx",service="web.default"}"#
        ),
        attempts
    );
    assert_eq!(
        metric_sum(
            &m,
            r#"svcd_http_upstream_duration_seconds_count{outcome="response",service="web.default"}"#
        ),
        attempts
    );
    assert!(m.contains(r#"svcd_http_upstream_duration_seconds_bucket{outcome="response",service="web.default",le="300"}"#), "{m}");
    assert!(
        metric_sum(
            &m,
            r#"svcd_http_bytes_total{direction="out",service="web.default"}"#
        ) > Some(0.0)
    );
    assert!(m.contains("svcd_http_upstream_connections "));
}

#[tokio::test]
async fn headers_rewritten_and_errors_named() {
    for path in [FAST_PATH, HYPER_PATH] {
        headers_rewritten_and_errors_named_on(path).await;
    }
}

async fn headers_rewritten_and_errors_named_on(path: &str) {
    let (d, backends) = web_service(&on_path("", path), &["b1"]).await;
    let b = &backends[0];
    let mut c = H1::connect(d.http).await;
    let req = Request::get("/headers")
        .header("host", "web")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "192.0.2.7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (s, _, body) = c.request(req).await;
    assert_eq!(s, StatusCode::OK);
    for want in [
        "x-forwarded-for: 192.0.2.7, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: web",
        "via: 1.1 svcd",
        "host: web",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    for gone in ["x-hop", "keep-alive", "connection"] {
        assert!(
            !body.contains(&format!("{gone}:")),
            "{gone} forwarded:\n{body}"
        );
    }
    // No route, and a route with no healthy instance.
    let (s, text) = c.get("nothing.here", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{text}");
    let (s, text) = c.get("a.b.c.d", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{text}");
    register_state(&d, "sick", "s1", b.addr, "http", "unhealthy").await;
    let text = eventually(Duration::from_secs(5), "503", || async {
        let mut c = H1::connect(d.http).await;
        let (s, text) = c.get("sick", "/").await;
        (s == StatusCode::SERVICE_UNAVAILABLE).then_some(text)
    })
    .await;
    assert!(text.contains("sick.default"), "{text}");
    assert_eq!(
        b.count(),
        1 + 2,
        "only the probe and the /headers request reached it"
    );
}

#[tokio::test]
async fn h2_clients_reach_h1_and_h2_instances_with_trailers() {
    let d = Daemon::start("").await;
    let h1 = Backend::start("h1").await;
    let h2 = Backend::start("h2").await;
    register(&d, "old", "o1", h1.addr, "http").await;
    register(&d, "grpc", "g1", h2.addr, "grpc").await;
    wait_routable(&d, "old", 1).await;
    wait_routable(&d, "grpc", 1).await;

    let (mut send, _conn) = h2_connect(d.http).await;
    // h2 → h1: the instance sees HTTP/1.1 and the original authority as Host.
    let req = Request::get("http://old.default/headers")
        .body(http_body_util::Either::Left(Empty::<Bytes>::new()))
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.starts_with("HTTP/1.1"), "{body}");
    assert!(body.contains("host: old.default"), "{body}");
    assert!(body.contains("via: 2 svcd"), "{body}");

    // h2 → h2, gRPC style: a streamed request body echoed frame by frame, trailers at the end.
    let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
    let req = Request::post("http://grpc/stream")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(http_body_util::Either::Right(channel))
        .unwrap();
    let response = tokio::spawn(send.send_request(req));
    let mut chunks = Vec::new();
    for i in 0..3u8 {
        tx.send_data(Bytes::from(vec![b'a' + i; 1000]))
            .await
            .unwrap();
        chunks.push(vec![b'a' + i; 1000]);
    }
    drop(tx);
    let r = response.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let collected = r.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes().to_vec(), chunks.concat());
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let d = Daemon::start("").await;
    let b = Backend::start("ws").await;
    register(&d, "chat", "c1", b.addr, "http").await;
    wait_routable(&d, "chat", 1).await;
    let mut s = TcpStream::connect(d.http).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"second message"] {
        s.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("echo in 5s")
            .unwrap();
        assert_eq!(echo, msg);
    }
}

#[tokio::test]
async fn killed_backend_is_retried_and_hanging_one_times_out() {
    for path in [FAST_PATH, HYPER_PATH] {
        killed_backend_is_retried_and_hanging_one_times_out_on(path).await;
    }
}

async fn killed_backend_is_retried_and_hanging_one_times_out_on(path: &str) {
    let (d, backends) = web_service(&on_path("[proxy.outlier]\nconsecutive_failures = 0\n[[proxy.routes]]\nhost = \"slow.test\"\nservice = \"web\"\ntimeout = \"300ms\"\n", path),
        &["b1", "b2"],
    )
    .await;
    let b2 = &backends[1];
    let mut c = H1::connect(d.http).await;
    for _ in 0..4 {
        assert_eq!(c.get("web", "/").await.0, StatusCode::OK);
    }
    b2.kill();
    // Every GET still succeeds: the one sent to the dead instance is retried on the live one.
    for i in 0..20 {
        let (s, body) = c.get("web", "/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "b1"), "request {i}");
    }
    assert!(
        metrics(&d)
            .await
            .contains(r#"svcd_http_retries_total{service="web.default"}"#),
        "retries counted"
    );
    // A POST with a body is not replayed: a failure on the dead instance shows as 502.
    let mut failures = 0;
    for _ in 0..6 {
        let req = Request::post("/")
            .header("host", "web")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (s, _, text) = H1::connect(d.http).await.request(req).await;
        match s {
            StatusCode::OK => {}
            StatusCode::BAD_GATEWAY => {
                failures += 1;
                // The cause, said once ("upstream upstream error" before).
                assert!(
                    text == "web.default: upstream connect failed\n"
                        || text == "web.default: upstream error\n",
                    "{text:?}"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        failures > 0,
        "round robin sent some POSTs to the dead instance"
    );

    // 504: the route's timeout cuts a hanging instance short.
    let started = Instant::now();
    let (s, text) = c.get("slow.test", "/hang").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{text}");
    assert!(text.contains("web.default"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn large_upload_streams_with_flat_memory() {
    let d = Daemon::start("").await;
    let b = Backend::start("sink").await;
    register(&d, "sink", "s1", b.addr, "http").await;
    wait_routable(&d, "sink", 1).await;
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(2);
    let stream = TcpStream::connect(d.http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/upload")
        .header("host", "sink")
        .body(channel)
        .unwrap();
    let response = tokio::spawn(send.send_request(req));
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    for _ in 0..TOTAL / CHUNK as u64 {
        tx.send_data(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let r = response.await.unwrap().unwrap();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), TOTAL.to_string());
    let hwm_kb = d.status_kb("VmHWM");
    assert!(
        hwm_kb < 150 * 1024,
        "svcd peak RSS {hwm_kb} kB after a 1 GiB upload: the body was buffered"
    );
}

#[tokio::test]
async fn smuggling_corpus_is_refused_and_never_forwarded() {
    for path in [FAST_PATH, HYPER_PATH] {
        smuggling_corpus(path).await;
    }
}

async fn smuggling_corpus(config: &str) {
    let (d, backends) = web_service(config, &["b1"]).await;
    let b = &backends[0];
    let before = b.count();
    let corpus: &[&[u8]] = &[
        // CL.TE and TE.CL
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // duplicate and conflicting Content-Length
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        // malformed Content-Length
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5x\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: -1\r\n\r\n",
        // unknown or obfuscated Transfer-Encoding
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        // Transfer-Encoding in HTTP/1.0; obs-fold
        b"POST / HTTP/1.0\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nX-Fold: a\r\n b\r\n\r\n",
        // smuggled second request behind a clean one
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\nPOST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    let mut clean_served = 0;
    for (i, request) in corpus.iter().enumerate() {
        let mut reply = raw_exchange(d.http, request).await;
        // The last entry's clean GET may be answered before the smuggled request behind it
        // is refused (the fast path reads one request at a time; hyper's guard sees both in
        // one read and refuses the connection).
        if i == corpus.len() - 1 && reply.starts_with("HTTP/1.1 200") {
            let second = reply.find("b1HTTP/1.1").expect("a second answer") + 2;
            reply = reply[second..].to_string();
            clean_served += 1;
        }
        assert!(
            reply.starts_with("HTTP/1.1 400") || reply.starts_with("HTTP/1.0 400"),
            "corpus[{i}] answered {reply:?} ({config:?})"
        );
        assert!(
            !reply.contains("b1"),
            "corpus[{i}] reached the backend: {reply:?} ({config:?})"
        );
    }
    assert_eq!(
        b.count(),
        before + clean_served,
        "nothing of the corpus but the clean GET reached the backend ({config:?})"
    );
}

#[tokio::test]
async fn slow_headers_and_oversized_heads_are_cut_off() {
    for path in [FAST_PATH, HYPER_PATH] {
        slow_headers_and_oversized_heads_are_cut_off_on(path).await;
    }
}

async fn slow_headers_and_oversized_heads_are_cut_off_on(path: &str) {
    let (d, _backends) = web_service(&on_path("[proxy.l7]\nheader_read_timeout = \"500ms\"\nmax_header_bytes = 8192\nmax_headers = 10\nidle_timeout = \"1s\"\n", path),
        &["b1"],
    )
    .await;
    // Slowloris: a head that never ends is closed at the timeout.
    let mut s = TcpStream::connect(d.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: 1")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "connection still open after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    // A head over max_header_bytes gets 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let reply = raw_exchange(d.http, big.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    // More headers than max_headers (here 10) gets 431 too.
    let many: String = (0..20).map(|i| format!("X-H{i}: v\r\n")).collect();
    let reply = raw_exchange(
        d.http,
        format!("GET / HTTP/1.1\r\nHost: web\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    // An idle HTTP/1.1 keep-alive connection waits for its next head under the header read
    // timeout (as HAProxy's http-keep-alive defaults to http-request): closed at 500 ms.
    let mut c = TcpStream::connect(d.http).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("idle HTTP/1.1 connection closed")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
    // An idle HTTP/2 connection is closed after idle_timeout (1 s).
    let (mut send, conn) = h2_connect(d.http).await;
    let req = Request::get("http://web/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        send.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle h2 connection closed")
        .unwrap()
        .ok();
    let idle = started.elapsed();
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
}

#[tokio::test]
async fn sigterm_lets_an_open_request_finish_then_exits_cleanly() {
    let (mut d, backends) = web_service("[shutdown]\ndrain_timeout = \"5s\"\n", &["b1"]).await;
    let addr = d.http;
    let asked = backends[0].count();
    let slow = tokio::spawn(async move { H1::connect(addr).await.get("web", "/slow").await });
    crate::support::eventually(Duration::from_secs(5), "the slow request at b1", || async {
        (backends[0].count() > asked).then_some(())
    })
    .await;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        slow.await.unwrap(),
        (StatusCode::OK, "b1".to_string()),
        "the request in flight completed during the drain"
    );
    let status = tokio::task::spawn_blocking(move || d.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A request head of `len` bytes (request line, fields, the empty line) of HTTP version `v`.
fn head_of(len: usize, v: &str) -> Vec<u8> {
    let start = format!("GET / HTTP/{v}\r\nHost: web\r\nConnection: close\r\nX-Pad: ");
    let pad = len - start.len() - 4;
    format!("{start}{}\r\n\r\n", "p".repeat(pad)).into_bytes()
}

/// `max_header_bytes` holds to the byte on both HTTP/1.1 paths and for HTTP/1.0 (which the fast
/// path hands to hyper): a head of exactly the limit is forwarded, one byte more gets 431; so
/// does a head of 100 KB under the 64 KiB default (the fast path once let it through).
#[tokio::test]
async fn the_header_limit_holds_to_the_byte_on_every_path() {
    for path in [FAST_PATH, HYPER_PATH] {
        let config = on_path("[proxy.l7]\nmax_header_bytes = 8192\n", path);
        let (d, _backends) = web_service(&config, &["b1"]).await;
        for v in ["1.1", "1.0"] {
            let at = raw_exchange(d.http, &head_of(8192, v)).await;
            assert!(
                at.starts_with(&format!("HTTP/{v} 200")) || at.starts_with("HTTP/1.1 200"),
                "{path:?} {v} at the limit: {at:?}"
            );
            let over = raw_exchange(d.http, &head_of(8193, v)).await;
            assert!(
                over.starts_with("HTTP/1.1 431"),
                "{path:?} {v} one byte over: {over:?}"
            );
        }
        let (d, _backends) = web_service(path, &["b1"]).await;
        let big = raw_exchange(d.http, &head_of(100 * 1024, "1.1")).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{path:?} 100 KB: {big:?}");
    }
}
