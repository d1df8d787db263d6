//! L4 UDP: a flow table keyed by client address. The first datagram of a client picks an
//! instance through the service's balancer (the same one TCP listeners use: weights, panic
//! threshold, ejections) and opens a connected upstream socket; replies flow back through the
//! listener socket. Flows idle past their timeout are forgotten, and flows whose instance left
//! the registry or stopped being served (unhealthy, draining, ejected — unless the flow was opened
//! in panic and the service is still in panic) are dropped at once, so a client is never stuck
//! sending into a dead address.
//!
//! The table is owned by the listener task alone: no lock.
//!
//! Memory: no flow holds a buffer. The listener reads into its one buffer and sends on to the
//! flow's upstream socket; a flow's reply task reads into its runtime thread's buffer and sends
//! on before it yields (a datagram is copied at its length only when the listener socket is
//! full). A flow costs its socket, its reply task and its table entry (about 1.5 KiB measured),
//! and the table gives back its room after a flood's flows idle out.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use svcd_config::DEFAULT_MAX_FLOWS;
use svcd_lb::{EndpointHealth, ServiceHealth};

use crate::fds::FdPermit;

use crate::metrics::EndpointMetrics;
use crate::{ListenerState, ProxyContext};

struct Flow {
    upstream: Arc<UdpSocket>,
    health: Arc<EndpointHealth>,
    service: Arc<ServiceHealth>,
    /// Opened while the service was in panic (possibly onto an instance that is not healthy).
    in_panic: bool,
    /// Milliseconds after the listener's start of the last datagram either way.
    last: Arc<AtomicU64>,
    metrics: Arc<EndpointMetrics>,
    reply_task: AbortHandle,
    /// Its place in the creation order (see [`FlowTable`]).
    seq: u64,
    /// The upstream socket's descriptor, from the proxies' budget.
    _permit: FdPermit,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reply_task.abort();
    }
}

/// The flows of one listener and the order they were opened in, for evicting the oldest.
#[derive(Default)]
struct FlowTable {
    flows: HashMap<SocketAddr, Flow>,
    /// (sequence, client) in creation order; entries whose flow has gone are skipped when popped
    /// and dropped by the sweep.
    order: VecDeque<(u64, SocketAddr)>,
    next_seq: u64,
}

impl FlowTable {
    /// Closes the oldest flow; `false` when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((seq, client)) = self.order.pop_front() {
            if self.flows.get(&client).is_some_and(|f| f.seq == seq) {
                self.flows.remove(&client);
                return true;
            }
        }
        false
    }

    fn insert(&mut self, client: SocketAddr, mut flow: Flow) -> &mut Flow {
        flow.seq = self.next_seq;
        self.order.push_back((self.next_seq, client));
        self.next_seq += 1;
        self.flows.entry(client).insert_entry(flow).into_mut()
    }

    fn retain(&mut self, keep: impl FnMut(&SocketAddr, &mut Flow) -> bool) {
        self.flows.retain(keep);
        let flows = &self.flows;
        self.order
            .retain(|(seq, client)| flows.get(client).is_some_and(|f| f.seq == *seq));
        self.shrink_after_expiry();
    }

    /// Gives back the room a flood of flows left once most of them have gone (a table keeps
    /// its largest capacity otherwise): down to twice what is left when under a quarter is used.
    fn shrink_after_expiry(&mut self) {
        const KEEP: usize = 64;
        if self.flows.capacity() > KEEP && self.flows.len() < self.flows.capacity() / 4 {
            self.flows.shrink_to((self.flows.len() * 2).max(KEEP));
        }
        if self.order.capacity() > KEEP && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to((self.order.len() * 2).max(KEEP));
        }
    }
}

pub async fn serve(socket: UdpSocket, state: Arc<ListenerState>, ctx: Arc<ProxyContext>) {
    let socket = Arc::new(socket);
    let base = Instant::now();
    let mut table = FlowTable::default();
    // One receive buffer for the listener: a datagram is sent on from it before the next read.
    let mut buf = vec![0u8; MAX_DATAGRAM];
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
                if !table.flows.contains_key(&client) {
                    let Some(flow) = new_flow(&mut table, &socket, client, &state, &ctx, base).await
                    else {
                        continue;
                    };
                    table.insert(client, flow);
                    state.listener_metrics.load().set_flows(table.flows.len());
                }
                let flow = table.flows.get_mut(&client).expect("present or just opened");
                flow.last.store(now_ms, Ordering::Relaxed);
                match flow.upstream.send(&buf[..n]).await {
                    Ok(_) => {
                        if let Some(udp) = flow.metrics.udp() {
                            udp.datagrams_in.inc();
                        }
                    }
                    Err(e) => {
                        debug!(%client, error = %e, "UDP proxy send upstream failed; dropping flow");
                        table.flows.remove(&client);
                    }
                }
            }
            _ = sweep.tick() => {
                let idle = state.config.load().idle_timeout.as_millis() as u64;
                let now_ms = base.elapsed().as_millis() as u64;
                table.retain(|_, f| now_ms.saturating_sub(f.last.load(Ordering::Relaxed)) < idle);
                state.listener_metrics.load().set_flows(table.flows.len());
            }
            changed = changes.changed(), if changes_open => {
                if changed.is_err() {
                    changes_open = false;
                    continue;
                }
                // Instances that left the registry (or stopped being healthy): drop their flows
                // now; the client's next datagram opens a flow to a live instance.
                let balancers = state.balancers.load();
                let snapshot = ctx.snapshot.load();
                // UDP listeners always have a target of their own (no SNI over UDP).
                let service = balancers
                    .default
                    .as_ref()
                    .and_then(|t| snapshot.service_by_name(t.service.as_str()));
                table.retain(|_, f| {
                    let served = service.is_some_and(|s| s.healthy.iter().any(|e| e.id == f.health.id && e.ip == f.health.ip));
                    !f.health.has_left() && (served || (f.in_panic && f.service.in_panic()))
                });
                state.listener_metrics.load().set_flows(table.flows.len());
            }
        }
    }
}

