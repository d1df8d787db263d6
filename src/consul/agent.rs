//! The agent endpoints: service registration mapped onto svcd registrations held by this
//! daemon's lease (the same path as `PUT /v1/services/{ns}/{svc}/instances/{id}`), the agent's
//! own description, and the leader a client asks for before it starts.
//!
//! A Consul registration `{Name, ID, Address, Port, Tags, Meta, Weights, Check}` becomes the
//! instance `<ID>` of service `<Name>` in namespace `?ns=` (or `Namespace`): `Port` is stored
//! under `consul.port_name`, `Weights.Passing` is the weight, and an HTTP, TCP or gRPC check
//! becomes the instance's active check (its port, when not the service's, as the named port
//! `check`). What svcd cannot keep (TTL and script checks, Connect, several checks) is refused
//! with a 400 naming it, never silently dropped.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use svcd_config::{CheckKind, CheckSpec, Instance};
use svcd_registry::InstanceKey;

use super::params::Params;
use super::{answer, error};
use crate::admin::{AdminState, ApiError, Body};

/// A body's keys as Consul reads them: case-insensitive, `_` ignored (`tagged_addresses` and
/// `TaggedAddresses` are one field).
fn fields(value: Value, what: &str) -> Result<Map<String, Value>, String> {
    match value {
        Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase().replace('_', ""), v))
            .collect()),
        _ => Err(format!("{what} must be a JSON object")),
    }
}

fn string(v: &Value, field: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{field} must be a string"))
}

/// Null, `""`, `{}`, `[]` or `false`: a field a client sent empty.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    }
}

/// `host:port` of a check target (`http://h:p/path` with its path, `h:p`, `h:p/service`).
fn target(text: &str) -> Result<(Option<u16>, String), String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .unwrap_or(text);
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let port = match hostport.rsplit_once(':') {
        Some((_, p)) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("check target {text:?} has no valid port"))?,
        ),
        None => None,
    };
    Ok((port, path))
}

/// A Consul check definition as svcd's active check; a second port when it targets one.
fn check(value: Value, service_port: u16) -> Result<(CheckSpec, Option<u16>), String> {
    let f = fields(value, "Check")?;
    let mut kind = None;
    let mut spec = CheckSpec::tcp(None);
    let mut port = None;
    for (k, v) in f {
        match k.as_str() {
            "http" | "tcp" | "grpc" => {
                let (p, path) = target(&string(&v, &k)?)?;
                kind = Some(match k.as_str() {
                    "http" => CheckKind::Http,
                    "tcp" => CheckKind::Tcp,
                    _ => CheckKind::Grpc,
                });
                if k == "http" {
                    spec.path = path;
                }
                port = p;
            }
            "interval" => spec.interval = string(&v, "Check.Interval")?,
            "timeout" => spec.timeout = string(&v, "Check.Timeout")?,
            "successbeforepassing" => {
                spec.healthy_threshold = v.as_u64().unwrap_or(0).max(1) as u32
            }
            "failuresbeforecritical" => {
                spec.unhealthy_threshold = v.as_u64().unwrap_or(0).max(1) as u32
            }
            // Names and bookkeeping svcd has no place for; they change nothing it serves.
            "name"
            | "id"
            | "checkid"
            | "notes"
            | "status"
            | "deregistercriticalserviceafter"
            | "serviceid" => {}
            "method" if v.as_str().is_none_or(|m| m.eq_ignore_ascii_case("GET")) => {}
            _ if is_empty(&v) => {}
            other => {
                return Err(format!(
                    "Check.{other} is not supported: svcd runs HTTP (GET), TCP and gRPC checks; \
                     a registration is kept alive by this daemon's lease, so TTL checks have no \
                     place (docs/consul.md)"
                ))
            }
        }
    }
    let Some(kind) = kind else {
        return Err("Check needs HTTP, TCP or GRPC (svcd's check kinds)".into());
    };
    spec.kind = kind;
    let extra = port.filter(|p| *p != service_port);
    Ok((spec, extra))
}

