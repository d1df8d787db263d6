//! The HTTP/1.1 fast path: one task per client connection that parses heads once, routes, picks,
//! and relays the exchange itself over upstream connections from its worker's idle pool — no
//! header map, no pool lock, no channel, no second task per request.
//!
//! ```text
//! client bytes ─► head::parse_request (httparse; upstream head written in passing)
//!   usual ─► forward::route ─► pick ─► pool::checkout
//!            ─► head + body (framing::FramingGuard tracks the body) ─► instance
//!            ◄─ head::parse_response ◄─ body relayed by its framing ─► pool::put
//!   unusual (HTTP/1.0, h2c preface, upgrade, Expect, absolute-form, CONNECT, bad Host or
//!   framing, over the limits, an HTTP/2 instance) ─► Ended::Handoff: hyper serves the rest of
//!   the connection, starting with the bytes read so far
//! ```
//!
//! Answers match the hyper path's: the same routing, refusals, retries, header rewrite,
//! metrics, health judgements and shutdown behaviour (the differential tests compare them).

pub mod bridge;
mod buffers;
pub mod client;
mod exchange;
pub mod head;
pub mod pool;
mod read;

use std::net::IpAddr;
use std::sync::Arc;

use std::future::Future;
use std::task::Poll;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::{HttpContext, HttpSettings};
use client::ClientStream;
use head::{ParsedRequest, RequestInfo};

/// An IP address as text, on the stack.
struct IpText {
    buf: [u8; 46],
}

impl Default for IpText {
    fn default() -> Self {
        IpText { buf: [0; 46] }
    }
}

impl IpText {
    fn of(&mut self, ip: IpAddr) -> &str {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
        let _ = write!(cursor, "{ip}"); // 46 bytes hold any IPv6 text
        let n = cursor.position() as usize;
        std::str::from_utf8(&self.buf[..n]).unwrap_or("")
    }
}

/// How a fast-path connection ended.
pub enum Ended<S> {
    Closed,
    /// hyper takes the connection from here; the bytes are what was read of the next request.
    Handoff(S, BytesMut),
}

/// What an HTTPS client showed in its handshake: the fast path forwards and routes on it as
/// hyper's path does (`forward::ClientTls`).
pub type ClientTls = super::forward::ClientTls;

/// One client connection's state between and during exchanges.
struct ClientConn<'a, S> {
    ctx: &'a HttpContext,
    /// Set on HTTPS listeners: `X-Forwarded-Proto: https`, the client's certificate in
    /// `X-Forwarded-Client-Cert`, its identity for routes with `allow`.
    tls: Option<&'a ClientTls>,
    /// The settings of the current request: loaded again for each, so a reload (routes,
    /// timeouts, limits) applies to the next request of an open connection, as on hyper's path.
    settings: Arc<HttpSettings>,
    stream: S,
    /// The client's address, for `X-Forwarded-For` and the access log (formatted per request
    /// on the stack: an idle connection keeps no string).
    ip: IpAddr,
    /// Client bytes read and not yet used: the head being parsed, body bytes, pipelined
    /// requests. Released while the connection waits idle, so idle connections hold no buffer.
    buf: BytesMut,
    /// The upstream request head, kept for a retry.
    up_head: Vec<u8>,
    /// The response head for the client, and the first body bytes sent with it.
    down_head: Vec<u8>,
    /// Bytes from the instance.
    rbuf: BytesMut,
}

/// What the exchange leaves the connection to do next.
enum Next {
    KeepAlive,
    Close,
    Handoff,
}

enum HeadRead {
    Request(RequestInfo),
    Unusual,
    /// Past `max_header_bytes`: 431 and close, as hyper answers.
    TooLarge,
    Closed,
    NeedMore,
}

/// Serves `stream` until it closes or needs hyper. `stop`: the listener's shutdown (the current
/// response ends the connection); `last_request`: accepted out of the queue at shutdown, so one
/// request is served without keep-alive.
pub async fn serve<S: ClientStream>(
    ctx: &HttpContext,
    settings: Arc<HttpSettings>,
    stream: S,
    tls: Option<&ClientTls>,
    ip: IpAddr,
    stop: &CancellationToken,
    last_request: bool,
) -> Ended<S> {
    let mut conn = ClientConn {
        ctx,
        tls,
        settings,
        stream,
        ip,
        buf: BytesMut::new(),
        up_head: Vec::new(),
        down_head: Vec::new(),
        rbuf: BytesMut::new(),
    };
    let mut served = 0u64;
    loop {
        // The header read timeout bounds the wait for the next request and its head together
        // (as hyper's, and HAProxy's http-keep-alive defaulting to http-request).
        let deadline = tokio::time::Instant::now() + conn.settings.l7.header_read_timeout;
        if conn.buf.is_empty() {
            if served > 0 && stop.is_cancelled() {
                return conn.close();
            }
            conn.release_buffers();
            // Before the first request a shutdown does not interrupt the wait: the client's
            // request is served (with `Connection: close`), bounded by the drain. (`stop` is a
            // child of `hard_stop`, so one token covers both; fewer futures, a smaller task.)
            let ends = if served > 0 { stop } else { &ctx.hard_stop };
            if !readable_by(&conn.stream, deadline, Some(ends)).await {
                return conn.close();
            }
        }
        // Read the head, waiting (within the same deadline) while it is incomplete.
        let info = loop {
            match conn.try_head() {
                HeadRead::Request(info) => break info,
                HeadRead::Unusual => return conn.hand_off(),
                HeadRead::TooLarge => {
                    conn.too_large().await;
                    return conn.close();
                }
                HeadRead::Closed => return conn.close(),
                HeadRead::NeedMore => {
                    if !readable_by(&conn.stream, deadline, None).await {
                        return conn.close();
                    }
                }
            }
        };
        // The request is here: it runs under the settings of now (a reload may have come while
        // the connection waited).
        conn.settings = ctx.settings.load_full();
        let closing = info.close || last_request || stop.is_cancelled();
        // Boxed per request: an idle connection's task then holds only what waiting needs (its
        // memory per idle connection is what HAProxy is compared on), not an exchange's state.
        let next = tokio::select! {
            next = conn.exchange_boxed(info, closing) => next,
            _ = ctx.hard_stop.cancelled() => return conn.close(),
        };
        served += 1;
        match next {
            Next::KeepAlive => {}
            Next::Close => return conn.close(),
            Next::Handoff => return conn.hand_off(),
        }
    }
}

