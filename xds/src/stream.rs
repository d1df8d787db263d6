//! One stream's protocol state (state of the world), free of I/O so it is tested directly.
//!
//! Per type: the subscription (wildcard or names), what was last sent (nonce, version, the hash
//! of every resource), what the client ACKed, and whether a push is due. A request whose
//! `response_nonce` is not the latest sent for its type is stale and ignored (the xDS spec's
//! rule); one that matches is an ACK, or a NACK when it carries `error_detail` (logged, counted,
//! and nothing is re-sent until something changes: the client keeps its last good version).
//! A push is built from the newest [`XdsSnapshot`] when the stream's output has room, and only
//! if a resource the client holds changed, or its subscription did.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tracing::{debug, warn};

use crate::cache::XdsSnapshot;
use crate::clients::{unix_now, ClientHandle, NackInfo};
use crate::metrics::XdsMetrics;
use crate::names::ResourceType;

/// Why a request ends its stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("{count} resource names in one request; the limit is {limit} (xds.max_names)")]
    TooManyNames { count: usize, limit: usize },
    #[error("resource type {0:?} is not served (svcd serves Listener, RouteConfiguration, Cluster, ClusterLoadAssignment)")]
    UnknownType(String),
}

/// The order pushes go out in when several types are due: CDS before EDS before LDS before RDS
/// (the xDS spec's make-before-break order).
const PUSH_ORDER: [ResourceType; 4] = [
    ResourceType::Cluster,
    ResourceType::Endpoint,
    ResourceType::Listener,
    ResourceType::Route,
];

#[derive(Default)]
struct TypeState {
    /// The client asked for this type at least once.
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// The nonce of the last response sent; only a request echoing it is an ACK or NACK.
    nonce: String,
    sent_version: String,
    /// Name → hash of every resource in the last response.
    sent: HashMap<Arc<str>, u64>,
    sent_at: Option<Instant>,
    /// A push is due (a new subscription, or a new snapshot).
    dirty: bool,
    /// Respond even when nothing the client holds changed (its subscription changed, or it has
    /// not had a response for this type yet).
    force: bool,
}

/// One stream.
pub struct StreamState {
    types: [TypeState; 4],
    /// For requests on the standalone CDS/EDS services (whose `type_url` may be empty).
    fixed: Option<ResourceType>,
    nonces: u64,
    node_seen: bool,
    max_names: usize,
    domain: Arc<str>,
    metrics: XdsMetrics,
    client: ClientHandle,
}

fn index(kind: ResourceType) -> usize {
    kind as usize
}

impl StreamState {
    pub fn new(
        fixed: Option<ResourceType>,
        max_names: usize,
        domain: Arc<str>,
        metrics: XdsMetrics,
        client: ClientHandle,
    ) -> Self {
        StreamState {
            types: Default::default(),
            fixed,
            nonces: 0,
            node_seen: false,
            max_names,
            domain,
            metrics,
            client,
        }
    }

