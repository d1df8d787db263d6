//! One request: check framing, route, pick, rewrite, send (retrying where safe), stream back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tracing::debug;

use svcd_lb::Slot;

use super::body::{
    local, Blame, InFlight, ProxyBody, RequestBody, ResponseSource, TrackedBody, Upload,
};
use super::framing::ConnWatch;
use super::h1::bridge;
use super::headers::{
    add_forwarding, declare_trailers, strip_hop_by_hop, wants_trailers, wants_upgrade,
    X_FORWARDED_CLIENT_CERT,
};
use super::host::request_host;
use super::metrics::{HttpSlot, Outcome};
use super::outcome::{
    record_answer, record_no_answer, refusal, route, AccessEntry, Balancer, Refusal,
};
use super::resets::{Stream, StreamLedger};
use super::speaks_h1;
use super::HttpContext;

/// What a request handler knows about its client connection.
pub struct ClientConn {
    pub watch: Arc<ConnWatch>,
    /// The client's IP as a header value, made once per connection for `X-Forwarded-For`.
    pub ip: HeaderValue,
    /// HTTP/2 streams opened and cancelled early, for the rapid-reset rule.
    pub streams: StreamLedger,
    /// Set on HTTPS listeners.
    pub tls: Option<ClientTls>,
}

/// What the handshake told about an HTTPS client, made once per connection.
pub struct ClientTls {
    /// Its `x-forwarded-client-cert` (Envoy's format) when it showed a verified certificate.
    pub xfcc: Option<HeaderValue>,
    /// The listener's `allow` list does not name its identity: every request is answered 403.
    pub denied: bool,
    /// The verified client certificate's identity, for routes with `allow`.
    pub identity: Option<svcd_tls::PeerIdentity>,
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub async fn handle(
    ctx: Arc<HttpContext>,
    client: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut service = None;
    // Only with the access log on: what it needs from the request, before `proxy` takes it.
    let access = ctx
        .settings
        .load()
        .l7
        .access_log
        .then(|| AccessEntry::of(&req));
    // An HTTP/2 stream the client resets before this yields is dropped with nothing sent.
    let stream = match req.version() {
        http::Version::HTTP_2 => Some(Stream::begin(&client.streams, &ctx.metrics).await),
        _ => None,
    };
    let response = proxy(&ctx, &client, req, &mut service)
        .await
        .unwrap_or_else(|(status, text, close)| local(status, text, close));
    if let Some(stream) = stream {
        stream.answered();
    }
    // What the client sees, whoever made it.
    let status = response.status().as_u16();
    match &service {
        Some(balancer) => balancer.plane.response(status),
        None => ctx.metrics.unrouted(status),
    }
    if let Some(entry) = access {
        let service = service.as_ref().map(|b| b.name.as_str());
        entry.log_for(client.ip.to_str().unwrap_or(""), status, service);
    }
    // While the upstream's body streams the connection is not idle, however quiet: the body's
    // own stall timer ends a stalled one. (Before the response head the idle check still runs,
    // so a client stalling its upload is closed as before.)
    let response = response.map(|body| match body {
        http_body_util::Either::Left(tracked) => http_body_util::Either::Left(
            tracked.holding(crate::http::framing::ConnBusy::start(&client.watch)),
        ),
        whole => whole,
    });
    Ok(response)
}

/// Routes, picks and forwards one request. `routed` is set once the request has a service, so
/// the caller counts the response under it.
async fn proxy(
    ctx: &Arc<HttpContext>,
    client: &ClientConn,
    mut req: Request<Incoming>,
    routed_to: &mut Option<Arc<Balancer>>,
) -> Result<Response<ProxyBody>, Refusal> {
    if client
        .watch
        .bad_framing
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "ambiguous request framing\n".into(),
            true,
        ));
    }
    if client.tls.as_ref().is_some_and(|t| t.denied) {
        return Err((
            StatusCode::FORBIDDEN,
            "client certificate identity not allowed on this listener\n".into(),
            false,
        ));
    }
    if req.method() == Method::CONNECT {
        // svcd routes requests to services; it is not a forward proxy.
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n".into(),
            true,
        ));
    }
    let host =
        request_host(&req).map_err(|why| (StatusCode::BAD_REQUEST, format!("{why}\n"), true))?;
    // Sent upstream as the Host (RFC 9112 §3.2.2: the target's authority, not a second Host).
    let host_value = HeaderValue::from_str(host)
        .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Host\n".into(), true))?;
    let settings = ctx.settings.load_full();
    let identity = client.tls.as_ref().and_then(|t| t.identity.as_ref());
    let routed = route(ctx, &settings, req.uri().path(), host, identity)?;
    let balancer = &routed.balancer;
    *routed_to = Some(balancer.clone());
    let view = balancer.view(&routed.service);
    let Some(pick) = balancer.pick(&view) else {
        return Err(refusal::no_healthy(&balancer.name));
    };

    let upgrade = wants_upgrade(req.version(), req.headers());
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let downstream_version = parts.version;
    let h1_wants_trailers =
        downstream_version == Version::HTTP_11 && wants_trailers(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // A client's own client-certificate claim never reaches an instance (Envoy's SANITIZE);
    // only the one this listener verified does.
    parts.headers.remove(X_FORWARDED_CLIENT_CERT);
    if let Some(xfcc) = client.tls.as_ref().and_then(|t| t.xfcc.clone()) {
        parts.headers.insert(X_FORWARDED_CLIENT_CERT, xfcc);
    }
    add_forwarding(
        &mut parts.headers,
        downstream_version,
        &client.ip,
        Some(host_value.clone()),
        client.tls.is_some(),
    );
    parts.headers.insert(header::HOST, host_value);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let retries = routed.retries.min(pick.slots.len().saturating_sub(1));
    // A bodiless request can be sent again. What rebuilds it is copied only when hyper-util's
    // client is about to take the request and another attempt may follow (the bridge borrows
    // the request and leaves it in `first`).
    let replayable = retries > 0 && body.is_end_stream();
    let mut replay: Option<(Method, http::HeaderMap)> = None;
    let may_retry_sent = idempotent(&parts.method);
    // Bodiless requests to HTTP/1.1 instances go out directly over the worker's pooled
    // connections (h1::bridge), unless the fast path is turned off.
    let bridgeable = settings.l7.http1_fast_path
        && !upgrade
        && bridge::bodiless(body.is_end_stream(), &parts.headers);
    let mut first = Some((parts, body));
    let worker = crate::workers::current().min(ctx.upstreams.len() - 1);
    let upstreams = ctx.upstreams[worker].load_full();
    let service_metrics = &balancer.plane;

    for attempt in 0..=retries {
        let Some(slot) = pick.attempt(attempt) else {
            break;
        };
        let index = (pick.first + attempt) % pick.slots.len();
        let client_pool =
            upstreams.for_instance(balancer.name.as_str(), slot.endpoint.protocol, upgrade);
        let h2 = !upgrade && !speaks_h1(slot.endpoint.protocol);
        let bridged = bridgeable
            && speaks_h1(slot.endpoint.protocol)
            && !upstreams.is_tls(balancer.name.as_str());
        let bytes_in = slot.extra.metrics.bytes_in.clone();
        let (upload, request) = if bridged {
            (Upload::nothing_to_send(), None)
        } else {
            if let (true, None, Some((parts, _))) =
                (replayable && attempt < retries, &replay, &first)
            {
                replay = Some((parts.method.clone(), parts.headers.clone()));
            }
            let upload = Arc::new(Upload::default());
            let uri = upstream_uri(slot, path.clone());
            let request = upstream_request(first.take(), &replay, &upload, bytes_in, uri, h2);
            (upload, Some(request))
        };
        let in_flight = InFlight::start(&slot.health, &service_metrics.active);
        let started = Instant::now();
        let response = async {
            match request {
                Some(request) => client_pool
                    .request(request)
                    .await
                    .map(|r| r.map(ResponseSource::Hyper))
                    .map_err(SendError::Hyper),
                None => {
                    let (method, headers) = match &first {
                        Some((parts, _)) => (&parts.method, &parts.headers),
                        None => {
                            let (m, h) = replay.as_ref().expect("retries need a replay");
                            (m, h)
                        }
                    };
                    let req = bridge::BodilessRequest {
                        method,
                        path: &path,
                        headers,
                    };
                    bridge::send(req, slot, &settings, &ctx.metrics)
                        .await
                        .map(|r| r.map(|b| ResponseSource::Direct(Box::new(b))))
                        .map_err(SendError::Bridge)
                }
            }
        };
        let answered = tokio::select! {
            r = response => Some(r),
            _ = async { upload.sent().await; tokio::time::sleep(routed.timeout).await } => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let endpoint_metrics = &slot.extra.metrics;
        match answered {
            Some(Ok(mut response)) => {
                let status = response.status();
                record_answer(balancer, &view, slot, status, seconds);
                let switching = status == StatusCode::SWITCHING_PROTOCOLS;
                if let (true, Some(on_client)) = (switching, on_client_upgrade) {
                    // From the 101 on, the client's bytes are the tunnel's, not requests.
                    client
                        .watch
                        .upgraded
                        .store(true, std::sync::atomic::Ordering::Release);
                    let on_upstream = hyper::upgrade::on(&mut response);
                    let hard_stop = ctx.hard_stop.clone();
                    ctx.phase.spawn(async move {
                        let (Ok(down), Ok(up)) = tokio::join!(on_client, on_upstream) else {
                            return;
                        };
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        tokio::select! {
                            r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                                debug!(result = ?r, "upgraded connection closed");
                            }
                            _ = hard_stop.cancelled() => {}
                        }
                    });
                }
                strip_hop_by_hop(response.headers_mut(), switching);
                if h1_wants_trailers {
                    declare_trailers(response.headers_mut());
                }
                *response.version_mut() = downstream_version;
                let blame = Blame {
                    balancer: balancer.clone(),
                    view: view.clone(),
                    panic: pick.panic,
                    index,
                };
                let bytes_out = endpoint_metrics.bytes_out.clone();
                return Ok(response.map(|b| {
                    Either::Left(TrackedBody::new(
                        b,
                        bytes_out,
                        blame,
                        in_flight,
                        settings.l7.idle_timeout,
                    ))
                }));
            }
            Some(Err(e)) if upload.client_failed() => {
                // The client's body broke (aborted, reset, malformed chunking): nothing the
                // backend did. Not counted against it; the client gets 400 if it still listens.
                drop(in_flight);
                debug!(service = %balancer.name, endpoint = %slot.health.id, error = %e, "request body failed on the client's side");
                record_no_answer(balancer, &view, slot, Outcome::ClientError, seconds, None);
                return Err(refusal::body_failed());
            }
            Some(Err(e)) => {
                drop(in_flight);
                let connect = e.is_connect();
                let (outcome, reason) = if connect {
                    (Outcome::ConnectError, "connect failed")
                } else {
                    (Outcome::UpstreamError, "upstream error")
                };
                debug!(service = %balancer.name, endpoint = %slot.health.id, error = %e, "upstream request failed");
                record_no_answer(balancer, &view, slot, outcome, seconds, Some(reason));
                let can_retry = replayable && (connect || may_retry_sent);
                if can_retry && attempt < retries {
                    service_metrics.retries.inc();
                    continue;
                }
                return Err(refusal::upstream_failed(&balancer.name, reason));
            }
            None => {
                drop(in_flight);
                record_no_answer(
                    balancer,
                    &view,
                    slot,
                    Outcome::Timeout,
                    seconds,
                    Some("timeout"),
                );
                return Err(refusal::timed_out(&balancer.name));
            }
        }
    }
    Err(refusal::none_answered(&balancer.name))
}

