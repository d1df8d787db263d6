//! The four xDS resources, built from one service of the snapshot (or one listener name).
//!
//! Health mapping (docs/xds.md): an instance's [`ServedState`] — read through
//! [`ServiceEndpoints::served_state`], the one verdict DNS, the proxies and the API give — maps to
//! `health_status`: healthy → HEALTHY, draining → DRAINING, unhealthy and ejected-on-this-node →
//! UNHEALTHY (kept in the host set, so Envoy's panic threshold counts the same hosts svcd's own
//! balancer does), pending (never checked yet) → left out (svcd leaves it out of its panic total
//! too, and nothing may send it traffic before its first check passes).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, HealthStatus, Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::bytes::Bytes;
use prost::{Message, Name};
use svcd_registry::{ServedState, ServiceEndpoints};

/// One encoded resource, ready to be sent to any number of clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    /// A hash of the encoded bytes: a rebuilt resource that encodes the same is not a change.
    pub hash: u64,
    /// The cache generation at which these bytes first appeared (set by the cache): a stream
    /// holds a resource as of the generation it last pushed, so it needs this one again exactly
    /// when this is newer. No per-stream, per-resource record is kept.
    pub generation: u64,
    /// The resource as one element of a `DiscoveryResponse`'s `resources` (field key, length,
    /// the `Any`), encoded once: every stream's response is these bytes put together
    /// ([`crate::grpc`]), never a per-stream copy of the message.
    pub framed: Bytes,
}

/// `resources` in `DiscoveryResponse`.
const RESOURCES_FIELD: u32 = 2;

impl Resource {
    fn new<M: Message + Name>(name: Arc<str>, message: &M) -> Resource {
        Resource::from_any(
            name,
            Any {
                type_url: M::type_url(),
                value: message.encode_to_vec(),
            },
        )
    }

    pub fn from_any(name: Arc<str>, any: Any) -> Resource {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        any.value.hash(&mut hasher);
        let mut framed = Vec::with_capacity(any.encoded_len() + 6);
        prost::encoding::message::encode(RESOURCES_FIELD, &any, &mut framed);
        Resource {
            name,
            hash: hasher.finish(),
            generation: 0,
            framed: framed.into(),
        }
    }
}

/// `ads: {}` with the v3 API: where EDS and RDS come from (the same stream).
fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// The Cluster `name` (`<svc>.<ns>:<port>`): EDS over ADS, round robin.
pub fn cluster(name: &str) -> Resource {
    let message = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    Resource::new(name.into(), &message)
}

/// How an instance in `state` is announced, or `None` to leave it out (module header).
pub fn health_status(state: ServedState) -> Option<HealthStatus> {
    match state {
        ServedState::Healthy => Some(HealthStatus::Healthy),
        ServedState::Draining => Some(HealthStatus::Draining),
        ServedState::Unhealthy | ServedState::Ejected => Some(HealthStatus::Unhealthy),
        ServedState::Pending => None,
    }
}

/// The ClusterLoadAssignment `name` of `service`'s `port`: the instances registering that port,
/// grouped into localities by their `region`/`zone` metadata and node (the sub-zone), each
/// locality weighted by the sum of its instances' weights.
pub fn load_assignment(name: &str, service: &ServiceEndpoints, port: &str) -> Resource {
    let mut localities: BTreeMap<(&str, &str, &str), LocalityLbEndpoints> = BTreeMap::new();
    for e in &service.all {
        let Some(port_number) = e.port(port) else {
            continue;
        };
        let Some(health) = health_status(service.served_state(e)) else {
            continue;
        };
        let key = (
            e.meta("region").unwrap_or(""),
            e.meta("zone").unwrap_or(""),
            &*e.node,
        );
        let weight = e.weight.max(1);
        let locality = localities
            .entry(key)
            .or_insert_with(|| LocalityLbEndpoints {
                locality: Some(Locality {
                    region: key.0.to_string(),
                    zone: key.1.to_string(),
                    sub_zone: key.2.to_string(),
                }),
                load_balancing_weight: Some(UInt32Value { value: 0 }),
                ..Default::default()
            });
        if let Some(w) = locality.load_balancing_weight.as_mut() {
            w.value = w.value.saturating_add(weight);
        }
        locality.lb_endpoints.push(LbEndpoint {
            health_status: health as i32,
            load_balancing_weight: Some(UInt32Value { value: weight }),
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(e.ip, port_number)),
                hostname: e.id.to_string(),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    let message = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: localities.into_values().collect(),
        ..Default::default()
    };
    Resource::new(name.into(), &message)
}

fn socket(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// The Listener `name` for proxyless gRPC: an `api_listener` HttpConnectionManager whose routes
/// come over RDS (the RouteConfiguration of the same name), router filter last.
pub fn listener(name: &str) -> Resource {
    let manager = HttpConnectionManager {
        stat_prefix: "svcd".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    let message = Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    };
    Resource::new(name.into(), &message)
}

/// The RouteConfiguration `name`: one virtual host matching that name (the authority a gRPC
/// client sends), every request to `cluster`.
pub fn route_configuration(name: &str, cluster: &str) -> Resource {
    let host = name.to_string();
    let message = RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: host.clone(),
            domains: vec![host, "*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.to_string(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(name.into(), &message)
}
