//! HTTP/1.1 instances for the requests hyper serves (HTTP/2 clients above all, and HTTP/1.1
//! requests the fast path hands over): a bodiless request goes out in one write over the
//! worker's pooled connection ([`pool`]), and its response is read with the fast path's parser
//! ([`super::head::parse_response`]) and body tracker ([`FramingGuard`]). No hyper-util pool lock,
//! dispatch channel or connection task per request; the request handler's own task does the
//! exchange, and the response body is read by whoever polls it (hyper's stream task).
//!
//! ```text
//! forward::proxy ─► send: head written from the rewritten parts ─► pool::checkout
//!   ◄─ read_response_head (1xx skipped) ─► Response<DirectBody>: status + HeaderMap
//!   DirectBody::poll_frame ─► chunk framing taken off (DATA frames carry the data alone,
//!   trailers become a trailers frame) ─► at the body's clean end ─► pool::put
//! ```
//!
//! Requests with a body, upgrades and HTTP/2 instances keep hyper-util's client.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Response, StatusCode};
use hyper::body::{Body, Frame};
use tokio::io::AsyncWriteExt;

use super::buffers;
use super::head::{name_is, ResponseSink};
use super::pool::{self, UpstreamConn};
use super::read::{idle_timeout_notice, read_response_head};
use crate::http::framing::{BodyFraming, FramingGuard, ResponseFraming};
use crate::http::metrics::{HttpMetrics, HttpSlot};
use crate::http::HttpSettings;
use svcd_lb::Slot;

/// Body data up to this size is copied out of the read buffer, so the buffer goes back to the
/// worker's free list whole; larger pieces are split off it without a copy.
const COPY_MAX: usize = 1024;

