//! [`SnapshotPublisher`]: the one place snapshots are published, and the node-local layer on top
//! of the shared registry.
//!
//! Two writers publish: the sync loop (a new *base* built from the store) and this node's load
//! balancer (an instance ejected or returned by passive health). An ejected instance stays
//! registered — other nodes may reach it fine — but this node's snapshot records the ejection in
//! its service ([`ServiceEndpoints::ejections`]) and leaves the instance out of `healthy`, so the
//! local DNS, the proxies, the API, the CLI and the metrics all read one state
//! ([`ServiceEndpoints::served_state`]) from one snapshot.
//!
//! The mutex serialises the two writers (a rare, short section: one snapshot built and stored);
//! readers never lock. With no ejection the base is published as is.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::RegistryMetrics;
use crate::name::ServiceName;
use crate::snapshot::{Ejection, EndpointSnapshot, ServiceEndpoints};
use crate::status::SyncStatus;
use crate::SnapshotReader;

#[derive(Default)]
struct PublisherState {
    /// The last snapshot the sync loop built, before the ejections.
    base: Arc<EndpointSnapshot>,
    /// Service → instance id → ejection.
    ejected: HashMap<ServiceName, BTreeMap<Box<str>, Arc<Ejection>>>,
}

/// Publishes snapshots: the sync loop's bases with this node's ejections applied.
pub struct SnapshotPublisher {
    /// Guards the base and the ejections; held while one snapshot is built and stored, never by
    /// a reader.
    state: Mutex<PublisherState>,
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    /// The revision of every published snapshot (DNS caches, proxies and tests wait on it).
    changes: watch::Sender<i64>,
    /// Kept so `changes` always has a receiver: `send_replace` then never fails.
    changes_rx: watch::Receiver<i64>,
    pub status: Arc<SyncStatus>,
    pub metrics: RegistryMetrics,
}

impl SnapshotPublisher {
    pub fn new(status: Arc<SyncStatus>, metrics: RegistryMetrics) -> Self {
        let (changes, changes_rx) = watch::channel(0);
        SnapshotPublisher {
            state: Mutex::new(PublisherState::default()),
            snapshot: Arc::new(ArcSwap::from_pointee(EndpointSnapshot::default())),
            changes,
            changes_rx,
            status,
            metrics,
        }
    }

    /// A publisher for tests and tools: unregistered metrics, a fresh status.
    pub fn detached() -> Self {
        Self::new(Arc::default(), RegistryMetrics::unregistered())
    }

    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            snapshot: self.snapshot.clone(),
            changes: self.changes_rx.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PublisherState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a new base built by `build` from the previous base; returns what was published.
    pub fn publish_base(
        &self,
        build: impl FnOnce(&EndpointSnapshot) -> EndpointSnapshot,
    ) -> Arc<EndpointSnapshot> {
        let mut state = self.lock();
        state.base = Arc::new(build(&state.base));
        let next = self.publish_locked(&state, None);
        self.metrics.endpoints.set(next.endpoint_count() as i64);
        self.metrics.services.set(next.service_count() as i64);
        self.metrics.revision.set(next.revision);
        self.metrics.publishes.inc();
        next
    }

    /// Records (`Some`) or ends (`None`) the ejection of `id` of `service` on this node, and
    /// publishes the change.
    pub fn set_ejection(&self, service: &ServiceName, id: &str, ejection: Option<Ejection>) {
        let mut state = self.lock();
        let changed = match ejection {
            Some(ejection) => {
                state
                    .ejected
                    .entry(service.clone())
                    .or_default()
                    .insert(id.into(), Arc::new(ejection));
                true
            }
            None => match state.ejected.get_mut(service) {
                Some(ids) => {
                    let removed = ids.remove(id).is_some();
                    if ids.is_empty() {
                        state.ejected.remove(service);
                    }
                    removed
                }
                None => false,
            },
        };
        if changed {
            self.publish_locked(&state, Some(service));
        }
    }

