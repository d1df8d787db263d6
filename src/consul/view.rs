//! Consul's body shapes built from the snapshot: health entries (`Node`, `Service`,
//! `Checks`), catalog entries and the catalog's service list. svcd's served state is the one
//! check's status: `healthy` → `passing`, `pending` → `warning`, anything else (`unhealthy`,
//! `ejected`, `draining`) → `critical`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};
use svcd_config::ConsulConfig;
use svcd_registry::{Endpoint, EndpointSnapshot, ServedState, ServiceEndpoints};

/// The Consul check status of a served state.
pub fn check_status(state: ServedState) -> &'static str {
    match state {
        ServedState::Healthy => "passing",
        ServedState::Pending => "warning",
        ServedState::Unhealthy | ServedState::Ejected | ServedState::Draining => "critical",
    }
}

/// The node name shown for an instance: its `node`, or `svcd` when it registered none.
pub fn node_name(e: &Endpoint) -> &str {
    if e.node.is_empty() {
        "svcd"
    } else {
        &e.node
    }
}

/// An instance's single Consul `Port`: its port named `consul.port_name`, else its first by
/// name, else 0.
pub fn consul_port(e: &Endpoint, port_name: &str) -> u16 {
    e.port(port_name)
        .or_else(|| e.ports().first().map(|(_, p)| *p))
        .unwrap_or(0)
}

fn meta(e: &Endpoint) -> Map<String, Value> {
    e.meta_entries()
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

fn tags(e: &Endpoint) -> Vec<&str> {
    e.tags().iter().map(|t| &**t).collect()
}

/// Whether the instance carries every tag in `want`.
pub fn has_tags(e: &Endpoint, want: &[String]) -> bool {
    want.iter().all(|w| e.tags().iter().any(|t| **t == **w))
}

/// One `/v1/health/service/<name>` entry.
pub fn health_entry(config: &ConsulConfig, s: &ServiceEndpoints, e: &Endpoint) -> Value {
    let node = node_name(e);
    let ip = e.ip.to_string();
    let state = s.served_state(e);
    let output = match &e.reason {
        Some(reason) => format!("svcd: {} ({reason})", state.as_str()),
        None => format!("svcd: {}", state.as_str()),
    };
    json!({
        "Node": {
            "ID": "",
            "Node": node,
            "Address": ip,
            "Datacenter": config.datacenter,
            "TaggedAddresses": { "lan": ip, "wan": ip },
            "Meta": {},
            "CreateIndex": e.mod_revision,
            "ModifyIndex": e.mod_revision,
        },
        "Service": {
            "ID": e.id,
            "Service": s.service,
            "Tags": tags(e),
            "Address": ip,
            "Meta": meta(e),
            "Port": consul_port(e, &config.port_name),
            "Weights": { "Passing": e.weight, "Warning": 1 },
            "EnableTagOverride": false,
            "Namespace": s.namespace,
            "Datacenter": config.datacenter,
            "CreateIndex": e.mod_revision,
            "ModifyIndex": e.mod_revision,
        },
        "Checks": [{
            "Node": node,
            "CheckID": format!("service:{}", e.id),
            "Name": "svcd served state",
            "Status": check_status(state),
            "Notes": "",
            "Output": output,
            "ServiceID": e.id,
            "ServiceName": s.service,
            "ServiceTags": tags(e),
            "Type": "svcd",
            "Namespace": s.namespace,
            "CreateIndex": e.mod_revision,
            "ModifyIndex": e.mod_revision,
        }],
    })
}

/// One `/v1/catalog/service/<name>` entry.
pub fn catalog_entry(config: &ConsulConfig, s: &ServiceEndpoints, e: &Endpoint) -> Value {
    let ip = e.ip.to_string();
    json!({
        "ID": "",
        "Node": node_name(e),
        "Address": ip,
        "Datacenter": config.datacenter,
        "TaggedAddresses": { "lan": ip, "wan": ip },
        "NodeMeta": {},
        "ServiceID": e.id,
        "ServiceName": s.service,
        "ServiceTags": tags(e),
        "ServiceAddress": ip,
        "ServicePort": consul_port(e, &config.port_name),
        "ServiceMeta": meta(e),
        "ServiceWeights": { "Passing": e.weight, "Warning": 1 },
        "ServiceEnableTagOverride": false,
        "ServiceTaggedAddresses": {},
        "Namespace": s.namespace,
        "CreateIndex": e.mod_revision,
        "ModifyIndex": e.mod_revision,
    })
}

/// `/v1/catalog/services`: every service of `namespace` with the union of its instances' tags.
pub fn catalog_services(snapshot: &EndpointSnapshot, namespace: &str) -> Value {
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in snapshot.services().filter(|s| s.namespace == namespace) {
        let tags = out.entry(&s.service).or_default();
        for e in &s.all {
            tags.extend(e.tags().iter().map(|t| &**t));
        }
    }
    json!(out)
}

/// The index of `/v1/catalog/services`: the snapshot's revision (at least 1), which moves with
/// every change to any service, as Consul's catalog index does. O(1), so parked catalog queries
/// cost nothing per publish beyond the comparison.
pub fn catalog_index(snapshot: &EndpointSnapshot) -> i64 {
    snapshot.revision.max(1)
}
