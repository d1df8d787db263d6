//! The client side of an HTTP connection as hyper sees it: the socket plus a watch over request
//! framing and activity.
//!
//! hyper resolves ambiguous HTTP/1 framing by the RFC (Transfer-Encoding wins over
//! Content-Length, equal duplicate lengths are merged) and hands the handler a clean request, so
//! the handler cannot tell it was ambiguous. Such a request is a smuggling attempt, and svcd
//! answers it 400 and closes rather than forward it. [`FramingGuard`] follows the request stream
//! as it is read — heads, Content-Length bodies, chunked bodies — and flags:
//! Content-Length together with Transfer-Encoding, more than one Content-Length, a malformed
//! Content-Length, and any Transfer-Encoding other than `chunked`. It stops watching on the
//! HTTP/2 preface or an upgrade (hyper and h2 frame those themselves).
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
    /// Set when a request on this connection had ambiguous framing.
    pub bad_framing: AtomicBool,
    /// Bumped by every read or write that moved bytes. The idle check compares it between ticks,
    /// so no clock is read per I/O.
    activity: AtomicU64,
}

impl ConnWatch {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnWatch {
            bad_framing: AtomicBool::new(false),
            activity: AtomicU64::new(0),
        })
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
    /// No more watching (HTTP/2, upgrade, or after a finding).
    Off,
}

/// Per-head findings.
#[derive(Debug, Default)]
struct HeadFacts {
    first_line: bool,
    content_lengths: u32,
    length: Option<u64>,
    bad_length: bool,
    transfer_encoding: bool,
    chunked_only: bool,
    upgrade: bool,
}

pub struct FramingGuard {
    phase: Phase,
    head: HeadFacts,
    /// A line split across reads; allocated only then, bounded by the header limit.
    partial: Vec<u8>,
    max_line: usize,
}

/// Outcome of feeding bytes.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fine,
    Ambiguous,
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

impl FramingGuard {
    pub fn new(max_line: usize) -> Self {
        FramingGuard {
            phase: Phase::Head,
            head: HeadFacts {
                first_line: true,
                ..Default::default()
            },
            partial: Vec::new(),
            max_line,
        }
    }

    /// Follows `data`, the next bytes of the client stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Verdict {
        while !data.is_empty() {
            match self.phase {
                Phase::Off => return Verdict::Fine,
                Phase::Body(n) => {
                    let take = (n as usize).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    if left == 0 {
                        self.next_head();
                    } else {
                        self.phase = Phase::Body(left);
                    }
                }
                Phase::ChunkData(n) => {
                    let take = (n as usize).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.phase = if left == 0 {
                        Phase::ChunkSize
                    } else {
                        Phase::ChunkData(left)
                    };
                }
                Phase::Head | Phase::ChunkSize | Phase::Trailers => {
                    let Some(end) = data.iter().position(|&b| b == b'\n') else {
                        if self.partial.len() + data.len() > self.max_line {
                            self.phase = Phase::Off; // hyper rejects it as too large
                            return Verdict::Fine;
                        }
                        self.partial.extend_from_slice(data);
                        return Verdict::Fine;
                    };
                    let verdict = if self.partial.is_empty() {
                        self.line(&data[..end])
                    } else {
                        let mut line = std::mem::take(&mut self.partial);
                        line.extend_from_slice(&data[..end]);
                        let v = self.line(&line);
                        line.clear();
                        self.partial = line;
                        v
                    };
                    if verdict == Verdict::Ambiguous {
                        self.phase = Phase::Off;
                        return verdict;
                    }
                    data = &data[end + 1..];
                }
            }
        }
        Verdict::Fine
    }

    /// One line (without its `\n`) in a line-oriented phase.
    fn line(&mut self, line: &[u8]) -> Verdict {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self.phase {
            Phase::Head => self.head_line(line),
            Phase::ChunkSize => {
                let size = line.split(|&b| b == b';').next().map(trim).unwrap_or(b"");
                match std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                {
                    Some(0) => self.phase = Phase::Trailers,
                    Some(n) => self.phase = Phase::ChunkData(n.saturating_add(2)),
                    None => self.phase = Phase::Off, // hyper rejects the body
                }
                Verdict::Fine
            }
            Phase::Trailers => {
                if line.is_empty() {
                    self.next_head();
                }
                Verdict::Fine
            }
            _ => Verdict::Fine,
        }
    }

    fn next_head(&mut self) {
        self.phase = Phase::Head;
        self.head = HeadFacts {
            first_line: true,
            ..Default::default()
        };
    }

    fn head_line(&mut self, line: &[u8]) -> Verdict {
        let h = &mut self.head;
        if h.first_line {
            if line.is_empty() {
                return Verdict::Fine; // tolerated empty lines before a request
            }
            h.first_line = false;
            if line.starts_with(b"PRI * HTTP/2.0") {
                self.phase = Phase::Off;
            }
            return Verdict::Fine;
        }
        if !line.is_empty() {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Verdict::Fine; // malformed: hyper answers 400
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                h.content_lengths += 1;
                match std::str::from_utf8(value).ok().and_then(|v| {
                    v.bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| v.parse::<u64>().ok())
                        .flatten()
                }) {
                    Some(n) => h.length = Some(n),
                    None => h.bad_length = true,
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                h.chunked_only = !h.transfer_encoding && value.eq_ignore_ascii_case(b"chunked");
                h.transfer_encoding = true;
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                h.upgrade = true;
            }
            return Verdict::Fine;
        }
        // End of head: judge it, then follow its body.
        let ambiguous = (h.content_lengths > 0 && h.transfer_encoding)
            || h.content_lengths > 1
            || h.bad_length
            || (h.transfer_encoding && !h.chunked_only);
        if ambiguous {
            return Verdict::Ambiguous;
        }
        let (te, length, upgrade) = (h.transfer_encoding, h.length, h.upgrade);
        if upgrade {
            self.phase = Phase::Off;
        } else if te {
            self.phase = Phase::ChunkSize;
        } else {
            match length {
                Some(n) if n > 0 => self.phase = Phase::Body(n),
                _ => self.next_head(),
            }
        }
        Verdict::Fine
    }
}

