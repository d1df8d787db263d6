//! Backends that misbehave on their keep-alive connections, against every HTTP path: the fast
//! path (HTTP/1.1 clients), the bridge (HTTP/2 clients of HTTP/1.1 instances) and hyper's path.
//! Whatever an instance writes that no request asked for must never reach a client as the
//! answer to its request, and a clean request must not fail or blame the instance for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::daemon::Daemon;
use crate::support::eventually;
use crate::support::proxy::{
    h2_connect, on_path, raw_exchange, register, wait_routable, FAST_PATH, H1, HYPER_PATH,
};

/// How a [`Scripted`] instance misbehaves.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Misbehaviour {
    /// After each response, a connection idle for 100 ms gets `408 Request Timeout` and is
    /// closed (nginx, Apache and Node do this at their keep-alive timeout).
    IdleNotice,
    /// The second request on a connection is answered with that 408 and a close: the notice
    /// raced the request.
    NoticeRacesRequest,
    /// Each response is followed by a second, unasked-for one, in a write of its own.
    StrayResponse,
    /// Answers every request once, properly.
    Plain,
}

/// An HTTP/1.1 instance written by hand, so it can misbehave. It answers `GET /<id>` with
/// `200` and the body `<id>`.
struct Scripted {
    addr: SocketAddr,
    /// Requests answered with their own response.
    answered: Arc<AtomicUsize>,
    /// Bytes written that no request asked for (408 notices, stray responses).
    unasked: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(how: Misbehaviour) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let unasked = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, u, o) = (answered.clone(), unasked.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (a, u, o) = (a.clone(), u.clone(), o.clone());
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve(s, how, a, u).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Scripted {
            addr,
            answered,
            unasked,
            open,
            _task: task,
        }
    }
}

const NOTICE: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 7\r\n\r\ntimeout";

