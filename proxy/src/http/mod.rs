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
//! * `serve`: one client connection's life: accept, admission, the fast path or hyper, shutdown.
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
mod outcome;
mod resets;
pub mod route;
mod serve;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use svcd_config::{L7Config, ProxyConfig, TlsServerConfig};
use svcd_lb::{BalancerTable, LoadBalancer, PortRule};
use svcd_lifecycle::Phase;
use svcd_registry::SnapshotReader;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::fds::FdBudget;
use crate::ProxyError;
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
    /// The HTTP proxy's phase: listeners, connections and upgraded tunnels run in it, so
    /// shutdown drains them and then ends the rest.
    pub phase: Phase,
    /// The phase's stop (cancelled when the drain time is over), as a token for code that holds
    /// one.
    pub hard_stop: CancellationToken,
    /// `pool_max_idle_per_host` and `pool_idle_timeout`, for the workers' pool keepers
    /// ([`h1::pool::upkeep`]): a reload applies them to idle connections at once.
    pub pool_limits: tokio::sync::watch::Sender<(usize, Duration)>,
    /// TLS to instances (`[[proxy.upstream_tls]]`): such services skip the fast path and the
    /// bridge, and get pools of their own.
    pub tls: Arc<crate::ProxyTls>,
}

/// One running HTTP listener.
struct RunningListener {
    /// Cancelled when a reload removes the listener.
    stop: CancellationToken,
    /// Its TLS, read by its accept loops; a reload that changes the `tls` table swaps it.
    tls: serve::ListenerTls,
    /// The `tls` table it was built from, to see whether a reload changed it.
    spec: Option<TlsServerConfig>,
}

/// The running HTTP listeners by address; each has its own stop token (reload removes one).
pub struct HttpProxy {
    pub ctx: Arc<HttpContext>,
    /// The threads listeners run on: each address is bound once per worker.
    workers: Arc<crate::workers::ProxyWorkers>,
    /// Guards only the set of listeners (start, reload), never a request.
    listeners: Mutex<HashMap<SocketAddr, RunningListener>>,
    /// The TLS series every HTTPS listener reports into.
    tls_metrics: svcd_tls::TlsMetrics,
}

impl HttpProxy {
    /// Each argument is a different owner's (the daemon's config, lb, budgets, threads,
    /// phase and metric registries); a struct bundling them would only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &ProxyConfig,
        domain: &str,
        lb: &Arc<LoadBalancer>,
        fds: &Arc<FdBudget>,
        workers: &Arc<crate::workers::ProxyWorkers>,
        phase: &Phase,
        prometheus: &prometheus::Registry,
        tls: &Arc<crate::ProxyTls>,
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
                            &tls.upstreams(),
                        ))
                    })
                    .collect(),
                metrics,
                table,
                fds: fds.clone(),
                hard_stop: phase.token(),
                phase: phase.clone(),
                pool_limits: tokio::sync::watch::Sender::new(pool_limits(&config.l7)),
                tls: tls.clone(),
            }),
            listeners: Mutex::new(HashMap::new()),
            workers: workers.clone(),
            tls_metrics: tls.metrics.clone(),
        };
        workers.spawn_each(|stop| {
            h1::pool::upkeep(lb.departures(), proxy.ctx.pool_limits.subscribe(), stop)
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
                &ctx.tls.upstreams(),
            )));
        }
        self.bind_missing(config).await
    }

    /// The TLS of listener `i` as `spec` describes it (`None`: plaintext).
    fn listener_tls(
        &self,
        i: usize,
        addr: SocketAddr,
        spec: &Option<TlsServerConfig>,
    ) -> Result<Option<Arc<svcd_tls::ServerTls>>, ProxyError> {
        let Some(spec) = spec else { return Ok(None) };
        Ok(Some(svcd_tls::ServerTls::new(
            format!("http/{addr}"),
            format!("proxy.http[{i}].tls"),
            spec,
            svcd_tls::Alpn::Http,
            &self.tls_metrics,
        )?))
    }

    /// The running listeners' TLS, for the daemon's reloader.
    pub fn tls(&self) -> Vec<Arc<svcd_tls::ServerTls>> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|l| l.tls.load_full().as_ref().clone())
            .collect()
    }

    async fn bind_missing(&self, config: &ProxyConfig) -> Vec<ProxyError> {
        let mut to_bind = Vec::new();
        let mut errors = Vec::new();
        {
            let mut running = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            running.retain(|addr, l| {
                let keep = config.http.iter().any(|c| c.listen == *addr);
                if !keep {
                    info!(%addr, "HTTP listener removed; open connections finish");
                    l.stop.cancel();
                    if let Some(tls) = l.tls.load().as_ref() {
                        tls.forget();
                    }
                }
                keep
            });
            for (i, l) in config.http.iter().enumerate() {
                match running.get_mut(&l.listen) {
                    None => to_bind.push((i, l.listen, l.tls.clone())),
                    // A changed `tls` table applies to the next connection; a bad one keeps the
                    // old (the error says why).
                    Some(r) if r.spec != l.tls => match self.listener_tls(i, l.listen, &l.tls) {
                        Ok(tls) => {
                            if let Some(old) = r.tls.load().as_ref() {
                                old.forget();
                            }
                            if let Some(new) = &tls {
                                new.republish();
                            }
                            r.tls.store(Arc::new(tls));
                            r.spec = l.tls.clone();
                        }
                        Err(e) => errors.push(e),
                    },
                    Some(_) => {}
                }
            }
        }
        for (i, addr, spec) in to_bind {
            let tls = match self.listener_tls(i, addr, &spec) {
                Ok(tls) => Arc::new(ArcSwap::from_pointee(tls)),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            // A child of hard_stop: a connection waiting on its listener's stop also sees the end
            // of the drain.
            let stop = self.ctx.hard_stop.child_token();
            let bound = self.workers.listen(addr, &self.ctx.phase, |listener| {
                serve::accept_loop(listener, self.ctx.clone(), tls.clone(), stop.clone())
            });
            match bound {
                Ok(()) => {
                    info!(%addr, workers = self.workers.count(), tls = spec.is_some(), "HTTP proxy listening");
                    self.listeners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(addr, RunningListener { stop, tls, spec });
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
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            listener.stop.cancel();
        }
    }

    /// Waits for open connections up to `timeout`, then closes what is left.
    pub async fn drain(&self, timeout: Duration) {
        self.stop_accepting();
        crate::drain(&self.ctx.phase, timeout).await;
    }
}
