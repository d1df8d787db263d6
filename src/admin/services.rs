//! `/v1/services…`: list services, show one, register / deregister instances.
//!
//! ```text
//! GET    /v1/services
//! GET    /v1/services/{ns}/{svc}
//! PUT    /v1/services/{ns}/{svc}/instances/{id}[?ttl=10s]   body: Instance JSON
//! GET    /v1/services/{ns}/{svc}/instances/{id}
//! DELETE /v1/services/{ns}/{svc}/instances/{id}
//! ```

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use svcd_registry::{Endpoint, Instance, InstanceKey, ServedState, ServiceEndpoints, StoreError};

use super::{json_error, json_response, read_body, AdminState, ApiError, Body};

pub async fn route(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(3).collect(); // after "", "v1", "services"
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, []) => list_services(state),
        (_, []) => super::method_not_allowed("GET"),
        (Method::GET, [ns, svc]) => show_service(state, ns, svc),
        (_, [_, _]) => super::method_not_allowed("GET"),
        (method, [ns, svc, "instances", id]) => {
            let key = match InstanceKey::new(ns, svc, id) {
                Ok(key) => key,
                Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.path, e.message),
            };
            match method {
                Method::GET => show_instance(state, &key),
                Method::PUT => put_instance(state, key, req).await,
                Method::DELETE => delete_instance(state, &key).await,
                _ => super::method_not_allowed("GET, PUT, DELETE"),
            }
        }
        (Method::POST, [ns, svc, "instances", id, "drain"]) => {
            match InstanceKey::new(ns, svc, id) {
                Ok(key) => drain_instance(state, &key).await,
                Err(e) => json_error(StatusCode::BAD_REQUEST, &e.path, e.message),
            }
        }
        (_, [_, _, "instances", _, "drain"]) => super::method_not_allowed("POST"),
        _ => json_error(
            StatusCode::NOT_FOUND,
            "",
            format!("no such endpoint: {path}"),
        ),
    }
}

fn list_services(state: &AdminState) -> Response<Body> {
    let snapshot = state.registry.reader().load_full();
    let mut services: Vec<Value> = snapshot
        .services()
        .map(|s| {
            let counts = s.count_by_state();
            let mut by_state = serde_json::Map::new();
            for state in ServedState::ALL {
                by_state.insert(state.as_str().into(), json!(counts[state as usize]));
            }
            json!({
                "namespace": s.namespace,
                "service": s.service,
                "instances": s.all.len(),
                "healthy": s.healthy.len(),
                "by_state": by_state,
            })
        })
        .collect();
    services.sort_by(|a, b| {
        (a["namespace"].as_str(), a["service"].as_str())
            .cmp(&(b["namespace"].as_str(), b["service"].as_str()))
    });
    json_response(
        StatusCode::OK,
        &json!({ "revision": snapshot.revision, "services": services }),
    )
}

fn endpoint_json(e: &Endpoint) -> Value {
    let mut v = serde_json::to_value(e.to_instance()).expect("instance serializes");
    v["id"] = json!(e.id);
    v["mod_revision"] = json!(e.mod_revision);
    v
}

/// `endpoint_json` plus how this node serves the instance: `served_state` (the one state DNS,
/// the proxies, the CLI and the metrics use) and, when this node ejected it, the ejection: which
/// detectors hold it, why, since/until (RFC 3339) and how many times so far.
fn endpoint_json_here(service: &ServiceEndpoints, e: &Endpoint) -> Value {
    let mut v = endpoint_json(e);
    v["served_state"] = json!(service.served_state(e).as_str());
    if let Some(ej) = service.ejection(&e.id) {
        v["ejection"] = json!({
            "holders": ej.holders,
            "reason": ej.reason,
            "since": humantime::format_rfc3339_seconds(ej.since).to_string(),
            "until": humantime::format_rfc3339_seconds(ej.until).to_string(),
            "count": ej.count,
        });
    }
    v
}

fn show_service(state: &AdminState, ns: &str, svc: &str) -> Response<Body> {
    let snapshot = state.registry.reader().load_full();
    match snapshot.service(ns, svc) {
        Some(s) => json_response(
            StatusCode::OK,
            &json!({
                "namespace": s.namespace,
                "service": s.service,
                "revision": snapshot.revision,
                "instances": s.all.iter().map(|e| endpoint_json_here(s, e)).collect::<Vec<_>>(),
            }),
        ),
        None => json_error(
            StatusCode::NOT_FOUND,
            "",
            format!("service {svc}.{ns} has no instances"),
        ),
    }
}

