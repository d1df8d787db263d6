//! The Consul-compatible HTTP subset on `consul.listen` (docs/consul.md): what Consul clients,
//! Prometheus's `consul_sd_configs` and service watchers read, over svcd's registry.
//!
//! ```text
//! GET /v1/health/service/<name>[?passing&tag=..&ns=..&index=..&wait=..]
//! GET /v1/catalog/services            GET /v1/catalog/service/<name>
//! GET /v1/catalog/datacenters         GET /v1/agent/services
//! PUT /v1/agent/service/register      PUT /v1/agent/service/deregister/<id>
//! GET /v1/agent/self                  GET /v1/status/leader, /v1/status/peers
//! ```
//!
//! Served by the admin listener's accept loop ([`crate::admin::Surface::Consul`]) with the admin
//! API's token (`X-Consul-Token`, `Authorization: Bearer` or `?token=`). Every answer carries
//! `X-Consul-Index` (> 0, never backwards: a service's index is its own,
//! [`svcd_registry::EndpointSnapshot::service_index`]), `X-Consul-KnownLeader` and
//! `X-Consul-LastContact`. A blocking query wakes only when its own index moves, and at most
//! `consul.max_blocking_queries` wait at once.

mod agent;
pub mod blocking;
mod params;
mod view;

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use svcd_registry::EndpointSnapshot;

use crate::admin::{AdminState, Body};
use params::Params;

pub use blocking::BlockingSlots;

/// A Consul-style error: plain text, as Consul answers.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut text = message.into();
    text.push('\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

/// A JSON answer with Consul's query headers.
fn answer(state: &AdminState, value: &Value, index: i64) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid");
    query_headers(state, &mut resp, index);
    resp
}

fn query_headers(state: &AdminState, resp: &mut Response<Body>, index: i64) {
    let status = &state.registry.status;
    let h = resp.headers_mut();
    h.insert(
        "x-consul-index",
        HeaderValue::from_str(&index.max(1).to_string()).expect("digits"),
    );
    h.insert(
        "x-consul-knownleader",
        HeaderValue::from_static(if status.is_synced() { "true" } else { "false" }),
    );
    h.insert(
        "x-consul-lastcontact",
        HeaderValue::from_str(&status.snapshot_age().as_millis().to_string()).expect("digits"),
    );
}

/// The Consul token a request carries, in any of the places Consul clients put it.
fn request_token(req: &Request<Incoming>) -> Option<String> {
    let headers = req.headers();
    if let Some(t) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(t.trim().to_string());
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    crate::admin::query::pairs(req.uri().query())
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

/// Answers one request of the Consul surface.
pub async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    if let Some(expected) = state.token.load().as_deref() {
        let given = request_token(&req);
        if !given.is_some_and(|g| crate::admin::token_matches(expected, &g)) {
            return error(
                StatusCode::FORBIDDEN,
                "Permission denied: missing or wrong token (X-Consul-Token: the admin API's token)",
            );
        }
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(2).collect(); // after "", "v1"
    let config = state.config.load();
    let params = match Params::parse(req.uri().query(), &config.consul) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let put = req.method() == Method::PUT || req.method() == Method::POST;
    match parts.as_slice() {
        ["health", "service", name] if get => health_service(state, name, &params).await,
        ["catalog", "service", name] if get => catalog_service(state, name, &params).await,
        ["catalog", "services"] if get => catalog_services(state, &params).await,
        ["catalog", "datacenters"] if get => {
            let index = catalog_index_now(state);
            answer(state, &serde_json::json!([config.consul.datacenter]), index)
        }
        ["agent", "self"] if get => agent::agent_self(state),
        ["agent", "services"] if get => agent::agent_services(state, &params).await,
        ["agent", "service", "register"] if put => agent::register(state, req, &params).await,
        ["agent", "service", "deregister", id] if put => {
            agent::deregister(state, id, &params).await
        }
        ["status", "leader"] if get => agent::leader(state),
        ["status", "peers"] if get => agent::peers(state),
        ["health", "service", _]
        | ["catalog", "service", _]
        | ["catalog", "services" | "datacenters"]
        | ["agent", "self" | "services"]
        | ["status", "leader" | "peers"] => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET",
        ),
        ["agent", "service", "register"] | ["agent", "service", "deregister", _] => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use PUT",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!(
                "{path} is not part of svcd's Consul API subset (docs/consul.md lists what is)"
            ),
        ),
    }
}

