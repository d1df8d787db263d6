//! One client connection's life: accepted by its worker's listener (within the descriptor
//! budget), admitted, served by the HTTP/1.1 fast path or by hyper (HTTP/2, and what the fast
//! path hands over), and wound down at shutdown: a request already queued is still answered, one
//! awaited a moment, an open one finished with `Connection: close` or GOAWAY.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use svcd_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::forward::{self, ClientConn, ClientTls};
use super::framing::{ClientIo, ConnWatch};
use super::{h1, HttpContext, HttpSettings};

/// A listener's TLS: `None` serves plaintext. Swapped by a reload that changes the listener's
/// `tls` table; each connection loads it once, at accept.
pub(super) type ListenerTls = Arc<ArcSwap<Option<Arc<ServerTls>>>>;

pub(super) async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    tls: ListenerTls,
    stop: CancellationToken,
) {
    let label = match listener.local_addr() {
        Ok(addr) => format!("http/{addr}"),
        Err(_) => "http/?".into(),
    };
    let refused = ctx.fds.refusals(&label);
    let share = crate::fds::ListenerShare::new();
    accept_connections(&listener, &ctx, &tls, &stop, &refused, &share).await;
    ctx.fds.forget(&label);
}

async fn accept_connections(
    listener: &TcpListener,
    ctx: &Arc<HttpContext>,
    tls: &ListenerTls,
    stop: &CancellationToken,
    refused: &prometheus::IntCounter,
    share: &Arc<crate::fds::ListenerShare>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => {
                // Requests already queued get served (one each), not reset.
                for (stream, peer) in crate::drain_accept_queue(listener).await {
                    admit(ctx, tls, stream, peer, stop, refused, share, Admitted::AtClose);
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "HTTP proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        admit(ctx, tls, stream, peer, stop, refused, share, Admitted::Open);
    }
}

/// Where a connection stands in the daemon's shutdown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    Serving,
    /// The shutdown came before the client's first byte was read. hyper's graceful shutdown
    /// would close the connection at once, unread request and all (a reset, as unread data is
    /// discarded), so it waits for the first request, bounded by the header read timeout and
    /// the drain timeout.
    AwaitingFirstRequest,
    /// The current request is answered with `Connection: close` (HTTP/1) or GOAWAY (HTTP/2).
    Draining,
}

/// How often a connection awaiting its first request looks again.
const FIRST_BYTE_POLL: Duration = Duration::from_millis(5);

/// When a client connection was accepted: while the listener was open, or out of its queue as
/// it closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admitted {
    Open,
    /// The shutdown already began: hyper's graceful shutdown would close the connection before
    /// reading the request it carries, so HTTP/1 serves one request without keep-alive instead.
    AtClose,
}

#[allow(clippy::too_many_arguments)]
fn admit(
    ctx: &Arc<HttpContext>,
    tls: &ListenerTls,
    stream: TcpStream,
    peer: SocketAddr,
    stop: &CancellationToken,
    refused: &prometheus::IntCounter,
    share: &Arc<crate::fds::ListenerShare>,
    admitted: Admitted,
) {
    let Some(permit) = ctx.fds.try_acquire(share, 1) else {
        refused.inc();
        drop(stream); // closed at once: the descriptor budget is spent
        return;
    };
    // Spawned as it is, with no wrapping block: every layer of async state around an idle
    // connection is memory it holds.
    let tls = tls.load_full();
    if let Some(tls) = tls.as_ref() {
        ctx.phase.spawn(serve_tls_connection(
            ctx.clone(),
            tls.clone(),
            stream,
            peer,
            stop.clone(),
            admitted,
            permit,
        ));
        return;
    }
    ctx.phase.spawn(serve_connection(
        ctx.clone(),
        stream,
        None,
        false,
        peer,
        stop.clone(),
        admitted,
        permit,
    ));
}

/// A client connection, plaintext or after its TLS handshake (`tls`): the HTTP/1.1 fast path
/// unless it is off or the client chose `h2` in ALPN, then hyper for HTTP/2 and for what the
/// fast path hands over.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: h1::client::ClientStream>(
    ctx: Arc<HttpContext>,
    stream: S,
    tls: Option<ClientTls>,
    h2: bool,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
    _permit: crate::fds::FdPermit,
) {
    // TCP_NODELAY is inherited from the listener (and by the queue drained at close).
    ctx.metrics.downstream_open.inc();
    let settings = ctx.settings.load_full();
    let handoff = if settings.l7.http1_fast_path && !h2 {
        let last_request = admitted == Admitted::AtClose;
        match h1::serve(
            &ctx,
            settings.clone(),
            stream,
            tls.as_ref(),
            peer.ip(),
            &stop,
            last_request,
        )
        .await
        {
            h1::Ended::Closed => None,
            h1::Ended::Handoff(stream, read) => Some((stream, read.freeze())),
        }
    } else {
        Some((stream, bytes::Bytes::new()))
    };
    let https = tls.is_some();
    if let Some((stream, read)) = handoff {
        hyper_boxed(&ctx, &settings, stream, read, peer, stop, admitted, tls).await;
    }
    ctx.metrics.downstream_open.dec();
    debug!(%peer, https, "HTTP client connection closed");
}

