//! Node-local changes layered over the shared registry: instances this node's proxy has ejected
//! (passive health). An ejected instance stays registered — other nodes may reach it fine — but
//! this node's snapshot leaves it out of `healthy`, so the local DNS answers and the local proxy
//! agree.
//!
//! The sync loop's builder produces the *base* snapshot; what readers see is the base with the
//! overlay applied. Both the sync loop (new base) and the proxy (ejection, return) publish
//! through [`LocalOverlay`], whose mutex serialises them: one writer at a time, readers never
//! lock. With no ejection the base is published as is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::snapshot::{EndpointSnapshot, ServiceEndpoints};

/// Why and until when an instance is ejected, for `svcd list` and the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Ejection {
    pub reason: String,
    pub since: SystemTime,
    pub until: SystemTime,
    /// How many times this instance has been ejected (the ejection time grows with it).
    pub count: u32,
}

#[derive(Default)]
struct OverlayState {
    /// The last snapshot the sync loop built, before the overlay.
    base: Arc<EndpointSnapshot>,
    /// `"<svc>.<ns>"` → instance id → ejection.
    ejected: HashMap<String, BTreeMap<Box<str>, Ejection>>,
}

/// The overlay and the publishing point it shares with the sync loop.
pub struct LocalOverlay {
    /// Guards the base and the ejections; held while one snapshot is built and stored (a rare,
    /// short section: a sync publish or an ejection), never by a reader.
    state: Mutex<OverlayState>,
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    changes: watch::Sender<i64>,
}

impl LocalOverlay {
    pub fn new(snapshot: Arc<ArcSwap<EndpointSnapshot>>, changes: watch::Sender<i64>) -> Self {
        LocalOverlay {
            state: Mutex::new(OverlayState {
                base: snapshot.load_full(),
                ejected: HashMap::new(),
            }),
            snapshot,
            changes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OverlayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a new base built by `build` from the previous base; returns what was published.
    pub fn publish_base(
        &self,
        build: impl FnOnce(&EndpointSnapshot) -> EndpointSnapshot,
    ) -> Arc<EndpointSnapshot> {
        let mut state = self.lock();
        state.base = Arc::new(build(&state.base));
        self.publish_locked(&state)
    }

    /// Marks `id` of `service` (`"<svc>.<ns>"`) ejected on this node.
    pub fn eject(&self, service: &str, id: &str, ejection: Ejection) {
        let mut state = self.lock();
        state
            .ejected
            .entry(service.to_string())
            .or_default()
            .insert(id.into(), ejection);
        self.publish_locked(&state);
    }

    /// Returns `id` of `service` to service on this node.
    pub fn restore(&self, service: &str, id: &str) {
        let mut state = self.lock();
        let Some(ids) = state.ejected.get_mut(service) else {
            return;
        };
        if ids.remove(id).is_none() {
            return;
        }
        if ids.is_empty() {
            state.ejected.remove(service);
        }
        self.publish_locked(&state);
    }

    /// Every current ejection, by service.
    pub fn all_ejections(&self) -> HashMap<String, BTreeMap<Box<str>, Ejection>> {
        self.lock().ejected.clone()
    }

    /// Current ejections of `service`.
    pub fn ejections(&self, service: &str) -> BTreeMap<Box<str>, Ejection> {
        self.lock()
            .ejected
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    fn publish_locked(&self, state: &OverlayState) -> Arc<EndpointSnapshot> {
        let published = if state.ejected.is_empty() {
            state.base.clone()
        } else {
            Arc::new(apply(&state.base, &state.ejected))
        };
        let revision = published.revision;
        self.snapshot.store(published.clone());
        self.changes.send_replace(revision);
        published
    }
}

/// The base with every ejected instance taken out of its service's `healthy` set.
fn apply(
    base: &EndpointSnapshot,
    ejected: &HashMap<String, BTreeMap<Box<str>, Ejection>>,
) -> EndpointSnapshot {
    let replaced = ejected.iter().filter_map(|(name, ids)| {
        let service = base.service_by_name(name)?;
        if !service.healthy.iter().any(|e| ids.contains_key(&e.id)) {
            return None;
        }
        let healthy = service
            .healthy
            .iter()
            .filter(|e| !ids.contains_key(&e.id))
            .cloned()
            .collect();
        Some((
            name.as_str(),
            Arc::new(ServiceEndpoints {
                namespace: service.namespace.clone(),
                service: service.service.clone(),
                all: service.all.clone(),
                healthy,
            }),
        ))
    });
    base.with_services(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotBuilder;
    use crate::store::{Event, EventKind};

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
            reason: "5 consecutive failures".into(),
            since: SystemTime::now(),
            until: SystemTime::now(),
            count: 1,
        }
    }

    #[test]
    fn ejected_instances_leave_healthy_and_survive_new_bases() {
        let snapshot = Arc::new(ArcSwap::from_pointee(EndpointSnapshot::default()));
        let (tx, _rx) = watch::channel(0);
        let overlay = LocalOverlay::new(snapshot.clone(), tx);
        let mut b = SnapshotBuilder::new();
        put(&mut b, "a", 2);
        put(&mut b, "b", 3);
        overlay.publish_base(|prev| b.build(prev));
        overlay.eject("web.default", "a", ejection());
        let web = snapshot
            .load()
            .service_by_name("web.default")
            .cloned()
            .unwrap();
        assert_eq!((web.all.len(), web.healthy.len()), (2, 1));
        assert_eq!(&*web.healthy[0].id, "b");
        // A new base (another instance joins) keeps the ejection applied.
        put(&mut b, "c", 4);
        overlay.publish_base(|prev| b.build(prev));
        let web = snapshot
            .load()
            .service_by_name("web.default")
            .cloned()
            .unwrap();
        let ids: Vec<&str> = web.healthy.iter().map(|e| &*e.id).collect();
        assert_eq!(ids, ["b", "c"]);
        overlay.restore("web.default", "a");
        assert_eq!(
            snapshot
                .load()
                .service_by_name("web.default")
                .unwrap()
                .healthy
                .len(),
            3
        );
        assert!(overlay.ejections("web.default").is_empty());
    }
}
