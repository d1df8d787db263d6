//! svcd proxies: traffic to a local port spread over a service's healthy instances.
//!
//! ```text
//! [[proxy.http]] listener ──request──► Router (Host, routes) ──► ServiceBalancer.pick (per request)
//!        └─► hyper: HTTP/1.1 | h2c downstream, pooled HTTP/1.1 | h2 upstream, streamed both ways
//! [[proxy.tcp]] listener ──accept──► ServiceBalancer.pick ──connect (next on refusal)
//!        └─► splice(2): socket ─► pipe ─► socket, both directions, half-close propagated
//! [[proxy.udp]] listener ──► flow table (client → instance, picked by the same balancer)
//! ```
//!
//! Selection, panic, weights and passive health belong to `svcd-lb`: both planes hold a
//! [`svcd_lb::BalancerTable`] of their own (their per-endpoint data differs) over the one
//! [`svcd_lb::LoadBalancer`], and report each attempt's outcome to it — only the backend's own
//! faults count as failures.
//!
//! * [`http`]: the HTTP proxy (routing, forwarding, smuggling guard, limits, its metrics).
//! * [`splice`]: zero-copy forwarding, pipes pooled per thread.
//! * [`tcp`], [`udp`]: the L4 listeners.
//! * [`metrics`]: per listener, service and endpoint; handles resolved when the snapshot changes.
//! * [`fds`]: the descriptor budget every client connection and UDP flow takes from, so the
//!   admin API and DNS keep a reserve.
//!
//! Listeners are reconfigured in place on reload: a new target or timeout applies to the next
//! connection or request, a removed listener stops accepting while its connections finish, a new
//! one binds.

pub mod fds;
pub mod http;
pub mod metrics;
pub mod splice;
pub mod tcp;
pub mod udp;
pub mod workers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use svcd_config::{L4ListenerConfig, ProxyConfig, ProxyTarget};
use svcd_lb::{BalancerTable, LoadBalancer, PortRule, ServiceName};
use svcd_lifecycle::Phase;
use svcd_registry::SnapshotReader;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use metrics::ListenerMetrics;
pub use metrics::{L4Slots, ProxyMetrics, Transport};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The cause is in the message, not a source: reloads log the message alone, and a chain
    /// printed by `main` would say it twice.
    #[error("{key}: cannot bind {addr}: {cause}")]
    Bind {
        key: String,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener's certificates, key or CA could not be loaded (the listener is not started,
    /// or on reload keeps what it had).
    #[error("{0}")]
    Tls(#[from] svcd_tls::TlsError),
}

/// What the HTTP and L4 proxies share of TLS: the series they count into and the services whose
/// instances they reach over TLS.
pub struct ProxyTls {
    pub metrics: svcd_tls::TlsMetrics,
    /// By `svc.ns`. Replaced whole by [`ProxyTls::apply`] (one writer: start and reload); read
    /// per connection to such a service (lock-free).
    upstream: ArcSwap<HashMap<String, Arc<svcd_tls::UpstreamTls>>>,
}

impl ProxyTls {
    pub fn new(metrics: svcd_tls::TlsMetrics) -> Arc<ProxyTls> {
        Arc::new(ProxyTls {
            metrics,
            upstream: ArcSwap::from_pointee(HashMap::new()),
        })
    }

    /// The TLS to `service`'s (`svc.ns`) instances, if it has any.
    #[inline]
    pub fn upstream(&self, service: &str) -> Option<Arc<svcd_tls::UpstreamTls>> {
        let table = self.upstream.load();
        if table.is_empty() {
            return None;
        }
        table.get(service).cloned()
    }

    /// Every service's upstream TLS (for the HTTP pools and the reloader).
    pub fn upstreams(&self) -> Vec<Arc<svcd_tls::UpstreamTls>> {
        self.upstream.load().values().cloned().collect()
    }

    /// Builds the entries `specs` adds or changes (unchanged ones are kept; their files are
    /// re-read by the reloader). An entry whose files do not load is an error; on reload it
    /// keeps what it had.
    pub fn apply(&self, specs: &[svcd_config::UpstreamTlsConfig]) -> Vec<ProxyError> {
        let old = self.upstream.load_full();
        let mut errors = Vec::new();
        let mut table = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let service = format!("{}.{}", spec.service, spec.namespace);
            let kept = old.get(&service).filter(|t| t.spec() == spec).cloned();
            let entry = match kept {
                Some(t) => t,
                None => match svcd_tls::UpstreamTls::new(
                    format!("proxy.upstream_tls[{i}]"),
                    spec,
                    &self.metrics,
                ) {
                    Ok(t) => {
                        // A changed entry: the old one's client-certificate series goes, the
                        // new one's is set (again, if it had the same name).
                        if let Some(replaced) = old.get(&service) {
                            replaced.forget_expiry();
                            t.republish();
                        }
                        t
                    }
                    Err(e) => {
                        errors.push(e.into());
                        match old.get(&service) {
                            Some(t) => t.clone(),
                            None => continue,
                        }
                    }
                },
            };
            table.insert(service, entry);
        }
        for (service, gone) in old.iter() {
            if !table.contains_key(service) {
                gone.forget();
            }
        }
        self.upstream.store(Arc::new(table));
        errors
    }
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
}

