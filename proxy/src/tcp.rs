//! L4 TCP: accept, pick a healthy instance round robin (the service's shared balancer: panic
//! threshold, failed connects feeding outlier ejection), connect (next instance on refusal or
//! timeout), then move bytes both ways — splice(2) on Linux, a user-space copy otherwise — until
//! both sides are done, the connection idles out, its instance leaves the registry (after the
//! drain timeout) or the daemon stops.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tracing::{debug, warn};

use crate::metrics::EndpointMetrics;
use crate::splice::Pipe;
use crate::{ListenerState, ProxyContext};

pub async fn serve(listener: TcpListener, state: Arc<ListenerState>, ctx: Arc<ProxyContext>) {
    loop {
        let (client, peer) = tokio::select! {
            _ = state.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "TCP proxy accept failed");
                    sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let max = ctx.settings.load().max_connections;
        if ctx.active.fetch_add(1, Ordering::Relaxed) >= max {
            ctx.active.fetch_sub(1, Ordering::Relaxed);
            ctx.metrics.rejected.inc();
            drop(client); // closed at once
            continue;
        }
        let (state, ctx2) = (state.clone(), ctx.clone());
        ctx.tracker.spawn(async move {
            handle(client, &state, &ctx2).await;
            ctx2.active.fetch_sub(1, Ordering::Relaxed);
            debug!(%peer, "TCP proxy connection closed");
        });
    }
}

/// Decrements the per-endpoint active gauge however the connection ends.
struct ActiveGuard(Arc<EndpointMetrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

async fn handle(client: TcpStream, state: &ListenerState, ctx: &ProxyContext) {
    let config = state.config.load_full();
    let target = &config.target;
    let metrics_cache = state.metrics.load_full();
    let service = {
        let snapshot = ctx.snapshot.load();
        snapshot
            .service(&target.namespace, &target.service)
            .cloned()
    };
    let Some(service) = service.filter(|s| !s.healthy.is_empty()) else {
        ctx.metrics.no_healthy(metrics_cache.service_label()).inc();
        return;
    };
    let settings = ctx.settings.load_full();
    // The shared balancer of this service and port: round robin, the panic threshold, and the
    // per-instance outlier record that connect failures feed.
    let Some(balancer) =
        ctx.balancers
            .get(&target.service, &target.namespace, target.port.as_deref())
    else {
        ctx.metrics.no_healthy(metrics_cache.service_label()).inc();
        return;
    };
    let view = balancer.view(&service);
    let Some(pick) = balancer.pick(&view, &settings.outlier) else {
        ctx.metrics.no_healthy(metrics_cache.service_label()).inc();
        return;
    };
    let mut connected = None;
    for attempt in 0..settings.connect_attempts {
        let Some(slot) = pick.attempt(attempt) else {
            break;
        };
        let endpoint = &slot.endpoint;
        let m = metrics_cache.get(&ctx.metrics, &service, &endpoint.id);
        let failure = match timeout(settings.connect_timeout, TcpStream::connect(slot.addr)).await {
            Ok(Ok(upstream)) => {
                ctx.outlier.success(&slot.stats);
                connected = Some((upstream, endpoint.clone(), m));
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
        m.connect_failures.inc();
        ctx.outlier.failure(
            &balancer,
            view.fallback.len(),
            &slot.stats,
            &settings.outlier,
            failure,
        );
    }
    let Some((upstream, endpoint, m)) = connected else {
        ctx.metrics.no_healthy(metrics_cache.service_label()).inc();
        return;
    };
    // The client socket inherited TCP_NODELAY from the listener.
    let _ = upstream.set_nodelay(true);
    m.connections.inc();
    m.active.inc();
    let _active = ActiveGuard(m.clone());

    let base = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let splice = settings.splice;
    // Set by the first direction to finish: the second need not shut down its side.
    let half_closed = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            one_way(splice, &client, &upstream, &half_closed, |n| {
                m.bytes_in.inc_by(n as u64);
                touch();
            }),
            one_way(splice, &upstream, &client, &half_closed, |n| {
                m.bytes_out.inc_by(n as u64);
                touch();
            }),
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
        _ = removed_then_drained(ctx, target, &endpoint, settings.drain_timeout) => {
            debug!(endpoint = %endpoint.id, "instance left the registry; drain time over, closing");
        }
        _ = ctx.hard_stop.cancelled() => {}
    }
}

/// One direction: splice(2) through a pooled pipe, or the copy path when splice is off or no
/// pipe can be had (descriptor limits).
async fn one_way(
    splice: bool,
    from: &TcpStream,
    to: &TcpStream,
    half_closed: &AtomicBool,
    on_progress: impl FnMut(usize),
) -> io::Result<u64> {
    let pipe = if splice { Pipe::get().ok() } else { None };
    let Some(mut pipe) = pipe else {
        return crate::splice::copy(from, to, half_closed, on_progress).await;
    };
    let moved = crate::splice::forward(from, to, &mut pipe, half_closed, on_progress).await;
    pipe.put();
    moved
}

/// Resolves once `endpoint` is no longer registered for the target service and `drain` more has
/// passed; never while it stays registered.
pub async fn removed_then_drained(
    ctx: &ProxyContext,
    target: &svcd_config::ProxyTarget,
    endpoint: &svcd_registry::Endpoint,
    drain: Duration,
) {
    let mut changes = ctx.snapshot.changes();
    loop {
        let present = {
            let snapshot = ctx.snapshot.load();
            snapshot
                .service(&target.namespace, &target.service)
                .is_some_and(|s| {
                    s.all
                        .iter()
                        .any(|e| e.id == endpoint.id && e.ip == endpoint.ip)
                })
        };
        if !present {
            sleep(drain).await;
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
