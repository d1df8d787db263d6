//! A question on its way to the upstream, as data every stage shares: the query and what its
//! answer needs ([`PendingQuery`]), the client waiting on it ([`Waiter`], [`Reply`]), and the
//! answer a UDP worker keeps for a second ([`LearnedAnswer`]). The handler makes them, the
//! forwarding leads and answers them, the workers replay what they learned; this module depends
//! on none of those, so none of them depends on another in a circle.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use hickory_server::server::Request;
use tokio::sync::oneshot;

use crate::inflight::QuestionKey;
use crate::metrics::{rcode_index, Proto};

/// What [`DnsResponder::answer_now`] made of a packet.
pub enum Step {
    /// The response to send; `None`: send nothing.
    Done(Option<Vec<u8>>),
    /// A question for the upstream; answer it with [`DnsResponder::finish`].
    Forward(Box<PendingQuery>),
}

/// A query waiting on the upstream: what its answer needs (its own ID, question, EDNS and size)
/// and what its metrics need.
pub struct PendingQuery {
    pub(crate) request: Request,
    /// Its question as asked upstream: identical keys share one upstream query.
    pub key: QuestionKey,
    pub(crate) max_size: u16,
    pub(crate) proto: Proto,
    pub(crate) qtype: usize,
    /// RA as the zone said when the query came (forwarding on).
    pub(crate) recursion_available: bool,
    pub(crate) started: Instant,
}

/// A client waiting on a question: its query, and where its answer goes.
pub struct Waiter {
    pub query: Box<PendingQuery>,
    pub reply: Reply,
}

pub enum Reply {
    /// A UDP client, answered from a clone of its worker's socket. `learn`: the key under which
    /// that worker's fast path keeps the answer for a second, and the way back to the worker.
    Udp {
        socket: Arc<UdpSocket>,
        client: SocketAddr,
        learn: Option<(Vec<u8>, mpsc::Sender<LearnedAnswer>)>,
    },
    /// A task awaiting the answer (a DNS-over-TCP connection); `None`: nothing to send.
    Task(oneshot::Sender<Option<Vec<u8>>>),
}

/// Longest a worker replays one forwarded answer.
pub const FORWARD_CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// A forwarded answer for a worker to keep: sent back by the general path's task.
pub struct LearnedAnswer {
    pub(crate) key: Vec<u8>,
    pub(crate) response: Vec<u8>,
    pub(crate) until: Instant,
    pub(crate) rcode: usize,
}

impl LearnedAnswer {
    /// What the general path answered to the query `key` stands for, if it may be replayed: a
    /// whole (not truncated) NOERROR or NXDOMAIN answer whose records all have a TTL.
    pub fn of(key: Vec<u8>, response: &[u8]) -> Option<LearnedAnswer> {
        let message = hickory_proto::op::Message::from_vec(response).ok()?;
        let rcode = message.metadata.response_code;
        if message.metadata.truncation
            || !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        {
            return None;
        }
        let min_ttl = message
            .answers
            .iter()
            .chain(message.authorities.iter())
            .map(|r| r.ttl)
            .min()
            .unwrap_or(u32::MAX);
        if min_ttl == 0 {
            return None;
        }
        let keep = FORWARD_CACHE_FOR.min(std::time::Duration::from_secs(u64::from(min_ttl)));
        Some(LearnedAnswer {
            key,
            response: response.to_vec(),
            until: Instant::now() + keep,
            rcode: rcode_index(rcode),
        })
    }
}