    /// Applies one request from the client.
    pub fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Rejected> {
        let kind = match (self.fixed, ResourceType::from_type_url(&req.type_url)) {
            (_, Some(kind)) => kind,
            (Some(fixed), None) if req.type_url.is_empty() => fixed,
            _ => return Err(Rejected::UnknownType(req.type_url)),
        };
        if req.resource_names.len() > self.max_names {
            return Err(Rejected::TooManyNames {
                count: req.resource_names.len(),
                limit: self.max_names,
            });
        }
        if !self.node_seen {
            if let Some(node) = &req.node {
                self.node_seen = true;
                let agent = format!("{} {}", node.user_agent_name, version_of(node));
                self.client.update(|c| {
                    c.node_id = Some(node.id.clone());
                    c.node_cluster = Some(node.cluster.clone()).filter(|s| !s.is_empty());
                    c.user_agent = Some(agent.trim().to_string()).filter(|s| !s.is_empty());
                });
            }
        }
        let label = kind.as_str();
        let t = &mut self.types[index(kind)];
        if !req.response_nonce.is_empty() {
            if req.response_nonce != t.nonce {
                debug!(r#type = label, nonce = %req.response_nonce, "stale xDS request ignored");
                return Ok(());
            }
            let latency = t.sent_at.map(|s| s.elapsed());
            match &req.error_detail {
                Some(status) => {
                    self.metrics.nacks.with_label_values(&[label]).inc();
                    warn!(
                        r#type = label,
                        version = %t.sent_version,
                        nonce = %req.response_nonce,
                        error = %status.message,
                        "xDS client rejected (NACKed) a response; it keeps its last good version"
                    );
                    let nack = NackInfo {
                        rejected_version: t.sent_version.clone(),
                        nonce: req.response_nonce.clone(),
                        error: status.message.clone(),
                        at: unix_now(),
                    };
                    self.client.update(|c| {
                        c.types.entry(label).or_default().last_nack = Some(nack);
                    });
                }
                None => {
                    self.metrics.acks.with_label_values(&[label]).inc();
                    if let Some(latency) = latency {
                        self.metrics
                            .push_ack_seconds
                            .with_label_values(&[label])
                            .observe(latency.as_secs_f64());
                    }
                    let version = req.version_info.clone();
                    self.client.update(|c| {
                        c.types.entry(label).or_default().acked_version = Some(version);
                    });
                }
            }
            t.sent_at = None;
        }
        let wildcard = kind.wildcard_capable()
            && ((!t.subscribed && req.resource_names.is_empty())
                || (t.wildcard && req.resource_names.is_empty())
                || req.resource_names.iter().any(|n| n == "*"));
        let names: BTreeSet<String> = req
            .resource_names
            .into_iter()
            .filter(|n| n != "*")
            .collect();
        if !t.subscribed || wildcard != t.wildcard || names != t.names {
            if !t.subscribed {
                t.force = true;
            }
            // A changed subscription is answered (new names pushed, dropped ones no longer).
            t.force = true;
            t.subscribed = true;
            t.wildcard = wildcard;
            t.names = names;
            t.dirty = true;
            let (w, n) = (t.wildcard, &t.names);
            self.client
                .update(|c| c.types.entry(label).or_default().set_names(w, n));
        }
        Ok(())
    }

    /// A new snapshot was published: every subscribed type is due for a check. Returns how many
    /// pushes already waiting now carry the newer state instead.
    pub fn on_change(&mut self) -> u64 {
        let mut superseded = 0;
        for t in self.types.iter_mut().filter(|t| t.subscribed) {
            if t.dirty {
                superseded += 1;
            }
            t.dirty = true;
        }
        superseded
    }

    pub fn has_due(&self) -> bool {
        self.types.iter().any(|t| t.dirty)
    }

    /// The next response due, built from `snapshot`; `None` when nothing the client holds
    /// changed (the due marks are cleared).
    pub fn next_push(&mut self, snapshot: &XdsSnapshot) -> Option<DiscoveryResponse> {
        for kind in PUSH_ORDER {
            let t = &mut self.types[index(kind)];
            if !t.dirty {
                continue;
            }
            t.dirty = false;
            let started = Instant::now();
            let names = (!t.wildcard).then_some(&t.names);
            let selected = snapshot.select(kind, names, &self.domain);
            let unchanged = selected.len() == t.sent.len()
                && selected
                    .iter()
                    .all(|r| t.sent.get(&r.name) == Some(&r.hash));
            if unchanged && !t.force {
                continue;
            }
            // LDS and CDS responses carry every subscribed resource (absence means removal).
            // RDS and EDS ones carry only what is new or changed unless the subscription changed
            // (the xDS spec allows it for these types; a removal reaches clients through CDS or
            // LDS, which drop the cluster or listener that referenced it).
            let resources: Vec<_> = if kind.wildcard_capable() || t.force {
                selected.iter().map(|r| r.any.clone()).collect()
            } else {
                selected
                    .iter()
                    .filter(|r| t.sent.get(&r.name) != Some(&r.hash))
                    .map(|r| r.any.clone())
                    .collect()
            };
            let only_removals = resources.is_empty() && !t.force;
            t.sent = selected.iter().map(|r| (r.name.clone(), r.hash)).collect();
            if only_removals {
                continue;
            }
            t.force = false;
            self.nonces += 1;
            t.nonce = self.nonces.to_string();
            t.sent_version = snapshot.revision.to_string();
            t.sent_at = Some(Instant::now());
            let response = DiscoveryResponse {
                version_info: t.sent_version.clone(),
                resources,
                type_url: kind.type_url().to_string(),
                nonce: t.nonce.clone(),
                ..Default::default()
            };
            self.metrics
                .build_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .pushes
                .with_label_values(&[kind.as_str()])
                .inc();
            let (version, nonce) = (t.sent_version.clone(), t.nonce.clone());
            self.client.update(|c| {
                let info = c.types.entry(kind.as_str()).or_default();
                info.sent_version = Some(version);
                info.sent_nonce = Some(nonce);
            });
            return Some(response);
        }
        None
    }
}

fn version_of(node: &envoy_types::pb::envoy::config::core::v3::Node) -> String {
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
        _ => String::new(),
    }
}