    /// Publishes base + ejections. `only`: the one service whose ejections changed (the rest of
    /// the last published snapshot is reused); `None`: a new base, apply them all.
    fn publish_locked(
        &self,
        state: &PublisherState,
        only: Option<&ServiceName>,
    ) -> Arc<EndpointSnapshot> {
        let published = match only {
            None if state.ejected.is_empty() => state.base.clone(),
            None => Arc::new(apply(&state.base, state.ejected.iter())),
            Some(name) => {
                let none = BTreeMap::new();
                let ids = state.ejected.get(name).unwrap_or(&none);
                Arc::new(apply(&self.snapshot.load(), std::iter::once((name, ids))))
            }
        };
        let revision = published.revision;
        self.snapshot.store(published.clone());
        self.changes.send_replace(revision);
        published
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        if self.status.connected.swap(connected, Ordering::Relaxed) != connected {
            if connected {
                self.status.clear_error();
                info!("registry store connected");
            } else {
                warn!("registry store disconnected; serving the last snapshot");
            }
        }
        self.metrics.connected.set(connected as i64);
    }
}

/// `base` with each listed service's ejections recorded (replacing whatever it had); services
/// absent from `base` are skipped, unchanged ones keep their `Arc`.
fn apply<'a>(
    base: &EndpointSnapshot,
    ejected: impl Iterator<Item = (&'a ServiceName, &'a BTreeMap<Box<str>, Arc<Ejection>>)>,
) -> EndpointSnapshot {
    let replaced = ejected.filter_map(|(name, ids)| {
        let service = base.service_by_name(name.as_str())?;
        // Only ejections of instances that are still there.
        let ejections: BTreeMap<Box<str>, Arc<Ejection>> = ids
            .iter()
            .filter(|(id, _)| service.all.iter().any(|e| e.id == **id))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        if ejections == service.ejections {
            return None;
        }
        Some((
            name.as_str(),
            Arc::new(ServiceEndpoints::new(
                service.namespace.clone(),
                service.service.clone(),
                service.all.clone(),
                ejections,
                service.revision,
            )),
        ))
    });
    base.with_services(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ServedState, SnapshotBuilder};
    use crate::store::{Event, EventKind};
    use std::time::SystemTime;

    fn put(b: &mut SnapshotBuilder, id: &str, rev: i64) {
        b.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/default/web/{id}"),
            value: br#"{"ip":"10.0.0.1"}"#.to_vec(),
            mod_revision: rev,
        });
    }

    fn ejection() -> Ejection {
        Ejection {
            holders: vec!["http"],
            reason: "5 consecutive failures".into(),
            since: SystemTime::now(),
            until: SystemTime::now(),
            count: 1,
        }
    }

    #[test]
    fn ejected_instances_leave_healthy_and_survive_new_bases() {
        let publisher = SnapshotPublisher::detached();
        let reader = publisher.reader();
        let web = ServiceName::new("web", "default");
        let mut b = SnapshotBuilder::new();
        put(&mut b, "a", 2);
        put(&mut b, "b", 3);
        publisher.publish_base(|prev| b.build(prev));
        publisher.set_ejection(&web, "a", Some(ejection()));
        let svc = reader
            .load()
            .service_by_name("web.default")
            .cloned()
            .unwrap();
        assert_eq!((svc.all.len(), svc.healthy.len()), (2, 1));
        assert_eq!(&*svc.healthy[0].id, "b");
        assert_eq!(svc.served_state(&svc.all[0]), ServedState::Ejected);
        assert_eq!(svc.served_state(&svc.all[1]), ServedState::Healthy);
        // A new base (another instance joins) keeps the ejection applied.
        put(&mut b, "c", 4);
        publisher.publish_base(|prev| b.build(prev));
        let svc = reader
            .load()
            .service_by_name("web.default")
            .cloned()
            .unwrap();
        let ids: Vec<&str> = svc.healthy.iter().map(|e| &*e.id).collect();
        assert_eq!(ids, ["b", "c"]);
        publisher.set_ejection(&web, "a", None);
        let svc = reader
            .load()
            .service_by_name("web.default")
            .cloned()
            .unwrap();
        assert_eq!(svc.healthy.len(), 3);
        assert!(svc.ejections.is_empty());
    }
}