async fn serve(
    mut s: TcpStream,
    how: Misbehaviour,
    answered: Arc<AtomicUsize>,
    unasked: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut served = 0;
    loop {
        // Wait for a whole head (bodiless requests only), or act on idleness.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let read = if served > 0 && how == Misbehaviour::IdleNotice {
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = s.write_all(NOTICE).await;
                        unasked.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            } else {
                s.read(&mut chunk).await
            };
            match read {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        if served == 1 && how == Misbehaviour::NoticeRacesRequest {
            let _ = s.write_all(NOTICE).await;
            unasked.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let id = path.trim_start_matches('/');
        let body = if head.starts_with("HEAD ") { "" } else { id };
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Id: {id}\r\n\r\n{body}",
            id.len()
        );
        if s.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        served += 1;
        if how == Misbehaviour::StrayResponse {
            let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Id: stray\r\n\r\nstray";
            if s.write_all(stray).await.is_err() {
                return;
            }
            unasked.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn daemon(path: &str, backend: SocketAddr) -> Daemon {
    // Retries off: a request that gets an answer meant for nothing is not hidden by a retry on
    // another instance (there is none), and no request may fail.
    let config = on_path("[proxy.l7]\nretries = 0\n", path);
    let d = Daemon::start(&config).await;
    register(&d, "web", "w1", backend, "http").await;
    wait_routable(&d, "web", 1).await;
    d
}

/// Waits until the instance has sent its notice on every connection and closed it.
async fn until_all_closed(b: &Scripted) {
    eventually(Duration::from_secs(5), "the instance's notices", || async {
        (b.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
}

/// Waits until every answer the instance gave has been followed by its stray response.
async fn until_strays_written(b: &Scripted) {
    eventually(Duration::from_secs(5), "the stray responses", || async {
        let answered = b.answered.load(Ordering::SeqCst);
        (b.unasked.load(Ordering::SeqCst) >= answered).then_some(())
    })
    .await;
}

/// One request with id `id` from an HTTP/1.1 client, or an HTTP/2 one (the bridge), each on its
/// own new client connection: the answer's status and body.
async fn ask(d: &Daemon, h2: bool, id: &str) -> (u16, String) {
    let uri = format!("http://web/{id}");
    if h2 {
        let (mut send, _conn) = h2_connect::<Empty<Bytes>>(d.http).await;
        let r = send
            .send_request(http::Request::get(uri).body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into())
    } else {
        let mut c = H1::connect(d.http).await;
        let (status, body) = c.get("web", &format!("/{id}")).await;
        (status.as_u16(), body)
    }
}

/// Every client kind on every path.
const CLIENTS: &[(&str, bool, &str)] = &[
    ("fast path", false, FAST_PATH),
    ("bridge", true, FAST_PATH),
    ("hyper", false, HYPER_PATH),
    ("hyper h2", true, HYPER_PATH),
];

/// An instance that writes `408` on an idle keep-alive connection and closes it: the next
/// request is answered by the instance on a new connection, never with the stale 408, and the
/// instance is not blamed.
#[tokio::test]
async fn an_idle_timeout_notice_never_answers_the_next_request() {
    for &(name, h2, path) in CLIENTS {
        let b = Scripted::start(Misbehaviour::IdleNotice).await;
        let d = daemon(path, b.addr).await;
        for round in 0..8 {
            // Every pooled connection has idled until the instance wrote its notice and closed.
            until_all_closed(&b).await;
            let id = format!("r{round}");
            assert_eq!(ask(&d, h2, &id).await, (200, id), "{name}, round {round}");
        }
        let failed = d
            .metric("svcd_http_upstream_requests_total{code=\"upstream_error\"}")
            .await;
        let refused = d.metric("svcd_http_responses_total{code=\"5xx\"}").await;
        assert_eq!(failed, Some(0.0), "{name}: the instance was blamed");
        assert_eq!(refused, Some(0.0), "{name}: a clean request failed");
        if path == FAST_PATH {
            let stale = d.metric("svcd_http_upstream_stale_total").await.unwrap();
            assert!(stale >= 1.0, "{name}: stale connections counted: {stale}");
        }
    }
}

/// The notice arrives just as the request does (written after the idle check): a request that
/// may be sent again goes again on a new connection, as Go's transport does.
#[tokio::test]
async fn a_notice_that_races_the_request_sends_it_again() {
    for &(name, h2, path) in &CLIENTS[..2] {
        let b = Scripted::start(Misbehaviour::NoticeRacesRequest).await;
        let d = daemon(path, b.addr).await;
        for round in 0..6 {
            let id = format!("q{round}");
            assert_eq!(ask(&d, h2, &id).await, (200, id), "{name}, round {round}");
        }
        assert!(
            b.unasked.load(Ordering::SeqCst) >= 1,
            "{name}: no race made"
        );
    }
}

/// An instance that writes a second response nobody asked for: it never reaches the next
/// client, who gets its own answer.
#[tokio::test]
async fn a_stray_response_never_reaches_another_client() {
    for &(name, h2, path) in CLIENTS {
        let b = Scripted::start(Misbehaviour::StrayResponse).await;
        let d = daemon(path, b.addr).await;
        for round in 0..6 {
            until_strays_written(&b).await;
            let id = format!("s{round}");
            assert_eq!(ask(&d, h2, &id).await, (200, id), "{name}, round {round}");
        }
    }
}

/// A chunk extension that is not RFC 9112's `;name[=value]` (here one holding a request line,
/// which an instance that ignores chunked framing would answer as a second request) is refused
/// with 400 on both HTTP/1.1 paths, and nothing of it reaches the instance.
#[tokio::test]
async fn a_malformed_chunk_extension_is_refused() {
    for path in [FAST_PATH, HYPER_PATH] {
        let b = Scripted::start(Misbehaviour::Plain).await;
        let d = daemon(path, b.addr).await;
        let answered = b.answered.load(Ordering::SeqCst);
        let smuggled = b"POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;GET /smuggled HTTP/1.1\r\nabc\r\n0\r\n\r\n";
        let reply = raw_exchange(d.http, smuggled).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{path:?}: {reply:?}");
        assert_eq!(
            b.answered.load(Ordering::SeqCst),
            answered,
            "{path:?}: reached the instance"
        );
    }
}
