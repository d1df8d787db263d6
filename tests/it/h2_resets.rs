//! HTTP/2 clients that cancel their streams (RST_STREAM right behind HEADERS, "rapid reset"):
//! nothing they cancelled first is sent to an instance, the cancellations are counted, and a
//! connection that cancels most of its streams is sent GOAWAY.

use std::time::Duration;

use http::Request;
use tokio::net::TcpStream;

use crate::support::eventually;
use crate::support::proxy::web_service;

/// HEADERS and RST_STREAM in one write: the stream is reset before any handler could send it.
/// h2 closes the connection after `max_pending_accept_reset_streams` of those; the handlers that
/// did start saw the reset before sending (they yield once first).
#[tokio::test]
async fn a_rapid_reset_flood_sends_nothing_upstream_and_is_closed() {
    let (d, backends) = web_service("", &["b1"]).await;
    let before = backends[0].count();
    let connects_before = d.metric("svcd_http_upstream_connects_total").await.unwrap();
    let tcp = TcpStream::connect(d.http).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0u32;
    // Far more than the rule allows; the connection is closed long before the loop ends.
    for _ in 0..5_000 {
        let Ok(mut ready) = client.clone().ready().await else {
            break; // GOAWAY: no new streams
        };
        let req = Request::get("http://web/").body(()).unwrap();
        let Ok((_response, mut stream)) = ready.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        // Let the connection task write the pair out (and read a GOAWAY).
        tokio::task::yield_now().await;
    }
    eventually(Duration::from_secs(5), "the connection closed", || async {
        conn.is_finished().then_some(())
    })
    .await;
    assert!(
        sent < 5_000,
        "the connection outlived 5,000 cancelled streams"
    );
    let upstream = backends[0].count() - before;
    let connects = d.metric("svcd_http_upstream_connects_total").await.unwrap() - connects_before;
    eprintln!("{sent} streams sent and reset; {upstream} reached the instance over {connects} new connections");
    assert!(
        upstream <= 10 && connects <= 10.0,
        "{upstream} cancelled requests reached the instance over {connects} new connections"
    );
}

/// Streams reset after their request went upstream (the instance has it): each counts as
/// cancelled, and the connection is sent GOAWAY once 250 were (Envoy's premature-reset rule),
/// so one connection cannot make the proxy open connections and send requests without end.
#[tokio::test]
async fn a_connection_that_cancels_most_of_its_streams_gets_goaway() {
    let (d, backends) = web_service("", &["b1"]).await;
    let tcp = TcpStream::connect(d.http).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut cancelled = 0;
    for _ in 0..400 {
        let Ok(mut ready) = client.clone().ready().await else {
            break;
        };
        let before = backends[0].count();
        let req = Request::get("http://web/hang").body(()).unwrap();
        let Ok((_response, mut stream)) = ready.send_request(req, true) else {
            break;
        };
        eventually(Duration::from_secs(5), "the request upstream", || async {
            (backends[0].count() > before || conn.is_finished()).then_some(())
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
        cancelled += 1;
    }
    eventually(Duration::from_secs(5), "the connection closed", || async {
        conn.is_finished().then_some(())
    })
    .await;
    assert!(
        (250..=260).contains(&cancelled),
        "closed after {cancelled} cancelled streams"
    );
    assert_eq!(
        d.metric("svcd_http_reset_flood_closes_total").await,
        Some(1.0)
    );
    let counted = d.metric("svcd_http_streams_cancelled_total").await.unwrap();
    assert!((250.0..=260.0).contains(&counted), "{counted}");
}

/// A client that cancels now and then (a deadline, a hedged request) keeps its connection.
#[tokio::test]
async fn occasional_cancels_keep_the_connection() {
    let (d, backends) = web_service("", &["b1"]).await;
    let tcp = TcpStream::connect(d.http).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..1_200 {
        let mut ready = client.clone().ready().await.expect("connection open");
        let req = Request::get("http://web/").body(()).unwrap();
        let (response, mut stream) = ready.send_request(req, true).unwrap();
        if i % 3 == 2 {
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            let response = response.await.expect("answered");
            assert_eq!(response.status(), 200);
        }
    }
    assert!(!conn.is_finished(), "the connection was closed");
    assert_eq!(
        d.metric("svcd_http_reset_flood_closes_total").await,
        Some(0.0)
    );
    assert!(backends[0].count() >= 800);
}
