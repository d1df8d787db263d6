//! The HTTP proxy: requests, not connections, balanced over a service's healthy instances.
//!
//! ```text
//! client ──TCP──► ClientIo (framing guard, idle stamp) ──► hyper auto (HTTP/1.1 | h2c)
//!   └─► forward::handle: Host/:authority ─► Router ─► snapshot service ─► ServiceBalancer.pick
//!         ─► rewrite headers ─► bodiless to an HTTP/1.1 instance: h1::bridge (the fast
//!            path's pooled connections) | else Upstreams (hyper-util h1 or h2 pool)
//!         ─► response streamed back (trailers included); 101 → tunnel both upgraded streams
//! ```
//!
//! * [`h1`]: the HTTP/1.1 fast path, its per-worker upstream pool, and the bridge that sends
//!   hyper's bodiless requests over that pool.
//! * [`route`]: explicit routes, then service names from the Host.
//! * [`framing`]: the request-smuggling guard and activity stamp under hyper.
//! * [`host`]: the request's one host (duplicate Host, absolute-form, `:authority`, syntax).
//! * [`headers`]: hop-by-hop removal, X-Forwarded-*, Via.
//! * [`upstream`]: the pooled hyper-util clients (bodies, upgrades, HTTP/2 instances).
//! * [`forward`]: one request, with retries and timeouts.
//! * [`metrics`], [`body`]: accounting that ends when the response body does.

pub mod body;
pub mod forward;
pub mod framing;
pub mod h1;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod route;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use svcd_config::{L7Config, ProxyConfig};
use svcd_lb::{BalancerTable, LoadBalancer, PortRule};
use svcd_registry::SnapshotReader;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::fds::FdBudget;
use crate::ProxyError;
use forward::ClientConn;
use framing::{ClientIo, ConnWatch};
use metrics::{HttpMetrics, HttpSlots};
use route::Router;
use upstream::Upstreams;

/// Whether an instance registered with `protocol` is spoken to in HTTP/1.1 (`http`, or a `tcp`
/// instance an HTTP route names); `h2` and `grpc` instances get HTTP/2.
pub(crate) fn speaks_h1(protocol: svcd_config::Protocol) -> bool {
    matches!(
        protocol,
        svcd_config::Protocol::Http | svcd_config::Protocol::Tcp
    )
}

/// Everything a request reads that a reload can change; swapped whole. (The balancers are not
/// here: they outlive reloads, see [`HttpContext::table`].)
pub struct HttpSettings {
    pub router: Router,
    pub l7: L7Config,
    /// `proxy.connect_timeout`, for the fast path's upstream connections.
    pub connect_timeout: Duration,
    /// hyper's connection builder, carrying the limits.
    server: auto::Builder<TokioExecutor>,
    /// The same without HTTP/1 keep-alive, for connections taken from the accept queue at
    /// shutdown (see [`Admitted::AtClose`]).
    last_request_server: auto::Builder<TokioExecutor>,
}

impl HttpSettings {
    fn new(config: &ProxyConfig, domain: &str) -> Self {
        let l7 = &config.l7;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(l7.header_read_timeout)
            .max_buf_size(l7.max_header_bytes)
            .max_headers(l7.max_headers);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l7.max_concurrent_streams)
            .max_pending_accept_reset_streams(l7.max_pending_accept_reset_streams)
            .max_header_list_size(l7.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        let mut last_request_server = server.clone();
        last_request_server.http1().keep_alive(false);
        HttpSettings {
            router: Router::new(&config.routes, domain, l7.request_timeout, l7.retries),
            l7: l7.clone(),
            connect_timeout: config.connect_timeout,
            server,
            last_request_server,
        }
    }
}

/// What the fast path's pool keeps: at most this many idle connections per address, for at most
/// this long.
fn pool_limits(l7: &L7Config) -> (usize, Duration) {
    (l7.pool_max_idle_per_host, l7.pool_idle_timeout)
}

