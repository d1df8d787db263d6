//! L4 UDP: a flow table keyed by client address. The first datagram of a client picks an
//! instance (round robin) and opens a connected upstream socket; replies flow back through the
//! listener socket. Flows idle past their timeout are forgotten, and flows whose instance left
//! the registry are dropped at once, so a client is never stuck sending into a dead address.
//!
//! The table is owned by the listener task alone: no lock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::metrics::EndpointMetrics;
use crate::{ListenerState, ProxyContext};

struct Flow {
    upstream: Arc<UdpSocket>,
    endpoint_id: Box<str>,
    endpoint_ip: IpAddr,
    /// Milliseconds after the listener's start of the last datagram either way.
    last: Arc<AtomicU64>,
    metrics: Arc<EndpointMetrics>,
    reply_task: AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reply_task.abort();
    }
}

pub async fn serve(socket: UdpSocket, state: Arc<ListenerState>, ctx: Arc<ProxyContext>) {
    let socket = Arc::new(socket);
    let base = Instant::now();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65535];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut changes = ctx.snapshot.changes();
    // Cleared if the registry's publisher is gone (no more changes can come): stop polling it.
    let mut changes_open = true;
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = ctx.hard_stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => {
                let (n, client) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(error = %e, "UDP proxy receive failed");
                        continue;
                    }
                };
                let now_ms = base.elapsed().as_millis() as u64;
                let flow = match flows.entry(client) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        match open_flow(&socket, client, &state, &ctx, base).await {
                            Some(flow) => e.insert(flow),
                            None => continue,
                        }
                    }
                };
                flow.last.store(now_ms, Ordering::Relaxed);
                match flow.upstream.send(&buf[..n]).await {
                    Ok(_) => flow.metrics.datagrams_in.inc(),
                    Err(e) => {
                        debug!(%client, error = %e, "UDP proxy send upstream failed; dropping flow");
                        flows.remove(&client);
                    }
                }
            }
            _ = sweep.tick() => {
                let idle = state.config.load().idle_timeout.as_millis() as u64;
                let now_ms = base.elapsed().as_millis() as u64;
                flows.retain(|_, f| now_ms.saturating_sub(f.last.load(Ordering::Relaxed)) < idle);
            }
            changed = changes.changed(), if changes_open => {
                if changed.is_err() {
                    changes_open = false;
                    continue;
                }
                // Instances that left the registry (or stopped being healthy): drop their flows
                // now; the client's next datagram opens a flow to a live instance.
                let config = state.config.load();
                let snapshot = ctx.snapshot.load();
                let service = snapshot.service(&config.target.namespace, &config.target.service);
                flows.retain(|_, f| {
                    service.is_some_and(|s| s.healthy.iter().any(|e| *e.id == *f.endpoint_id && e.ip == f.endpoint_ip))
                });
            }
        }
    }
}

async fn open_flow(
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    state: &ListenerState,
    ctx: &ProxyContext,
    base: Instant,
) -> Option<Flow> {
    let config = state.config.load_full();
    let cache = state.metrics.load_full();
    let service = {
        let snapshot = ctx.snapshot.load();
        snapshot
            .service(&config.target.namespace, &config.target.service)
            .cloned()
    };
    let Some((endpoint, port)) = service.as_ref().and_then(|s| {
        state
            .rr
            .candidates(s, config.target.port.as_deref(), 1)
            .next()
            .map(|(e, p)| (e.clone(), p))
    }) else {
        ctx.metrics.no_healthy(cache.service_label()).inc();
        return None;
    };
    let service = service.expect("candidate came from it");
    let metrics = cache.get(&ctx.metrics, &service, &endpoint.id);
    let local: SocketAddr = match endpoint.ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "UDP proxy cannot open an upstream socket");
            return None;
        }
    };
    if let Err(e) = upstream.connect((endpoint.ip, port)).await {
        debug!(error = %e, "UDP proxy upstream connect failed");
        metrics.connect_failures.inc();
        return None;
    }
    let upstream = Arc::new(upstream);
    let last = Arc::new(AtomicU64::new(base.elapsed().as_millis() as u64));
    let reply_task = tokio::spawn(relay_replies(
        upstream.clone(),
        listener.clone(),
        client,
        last.clone(),
        metrics.clone(),
        base,
    ))
    .abort_handle();
    Some(Flow {
        upstream,
        endpoint_id: endpoint.id.clone(),
        endpoint_ip: endpoint.ip,
        last,
        metrics,
        reply_task,
    })
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    metrics: Arc<EndpointMetrics>,
    base: Instant,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let n = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP port unreachable shows up here; keep the flow until it idles or is dropped.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
        if listener.send_to(&buf[..n], client).await.is_ok() {
            metrics.datagrams_out.inc();
        }
    }
}
