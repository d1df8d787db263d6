//! `/v1/services…`: list services, show one, register / deregister instances.
//!
//! ```text
//! GET    /v1/services[?limit=N&after=NS/SVC]                      one page, in name order
//! GET    /v1/services/{ns}/{svc}[?index=REV&wait=30s]                blocking query (Consul-style)
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
use tracing::warn;

use super::{json_error, json_response, read_body, AdminState, ApiError, Body};

pub async fn route(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(3).collect(); // after "", "v1", "services"
    let writes = matches!(
        (req.method(), parts.as_slice()),
        (&Method::PUT | &Method::DELETE, [_, _, "instances", _])
            | (&Method::POST, [_, _, "instances", _, "drain"])
    );
    if writes && state.config.load().registry.read_only {
        return read_only_refusal();
    }
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, []) => list_services(state, req.uri().query().unwrap_or("")),
        (_, []) => super::method_not_allowed("GET"),
        (Method::GET, [ns, svc]) => {
            // A name no registration could have is an error, not an empty service.
            for (field, label) in [("namespace", ns), ("service", svc)] {
                if let Err(e) = svcd_config::names::check_label(label) {
                    return json_error(StatusCode::BAD_REQUEST, field, format!("{label:?}: {e}"));
                }
            }
            match parse_blocking(req.uri().query()) {
                Ok(blocking) => show_service(state, ns, svc, blocking).await,
                Err(e) => e.into_response(),
            }
        }
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

fn read_only_refusal() -> Response<Body> {
    json_error(
        StatusCode::FORBIDDEN,
        "",
        "this node is read-only (registry.read_only = true): it serves DNS and proxies from the \
         registry but owns no registrations; register with a node that does",
    )
}

/// Services per page unless `limit` says otherwise, and the most a page may hold: a listing of a
/// 100k-service registry is a hundred bounded answers, never one 100k-entry JSON document.
const PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// One page of services in (namespace, service) order: those after the `after` cursor
/// (`ns/svc`, the previous page's `next`), at most `limit`. `next` is there while more follow.
fn list_services(state: &AdminState, query: &str) -> Response<Body> {
    let mut limit = PAGE;
    let mut after: Option<(String, String)> = None;
    for (k, v) in super::query::pairs(Some(query)) {
        match k.as_str() {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "limit",
                        format!("invalid limit {v:?}: a number from 1 to {MAX_PAGE}"),
                    )
                }
            },
            "after" => match v.split_once('/') {
                Some((ns, svc)) => after = Some((ns.to_string(), svc.to_string())),
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "after",
                        format!(
                            "invalid cursor {v:?}: NAMESPACE/SERVICE, the previous page's next"
                        ),
                    )
                }
            },
            _ => {}
        }
    }
    let snapshot = state.registry.reader().load_full();
    let mut all: Vec<&Arc<ServiceEndpoints>> = snapshot
        .services()
        .filter(|s| {
            after.as_ref().is_none_or(|(ns, svc)| {
                (s.namespace.as_ref(), s.service.as_ref()) > (ns.as_str(), svc.as_str())
            })
        })
        .collect();
    all.sort_unstable_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
    let more = all.len() > limit;
    all.truncate(limit);
    let next = more
        .then(|| all.last().map(|s| format!("{}/{}", s.namespace, s.service)))
        .flatten();
    let services: Vec<Value> = all
        .iter()
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
    let mut page = json!({
        "revision": snapshot.revision,
        "synced": state.registry.status.is_synced(),
        "services": services,
    });
    if let Some(next) = next {
        page["next"] = json!(next);
    }
    json_response(StatusCode::OK, &page)
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

/// `?index=REV&wait=DURATION`: answer once the service has changed past `REV` (its `index`,
/// the store revision of its last change), or when `wait` (default 5m, at most 10m) is over,
/// whichever is first — as Consul's blocking queries. Without `index` the answer is immediate.
struct Blocking {
    index: Option<i64>,
    wait: Duration,
}

