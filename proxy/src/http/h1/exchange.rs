//! One request on the fast path: route, pick, send (retrying where the hyper path would), relay
//! the response, and account for it exactly as the hyper path does.

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::WriteHalf;
use tracing::debug;

use super::buffers;
use super::client::{self, ClientStream};
use super::head::{self, RequestInfo, ResponseInfo};
use super::pool::{self, UpstreamConn};
use super::read::{idle_timeout_notice, read_response_head, read_some};
use super::{ClientConn, Next};
use crate::http::body::InFlight;
use crate::http::framing::{FramingGuard, ResponseFraming};
use crate::http::metrics::{HttpSlot, Outcome};
use crate::http::outcome::{
    record_answer, record_no_answer, refusal, route, AccessEntry, Balancer, Refusal,
};
use crate::http::speaks_h1;
use svcd_lb::Slot;

/// How one attempt on one instance went.
enum Attempt {
    /// A response head arrived; the client's head is in `down_head`, the bytes after it in
    /// `rbuf`. `uploaded`: the whole request body had gone up (else the client connection
    /// cannot be reused: the rest of its body is unread).
    Answered {
        up: UpstreamConn,
        info: ResponseInfo,
        uploaded: bool,
    },
    /// No response head. `untouched`: the connection was reused and closed on us before any
    /// response byte (the instance dropped it while idle), so sending again is safe.
    Failed {
        outcome: Outcome,
        reason: &'static str,
        untouched: bool,
    },
    /// The client's body broke (abort, stall, malformed chunking): not the instance's doing.
    ClientFailed,
    /// The client closed its connection while the response was awaited.
    ClientGone,
}

