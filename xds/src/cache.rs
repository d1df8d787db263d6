//! The xDS view of the registry: every Cluster and ClusterLoadAssignment, encoded once per
//! change and shared by every stream (go-control-plane's snapshot cache, as one writer).
//!
//! One writer task ([`XdsCache::run`]) follows the registry's snapshots; per snapshot it rebuilds
//! only the services that changed ([`EndpointSnapshot::changed_since`]) and publishes a new
//! [`XdsSnapshot`] through a watch channel. Streams read the newest one when they push, so a
//! stream that fell behind skips the states in between. Nothing is published before the
//! registry's first full sync: a restarted svcd never tells clients that every cluster is empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use svcd_registry::{EndpointSnapshot, SnapshotReader, SyncStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::names::{self, ResourceType};
use crate::resources::{self, Resource};

type Resources = BTreeMap<Arc<str>, Arc<Resource>>;

/// Index of the cluster type in [`XdsSnapshot::changed_generation`] and `removed_generation`.
pub const TYPE_CLUSTER: usize = 0;
/// Index of the endpoint type.
pub const TYPE_ENDPOINT: usize = 1;

/// `fresh`, stamped with `generation` unless `old` encodes the same (then `old`, unchanged).
fn stamp(old: Option<&Arc<Resource>>, mut fresh: Resource, generation: u64) -> Arc<Resource> {
    match old {
        Some(old) if old.hash == fresh.hash => old.clone(),
        _ => {
            fresh.generation = generation;
            Arc::new(fresh)
        }
    }
}

/// One consistent xDS state, at one registry revision.
#[derive(Debug)]
pub struct XdsSnapshot {
    /// The registry revision it was built from.
    pub revision: i64,
    /// Every response's `version_info`: the registry revision, with `.N` added when the same
    /// revision is published again (this node's ejections change what is served, not the
    /// store's revision).
    pub version: String,
    /// Counts publishes (from 1); resources and streams compare these, never revisions, so a
    /// republish at the same revision is a change too.
    pub generation: u64,
    pub clusters: Resources,
    pub endpoints: Resources,
    /// Cluster names whose Cluster or ClusterLoadAssignment changed, appeared or left between
    /// the previous snapshot and this one: a stream that evaluated the previous one looks at
    /// these only.
    pub changed: Vec<Arc<str>>,
    /// Per type ([`TYPE_CLUSTER`], [`TYPE_ENDPOINT`]): the last generation at which a resource
    /// of the type changed or left, and at which one left.
    pub changed_generation: [u64; 2],
    pub removed_generation: [u64; 2],
    /// The registry snapshot itself: listener names are resolved against it on demand.
    pub registry: Arc<EndpointSnapshot>,
    /// Listeners and RouteConfigurations built from this snapshot so far, by name (`None`: the
    /// name resolves to nothing): every stream subscribed to a name shares one build per
    /// snapshot. At most [`BUILT_NAMES`] names; past them names are built per stream.
    built: std::sync::Mutex<BuiltByName>,
    /// Every service's canonical listener name, sorted, for wildcard LDS (made once).
    canonical_listeners: std::sync::OnceLock<Vec<Arc<str>>>,
}

/// Built Listeners and RouteConfigurations by type and name (`None`: resolves to nothing).
type BuiltByName = HashMap<(ResourceType, Arc<str>), Option<Arc<Resource>>>;

/// Names of Listeners and RouteConfigurations one snapshot keeps built (clients choose the
/// names, so the memo is bounded; it goes with the snapshot).
const BUILT_NAMES: usize = 100_000;

impl XdsSnapshot {
    /// The Clusters or the ClusterLoadAssignments.
    pub fn map(&self, kind: ResourceType) -> Option<&Resources> {
        match kind {
            ResourceType::Cluster => Some(&self.clusters),
            ResourceType::Endpoint => Some(&self.endpoints),
            _ => None,
        }
    }

    /// `name` as a shared string: the cache's own key when the resource exists (a stream
    /// subscribed to 10k names then holds 10k pointers, not 10k strings).
    pub fn intern(&self, kind: ResourceType, name: &str) -> Arc<str> {
        self.map(kind)
            .and_then(|m| m.get_key_value(name))
            .map_or_else(|| Arc::from(name), |(k, _)| k.clone())
    }

    /// The resources of `kind` a client subscribed to (`None`: wildcard), sorted by name, no
    /// duplicates. Names that do not exist are left out (and pushed once they appear).
    pub fn select(
        &self,
        kind: ResourceType,
        names: Option<&[Arc<str>]>,
        domain: &str,
    ) -> Vec<Arc<Resource>> {
        match kind {
            ResourceType::Cluster | ResourceType::Endpoint => {
                let all = if kind == ResourceType::Cluster {
                    &self.clusters
                } else {
                    &self.endpoints
                };
                match names {
                    None => all.values().cloned().collect(),
                    Some(names) => names.iter().filter_map(|n| all.get(n).cloned()).collect(),
                }
            }
            ResourceType::Listener | ResourceType::Route => {
                let wanted: &[Arc<str>] = match names {
                    Some(names) => names,
                    None if kind == ResourceType::Listener => {
                        self.canonical_listeners.get_or_init(|| {
                            let mut all: Vec<Arc<str>> = names::canonical_listeners(&self.registry)
                                .map(Arc::from)
                                .collect();
                            all.sort_unstable();
                            all
                        })
                    }
                    None => &[],
                };
                wanted
                    .iter()
                    .filter_map(|name| self.built(kind, name, domain))
                    .collect()
            }
        }
    }
}

