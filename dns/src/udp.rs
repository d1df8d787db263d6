//! UDP serving: one blocking socket per worker thread, all bound to the same port with
//! SO_REUSEPORT so the kernel spreads queries across them. Each worker answers hot queries on the
//! fast path inline and hands the rest to the tokio runtime (hickory), which sends the response
//! from a clone of the same socket.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use socket2::{Domain, Socket, Type};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::fastpath::{FastPath, LearnedAnswer};
use crate::handler::{DnsResponder, EDNS_PAYLOAD};
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

/// Collects one encoded response (the hickory path writes into it).
#[derive(Clone)]
struct BufferedResponse {
    max_size: u16,
    out: Arc<OnceLock<Vec<u8>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for BufferedResponse {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(self.max_size);
        let info = response.destructive_emit(&mut encoder)?;
        cut_at_record_boundary(&mut bytes);
        let _ = self.out.set(bytes);
        Ok(info)
    }
}

/// A response that did not fit the client's UDP size may end in a cut-off record (hickory
/// stops mid-record without EDNS, counting only the whole ones). Keep only whole, counted
/// records: truncate after the last one that decodes, fix the section counts and set TC, so
/// strict clients (kdig) read a valid message and retry over TCP.
fn cut_at_record_boundary(bytes: &mut Vec<u8>) {
    use hickory_proto::op::Query;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    if bytes.len() < 12 {
        return;
    }
    let count = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let sections = [count(bytes, 6), count(bytes, 8), count(bytes, 10)];
    // Decode over the whole message: compression pointers count from its first byte.
    let cut = {
        let mut decoder = BinDecoder::new(bytes);
        if decoder.read_slice(12).is_err() {
            return;
        }
        for _ in 0..count(bytes, 4) {
            if Query::read(&mut decoder).is_err() {
                return; // the question is ours and whole; nothing sensible to cut
            }
        }
        let mut kept = [0u16; 3];
        let mut cut = None;
        'sections: for (section, &n) in sections.iter().enumerate() {
            for _ in 0..n {
                let start = decoder.index();
                if Record::read(&mut decoder).is_err() {
                    cut = Some((start, kept));
                    break 'sections;
                }
                kept[section] += 1;
            }
        }
        // Every counted record is whole, but bytes of one left out may follow them.
        cut.or((decoder.index() < bytes.len()).then_some((decoder.index(), kept)))
    };
    if let Some((end, kept)) = cut {
        bytes.truncate(end);
        bytes[2] |= 0x02; // TC
        for (i, k) in kept.iter().enumerate() {
            bytes[6 + 2 * i..8 + 2 * i].copy_from_slice(&k.to_be_bytes());
        }
    }
}

/// FORMERR for a packet whose header parsed but whose body did not.
fn formerr(packet: &[u8]) -> Vec<u8> {
    let mut out = packet[..12].to_vec();
    out[2] = 0x80 | (packet[2] & 0x78) | (packet[2] & 0x01); // QR, request opcode, RD
    out[3] = 0x01; // FORMERR
    out[4..12].fill(0);
    out
}

impl DnsResponder {
    /// The general path for one UDP packet: `None` means drop (not a query, or too short to
    /// answer at all).
    pub async fn answer_udp(&self, packet: Vec<u8>, src: SocketAddr) -> Option<Vec<u8>> {
        self.answer(packet, src, Protocol::Udp).await
    }

    /// One query's answer over `protocol` (UDP: sized to what the client can receive; TCP: up
    /// to 64 KiB). `None` means drop.
    pub async fn answer(
        &self,
        packet: Vec<u8>,
        src: SocketAddr,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            self.metrics.dropped.inc();
            return None; // no header, or a response: never answer (reflection loops)
        }
        let proto = match protocol {
            Protocol::Udp => crate::metrics::Proto::Udp,
            _ => crate::metrics::Proto::Tcp,
        };
        let request = match Request::from_bytes(packet.clone(), src, protocol) {
            Ok(r) => r,
            Err(e) => {
                debug!(%src, error = %e, "malformed DNS packet");
                let info_rcode =
                    crate::metrics::rcode_index(hickory_proto::op::ResponseCode::FormErr);
                self.metrics.record(proto, 9, info_rcode, Duration::ZERO);
                return Some(formerr(&packet));
            }
        };
        let max_size = match (&request.edns, protocol) {
            (_, Protocol::Tcp) => u16::MAX,
            (Some(edns), _) => edns.max_payload().clamp(512, EDNS_PAYLOAD),
            (None, _) => 512,
        };
        let out = BufferedResponse {
            max_size,
            out: Arc::new(OnceLock::new()),
        };
        self.respond(&request, out.clone()).await;
        Arc::try_unwrap(out.out).ok().and_then(OnceLock::into_inner)
    }
}

/// Starts `workers` threads serving UDP on `addr` (port 0: the first socket picks one and the
/// rest join it). Returns the bound address and the threads; they exit once `stop` is set
/// (checked before every batch, and when the socket's read times out).
pub fn spawn(
    addr: SocketAddr,
    workers: usize,
    responder: Arc<DnsResponder>,
    runtime: Handle,
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
        let runtime = runtime.clone();
        let stop = stop.clone();
        let socket = Arc::new(socket);
        threads.push(
            std::thread::Builder::new()
                .name(format!("svcd-dns-udp-{i}"))
                .spawn(move || serve(socket, responder, runtime, stop))?,
        );
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

/// A worker: read a batch of queries with one `recvmmsg`, answer the hot ones into an outgoing
/// batch, send it with one `sendmmsg`; the rest go to the runtime.
fn serve(
    socket: Arc<UdpSocket>,
    responder: Arc<DnsResponder>,
    runtime: Handle,
    stop: Arc<AtomicBool>,
) {
    let fd = socket.as_raw_fd();
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
                let packet = packet.to_vec();
                let (socket, responder) = (socket.clone(), responder.clone());
                // A forwarded answer comes back to this worker to be replayed for a second.
                let learn = fast
                    .take_forward_miss()
                    .map(|key| (key, learned_tx.clone()));
                runtime.spawn(async move {
                    if let Some(response) = responder.answer_udp(packet, src).await {
                        if let Err(e) = socket.send_to(&response, src) {
                            debug!(%src, error = %e, "DNS UDP send failed");
                        }
                        if let Some((key, to_worker)) = learn {
                            if let Some(learned) = LearnedAnswer::of(key, &response) {
                                let _ = to_worker.send(learned);
                            }
                        }
                    }
                });
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
