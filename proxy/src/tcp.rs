//! L4 TCP: accept, pick an instance (the service's balancer: weighted round robin, the panic
//! threshold; failed connects feed passive health), connect (next instance on refusal or
//! timeout), then move bytes both ways — splice(2) on Linux, a user-space copy otherwise — until
//! both sides are done, the connection idles out, its instance leaves the registry (after the
//! drain timeout) or the daemon stops. A connection waits on its own instance's departure, so a
//! publish about anything else wakes no connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tracing::{debug, warn};

use svcd_lb::Detector;

use crate::metrics::EndpointMetrics;
use crate::splice::Pipe;
use crate::{ListenerState, ProxyContext};

pub async fn serve(listener: TcpListener, state: Arc<ListenerState>, ctx: Arc<ProxyContext>) {
    loop {
        let (client, peer) = tokio::select! {
            _ = state.stop.cancelled() => {
                // Connections already queued are proxied, not reset.
                for (client, peer) in crate::drain_accept_queue(&listener).await {
                    admit(client, peer, &state, &ctx);
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "TCP proxy accept failed");
                    sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        admit(client, peer, &state, &ctx);
    }
}

/// Takes an accepted client on within the connection and descriptor limits, or closes it.
fn admit(client: TcpStream, peer: SocketAddr, state: &Arc<ListenerState>, ctx: &Arc<ProxyContext>) {
    let max = ctx.settings.load().max_connections;
    if ctx.active.fetch_add(1, Ordering::Relaxed) >= max {
        ctx.active.fetch_sub(1, Ordering::Relaxed);
        state.listener_metrics.load().rejected();
        drop(client); // closed at once
        return;
    }
    // The client's descriptor and the upstream's.
    let Some(permit) = ctx.metrics.fds.try_acquire(&state.fds, 2) else {
        ctx.active.fetch_sub(1, Ordering::Relaxed);
        state.listener_metrics.load().fd_refusals.inc();
        drop(client);
        return;
    };
    let (state, ctx2) = (state.clone(), ctx.clone());
    ctx.phase.spawn(async move {
        let _permit = permit;
        handle(client, peer, &state, &ctx2).await;
        ctx2.active.fetch_sub(1, Ordering::Relaxed);
        debug!(%peer, "TCP proxy connection closed");
    });
}

/// Decrements the per-endpoint active gauge however the connection ends.
struct ActiveGuard(Arc<EndpointMetrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(tcp) = self.0.tcp() {
            tcp.active.dec();
        }
    }
}

/// Counts a connection in flight on its instance (least request reads it) until dropped.
struct InFlight(Arc<svcd_lb::EndpointHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    state: &ListenerState,
    ctx: &ProxyContext,
) {
    let config = state.config.load_full();
    let balancers = state.balancers.load_full();
    // SNI passthrough: the ClientHello picks the target and is replayed to the instance.
    let (route, hello) = if config.sni.is_empty() {
        (None, None)
    } else {
        let Some(hello) = state.passthrough.read_client_hello(&mut client, peer).await else {
            return;
        };
        (config.sni_route(hello.server_name.as_deref()), Some(hello))
    };
    let Some(target) = balancers.target(route) else {
        let name = hello.as_ref().and_then(|h| h.server_name.as_deref());
        return state.passthrough.no_match(peer, name);
    };
    let refused = || target.no_healthy.inc();
    let service = ctx
        .snapshot
        .load()
        .service_by_name(target.service.as_str())
        .cloned();
    let Some(service) = service else {
        return refused();
    };
    let settings = ctx.settings.load_full();
    let balancer = balancers.balancer(target);
    let view = balancer.view(&service);
    let Some(pick) = balancer.pick(&view) else {
        return refused();
    };
    let upstream_tls = ctx.tls.upstream(target.service.as_str());
    let mut connected = None;
    for attempt in 0..settings.connect_attempts {
        let Some(slot) = pick.attempt(attempt) else {
            break;
        };
        let endpoint = &slot.endpoint;
        let m = slot.extra.clone();
        let failure = match timeout(settings.connect_timeout, TcpStream::connect(slot.addr)).await {
            Ok(Ok(upstream)) => {
                let upstream = match &upstream_tls {
                    None => Upstream::Plain(upstream),
                    // TLS to the instance: a handshake it fails (a certificate the CA or the
                    // name does not verify, no TLS) is its failure, as a refused connect is.
                    Some(tls) => {
                        let _ = upstream.set_nodelay(true);
                        let alpn = svcd_tls::UpstreamAlpn::None;
                        match tls.connect(upstream, alpn, settings.connect_timeout).await {
                            Ok(stream) => Upstream::Tls(Box::new(stream)),
                            Err(e) => {
                                debug!(endpoint = %endpoint.id, error = %e, "TLS to the instance failed; trying the next instance");
                                if let Some(tcp) = m.tcp() {
                                    tcp.connect_failures.inc();
                                }
                                balancer.failure(
                                    &view,
                                    slot,
                                    Detector::Tcp,
                                    "TLS handshake failed",
                                );
                                continue;
                            }
                        }
                    }
                };
                balancer.success(slot, Detector::Tcp);
                connected = Some((upstream, slot, m));
                break;
            }
            Ok(Err(e)) => {
                debug!(endpoint = %endpoint.id, error = %e, "upstream connect failed; trying the next instance");
                "connect failed"
            }
            Err(_) => {
                debug!(endpoint = %endpoint.id, "upstream connect timed out; trying the next instance");
                "connect timed out"
            }
        };
        if let Some(tcp) = m.tcp() {
            tcp.connect_failures.inc();
        }
        balancer.failure(&view, slot, Detector::Tcp, failure);
    }
    let Some((upstream, slot, m)) = connected else {
        return refused();
    };
    slot.health.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(slot.health.clone());
    let endpoint = slot.endpoint.clone();
    let mut upstream = match upstream {
        Upstream::Plain(upstream) => upstream,
        Upstream::Tls(tls) => {
            let counts = m.tcp();
            if let Some(tcp) = counts {
                tcp.connections.inc();
                tcp.active.inc();
            }
            let _active = ActiveGuard(m.clone());
            let relay = relay_tls(client, *tls, hello, counts, config.idle_timeout);
            tokio::select! {
                r = relay => if let Err(e) = r { debug!(error = %e, "TCP proxy connection (TLS to the instance) ended with error") },
                _ = async { slot.health.left().await; sleep(settings.drain_timeout).await } => {
                    debug!(endpoint = %endpoint.id, "instance left the registry; drain time over, closing");
                }
                _ = ctx.hard_stop.cancelled() => {}
            }
            return;
        }
    };
    // The client socket inherited TCP_NODELAY from the listener.
    let _ = upstream.set_nodelay(true);
    // A TCP listener's endpoints always have them.
    let counts = m.tcp();
    if let Some(tcp) = counts {
        tcp.connections.inc();
        tcp.active.inc();
    }
    let _active = ActiveGuard(m.clone());
    if let Some(hello) = hello {
        use tokio::io::AsyncWriteExt;
        if upstream.write_all(&hello.bytes).await.is_err() {
            return;
        }
        if let Some(tcp) = counts {
            tcp.bytes_in.inc_by(hello.bytes.len() as u64);
        }
    }

    let base = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let splice = settings.splice;
    // Set by the first direction to finish: the second need not shut down its side.
    let half_closed = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            one_way(
                splice,
                &ctx.metrics.relay_paths,
                &client,
                &upstream,
                &half_closed,
                |n| {
                    if let Some(tcp) = counts {
                        tcp.bytes_in.inc_by(n as u64);
                    }
                    touch();
                }
            ),
            one_way(
                splice,
                &ctx.metrics.relay_paths,
                &upstream,
                &client,
                &half_closed,
                |n| {
                    if let Some(tcp) = counts {
                        tcp.bytes_out.inc_by(n as u64);
                    }
                    touch();
                }
            ),
        )
    };
    let idle = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = base + last + config.idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = both => if let Err(e) = r { debug!(error = %e, "TCP proxy connection ended with error") },
        _ = idle => debug!("TCP proxy connection idle; closing"),
        _ = async { slot.health.left().await; sleep(settings.drain_timeout).await } => {
            debug!(endpoint = %endpoint.id, "instance left the registry; drain time over, closing");
        }
        _ = ctx.hard_stop.cancelled() => {}
    }
}

