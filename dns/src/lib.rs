//! svcd DNS responder: service names → the IPs of healthy instances, straight from the registry
//! snapshot (no store read per query, no lock), following the Kubernetes DNS naming scheme.
//!
//! ```text
//!  UDP packet ──► worker thread (SO_REUSEPORT socket each)
//!                   │ fastpath: A/AAAA <svc>.<ns>.svc.<domain>, pre-encoded per service version
//!                   │   hit ──► patch ID/question/rotation ──► send
//!                   └ miss ──► hickory parse ──► handler ──► answer::resolve ──► send (same batch)
//!  UDP: rate limit per client network (rrl) before either path
//!  TCP ──► tcp (limits per client, total, idle) ──► hickory parse ──► handler ──► answer::resolve
//!  out of zone ──► forwarding: inflight (bounded, identical questions once) ──► tokio task,
//!                  tracked ──► forward (hickory-resolver) ──► every waiter │ REFUSED without
//! ```
//!
//! * [`zone`]: which part of the zone a name points at.
//! * [`consul`]: Consul-style names (`<svc>.service.consul`, tags, RFC 2782 SRV, nodes) when
//!   `[consul]` is on.
//! * [`answer`]: the rules — records, NXDOMAIN/NODATA with SOA, rotation, limits. Pure.
//! * [`handler`]: answers a hickory `Request` (opcode, EDNS, FORMERR/NOTIMP/BADVERS), or hands
//!   its question on for the upstream.
//! * [`forwarding`], [`inflight`], [`forward`]: questions for the upstream — led once however many
//!   ask, within bounds per worker and in all — and the resolver that asks them.
//! * [`fastpath`]: the hot query on raw bytes, identical in result to the handler.
//! * [`udp`]: worker threads; [`rrl`]: their rate limit per client network.
//! * [`tcp`]: length-prefixed queries over TCP with connection limits.

pub mod answer;
pub mod consul;
pub mod fastpath;
pub mod forward;
pub mod forwarding;
pub mod handler;
pub mod inflight;
pub mod metrics;
pub mod pending;
pub mod rrl;
pub mod tcp;
pub mod udp;
pub mod zone;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use svcd_config::DnsConfig;
use svcd_lifecycle::Phase;
use svcd_registry::SnapshotReader;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use handler::DnsResponder;
pub use metrics::DnsMetrics;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The cause is in the message, not a source: `main` prints the chain and would say it twice.
    #[error("dns.listen: cannot bind {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running DNS server (UDP workers + TCP with connection limits).
