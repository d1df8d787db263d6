//! Upstream connection pools: one hyper-util client speaking HTTP/1.1 and one speaking HTTP/2
//! (prior knowledge), chosen per instance by its registered `protocol`. Pools are keyed by
//! `ip:port`, keep connections alive, and close idle ones after `pool_idle_timeout`. The
//! connector counts connections for the pool gauges.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use svcd_config::{L7Config, Protocol};
use tokio::net::TcpStream;

use super::metrics::HttpMetrics;

/// A request body going upstream: the client's, streamed and watched, or none (a retried
/// bodiless request).
pub type UpstreamBody = super::body::RequestBody;

/// The two pools.
pub struct Upstreams {
    h1: Client<CountingConnector, UpstreamBody>,
    h2: Client<CountingConnector, UpstreamBody>,
}

impl Upstreams {
    pub fn new(
        l7: &L7Config,
        connect_timeout: std::time::Duration,
        metrics: Arc<HttpMetrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.enforce_http(true);
        let connector = CountingConnector { http, metrics };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(l7.pool_idle_timeout)
            .pool_max_idle_per_host(l7.pool_max_idle_per_host)
            .set_host(false);
        let h1 = builder.build(connector.clone());
        builder.http2_only(true);
        let h2 = builder.build(connector);
        Upstreams { h1, h2 }
    }

    /// The pool for an instance registered with `protocol`.
    #[inline]
    pub fn for_protocol(&self, protocol: Protocol) -> &Client<CountingConnector, UpstreamBody> {
        if super::speaks_h1(protocol) {
            &self.h1
        } else {
            &self.h2
        }
    }

    /// HTTP/1.1 pool (upgrades always go here).
    pub fn h1(&self) -> &Client<CountingConnector, UpstreamBody> {
        &self.h1
    }
}

/// `HttpConnector` plus connection counting.
#[derive(Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    metrics: Arc<HttpMetrics>,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedConn;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<CountedConn, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let io = connecting.await?;
            metrics.upstream_connects.inc();
            metrics.upstream_open.inc();
            Ok(CountedConn { io, metrics })
        })
    }
}

/// An upstream connection; the open gauge goes down when the pool drops it.
pub struct CountedConn {
    io: TokioIo<TcpStream>,
    metrics: Arc<HttpMetrics>,
}

impl Drop for CountedConn {
    fn drop(&mut self) {
        self.metrics.upstream_open.dec();
    }
}

impl Connection for CountedConn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
