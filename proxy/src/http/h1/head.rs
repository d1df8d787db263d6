//! HTTP/1.1 heads on the fast path: parsed once with httparse, judged (usual, or for hyper),
//! and copied out with the proxy's edits made in passing — hop-by-hop fields dropped, the
//! forwarding fields added — so nothing is re-serialised from a header map.

use std::ops::Range;

use crate::http::framing::{request_framing, response_framing, BodyFraming, ResponseFraming};
use crate::http::host::valid_host;

/// Header slots on the stack; a request with more fields than this goes to hyper.
const HEADER_SLOTS: usize = 64;
/// Tokens a `Connection` field may name (beyond close/keep-alive) before the request is unusual.
const MAX_LISTED: usize = 8;

/// What a request head needs for its exchange, as ranges into the client buffer (which is not
/// touched until the exchange ends).
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Head length, up to and including its empty line.
    pub len: usize,
    pub framing: BodyFraming,
    pub host: Range<usize>,
    pub path: Range<usize>,
    pub method: Range<usize>,
    /// `HEAD`: the response has no body whatever its framing says.
    pub head_method: bool,
    /// Safe to send twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// The client asked to close after this response.
    pub close: bool,
}

impl RequestInfo {
    /// Bodiless: the request can be sent again as it is.
    pub fn replayable(&self) -> bool {
        self.framing == BodyFraming::Length(0)
    }
}

