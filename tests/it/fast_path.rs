//! The HTTP/1.1 fast path against hyper: the same raw requests through two daemons, one on each
//! path, in front of the same backend. What the client receives, what the backend receives
//! (its `/headers` echo) and the metrics must agree.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::eventually;
use crate::support::proxy::{
    h2_connect, on_path, raw_exchange, register, wait_routable, FAST_PATH, H1, HYPER_PATH,
};

/// Requests as clients send them; each exchange ends with `Connection: close` so the reply can
/// be read to its end.
const CASES: &[&[u8]] = &[
    // Hop-by-hop fields, forwarding fields the client already set, keep-alive then close.
    b"GET /headers HTTP/1.1\r\nHost: web\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nTE: trailers, gzip\r\nKeep-Alive: timeout=5\r\nX-Forwarded-Proto: https\r\nVia: 1.0 edge\r\nX-Forwarded-Host: outside\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"GET /status/503 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"GET /status/404 HTTP/1.1\r\nHost: web.default\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n",
    b"GET /headers?q=1 HTTP/1.1\r\nHost: web.default.svc.cluster.local:8080\r\nconnection: CLOSE\r\n\r\n",
    // Pipelined, in one write.
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\nGET /headers HTTP/1.1\r\nHost: web\r\nUser-Agent: x\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    // For hyper on both paths: HTTP/1.0, asterisk-form, absolute-form, Expect.
    b"GET /headers HTTP/1.0\r\nHost: web\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"GET http://web/headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nhi",
    // Refused on both: no Host, two Hosts, a bad Host.
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: we b\r\nConnection: close\r\n\r\n",
];

/// A reply with what legitimately differs taken out: `date` values, and the order of lines
/// (hyper writes fields in its map's order, the fast path in the instance's).
fn normalised(reply: &str) -> Vec<String> {
    let mut lines: Vec<String> = reply
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

async fn daemon(config: &str, backend: SocketAddr) -> Daemon {
    let d = Daemon::start(config).await;
    register(&d, "web", "w1", backend, "http").await;
    wait_routable(&d, "web", 1).await;
    d
}

/// The HTTP series of a scrape, but for durations (they differ by nature).
fn http_counters(scrape: &str) -> Vec<String> {
    let mut lines: Vec<String> = scrape
        .lines()
        .filter(|l| {
            l.starts_with("svcd_http_responses_total")
                || l.starts_with("svcd_http_upstream_requests_total")
                || l.starts_with("svcd_http_bytes_total")
        })
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn fast_path_and_hyper_answer_alike() {
    let backend = Backend::start("b1").await;
    let fast = daemon(FAST_PATH, backend.addr).await;
    let hyper = daemon(HYPER_PATH, backend.addr).await;
    for (i, case) in CASES.iter().enumerate() {
        let before = backend.count();
        let a = raw_exchange(fast.http, case).await;
        let via_fast = backend.count() - before;
        let b = raw_exchange(hyper.http, case).await;
        let via_hyper = backend.count() - before - via_fast;
        assert!(!a.is_empty(), "case {i}: no answer on the fast path");
        assert_eq!(
            normalised(&a),
            normalised(&b),
            "case {i}: the paths differ\nfast path:\n{a}\nhyper:\n{b}"
        );
        assert_eq!(via_fast, via_hyper, "case {i}: backend requests differ");
    }
    assert_eq!(
        http_counters(&fast.get("/metrics").await.body),
        http_counters(&hyper.get("/metrics").await.body),
        "the paths count differently"
    );
}

/// A reload applies to the next request of a connection already open (routes here), on both
/// paths: the fast path loads the settings per request, as hyper's handler does.
#[tokio::test]
async fn a_reload_reaches_open_keep_alive_connections() {
    let backend = Backend::start("b1").await;
    for path in [HYPER_PATH, FAST_PATH] {
        let d = daemon(path, backend.addr).await;
        let mut c = H1::connect(d.http).await;
        assert_eq!(c.get("alias.test", "/").await.0, 404, "{path:?}");
        d.reload_with(&on_path(
            "[[proxy.routes]]\nhost = \"alias.test\"\nservice = \"web\"\n",
            path,
        ))
        .await;
        let (status, body) = c.get("alias.test", "/").await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "b1"), "{path:?}");
    }
}