/// Why an exchange got no response head.
#[derive(Debug)]
pub enum BridgeError {
    /// The instance could not be reached: safe to try another.
    Connect(io::Error),
    /// Writing the request or reading the response head failed, or the head was malformed.
    Upstream(&'static str),
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeError::Connect(e) => write!(f, "connect failed: {e}"),
            BridgeError::Upstream(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for BridgeError {}

/// A request hyper parsed, rewritten for the instance (hop-by-hop fields dropped, Host and the
/// forwarding fields set), with no body.
pub struct BodilessRequest<'a> {
    pub method: &'a Method,
    pub path: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
}

/// Whether a request hyper parsed can take the bridge: no body, and no framing field that says
/// otherwise.
pub fn bodiless(end_of_stream: bool, headers: &HeaderMap) -> bool {
    end_of_stream
        && !headers.contains_key(http::header::TRANSFER_ENCODING)
        && headers
            .get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Sends `req` to the instance at `addr` and returns its response head, with a body that reads
/// the rest from the connection. A pooled connection the instance had closed (nothing read back)
/// is replaced by a new one once: the request has no body, so sending it again is safe.
pub async fn send(
    req: BodilessRequest<'_>,
    slot: &Slot<HttpSlot>,
    settings: &HttpSettings,
    metrics: &HttpMetrics,
) -> Result<Response<DirectBody>, BridgeError> {
    let l7 = &settings.l7;
    let mut head = BytesMut::new();
    buffers::room(&mut head);
    write_request_head(&mut head, &req);
    let head_request = req.method == Method::HEAD;
    let mut fresh_only = false;
    let result = loop {
        let mut up = match pool::checkout(slot, settings, metrics, fresh_only).await {
            Ok(up) => up,
            Err(e) => break Err(BridgeError::Connect(e)),
        };
        let stale = up.reused && !fresh_only;
        if up.stream.write_all(&head).await.is_err() {
            if stale {
                fresh_only = true;
                continue;
            }
            break Err(BridgeError::Upstream("upstream write failed"));
        }
        let mut rbuf = BytesMut::new();
        let mut parts = HeadParts::default();
        match read_response_head(&up.stream, &mut rbuf, head_request, false, &mut parts).await {
            Ok(info) if stale && idle_timeout_notice(info.status) => fresh_only = true,
            Ok(info) => {
                let Some(status) = parts.valid_status(info.status) else {
                    break Err(BridgeError::Upstream("malformed response head"));
                };
                rbuf.advance(info.len);
                let keep = l7.pool_max_idle_per_host;
                let body = DirectBody::new(up, rbuf, info.framing, info.reusable, keep);
                let mut response = Response::new(body);
                *response.status_mut() = status;
                *response.headers_mut() = parts.headers;
                break Ok(response);
            }
            Err(true) if stale => fresh_only = true, // closed while idle: again, on a new one
            Err(_) => break Err(BridgeError::Upstream("no valid response head")),
        }
    };
    head.clear();
    buffers::give_back(&mut head);
    result
}

/// `METHOD path HTTP/1.1`, the fields as they are, and `content-length: 0` where a method's
/// empty body must be stated (as hyper's client does).
fn write_request_head(out: &mut BytesMut, req: &BodilessRequest<'_>) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(req.path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let states_length = !matches!(
        *req.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
    );
    if states_length && !req.headers.contains_key(http::header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head as hyper sends it: the status and a header map. `Transfer-Encoding` is left
/// out: the body's chunking is taken off here, and hyper frames what it sends its own way.
///
/// The fields are staged as they are parsed and the map is built once the head is complete: the
/// map sized for them at once, and every value a slice of one buffer, so a head costs four
/// allocations whatever its number of fields (a value each, and the map's growth, before).
#[derive(Default)]
struct HeadParts {
    status: u16,
    /// The fields to pass on, each as name length, value length (`u32`, little-endian), name,
    /// value.
    staged: BytesMut,
    /// Fields staged.
    count: usize,
    headers: HeaderMap,
    /// A field hyper would not accept as a name or value: the head is the instance's error.
    bad: bool,
}

impl HeadParts {
    fn valid_status(&self, status: u16) -> Option<StatusCode> {
        StatusCode::from_u16(status).ok().filter(|_| !self.bad)
    }

    /// Builds `headers` from the staged fields.
    fn build(&mut self) -> Result<(), ()> {
        let staged = std::mem::take(&mut self.staged).freeze();
        self.headers = HeaderMap::with_capacity(self.count);
        let mut at = 0;
        while at < staged.len() {
            let name_len = read_len(&staged[at..]);
            let value_len = read_len(&staged[at + 4..]);
            let name_at = at + 8;
            let value_at = name_at + name_len;
            at = value_at + value_len;
            let name = HeaderName::from_bytes(&staged[name_at..value_at]).map_err(|_| ())?;
            let value =
                HeaderValue::from_maybe_shared(staged.slice(value_at..at)).map_err(|_| ())?;
            self.headers.append(name, value);
        }
        Ok(())
    }
}

fn read_len(at: &[u8]) -> usize {
    u32::from_le_bytes([at[0], at[1], at[2], at[3]]) as usize
}

impl ResponseSink for HeadParts {
    fn status(&mut self, status: u16, _reason: &[u8]) {
        self.status = status;
        self.staged.clear();
        self.count = 0;
        self.headers.clear();
        self.bad = false;
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        if name_is(name, "transfer-encoding") {
            return;
        }
        if self.staged.is_empty() {
            self.staged.reserve(STAGED_ROOM);
        }
        self.staged
            .extend_from_slice(&(name.len() as u32).to_le_bytes());
        self.staged
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.staged.extend_from_slice(name.as_bytes());
        self.staged.extend_from_slice(value);
        self.count += 1;
    }

    fn end(&mut self, _close: bool) {
        self.bad = self.build().is_err();
    }
}

/// Room staged for a head's fields at first (most response heads are a few hundred bytes).
const STAGED_ROOM: usize = 512;

/// A response body read straight from the instance's connection, its framing followed by the
/// same tracker as the fast path's. Errors (a reset, a cut or malformed body) are the instance's;
/// the caller's `TrackedBody` blames it and bounds stalls. Dropped before its end (the client
/// went away), it closes the connection.
pub struct DirectBody {
    /// The connection the body comes from: back to the worker's pool at a clean end, closed
    /// otherwise.
    up: Option<UpstreamConn>,
    /// Bytes read and not yet passed on (a recycled buffer, see [`buffers`]).
    buf: BytesMut,
    /// Follows the body's framing; `None` when the body ends with the connection.
    tracker: Option<FramingGuard>,
    /// The instance keeps the connection open after this response.
    reusable: bool,
    /// A chunked body's trailer lines, gathered until its end (allocated only if it has any).
    trailer_lines: Vec<u8>,
    /// Trailers still to be passed on, once the data is all out.
    trailers: Option<HeaderMap>,
    done: bool,
    /// `pool_max_idle_per_host`, for returning the connection to the pool.
    keep_per_host: usize,
}

impl DirectBody {
    fn new(
        up: UpstreamConn,
        buf: BytesMut,
        framing: ResponseFraming,
        reusable: bool,
        keep_per_host: usize,
    ) -> Self {
        let tracker = match framing {
            ResponseFraming::Body(f) => Some(FramingGuard::body(f)),
            ResponseFraming::UntilClose => None,
        };
        let mut body = DirectBody {
            up: Some(up),
            buf,
            tracker,
            reusable,
            trailer_lines: Vec::new(),
            trailers: None,
            done: false,
            keep_per_host,
        };
        if framing == ResponseFraming::Body(BodyFraming::Length(0)) {
            body.finish(true);
        }
        body
    }

    /// The body has ended; the connection is pooled when `clean` and nothing stray follows.
    fn finish(&mut self, clean: bool) {
        self.done = true;
        let up = self.up.take();
        if let (Some(up), true) = (up, clean && self.reusable && self.buf.is_empty()) {
            pool::put(up, self.keep_per_host);
        }
        buffers::give_back(&mut self.buf);
        if !self.trailer_lines.is_empty() {
            self.trailers = parse_trailers(&self.trailer_lines);
        }
    }

    /// Passes on what `buf` holds of the body: a data frame, or `None` for framing bytes only.
    fn next_frame(&mut self) -> io::Result<Option<Frame<Bytes>>> {
        let Some(tracker) = &mut self.tracker else {
            return Ok(Some(Frame::data(self.buf.split().freeze())));
        };
        let trailer = tracker.in_trailers();
        let (used, data_len) = tracker
            .next_piece(&self.buf)
            .map_err(|()| io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body"))?;
        let ended = tracker.body_done();
        if trailer && !(self.trailer_lines.is_empty() && self.buf[..used] == *b"\r\n") {
            self.trailer_lines.extend_from_slice(&self.buf[..used]);
        }
        let frame = match data_len {
            0 => {
                self.buf.advance(used);
                None
            }
            n if n <= COPY_MAX => {
                let data = Bytes::copy_from_slice(&self.buf[..n]);
                self.buf.advance(used);
                Some(Frame::data(data))
            }
            n => {
                let mut piece = self.buf.split_to(used);
                piece.truncate(n);
                Some(Frame::data(piece.freeze()))
            }
        };
        if ended {
            self.finish(true);
        }
        Ok(frame)
    }
}

/// Trailer lines (the empty line that ends them included) as a header map; `None` if they do
/// not parse, which loses only the trailers.
fn parse_trailers(lines: &[u8]) -> Option<HeaderMap> {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(lines, &mut slots)
    else {
        tracing::debug!("unparsable trailers from an instance dropped");
        return None;
    };
    let mut map = HeaderMap::new();
    for f in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if !this.buf.is_empty() {
                match this.next_frame() {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => continue,
                    Err(e) => {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            let Some(up) = &this.up else {
                return Poll::Ready(None);
            };
            ready!(up.stream.poll_read_ready(cx))?;
            buffers::room(&mut this.buf);
            match super::read::try_read_some(&up.stream, &mut this.buf) {
                Ok(0) if this.tracker.is_none() => this.finish(false), // ends with the connection
                Ok(0) => {
                    this.finish(false);
                    let cut = io::Error::new(io::ErrorKind::UnexpectedEof, "response body cut");
                    return Poll::Ready(Some(Err(cut)));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}

impl Drop for DirectBody {
    fn drop(&mut self) {
        buffers::give_back(&mut self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h1::head;

    fn head_of(method: Method, headers: &[(&'static str, &'static str)]) -> String {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(*n, HeaderValue::from_static(v));
        }
        let path = PathAndQuery::from_static("/a?b=1");
        let mut out = BytesMut::new();
        let req = BodilessRequest {
            method: &method,
            path: &path,
            headers: &map,
        };
        write_request_head(&mut out, &req);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn request_heads_state_an_empty_body_where_the_method_needs_it() {
        assert_eq!(
            head_of(Method::GET, &[("host", "web"), ("x-a", "1")]),
            "GET /a?b=1 HTTP/1.1\r\nhost: web\r\nx-a: 1\r\n\r\n"
        );
        assert_eq!(
            head_of(Method::POST, &[("host", "web")]),
            "POST /a?b=1 HTTP/1.1\r\nhost: web\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            head_of(Method::PUT, &[("content-length", "0")]),
            "PUT /a?b=1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn only_requests_without_a_body_take_the_bridge() {
        let mut h = HeaderMap::new();
        assert!(bodiless(true, &h));
        assert!(!bodiless(false, &h));
        h.insert("content-length", HeaderValue::from_static("0"));
        assert!(bodiless(true, &h));
        h.insert("content-length", HeaderValue::from_static("5"));
        assert!(!bodiless(true, &h));
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(!bodiless(true, &h));
    }

    #[test]
    fn heads_become_header_maps_without_hop_by_hop_fields() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: x-hop\r\nX-Hop: 1\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n\r\n";
        let mut parts = HeadParts::default();
        let head::ParsedResponse::Response(info) =
            head::parse_response(raw, false, false, &mut parts)
        else {
            panic!("parses");
        };
        assert_eq!(info.len, raw.len());
        assert_eq!(info.framing, ResponseFraming::Body(BodyFraming::Chunked));
        assert_eq!(parts.valid_status(info.status), Some(StatusCode::OK));
        assert_eq!(parts.headers.len(), 3, "{:?}", parts.headers);
        assert_eq!(parts.headers.get_all("set-cookie").iter().count(), 2);
        assert!(parts.headers.get("x-hop").is_none());
        assert!(parts.headers.get("transfer-encoding").is_none());
    }

    #[test]
    fn trailers_parse_and_bad_ones_are_dropped() {
        let t = parse_trailers(b"grpc-status: 0\r\nx-sum: 12\r\n\r\n").unwrap();
        assert_eq!(t.get("grpc-status").unwrap(), "0");
        assert_eq!(t.len(), 2);
        assert!(parse_trailers(b"no colon here\r\n\r\n").is_none());
    }
}