impl ProxySettings {
    pub fn new(config: &ProxyConfig, drain_timeout: Duration) -> Self {
        ProxySettings {
            max_connections: config.max_connections,
            splice: config.splice,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            drain_timeout,
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
    /// The L4 proxy's phase: every listener task, connection task and UDP reply task runs in
    /// it, so shutdown drains them and then ends the rest.
    pub phase: Phase,
    /// The phase's stop (cancelled when the drain time is over: open connections close), as a
    /// token for code that holds one.
    pub hard_stop: CancellationToken,
    /// The daemon's one load balancer: every listener's balancers share its endpoint health.
    pub lb: Arc<LoadBalancer>,
    /// The TLS series SNI passthrough counts into, and TLS to instances.
    pub tls: Arc<ProxyTls>,
}

/// One L4 listener, TCP or UDP. The config is swapped on reload (new target, idle timeout)
/// without touching open connections or flows.
pub struct ListenerState {
    pub config: ArcSwap<L4ListenerConfig>,
    /// This listener's balancers (its own round-robin position, its own per-endpoint metric
    /// handles) over the shared endpoint health, and its target's keys. Replaced when the target
    /// changes, so the old target's series go.
    pub balancers: ArcSwap<ListenerBalancers>,
    pub listener_metrics: ArcSwap<ListenerMetrics>,
    /// Reads ClientHellos for the listener's `sni` routes, and counts what fails (one per
    /// listener, so its series outlive reloads and go with the listener).
    pub passthrough: svcd_tls::Passthrough,
    /// What this listener holds of the proxies' descriptor budget (at most half of it).
    pub fds: Arc<fds::ListenerShare>,
    /// Cancelled when a reload removes the listener or the daemon stops: stops accepting.
    pub stop: CancellationToken,
}

/// A listener's balancer table and its targets, with the lookup keys made once per config so
/// a connection joins no strings.
pub struct ListenerBalancers {
    pub table: Arc<BalancerTable<L4Slots>>,
    /// The listener's own target (`None`: an SNI listener without a service).
    pub default: Option<TargetKeys>,
    /// The `[[proxy.tcp.sni]]` entries' targets, in config order.
    pub sni: Vec<TargetKeys>,
}

/// One target of a listener, with its lookup keys.
pub struct TargetKeys {
    pub target: ProxyTarget,
    /// The snapshot key of the target service.
    pub service: ServiceName,
    /// The table key of the target service and port.
    pub key: Box<str>,
    /// `svcd_proxy_no_healthy_total{listener, service}` of this target.
    pub no_healthy: prometheus::IntCounter,
}

impl ListenerBalancers {
    /// The balancer of one of the listener's targets.
    #[inline]
    pub fn balancer(&self, keys: &TargetKeys) -> Arc<svcd_lb::ServiceBalancer<L4Slots>> {
        let t = &keys.target;
        self.table
            .get_keyed(&keys.key, &t.service, &t.namespace, t.port.as_deref())
    }

    /// The target a connection goes to: the `sni` entry `route` (from
    /// [`L4ListenerConfig::sni_route`]), else the listener's own.
    #[inline]
    pub fn target(&self, route: Option<usize>) -> Option<&TargetKeys> {
        match route {
            Some(i) => self.sni.get(i),
            None => self.default.as_ref(),
        }
    }
}

impl ListenerState {
    pub fn new(config: L4ListenerConfig, ctx: &ProxyContext, transport: Transport) -> Self {
        let (table, metrics) = Self::for_target(&config, ctx, transport);
        ListenerState {
            balancers: ArcSwap::new(table),
            listener_metrics: ArcSwap::from_pointee(metrics),
            passthrough: svcd_tls::Passthrough::new(
                format!("{}/{}", transport.label(), config.listen),
                &ctx.tls.metrics,
            ),
            config: ArcSwap::from_pointee(config),
            fds: fds::ListenerShare::new(),
            stop: CancellationToken::new(),
        }
    }

    /// The lookup keys of the listener's own target and of its SNI routes.
    fn target_keys(
        config: &L4ListenerConfig,
        ctx: &ProxyContext,
        listener: &str,
    ) -> (Option<TargetKeys>, Vec<TargetKeys>) {
        let keys = |t: &ProxyTarget| {
            let service = ServiceName::new(&t.service, &t.namespace);
            TargetKeys {
                no_healthy: ctx.metrics.no_healthy(listener, service.as_str()),
                key: BalancerTable::<L4Slots>::key(&t.service, &t.namespace, t.port.as_deref())
                    .into(),
                service,
                target: t.clone(),
            }
        };
        (
            config.target.as_ref().map(keys),
            config.sni.iter().map(|r| keys(&r.target)).collect(),
        )
    }

    fn for_target(
        config: &L4ListenerConfig,
        ctx: &ProxyContext,
        transport: Transport,
    ) -> (Arc<ListenerBalancers>, ListenerMetrics) {
        let listener = format!("{}/{}", transport.label(), config.listen);
        let (default, sni) = Self::target_keys(config, ctx, &listener);
        // The listener's own service labels its series; "-" when it has only SNI routes.
        let own = default.as_ref().map_or("-", |d| d.service.as_str());
        let metrics = ctx.metrics.listener(transport, &listener, own);
        let slots = L4Slots {
            metrics: ctx.metrics.clone(),
            transport,
            listener,
        };
        let balancers = ListenerBalancers {
            table: BalancerTable::new(&ctx.lb, slots, PortRule::Only),
            default,
            sni,
        };
        (Arc::new(balancers), metrics)
    }

    pub fn reconfigure(&self, config: L4ListenerConfig, ctx: &ProxyContext, transport: Transport) {
        let old = self.config.load_full();
        if old.target == config.target && old.sni != config.sni {
            // Only the SNI routes changed: the balancer table (it serves any target) and the
            // listener's own series stay; new keys point into it.
            let listener = format!("{}/{}", transport.label(), config.listen);
            let before = self.balancers.load_full();
            let (default, sni) = Self::target_keys(&config, ctx, &listener);
            let own = default.as_ref().map(|d| d.service.clone());
            for gone in before.sni.iter().filter(|o| {
                !sni.iter().any(|n: &TargetKeys| n.service == o.service)
                    && own.as_ref() != Some(&o.service)
            }) {
                ctx.metrics
                    .forget_no_healthy(&listener, gone.service.as_str());
            }
            self.balancers.store(Arc::new(ListenerBalancers {
                table: before.table.clone(),
                default,
                sni,
            }));
        } else if old.target != config.target {
            let (table, metrics) = Self::for_target(&config, ctx, transport);
            // SNI targets no longer routed to lose their refusal series (the listener's own
            // target's go with its ListenerMetrics).
            let listener = format!("{}/{}", transport.label(), config.listen);
            let before = self.balancers.load_full();
            for gone in before.sni.iter().filter(|o| {
                !table.sni.iter().any(|n| n.service == o.service)
                    && table.default.as_ref().map(|d| &d.service) != Some(&o.service)
                    && before.default.as_ref().map(|d| &d.service) != Some(&o.service)
            }) {
                ctx.metrics
                    .forget_no_healthy(&listener, gone.service.as_str());
            }
            self.balancers.store(table);
            self.listener_metrics.store(Arc::new(metrics));
        }
        self.config.store(Arc::new(config));
    }
}

/// The running L4 listeners, by transport and listen address. The mutex guards only the set of
/// listeners, taken at start and on reload, never by a connection.
pub struct L4Proxy {
    pub ctx: Arc<ProxyContext>,
    /// The threads TCP listeners run on (UDP listeners stay on the main runtime).
    workers: Arc<workers::ProxyWorkers>,
    listeners: Mutex<HashMap<(Transport, SocketAddr), Arc<ListenerState>>>,
}

impl L4Proxy {
    /// Binds every configured listener (an address that cannot be bound is an error naming its
    /// key) and starts serving. (Each argument is a different owner's; see `HttpProxy::start`.)
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &ProxyConfig,
        drain_timeout: Duration,
        lb: &Arc<LoadBalancer>,
        fds: &Arc<fds::FdBudget>,
        workers: &Arc<workers::ProxyWorkers>,
        phase: &Phase,
        prometheus: &prometheus::Registry,
        tls: &Arc<ProxyTls>,
    ) -> Result<L4Proxy, ProxyError> {
        let proxy = L4Proxy {
            workers: workers.clone(),
            ctx: Arc::new(ProxyContext {
                snapshot: lb.reader().clone(),
                metrics: ProxyMetrics::new(prometheus, fds.clone())?,
                settings: ArcSwap::from_pointee(ProxySettings::new(config, drain_timeout)),
                active: AtomicUsize::new(0),
                hard_stop: phase.token(),
                phase: phase.clone(),
                lb: lb.clone(),
                tls: tls.clone(),
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
                    state.reconfigure((*l).clone(), &self.ctx, key.0);
                    true
                }
                None => {
                    info!(addr = %key.1, transport = key.0.key(), "proxy listener removed; open connections continue");
                    state.stop.cancel();
                    state.passthrough.forget();
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
            let state = Arc::new(ListenerState::new(listener, &self.ctx, transport));
            let phase = &self.ctx.phase;
            let started = match transport {
                Transport::Tcp => self.workers.listen(addr, phase, |l| {
                    tcp::serve(l, state.clone(), self.ctx.clone())
                }),
                Transport::Udp => UdpSocket::bind(addr).await.map(|s| {
                    phase.spawn(udp::serve(s, state.clone(), self.ctx.clone()));
                }),
            };
            match started {
                Ok(_) => {
                    info!(%addr, transport = transport.key(), "proxy listening");
                    self.listeners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((transport, addr), state);
                }
                Err(cause) => errors.push(ProxyError::Bind {
                    key: format!("{}[{i}].listen", transport.key()),
                    addr,
                    cause,
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
        drain(&self.ctx.phase, timeout).await;
    }
}

/// Stops a listener without resetting what sits in its accept queue. Closing a listening socket
/// resets every connection the kernel completed but nobody accepted, so clients that already
/// sent a request see a reset. Instead: a socket filter drops new handshakes (a SYN without ACK;
/// the client's SYN retry then meets the closed port: refused, which clients retry) while
/// handshakes already under way complete; after [`ACCEPT_SETTLE`] for those, everything queued
/// is accepted here, to be served like any other. The caller drops the listener afterwards.
pub(crate) async fn drain_accept_queue(listener: &TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let socket = socket2::SockRef::from(listener);
    if let Err(e) = socket.attach_filter(&DROP_NEW_HANDSHAKES) {
        debug!(error = %e, "cannot filter the listener before closing it");
    }
    let mut accepted = Vec::new();
    take_queued(&socket, &mut accepted);
    tokio::time::sleep(ACCEPT_SETTLE).await;
    take_queued(&socket, &mut accepted);
    accepted
}

/// Long enough for a handshake under way when the filter went on to complete (loopback and
/// in-cluster round trips are far shorter).
const ACCEPT_SETTLE: Duration = Duration::from_millis(20);

/// Classic BPF over the TCP header (where a TCP socket's filter starts): drop a segment whose
/// flags have SYN without ACK, keep everything else.
const DROP_NEW_HANDSHAKES: [socket2::SockFilter; 5] = [
    socket2::SockFilter::new(0x30, 0, 0, 13), // ldb [13]: the flags byte
    socket2::SockFilter::new(0x54, 0, 0, 0x12), // and #(SYN|ACK)
    socket2::SockFilter::new(0x15, 0, 1, 0x02), // jeq #SYN: drop, else keep
    socket2::SockFilter::new(0x06, 0, 0, 0),  // ret #0: drop
    socket2::SockFilter::new(0x06, 0, 0, u32::MAX), // ret #-1: keep the whole segment
];

/// Accepts everything queued on the non-blocking `socket` without waiting.
fn take_queued(socket: &socket2::SockRef<'_>, into: &mut Vec<(TcpStream, SocketAddr)>) {
    while let Ok((conn, peer)) = socket.accept() {
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        let stream = std::net::TcpStream::from(conn);
        match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(stream) => into.push((stream, peer)),
            Err(e) => debug!(error = %e, "cannot adopt a queued connection"),
        }
    }
}

/// Lets a proxy's connections finish for up to `timeout`, then closes what is left (the phase's
/// stop) and waits for it.
pub(crate) async fn drain(phase: &Phase, timeout: Duration) {
    if !phase.drain(timeout).await {
        warn!(
            proxy = phase.name(),
            "drain timeout reached; closed the open connections"
        );
    }
}

/// The same pseudo-random inputs every run, for the never-panic tests (a fixed-seed xorshift).
#[cfg(test)]
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[cfg(test)]
mod tests {
    fn test_listener() -> tokio::net::TcpListener {
        let socket = super::workers::bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        tokio::net::TcpListener::from_std(socket.into()).unwrap()
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = test_listener();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn closing_a_listener_serves_its_queue_and_answers_no_new_handshake() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = test_listener();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..3 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            queued.push(c);
        }
        let drained = super::drain_accept_queue(&listener).await;
        assert_eq!(drained.len(), 3, "every queued connection taken");
        let mut servers: Vec<_> = drained.into_iter().map(|(s, _)| s).collect();
        for server in &mut servers {
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping", "what the client sent is there");
            // The filter keeps every segment that is not a new handshake.
            socket2::SockRef::from(&*server)
                .attach_filter(&super::DROP_NEW_HANDSHAKES)
                .unwrap();
        }
        for c in &mut queued {
            c.write_all(b"more").await.unwrap();
        }
        for server in &mut servers {
            let mut buf = [0u8; 4];
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                server.read_exact(&mut buf),
            )
            .await
            .expect("data through the filter")
            .unwrap();
            assert_eq!(&buf, b"more");
        }
        // A new handshake gets no answer while the listener is still open ...
        let late = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        assert!(late.is_err(), "handshake completed: {late:?}");
        // ... and is refused once it is closed.
        drop(listener);
        let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