/// Many keep-alive clients at once, their requests split across writes or pipelined two to a
/// write: every request is answered, none waits for a wake-up that never comes (the fast path
/// clears a socket's read readiness itself after a read that drained it).
#[tokio::test]
async fn concurrent_split_and_pipelined_requests_are_all_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("b1").await;
    let d = daemon(FAST_PATH, backend.addr).await;
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 50; // three requests a round
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let addr = d.http;
        clients.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut seen = 0;
            let mut buf = Vec::new();
            for round in 0..ROUNDS {
                s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
                tokio::task::yield_now().await;
                s.write_all(b"st: web\r\n\r\n").await.unwrap();
                s.write_all(
                    b"GET / HTTP/1.1\r\nHost: web\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n",
                )
                .await
                .unwrap();
                let want = 3 * (round + 1);
                while seen < want {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed after {seen} answers");
                    buf.extend_from_slice(&chunk[..n]);
                    seen = String::from_utf8_lossy(&buf).matches("\r\n\r\nb1").count();
                }
            }
            seen
        });
    }
    let all = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut total = 0;
        while let Some(n) = clients.join_next().await {
            total += n.unwrap();
        }
        total
    })
    .await
    .expect("every request answered within 30 s");
    assert_eq!(all, CLIENTS * ROUNDS * 3);
}

/// Deregisters instance `id` of `web`.
async fn deregister(d: &Daemon, id: &str) {
    let path = format!("/v1/services/default/web/instances/{id}");
    let gone = d.request("DELETE", &path, None).await;
    assert!(gone.status < 300, "{}", gone.body);
}

/// Waits up to `secs` seconds until `backend`'s open connections satisfy `ok`.
async fn until_open(backend: &Backend, secs: u64, what: &str, ok: impl Fn(usize) -> bool) {
    eventually(Duration::from_secs(secs), what, || async {
        ok(backend.open_connections()).then_some(())
    })
    .await;
}

/// The fast path's idle upstream connections (HTTP/1.1 clients, and HTTP/2 clients through the
/// bridge) go with their instance when it leaves the registry, not when they idle out; a reload
/// that lowers `pool_max_idle_per_host` to 0 closes the others.
#[tokio::test]
async fn idle_upstream_connections_go_with_their_instance_and_a_lowered_limit() {
    let (b1, b2) = (Backend::start("b1").await, Backend::start("b2").await);
    let d = daemon(FAST_PATH, b1.addr).await;
    register(&d, "web", "w2", b2.addr, "http").await;
    wait_routable(&d, "web", 2).await;
    let mut h1 = H1::connect(d.http).await;
    let (mut h2, _conn) = h2_connect::<Empty<Bytes>>(d.http).await;
    for _ in 0..4 {
        assert_eq!(h1.get("web", "/").await.0, 200);
        let req = http::Request::get("http://web/")
            .body(Empty::new())
            .unwrap();
        assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    }
    assert!(b1.open_connections() >= 1 && b2.open_connections() >= 1);
    let before = d.metric("svcd_http_upstream_connections").await.unwrap();

    deregister(&d, "w1").await;
    until_open(&b1, 3, "w1's idle connections closed", |n| n == 0).await;
    assert!(b2.open_connections() >= 1, "w2's idle connections stay");
    let after = d.metric("svcd_http_upstream_connections").await.unwrap();
    assert!(after < before && after >= 1.0, "{before} -> {after}");
    for _ in 0..4 {
        assert_eq!(
            h1.get("web", "/").await,
            (http::StatusCode::OK, "b2".into())
        );
    }

    d.reload_with("[proxy.l7]\npool_max_idle_per_host = 0\n")
        .await;
    // At once, not at the keeper's next round (5 s).
    until_open(&b2, 3, "w2's idle connections closed", |n| n == 0).await;
    assert_eq!(d.metric("svcd_http_upstream_connections").await, Some(0.0));
    // Without a pool every request opens and closes its own connection.
    assert_eq!(
        h1.get("web", "/").await,
        (http::StatusCode::OK, "b2".into())
    );
    until_open(&b2, 2, "no connection kept", |n| n == 0).await;
}

/// An instance that leaves while a request to it is in flight: the response is relayed whole,
/// then its connection is closed rather than pooled.
#[tokio::test]
async fn a_connection_whose_instance_left_mid_exchange_is_not_pooled() {
    let b1 = Backend::start("b1").await;
    let d = daemon(FAST_PATH, b1.addr).await;
    until_open(&b1, 2, "the probes' connections pooled", |n| n >= 1).await;
    let mut c = H1::connect(d.http).await;
    let asked = b1.count();
    let slow = tokio::spawn(async move { c.get("web", "/slow").await });
    eventually(
        Duration::from_secs(5),
        "the slow request at the instance",
        || async { (b1.count() > asked).then_some(()) },
    )
    .await;
    deregister(&d, "w1").await;
    // The idle ones go; the one in use stays until its answer is relayed.
    until_open(&b1, 2, "idle connections closed", |n| n <= 1).await;
    assert_eq!(slow.await.unwrap(), (http::StatusCode::OK, "b1".into()));
    until_open(&b1, 2, "the answered connection closed", |n| n == 0).await;
}