fn catalog_index_now(state: &AdminState) -> i64 {
    view::catalog_index(&state.registry.reader().load())
}

/// Parks a blocking query (when it has `?index=`) until `index_of` moves past it or its wait
/// ends; `Err` with the 429 answer when too many are parked already.
async fn block(
    state: &AdminState,
    params: &Params,
    index_of: impl Fn(&EndpointSnapshot) -> i64,
) -> Result<(), Response<Body>> {
    let Some(index) = params.index else {
        return Ok(());
    };
    let reader = state.registry.reader();
    if index_of(&reader.load()) != index {
        return Ok(()); // already moved (or a client from another store): answer at once
    }
    let limit = state.config.load().consul.max_blocking_queries;
    let Some(_slot) = state.consul_blocking.try_take(limit) else {
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many blocking queries are waiting (consul.max_blocking_queries = {limit}); \
                 retry later"
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(resp);
    };
    crate::admin::wait_for_index(&reader, index, params.wait, index_of).await;
    Ok(())
}

/// The 400 for a service name no svcd registration can have.
fn bad_name(name: &str) -> Option<Response<Body>> {
    svcd_config::names::check_label(name).err().map(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("service name {e}; svcd names are RFC 1123 labels"),
        )
    })
}

async fn health_service(state: &AdminState, name: &str, params: &Params) -> Response<Body> {
    if let Some(resp) = bad_name(name) {
        return resp;
    }
    let ns = params.namespace.as_str();
    if let Err(resp) = block(state, params, |s| s.service_index(ns, name)).await {
        return resp;
    }
    let snapshot = state.registry.reader().load_full();
    let config = state.config.load();
    let entries: Vec<Value> = snapshot
        .service(ns, name)
        .map(|s| {
            s.all
                .iter()
                .filter(|e| view::has_tags(e, &params.tags))
                .filter(|e| {
                    !params.passing || s.served_state(e) == svcd_registry::ServedState::Healthy
                })
                .map(|e| view::health_entry(&config.consul, s, e))
                .collect()
        })
        .unwrap_or_default();
    answer(
        state,
        &Value::Array(entries),
        snapshot.service_index(ns, name),
    )
}

async fn catalog_service(state: &AdminState, name: &str, params: &Params) -> Response<Body> {
    if let Some(resp) = bad_name(name) {
        return resp;
    }
    let ns = params.namespace.as_str();
    if let Err(resp) = block(state, params, |s| s.service_index(ns, name)).await {
        return resp;
    }
    let snapshot = state.registry.reader().load_full();
    let config = state.config.load();
    let entries: Vec<Value> = snapshot
        .service(ns, name)
        .map(|s| {
            s.all
                .iter()
                .filter(|e| view::has_tags(e, &params.tags))
                .map(|e| view::catalog_entry(&config.consul, s, e))
                .collect()
        })
        .unwrap_or_default();
    answer(
        state,
        &Value::Array(entries),
        snapshot.service_index(ns, name),
    )
}

async fn catalog_services(state: &AdminState, params: &Params) -> Response<Body> {
    if let Err(resp) = block(state, params, view::catalog_index).await {
        return resp;
    }
    let snapshot = state.registry.reader().load_full();
    answer(
        state,
        &view::catalog_services(&snapshot, &params.namespace),
        view::catalog_index(&snapshot),
    )
}

/// The longest a blocking query waits (as Consul: 10 minutes).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