/// The client socket as hyper reads it.
pub struct ClientIo {
    inner: TcpStream,
    guard: FramingGuard,
    watch: Arc<ConnWatch>,
}

impl ClientIo {
    pub fn new(inner: TcpStream, watch: Arc<ConnWatch>, max_line: usize) -> Self {
        watch.touch();
        ClientIo {
            inner,
            guard: FramingGuard::new(max_line),
            watch,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let fresh = &buf.filled()[before..];
            if !fresh.is_empty() {
                this.watch.touch();
                if this.guard.feed(fresh) == Verdict::Ambiguous {
                    this.watch.bad_framing.store(true, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl AsyncWrite for ClientIo {
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
mod tests {
    use super::*;

    fn judge(stream: &[u8]) -> Verdict {
        FramingGuard::new(65536).feed(stream)
    }

    fn judge_bytewise(stream: &[u8]) -> Verdict {
        let mut g = FramingGuard::new(65536);
        for b in stream {
            if g.feed(std::slice::from_ref(b)) == Verdict::Ambiguous {
                return Verdict::Ambiguous;
            }
        }
        Verdict::Fine
    }

    #[test]
    fn smuggling_shapes_are_ambiguous() {
        let bad: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: xchunked\r\n\r\n",
        ];
        for s in bad {
            assert_eq!(
                judge(s),
                Verdict::Ambiguous,
                "{}",
                String::from_utf8_lossy(s)
            );
            assert_eq!(judge_bytewise(s), Verdict::Ambiguous);
        }
    }

    #[test]
    fn clean_pipelines_pass_and_later_heads_are_checked() {
        let ok = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nab\nde\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(judge(ok), Verdict::Fine);
        assert_eq!(judge_bytewise(ok), Verdict::Fine);
        // Body bytes that look like headers are not mistaken for them...
        let body = b"POST / HTTP/1.1\r\nContent-Length: 24\r\n\r\nTransfer-Encoding: x\r\n\r\n";
        assert_eq!(judge(body), Verdict::Fine);
        // ...but a third request after two clean ones is still judged.
        let mut third = ok.to_vec();
        third
            .extend_from_slice(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(judge(&third), Verdict::Ambiguous);
    }

    #[test]
    fn h2_preface_and_upgrades_end_watching() {
        assert_eq!(
            judge(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00Content-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Verdict::Fine
        );
        assert_eq!(
            judge(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Verdict::Fine
        );
    }
}