fn parse_blocking(query: Option<&str>) -> Result<Blocking, ApiError> {
    let mut b = Blocking {
        index: None,
        wait: Duration::from_secs(300),
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "index" => {
                b.index = Some(v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "index",
                        format!("invalid index {v:?}"),
                    )
                })?)
            }
            "wait" => match humantime::parse_duration(v) {
                Ok(d) if d <= Duration::from_secs(600) => b.wait = d,
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "wait",
                        format!("invalid wait {v:?}: a duration of at most 10m, e.g. \"30s\""),
                    ))
                }
            },
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    k,
                    format!("unknown query parameter {k:?}"),
                ))
            }
        }
    }
    Ok(b)
}

/// The service's index: see [`svcd_registry::EndpointSnapshot::service_index`] (never 0, never
/// backwards).
fn service_index(snapshot: &svcd_registry::EndpointSnapshot, ns: &str, svc: &str) -> i64 {
    snapshot.service_index(ns, svc)
}

/// The blocking query of the admin API and the Consul API: waits (at most `wait`) until
/// `index_of` the current snapshot differs from `index`. Every publish wakes it, but it returns
/// only when *its* index moved, so a query on one service sleeps through churn in others.
pub(crate) async fn wait_for_index(
    reader: &svcd_registry::SnapshotReader,
    index: i64,
    wait: Duration,
    index_of: impl Fn(&svcd_registry::EndpointSnapshot) -> i64,
) {
    let mut changes = reader.changes();
    let _ = tokio::time::timeout(wait, async {
        while index_of(&reader.load()) == index {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Holds a gauge one higher while it lives (also when the client goes away mid-wait and the
/// handler's future is dropped).
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn raise(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn show_service(
    state: &AdminState,
    ns: &str,
    svc: &str,
    blocking: Blocking,
) -> Response<Body> {
    let reader = state.registry.reader();
    if let Some(index) = blocking.index {
        let _parked = GaugeGuard::raise(&state.blocking_queries);
        wait_for_index(&reader, index, blocking.wait, |s| service_index(s, ns, svc)).await;
    }
    let snapshot = reader.load_full();
    let index = service_index(&snapshot, ns, svc);
    let instances: Vec<Value> = match snapshot.service(ns, svc) {
        Some(s) => s.all.iter().map(|e| endpoint_json_here(s, e)).collect(),
        None if !state.registry.status.is_synced() => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "",
                "the daemon has not synced with its registry store yet".to_string(),
            )
        }
        // As Consul: a service without instances (its last one left, or none yet) is an empty
        // list, not an error, so a blocking query's client sees it go and come back.
        None => Vec::new(),
    };
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "namespace": ns,
            "service": svc,
            "revision": snapshot.revision,
            "index": index,
            "instances": instances,
        }),
    );
    response.headers_mut().insert(
        "x-svcd-index",
        http::HeaderValue::from_str(&index.to_string()).expect("digits"),
    );
    response
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

/// How long a write waits for this daemon's snapshot to show it before answering anyway
/// (`"visible": false`: the store has it, the watch is behind — e.g. while disconnected).
pub(crate) const VISIBLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until this daemon's snapshot shows what it wrote for `key` (at most
/// [`VISIBLE_TIMEOUT`]); whether it did.
async fn written_visible(state: &AdminState, key: &InstanceKey) -> bool {
    match state.registry.keeper.effective(key).await {
        Some(written) => {
            state
                .registry
                .wait_visible(key, Some(&written), VISIBLE_TIMEOUT)
                .await
        }
        None => false,
    }
}

/// [`written_visible`] for several keys, within one [`VISIBLE_TIMEOUT`].
async fn written_all_visible(state: &AdminState, keys: &[InstanceKey]) -> bool {
    let mut written = Vec::with_capacity(keys.len());
    for key in keys {
        match state.registry.keeper.effective(key).await {
            Some(instance) => written.push((key, instance)),
            None => return false,
        }
    }
    let wants: Vec<_> = written.iter().map(|(k, i)| (*k, Some(i))).collect();
    state
        .registry
        .wait_all_visible(&wants, VISIBLE_TIMEOUT)
        .await
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

/// A registration without `"ip"` gets this node's advertised address (`registry.advertise_ip`),
/// as the CLI sends it when `--ip` is not given. Anything that is not such an object is left for
/// the parser to refuse.
fn with_advertised_ip(body: bytes::Bytes, ip: std::net::IpAddr) -> bytes::Bytes {
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut fields)) if !fields.contains_key("ip") => {
            fields.insert("ip".into(), json!(ip.to_string()));
            serde_json::to_vec(&fields).map_or(body, bytes::Bytes::from)
        }
        _ => body,
    }
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
    let body = with_advertised_ip(read_body(req.into_body()).await?, state.advertise_ip);
    let instance = Instance::from_json(&body).map_err(|e| {
        let field = if e.path.is_empty() {
            "body"
        } else {
            e.path.as_str()
        };
        ApiError::new(StatusCode::BAD_REQUEST, field, &e.message)
    })?;
    let (written, visible) = register_instance(state, key.clone(), instance, ttl).await?;
    let mut v = serde_json::to_value(&written).expect("instance serializes");
    v["id"] = json!(key.id);
    v["namespace"] = json!(key.namespace);
    v["service"] = json!(key.service);
    v["visible"] = json!(visible);
    Ok(json_response(StatusCode::OK, &v))
}

