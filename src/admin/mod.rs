//! Admin API over hyper: health, readiness, metrics, effective config, and the registration
//! endpoints. Read-only endpoints use GET; anything that changes state uses PUT/POST/DELETE.

mod listener;
mod prometheus_sd;
pub mod query;
mod services;

pub use listener::{serve, AdminSocket, Surface};
pub(crate) use services::{register_instance, wait_for_index, VISIBLE_TIMEOUT};

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::{Encoder, TextEncoder};
use serde_json::json;
use svcd_config::Config;
use svcd_registry::Registry;

use crate::readiness::Readiness;

/// Largest request body accepted (a registration is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

pub type Body = Full<Bytes>;

/// Everything the handlers read. Shared by all connections; nothing here takes a lock on the
/// request path except the registration calls, which go through the lease keeper.
pub struct AdminState {
    pub config: Arc<ArcSwap<Config>>,
    /// Bearer token from `admin.token_file`, re-read on reload. `None`: no auth (loopback only,
    /// enforced by config validation).
    pub token: ArcSwap<Option<String>>,
    pub readiness: Arc<Readiness>,
    pub prometheus: prometheus::Registry,
    pub registry: Arc<Registry>,
    /// The address registrations without an `ip` get: `registry.advertise_ip`, or detected.
    pub advertise_ip: std::net::IpAddr,
    /// Keys the last reload could not apply: shown in `/v1/config` beside the running config.
    pub pending_restart: ArcSwap<Vec<crate::restart_keys::PendingKey>>,
    /// `svcd_admin_blocking_queries`: raised while a blocking query is parked.
    pub blocking_queries: prometheus::IntGauge,
    /// The bound on the Consul API's parked blocking queries (`consul.max_blocking_queries`).
    pub consul_blocking: crate::consul::BlockingSlots,
    /// The xDS server (`[xds] listen`), for `GET /v1/xds/clients`.
    pub xds: Option<Arc<svcd_xds::XdsServer>>,
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// `{"error": "...", "field": "..."}` — every client error names what was wrong.
pub fn json_error(
    status: StatusCode,
    field: &str,
    message: impl std::fmt::Display,
) -> Response<Body> {
    let mut value = json!({ "error": message.to_string() });
    if !field.is_empty() {
        value["field"] = json!(field);
    }
    json_response(status, &value)
}

pub(crate) fn method_not_allowed(allow: &str) -> Response<Body> {
    let mut resp = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "",
        format!("method not allowed; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, allow.parse().expect("static header value"));
    resp
}

/// Constant-time comparison so the token cannot be guessed byte by byte from response times.
pub(crate) fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminState {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let token = self.token.load();
        let Some(expected) = token.as_deref() else {
            return true;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| token_matches(expected, given.trim()))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        surface: Surface,
    ) -> Result<Response<Body>, Infallible> {
        if surface == Surface::Consul {
            return Ok(crate::consul::handle(&self, req).await);
        }
        let path = req.uri().path().to_string();
        if surface == Surface::Scrape
            && !matches!(
                path.as_str(),
                "/metrics" | "/healthz" | "/readyz" | "/v1/prometheus/sd"
            )
        {
            return Ok(json_error(
                StatusCode::NOT_FOUND,
                "",
                format!("{path} is not served here: this listener (admin.metrics_listen) serves /metrics, /healthz, /readyz and /v1/prometheus/sd only"),
            ));
        }
        // Probes carry no credentials; everything else needs the token when one is configured.
        let open = matches!(path.as_str(), "/healthz" | "/readyz");
        if !open && !self.authorized(&req) {
            let mut resp = json_error(
                StatusCode::UNAUTHORIZED,
                "",
                "missing or wrong bearer token",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header value"),
            );
            return Ok(resp);
        }
        let resp = match path.as_str() {
            "/healthz" => get_only(&req, || text(StatusCode::OK, "ok\n")),
            "/readyz" => get_only(&req, || match self.readiness.check() {
                Ok(None) => text(StatusCode::OK, "ready\n"),
                Ok(Some(note)) => text(StatusCode::OK, format!("ready ({note})\n")),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            }),
            "/metrics" => get_only(&req, || self.metrics()),
            "/v1/prometheus/sd" => get_only(&req, || prometheus_sd::handle(&self, &req)),
            "/v1/drain" => services::drain_own(&self, &req).await,
            "/v1/config" => get_only(&req, || {
                let config = self.config.load();
                let mut value = serde_json::to_value(&**config).expect("config serializes");
                let pending = self.pending_restart.load();
                if !pending.is_empty() {
                    value["pending_restart"] =
                        serde_json::to_value(&**pending).expect("pending keys serialize");
                }
                json_response(StatusCode::OK, &value)
            }),
            "/v1/xds/clients" => get_only(&req, || match &self.xds {
                Some(xds) => json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "listen": xds.addr(), "clients": xds.clients() }),
                ),
                None => json_error(
                    StatusCode::NOT_FOUND,
                    "",
                    "the xDS server is off (set [xds] listen)".to_string(),
                ),
            }),
            p if p == "/v1/services" || p.starts_with("/v1/services/") => {
                services::route(&self, req).await
            }
            _ => json_error(
                StatusCode::NOT_FOUND,
                "",
                format!("no such endpoint: {path}"),
            ),
        };
        Ok(resp)
    }

    fn metrics(&self) -> Response<Body> {
        self.registry.refresh_gauges();
        let families = self.prometheus.gather();
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode_utf8(&families, &mut out) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}\n"),
            );
        }
        drop(families);
        // Endpoint states straight from the snapshot (nothing retained between scrapes).
        let admin = &self.config.load().admin;
        self.registry.write_state_metrics(
            &mut out,
            admin.endpoint_state_series,
            admin.max_service_series,
        );
        let buf = out.into_bytes();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, TextEncoder::new().format_type())
            .body(Full::new(Bytes::from(buf)))
            .expect("static response parts are valid")
    }
}

fn get_only(req: &Request<Incoming>, f: impl FnOnce() -> Response<Body>) -> Response<Body> {
    match *req.method() {
        Method::GET | Method::HEAD => f(),
        _ => method_not_allowed("GET"),
    }
}

/// A client-facing failure; becomes `{"error", "field"}` JSON with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, field: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            status,
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        json_error(self.status, &self.field, self.message)
    }
}

/// Reads a request body up to [`MAX_BODY`].
pub async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
            format!("request body unreadable or over {MAX_BODY} bytes: {e}"),
        )),
    }
}