/// Waits until the client's socket is readable (true), or until `deadline` or `ends` (false).
/// This is the state every idle connection sits in, so it is kept small: `poll_read_ready`
/// keeps its waker in the socket's own slot, with no waiter stored in this future.
async fn readable_by<S: ClientStream>(
    stream: &S,
    deadline: tokio::time::Instant,
    ends: Option<&CancellationToken>,
) -> bool {
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    let ended = ends.map(CancellationToken::cancelled);
    tokio::pin!(ended);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = stream.poll_read_ready(cx) {
            return Poll::Ready(r.is_ok());
        }
        let timed_out = sleep.as_mut().poll(cx).is_ready();
        let cancelled = ended
            .as_mut()
            .as_pin_mut()
            .is_some_and(|f| f.poll(cx).is_ready());
        match timed_out || cancelled {
            true => Poll::Ready(false),
            false => Poll::Pending,
        }
    })
    .await
}

impl<'a, S: ClientStream> ClientConn<'a, S> {
    /// The exchange's future, made and boxed outside the caller's async frame (made inside it,
    /// the compiler keeps room for it there too, and every idle connection would carry it).
    fn exchange_boxed<'c>(
        &'c mut self,
        info: RequestInfo,
        closing: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Next> + Send + 'c>> {
        Box::pin(self.exchange(info, closing))
    }

    /// Reads what the client has sent and parses the head. `NeedMore`: nothing more to read yet
    /// (the caller waits; with nothing buffered, the buffer has been given back).
    fn try_head(&mut self) -> HeadRead {
        let l7 = &self.settings.l7;
        loop {
            if !self.buf.is_empty() {
                let mut text = IpText::default();
                let ip = text.of(self.ip);
                buffers::head_room(&mut self.up_head);
                // A head of up to `max_header_bytes` is taken, one byte more gets 431: the
                // fast path answers it itself rather than hand hyper an oversized start.
                let client = head::Downstream {
                    ip,
                    https: self.tls.is_some(),
                    xfcc: self.tls.and_then(|t| t.xfcc.as_ref()).map(|v| v.as_bytes()),
                };
                match head::parse_request(&self.buf, l7.max_headers, client, &mut self.up_head) {
                    ParsedRequest::Request(info) if info.len > l7.max_header_bytes => {
                        return HeadRead::TooLarge
                    }
                    ParsedRequest::Request(info) => return HeadRead::Request(info),
                    ParsedRequest::Unusual => return HeadRead::Unusual,
                    ParsedRequest::Partial if self.buf.len() > l7.max_header_bytes => {
                        return HeadRead::TooLarge
                    }
                    ParsedRequest::Partial => {}
                }
            }
            buffers::room(&mut self.buf);
            match self.stream.try_read_some(&mut self.buf) {
                Ok(0) => return HeadRead::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        buffers::give_back(&mut self.buf);
                    }
                    return HeadRead::NeedMore;
                }
                Err(_) => return HeadRead::Closed,
            }
        }
    }

    /// Ends the connection, its buffers back to the worker's pools.
    fn close(mut self) -> Ended<S> {
        self.release_buffers();
        Ended::Closed
    }

    /// Hands the connection to hyper with the bytes it has read; the rest of its buffers go back
    /// to the worker's pools.
    fn hand_off(mut self) -> Ended<S> {
        self.release_exchange_buffers();
        Ended::Handoff(self.stream, self.buf)
    }

    /// Gives the buffers up while the connection waits for its next request.
    fn release_buffers(&mut self) {
        buffers::give_back(&mut self.buf);
        self.release_exchange_buffers();
    }

    /// Gives back what only an exchange uses: the instance's bytes and both heads.
    fn release_exchange_buffers(&mut self) {
        self.rbuf.clear(); // an exchange's leftovers: relayed, or not to be relayed
        buffers::give_back(&mut self.rbuf);
        self.up_head = Vec::new();
        self.down_head = Vec::new();
    }
}
