//! HTTP/2 clients in front of HTTP/1.1 instances: the direct exchange (`h1::bridge`, on with
//! the fast path) against hyper-util's client (the hyper path). A scripted backend sends exact
//! bytes — lengths, chunks with extensions and trailers, bodies that end with the connection,
//! interim heads, hop-by-hop fields, cut bodies — and the same HTTP/2 requests through a daemon
//! on each path must get the same status, fields, body and trailers, and put the same heads on
//! the wire to the instance.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::daemon::{metric_sum, Daemon};
use crate::support::proxy::{h2_connect, on_path, register, wait_routable, FAST_PATH, HYPER_PATH};

/// A backend that answers each request head with the bytes its path names, and records the
/// heads it received.
struct ScriptedBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<usize>>,
}

impl ScriptedBackend {
    async fn start() -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (h, c) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                tokio::spawn(serve(s, h.clone()));
            }
        });
        ScriptedBackend {
            addr,
            heads,
            connections,
        }
    }

    fn last_head(&self) -> String {
        self.heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

/// What the backend writes for a path: pieces written apart (so the proxy reads them in several
/// reads), and whether it then closes the connection.
fn script(path: &str) -> (Vec<&'static [u8]>, bool) {
    match path {
        "/length" => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello"], false),
        "/chunked" => (
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5;ext=1\r\nhel",
                b"lo\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n",
                b"x-more: 2\r\n\r\n",
            ],
            false,
        ),
        "/chunked-plain" => (vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"], false),
        "/until-close" => (vec![b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ", b"the end"], true),
        "/interim" => (vec![b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], false),
        "/no-content" => (vec![b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n"], false),
        "/hop" => (vec![b"HTTP/1.1 201 Created\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"], false),
        "/status-500" => (vec![b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail"], false),
        "/close-after" => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], true),
        "/cut" => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"], true),
        "/bad-chunk" => (vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"], true),
        "/big" => (vec![BIG_HEAD, &[b'x'; 50_000], &[b'y'; 50_000]], false),
        _ => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], false),
    }
}

const BIG_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";

async fn serve(mut s: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split(' ');
        let head_request = words.next() == Some("HEAD");
        let path = words.next().unwrap_or("/").to_string();
        heads.lock().unwrap().push(head);
        let (pieces, close) = script(&path);
        for (i, piece) in pieces.iter().enumerate() {
            let piece = if head_request && i == 0 {
                // HEAD: the head alone.
                let n = piece.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                &piece[..n]
            } else if head_request {
                break;
            } else {
                piece
            };
            if s.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if close {
            return;
        }
    }
}

/// One proxy worker: its thread's pool holds every kept connection, so reuse can be counted.
const ONE_WORKER: &str = "[proxy]\nworkers = 1\n[proxy.l7]\nretries = 0\n";

async fn daemon(path: &str, backend: SocketAddr) -> Daemon {
    let d = Daemon::start(&on_path(ONE_WORKER, path)).await;
    register(&d, "old", "o1", backend, "http").await;
    wait_routable(&d, "old", 1).await;
    d
}

/// What an HTTP/2 client got: status, fields (sorted, `date` left out), body and trailers; or
/// the error the stream ended with.
async fn h2_get(proxy: SocketAddr, method: Method, path: &str) -> String {
    let (mut send, _conn) = h2_connect::<Empty<Bytes>>(proxy).await;
    let req = Request::builder()
        .method(method)
        .uri(format!("http://old.default{path}"))
        .body(Empty::new())
        .unwrap();
    let r = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => return format!("request error: {}", e.is_canceled()),
    };
    let mut fields: Vec<String> = r
        .headers()
        .iter()
        .filter(|(n, _)| *n != "date")
        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
        .collect();
    fields.sort();
    let status = r.status();
    match r.into_body().collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            let body = if body.len() > 64 {
                format!(
                    "{} bytes, {} x",
                    body.len(),
                    body.iter().filter(|&&b| b == b'x').count()
                )
            } else {
                String::from_utf8_lossy(&body).into_owned()
            };
            format!("{status} {fields:?} body {body:?} trailers {trailers:?}")
        }
        Err(_) => format!("{status} {fields:?} body error"),
    }
}

/// A head as the instance received it, lines sorted (the two clients order fields differently).
fn normalised(head: &str) -> Vec<String> {
    let mut lines: Vec<String> = head.split("\r\n").map(str::to_lowercase).collect();
    lines.sort();
    lines
}

const CASES: &[(&str, &str)] = &[
    ("GET", "/length"),
    ("HEAD", "/length"),
    ("GET", "/chunked"),
    ("GET", "/chunked-plain"),
    ("GET", "/until-close"),
    ("GET", "/interim"),
    ("GET", "/no-content"),
    ("GET", "/hop"),
    ("GET", "/status-500"),
    ("GET", "/big"),
    ("POST", "/length"),
    ("DELETE", "/length?x=1"),
    ("GET", "/cut"),
    ("GET", "/bad-chunk"),
];

#[tokio::test]
async fn http2_clients_get_the_same_answers_from_both_http1_clients() {
    let backend = ScriptedBackend::start().await;
    let direct = daemon(FAST_PATH, backend.addr).await;
    let hyper = daemon(HYPER_PATH, backend.addr).await;
    for (method, path) in CASES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let a = h2_get(direct.http, method.clone(), path).await;
        let head_a = backend.last_head();
        let b = h2_get(hyper.http, method.clone(), path).await;
        let head_b = backend.last_head();
        assert_eq!(
            a, b,
            "{method} {path}: the answers differ (direct, then hyper-util)"
        );
        assert_eq!(
            normalised(&head_a),
            normalised(&head_b),
            "{method} {path}: the instance got different heads"
        );
    }
    // What the answers are, not only that they agree.
    let got = h2_get(direct.http, Method::GET, "/chunked").await;
    assert!(got.contains(r#"body "hello world""#), "{got}");
    assert!(
        got.contains(r#""x-sum": "11""#) && got.contains(r#""x-more": "2""#),
        "{got}"
    );
    assert!(!got.contains("transfer-encoding"), "{got}");
    let got = h2_get(direct.http, Method::GET, "/until-close").await;
    assert!(got.contains(r#"body "until the end""#), "{got}");
    let got = h2_get(direct.http, Method::GET, "/hop").await;
    assert!(
        got.starts_with("201 ") && got.contains("x-kept") && !got.contains("x-hop"),
        "{got}"
    );
    let got = h2_get(direct.http, Method::GET, "/big").await;
    assert!(got.contains("100000 bytes, 50000 x"), "{got}");
    assert!(h2_get(direct.http, Method::GET, "/cut")
        .await
        .ends_with("body error"));
    let _ = h2_get(direct.http, Method::POST, "/length").await;
    assert!(
        backend.last_head().contains("content-length: 0\r\n"),
        "{}",
        backend.last_head()
    );
    assert!(backend.last_head().starts_with("POST /length HTTP/1.1\r\n"));
}

/// An instance that closes an idle keep-alive connection (without saying so): the next request
/// goes out again on a new connection, and nothing is counted against the instance.
#[tokio::test]
async fn a_pooled_connection_the_instance_closed_is_replaced() {
    let backend = ScriptedBackend::start().await;
    let d = daemon(FAST_PATH, backend.addr).await;
    // (Connections pooled before, by the routing checks, are used up by the first request.)
    let mut before = backend.connections();
    for i in 0..4 {
        if i == 1 {
            before = backend.connections();
        }
        let got = h2_get(d.http, Method::GET, "/close-after").await;
        assert!(
            got.starts_with("200 ") && got.contains(r#"body "ok""#),
            "{got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // the instance closes meanwhile
    }
    assert_eq!(
        backend.connections() - before,
        3,
        "one new connection per request"
    );
    // Kept connections are reused: three requests on /length after the first open one.
    let before = backend.connections();
    for _ in 0..3 {
        assert!(h2_get(d.http, Method::GET, "/length")
            .await
            .starts_with("200 "));
    }
    assert!(
        backend.connections() - before <= 1,
        "pooled connections reused"
    );
    let m = d.get("/metrics").await.body;
    for bad in ["5xx", "upstream_error", "connect_error"] {
        assert_eq!(
            metric_sum(
                &m,
                &format!(
                    r#"svcd_http_upstream_requests_total{{code="{bad}",service="old.default"}}"#
                )
            )
            .unwrap_or(0.0),
            0.0,
            "{m}"
        );
    }
    assert_eq!(
        metric_sum(&m, "svcd_outlier_ejections_total"),
        Some(0.0),
        "{m}"
    );
}

/// A body the instance cuts short or garbles is its failure (the client's stream ends with an
/// error): with one failure ejecting, it is ejected; a whole body ejects nothing.
#[tokio::test]
async fn cut_and_malformed_bodies_count_against_the_instance() {
    let backend = ScriptedBackend::start().await;
    let config = format!(
        "{ONE_WORKER}[proxy.outlier]\nconsecutive_failures = 1\nmax_ejection_percent = 100\n"
    );
    for path in ["/cut", "/bad-chunk"] {
        let d = Daemon::start(&config).await;
        register(&d, "old", "o1", backend.addr, "http").await;
        wait_routable(&d, "old", 1).await;
        let ejections = || async {
            let m = d.get("/metrics").await.body;
            metric_sum(&m, "svcd_outlier_ejections_total")
        };
        assert!(h2_get(d.http, Method::GET, "/chunked")
            .await
            .starts_with("200 "));
        assert_eq!(
            ejections().await,
            Some(0.0),
            "{path}: a whole body is no failure"
        );
        let got = h2_get(d.http, Method::GET, path).await;
        // (The stream may be reset before the client has taken the head: then the request fails.)
        assert!(
            got.ends_with("body error") || got.starts_with("request error"),
            "{path}: {got}"
        );
        assert_eq!(
            ejections().await,
            Some(1.0),
            "{path}: blamed on the instance"
        );
    }
}
