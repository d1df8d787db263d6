//! svcd proxies: traffic to a local port spread over a service's healthy instances.
//!
//! ```text
//! [[proxy.http]] listener ──request──► Router (Host, routes) ──► ServiceBalancer.pick (per request)
//!        └─► hyper: HTTP/1.1 | h2c downstream, pooled HTTP/1.1 | h2 upstream, streamed both ways
//! [[proxy.tcp]] listener ──accept──► ServiceBalancer.pick (round robin) ──connect (next on refusal)
//!        └─► splice(2): socket ─► pipe ─► socket, both directions, half-close propagated
//! [[proxy.udp]] listener ──► flow table (client → instance) ──► connected upstream socket
//! ```
//!
//! * [`http`]: the HTTP proxy (routing, forwarding, smuggling guard, limits, its metrics).
//! * [`balance`]: per-service balancers over the snapshot (round robin, least request, the panic
//!   threshold) with per-instance state that outlives snapshot changes.
//! * [`outlier`]: passive health — failures in a row eject an instance on this node, through the
//!   registry's overlay, so local DNS agrees.
//! * [`pick`]: the lock-free round robin of the UDP listeners (one `AtomicUsize`, `Relaxed`,
//!   empty-set guard).
//! * [`splice`]: zero-copy forwarding, pipes pooled per thread.
//! * [`tcp`], [`udp`]: the L4 listeners.
//! * [`metrics`]: per service and endpoint; handles resolved when the snapshot changes.
//!
//! Listeners are reconfigured in place on reload: a new target or timeout applies to the next
//! connection or request, a removed listener stops accepting while its connections finish, a new
//! one binds.

pub mod balance;
pub mod http;
pub mod metrics;
pub mod outlier;
pub mod pick;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use svcd_config::{Balance, L4ListenerConfig, OutlierConfig, ProxyConfig};
use svcd_registry::SnapshotReader;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use balance::BalancerTable;
use metrics::EndpointMetricsCache;
pub use metrics::ProxyMetrics;
use outlier::OutlierDetector;
use pick::RoundRobin;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{key}: cannot bind {addr}: {source}")]
    Bind {
        key: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Settings every L4 connection reads; swapped whole on reload.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_connections: usize,
    pub splice: bool,
    pub connect_timeout: Duration,
    pub connect_attempts: usize,
    /// How long a connection to an instance that left the registry may continue.
    pub drain_timeout: Duration,
    /// Passive health and the panic threshold, shared with the HTTP proxy.
    pub outlier: OutlierConfig,
}

impl ProxySettings {
    pub fn new(config: &ProxyConfig, drain_timeout: Duration) -> Self {
        ProxySettings {
            max_connections: config.max_connections,
            splice: config.splice,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            drain_timeout,
            outlier: config.outlier.clone(),
        }
    }
}

/// Shared by all L4 listeners and their connections.
pub struct ProxyContext {
    pub snapshot: SnapshotReader,
    pub metrics: Arc<ProxyMetrics>,
    pub settings: ArcSwap<ProxySettings>,
    /// Open TCP connections across listeners, against `max_connections`.
    pub active: AtomicUsize,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain time is over: open connections close.
    pub hard_stop: CancellationToken,
    /// TCP listeners' balancers by service and port (round robin): the panic threshold and the
    /// outlier records that connect failures feed.
    pub balancers: BalancerTable,
    /// Ejects instances whose connects keep failing (shared with the HTTP proxy).
    pub outlier: Arc<OutlierDetector>,
}

/// One L4 listener, TCP or UDP. The config is swapped on reload (new target, idle timeout)
/// without touching open connections or flows.
pub struct ListenerState {
    pub config: ArcSwap<L4ListenerConfig>,
    pub rr: RoundRobin,
    pub metrics: ArcSwap<EndpointMetricsCache>,
    /// Cancelled when a reload removes the listener or the daemon stops: stops accepting.
    pub stop: CancellationToken,
}

fn service_label(config: &L4ListenerConfig) -> String {
    format!("{}.{}", config.target.service, config.target.namespace)
}

impl ListenerState {
    pub fn new(config: L4ListenerConfig) -> Self {
        ListenerState {
            metrics: ArcSwap::from_pointee(EndpointMetricsCache::new(service_label(&config))),
            config: ArcSwap::from_pointee(config),
            rr: RoundRobin::default(),
            stop: CancellationToken::new(),
        }
    }

    pub fn reconfigure(&self, config: L4ListenerConfig) {
        if self.config.load().target != config.target {
            self.metrics
                .store(Arc::new(EndpointMetricsCache::new(service_label(&config))));
        }
        self.config.store(Arc::new(config));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn key(self) -> &'static str {
        match self {
            Transport::Tcp => "proxy.tcp",
            Transport::Udp => "proxy.udp",
        }
    }
}