/// Raw bytes over TLS (ALPN `http/1.1`, SNI `web`, the client certificate `client` if given);
/// what comes back until the server closes.
async fn tls_exchange(
    port: u16,
    ca_pem: &str,
    client: Option<&crate::support::tls::Issued>,
    bytes: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = crate::support::tls::client_config(ca_pem, client, &[b"http/1.1"]);
    let mut tls = crate::support::tls::tls_connect(port, config, "web")
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The same comparison over HTTPS (HTTP/1.1 chosen in ALPN): the fast path serves TLS streams
/// too. With a client certificate, so what the instance gets includes svcd's
/// `x-forwarded-client-cert` (a client's own is dropped) and `x-forwarded-proto: https`; and
/// on a listener whose `allow` does not name the client, both answer 403.
#[tokio::test]
async fn fast_path_and_hyper_answer_alike_over_tls() {
    use crate::support::tls::{toml_path, TestCa};
    let ca = TestCa::new("fast path ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca
        .issue_sans("web", &["web"], None, false)
        .write(dir.path(), "web");
    let client = ca.issue_sans(
        "client",
        &[],
        Some("spiffe://td/ns/default/svc/client"),
        false,
    );
    let backend = Backend::start("b1").await;
    let client_ca = format!("client_ca = {}\n", toml_path(&ca_file));
    let https = |tls_extra: &str| {
        let port = crate::support::free_port();
        let config = format!(
            "[[proxy.http]]\nlisten = \"127.0.0.1:{port}\"\n[proxy.http.tls]\ncert = {}\n\
             key = {}\n{tls_extra}",
            toml_path(&cert),
            toml_path(&key),
        );
        (port, config)
    };
    let forged: &[u8] = b"GET /headers HTTP/1.1\r\nHost: web\r\nX-Forwarded-Client-Cert: By=forged\r\nConnection: close\r\n\r\n";
    // Without client certificates, then with them required.
    for with_cert in [None, Some(&client)] {
        let tls_extra = if with_cert.is_some() {
            client_ca.as_str()
        } else {
            ""
        };
        let (fast_port, fast_config) = https(tls_extra);
        let (hyper_port, hyper_config) = https(tls_extra);
        let fast = daemon(&fast_config, backend.addr).await;
        let hyper = daemon(&on_path(&hyper_config, HYPER_PATH), backend.addr).await;
        for (i, case) in CASES.iter().chain([&forged]).enumerate() {
            let before = backend.count();
            let a = tls_exchange(fast_port, &ca.pem(), with_cert, case).await;
            let via_fast = backend.count() - before;
            let b = tls_exchange(hyper_port, &ca.pem(), with_cert, case).await;
            let via_hyper = backend.count() - before - via_fast;
            let certified = with_cert.is_some();
            assert!(
                !a.is_empty(),
                "case {i} (client certificate: {certified}): no answer"
            );
            assert_eq!(
                normalised(&a),
                normalised(&b),
                "case {i} (client certificate: {certified}): the paths differ\nfast path:\n{a}\nhyper:\n{b}"
            );
            assert_eq!(via_fast, via_hyper, "case {i}: backend requests differ");
        }
        assert_eq!(
            http_counters(&fast.get("/metrics").await.body),
            http_counters(&hyper.get("/metrics").await.body),
            "the paths count differently"
        );
        // What the instance got over the fast path: https, and svcd's certificate line only.
        let echo = tls_exchange(fast_port, &ca.pem(), with_cert, forged).await;
        assert!(echo.contains("x-forwarded-proto: https"), "{echo}");
        assert!(!echo.contains("By=forged"), "{echo}");
        assert_eq!(
            echo.contains("URI=spiffe://td/ns/default/svc/client"),
            with_cert.is_some(),
            "{echo}"
        );
    }

    // A listener allowing another identity: 403 on both paths, the instance never asked.
    let allow_other = format!("{client_ca}allow = [\"spiffe://td/ns/default/svc/other\"]\n");
    let (fast_port, fast_config) = https(&allow_other);
    let (hyper_port, hyper_config) = https(&allow_other);
    let _fast = daemon(&fast_config, backend.addr).await;
    let _hyper = daemon(&on_path(&hyper_config, HYPER_PATH), backend.addr).await;
    let before = backend.count();
    let get = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
    let a = tls_exchange(fast_port, &ca.pem(), Some(&client), get).await;
    let b = tls_exchange(hyper_port, &ca.pem(), Some(&client), get).await;
    assert!(a.starts_with("HTTP/1.1 403"), "{a}");
    assert_eq!(normalised(&a), normalised(&b));
    assert_eq!(backend.count(), before);
}
