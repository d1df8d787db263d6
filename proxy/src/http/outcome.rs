//! What becomes of a request on either HTTP path (hyper's handler in `forward`, the fast path
//! in `h1::exchange`): where it is routed, svcd's own answers when no instance answers, how each
//! attempt is counted and judged, and its access-log line. One copy, so both paths route,
//! refuse, count and blame alike (`tests/it/fast_path.rs` compares them).

use std::sync::Arc;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use svcd_lb::{Detector, ServiceBalancer, Slot, View};

use super::metrics::{HttpSlot, HttpSlots, Outcome};
use super::route::MAX_HOST;
use super::{HttpContext, HttpSettings};

/// One access-log line's request half, taken before the request is forwarded.
pub(crate) struct AccessEntry {
    started: std::time::Instant,
    method: http::Method,
    host: String,
    path: String,
}

impl AccessEntry {
    pub(crate) fn of(req: &Request<Incoming>) -> AccessEntry {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
            .unwrap_or("");
        AccessEntry {
            started: std::time::Instant::now(),
            method: req.method().clone(),
            host: host.to_string(),
            path: req.uri().path().to_string(),
        }
    }

    /// The fast path's entry, from the head's parts.
    pub(crate) fn from_parts(method: &str, host: &str, path: &str) -> AccessEntry {
        AccessEntry {
            started: std::time::Instant::now(),
            method: http::Method::from_bytes(method.as_bytes()).unwrap_or_default(),
            host: host.to_string(),
            path: path.split('?').next().unwrap_or("").to_string(),
        }
    }

    pub(crate) fn log_for(self, client: &str, status: u16, service: Option<&str>) {
        tracing::info!(
            target: "svcd::access",
            client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status,
            service = service.unwrap_or(""),
            ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "access"
        );
    }
}

/// svcd's own answer instead of a forwarded one: status, text, and whether to close.
pub(crate) type Refusal = (StatusCode, String, bool);
pub(crate) type Balancer = ServiceBalancer<HttpSlots>;

/// A routed request: its balancer and instances.
pub(crate) struct Routed {
    pub balancer: Arc<Balancer>,
    pub service: Arc<svcd_registry::ServiceEndpoints>,
    pub timeout: std::time::Duration,
    pub retries: usize,
}

/// The answers both HTTP paths give when no instance answers, word for word.
pub(crate) mod refusal {
    use super::{Refusal, StatusCode};

    pub fn no_healthy(service: &impl std::fmt::Display) -> Refusal {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy instance of {service}\n"),
            false,
        )
    }

    pub fn body_failed() -> Refusal {
        (
            StatusCode::BAD_REQUEST,
            "malformed or incomplete request body\n".into(),
            true,
        )
    }

    /// `reason`: "connect failed" or "upstream error".
    pub fn upstream_failed(service: &impl std::fmt::Display, reason: &str) -> Refusal {
        let reason = reason.strip_prefix("upstream ").unwrap_or(reason);
        (
            StatusCode::BAD_GATEWAY,
            format!("{service}: upstream {reason}\n"),
            false,
        )
    }

    pub fn timed_out(service: &impl std::fmt::Display) -> Refusal {
        (
            StatusCode::GATEWAY_TIMEOUT,
            format!("{service}: upstream timed out\n"),
            false,
        )
    }

    pub fn none_answered(service: &impl std::fmt::Display) -> Refusal {
        (
            StatusCode::BAD_GATEWAY,
            format!("{service}: no instance answered\n"),
            false,
        )
    }
}

/// An attempt that got a response head: counted, and judged by its status.
pub(crate) fn record_answer(
    balancer: &Balancer,
    view: &View<HttpSlot>,
    slot: &Slot<HttpSlot>,
    status: StatusCode,
    seconds: f64,
) {
    balancer.plane.attempt(Outcome::Response, seconds);
    slot.extra
        .metrics
        .attempt(Outcome::Response, status.as_u16());
    if status.is_server_error() {
        balancer.failure(view, slot, Detector::Http, status.as_str());
    } else {
        balancer.success(slot, Detector::Http);
    }
}

/// An attempt that ended without a response head. `blame`: the backend's doing (the reason
/// recorded against it); `None` for the client's (nothing counted against the backend).
pub(crate) fn record_no_answer(
    balancer: &Balancer,
    view: &View<HttpSlot>,
    slot: &Slot<HttpSlot>,
    outcome: Outcome,
    seconds: f64,
    blame: Option<&str>,
) {
    balancer.plane.attempt(outcome, seconds);
    slot.extra.metrics.attempt(outcome, 0);
    if let Some(reason) = blame {
        balancer.failure(view, slot, Detector::Http, reason);
    }
}

/// `identity`: the client certificate an HTTPS listener verified (routes with `allow` need one
/// they list).
pub(crate) fn route(
    ctx: &HttpContext,
    settings: &HttpSettings,
    path: &str,
    host: &str,
    identity: Option<&svcd_tls::PeerIdentity>,
) -> Result<Routed, Refusal> {
    let mut buf = [0u8; MAX_HOST];
    let no_route = || {
        (
            StatusCode::NOT_FOUND,
            format!("no route for host {host:?}\n"),
            false,
        )
    };
    let target = settings
        .router
        .route(host, path, &mut buf)
        .ok_or_else(no_route)?;
    if !target.allow.is_empty() && !identity.is_some_and(|i| i.allowed(target.allow)) {
        return Err((
            StatusCode::FORBIDDEN,
            "client certificate identity not allowed on this route\n".into(),
            false,
        ));
    }
    let service = ctx
        .snapshot
        .load()
        .service(target.namespace, target.service)
        .cloned()
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no service {}.{}\n", target.service, target.namespace),
                false,
            )
        })?;
    let balancer = ctx
        .table
        .get(target.service, target.namespace, target.port)
        .ok_or_else(no_route)?;
    Ok(Routed {
        balancer,
        service,
        timeout: target.timeout,
        retries: target.retries,
    })
}
