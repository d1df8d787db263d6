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

/// One consistent xDS state, at one registry revision.
#[derive(Debug)]
pub struct XdsSnapshot {
    /// The registry revision: every response's `version_info`.
    pub revision: i64,
    pub clusters: Resources,
    pub endpoints: Resources,
    /// The registry snapshot itself: listener names are resolved against it on demand.
    pub registry: Arc<EndpointSnapshot>,
}

impl XdsSnapshot {
    /// The resources of `kind` a client subscribed to (`None`: wildcard), sorted by name, no
    /// duplicates. Names that do not exist are left out (and pushed once they appear).
    pub fn select(
        &self,
        kind: ResourceType,
        names: Option<&std::collections::BTreeSet<String>>,
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
                    Some(names) => names
                        .iter()
                        .filter_map(|n| all.get(n.as_str()).cloned())
                        .collect(),
                }
            }
            ResourceType::Listener | ResourceType::Route => {
                let wanted: Vec<String> = match names {
                    Some(names) => names.iter().cloned().collect(),
                    None if kind == ResourceType::Listener => {
                        let mut all: Vec<String> =
                            names::canonical_listeners(&self.registry).collect();
                        all.sort_unstable();
                        all
                    }
                    None => Vec::new(),
                };
                wanted
                    .iter()
                    .filter_map(|name| {
                        let target = names::resolve_listener(name, &self.registry, domain)?;
                        Some(Arc::new(if kind == ResourceType::Listener {
                            resources::listener(name)
                        } else {
                            resources::route_configuration(name, &target.cluster)
                        }))
                    })
                    .collect()
            }
        }
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
}

impl XdsCache {
    pub fn new() -> (XdsCache, CacheWriter) {
        let (tx, current) = watch::channel(None);
        (
            XdsCache { current },
            CacheWriter {
                tx,
                by_service: HashMap::new(),
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
        for name in changed {
            for old in self.by_service.remove(&name).unwrap_or_default() {
                clusters.remove(&old);
                endpoints.remove(&old);
            }
            let Some(service) = registry.service_by_name(&name) else {
                continue;
            };
            let mut produced = Vec::new();
            for port in names::port_names(service) {
                let cluster = names::cluster_name(service, port);
                let key: Arc<str> = cluster.as_str().into();
                clusters.insert(key.clone(), Arc::new(resources::cluster(&cluster)));
                endpoints.insert(
                    key.clone(),
                    Arc::new(resources::load_assignment(&cluster, service, port)),
                );
                produced.push(key);
            }
            self.by_service.insert(name, produced);
        }
        self.tx.send_replace(Some(Arc::new(XdsSnapshot {
            revision: registry.revision,
            clusters,
            endpoints,
            registry,
        })));
    }
}
