//! The fast path's upstream connections: opened with `TCP_NODELAY`, counted in the pool gauges,
//! and kept idle per thread between requests.
//!
//! Each proxy worker is one thread running one current-thread runtime, so a thread-local pool
//! is the worker's own: taking and returning a connection is a `RefCell` borrow and a hash
//! lookup, no lock, no channel, no task. A client connection takes an upstream connection for
//! one exchange and returns it when the response has ended cleanly, so idle client connections
//! hold no upstream connection (as HAProxy's `http-reuse`), and the pool is shared by every
//! client of the worker.
//!
//! Each worker runs one [`upkeep`] task: an idle connection goes when it has idled
//! `pool_idle_timeout`, when its instance leaves the registry (at once, as Envoy drains a removed
//! host's pool), and past a lowered `pool_max_idle_per_host` after a reload.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use svcd_lb::{EndpointHealth, Slot};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::metrics::{HttpMetrics, HttpSlot};

/// One upstream connection, counted open until dropped.
pub struct UpstreamConn {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    /// Taken from the idle pool rather than just opened: the backend may have closed it while it
    /// sat idle, so a failure before any response byte is retried once on a fresh connection.
    pub reused: bool,
    /// The instance it was opened to: once that leaves the registry (or re-registers elsewhere)
    /// the connection is not reused, even if a new instance takes the address.
    health: Arc<EndpointHealth>,
    _open: OpenGauge,
}

/// `svcd_http_upstream_connections` held for one connection.
struct OpenGauge(IntGauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Opens a connection to `addr`, instance `health` (Nagle off before the handshake: no
/// setsockopt after it).
async fn connect(
    addr: SocketAddr,
    health: &Arc<EndpointHealth>,
    timeout: Duration,
    metrics: &HttpMetrics,
) -> io::Result<UpstreamConn> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    metrics.upstream_connects.inc();
    metrics.upstream_open.inc();
    Ok(UpstreamConn {
        stream,
        addr,
        reused: false,
        health: health.clone(),
        _open: OpenGauge(metrics.upstream_open.clone()),
    })
}

/// A connection to `slot`'s instance for one exchange: the most recent idle one that is still
/// clean (unless `fresh_only`, a retry after a pooled one turned out closed), else a new one.
pub async fn checkout(
    slot: &Slot<HttpSlot>,
    settings: &crate::http::HttpSettings,
    metrics: &HttpMetrics,
    fresh_only: bool,
) -> io::Result<UpstreamConn> {
    let pooled = if fresh_only {
        None
    } else {
        take(slot.addr, settings.l7.pool_idle_timeout, metrics)
    };
    match pooled {
        Some(up) => Ok(up),
        None => connect(slot.addr, &slot.health, settings.connect_timeout, metrics).await,
    }
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

type IdleMap = HashMap<SocketAddr, Vec<Idle>, foldhash::fast::FixedState>;

thread_local! {
    /// This worker's idle connections by instance address, oldest first. A `RefCell` is enough:
    /// the worker's tasks run on this one thread and no borrow is held across an await.
    static IDLE: RefCell<IdleMap> = RefCell::new(HashMap::default());
}

/// The most recently used idle connection to `addr` that is younger than `max_idle` and still
/// clean: every one is checked before reuse, whatever the request, as nginx's keepalive and
/// hyper-util's pool do. An idle connection with something to read has either been closed by
/// the instance or carries bytes no request asked for (a `408` written before closing, a second
/// response to a smuggled request); a request written onto it would be answered with them.
fn take(addr: SocketAddr, max_idle: Duration, metrics: &HttpMetrics) -> Option<UpstreamConn> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.get_mut(&addr)?;
        while let Some(mut entry) = list.pop() {
            if entry.since.elapsed() >= max_idle {
                list.clear(); // older ones are older still
                break;
            }
            if entry.conn.health.has_left() {
                continue;
            }
            if !quiet(&entry.conn.stream) {
                metrics.upstream_stale.inc();
                continue;
            }
            entry.conn.reused = true;
            return Some(entry.conn);
        }
        None
    })
}

/// Whether an idle connection has nothing to read: neither the instance's close nor stray bytes.
/// Asks the kernel (a non-blocking `MSG_PEEK`), not tokio's readiness, which is only as fresh as
/// the worker's last turn of its I/O driver.
fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(stream).peek(&mut probe),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// Keeps `conn` for the next request to its instance; past `max_per_host` the oldest goes. A
/// connection whose instance left during the exchange is closed instead. (Connections past
/// their idle time are the keeper's, [`upkeep`], and [`take`] never hands one out.)
pub fn put(conn: UpstreamConn, max_per_host: usize) {
    if max_per_host == 0 || conn.health.has_left() {
        return;
    }
    IDLE.with_borrow_mut(|idle| {
        let list = idle.entry(conn.addr).or_default();
        if list.len() >= max_per_host {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    });
}

/// Closes this thread's idle connections that have idled `max_idle` or longer, whose instance
/// has left the registry, or that are past `max_per_host` for their address (oldest first).
fn tidy(max_per_host: usize, max_idle: Duration) {
    IDLE.with_borrow_mut(|idle| {
        let now = Instant::now();
        idle.retain(|_, list| {
            list.retain(|e| now.duration_since(e.since) < max_idle && !e.conn.health.has_left());
            let excess = list.len().saturating_sub(max_per_host);
            list.drain(..excess);
            !list.is_empty()
        });
    });
}

/// This worker's pool keeper, until `stop`: tidies the pool when instances leave the registry
/// (`departures`: they take their idle connections with them), when a reload changes the
/// `limits` (`pool_max_idle_per_host`, `pool_idle_timeout`), and every few seconds (idle
/// timeout).
pub async fn upkeep(
    mut departures: watch::Receiver<u64>,
    mut limits: watch::Receiver<(usize, Duration)>,
    stop: tokio_util::sync::CancellationToken,
) {
    let (mut announced, mut reloading) = (true, true);
    loop {
        let max_idle = limits.borrow_and_update().1;
        let every = (max_idle / 2).clamp(Duration::from_secs(1), UPKEEP_EVERY);
        tokio::select! {
            _ = stop.cancelled() => {
                IDLE.with_borrow_mut(|idle| idle.clear());
                return;
            }
            changed = departures.changed(), if announced => announced = changed.is_ok(),
            changed = limits.changed(), if reloading => reloading = changed.is_ok(),
            _ = tokio::time::sleep(every) => {}
        }
        let (max_per_host, max_idle) = *limits.borrow();
        tidy(max_per_host, max_idle);
    }
}

/// The longest an idle connection outlives its idle timeout.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
