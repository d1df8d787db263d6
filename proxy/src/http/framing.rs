//! The client side of an HTTP connection as hyper sees it: the socket plus a watch over request
//! framing and activity.
//!
//! hyper resolves ambiguous HTTP/1 framing by the RFC (Transfer-Encoding wins over
//! Content-Length, equal duplicate lengths are merged) and hands the handler a clean request, so
//! the handler cannot tell it was ambiguous. Such a request is a smuggling attempt, and svcd
//! answers it 400 and closes rather than forward it. [`FramingGuard`] follows the request stream
//! as it is read — every head, Content-Length body and chunked body on the connection — and
//! flags: Content-Length together with Transfer-Encoding, more than one Content-Length, a
//! malformed Content-Length, and any Transfer-Encoding other than exactly `chunked`.
//!
//! Heads and chunk sizes are parsed with httparse, the parser hyper itself uses, so the guard and
//! hyper read the same bytes the same way. Where the guard cannot follow the stream (a head or a
//! chunk-size line it cannot parse, or longer than the limits) it **fails closed**: the
//! connection is flagged and every later request on it is refused, rather than left unwatched.
//! Watching ends only at the HTTP/2 preface (h2 frames itself) or once the handler has actually
//! switched protocols (101): a request that asks to upgrade and is refused is followed by more
//! requests, and those are checked too.
//!
//! The same wrapper counts reads and writes, for the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What one connection's guard found, and whether it has been active.
pub struct ConnWatch {
    /// Set when a request on this connection had ambiguous framing, or the guard lost sync.
    pub bad_framing: AtomicBool,
    /// Set by the handler before it answers 101: from then on the connection is a tunnel.
    pub upgraded: AtomicBool,
    /// Bumped by every read or write that moved bytes. The idle check compares it between ticks,
    /// so no clock is read per I/O.
    activity: AtomicU64,
    /// Upstream response bodies streaming to this client. A connection with one is not idle
    /// however quiet it is: a stalled body has its own timer.
    busy: AtomicU64,
}

/// One upstream response body streaming on a client connection; counted down when dropped.
pub struct ConnBusy(Arc<ConnWatch>);

impl ConnBusy {
    pub fn start(watch: &Arc<ConnWatch>) -> ConnBusy {
        watch.busy.fetch_add(1, Ordering::Relaxed);
        ConnBusy(watch.clone())
    }
}

impl Drop for ConnBusy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnWatch {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnWatch {
            bad_framing: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            activity: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        })
    }

    /// Whether a request on this connection is still being answered.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    #[inline]
    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// The activity count, to compare with an earlier reading.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Reading a request head.
    Head,
    /// `n` more body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize,
    /// Chunk data, then its CRLF (`n` counts both).
    ChunkData(u64),
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
    /// After a request that asked to upgrade: a tunnel if the handler switched protocols, else
    /// the next request head.
    MaybeUpgraded,
    /// HTTP/2 or a switched protocol: nothing to follow.
    Off,
    /// Lost sync or found ambiguity: nothing more is trusted on this connection.
    Failed,
}

/// Outcome of feeding bytes.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fine,
    /// Ambiguous framing, or a stream the guard cannot follow: refuse and close.
    Ambiguous,
}

/// Longest chunk-size or trailer line followed (hyper's own limits are smaller).
const MAX_LINE: usize = 8 * 1024;

pub struct FramingGuard {
    phase: Phase,
    /// Where the phase after the current body goes: the next head, or the upgrade check.
    after_body: Phase,
    /// The head or line being read; reused, bounded by `max_head` / [`MAX_LINE`].
    buf: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    /// Body data bytes followed since [`FramingGuard::take_data`] (chunk framing excluded).
    data: u64,
}

/// Header slots on the stack for a head's parse; configs allowing more headers than this take
/// them from the heap, per head.
const STACK_HEADERS: usize = 128;

/// What a complete head says about its body.
struct HeadFacts {
    content_lengths: u32,
    length: Option<u64>,
    bad_length: bool,
    transfer_encodings: u32,
    chunked_only: bool,
    upgrade: bool,
}

/// How a request body is delimited (RFC 9112 §6.3); no framing headers is a length of 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(u64),
    Chunked,
}

