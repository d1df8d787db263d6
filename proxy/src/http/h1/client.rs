//! The client connections the fast path serves: plain TCP, or TLS over TCP (an HTTPS listener
//! whose client chose HTTP/1.1 in ALPN, or none).
//!
//! The fast path waits for a client the way an idle connection should cost least: on the
//! socket's own readiness slot, then a read that does not wait. Over TLS the socket being
//! readable does not mean a request byte is there (a partial record, a session ticket
//! acknowledgement), and a request byte may be there with nothing on the socket (rustls already
//! decrypted it), so [`ClientStream`] says both for each kind.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection the fast path can serve.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// Ready when a read may find bytes (or the end): the socket is readable, or decrypted
    /// bytes wait.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// One read into `buf`'s spare room, without waiting: `WouldBlock` when there is nothing yet.
    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
}

impl ClientStream for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        super::read::try_read_some(self, buf)
    }
}

impl ClientStream for TlsStream<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.get_ref();
        // rustls wants no more records while it holds plaintext (or has ended): a read is due.
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }

    fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() == buf.len() {
            buf.reserve(1); // no room would read as the end
        }
        // A read that must not wait: polled once with a waker that does nothing. Pending means
        // no whole record yet; the caller then waits on `poll_read_ready` with its own waker,
        // which replaces this one in the socket's slot.
        let mut cx = Context::from_waker(Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Reads into `buf`'s spare room, waiting until there is something (or the end).
pub async fn read_some<S: ClientStream>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        match stream.try_read_some(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}
