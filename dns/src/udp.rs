//! UDP serving: one blocking socket per worker thread, all bound to the same port with
//! SO_REUSEPORT so the kernel spreads queries across them. Each worker answers every query it can
//! itself — the fast path, then hickory for the rest of the zone, refusals and errors — and
//! sends the batch; a question for the upstream is offered to [`crate::forwarding`], whose lead
//! runs on the tokio runtime, tracked, within the worker's share of `dns.forwarding`'s bounds.
//! The worker never waits on an upstream, so names in the zone never wait behind forwarded ones.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use socket2::{Domain, Socket, Type};
use svcd_lifecycle::Phase;
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::fastpath::FastPath;
use crate::forwarding::Offered;
use crate::handler::{DnsResponder, EDNS_PAYLOAD};
use crate::inflight::Lane;
use crate::pending::LearnedAnswer;
use crate::pending::Step;
use crate::pending::{Reply, Waiter};
use crate::rrl::{truncated_answer, Verdict};

/// How often a blocked worker wakes to check for shutdown.
const POLL: Duration = Duration::from_millis(100);

pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(4 << 20).ok();
    socket.bind(&addr.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Where a worker's forwarded questions run: the runtime, and the phase (DNS's) that tracks them
/// and the worker threads.
#[derive(Clone)]
pub struct ForwardTasks {
    pub runtime: Handle,
    pub phase: Phase,
}

/// Starts `workers` threads serving UDP on `addr` (port 0: the first socket picks one and the
/// rest join it). Returns the bound address and the threads; they exit once `stop` is set
/// (checked before every batch, and when the socket's read times out).
pub fn spawn(
    addr: SocketAddr,
    workers: usize,
    responder: Arc<DnsResponder>,
    tasks: ForwardTasks,
    stop: Arc<AtomicBool>,
) -> io::Result<(SocketAddr, Vec<JoinHandle<()>>)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers.max(1) {
        sockets.push(bind_reuseport(bound)?);
    }
    let mut threads = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let responder = responder.clone();
        let tasks = tasks.clone();
        let stop = stop.clone();
        let socket = Arc::new(socket);
        let phase = tasks.phase.clone();
        threads.push(phase.thread(format!("svcd-dns-udp-{i}"), move || {
            serve(socket, responder, tasks, stop)
        })?);
    }
    Ok((bound, threads))
}

/// Queries read (and answers written) per syscall.
const BATCH: usize = 32;
/// Receive buffer per query; larger datagrams arrive truncated and are answered FORMERR.
const RX_BUF: usize = 2048;

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(std::net::SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(std::net::SocketAddrV6::from(*v6)))
}

/// A worker: read a batch of queries with one `recvmmsg`, answer them into an outgoing batch,
/// send it with one `sendmmsg`; questions for the upstream are offered to the forwarding, led on
/// the runtime within this worker's lane.
fn serve(
    socket: Arc<UdpSocket>,
    responder: Arc<DnsResponder>,
    tasks: ForwardTasks,
    stop: Arc<AtomicBool>,
) {
    let fd = socket.as_raw_fd();
    let lane = Lane::new();
    let mut fast = FastPath::new();
    let mut rx_bufs = vec![[0u8; RX_BUF]; BATCH];
    let mut rx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx_bufs: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(EDNS_PAYLOAD as usize))
        .collect();
    let mut tx_addrs: Vec<Option<SockaddrStorage>> = vec![None; BATCH];
    let (learned_tx, learned_rx) = std::sync::mpsc::channel::<LearnedAnswer>();
    loop {
        // A plain atomic: a token's lock would sit on the per-batch path.
        if stop.load(Ordering::Relaxed) {
            return;
        }
        while let Ok(learned) = learned_rx.try_recv() {
            fast.learn(learned);
        }
        let mut ready = 0;
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = rx_bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            let received = match recvmmsg(
                fd,
                &mut rx_headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(r) => r,
                Err(Errno::EAGAIN) if stop.load(Ordering::Relaxed) => return,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "DNS UDP receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            // One clock read per batch, and none at all with rate limiting off.
            let now = if responder.rrl.enabled() {
                Some(responder.rrl.now())
            } else {
                None
            };
            for msg in received {
                let Some(addr) = msg.address else { continue };
                let packet = msg.iovs().next().unwrap_or(&[]);
                if let Some(now) = now {
                    let Some(client) = to_std(&addr) else {
                        continue;
                    };
                    match responder.rrl.check(client.ip(), now) {
                        Verdict::Answer => {}
                        Verdict::Truncate => {
                            if truncated_answer(packet, &mut tx_bufs[ready]).is_some() {
                                tx_addrs[ready] = Some(addr);
                                ready += 1;
                            }
                            responder.metrics.rrl_truncated.inc();
                            continue;
                        }
                        Verdict::Drop => {
                            responder.metrics.rrl_dropped.inc();
                            continue;
                        }
                    }
                }
                if let Some(response) = fast.answer(packet, &responder) {
                    tx_bufs[ready].clear();
                    tx_bufs[ready].extend_from_slice(response);
                    tx_addrs[ready] = Some(addr);
                    ready += 1;
                    continue;
                }
                let Some(src) = to_std(&addr) else { continue };
                // A forwarded answer comes back to this worker to be replayed for a second.
                let learn = fast.take_forward_miss();
                let out = match responder.answer_now(packet.to_vec(), src, Protocol::Udp) {
                    Step::Done(out) => out,
                    Step::Forward(query) => {
                        let waiter = Waiter {
                            query,
                            reply: Reply::Udp {
                                socket: socket.clone(),
                                client: src,
                                learn: learn.map(|key| (key, learned_tx.clone())),
                            },
                        };
                        match responder.offer(waiter, &lane) {
                            Offered::Lead(lease) => {
                                let responder = responder.clone();
                                tasks.phase.spawn_on(
                                    async move { responder.lead(lease).await },
                                    &tasks.runtime,
                                );
                                None
                            }
                            Offered::Joined => None,
                            Offered::Refused(out) => out,
                        }
                    }
                };
                if let Some(response) = out {
                    tx_bufs[ready].clear();
                    tx_bufs[ready].extend_from_slice(&response);
                    tx_addrs[ready] = Some(addr);
                    ready += 1;
                }
            }
        }
        if ready > 0 {
            let iovs: Vec<[IoSlice<'_>; 1]> =
                tx_bufs[..ready].iter().map(|b| [IoSlice::new(b)]).collect();
            let cmsgs: [ControlMessage<'_>; 0] = [];
            if let Err(e) = sendmmsg(
                fd,
                &mut tx_headers,
                &iovs,
                &tx_addrs[..ready],
                cmsgs,
                MsgFlags::empty(),
            ) {
                debug!(error = %e, "DNS UDP batch send failed");
            }
        }
    }
}