/// The instance key and value a Consul registration body describes.
fn registration(
    body: &[u8],
    params: &Params,
    state: &AdminState,
) -> Result<(InstanceKey, Instance), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("Request decode failed: {e}"))?;
    let f = fields(value, "the registration")?;
    let config = state.config.load();
    let mut name = None;
    let mut id = None;
    let mut namespace = params.namespace.clone();
    let mut instance = Instance::new(state.advertise_ip);
    let mut port = 0u16;
    let mut checks = Vec::new();
    for (k, v) in f {
        match k.as_str() {
            "name" => name = Some(string(&v, "Name")?),
            "id" => id = Some(string(&v, "ID")?).filter(|s| !s.is_empty()),
            "namespace" if !is_empty(&v) => namespace = string(&v, "Namespace")?,
            "address" if !is_empty(&v) => {
                let text = string(&v, "Address")?;
                instance.ip = text.parse::<IpAddr>().map_err(|_| {
                    format!("Address {text:?} is not an IP address (svcd serves addresses)")
                })?;
            }
            "port" => {
                port = v
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or("Port must be 0..=65535")?
            }
            "tags" if !v.is_null() => {
                instance.tags = serde_json::from_value(v).map_err(|_| "Tags must be strings")?
            }
            "meta" if !v.is_null() => {
                instance.meta = serde_json::from_value::<BTreeMap<String, String>>(v)
                    .map_err(|_| "Meta must map strings to strings")?
            }
            "weights" if !v.is_null() => {
                let w = fields(v, "Weights")?;
                if let Some(p) = w.get("passing").and_then(Value::as_u64) {
                    instance.weight = p as u32;
                }
            }
            "check" if !is_empty(&v) => checks.push(v),
            "checks" if !v.is_null() => match v {
                Value::Array(list) => checks.extend(list),
                _ => return Err("Checks must be a list".into()),
            },
            // Tag override guards catalog edits against an agent's anti-entropy; svcd has
            // neither, so either value means the same here.
            "enabletagoverride" => {}
            "kind" | "taggedaddresses" | "connect" | "proxy" | "socketpath" | "locality"
            | "address6" | "namespace" | "address" | "tags" | "meta" | "weights" | "check"
                if is_empty(&v) => {}
            other => {
                return Err(format!(
                    "{other} is not supported by svcd's agent registration (it takes Name, ID, \
                     Address, Port, Tags, Meta, Weights, Check; docs/consul.md)"
                ))
            }
        }
    }
    let name = name.ok_or("Missing service name")?;
    let id = id.unwrap_or_else(|| name.clone());
    let key = InstanceKey::new(&namespace, &name, &id)
        .map_err(|e| format!("{}: {} (svcd names are RFC 1123 labels)", e.path, e.message))?;
    if port != 0 {
        instance.ports.insert(config.consul.port_name.clone(), port);
    }
    match checks.len() {
        0 => {}
        1 => {
            let (mut spec, extra) = check(checks.remove(0), port)?;
            if let Some(p) = extra {
                instance.ports.insert("check".into(), p);
                spec.port = Some("check".into());
            } else if port != 0 {
                spec.port = Some(config.consul.port_name.clone());
            }
            instance.check = Some(spec);
        }
        n => {
            return Err(format!(
                "{n} checks: svcd runs one active check per instance; register one"
            ))
        }
    }
    Ok((key, instance))
}

pub async fn register(
    state: &AdminState,
    req: Request<Incoming>,
    params: &Params,
) -> Response<Body> {
    if state.config.load().registry.read_only {
        return error(
            StatusCode::FORBIDDEN,
            "this node is read-only (registry.read_only = true): register with a node that \
             holds registrations",
        );
    }
    let body = match crate::admin::read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return error(e.status, e.message),
    };
    let (key, instance) = match registration(&body, params, state) {
        Ok(r) => r,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match crate::admin::register_instance(state, key, instance, None).await {
        Ok(_) => {
            let index = state.registry.reader().load().revision;
            answer(state, &Value::Null, index)
        }
        Err(ApiError {
            status,
            message,
            field,
            ..
        }) => error(
            status,
            if field.is_empty() {
                message
            } else {
                format!("{field}: {message}")
            },
        ),
    }
}