fn show_instance(state: &AdminState, key: &InstanceKey) -> Response<Body> {
    let snapshot = state.registry.reader().load_full();
    let found = snapshot
        .service(&key.namespace, &key.service)
        .and_then(|s| s.all.iter().find(|e| *e.id == *key.id).map(|e| (s, e)));
    match found {
        Some((s, e)) => json_response(StatusCode::OK, &endpoint_json_here(s, e)),
        None => json_error(
            StatusCode::NOT_FOUND,
            "",
            format!("instance {key} not found"),
        ),
    }
}

fn store_failure(e: StoreError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "",
        format!("registry store: {e}"),
    )
}

fn parse_ttl(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let mut ttl = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "ttl" {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                k,
                format!("unknown query parameter {k:?}"),
            ));
        }
        match humantime::parse_duration(v) {
            Ok(d) if d >= Duration::from_millis(500) => ttl = Some(d),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "ttl",
                    format!("invalid ttl {v:?}: want a duration of at least 500ms, e.g. \"10s\""),
                ))
            }
        }
    }
    Ok(ttl)
}

async fn put_instance(
    state: &AdminState,
    key: InstanceKey,
    req: Request<Incoming>,
) -> Response<Body> {
    match try_put_instance(state, key, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn try_put_instance(
    state: &AdminState,
    key: InstanceKey,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ttl = parse_ttl(req.uri().query())?;
    let body = read_body(req.into_body()).await?;
    let mut instance = Instance::from_json(&body).map_err(|e| {
        let field = if e.path.is_empty() {
            "body"
        } else {
            e.path.as_str()
        };
        ApiError::new(StatusCode::BAD_REQUEST, field, &e.message)
    })?;
    if instance.node.is_empty() {
        instance.node = state.config.load().registry.node.clone();
    }
    state
        .registry
        .keeper
        .register(key.clone(), instance.clone(), ttl)
        .await
        .map_err(store_failure)?;
    let mut v = serde_json::to_value(&instance).expect("instance serializes");
    v["id"] = json!(key.id);
    v["namespace"] = json!(key.namespace);
    v["service"] = json!(key.service);
    Ok(json_response(StatusCode::OK, &v))
}

async fn delete_instance(state: &AdminState, key: &InstanceKey) -> Response<Body> {
    match state.registry.keeper.deregister(key).await {
        Ok(true) => json_response(StatusCode::OK, &json!({ "deleted": key.to_string() })),
        Ok(false) => json_error(
            StatusCode::NOT_FOUND,
            "",
            format!("instance {key} not found"),
        ),
        Err(e) => store_failure(e).into_response(),
    }
}

/// `POST …/instances/{id}/drain`: `state = draining`. DNS stops returning the instance and the
/// proxies send it nothing new; open connections finish. Only the daemon holding the
/// registration can rewrite it (409 otherwise, naming the node that registered it).
async fn drain_instance(state: &AdminState, key: &InstanceKey) -> Response<Body> {
    match state
        .registry
        .keeper
        .set_state(key, svcd_registry::State::Draining)
        .await
    {
        Ok(Some(instance)) => {
            let mut v = serde_json::to_value(&instance).expect("instance serializes");
            v["id"] = json!(key.id);
            json_response(StatusCode::OK, &v)
        }
        Ok(None) => {
            let snapshot = state.registry.reader().load_full();
            let holder = snapshot
                .service(&key.namespace, &key.service)
                .and_then(|s| {
                    s.all
                        .iter()
                        .find(|e| *e.id == *key.id)
                        .map(|e| e.node.to_string())
                });
            match holder {
                Some(node) => json_error(
                    StatusCode::CONFLICT,
                    "",
                    format!(
                        "instance {key} is held by another daemon (node {node:?}); drain it there"
                    ),
                ),
                None => json_error(
                    StatusCode::NOT_FOUND,
                    "",
                    format!("instance {key} not found"),
                ),
            }
        }
        Err(e) => store_failure(e).into_response(),
    }
}
