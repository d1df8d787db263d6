//! One stream's protocol state (state of the world), free of I/O so it is tested directly.
//!
//! Per type: the subscription (wildcard or names, shared with the cache's strings), what was last
//! sent (nonce, the snapshot generation: the client holds every resource as of it), what the
//! client ACKed, and whether a push is due. Nothing per resource: a stream holding 10k clusters
//! costs 10k pointers (its subscription), and a change costs it the names that changed.
//!
//! A request whose `response_nonce` is not the latest sent for its type is stale and ignored (the
//! xDS spec's rule); one that matches is an ACK, or a NACK when it carries `error_detail`
//! (logged, counted, and nothing is re-sent until something changes: the client keeps its last
//! good version).
//! A push is built from the newest [`XdsSnapshot`] when the stream's output has room, and only
//! if a resource the client holds changed, or its subscription did.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tracing::{debug, warn};

use crate::cache::{XdsSnapshot, TYPE_CLUSTER, TYPE_ENDPOINT};
use crate::grpc::Push;
use crate::resources::Resource;
use crate::subscriptions::{NameList, SubscriptionLists};

/// EDS responses are cut at about this many bytes (the rest follows in further responses, as
/// the spec allows for EDS): gRPC clients refuse messages over 4 MiB by default. (CDS and LDS
/// cannot be cut: in state of the world, a resource left out of a response is removed.)
pub const EDS_RESPONSE_BYTES: usize = 1024 * 1024;
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
    /// Subscribed names, sorted: one list shared by every stream subscribed to the same names,
    /// of strings shared with the cache's keys where they exist.
    names: NameList,
    /// The nonce of the last response sent; only a request echoing it is an ACK or NACK.
    nonce: String,
    /// The client answered (ACK or NACK) the response with `nonce` already.
    answered: bool,
    sent_version: String,
    /// The snapshot generation of the last response: the client holds every resource as of it.
    sent_generation: u64,
    /// The snapshot generation last checked for this type (pushed or not).
    evaluated_generation: u64,
    /// ClusterLoadAssignments still to send of a push cut into several responses, and the
    /// generation the push was built at (it becomes `sent_generation` once all are sent).
    backlog: Vec<Arc<str>>,
    backlog_generation: u64,
    /// Listener and RouteConfiguration only (built per name, few): name → hash last sent.
    sent_hashes: Vec<(Arc<str>, u64)>,
    sent_at: Option<Instant>,
    /// A push is due (a new subscription, or a new snapshot).
    dirty: bool,
    /// Respond with every subscribed resource even when nothing the client holds changed (its
    /// subscription changed, or it has not had a response for this type yet).
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
    /// [`EDS_RESPONSE_BYTES`], smaller in tests.
    eds_cut: usize,
    /// Where equal subscriptions become one list.
    lists: Arc<SubscriptionLists>,
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
        lists: Arc<SubscriptionLists>,
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
            eds_cut: EDS_RESPONSE_BYTES,
            lists,
            domain,
            metrics,
            client,
        }
    }

    /// Cuts EDS responses at `bytes` instead.
    #[cfg(test)]
    pub fn cut_eds_at(mut self, bytes: usize) -> Self {
        self.eds_cut = bytes;
        self
    }

    /// Applies one request from the client; `snapshot` (the newest, if any) only lends its
    /// strings to the subscription.
    pub fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snapshot: Option<&XdsSnapshot>,
    ) -> Result<(), Rejected> {
        let kind = match (self.fixed, ResourceType::from_type_url(&req.type_url)) {
            (_, Some(kind)) => kind,
            (Some(fixed), None) if req.type_url.is_empty() => fixed,
            _ => return Err(Rejected::UnknownType(bounded(&req.type_url))),
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
                    c.node_id = Some(bounded(&node.id));
                    c.node_cluster = Some(bounded(&node.cluster)).filter(|s| !s.is_empty());
                    c.user_agent = Some(bounded(agent.trim())).filter(|s| !s.is_empty());
                });
            }
        }
        let label = kind.as_str();
        let t = &mut self.types[index(kind)];
        if !req.response_nonce.is_empty() {
            if req.response_nonce != t.nonce {
                debug!(r#type = label, "stale xDS request ignored");
                return Ok(());
            }
            let latency = t.sent_at.map(|s| s.elapsed());
            // The first answer to a response is its ACK or NACK; later requests naming the
            // same nonce change the subscription only (counted once, logged once).
            let first_answer = !std::mem::replace(&mut t.answered, true);
            match &req.error_detail {
                _ if !first_answer => {}
                Some(status) => {
                    self.metrics.nacks.with_label_values(&[label]).inc();
                    let error = bounded(&status.message);
                    warn!(
                        r#type = label,
                        version = %t.sent_version,
                        nonce = %t.nonce,
                        %error,
                        "xDS client rejected (NACKed) a response; it keeps its last good version"
                    );
                    let nack = NackInfo {
                        rejected_version: t.sent_version.clone(),
                        nonce: t.nonce.clone(),
                        error,
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
                    let version = bounded(&req.version_info);
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
        let mut names = req.resource_names;
        names.retain(|n| n != "*");
        names.sort_unstable();
        names.dedup();
        let same = names.len() == t.names.len()
            && names
                .iter()
                .zip(t.names.iter())
                .all(|(a, b)| a.as_str() == &**b);
        if !t.subscribed || wildcard != t.wildcard || !same {
            // A changed subscription is answered (new names pushed, dropped ones no longer).
            t.force = true;
            t.backlog.clear();
            t.subscribed = true;
            t.wildcard = wildcard;
            t.names = match snapshot {
                Some(s) => self.lists.get(&names, |n| s.intern(kind, n)),
                None => self.lists.get(&names, |n: &str| Arc::from(n)),
            };
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
    pub fn next_push(&mut self, snapshot: &XdsSnapshot) -> Option<Push> {
        for kind in PUSH_ORDER {
            let t = &mut self.types[index(kind)];
            if !t.dirty {
                continue;
            }
            t.dirty = false;
            let started = Instant::now();
            let from_backlog = !t.backlog.is_empty();
            let (resources, generation) = if from_backlog {
                // The rest of a push cut into parts, in the newest state.
                let all = snapshot.map(kind).expect("only EDS is cut");
                let rest = std::mem::take(&mut t.backlog);
                let parts: Vec<Arc<Resource>> =
                    rest.iter().filter_map(|n| all.get(n)).cloned().collect();
                (Some(parts), t.backlog_generation)
            } else {
                let resources = match kind {
                    ResourceType::Cluster | ResourceType::Endpoint => {
                        cached_push(t, kind, snapshot)
                    }
                    ResourceType::Listener | ResourceType::Route => {
                        built_push(t, kind, snapshot, &self.domain)
                    }
                };
                (resources, snapshot.generation)
            };
            let Some(mut resources) = resources else {
                t.evaluated_generation = snapshot.generation;
                continue;
            };
            if kind == ResourceType::Endpoint {
                let mut bytes = 0;
                let cut = resources
                    .iter()
                    .position(|r| {
                        bytes += r.framed.len();
                        bytes > self.eds_cut
                    })
                    .map(|i| i.max(1));
                if let Some(cut) = cut.filter(|c| *c < resources.len()) {
                    t.backlog = resources
                        .split_off(cut)
                        .iter()
                        .map(|r| r.name.clone())
                        .collect();
                    t.backlog_generation = generation;
                    // The next part goes out when there is room.
                    t.dirty = true;
                }
            }
            // Until the last part is out, the client does not hold this generation.
            if t.backlog.is_empty() {
                t.sent_generation = generation;
                t.evaluated_generation = generation;
                // Snapshots published while the parts went out changed what the client holds
                // from the parts already sent: due again, from the cut push's generation.
                if from_backlog && snapshot.generation > generation {
                    t.dirty = true;
                }
            }
            if resources.is_empty() && !t.force {
                continue;
            }
            t.force = false;
            self.nonces += 1;
            t.nonce = self.nonces.to_string();
            t.answered = false;
            t.sent_version = snapshot.version.clone();
            t.sent_at = Some(Instant::now());
            let response = Push {
                version_info: t.sent_version.clone(),
                type_url: kind.type_url(),
                nonce: t.nonce.clone(),
                resources,
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

/// Clusters and ClusterLoadAssignments: what to send, or `None` when the client holds the
/// newest of everything it subscribed to. Resources carry the generation they last changed at,
/// so this needs no record of what each stream holds: a resource is due when it is newer than
/// the stream's last push. A stream that checked the previous snapshot looks only at the names that
/// changed in this one (go-control-plane's snapshot-cache idea, per resource).
///
/// CDS responses carry every subscribed Cluster (absence means removal). EDS responses carry
/// only the ClusterLoadAssignments that are new or changed, unless the subscription changed
/// (the xDS spec allows it for EDS; a removal reaches clients through CDS).
fn cached_push(
    t: &TypeState,
    kind: ResourceType,
    snapshot: &XdsSnapshot,
) -> Option<Vec<Arc<Resource>>> {
    let all = snapshot.map(kind)?;
    let ti = if kind == ResourceType::Cluster {
        TYPE_CLUSTER
    } else {
        TYPE_ENDPOINT
    };
    let force = t.force;
    let everything = || -> Vec<Arc<Resource>> {
        if t.wildcard {
            all.values().cloned().collect()
        } else {
            t.names.iter().filter_map(|n| all.get(n)).cloned().collect()
        }
    };
    if force {
        return Some(everything());
    }
    if snapshot.changed_generation[ti] <= t.evaluated_generation {
        return None;
    }
    let subscribed =
        |name: &str| t.wildcard || t.names.binary_search_by(|n| (**n).cmp(name)).is_ok();
    let newer = |r: &&Arc<Resource>| r.generation > t.sent_generation;
    let changed: Vec<&Arc<Resource>> = if t.evaluated_generation + 1 == snapshot.generation {
        snapshot
            .changed
            .iter()
            .filter(|n| subscribed(n))
            .filter_map(|n| all.get(n))
            .filter(newer)
            .collect()
    } else if t.wildcard {
        all.values().filter(newer).collect()
    } else {
        t.names
            .iter()
            .filter_map(|n| all.get(n))
            .filter(newer)
            .collect()
    };
    if kind == ResourceType::Cluster {
        let removed = snapshot.removed_generation[ti] > t.sent_generation;
        (removed || !changed.is_empty()).then(everything)
    } else {
        (!changed.is_empty()).then(|| changed.into_iter().cloned().collect())
    }
}

/// Listeners and RouteConfigurations, built per subscribed name from the registry: compared by
/// hash with what was last sent (few names per client). RDS sends only changed ones, as EDS.
fn built_push(
    t: &mut TypeState,
    kind: ResourceType,
    snapshot: &XdsSnapshot,
    domain: &str,
) -> Option<Vec<Arc<Resource>>> {
    let names = (!t.wildcard).then_some(&t.names[..]);
    let selected = snapshot.select(kind, names, domain);
    let unchanged = selected.len() == t.sent_hashes.len()
        && selected
            .iter()
            .zip(&t.sent_hashes)
            .all(|(r, (n, h))| r.name == *n && r.hash == *h);
    if unchanged && !t.force {
        return None;
    }
    let resources: Vec<Arc<Resource>> = if kind.wildcard_capable() || t.force {
        selected.clone()
    } else {
        selected
            .iter()
            .filter(|r| {
                !t.sent_hashes
                    .iter()
                    .any(|(n, h)| *n == r.name && *h == r.hash)
            })
            .cloned()
            .collect()
    };
    t.sent_hashes = selected.iter().map(|r| (r.name.clone(), r.hash)).collect();
    (t.force || !resources.is_empty()).then_some(resources)
}

/// What a client sent, cut to 256 bytes for logs and `/v1/xds/clients` (a client decides its
/// strings' length; a request may be 16 MiB).
fn bounded(text: &str) -> String {
    const MAX: usize = 256;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn version_of(node: &envoy_types::pb::envoy::config::core::v3::Node) -> String {
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
        _ => String::new(),
    }
}
