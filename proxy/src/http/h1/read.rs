//! Reads for the fast path and the bridge, without the `EAGAIN` read tokio needs to learn that a
//! socket is drained.
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

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

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