/// An HTTPS connection: the handshake (bounded by the listener's `handshake_timeout`), then
/// [`serve_connection`] with what the handshake told.
async fn serve_tls_connection(
    ctx: Arc<HttpContext>,
    tls: Arc<ServerTls>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
    permit: crate::fds::FdPermit,
) {
    let accepted = tokio::select! {
        a = tls.accept(stream, peer) => a,
        _ = ctx.hard_stop.cancelled() => None,
    };
    let Some(accepted) = accepted else { return };
    let allowed = match &accepted.peer {
        Some(identity) => identity.allowed(tls.allow()),
        None => tls.allow().is_empty(),
    };
    let client_tls = ClientTls {
        xfcc: accepted
            .peer
            .as_ref()
            .and_then(|p| HeaderValue::from_str(&p.xfcc(None)).ok()),
        denied: !allowed,
        identity: accepted.peer,
    };
    serve_connection(
        ctx,
        accepted.stream,
        Some(client_tls),
        accepted.h2,
        peer,
        stop,
        admitted,
        permit,
    )
    .await;
}

/// [`serve_with_hyper`], made and boxed outside the caller's async frame: a fast-path
/// connection's task then holds no room for hyper's connection state.
#[allow(clippy::too_many_arguments)]
fn hyper_boxed<'a, S>(
    ctx: &'a Arc<HttpContext>,
    settings: &'a HttpSettings,
    stream: S,
    read: bytes::Bytes,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
    tls: Option<ClientTls>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_with_hyper(
        ctx, settings, stream, read, peer, stop, admitted, tls,
    ))
}

/// hyper serves the connection, starting with `read`, the bytes the fast path had read.
#[allow(clippy::too_many_arguments)]
async fn serve_with_hyper<S>(
    ctx: &Arc<HttpContext>,
    settings: &HttpSettings,
    stream: S,
    read: bytes::Bytes,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
    tls: Option<ClientTls>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = ConnWatch::new();
    let read_any = !read.is_empty();
    let io = TokioIo::new(ClientIo::new(
        stream,
        read,
        watch.clone(),
        settings.l7.max_header_bytes,
        settings.l7.max_headers,
    ));
    let client = Arc::new(ClientConn {
        watch: watch.clone(),
        ip: HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a header value"),
        streams: Default::default(),
        tls,
    });
    let ledger = client.clone();
    let ctx2 = ctx.clone();
    // Boxed: hyper spawns one task per HTTP/2 stream, and a task's future is moved into place
    // by value; the handler's state machine (~2.6 KiB) is then written once, not on each move.
    let service =
        service_fn(move |req| Box::pin(forward::handle(ctx2.clone(), client.clone(), req)));
    let server = match admitted {
        Admitted::Open => &settings.server,
        Admitted::AtClose => &settings.last_request_server,
    };
    let conn = server.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // Idle: no read or write during a whole check period (a quarter of the idle timeout); a
    // connection is closed after four such periods in a row, so between 1 and 1.25 x
    // idle_timeout after its last byte.
    let idle = settings.l7.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_activity, mut quiet_ticks) = (u64::MAX, 0u32);
    let mut shutdown = match admitted {
        Admitted::Open => Shutdown::Serving,
        Admitted::AtClose => Shutdown::Draining,
    };
    let mut first_byte = tokio::time::interval(FIRST_BYTE_POLL);
    // The activity count before the client's first byte (opening the connection counts one;
    // bytes the fast path read count as the client's).
    let opened = if read_any { u64::MAX } else { watch.activity() };
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "HTTP client connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled(), if shutdown == Shutdown::Serving => {
                if watch.activity() == opened {
                    shutdown = Shutdown::AwaitingFirstRequest;
                } else {
                    conn.as_mut().graceful_shutdown();
                    shutdown = Shutdown::Draining;
                }
            }
            _ = first_byte.tick(), if shutdown == Shutdown::AwaitingFirstRequest => {
                if watch.activity() != opened {
                    conn.as_mut().graceful_shutdown();
                    shutdown = Shutdown::Draining;
                }
            }
            _ = ctx.hard_stop.cancelled() => break,
            _ = ledger.streams.flooded(), if shutdown != Shutdown::Draining => {
                debug!(%peer, "HTTP/2 client cancelled most of its streams; sending GOAWAY");
                conn.as_mut().graceful_shutdown();
                shutdown = Shutdown::Draining;
            }
            _ = tick.tick() => {
                let now = watch.activity();
                // A request still being answered keeps the connection: its own timers (the
                // request timeout, the response body's idle timer) end it if it stalls.
                quiet_ticks = if now == last_activity && !watch.busy() { quiet_ticks + 1 } else { 0 };
                last_activity = now;
                if quiet_ticks >= 4 {
                    debug!(%peer, "HTTP client connection idle; closing");
                    break;
                }
            }
        }
    }
}
