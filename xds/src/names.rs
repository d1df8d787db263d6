//! The names xDS clients ask for, and the resource types they ask for them in.
//!
//! * Cluster and ClusterLoadAssignment: `<svc>.<ns>:<port name>`, one per service and named port.
//! * Listener and RouteConfiguration (proxyless gRPC): the client's target as written —
//!   `<svc>.<ns>.svc.<domain>` or `<svc>.<ns>`, each optionally with `:<port name or number>`.
//!   Without a port: the service's only port, else the one named `grpc`.

use svcd_registry::{EndpointSnapshot, ServiceEndpoints};

/// The four resource types svcd serves, in the order a proxyless client walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Listener,
    Route,
    Cluster,
    Endpoint,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Cluster,
        ResourceType::Endpoint,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// The metric label and the admin API's key.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Listener => "listener",
            ResourceType::Route => "route",
            ResourceType::Cluster => "cluster",
            ResourceType::Endpoint => "endpoint",
        }
    }

    /// Whether an empty name list (on the first request) subscribes to everything (xDS spec:
    /// LDS and CDS only).
    pub fn wildcard_capable(self) -> bool {
        matches!(self, ResourceType::Listener | ResourceType::Cluster)
    }
}

/// `<svc>.<ns>:<port>`: the Cluster (and ClusterLoadAssignment) of one named port.
pub fn cluster_name(service: &ServiceEndpoints, port: &str) -> String {
    format!("{}.{}:{}", service.service, service.namespace, port)
}

/// The port names a service has: the union over its instances, sorted.
pub fn port_names(service: &ServiceEndpoints) -> Vec<&str> {
    let mut names: Vec<&str> = service
        .all
        .iter()
        .flat_map(|e| e.ports().iter().map(|(n, _)| &**n))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// What a listener name resolves to: the cluster a route points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `<svc>.<ns>:<port name>`.
    pub cluster: String,
}

/// Resolves a listener name (a gRPC client's target) against `snapshot`: `None` when the service
/// or the port does not exist (yet).
pub fn resolve_listener(name: &str, snapshot: &EndpointSnapshot, domain: &str) -> Option<Target> {
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    let host = host.trim_end_matches('.');
    let base = match host.strip_suffix(domain) {
        Some(rest) if !domain.is_empty() => rest.strip_suffix(".svc.")?,
        _ => host,
    };
    let (svc, ns) = base.split_once('.')?;
    if ns.contains('.') {
        return None;
    }
    let service = snapshot.service(ns, svc)?;
    let ports = port_names(service);
    let port_name = match port {
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
            let number: u16 = p.parse().ok()?;
            ports
                .iter()
                .copied()
                .find(|n| service.all.iter().any(|e| e.port(n) == Some(number)))?
        }
        Some(p) => ports.iter().copied().find(|n| *n == p)?,
        None if ports.len() == 1 => ports[0],
        None => ports.iter().copied().find(|n| *n == "grpc")?,
    };
    Some(Target {
        cluster: cluster_name(service, port_name),
    })
}

/// The listener names a wildcard LDS subscription gets: `<svc>.<ns>:<port name>` for every
/// service and port (a client that knows its target asks for it by name instead).
pub fn canonical_listeners(snapshot: &EndpointSnapshot) -> impl Iterator<Item = String> + '_ {
    snapshot.services().flat_map(|s| {
        port_names(s)
            .into_iter()
            .map(|p| cluster_name(s, p))
            .collect::<Vec<_>>()
    })
}