pub struct DnsServer {
    /// The first listen address (as bound: port 0 resolved).
    pub addr: SocketAddr,
    /// Every listen address, as bound.
    pub addrs: Vec<SocketAddr>,
    pub responder: Arc<DnsResponder>,
    /// Stops the UDP workers; set by `shutdown` or when the phase stops. A plain flag rather
    /// than the phase's token: the workers look at it once per batch, and a token's
    /// `is_cancelled` takes a lock.
    stop: Arc<AtomicBool>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
    /// Stops the TCP accept loop and, after their current query, its connections.
    tcp_stop: CancellationToken,
    /// The phase DNS runs in: the UDP worker threads, the TCP accept loop and connections, the
    /// forwarded questions and the loop probe are all its tasks, so its stop waits for them.
    phase: Phase,
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen` (the same port for both) and starts serving.
    pub async fn start(
        config: &DnsConfig,
        workers: usize,
        snapshot: SnapshotReader,
        prometheus: &prometheus::Registry,
        phase: &Phase,
    ) -> Result<DnsServer, DnsError> {
        let responder = DnsResponder::new(config, snapshot, DnsMetrics::new(prometheus)?);
        if config.listen.iter().any(|a| !a.ip().is_loopback()) && config.rrl.rate == 0 {
            tracing::warn!(
                listen = ?config.listen,
                "DNS listens beyond loopback without response rate limiting; set dns.rrl.rate"
            );
        }
        // The UDP threads look at a flag; this task of the phase sets it when the phase stops
        // (or `shutdown` does).
        let stop = Arc::new(AtomicBool::new(false));
        let (token, flag) = (phase.token(), stop.clone());
        phase.spawn(async move {
            token.cancelled().await;
            flag.store(true, Ordering::Relaxed);
        });
        let bind_err = |addr, cause| DnsError::Bind { addr, cause };
        let tcp_stop = phase.token();
        let forward_tasks = udp::ForwardTasks {
            runtime: tokio::runtime::Handle::current(),
            phase: phase.clone(),
        };
        let mut addrs = Vec::new();
        let mut udp_threads = Vec::new();
        for &listen in &config.listen {
            let (addr, threads) = udp::spawn(
                listen,
                workers,
                responder.clone(),
                forward_tasks.clone(),
                stop.clone(),
            )
            .map_err(|e| bind_err(listen, e))?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| bind_err(addr, e))?;
            phase.spawn(tcp::serve(
                listener,
                responder.clone(),
                tcp_stop.clone(),
                phase.clone(),
            ));
            addrs.push(addr);
            udp_threads.extend(threads);
        }
        responder.set_own_addresses(addrs.clone(), config);
        let server = DnsServer {
            addr: addrs[0],
            addrs,
            responder,
            stop,
            udp_threads,
            tcp_stop,
            phase: phase.clone(),
        };
        server.probe_forwarding_loop();
        Ok(server)
    }

    /// Asks this server for the forwarder's probe name, three times a second or more apart (a
    /// probe or its loop may be lost on a busy host, and an upstream may start forwarding back
    /// only just after this reload): if a query comes back through the upstreams, forwarding
    /// stops (see [`forward`]).
    fn probe_forwarding_loop(&self) {
        let Some(probe) = self.responder.loop_probe() else {
            return;
        };
        let target = self.addr;
        let responder = self.responder.clone();
        let stop = self.phase.token();
        self.phase.spawn(async move {
            let mut query = hickory_proto::op::Message::query();
            query.metadata.recursion_desired = true;
            query.add_query(hickory_proto::op::Query::query(
                probe.clone(),
                hickory_proto::rr::RecordType::HINFO,
            ));
            let Ok(bytes) = query.to_vec() else { return };
            let bind = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
                return;
            };
            for _ in 0..3 {
                // Stop once the forwarder changed (a reload probes anew) or found a loop.
                if responder.loop_probe().as_ref() != Some(&probe) || !responder.probe_sending() {
                    return;
                }
                let _ = socket.send_to(&bytes, target).await;
                let mut buf = [0u8; 512];
                let wait = async {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                tokio::select! {
                    _ = wait => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Applies reloadable settings (domain, TTLs, limits, upstreams); the listen address needs a
    /// restart.
    pub fn reconfigure(&self, config: &DnsConfig) {
        let before = self.responder.loop_probe();
        self.responder.reconfigure(config);
        if self.responder.loop_probe() != before {
            self.probe_forwarding_loop(); // a new forwarder: look for a loop again
        }
    }

    /// Stops accepting, answers questions still waiting on an upstream (SERVFAIL) and joins
    /// the UDP workers; TCP connections finish their current query. The phase's stop waits for
    /// the rest (connections, forwarded questions).
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tcp_stop.cancel();
        self.responder.stop_forwarding();
        let threads = std::mem::take(&mut self.udp_threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Runs one arbitrary packet through both UDP paths and checks the invariants: no panic, and any
/// response is at least a header, carries the request ID and fits what the client can receive.
/// Shared by the cargo-fuzz target and the corpus replay test.
#[doc(hidden)]
pub fn fuzz_one(responder: &DnsResponder, packet: &[u8]) {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime");
    }
    let limit = if packet.len() >= 12 && packet[10..12] == [0, 0] {
        512
    } else {
        handler::EDNS_PAYLOAD as usize
    };
    let check = |out: &[u8]| {
        assert!(out.len() >= 12, "response shorter than a header");
        assert!(
            out.len() <= limit,
            "response of {} bytes exceeds {limit}",
            out.len()
        );
        assert_eq!(out[..2], packet[..2], "response ID");
        assert!(out[2] & 0x80 != 0, "QR set");
    };
    if let Some(out) = fastpath::FastPath::new().answer(packet, responder) {
        check(out);
    }
    let src: SocketAddr = "127.0.0.1:53535".parse().expect("static address");
    let out = RUNTIME.with(|rt| rt.block_on(responder.answer_udp(packet.to_vec(), src)));
    if let Some(out) = out {
        check(&out);
    }
}

#[cfg(test)]
mod tests;
