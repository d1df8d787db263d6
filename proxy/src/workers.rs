//! Proxy workers: `proxy.workers` threads, each running its own current-thread tokio runtime.
//! Every TCP listener (HTTP and L4) is bound once per worker with `SO_REUSEPORT`, so the kernel
//! spreads new connections over the workers and each connection lives on one thread from accept
//! to close: no work stealing, no cross-thread wake-ups, and per-worker state (the HTTP fast
//! path's upstream pool, the splice pipe pool) needs no lock. The control plane, the admin API
//! and DNS stay on the main runtime.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use svcd_lifecycle::Phase;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker index; `None` off the workers.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the proxy worker running this code (0 elsewhere), for per-worker state.
pub fn current() -> usize {
    WORKER.get().unwrap_or(0)
}

/// Whether this code runs on a proxy worker, whose runtime's I/O driver only runs when this
/// thread's tasks yield (see `http::h1::read`).
pub fn on_worker() -> bool {
    WORKER.get().is_some()
}

/// Backlog of each worker's listening socket.
const BACKLOG: i32 = 4096;

pub struct ProxyWorkers {
    /// One runtime handle per worker, to spawn its accept loops on.
    handles: Vec<Handle>,
    /// The workers' own phase: their threads and per-worker upkeep tasks. It stops after the
    /// proxies drained (their connections run on these threads); each thread then drops its
    /// runtime and returns.
    phase: Phase,
}

impl ProxyWorkers {
    /// Starts `count` worker threads (at least one) in `phase`.
    pub fn start(count: usize, phase: &Phase) -> io::Result<ProxyWorkers> {
        let mut handles = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = phase.token();
            phase.thread(format!("svcd-proxy-{i}"), move || {
                WORKER.set(Some(i));
                runtime.block_on(stop.cancelled());
                // The proxies' phases have ended by now; upkeep tasks end with the runtime.
            })?;
        }
        Ok(ProxyWorkers {
            handles,
            phase: phase.clone(),
        })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Binds `addr` once per worker (with `SO_REUSEPORT` when there are several, so a second
    /// daemon on the same port still fails to bind with one worker) and runs `serve` on each
    /// listener on its worker, in `phase` (the proxy's). Accepted sockets inherit `TCP_NODELAY`.
    pub fn listen<F, Fut>(&self, addr: SocketAddr, phase: &Phase, serve: F) -> io::Result<()>
    where
        F: Fn(TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut sockets = Vec::with_capacity(self.handles.len());
        let mut bound = addr;
        for _ in &self.handles {
            let socket = bind_listener(bound, self.handles.len() > 1)?;
            bound = socket.local_addr()?.as_socket().unwrap_or(bound);
            sockets.push(socket);
        }
        for (socket, handle) in sockets.into_iter().zip(&self.handles) {
            let listener = {
                let _entered = handle.enter();
                TcpListener::from_std(socket.into())?
            };
            phase.spawn_on(serve(listener), handle);
        }
        Ok(())
    }

    /// Runs `task(stop)` once on every worker, for upkeep of the worker's own state, in the
    /// workers' phase: `stop` ends it when the workers stop.
    pub fn spawn_each<F, Fut>(&self, task: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for handle in &self.handles {
            self.phase.spawn_on(task(self.phase.token()), handle);
        }
    }
}

/// A non-blocking listening socket whose accepted sockets inherit `TCP_NODELAY` (Linux copies it
/// from the listening socket), sparing a `setsockopt` per connection.
pub(crate) fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use socket2::SockRef;

    use super::*;

    #[tokio::test]
    async fn connections_spread_over_the_workers_listeners() {
        let phase = Phase::new("test workers");
        let workers = ProxyWorkers::start(2, &phase).unwrap();
        let tracker = Phase::new("test listeners");
        let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let next = AtomicUsize::new(0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        workers
            .listen("127.0.0.1:0".parse().unwrap(), &tracker, |listener| {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (counts, tx) = (counts.clone(), tx.clone());
                let _ = tx.send(listener.local_addr().unwrap());
                let stop = tracker.token();
                async move {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    assert_eq!(
                        name,
                        format!("svcd-proxy-{i}"),
                        "listener {i} on its worker"
                    );
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            a = listener.accept() => match a {
                                Ok(_) => counts[i].fetch_add(1, Ordering::Relaxed),
                                Err(_) => return,
                            },
                        };
                    }
                }
            })
            .unwrap();
        let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        assert_eq!(a, b, "every worker listens on the same address");
        for _ in 0..64 {
            let _c = tokio::net::TcpStream::connect(a).await.unwrap();
        }
        for _ in 0..100 {
            if counts[0].load(Ordering::Relaxed) + counts[1].load(Ordering::Relaxed) == 64 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (x, y) = (
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed),
        );
        assert_eq!(x + y, 64);
        assert!(x > 0 && y > 0, "the kernel spread connections: {x} and {y}");
        tracker.stop().await;
        phase.stop().await;
        assert_eq!(phase.live(), 0, "the worker threads ended");
    }

    #[test]
    fn one_worker_does_not_share_its_port() {
        let first = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        assert!(bind_listener(addr, false).is_err());
        assert!(SockRef::from(&first).tcp_nodelay().unwrap());
    }
}