impl<S: ClientStream> ClientConn<'_, S> {
    pub(super) async fn exchange(&mut self, info: RequestInfo, closing: bool) -> Next {
        let ctx = self.ctx;
        let settings = self.settings.clone();
        let settings = &*settings;
        let text = |r: std::ops::Range<usize>, buf: &BytesMut| -> String {
            String::from_utf8_lossy(&buf[r]).into_owned()
        };
        let host = std::str::from_utf8(&self.buf[info.host.clone()]).unwrap_or("");
        let full_path = std::str::from_utf8(&self.buf[info.path.clone()]).unwrap_or("/");
        let path = full_path.split('?').next().unwrap_or("/");
        let access = settings.l7.access_log.then(|| {
            AccessEntry::from_parts(&text(info.method.clone(), &self.buf), host, full_path)
        });
        if self.tls.is_some_and(|t| t.denied) {
            ctx.metrics.unrouted(StatusCode::FORBIDDEN.as_u16());
            let refused = (
                StatusCode::FORBIDDEN,
                "client certificate identity not allowed on this listener\n".into(),
                false,
            );
            return self.refuse(&info, refused, closing, None, access).await;
        }
        // Without a verified client certificate (plaintext too), routes with `allow` refuse.
        let identity = self.tls.and_then(|t| t.identity.as_ref());
        let routed = match route(ctx, settings, path, host, identity) {
            Ok(r) => r,
            Err(refused) => {
                ctx.metrics.unrouted(refused.0.as_u16());
                return self.refuse(&info, refused, closing, None, access).await;
            }
        };
        let balancer = &routed.balancer;
        let view = balancer.view(&routed.service);
        let Some(pick) = balancer.pick(&view) else {
            balancer.plane.response(503);
            let refused = refusal::no_healthy(&balancer.name);
            return self
                .refuse(&info, refused, closing, Some(balancer), access)
                .await;
        };
        if pick
            .slots
            .get(pick.first)
            .is_some_and(|s| !speaks_h1(s.endpoint.protocol))
        {
            return Next::Handoff; // HTTP/2 instances: hyper's client translates
        }
        if ctx.tls.upstream(balancer.name.as_str()).is_some() {
            return Next::Handoff; // TLS instances: hyper's pools for the service speak it
        }
        // The head is used; what follows it in `buf` is body or the next request.
        self.buf.advance(info.len);
        let retries = routed.retries.min(pick.slots.len().saturating_sub(1));
        let mut body = FramingGuard::body(info.framing);
        let mut fresh_only = false;
        let mut attempt = 0;
        let (slot, mut up, response, uploaded, in_flight) = loop {
            let Some(slot) = pick.attempt(attempt) else {
                let refused = refusal::none_answered(&balancer.name);
                return self
                    .answer_refusal(refused, closing, balancer, access)
                    .await;
            };
            let in_flight = InFlight::start(&slot.health, &balancer.plane.active);
            let started = Instant::now();
            let outcome = self
                .attempt(slot, &info, &mut body, routed.timeout, closing, fresh_only)
                .await;
            let seconds = started.elapsed().as_secs_f64();
            match outcome {
                Attempt::Answered {
                    up,
                    info: r,
                    uploaded,
                } => {
                    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
                    record_answer(balancer, &view, slot, status, seconds);
                    break (slot, up, r, uploaded, in_flight);
                }
                Attempt::Failed {
                    untouched: true, ..
                } if info.replayable() && !fresh_only => {
                    // A pooled connection the instance had closed: again, on a new one.
                    fresh_only = true;
                }
                Attempt::Failed {
                    outcome, reason, ..
                } => {
                    drop(in_flight);
                    debug!(service = %balancer.name, endpoint = %slot.health.id, reason, "upstream request failed");
                    record_no_answer(balancer, &view, slot, outcome, seconds, Some(reason));
                    let may_retry =
                        info.replayable() && (outcome == Outcome::ConnectError || info.idempotent);
                    if outcome != Outcome::Timeout && may_retry && attempt < retries {
                        balancer.plane.retries.inc();
                        attempt += 1;
                        fresh_only = false;
                        continue;
                    }
                    let refused = match outcome {
                        Outcome::Timeout => refusal::timed_out(&balancer.name),
                        _ => refusal::upstream_failed(&balancer.name, reason),
                    };
                    let closing = closing || !body.body_done();
                    return self
                        .answer_refusal(refused, closing, balancer, access)
                        .await;
                }
                Attempt::ClientGone => return Next::Close,
                Attempt::ClientFailed => {
                    drop(in_flight);
                    record_no_answer(balancer, &view, slot, Outcome::ClientError, seconds, None);
                    return self
                        .answer_refusal(refusal::body_failed(), true, balancer, access)
                        .await;
                }
            }
        };
        // A client whose body was cut short by the answer cannot send another request here.
        let closing = closing || !uploaded || response.framing == ResponseFraming::UntilClose;
        if closing && !response_says_close(&self.down_head) {
            mark_close(&mut self.down_head);
        }
        balancer.plane.response(response.status);
        if let Some(entry) = access {
            entry.log_for(
                &self.ip.to_string(),
                response.status,
                Some(balancer.name.as_str()),
            );
        }
        let relayed = self.relay_response(&mut up, response, slot).await;
        drop(in_flight);
        match relayed {
            Relayed::Done { reusable } => {
                if reusable && response.reusable {
                    let l7 = &self.settings.l7;
                    pool::put(up, l7.pool_max_idle_per_host);
                }
                if closing {
                    let _ = self.stream.shutdown().await;
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
            Relayed::UpstreamBroke => {
                balancer.failure(&view, slot, svcd_lb::Detector::Http, "response body failed");
                Next::Close
            }
            Relayed::ClientGone => Next::Close,
        }
    }

    /// Sends the request to `slot` and reads its response head.
    async fn attempt(
        &mut self,
        slot: &Slot<HttpSlot>,
        info: &RequestInfo,
        body: &mut FramingGuard,
        timeout: Duration,
        closing: bool,
        fresh_only: bool,
    ) -> Attempt {
        let l7 = &self.settings.l7;
        let metrics = &self.ctx.metrics;
        let mut up = match pool::checkout(slot, &self.settings, metrics, fresh_only).await {
            Ok(up) => up,
            Err(e) => {
                debug!(addr = %slot.addr, error = %e, "upstream connect failed");
                return Attempt::Failed {
                    outcome: Outcome::ConnectError,
                    reason: "connect failed",
                    untouched: false,
                };
            }
        };
        let reused = up.reused;
        let bytes_in = &slot.extra.metrics.bytes_in;
        // The head, with the body bytes already read.
        let head_len = self.up_head.len();
        let (used, _) = match body.feed_body(&self.buf) {
            Ok(progress) => progress,
            Err(()) => return Attempt::ClientFailed,
        };
        self.up_head.extend_from_slice(&self.buf[..used]);
        let sent = up.stream.write_all(&self.up_head).await;
        self.up_head.truncate(head_len);
        if sent.is_err() {
            return Attempt::Failed {
                outcome: Outcome::UpstreamError,
                reason: "upstream error",
                untouched: reused,
            };
        }
        self.buf.advance(used);
        bytes_in.inc_by(body.take_data());
        if body.body_done() && self.buf.is_empty() && self.rbuf.capacity() == 0 {
            // The request is all read: its buffer takes the response, so an exchange holds one
            // buffer, not two.
            std::mem::swap(&mut self.buf, &mut self.rbuf);
        }
        let idle = l7.idle_timeout;
        let ClientConn {
            stream,
            buf,
            rbuf,
            down_head,
            ..
        } = self;
        buffers::head_room(down_head);
        let mut uploaded = body.body_done();
        let got = {
            let (up_read, mut up_write) = up.stream.split();
            let head =
                read_response_head(up_read.as_ref(), rbuf, info.head_method, closing, down_head);
            tokio::pin!(head);
            let mut early = None;
            if !uploaded {
                // The rest of the body goes up while the response head is awaited: an instance
                // may answer early (413, 401) without reading it all. The request timeout starts
                // once the body is all sent.
                let upload = upload(stream, buf, body, &mut up_write, idle, bytes_in);
                tokio::pin!(upload);
                tokio::select! {
                    r = &mut upload => match r {
                        Ok(()) => uploaded = true,
                        Err(UploadError::Client) => return Attempt::ClientFailed,
                        // The instance stopped reading; it may still answer.
                        Err(UploadError::Upstream) => {}
                    },
                    h = &mut head => early = Some(h),
                }
            }
            match early {
                Some(h) => Some(h),
                None => tokio::select! {
                    h = &mut head => Some(h),
                    _ = tokio::time::sleep(timeout) => None,
                    // hyper drops a request whose client closed (no half-close); so does this.
                    _ = client_gone(stream, buf, l7.max_header_bytes), if uploaded => {
                        return Attempt::ClientGone;
                    }
                },
            }
        };
        match got {
            None => Attempt::Failed {
                outcome: Outcome::Timeout,
                reason: "timeout",
                untouched: false,
            },
            Some(Ok(answer))
                if reused && info.replayable() && idle_timeout_notice(answer.status) =>
            {
                // The instance's "closed while idle" notice, not an answer to this request.
                Attempt::Failed {
                    outcome: Outcome::UpstreamError,
                    reason: "upstream error",
                    untouched: true,
                }
            }
            Some(Ok(info)) => Attempt::Answered { up, info, uploaded },
            Some(Err(nothing_read)) => Attempt::Failed {
                outcome: Outcome::UpstreamError,
                reason: "upstream error",
                untouched: reused && nothing_read,
            },
        }
    }

    /// Sends the response head already in `down_head` with the body bytes after it in `rbuf`,
    /// then the rest of the body, by its framing.
    async fn relay_response(
        &mut self,
        up: &mut UpstreamConn,
        response: ResponseInfo,
        slot: &Slot<HttpSlot>,
    ) -> Relayed {
        let idle = self.settings.l7.idle_timeout;
        let bytes_out = &slot.extra.metrics.bytes_out;
        self.rbuf.advance(response.len);
        let mut tracker = match response.framing {
            ResponseFraming::Body(f) => Some(FramingGuard::body(f)),
            ResponseFraming::UntilClose => None,
        };
        let mut clean = true;
        let Ok((first, mut done)) = follow(&mut tracker, &self.rbuf, &mut clean, bytes_out) else {
            return Relayed::UpstreamBroke;
        };
        self.down_head.extend_from_slice(&self.rbuf[..first]);
        if !write_timed(&mut self.stream, &self.down_head, idle).await {
            return Relayed::ClientGone;
        }
        while !done {
            self.rbuf.clear();
            buffers::room_for_body(&mut self.rbuf);
            let n = match tokio::time::timeout(idle, read_some(&up.stream, &mut self.rbuf)).await {
                Ok(Ok(n)) => n,
                _ => return Relayed::UpstreamBroke,
            };
            if n == 0 {
                if tracker.is_none() {
                    break; // the body ends with the connection
                }
                return Relayed::UpstreamBroke;
            }
            let Ok((part, ended)) = follow(&mut tracker, &self.rbuf, &mut clean, bytes_out) else {
                return Relayed::UpstreamBroke;
            };
            done = ended;
            if !write_timed(&mut self.stream, &self.rbuf[..part], idle).await {
                return Relayed::ClientGone;
            }
        }
        Relayed::Done {
            reusable: clean && tracker.is_some(),
        }
    }

    /// Answers with svcd's own response where the request was not routed or picked; `counted`:
    /// the service's balancer, when it already counted the response.
    async fn refuse(
        &mut self,
        info: &RequestInfo,
        refused: Refusal,
        closing: bool,
        counted: Option<&Balancer>,
        access: Option<AccessEntry>,
    ) -> Next {
        // The body was not read: the connection cannot carry another request.
        let closing = closing || refused.2 || !info.replayable();
        if info.replayable() {
            self.buf.advance(info.len);
        }
        if let Some(entry) = access {
            entry.log_for(
                &self.ip.to_string(),
                refused.0.as_u16(),
                counted.map(|b| b.name.as_str()),
            );
        }
        self.send_local(refused, closing).await
    }

    /// Answers with svcd's own response after an attempt failed.
    async fn answer_refusal(
        &mut self,
        refused: Refusal,
        closing: bool,
        balancer: &Balancer,
        access: Option<AccessEntry>,
    ) -> Next {
        balancer.plane.response(refused.0.as_u16());
        if let Some(entry) = access {
            entry.log_for(
                &self.ip.to_string(),
                refused.0.as_u16(),
                Some(balancer.name.as_str()),
            );
        }
        self.send_local(refused, closing).await
    }

    /// The answer to a head past `max_header_bytes` (hyper's, on its path); the connection
    /// closes.
    pub(super) async fn too_large(&mut self) {
        let refused = (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            String::new(),
            true,
        );
        self.send_local(refused, true).await;
    }

    async fn send_local(&mut self, (status, text, close): Refusal, closing: bool) -> Next {
        let closing = closing || close;
        buffers::head_room(&mut self.down_head);
        head::write_local(&mut self.down_head, status, &text, closing);
        let idle = self.settings.l7.idle_timeout;
        if !write_timed(&mut self.stream, &self.down_head, idle).await {
            return Next::Close;
        }
        if closing {
            let _ = self.stream.shutdown().await;
            Next::Close
        } else {
            Next::KeepAlive
        }
    }
}

enum Relayed {
    Done {
        reusable: bool,
    },
    /// The instance reset, closed early, stalled or sent a malformed body: its failure.
    UpstreamBroke,
    /// The client went away or stopped reading: its own doing.
    ClientGone,
}

/// Follows the response body bytes in `data`: how many belong to the body (stray bytes past its
/// end are not relayed, and make the connection unusable: `clean` false), and whether it ended.
/// Err: a chunked body that cannot be parsed, the instance's error.
fn follow(
    tracker: &mut Option<FramingGuard>,
    data: &[u8],
    clean: &mut bool,
    bytes_out: &prometheus::IntCounter,
) -> Result<(usize, bool), ()> {
    match tracker {
        None => {
            bytes_out.inc_by(data.len() as u64);
            Ok((data.len(), false))
        }
        Some(t) => {
            let (used, done) = t.feed_body(data)?;
            bytes_out.inc_by(t.take_data());
            if used < data.len() {
                *clean = false;
            }
            Ok((used, done))
        }
    }
}

#[derive(Debug)]
enum UploadError {
    Client,
    Upstream,
}

/// The rest of the request body, client to instance.
async fn upload<S: ClientStream>(
    client: &mut S,
    buf: &mut BytesMut,
    body: &mut FramingGuard,
    up: &mut WriteHalf<'_>,
    idle: Duration,
    bytes_in: &prometheus::IntCounter,
) -> Result<(), UploadError> {
    while !body.body_done() {
        buffers::room_for_body(buf);
        match tokio::time::timeout(idle, client::read_some(client, buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(UploadError::Client),
        }
        let (used, _) = body.feed_body(buf).map_err(|()| UploadError::Client)?;
        if up.write_all(&buf[..used]).await.is_err() {
            return Err(UploadError::Upstream);
        }
        bytes_in.inc_by(body.take_data());
        buf.advance(used);
    }
    Ok(())
}

/// Resolves when the client closes its connection (or resets it). Bytes it sends meanwhile (a
/// pipelined request) are kept in `buf`, up to `limit`; then it stops looking.
async fn client_gone<S: ClientStream>(stream: &mut S, buf: &mut BytesMut, limit: usize) {
    loop {
        if buf.len() > limit {
            return std::future::pending().await;
        }
        buffers::room(buf);
        match client::read_some(stream, buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Writes all of `data` to the client within `idle`; false if the client is gone or stalled.
/// Flushed: TLS keeps records it could not send yet (TCP has nothing to flush).
async fn write_timed<S: ClientStream>(stream: &mut S, data: &[u8], idle: Duration) -> bool {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    matches!(tokio::time::timeout(idle, write).await, Ok(Ok(())))
}

fn response_says_close(head: &[u8]) -> bool {
    head.ends_with(b"connection: close\r\n\r\n")
}

/// Adds `connection: close` to a finished head.
fn mark_close(head: &mut Vec<u8>) {
    head.truncate(head.len() - 2);
    head.extend_from_slice(b"connection: close\r\n\r\n");
}
