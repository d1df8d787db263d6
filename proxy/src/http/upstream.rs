//! Upstream connection pools: one hyper-util client speaking HTTP/1.1 and one speaking HTTP/2
//! (prior knowledge), chosen per instance by its registered `protocol`. Pools are keyed by
//! `ip:port`, keep connections alive, and close idle ones after `pool_idle_timeout`. The
//! connector counts connections for the pool gauges. Services with `[[proxy.upstream_tls]]`
//! get a pair of pools of their own whose connector speaks TLS (ALPN `http/1.1` or `h2`).

use std::collections::HashMap;
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

type Pool = Client<CountingConnector, UpstreamBody>;

/// The plaintext pools, and a pair per service reached over TLS.
pub struct Upstreams {
    h1: Pool,
    h2: Pool,
    /// By `svc.ns`; empty unless `[[proxy.upstream_tls]]` names services.
    tls: HashMap<String, (Pool, Pool)>,
}

impl Upstreams {
    pub fn new(
        l7: &L7Config,
        connect_timeout: std::time::Duration,
        metrics: Arc<HttpMetrics>,
        tls: &[Arc<svcd_tls::UpstreamTls>],
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.enforce_http(true);
        let connector = CountingConnector {
            http,
            metrics,
            tls: None,
            handshake_timeout: connect_timeout,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(l7.pool_idle_timeout)
            .pool_max_idle_per_host(l7.pool_max_idle_per_host)
            .set_host(false);
        let mut h2_builder = builder.clone();
        h2_builder.http2_only(true);
        let with_tls = |t: &Arc<svcd_tls::UpstreamTls>, alpn| CountingConnector {
            tls: Some((t.clone(), alpn)),
            ..connector.clone()
        };
        let tls = tls
            .iter()
            .map(|t| {
                (
                    t.service().to_string(),
                    (
                        builder.build(with_tls(t, svcd_tls::UpstreamAlpn::Http1)),
                        h2_builder.build(with_tls(t, svcd_tls::UpstreamAlpn::H2)),
                    ),
                )
            })
            .collect();
        Upstreams {
            h1: builder.build(connector.clone()),
            h2: h2_builder.build(connector),
            tls,
        }
    }

    /// Whether `service` (`svc.ns`) is reached over TLS (the fast path and the bridge then hand
    /// its requests to these pools).
    #[inline]
    pub fn is_tls(&self, service: &str) -> bool {
        !self.tls.is_empty() && self.tls.contains_key(service)
    }

    /// The pool for an instance of `service` registered with `protocol`; `upgrade`: the
    /// HTTP/1.1 pool whatever the protocol (upgrades are HTTP/1.1).
    #[inline]
    pub fn for_instance(&self, service: &str, protocol: Protocol, upgrade: bool) -> &Pool {
        let h1 = upgrade || super::speaks_h1(protocol);
        match self.tls.get(service) {
            Some((tls_h1, tls_h2)) => {
                if h1 {
                    tls_h1
                } else {
                    tls_h2
                }
            }
            None if h1 => &self.h1,
            None => &self.h2,
        }
    }
}

/// `HttpConnector` plus connection counting, and TLS for a service that has it.
#[derive(Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    metrics: Arc<HttpMetrics>,
    /// The service's TLS and what ALPN offers (`None`: plaintext).
    tls: Option<(Arc<svcd_tls::UpstreamTls>, svcd_tls::UpstreamAlpn)>,
    /// The handshake's bound: the connect timeout again.
    handshake_timeout: std::time::Duration,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<CountedConn, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http
            .poll_ready(cx)
            .map_err(|e| Box::new(e) as ConnectError)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let metrics = self.metrics.clone();
        let tls = self.tls.clone();
        let handshake_timeout = self.handshake_timeout;
        Box::pin(async move {
            let tcp = connecting.await?;
            let io = match tls {
                None => UpstreamIo::Plain(tcp),
                Some((tls, alpn)) => {
                    let stream = tls
                        .connect(tcp.into_inner(), alpn, handshake_timeout)
                        .await
                        .map_err(ConnectError::tls)?;
                    UpstreamIo::Tls(Box::new(TokioIo::new(stream)))
                }
            };
            metrics.upstream_connects.inc();
            metrics.upstream_open.inc();
            Ok(CountedConn { io, metrics })
        })
    }
}

/// hyper-util's connect error, or a failed TLS handshake, as one error type for the client.
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

trait TlsConnectError {
    fn tls(e: io::Error) -> ConnectError;
}

impl TlsConnectError for ConnectError {
    fn tls(e: io::Error) -> ConnectError {
        Box::new(e)
    }
}

/// A plaintext or TLS connection to an instance.
enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    /// Boxed: rustls's connection state is ~1 KiB, which plaintext connections need not carry.
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// An upstream connection; the open gauge goes down when the pool drops it.
pub struct CountedConn {
    io: UpstreamIo,
    metrics: Arc<HttpMetrics>,
}

impl Drop for CountedConn {
    fn drop(&mut self) {
        self.metrics.upstream_open.dec();
    }
}

impl Connection for CountedConn {
    fn connected(&self) -> Connected {
        match &self.io {
            UpstreamIo::Plain(io) => io.connected(),
            UpstreamIo::Tls(io) => {
                let (tcp, tls) = io.inner().get_ref();
                let connected = tcp.connected();
                if tls.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

/// Forwards a method to whichever stream the connection is.
macro_rules! either_io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            UpstreamIo::Plain($io) => $e,
            UpstreamIo::Tls($io) => {
                let $io = &mut **$io;
                $e
            }
        }
    };
}

impl Read for CountedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        either_io!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl Write for CountedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either_io!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either_io!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either_io!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either_io!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}