/// Shared by the HTTP listeners and every request.
pub struct HttpContext {
    pub snapshot: SnapshotReader,
    pub settings: ArcSwap<HttpSettings>,
    /// hyper's upstream pools, one per proxy worker: a request uses its own worker's, so the
    /// pooled connections' tasks run on the thread that uses them (no cross-thread wake-ups).
    pub upstreams: Vec<ArcSwap<Upstreams>>,
    pub metrics: Arc<HttpMetrics>,
    /// The HTTP balancers, for the daemon's lifetime: a reload changes their policy in place and
    /// keeps in-flight counts, failure runs and ejections.
    pub table: Arc<BalancerTable<HttpSlots>>,
    /// The proxies' descriptor budget: every client connection takes one.
    pub fds: Arc<FdBudget>,
    /// Connections and upgraded tunnels, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain time is over.
    pub hard_stop: CancellationToken,
    /// `pool_max_idle_per_host` and `pool_idle_timeout`, for the workers' pool keepers
    /// ([`h1::pool::upkeep`]): a reload applies them to idle connections at once.
    pub pool_limits: tokio::sync::watch::Sender<(usize, Duration)>,
}

/// The running HTTP listeners by address; each has its own stop token (reload removes one).
pub struct HttpProxy {
    pub ctx: Arc<HttpContext>,
    /// The threads listeners run on: each address is bound once per worker.
    workers: Arc<crate::workers::ProxyWorkers>,
    /// Guards only the set of listeners (start, reload), never a request.
    listeners: Mutex<HashMap<SocketAddr, CancellationToken>>,
}

impl HttpProxy {
    pub async fn start(
        config: &ProxyConfig,
        domain: &str,
        lb: &Arc<LoadBalancer>,
        fds: &Arc<FdBudget>,
        workers: &Arc<crate::workers::ProxyWorkers>,
        prometheus: &prometheus::Registry,
    ) -> Result<HttpProxy, ProxyError> {
        let metrics = HttpMetrics::new(prometheus)?;
        let table = BalancerTable::new(
            lb,
            HttpSlots {
                metrics: metrics.clone(),
            },
            PortRule::Http,
        );
        table.set_policies(config.l7.balance, config.l7.balance_by_service.clone());
        let proxy = HttpProxy {
            ctx: Arc::new(HttpContext {
                snapshot: lb.reader().clone(),
                settings: ArcSwap::from_pointee(HttpSettings::new(config, domain)),
                upstreams: (0..workers.count())
                    .map(|_| {
                        ArcSwap::from_pointee(Upstreams::new(
                            &config.l7,
                            config.connect_timeout,
                            metrics.clone(),
                        ))
                    })
                    .collect(),
                metrics,
                table,
                fds: fds.clone(),
                tracker: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
                pool_limits: tokio::sync::watch::Sender::new(pool_limits(&config.l7)),
            }),
            listeners: Mutex::new(HashMap::new()),
            workers: workers.clone(),
        };
        workers.spawn_each(|| {
            h1::pool::upkeep(
                lb.departures(),
                proxy.ctx.pool_limits.subscribe(),
                proxy.ctx.hard_stop.clone(),
            )
        });
        match proxy.bind_missing(config).await.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(proxy),
        }
    }

    /// Applies a new configuration: settings swapped for the next request, listeners added and
    /// removed (a removed one stops accepting; its connections finish gracefully).
    pub async fn reconfigure(&self, config: &ProxyConfig, domain: &str) -> Vec<ProxyError> {
        let ctx = &self.ctx;
        ctx.settings
            .store(Arc::new(HttpSettings::new(config, domain)));
        ctx.pool_limits.send_if_modified(|limits| {
            let new = pool_limits(&config.l7);
            std::mem::replace(limits, new) != new
        });
        ctx.table
            .set_policies(config.l7.balance, config.l7.balance_by_service.clone());
        for upstreams in &ctx.upstreams {
            upstreams.store(Arc::new(Upstreams::new(
                &config.l7,
                config.connect_timeout,
                ctx.metrics.clone(),
            )));
        }
        self.bind_missing(config).await
    }

    async fn bind_missing(&self, config: &ProxyConfig) -> Vec<ProxyError> {
        let mut to_bind = Vec::new();
        {
            let mut running = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            running.retain(|addr, stop| {
                let keep = config.http.iter().any(|l| l.listen == *addr);
                if !keep {
                    info!(%addr, "HTTP listener removed; open connections finish");
                    stop.cancel();
                }
                keep
            });
            for (i, l) in config.http.iter().enumerate() {
                if !running.contains_key(&l.listen) {
                    to_bind.push((i, l.listen));
                }
            }
        }
        let mut errors = Vec::new();
        for (i, addr) in to_bind {
            // A child of hard_stop: a connection waiting on its listener's stop also sees the end
            // of the drain.
            let stop = self.ctx.hard_stop.child_token();
            let bound = self.workers.listen(addr, &self.ctx.tracker, |listener| {
                accept_loop(listener, self.ctx.clone(), stop.clone())
            });
            match bound {
                Ok(()) => {
                    info!(%addr, workers = self.workers.count(), "HTTP proxy listening");
                    self.listeners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(addr, stop);
                }
                Err(cause) => errors.push(ProxyError::Bind {
                    key: format!("proxy.http[{i}].listen"),
                    addr,
                    cause,
                }),
            }
        }
        errors
    }

    /// Stops accepting; open connections are asked to finish (HTTP/2 GOAWAY, HTTP/1 close after
    /// the current response).
    pub fn stop_accepting(&self) {
        for stop in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            stop.cancel();
        }
    }

    /// Waits for open connections up to `timeout`, then closes what is left.
    pub async fn drain(&self, timeout: Duration) {
        self.stop_accepting();
        crate::drain_tasks(
            &self.ctx.tracker,
            &self.ctx.hard_stop,
            timeout,
            "HTTP proxy",
        )
        .await;
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<HttpContext>, stop: CancellationToken) {
    let label = match listener.local_addr() {
        Ok(addr) => format!("http/{addr}"),
        Err(_) => "http/?".into(),
    };
    let refused = ctx.fds.refusals(&label);
    let share = crate::fds::ListenerShare::new();
    accept_connections(&listener, &ctx, &stop, &refused, &share).await;
    ctx.fds.forget(&label);
}

