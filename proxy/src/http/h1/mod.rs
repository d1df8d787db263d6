//! The HTTP/1.1 fast path: one task per client connection that parses heads once, routes, picks,
//! and relays the exchange itself over upstream connections from its worker's idle pool — no
//! header map, no pool lock, no channel, no second task per request.
//!
//! ```text
//! client bytes ─► head::parse_request (httparse; upstream head written in passing)
//!   usual ─► forward::route ─► pick ─► pool::take | pool::connect
//!            ─► head + body (framing::FramingGuard tracks the body) ─► instance
//!            ◄─ head::parse_response ◄─ body relayed by its framing ─► pool::put
//!   unusual (HTTP/1.0, h2c preface, upgrade, Expect, absolute-form, CONNECT, bad Host or
//!   framing, over the limits, an HTTP/2 instance) ─► Ended::Handoff: hyper serves the rest of
//!   the connection, starting with the bytes read so far
//! ```
//!
//! Answers match the hyper path's: the same routing, refusals, retries, header rewrite,
//! metrics, health judgements and shutdown behaviour (the differential tests compare them).

mod exchange;
pub mod head;
pub mod pool;

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{HttpContext, HttpSettings};
use head::{ParsedRequest, RequestInfo};

/// How a fast-path connection ended.
pub enum Ended {
    Closed,
    /// hyper takes the connection from here; the bytes are what was read of the next request.
    Handoff(TcpStream, BytesMut),
}

/// Read size for heads and bodies.
const READ_CHUNK: usize = 16 * 1024;
/// The longest response head accepted from an instance.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// One client connection's state between and during exchanges.
struct ClientConn<'a> {
    ctx: &'a HttpContext,
    settings: &'a HttpSettings,
    stream: TcpStream,
    /// The client's address as text, for `X-Forwarded-For` and the access log.
    ip: String,
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
    Closed,
}

/// Serves `stream` until it closes or needs hyper. `stop`: the listener's shutdown (the current
/// response ends the connection); `last_request`: accepted out of the queue at shutdown, so one
/// request is served without keep-alive.
pub async fn serve(
    ctx: &HttpContext,
    settings: &HttpSettings,
    stream: TcpStream,
    peer: SocketAddr,
    stop: &CancellationToken,
    last_request: bool,
) -> Ended {
    let mut conn = ClientConn {
        ctx,
        settings,
        stream,
        ip: peer.ip().to_string(),
        buf: BytesMut::new(),
        up_head: Vec::new(),
        down_head: Vec::new(),
        rbuf: BytesMut::new(),
    };
    let mut served = 0u64;
    let l7 = &settings.l7;
    loop {
        // The header read timeout bounds the wait for the next request and its head together
        // (as hyper's, and HAProxy's http-keep-alive defaulting to http-request).
        let deadline = tokio::time::Instant::now() + l7.header_read_timeout;
        if conn.buf.is_empty() {
            if served > 0 && stop.is_cancelled() {
                return Ended::Closed;
            }
            conn.release_buffers();
            // Before the first request a shutdown does not interrupt the wait: the client's
            // request is served (with `Connection: close`), bounded by the drain.
            let woke = tokio::select! {
                r = conn.stream.readable() => r.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
                _ = stop.cancelled(), if served > 0 => false,
                _ = ctx.hard_stop.cancelled() => false,
            };
            if !woke {
                return Ended::Closed;
            }
        }
        let info = match conn.read_head(deadline).await {
            HeadRead::Request(info) => info,
            HeadRead::Unusual => return Ended::Handoff(conn.stream, conn.buf),
            HeadRead::Closed => return Ended::Closed,
        };
        let closing = info.close || last_request || stop.is_cancelled();
        let next = tokio::select! {
            next = conn.exchange(info, closing) => next,
            _ = ctx.hard_stop.cancelled() => return Ended::Closed,
        };
        served += 1;
        match next {
            Next::KeepAlive => {}
            Next::Close => return Ended::Closed,
            Next::Handoff => return Ended::Handoff(conn.stream, conn.buf),
        }
    }
}

impl ClientConn<'_> {
    /// Reads until a whole head is buffered (within the header read timeout) and parses it.
    async fn read_head(&mut self, deadline: tokio::time::Instant) -> HeadRead {
        let l7 = &self.settings.l7;
        loop {
            if !self.buf.is_empty() {
                match head::parse_request(&self.buf, l7.max_headers, &self.ip, &mut self.up_head) {
                    ParsedRequest::Request(info) => return HeadRead::Request(info),
                    ParsedRequest::Unusual => return HeadRead::Unusual,
                    // hyper answers 431 for a head past the limit.
                    ParsedRequest::Partial if self.buf.len() > l7.max_header_bytes => {
                        return HeadRead::Unusual
                    }
                    ParsedRequest::Partial => {}
                }
            }
            self.buf.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return HeadRead::Closed,
            }
        }
    }

    /// Frees the buffers while the connection waits for its next request.
    fn release_buffers(&mut self) {
        self.buf = BytesMut::new();
        self.rbuf = BytesMut::new();
        self.up_head = Vec::new();
        self.down_head = Vec::new();
    }
}
