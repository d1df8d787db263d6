//! Reads for the fast path and the bridge: bytes without the `EAGAIN` read tokio needs to learn
//! that a socket is drained, and an instance's response head.
//!
//! tokio clears a socket's read readiness only when a read fails with `EAGAIN`, so after a read
//! that took everything (a request head, a small response) the next wait would cost one more
//! `recv` that finds nothing: a third of the receive calls of an HTTP/1.1 exchange. A TCP
//! `recv` that returns less than the room it was given has emptied the receive queue (the kernel
//! copies until the queue or the room runs out), so the readiness can be cleared there, as
//! nginx does for a short `recv`. Nothing is lost: bytes or a FIN arriving later raise a new
//! readiness event, and a FIN that came with the data is kept (tokio never clears "read
//! closed"). This holds on a proxy worker, whose I/O driver runs only when the thread's tasks
//! yield, so no event can slip in between the read and the clearing; elsewhere reads are left
//! to tokio's rule.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::buffers;
use super::head::{self, ParsedResponse, ResponseInfo, ResponseSink};

/// The longest response head accepted from an instance.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// One read into `buf`'s spare room, without waiting: `WouldBlock` when there is nothing yet.
pub fn try_read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if n > 0 && n < room && crate::workers::on_worker() {
        // Drained: clear the readiness (the closure makes no system call).
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    Ok(n)
}

/// Reads into `buf`'s spare room, waiting until there is something (or the end).
pub async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match try_read_some(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Reads the response head (interim 1xx heads skipped, as hyper's client does) and writes the
/// client's version of it to `out`. Err(true): nothing at all was read (the connection was
/// closed or reset before any response byte); Err(false): a malformed or cut head.
pub async fn read_response_head(
    up: &TcpStream,
    rbuf: &mut BytesMut,
    head_request: bool,
    closing: bool,
    out: &mut impl ResponseSink,
) -> Result<ResponseInfo, bool> {
    rbuf.clear();
    let mut read_any = false;
    loop {
        if !rbuf.is_empty() {
            match head::parse_response(rbuf, head_request, closing, out) {
                ParsedResponse::Response(info) if (100..200).contains(&info.status) => {
                    if info.status == 101 {
                        return Err(false); // switching protocols nobody asked for
                    }
                    rbuf.advance(info.len);
                    continue;
                }
                ParsedResponse::Response(info) => return Ok(info),
                ParsedResponse::Bad => return Err(false),
                ParsedResponse::Partial if rbuf.len() > MAX_RESPONSE_HEAD => return Err(false),
                ParsedResponse::Partial => {}
            }
        }
        buffers::room(rbuf);
        match read_some(up, rbuf).await {
            Ok(n) if n > 0 => read_any = true,
            _ => return Err(!read_any),
        }
    }
}

/// Whether a response read from a reused connection is the `408` an instance writes on an idle
/// keep-alive connection before closing it (nginx, Apache, Node do), which raced the request:
/// as Go's transport does, it is taken as "closed while idle", and a request that may be sent
/// again is, on a new connection, without blaming the instance.
pub fn idle_timeout_notice(status: u16) -> bool {
    status == 408
}