impl HeadFacts {
    /// The body's framing, or Err for ambiguous framing (Content-Length with Transfer-Encoding,
    /// several or malformed lengths, a Transfer-Encoding other than exactly `chunked`).
    fn framing(&self) -> Result<BodyFraming, ()> {
        let ambiguous = (self.content_lengths > 0 && self.transfer_encodings > 0)
            || self.content_lengths > 1
            || self.bad_length
            || (self.transfer_encodings > 0 && !self.chunked_only);
        match () {
            _ if ambiguous => Err(()),
            _ if self.transfer_encodings > 0 => Ok(BodyFraming::Chunked),
            _ => Ok(BodyFraming::Length(self.length.unwrap_or(0))),
        }
    }
}

/// How a response body ends (RFC 9112 §6.3): by its framing, or when the instance closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    Body(BodyFraming),
    UntilClose,
}

/// A response head's body framing (the status and request method aside, which the caller
/// judges). Err: several or malformed lengths, or a length beside Transfer-Encoding.
pub(crate) fn response_framing(headers: &[httparse::Header<'_>]) -> Result<ResponseFraming, ()> {
    let f = head_facts(headers);
    if f.content_lengths > 1 || f.bad_length || (f.content_lengths > 0 && f.transfer_encodings > 0)
    {
        return Err(());
    }
    Ok(match (f.transfer_encodings, f.length) {
        (0, Some(n)) => ResponseFraming::Body(BodyFraming::Length(n)),
        (0, None) => ResponseFraming::UntilClose,
        _ if f.chunked_only => ResponseFraming::Body(BodyFraming::Chunked),
        _ => ResponseFraming::UntilClose,
    })
}

/// A request head's body framing by the guard's rules, the same judgement [`FramingGuard::feed`]
/// makes: Err where the guard would flag the request.
pub(crate) fn request_framing(headers: &[httparse::Header<'_>]) -> Result<BodyFraming, ()> {
    head_facts(headers).framing()
}

fn head_facts(headers: &[httparse::Header<'_>]) -> HeadFacts {
    let mut h = HeadFacts {
        content_lengths: 0,
        length: None,
        bad_length: false,
        transfer_encodings: 0,
        chunked_only: false,
        upgrade: false,
    };
    for header in headers {
        let value = header.value.trim_ascii();
        if header.name.eq_ignore_ascii_case("content-length") {
            h.content_lengths += 1;
            let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
            match std::str::from_utf8(value).ok().filter(|_| digits) {
                Some(v) => {
                    h.length = v.parse().ok().or_else(|| {
                        h.bad_length = true;
                        None
                    })
                }
                None => h.bad_length = true,
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            h.transfer_encodings += 1;
            h.chunked_only = h.transfer_encodings == 1 && value.eq_ignore_ascii_case(b"chunked");
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            h.upgrade = true;
        }
    }
    h
}

impl FramingGuard {
    /// `max_head`: the request head size limit; `max_headers`: the header count limit (hyper
    /// answers 431 past either, and so does the guard's parse).
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        FramingGuard {
            phase: Phase::Head,
            after_body: Phase::Head,
            buf: Vec::new(),
            max_head,
            max_headers: max_headers.max(1),
            data: 0,
        }
    }

    /// Follows `data`, the next bytes of the client stream. `upgraded`: the handler has
    /// switched protocols on this connection.
    pub fn feed(&mut self, mut data: &[u8], upgraded: bool) -> Verdict {
        while !data.is_empty() {
            let used = match self.phase {
                Phase::Off => return Verdict::Fine,
                Phase::Failed => return Verdict::Ambiguous,
                Phase::MaybeUpgraded if upgraded => {
                    self.phase = Phase::Off;
                    return Verdict::Fine;
                }
                Phase::MaybeUpgraded => {
                    self.phase = Phase::Head;
                    Ok(0)
                }
                Phase::Head => self.read_head(data),
                _ => self.step_body(data),
            };
            match used {
                Ok(used) => data = &data[used..],
                Err(()) => return self.fail(),
            }
        }
        Verdict::Fine
    }

    /// A tracker of one message body whose head was judged elsewhere (the HTTP/1.1 fast path's
    /// request and response bodies): the same chunk-size, chunk-data and trailer rules as
    /// [`FramingGuard::feed`], one parser for both.
    pub fn body(framing: BodyFraming) -> Self {
        let mut guard = FramingGuard::new(0, 1);
        guard.phase = match framing {
            BodyFraming::Length(n) if n > 0 => Phase::Body(n),
            BodyFraming::Length(_) => Phase::Head,
            BodyFraming::Chunked => Phase::ChunkSize,
        };
        guard
    }

    /// Follows body bytes: how many of `data` belong to the body, and whether it ended there.
    /// Err: a chunk-size or trailer line that cannot be parsed.
    pub(crate) fn feed_body(&mut self, data: &[u8]) -> Result<(usize, bool), ()> {
        let mut used = 0;
        while used < data.len() && self.phase != Phase::Head {
            match self.step_body(&data[used..]) {
                Ok(n) => used += n,
                Err(()) => {
                    self.fail();
                    return Err(());
                }
            }
        }
        Ok((used, self.phase == Phase::Head))
    }

    /// One step over body bytes, for a relay that passes on the data alone (hyper's client
    /// side of an HTTP/1.1 instance): how many bytes of `data` the step used, and how many of
    /// those, from their start, are body data (chunk sizes, chunk CRLFs and trailers are not).
    /// Err: a chunk-size or trailer line that cannot be parsed.
    pub(crate) fn next_piece(&mut self, data: &[u8]) -> Result<(usize, usize), ()> {
        if data.is_empty() || self.phase == Phase::Head {
            return Ok((0, 0));
        }
        let before = self.data;
        match self.step_body(data) {
            Ok(used) => Ok((used, (self.data - before) as usize)),
            Err(()) => {
                self.fail();
                Err(())
            }
        }
    }

    /// Whether the next bytes are trailer lines (the chunked body's last chunk was read).
    pub(crate) fn in_trailers(&self) -> bool {
        self.phase == Phase::Trailers
    }

    /// Body data bytes followed since the last call.
    pub fn take_data(&mut self) -> u64 {
        std::mem::take(&mut self.data)
    }

    /// Whether a body tracker has seen its body's end.
    pub fn body_done(&self) -> bool {
        self.phase == Phase::Head
    }

    /// One step of a body phase; how many bytes of `data` it used.
    fn step_body(&mut self, data: &[u8]) -> Result<usize, ()> {
        match self.phase {
            Phase::Body(n) => {
                let take = (n as usize).min(data.len());
                self.data += take as u64;
                let left = n - take as u64;
                self.phase = if left == 0 {
                    self.after_body
                } else {
                    Phase::Body(left)
                };
                Ok(take)
            }
            Phase::ChunkData(n) => {
                let take = (n as usize).min(data.len());
                // `n` counts the chunk's data and its CRLF.
                self.data += (take as u64).min(n.saturating_sub(2));
                let left = n - take as u64;
                self.phase = if left == 0 {
                    Phase::ChunkSize
                } else {
                    Phase::ChunkData(left)
                };
                Ok(take)
            }
            Phase::ChunkSize | Phase::Trailers => self.read_line(data),
            _ => Err(()),
        }
    }

    fn fail(&mut self) -> Verdict {
        self.phase = Phase::Failed;
        self.buf = Vec::new();
        Verdict::Ambiguous
    }

    /// Takes bytes of a head; when the head is complete, judges it and moves to its body.
    /// Returns how many bytes of `data` it used.
    fn read_head(&mut self, data: &[u8]) -> Result<usize, ()> {
        // Empty lines before a request line are tolerated (RFC 9112 §2.2), as hyper does.
        let mut skipped = 0;
        if self.buf.is_empty() {
            skipped = data
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .unwrap_or(data.len());
        }
        let data = &data[skipped..];
        let searched = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(data);
        let Some(end) = head_end(&self.buf, searched) else {
            if self.buf.len() > self.max_head {
                return Err(()); // hyper answers 431; nothing after it can be followed
            }
            return Ok(skipped + data.len());
        };
        let used = skipped + data.len() - (self.buf.len() - end);
        if self.buf.starts_with(b"PRI * HTTP/2.0") {
            self.phase = Phase::Off;
            return Ok(used);
        }
        let facts = {
            let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
            let mut heap = Vec::new();
            let slots = if self.max_headers <= STACK_HEADERS {
                &mut stack[..self.max_headers]
            } else {
                heap.resize(self.max_headers, httparse::EMPTY_HEADER);
                &mut heap[..]
            };
            let mut req = httparse::Request::new(slots);
            match req.parse(&self.buf[..end]) {
                Ok(httparse::Status::Complete(n)) if n == end => head_facts(req.headers),
                _ => return Err(()), // hyper rejects it too: the stream cannot be followed
            }
        };
        self.buf.clear();
        let framing = facts.framing()?;
        self.after_body = if facts.upgrade {
            Phase::MaybeUpgraded
        } else {
            Phase::Head
        };
        self.phase = match framing {
            BodyFraming::Chunked => Phase::ChunkSize,
            BodyFraming::Length(n) if n > 0 => Phase::Body(n),
            BodyFraming::Length(_) => self.after_body,
        };
        Ok(used)
    }

    /// Takes bytes of a chunk-size or trailer line. Returns how many bytes of `data` it used.
    fn read_line(&mut self, data: &[u8]) -> Result<usize, ()> {
        let Some(nl) = data.iter().position(|&b| b == b'\n') else {
            if self.buf.len() + data.len() > MAX_LINE {
                return Err(());
            }
            self.buf.extend_from_slice(data);
            return Ok(data.len());
        };
        self.buf.extend_from_slice(&data[..=nl]);
        if self.buf.len() > MAX_LINE {
            return Err(());
        }
        match self.phase {
            Phase::ChunkSize if !chunk_line_is_strict(&self.buf) => return Err(()),
            Phase::ChunkSize => match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((_, 0))) => self.phase = Phase::Trailers,
                Ok(httparse::Status::Complete((_, n))) => {
                    self.phase = Phase::ChunkData(n.saturating_add(2))
                }
                _ => return Err(()),
            },
            _ => {
                // A trailer line; an empty one ends the body.
                if self.buf == b"\r\n" || self.buf == b"\n" {
                    self.phase = self.after_body;
                }
            }
        }
        self.buf.clear();
        Ok(nl + 1)
    }
}

/// Whether a chunk-size line is exactly RFC 9112's `chunk-size *chunk-ext CRLF`:
/// `1*HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] ) CRLF`, with
/// optional white space before the CRLF. httparse (and so hyper) skips whatever follows a `;`,
/// so an extension holding a request line reaches an instance that may read the body its own
/// way (a smuggling vector); such a line is refused here, on every path and in both directions.
fn chunk_line_is_strict(line: &[u8]) -> bool {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return false;
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return false;
    }
    let mut rest = &line[digits..];
    loop {
        rest = skip_bws(rest);
        match rest.split_first() {
            None => return true,
            Some((b';', after)) => rest = skip_bws(after),
            Some(_) => return false,
        }
        let name = token_len(rest);
        if name == 0 {
            return false;
        }
        rest = skip_bws(&rest[name..]);
        if let Some((b'=', after)) = rest.split_first() {
            rest = skip_bws(after);
            let value = match rest.first() {
                Some(b'"') => quoted_string_len(rest),
                _ => token_len(rest),
            };
            if value == 0 {
                return false;
            }
            rest = &rest[value..];
        }
    }
}

