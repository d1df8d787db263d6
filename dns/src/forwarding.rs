//! Asking the upstream for names outside the zone: one task per *question* under way, not per
//! query, within the bounds of [`crate::inflight`]; every client waiting on a question is answered
//! from its one upstream answer, with its own ID, question spelling and EDNS.
//!
//! ```text
//!  query ─► answer_now ─► Step::Forward ─► offer ─┬ Lead ─► lead(): ask upstream ─► answer all
//!                                                  ├ Joined (an identical question is under way)
//!                                                  └ Refused (a bound) ─► SERVFAIL now, counted
//! ```
//!
//! A UDP worker spawns the lead on the runtime, tracked (see [`crate::udp`]), and goes back to
//! its socket: it never waits for an upstream, so names in the zone are answered whatever the
//! upstream does. DNS over TCP leads in the connection's own task.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_server::net::xfer::Protocol;
use tokio::sync::oneshot;
use tracing::debug;

use crate::answer::Answer;
use crate::handler::DnsResponder;
use crate::inflight::{Admission, Lane, Lease};
use crate::pending::{LearnedAnswer, Reply, Step, Waiter};

/// What [`DnsResponder::offer`] did with a waiter.
pub enum Offered {
    /// Its question is new: the caller runs [`DnsResponder::lead`] with this lease.
    Lead(Lease<Waiter>),
    /// It waits on an identical question under way.
    Joined,
    /// Over a bound: its answer now (SERVFAIL).
    Refused(Option<Vec<u8>>),
}

impl DnsResponder {
    /// Offers a query for the upstream on `lane`: it leads its question, joins an identical one,
    /// or is refused (and counted) past the bounds.
    pub fn offer(&self, waiter: Waiter, lane: &Arc<Lane>) -> Offered {
        let key = waiter.query.key.clone();
        match self.inflight.admit(key, waiter, lane) {
            Admission::Lead(lease) => Offered::Lead(lease),
            Admission::Joined => {
                self.metrics.forward_coalesced.inc();
                Offered::Joined
            }
            Admission::Refused(waiter, limit) => {
                self.metrics.forward_overflow(limit).inc();
                debug!(?limit, "forwarded question over the bound; SERVFAIL");
                Offered::Refused(self.finish(&waiter.query, &Answer::rcode(ResponseCode::ServFail)))
            }
        }
    }

    /// Asks the upstream the lease's question (SERVFAIL at shutdown) and answers everyone waiting
    /// on it; the lease's slots are given back when this returns.
    pub async fn lead(&self, lease: Lease<Waiter>) {
        let answer = tokio::select! {
            answer = self.ask_upstream(lease.key()) => answer,
            _ = self.forward_stop.cancelled() => Answer::rcode(ResponseCode::ServFail),
        };
        for waiter in lease.complete() {
            self.deliver(waiter, &answer);
        }
    }

    fn deliver(&self, waiter: Waiter, answer: &Answer) {
        let out = self.finish(&waiter.query, answer);
        match waiter.reply {
            Reply::Task(to) => {
                let _ = to.send(out);
            }
            Reply::Udp {
                socket,
                client,
                learn,
            } => {
                let Some(response) = out else { return };
                if let Err(e) = socket.send_to(&response, client) {
                    debug!(%client, error = %e, "DNS UDP send failed");
                }
                if let Some((key, to_worker)) = learn {
                    if let Some(learned) = LearnedAnswer::of(key, &response) {
                        let _ = to_worker.send(learned);
                    }
                }
            }
        }
    }

    /// One query's answer over `protocol` (UDP: sized to what the client can receive; TCP: up
    /// to 64 KiB), waiting for the upstream if it must (on the general lane: DNS over TCP).
    /// `None` means drop.
    pub async fn answer(
        &self,
        packet: Vec<u8>,
        src: SocketAddr,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let query = match self.answer_now(packet, src, protocol) {
            Step::Done(out) => return out,
            Step::Forward(query) => query,
        };
        let (to, answered) = oneshot::channel();
        let waiter = Waiter {
            query,
            reply: Reply::Task(to),
        };
        match self.offer(waiter, &self.general_lane) {
            Offered::Lead(lease) => self.lead(lease).await,
            Offered::Joined => {}
            Offered::Refused(out) => return out,
        }
        answered.await.ok().flatten()
    }

    /// [`Self::answer`] over UDP.
    pub async fn answer_udp(&self, packet: Vec<u8>, src: SocketAddr) -> Option<Vec<u8>> {
        self.answer(packet, src, Protocol::Udp).await
    }

    /// Ends every question still waiting on an upstream: their clients get SERVFAIL.
    pub fn stop_forwarding(&self) {
        self.forward_stop.cancel();
    }
}

#[cfg(test)]
mod tests;