/// Makes room for a new client's flow and opens it: under `max_flows` (the oldest flow makes
/// way), with a descriptor from the budget within this listener's share (else this listener's
/// oldest flow gives up its own; with none to give, the client is refused and counted).
async fn new_flow(
    table: &mut FlowTable,
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    state: &ListenerState,
    ctx: &ProxyContext,
    base: Instant,
) -> Option<Flow> {
    let metrics = state.listener_metrics.load_full();
    let max = state.config.load().max_flows.unwrap_or(DEFAULT_MAX_FLOWS);
    while table.flows.len() >= max && table.evict_oldest() {
        metrics.evicted();
    }
    let permit = loop {
        if let Some(permit) = ctx.metrics.fds.try_acquire(&state.fds, 1) {
            break permit;
        }
        if !table.evict_oldest() {
            metrics.fd_refusals.inc();
            return None;
        }
        metrics.evicted();
    };
    open_flow(listener, client, state, ctx, base, permit).await
}

async fn open_flow(
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    state: &ListenerState,
    ctx: &ProxyContext,
    base: Instant,
    permit: FdPermit,
) -> Option<Flow> {
    let balancers = state.balancers.load_full();
    let target = balancers.default.as_ref()?;
    let service = ctx
        .snapshot
        .load()
        .service_by_name(target.service.as_str())
        .cloned();
    let picked = service.as_ref().and_then(|service| {
        let balancer = balancers.balancer(target);
        let view = balancer.view(service);
        let pick = balancer.pick(&view)?;
        let slot = pick.attempt(0)?;
        Some((
            slot.endpoint.clone(),
            slot.addr.port(),
            slot.health.clone(),
            balancer.health.clone(),
            pick.panic,
            slot.extra.clone(),
        ))
    });
    let Some((endpoint, port, health, service_health, in_panic, metrics)) = picked else {
        target.no_healthy.inc();
        return None;
    };
    let local: SocketAddr = match endpoint.ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "UDP proxy cannot open an upstream socket");
            state.listener_metrics.load().no_healthy.inc();
            return None;
        }
    };
    if let Err(e) = upstream.connect((endpoint.ip, port)).await {
        debug!(error = %e, "UDP proxy upstream connect failed");
        state.listener_metrics.load().no_healthy.inc();
        return None;
    }
    let upstream = Arc::new(upstream);
    let last = Arc::new(AtomicU64::new(base.elapsed().as_millis() as u64));
    let reply_task = ctx
        .phase
        .spawn(relay_replies(
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
        health,
        service: service_health,
        in_panic,
        last,
        metrics,
        reply_task,
        seq: 0,
        _permit: permit,
    })
}

/// Largest UDP payload: what the listener's and the reply buffers hold.
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// The reply buffer of this runtime thread, shared by every flow's reply task that runs on
    /// it: a datagram is read into it and sent on from it before the task yields, so a flow
    /// holds no buffer of its own (a 64 KiB one each made a flood of sources cost 64 KiB a
    /// flow, kept after the flows ended).
    static REPLY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What one read of the upstream socket came to.
enum Relayed {
    /// Sent on to the client.
    Sent,
    /// Read, but the send to the client failed (as UDP may).
    Lost,
    /// The listener socket's send buffer was full: the datagram, copied at its length, to send
    /// when it has room.
    Pending(Vec<u8>),
    /// Nothing to read after all (a spurious readiness).
    Nothing,
    /// The read failed: an ICMP error (port unreachable) shows up here.
    Failed,
}

/// Reads one datagram from `upstream` into this thread's buffer and sends it to `client`
/// through the listener, without yielding in between.
fn relay_one(upstream: &UdpSocket, listener: &UdpSocket, client: SocketAddr) -> Relayed {
    REPLY_BUF.with_borrow_mut(|buf| {
        if buf.len() < MAX_DATAGRAM {
            buf.resize(MAX_DATAGRAM, 0);
        }
        let n = match upstream.try_recv(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Relayed::Nothing,
            Err(_) => return Relayed::Failed,
        };
        match listener.try_send_to(&buf[..n], client) {
            Ok(_) => Relayed::Sent,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Relayed::Pending(buf[..n].to_vec())
            }
            Err(e) => {
                debug!(%client, error = %e, "UDP proxy send to client failed");
                Relayed::Lost
            }
        }
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
    loop {
        if upstream.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let sent = match relay_one(&upstream, &listener, client) {
            Relayed::Sent => true,
            Relayed::Lost => false,
            Relayed::Pending(datagram) => listener.send_to(&datagram, client).await.is_ok(),
            Relayed::Nothing => continue,
            // Keep the flow until it idles or is dropped.
            Relayed::Failed => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
        if sent {
            if let Some(udp) = metrics.udp() {
                udp.datagrams_out.inc();
            }
        }
    }
}