pub async fn deregister(state: &AdminState, id: &str, params: &Params) -> Response<Body> {
    if state.config.load().registry.read_only {
        return error(StatusCode::FORBIDDEN, "this node is read-only");
    }
    let owned = state.registry.keeper.owned().await;
    let matching: Vec<&InstanceKey> = owned
        .iter()
        .map(|o| &o.key)
        .filter(|k| k.id == id && k.namespace == params.namespace)
        .collect();
    let key = match matching.as_slice() {
        [key] => (*key).clone(),
        [] => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "Unknown service ID {id:?} in namespace {:?} (this agent holds no such \
                     registration)",
                    params.namespace
                ),
            )
        }
        keys => {
            let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            return error(
                StatusCode::CONFLICT,
                format!(
                    "service ID {id:?} is held for several services ({}); deregister through \
                     DELETE /v1/services/{{ns}}/{{svc}}/instances/{{id}} on the admin API",
                    names.join(", ")
                ),
            );
        }
    };
    match state.registry.keeper.deregister(&key).await {
        Ok(_) => {
            state
                .registry
                .wait_visible(&key, None, crate::admin::VISIBLE_TIMEOUT)
                .await;
            let index = state.registry.reader().load().revision;
            answer(state, &Value::Null, index)
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("registry store: {e}"),
        ),
    }
}

/// `/v1/agent/services`: the registrations this daemon holds, keyed by ID.
pub async fn agent_services(state: &AdminState, params: &Params) -> Response<Body> {
    let config = state.config.load();
    let mut out = Map::new();
    for own in state.registry.keeper.owned().await {
        if own.key.namespace != params.namespace {
            continue;
        }
        let i = own.effective();
        let port = i
            .ports
            .get(&config.consul.port_name)
            .or_else(|| i.ports.values().next())
            .copied()
            .unwrap_or(0);
        out.insert(
            own.key.id.clone(),
            json!({
                "ID": own.key.id,
                "Service": own.key.service,
                "Tags": i.tags,
                "Meta": i.meta,
                "Port": port,
                "Address": i.ip.to_string(),
                "Weights": { "Passing": i.weight, "Warning": 1 },
                "EnableTagOverride": false,
                "Namespace": own.key.namespace,
                "Datacenter": config.consul.datacenter,
            }),
        );
    }
    let index = state.registry.reader().load().revision;
    answer(state, &Value::Object(out), index)
}

/// The Consul version reported to clients that gate features on it: one whose API has
/// everything svcd answers.
const CONSUL_VERSION: &str = "1.15.0";

pub fn agent_self(state: &AdminState) -> Response<Body> {
    let config = state.config.load();
    let node = &config.registry.node;
    let leader = leader_address(state);
    let value = json!({
        "Config": {
            "Datacenter": config.consul.datacenter,
            "PrimaryDatacenter": config.consul.datacenter,
            "NodeName": node,
            "NodeID": "",
            "Server": true,
            "Version": CONSUL_VERSION,
            "Revision": format!("svcd-{}", env!("CARGO_PKG_VERSION")),
        },
        "Member": {
            "Name": node,
            "Addr": state.advertise_ip.to_string(),
            "Port": 8301,
            "Tags": { "dc": config.consul.datacenter, "role": "consul", "build": CONSUL_VERSION },
            "Status": 1,
        },
        "Meta": {},
        "Stats": { "svcd": { "version": env!("CARGO_PKG_VERSION"), "leader": leader } },
    });
    let index = state.registry.reader().load().revision;
    answer(state, &value, index)
}

/// The "leader" a client asks for: this daemon's Consul address (every svcd answers from its
/// own snapshot; there is no election to report).
fn leader_address(state: &AdminState) -> String {
    state
        .config
        .load()
        .consul
        .listen
        .map(|a| std::net::SocketAddr::new(state.advertise_ip, a.port()).to_string())
        .unwrap_or_default()
}

pub fn leader(state: &AdminState) -> Response<Body> {
    let index = state.registry.reader().load().revision;
    answer(state, &json!(leader_address(state)), index)
}

pub fn peers(state: &AdminState) -> Response<Body> {
    let index = state.registry.reader().load().revision;
    answer(state, &json!([leader_address(state)]), index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_targets_give_port_and_path() {
        assert_eq!(
            target("http://10.0.0.1:8080/health").unwrap(),
            (Some(8080), "/health".into())
        );
        assert_eq!(target("10.0.0.1:9000").unwrap(), (Some(9000), "/".into()));
        assert!(target("10.0.0.1:x").is_err());
        let (spec, extra) = check(
            json!({"HTTP": "http://127.0.0.1:9100/ready", "Interval": "5s", "Name": "x"}),
            8080,
        )
        .unwrap();
        assert_eq!(
            (spec.kind, spec.path.as_str(), extra),
            (CheckKind::Http, "/ready", Some(9100))
        );
        let e = check(json!({"TTL": "10s"}), 80).unwrap_err();
        assert!(e.contains("Check.ttl"), "{e}");
    }
}
