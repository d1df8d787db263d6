//! HTTP conformance through the real proxy with raw bytes, where a library client would tidy the
//! input: one Host, absolute-form, Host syntax, upgrade-then-smuggle, stalled bodies on HTTP/1.1
//! and HTTP/2, trailers for an HTTP/1.1 client that asks for them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::{
    h2_connect, on_path, raw_exchange, register, wait_routable, web_service, FAST_PATH, HYPER_PATH,
};

/// Writes `bytes` to the daemon's HTTP proxy and reads until it closes (or 5 s).
async fn exchange(d: &Daemon, bytes: &[u8]) -> String {
    raw_exchange(d.http, bytes).await
}

#[tokio::test]
async fn one_host_the_targets_authority_and_host_syntax() {
    for path in [FAST_PATH, HYPER_PATH] {
        one_host_the_targets_authority_and_host_syntax_on(path).await;
    }
}

async fn one_host_the_targets_authority_and_host_syntax_on(path: &str) {
    let (d, backends) = web_service(&on_path("", path), &["b1"]).await;
    let before = backends[0].count();
    // Two Host headers: 400 and closed, never forwarded.
    let r = exchange(&d, b"GET / HTTP/1.1\r\nHost: web\r\nHost: evil\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("more than one Host"), "{r}");
    // Invalid Host syntax: 400, not 404.
    for host in ["we b", "user@web", "web:99999"] {
        let r = exchange(
            &d,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{host}: {r}");
    }
    assert_eq!(
        backends[0].count(),
        before,
        "none of them reached the backend"
    );
    // Absolute-form: routed on, and sent with, the target's authority; Host is replaced.
    let r = exchange(
        &d,
        b"GET http://web/headers HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("host: web\n") || r.contains("host: web\r"),
        "{r}"
    );
    assert!(!r.contains("host: other"), "{r}");
}

#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    let (d, backends) = web_service("", &["b1"]).await;
    let (mut send, _conn) = h2_connect(d.http).await;
    let before = backends[0].count();
    let req = Request::get("http://web/")
        .header("host", "evil")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(backends[0].count(), before);
    let req = Request::get("http://web/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.ready().await.unwrap();
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_refused_upgrade_does_not_stop_the_smuggling_guard() {
    for path in [FAST_PATH, HYPER_PATH] {
        a_refused_upgrade_does_not_stop_the_smuggling_guard_on(path).await;
    }
}

async fn a_refused_upgrade_does_not_stop_the_smuggling_guard_on(path: &str) {
    let (d, backends) = web_service(&on_path("", path), &["b1"]).await;
    let before = backends[0].count();
    // /headers answers 200, not 101: the connection stays HTTP...
    let mut s = TcpStream::connect(d.http).await.unwrap();
    s.write_all(
        b"GET /headers HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let mut first = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // ...so the next request on it is judged too: Content-Length with Transfer-Encoding.
    s.write_all(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 400"),
        "the second request is refused: {rest}"
    );
    assert!(
        rest.to_ascii_lowercase().contains("connection: close"),
        "{rest}"
    );
    assert_eq!(
        backends[0].count(),
        before + 1,
        "only the first reached the backend"
    );
}

#[tokio::test]
async fn a_stalled_response_body_ends_after_the_idle_timeout_h1_and_h2() {
    let (d, _b) = web_service("[proxy.l7]\nidle_timeout = \"1s\"\n", &["b1"]).await;
    // HTTP/1.1: the head and a chunk arrive, then the connection closes after ~1 s.
    let started = Instant::now();
    let r = exchange(&d, b"GET /stall HTTP/1.1\r\nHost: web\r\n\r\n").await;
    let took = started.elapsed();
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("first"), "{r}");
    assert!(!r.ends_with("0\r\n\r\n"), "not a complete body: {r}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // HTTP/2: the stream is reset after ~1 s; the connection goes on.
    let (mut send, _conn) = h2_connect(d.http).await;
    let started = Instant::now();
    let req = Request::get("http://web/stall")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), r.into_body().collect()).await;
    assert!(matches!(body, Ok(Err(_))), "the stream ends with an error");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    send.ready().await.unwrap();
    let req = Request::get("http://web/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_http11_client_asking_for_trailers_gets_them() {
    for path in [FAST_PATH, HYPER_PATH] {
        an_http11_client_asking_for_trailers_gets_them_on(path).await;
    }
}

async fn an_http11_client_asking_for_trailers_gets_them_on(path: &str) {
    // A gRPC-style instance (h2c upstream): its trailers reach an HTTP/1.1 client that sent
    // `TE: trailers`.
    let d = Daemon::start(&on_path("", path)).await;
    let b = Backend::start("g1").await;
    register(&d, "web", "g1", b.addr, "grpc").await;
    wait_routable(&d, "web", 1).await;
    let r = exchange(
        &d,
        b"POST /stream HTTP/1.1\r\nHost: web\r\nTE: trailers\r\nConnection: TE, close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let lower = r.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{r}");
    let last_chunk = lower.rfind("\r\n0\r\n").expect("last chunk");
    assert!(
        lower[last_chunk..].contains("grpc-status: 0"),
        "trailers after the last chunk: {r}"
    );
    // Without TE: trailers, none are sent (hyper's rule for HTTP/1.1).
    let r = exchange(
        &d,
        b"POST /stream HTTP/1.1\r\nHost: web\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(!r.to_ascii_lowercase().contains("grpc-status"), "{r}");
}