/// The outcome of parsing what the client has sent so far.
#[derive(Debug)]
pub enum ParsedRequest {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path (HTTP/1.0, HTTP/2 preface, upgrade, `Expect`, absolute-form,
    /// CONNECT, a Host or framing problem, a malformed head…): hyper serves the connection from
    /// here, with its own answers to whatever is wrong.
    Unusual,
    Request(RequestInfo),
}

pub(crate) fn name_is(name: &str, lower: &str) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

/// A field that ends at this hop (RFC 9110 §7.6.1): the fixed set or one `Connection` named.
/// (`TE`, `Upgrade` and `Transfer-Encoding` are handled where the fast path meets them.)
fn hop_by_hop(name: &str, listed: &[&[u8]]) -> bool {
    name_is(name, "connection")
        || name_is(name, "keep-alive")
        || name_is(name, "proxy-connection")
        || listed
            .iter()
            .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Who sent a request, for the forwarding fields.
#[derive(Clone, Copy)]
pub struct Downstream<'a> {
    pub ip: &'a str,
    /// It came over TLS: `X-Forwarded-Proto: https`.
    pub https: bool,
    /// Its verified client certificate, as `X-Forwarded-Client-Cert` (a client's own is always
    /// dropped).
    pub xfcc: Option<&'a [u8]>,
}

impl<'a> Downstream<'a> {
    /// A plaintext client at `ip`.
    pub fn plain(ip: &'a str) -> Downstream<'a> {
        Downstream {
            ip,
            https: false,
            xfcc: None,
        }
    }
}

/// Parses the head at the start of `buf`; on a usual request writes the head to send upstream
/// into `out` (cleared first): the request line, the client's fields but hop-by-hop ones, `Host`,
/// `X-Forwarded-For` (appended to), `X-Forwarded-Proto`, `X-Forwarded-Host` (unless set),
/// `X-Forwarded-Client-Cert` (only svcd's) and `Via`, as the hyper path's header rewrite does.
pub fn parse_request(
    buf: &[u8],
    max_headers: usize,
    client: Downstream<'_>,
    out: &mut Vec<u8>,
) -> ParsedRequest {
    let client_ip = client.ip;
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let limit = max_headers.min(HEADER_SLOTS);
    let mut req = httparse::Request::new(&mut slots[..limit]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ParsedRequest::Partial,
        Err(_) => return ParsedRequest::Unusual,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return ParsedRequest::Unusual;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return ParsedRequest::Unusual;
    }
    let headers = req.headers;
    let Ok(framing) = request_framing(headers) else {
        return ParsedRequest::Unusual;
    };
    // First pass: what the fields say about the connection and the host.
    let mut host = None;
    let mut close = false;
    let mut listed: [&[u8]; MAX_LISTED] = [b""; MAX_LISTED];
    let mut n_listed = 0;
    let mut forwarded_host = false;
    for h in headers.iter() {
        let name = h.name;
        if name_is(name, "host") {
            if host.is_some() {
                return ParsedRequest::Unusual;
            }
            host = Some(h.value);
        } else if name_is(name, "connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return ParsedRequest::Unusual;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"te") {
                    if n_listed == MAX_LISTED {
                        return ParsedRequest::Unusual;
                    }
                    listed[n_listed] = t;
                    n_listed += 1;
                }
            }
        } else if name_is(name, "upgrade") || name_is(name, "expect") {
            return ParsedRequest::Unusual;
        } else if name_is(name, "x-forwarded-host") {
            forwarded_host = true;
        }
    }
    let Some(host) = host
        .and_then(|h| std::str::from_utf8(h).ok())
        .filter(|h| valid_host(h))
    else {
        return ParsedRequest::Unusual;
    };
    let listed = &listed[..n_listed];

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut forwarded_for = false;
    for h in headers.iter() {
        let name = h.name;
        if hop_by_hop(name, listed)
            || name_is(name, "host")
            || name_is(name, "x-forwarded-proto")
            || name_is(name, "x-forwarded-client-cert")
        {
            continue;
        }
        if name_is(name, "te") {
            if tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers")) {
                out.extend_from_slice(b"te: trailers\r\n");
            }
            continue;
        }
        if name_is(name, "x-forwarded-for") {
            // Every value the client sent, then its address (one field, RFC 9110 §5.3).
            if !forwarded_for {
                forwarded_for = true;
                out.extend_from_slice(b"x-forwarded-for: ");
                let mut first = true;
                for x in headers
                    .iter()
                    .filter(|x| name_is(x.name, "x-forwarded-for"))
                {
                    if !first {
                        out.extend_from_slice(b", ");
                    }
                    first = false;
                    out.extend_from_slice(x.value.trim_ascii());
                }
                out.extend_from_slice(b", ");
                out.extend_from_slice(client_ip.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !forwarded_for {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(match client.https {
        true => b"x-forwarded-proto: https\r\n",
        false => b"x-forwarded-proto: http\r\n",
    });
    if let Some(xfcc) = client.xfcc {
        out.extend_from_slice(b"x-forwarded-client-cert: ");
        out.extend_from_slice(xfcc);
        out.extend_from_slice(b"\r\n");
    }
    if !forwarded_host {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"via: 1.1 svcd\r\n\r\n");

    let base = buf.as_ptr() as usize;
    let range = |s: &str| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    ParsedRequest::Request(RequestInfo {
        len,
        framing,
        host: range(host),
        path: range(path),
        method: range(method),
        head_method: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        close,
    })
}

/// A response head from an instance.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInfo {
    pub len: usize,
    pub status: u16,
    /// How its body ends, given the request (HEAD) and the status (1xx, 204, 304 have none).
    pub framing: ResponseFraming,
    /// The instance keeps the connection open afterwards (HTTP/1.1 without `Connection: close`).
    pub reusable: bool,
}

#[derive(Debug)]
pub enum ParsedResponse {
    Partial,
    /// Malformed, or framed ambiguously: the instance's error.
    Bad,
    Response(ResponseInfo),
}

/// Where a parsed response head goes, with the proxy's edits made: the client's HTTP/1.1 head
/// as bytes (the fast path's `Vec<u8>`), or a status and header map for hyper to send
/// (`bridge::HeadParts`, for requests hyper serves).
pub trait ResponseSink {
    /// The status line; starts the head afresh (an interim 1xx head may have come before).
    fn status(&mut self, status: u16, reason: &[u8]);
    /// A field that goes on (hop-by-hop fields and `Upgrade` are not passed).
    fn field(&mut self, name: &str, value: &[u8]);
    /// The head is complete; `close`: the client's connection closes after this response.
    fn end(&mut self, close: bool);
}

impl ResponseSink for Vec<u8> {
    fn status(&mut self, status: u16, reason: &[u8]) {
        self.clear();
        self.extend_from_slice(b"HTTP/1.1 ");
        let code = [
            b'0' + (status / 100 % 10) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ];
        self.extend_from_slice(&code);
        self.push(b' ');
        self.extend_from_slice(reason);
        self.extend_from_slice(b"\r\n");
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        self.extend_from_slice(name.as_bytes());
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn end(&mut self, close: bool) {
        if close {
            self.extend_from_slice(b"connection: close\r\n");
        }
        self.extend_from_slice(b"\r\n");
    }
}

/// Parses the response head at the start of `buf`; on success gives `out` the head for the
/// client: the status and the fields but hop-by-hop ones, and whether to close (`closing`, or a
/// body that ends with the connection).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    closing: bool,
    out: &mut impl ResponseSink,
) -> ParsedResponse {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS * 2];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ParsedResponse::Partial,
        Err(_) => return ParsedResponse::Bad,
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return ParsedResponse::Bad;
    };
    let headers = resp.headers;
    let no_body = head_request || status < 200 || status == 204 || status == 304;
    let framing = if no_body {
        ResponseFraming::Body(BodyFraming::Length(0))
    } else {
        match response_framing(headers) {
            Ok(f) => f,
            Err(()) => return ParsedResponse::Bad,
        }
    };
    let mut reusable = version == 1 && framing != ResponseFraming::UntilClose;
    let mut listed: [&[u8]; MAX_LISTED] = [b""; MAX_LISTED];
    let mut n_listed = 0;
    for h in headers.iter().filter(|h| name_is(h.name, "connection")) {
        for t in tokens(h.value) {
            if t.eq_ignore_ascii_case(b"close") {
                reusable = false;
            } else if n_listed < MAX_LISTED {
                listed[n_listed] = t;
                n_listed += 1;
            }
        }
    }
    let listed = &listed[..n_listed];
    out.status(status, resp.reason.unwrap_or("").as_bytes());
    for h in headers.iter() {
        if !(hop_by_hop(h.name, listed) || name_is(h.name, "upgrade")) {
            out.field(h.name, h.value);
        }
    }
    out.end(closing || framing == ResponseFraming::UntilClose);
    ParsedResponse::Response(ResponseInfo {
        len,
        status,
        framing,
        reusable,
    })
}

/// A short plain-text answer made by svcd, as the hyper path's `body::local`.
pub fn write_local(out: &mut Vec<u8>, status: http::StatusCode, text: &str, close: bool) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}\r\n{}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        text.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        if close { "connection: close\r\n" } else { "" },
        text
    );
}

#[cfg(test)]
mod tests;
