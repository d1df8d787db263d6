//! Failures are blamed only on backends that failed. A client that aborts an upload, cancels
//! HTTP/2 streams, uploads slower than the request timeout or sends a malformed chunked body
//! ejects nothing — from the proxy or from this node's DNS — while a backend that really fails
//! still is ejected. Real daemon, real backend, raw sockets and a real h2 client.

use std::time::Duration;

use bytes::Bytes;
use hickory_proto::rr::RecordType;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::daemon::{metric_sum, Daemon};
use crate::support::dns;
use crate::support::proxy::{h2_connect, on_path, web_service, FAST_PATH, HYPER_PATH};

/// Ejection after two failures in a row, a 1 s request timeout: any client fault counted as a
/// backend failure would eject the only instance at once.
const STRICT: &str = "[proxy.outlier]\nconsecutive_failures = 2\nmax_ejection_percent = 100\n\
                      [proxy.l7]\nrequest_timeout = \"1s\"\nretries = 0\n";

/// Sends `bytes` on a new connection to the proxy and returns what comes back until close or
/// 3 s.
async fn raw(d: &Daemon, bytes: &[u8], close_early: bool) -> String {
    let mut s = TcpStream::connect(d.http).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if close_early {
        return String::new(); // dropped: the client aborts
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the series `selector` reaches `at_least` (or, for 0, falls to it): the positive
/// signal that the requests a test sent have ended and been judged, before it checks that
/// nothing was blamed.
async fn judged(d: &Daemon, selector: &str, at_least: f64) {
    crate::support::eventually(Duration::from_secs(5), selector, || async {
        let v = d.metric(selector).await?;
        let done = if at_least == 0.0 {
            v == 0.0
        } else {
            v >= at_least
        };
        done.then_some(())
    })
    .await;
}

/// Nothing was ejected or counted against the instance, and DNS and the API still serve it.
async fn nothing_blamed(d: &Daemon) {
    let m = d.get("/metrics").await.body;
    assert_eq!(
        metric_sum(&m, "svcd_outlier_ejections_total"),
        Some(0.0),
        "no ejection: {m}"
    );
    let w1 = d.get("/v1/services/default/web/instances/w1").await.json();
    assert_eq!(w1["served_state"], "healthy", "{w1}");
    let answer = dns::udp(d.dns, "web.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(dns::addrs(&answer), ["127.0.0.1"]);
}

#[tokio::test]
async fn aborted_uploads_and_malformed_chunked_bodies_eject_nothing() {
    for path in [FAST_PATH, HYPER_PATH] {
        aborted_uploads_and_malformed_chunked_bodies_eject_nothing_on(path).await;
    }
}

async fn aborted_uploads_and_malformed_chunked_bodies_eject_nothing_on(path: &str) {
    let (d, _b) = web_service(&on_path(STRICT, path), &["b1"]).await;
    for _ in 0..5 {
        // Promises 100 kB, sends 1 kB, hangs up.
        let mut req =
            b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'x', 1000));
        raw(&d, &req, true).await;
    }
    for _ in 0..5 {
        // A chunk size that is not hex: the client's error, answered 400, connection closed.
        let reply = raw(
            &d,
            b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
            false,
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    }
    // Judged first: every aborted upload ended on the proxy's side as the client's fault.
    judged(
        &d,
        r#"svcd_http_upstream_requests_total{code="client_error",endpoint="w1"}"#,
        5.0,
    )
    .await;
    nothing_blamed(&d).await;
    let m = d.get("/metrics").await.body;
    // The malformed bodies were answered 400 (and aborted uploads, to a client that had gone,
    // may be too: a response is counted when it is handed to the connection).
    assert!(
        metric_sum(&m, r#"svcd_http_responses_total{code="4xx"}"#) >= Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, r#"svcd_http_responses_total{code="5xx"}"#),
        Some(0.0),
        "no client fault is answered as a gateway error"
    );
}

#[tokio::test]
async fn uploads_slower_than_the_request_timeout_complete_and_eject_nothing() {
    let (d, _b) = web_service(STRICT, &["b1"]).await;
    let uploads = (0..3).map(|_| async {
        let mut s = TcpStream::connect(d.http).await.unwrap();
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        // 8 bytes over 2.4 s: more than twice the 1 s request timeout.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"y").await.unwrap();
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    for reply in futures_util::future::join_all(uploads).await {
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.ends_with("\r\n\r\n8"),
            "the backend got all 8 bytes: {reply}"
        );
    }
    nothing_blamed(&d).await;
}

#[tokio::test]
async fn cancelled_http2_streams_eject_nothing() {
    let (d, _b) = web_service(STRICT, &["b1"]).await;
    let (mut send, _conn) = h2_connect::<StreamBody<_>>(d.http).await;
    for i in 0..6 {
        // A streaming upload (as a gRPC client stream), cancelled by the client: RST_STREAM.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = StreamBody::new(tokio_stream_from(rx));
        let path = if i % 2 == 0 { "/upload" } else { "/hang" };
        let req = Request::post(path)
            .header("host", "web")
            .body(body)
            .unwrap();
        send.ready().await.unwrap();
        let pending = send.send_request(req);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), pending).await; // then dropped
        drop(tx);
    }
    // Judged first: all six streams were cancelled and their requests have ended.
    judged(&d, "svcd_http_streams_cancelled_total", 6.0).await;
    judged(&d, "svcd_http_requests_active", 0.0).await;
    nothing_blamed(&d).await;
    // The connection is fine for the next request.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    drop(tx);
    send.ready().await.unwrap();
    let r = send
        .send_request(
            Request::get("/")
                .header("host", "web")
                .body(StreamBody::new(tokio_stream_from(rx)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "b1");
}

#[tokio::test]
async fn a_backend_that_really_fails_is_still_ejected() {
    for path in [FAST_PATH, HYPER_PATH] {
        a_backend_that_really_fails_is_still_ejected_on(path).await;
    }
}

async fn a_backend_that_really_fails_is_still_ejected_on(path: &str) {
    let (d, backends) = web_service(&on_path(STRICT, path), &["b1", "b2"]).await;
    // b2's process dies: connects are refused, a backend fault.
    backends[1].kill();
    for _ in 0..6 {
        let _ = raw(
            &d,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    }
    let w2 = d.get("/v1/services/default/web/instances/w2").await.json();
    assert_eq!(w2["served_state"], "ejected", "{w2}");
    assert_eq!(w2["ejection"]["holders"][0], "http");
    let w1 = d.get("/v1/services/default/web/instances/w1").await.json();
    assert_eq!(w1["served_state"], "healthy", "{w1}");
}

/// An mpsc receiver as a `Stream` (no tokio-stream dependency for one test).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
