//! `GET /v1/prometheus/sd`: the registry as Prometheus HTTP service discovery
//! (`http_sd_configs`), on the admin API and on `admin.metrics_listen`.
//!
//! One target group per instance: `targets = ["ip:port"]` for the named port `?port=` (default
//! `metrics`; instances without it are left out), with labels `__meta_svcd_service`,
//! `__meta_svcd_namespace`, `__meta_svcd_instance`, `__meta_svcd_node`, `__meta_svcd_state`,
//! `__meta_svcd_tags` (`,a,b,`), `__meta_svcd_tag_<tag>` and `__meta_svcd_meta_<key>` (names
//! reduced to `[a-zA-Z0-9_]`, as Prometheus's own discoveries do). Filters: `?service=`,
//! `?namespace=`, `?state=` (repeatable or comma-separated served states, or `all`; default
//! `healthy`: the instances DNS and the proxies serve).

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use svcd_registry::{Endpoint, ServedState, ServiceEndpoints};

use super::{json_response, query, AdminState, ApiError, Body};

/// What one discovery request asks for.
#[derive(Debug, PartialEq)]
struct SdQuery {
    port: String,
    service: Option<String>,
    namespace: Option<String>,
    /// Served states to include, as a set over [`ServedState::ALL`] indices.
    states: [bool; ServedState::ALL.len()],
}

fn parse(query_text: Option<&str>) -> Result<SdQuery, ApiError> {
    let bad = |field: &str, message: String| ApiError::new(StatusCode::BAD_REQUEST, field, message);
    let mut q = SdQuery {
        port: "metrics".into(),
        service: None,
        namespace: None,
        states: [false; ServedState::ALL.len()],
    };
    let mut any_state = false;
    for (k, v) in query::pairs(query_text) {
        match k.as_str() {
            "port" => {
                svcd_config::names::check_port_name(&v)
                    .map_err(|e| bad("port", format!("port name {e}")))?;
                q.port = v;
            }
            "service" | "namespace" => {
                svcd_config::names::check_label(&v).map_err(|e| bad(&k, format!("{k} {e}")))?;
                if k == "service" {
                    q.service = Some(v);
                } else {
                    q.namespace = Some(v);
                }
            }
            "state" => {
                for name in v.split(',').filter(|s| !s.is_empty()) {
                    any_state = true;
                    if name == "all" {
                        q.states = [true; ServedState::ALL.len()];
                        continue;
                    }
                    let state = ServedState::ALL
                        .iter()
                        .find(|s| s.as_str() == name)
                        .ok_or_else(|| {
                            bad(
                                "state",
                                format!(
                                    "unknown state {name:?}; one of healthy, unhealthy, \
                                     draining, ejected, pending, all"
                                ),
                            )
                        })?;
                    q.states[*state as usize] = true;
                }
            }
            _ => {
                return Err(bad(
                    &k,
                    format!(
                        "unknown query parameter {k:?}; accepted: port, service, namespace, state"
                    ),
                ))
            }
        }
    }
    if !any_state {
        q.states[ServedState::Healthy as usize] = true;
    }
    Ok(q)
}

/// A label name part made of `[a-zA-Z0-9_]` (every other character becomes `_`).
fn label_part(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn target_group(service: &ServiceEndpoints, e: &Endpoint, port: u16) -> Value {
    let mut labels = Map::new();
    let mut label = |k: String, v: &str| {
        labels.insert(k, Value::String(v.to_string()));
    };
    label("__meta_svcd_service".into(), &service.service);
    label("__meta_svcd_namespace".into(), &service.namespace);
    label("__meta_svcd_instance".into(), &e.id);
    label("__meta_svcd_node".into(), &e.node);
    label("__meta_svcd_state".into(), service.served_state(e).as_str());
    let mut tags = String::from(",");
    for tag in e.tags().iter() {
        tags.push_str(tag);
        tags.push(',');
        label(format!("__meta_svcd_tag_{}", label_part(tag)), "true");
    }
    label("__meta_svcd_tags".into(), &tags);
    for (k, v) in e.meta_entries().iter() {
        label(format!("__meta_svcd_meta_{}", label_part(k)), v);
    }
    json!({
        "targets": [SocketAddr::new(e.ip, port).to_string()],
        "labels": labels,
    })
}

pub fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let q = match parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let snapshot = state.registry.reader().load_full();
    let mut services: Vec<&ServiceEndpoints> = snapshot
        .services()
        .map(|s| &**s)
        .filter(|s| q.service.as_deref().is_none_or(|want| s.service == want))
        .filter(|s| {
            q.namespace
                .as_deref()
                .is_none_or(|want| s.namespace == want)
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
    let groups: Vec<Value> = services
        .into_iter()
        .flat_map(|s| {
            s.all.iter().filter_map(|e| {
                let port = e.port(&q.port)?;
                q.states[s.served_state(e) as usize].then(|| target_group(s, e, port))
            })
        })
        .collect();
    json_response(StatusCode::OK, &Value::Array(groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_served_instances_on_the_metrics_port() {
        let q = parse(None).unwrap();
        assert_eq!(q.port, "metrics");
        assert_eq!(q.states, [true, false, false, false, false], "healthy only");
        let q = parse(Some("state=draining,pending&state=healthy&service=web")).unwrap();
        assert_eq!(q.states, [true, false, true, false, true]);
        assert_eq!(q.service.as_deref(), Some("web"));
        assert_eq!(parse(Some("state=all")).unwrap().states, [true; 5]);
    }

    #[test]
    fn bad_parameters_name_the_field() {
        for (query, field) in [
            ("port=HTTP", "port"),
            ("state=dead", "state"),
            ("namespace=a.b", "namespace"),
            ("bogus=1", "bogus"),
        ] {
            assert_eq!(parse(Some(query)).unwrap_err().field, field, "{query}");
        }
    }

    #[test]
    fn label_names_keep_only_prometheus_characters() {
        assert_eq!(label_part("team.a-b/c"), "team_a_b_c");
    }
}