impl XdsSnapshot {
    /// The Listener or RouteConfiguration `name`, built once per snapshot.
    fn built(&self, kind: ResourceType, name: &Arc<str>, domain: &str) -> Option<Arc<Resource>> {
        let build = || {
            let target = names::resolve_listener(name, &self.registry, domain)?;
            Some(Arc::new(if kind == ResourceType::Listener {
                resources::listener(name)
            } else {
                resources::route_configuration(name, &target.cluster)
            }))
        };
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind, name.clone());
        if let Some(found) = built.get(&key) {
            return found.clone();
        }
        let made = build();
        if built.len() < BUILT_NAMES {
            built.insert(key, made.clone());
        }
        made
    }
}

/// The published [`XdsSnapshot`] (`None` until the registry's first sync).
#[derive(Clone)]
pub struct XdsCache {
    current: watch::Receiver<Option<Arc<XdsSnapshot>>>,
}

/// The writer's side: publishes, and remembers which resources each service produced.
pub struct CacheWriter {
    tx: watch::Sender<Option<Arc<XdsSnapshot>>>,
    /// `"<svc>.<ns>"` → the cluster names it produced, to remove them when it changes or leaves.
    by_service: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Publishes at the current registry revision after the first (the `.N` of the version).
    republished: u32,
}

impl XdsCache {
    pub fn new() -> (XdsCache, CacheWriter) {
        let (tx, current) = watch::channel(None);
        (
            XdsCache { current },
            CacheWriter {
                tx,
                by_service: HashMap::new(),
                republished: 0,
            },
        )
    }

    /// The newest snapshot, if the registry has synced.
    pub fn load(&self) -> Option<Arc<XdsSnapshot>> {
        self.current.borrow().clone()
    }

    /// Fires on every publish.
    pub fn changes(&self) -> watch::Receiver<Option<Arc<XdsSnapshot>>> {
        self.current.clone()
    }
}

impl CacheWriter {
    /// Follows `reader` until `stop`, publishing once `status` says the registry has synced.
    pub async fn run(
        mut self,
        reader: SnapshotReader,
        status: Arc<SyncStatus>,
        stop: CancellationToken,
    ) {
        let mut changes = reader.changes();
        loop {
            if status.is_synced() {
                self.update(reader.load_full());
            }
            let synced = self.tx.borrow().is_some();
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                // The first sync may be flagged after its snapshot was published.
                _ = tokio::time::sleep(Duration::from_millis(50)), if !synced => {}
            }
        }
    }

    /// Publishes the xDS state of `registry`, rebuilding only the services that changed since
    /// the last publish.
    pub fn update(&mut self, registry: Arc<EndpointSnapshot>) {
        let previous = self.tx.borrow().clone();
        if previous
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.registry, &registry))
        {
            return;
        }
        let (mut clusters, mut endpoints, changed): (Resources, Resources, Vec<Arc<str>>) =
            match &previous {
                Some(p) => (
                    p.clusters.clone(),
                    p.endpoints.clone(),
                    registry.changed_since(&p.registry).cloned().collect(),
                ),
                None => (
                    Resources::new(),
                    Resources::new(),
                    registry
                        .services()
                        .map(|s| Arc::from(format!("{}.{}", s.service, s.namespace)))
                        .collect(),
                ),
            };
        let revision = registry.revision;
        let generation = previous.as_ref().map_or(1, |p| p.generation + 1);
        let version = match &previous {
            Some(p) if p.revision == revision => {
                self.republished += 1;
                format!("{revision}.{}", self.republished)
            }
            _ => {
                self.republished = 0;
                revision.to_string()
            }
        };
        let (mut changed_generation, mut removed_generation) =
            previous.as_ref().map_or(([0; 2], [0; 2]), |p| {
                (p.changed_generation, p.removed_generation)
            });
        let mut changed_names = Vec::new();
        for name in changed {
            let mut old = HashMap::new();
            for key in self.by_service.remove(&name).unwrap_or_default() {
                old.insert(key.clone(), (clusters.remove(&key), endpoints.remove(&key)));
            }
            let mut produced = Vec::new();
            if let Some(service) = registry.service_by_name(&name) {
                for port in names::port_names(service) {
                    let cluster = names::cluster_name(service, port);
                    let key: Arc<str> = cluster.as_str().into();
                    let (old_cluster, old_endpoints) = old.remove(&key).unwrap_or((None, None));
                    let c = stamp(
                        old_cluster.as_ref(),
                        resources::cluster(&cluster),
                        generation,
                    );
                    let e = stamp(
                        old_endpoints.as_ref(),
                        resources::load_assignment(&cluster, service, port),
                        generation,
                    );
                    if c.generation == generation {
                        changed_generation[TYPE_CLUSTER] = generation;
                    }
                    if e.generation == generation {
                        changed_generation[TYPE_ENDPOINT] = generation;
                    }
                    if c.generation == generation || e.generation == generation {
                        changed_names.push(key.clone());
                    }
                    clusters.insert(key.clone(), c);
                    endpoints.insert(key.clone(), e);
                    produced.push(key);
                }
            }
            // What this service no longer produces left.
            for key in old.into_keys() {
                changed_generation = [generation; 2];
                removed_generation = [generation; 2];
                changed_names.push(key);
            }
            if !produced.is_empty() {
                self.by_service.insert(name, produced);
            }
        }
        self.tx.send_replace(Some(Arc::new(XdsSnapshot {
            revision,
            version,
            generation,
            clusters,
            endpoints,
            changed: changed_names,
            changed_generation,
            removed_generation,
            registry,
            built: Default::default(),
            canonical_listeners: Default::default(),
        })));
    }
}