/// The request for hyper-util's client: the client's own (the first attempt) or a bodiless one
/// rebuilt for a retry, addressed to the instance.
fn upstream_request(
    first: Option<(http::request::Parts, Incoming)>,
    replay: &Option<(Method, http::HeaderMap)>,
    upload: &Arc<Upload>,
    bytes_in: prometheus::IntCounter,
    uri: Uri,
    h2: bool,
) -> Request<RequestBody> {
    let mut request = match first {
        Some((parts, body)) => Request::from_parts(
            parts,
            RequestBody::new(Either::Left(body), upload.clone(), bytes_in),
        ),
        None => {
            let (method, headers) = replay.clone().expect("retries need a replayable request");
            let mut r = Request::new(RequestBody::new(
                Either::Right(Empty::new()),
                upload.clone(),
                bytes_in,
            ));
            *r.method_mut() = method;
            *r.headers_mut() = headers;
            r
        }
    };
    *request.uri_mut() = uri;
    *request.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if h2 {
        // HTTP/2 carries the authority as `:authority` (the instance address here); a Host
        // header beside it that differs is refused by servers such as nginx (RFC 9113 §8.3.1).
        // The client's host travels in X-Forwarded-Host.
        request.headers_mut().remove(header::HOST);
    }
    request
}

/// Why an attempt got no response head, from either client.
#[derive(Debug)]
enum SendError {
    Hyper(hyper_util::client::legacy::Error),
    Bridge(bridge::BridgeError),
}

impl SendError {
    fn is_connect(&self) -> bool {
        match self {
            SendError::Hyper(e) => e.is_connect(),
            SendError::Bridge(e) => matches!(e, bridge::BridgeError::Connect(_)),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Hyper(e) => e.fmt(f),
            SendError::Bridge(e) => e.fmt(f),
        }
    }
}

/// `http://<ip:port><path>`, from parts made once per instance.
fn upstream_uri(slot: &Slot<HttpSlot>, path: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(slot.extra.authority.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).expect("scheme, authority and path make a URI")
}