async fn accept_connections(
    listener: &TcpListener,
    ctx: &Arc<HttpContext>,
    stop: &CancellationToken,
    refused: &prometheus::IntCounter,
    share: &Arc<crate::fds::ListenerShare>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => {
                // Requests already queued get served (one each), not reset.
                for (stream, peer) in crate::drain_accept_queue(listener).await {
                    admit(ctx, stream, peer, stop, refused, share, Admitted::AtClose);
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
        admit(ctx, stream, peer, stop, refused, share, Admitted::Open);
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

fn admit(
    ctx: &Arc<HttpContext>,
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
    ctx.tracker.spawn(serve_connection(
        ctx.clone(),
        stream,
        peer,
        stop.clone(),
        admitted,
        permit,
    ));
}

async fn serve_connection(
    ctx: Arc<HttpContext>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
    _permit: crate::fds::FdPermit,
) {
    // TCP_NODELAY is inherited from the listener (and by the queue drained at close).
    ctx.metrics.downstream_open.inc();
    let settings = ctx.settings.load_full();
    let handoff = if settings.l7.http1_fast_path {
        let last_request = admitted == Admitted::AtClose;
        match h1::serve(
            &ctx,
            settings.clone(),
            stream,
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
    if let Some((stream, read)) = handoff {
        hyper_boxed(&ctx, &settings, stream, read, peer, stop, admitted).await;
    }
    ctx.metrics.downstream_open.dec();
    debug!(%peer, "HTTP client connection closed");
}

/// [`serve_with_hyper`], made and boxed outside the caller's async frame: a fast-path
/// connection's task then holds no room for hyper's connection state.
fn hyper_boxed<'a>(
    ctx: &'a Arc<HttpContext>,
    settings: &'a HttpSettings,
    stream: TcpStream,
    read: bytes::Bytes,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(serve_with_hyper(
        ctx, settings, stream, read, peer, stop, admitted,
    ))
}

/// hyper serves the connection, starting with `read`, the bytes the fast path had read.
async fn serve_with_hyper(
    ctx: &Arc<HttpContext>,
    settings: &HttpSettings,
    stream: TcpStream,
    read: bytes::Bytes,
    peer: SocketAddr,
    stop: CancellationToken,
    admitted: Admitted,
) {
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
    });
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