fn skip_bws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// The length of the RFC 9110 token at the start of `s` (0: none).
fn token_len(s: &[u8]) -> usize {
    s.iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .count()
}

/// The length of the RFC 9110 quoted-string at the start of `s`, quotes included (0: none).
fn quoted_string_len(s: &[u8]) -> usize {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return i + 1,
            b'\\' => match s.get(i + 1) {
                Some(&c) if c == b'\t' || c == b' ' || c >= 0x21 && c != 0x7f => i += 2,
                _ => return 0,
            },
            c if c == b'\t' || c == b' ' || c >= 0x21 && c != 0x7f => i += 1,
            _ => return 0,
        }
    }
    0
}

/// The end of a head (just past its empty line) in `buf`, looking from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1..].starts_with(b"\r\n") {
                return Some(i + 3);
            }
            if buf[i + 1..].starts_with(b"\n") {
                return Some(i + 2);
            }
        }
        i += 1;
    }
    None
}

/// The client socket (TCP, or TLS over it) as hyper reads it.
pub struct ClientIo<S = TcpStream> {
    inner: S,
    /// Bytes already read from the socket (by the HTTP/1.1 fast path, which handed the
    /// connection over): read first, through the guard like any others.
    prefix: bytes::Bytes,
    guard: FramingGuard,
    watch: Arc<ConnWatch>,
}

impl<S> ClientIo<S> {
    pub fn new(
        inner: S,
        prefix: bytes::Bytes,
        watch: Arc<ConnWatch>,
        max_head: usize,
        max_headers: usize,
    ) -> Self {
        watch.touch();
        ClientIo {
            inner,
            prefix,
            guard: FramingGuard::new(max_head, max_headers),
            watch,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = if this.prefix.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = r {
            let fresh = &buf.filled()[before..];
            if !fresh.is_empty() {
                this.watch.touch();
                let upgraded = this.watch.upgraded.load(Ordering::Acquire);
                if this.guard.feed(fresh, upgraded) == Verdict::Ambiguous {
                    this.watch.bad_framing.store(true, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.watch.touch();
            }
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.watch.touch();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