/// Registers `instance` as `key` under this daemon's lease — the one path of the admin API's
/// `PUT …/instances/{id}` and the Consul agent's registration: validated, the node filled in,
/// written, and answered once this daemon's snapshot serves it. What was written (with a check,
/// `pending` until it first passes) and whether it became visible in time.
pub(crate) async fn register_instance(
    state: &AdminState,
    key: InstanceKey,
    mut instance: Instance,
    ttl: Option<Duration>,
) -> Result<(Instance, bool), ApiError> {
    if let Some(e) = instance.validate_registration().into_iter().next() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, &e.path, &e.message));
    }
    if instance.node.is_empty() {
        instance.node = state.config.load().registry.node.clone();
    }
    if instance.ip.is_loopback() && !state.advertise_ip.is_loopback() {
        warn!(
            instance = %key,
            ip = %instance.ip,
            "registration publishes a loopback address to every node; other nodes cannot reach it"
        );
    }
    let keeper = &state.registry.keeper;
    keeper
        .register(key.clone(), instance.clone(), ttl)
        .await
        .map_err(store_failure)?;
    // Read your writes: answer once this daemon's snapshot (DNS, proxies, API) holds it.
    let visible = written_visible(state, &key).await;
    let written = keeper.effective(&key).await.unwrap_or(instance);
    Ok((written, visible))
}

async fn delete_instance(state: &AdminState, key: &InstanceKey) -> Response<Body> {
    match state.registry.keeper.deregister(key).await {
        Ok(true) => {
            let visible = state
                .registry
                .wait_visible(key, None, VISIBLE_TIMEOUT)
                .await;
            json_response(
                StatusCode::OK,
                &json!({ "deleted": key.to_string(), "visible": visible }),
            )
        }
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
            // Read your writes: out of this daemon's DNS and proxy picks when this answers.
            let visible = written_visible(state, key).await;
            let mut v = serde_json::to_value(&instance).expect("instance serializes");
            v["id"] = json!(key.id);
            v["visible"] = json!(visible);
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

/// `POST /v1/drain`: every registration this daemon holds goes `draining` (the first step of
/// SIGTERM, for preStop hooks): other nodes stop sending while this one still serves.
pub async fn drain_own(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return super::method_not_allowed("POST");
    }
    if state.config.load().registry.read_only {
        return read_only_refusal();
    }
    match state.registry.keeper.drain_all().await {
        Ok(keys) => {
            // Read your writes, as a single drain: out of this daemon's picks when this answers.
            let visible = written_all_visible(state, &keys).await;
            json_response(
                StatusCode::OK,
                &json!({ "drained": keys.len(), "visible": visible }),
            )
        }
        Err(e) => store_failure(e).into_response(),
    }
}