/// A connection to an instance: plaintext (spliced), or TLS svcd originates (copied through
/// rustls).
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Both directions between a client and a TLS connection to its instance, with the replayed
/// ClientHello (if any) first; ends when both are done or neither moved for `idle`.
async fn relay_tls(
    client: TcpStream,
    upstream: tokio_rustls::client::TlsStream<TcpStream>,
    hello: Option<svcd_tls::ClientHello>,
    counts: Option<&crate::metrics::TcpEndpointCounters>,
    idle: Duration,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    if let Some(hello) = hello {
        up_wr.write_all(&hello.bytes).await?;
        if let Some(tcp) = counts {
            tcp.bytes_in.inc_by(hello.bytes.len() as u64);
        }
    }
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let inbound = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_rd.read(&mut buf).await?;
            if n == 0 {
                up_wr.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            up_wr.write_all(&buf[..n]).await?;
            if let Some(tcp) = counts {
                tcp.bytes_in.inc_by(n as u64);
            }
            touch();
        }
    };
    let outbound = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = up_rd.read(&mut buf).await?;
            if n == 0 {
                client_wr.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            client_wr.write_all(&buf[..n]).await?;
            if let Some(tcp) = counts {
                tcp.bytes_out.inc_by(n as u64);
            }
            touch();
        }
    };
    let quiet = async {
        loop {
            let at = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(inbound, outbound) } => r.map(|_| ()),
        _ = quiet => Ok(()),
    }
}

/// One direction: splice(2) through a pooled pipe, or the copy path when splice is off or no
/// pipe can be had (descriptor limits).
async fn one_way(
    splice: bool,
    paths: &[prometheus::IntCounter; 2],
    from: &TcpStream,
    to: &TcpStream,
    half_closed: &AtomicBool,
    on_progress: impl FnMut(usize),
) -> io::Result<u64> {
    let pipe = if splice { Pipe::get().ok() } else { None };
    let Some(mut pipe) = pipe else {
        paths[1].inc();
        return crate::splice::copy(from, to, half_closed, on_progress).await;
    };
    paths[0].inc();
    let moved = crate::splice::forward(from, to, &mut pipe, half_closed, on_progress).await;
    pipe.put();
    moved
}