/// The running L4 listeners, by transport and listen address. The mutex guards only the set of
/// listeners, taken at start and on reload, never by a connection.
pub struct L4Proxy {
    pub ctx: Arc<ProxyContext>,
    listeners: Mutex<HashMap<(Transport, SocketAddr), Arc<ListenerState>>>,
}

impl L4Proxy {
    /// Binds every configured listener (an address that cannot be bound is an error naming its
    /// key) and starts serving.
    pub async fn start(
        config: &ProxyConfig,
        drain_timeout: Duration,
        snapshot: SnapshotReader,
        outlier: Arc<OutlierDetector>,
        prometheus: &prometheus::Registry,
    ) -> Result<L4Proxy, ProxyError> {
        let proxy = L4Proxy {
            ctx: Arc::new(ProxyContext {
                snapshot,
                metrics: ProxyMetrics::new(prometheus)?,
                settings: ArcSwap::from_pointee(ProxySettings::new(config, drain_timeout)),
                active: AtomicUsize::new(0),
                tracker: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
                balancers: BalancerTable::new(
                    Balance::RoundRobin,
                    Default::default(),
                    http::metrics::HttpMetrics::detached(),
                ),
                outlier,
            }),
            listeners: Mutex::new(HashMap::new()),
        };
        match proxy.apply(config, drain_timeout).await.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(proxy),
        }
    }

    /// Applies a new proxy configuration; returns bind failures (the rest is applied).
    pub async fn reconfigure(
        &self,
        config: &ProxyConfig,
        drain_timeout: Duration,
    ) -> Vec<ProxyError> {
        self.apply(config, drain_timeout).await
    }

    async fn apply(&self, config: &ProxyConfig, drain_timeout: Duration) -> Vec<ProxyError> {
        self.ctx
            .settings
            .store(Arc::new(ProxySettings::new(config, drain_timeout)));
        let wanted: HashMap<(Transport, SocketAddr), (usize, &L4ListenerConfig)> = config
            .tcp
            .iter()
            .enumerate()
            .map(|(i, l)| ((Transport::Tcp, l.listen), (i, l)))
            .chain(
                config
                    .udp
                    .iter()
                    .enumerate()
                    .map(|(i, l)| ((Transport::Udp, l.listen), (i, l))),
            )
            .collect();
        // Keep and update, or remove; collect what is new.
        let mut to_bind = Vec::new();
        {
            let mut running = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            running.retain(|key, state| match wanted.get(key) {
                Some((_, l)) => {
                    state.reconfigure((*l).clone());
                    true
                }
                None => {
                    info!(addr = %key.1, transport = key.0.key(), "proxy listener removed; open connections continue");
                    state.stop.cancel();
                    false
                }
            });
            for (key, (i, l)) in &wanted {
                if !running.contains_key(key) {
                    to_bind.push((key.0, *i, (*l).clone()));
                }
            }
        }
        let mut errors = Vec::new();
        for (transport, i, listener) in to_bind {
            let addr = listener.listen;
            let state = Arc::new(ListenerState::new(listener));
            let started = match transport {
                Transport::Tcp => bind_nodelay(addr)
                    .await
                    .map(|l| tokio::spawn(tcp::serve(l, state.clone(), self.ctx.clone()))),
                Transport::Udp => UdpSocket::bind(addr)
                    .await
                    .map(|s| tokio::spawn(udp::serve(s, state.clone(), self.ctx.clone()))),
            };
            match started {
                Ok(_) => {
                    info!(%addr, transport = transport.key(), "proxy listening");
                    self.listeners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((transport, addr), state);
                }
                Err(source) => errors.push(ProxyError::Bind {
                    key: format!("{}[{i}].listen", transport.key()),
                    addr,
                    source,
                }),
            }
        }
        errors
    }

    /// Stops accepting on every listener; open connections continue.
    pub fn stop_accepting(&self) {
        for state in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            state.stop.cancel();
        }
    }

    /// Waits for open connections up to `timeout`, then closes what is left.
    pub async fn drain(&self, timeout: Duration) {
        self.stop_accepting();
        drain_tasks(&self.ctx.tracker, &self.ctx.hard_stop, timeout, "L4 proxy").await;
    }
}

/// A TCP listener whose accepted sockets inherit `TCP_NODELAY` (Linux copies it from the
/// listening socket), sparing a `setsockopt` per connection.
pub(crate) async fn bind_nodelay(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    Ok(listener)
}

/// Waits up to `timeout` for the tracked connection tasks, then cancels `hard_stop` (open
/// connections close) and waits for them to finish.
pub(crate) async fn drain_tasks(
    tracker: &TaskTracker,
    hard_stop: &CancellationToken,
    timeout: Duration,
    what: &str,
) {
    tracker.close();
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        warn!(
            proxy = what,
            "drain timeout reached; closing open connections"
        );
    }
    hard_stop.cancel();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = super::bind_nodelay("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
