//! The immutable endpoint snapshot that DNS and the proxies read, and the single writer that
//! builds it.
//!
//! Readers `load()` an `Arc<EndpointSnapshot>` from arc-swap: no lock, no allocation. The writer
//! ([`SnapshotBuilder`]) applies watch events to a working copy and, once per burst, builds a new
//! snapshot in which only the services that changed are rebuilt; every other service (and every
//! untouched namespace) is shared with the previous snapshot through its `Arc`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use svcd_config::{Instance, State};

use crate::endpoint::{Endpoint, Interner};
use crate::publisher::Ejection;

use crate::keys::InstanceKey;
use crate::store::{Event, EventKind, KeyValue};

/// All instances of one service, sorted by id, plus the healthy subset precomputed so a pick is
/// an index into a slice.
#[derive(Debug, Default)]
pub struct ServiceEndpoints {
    pub namespace: String,
    pub service: String,
    pub all: Vec<Arc<Endpoint>>,
    /// The instances whose [`ServedState`] is `Healthy`: what DNS answers and proxies pick from.
    pub healthy: Vec<Arc<Endpoint>>,
    /// Instances this node's load balancer has ejected (passive health), by id. Empty in a base
    /// snapshot; filled by the [`crate::SnapshotPublisher`].
    pub ejections: BTreeMap<Box<str>, Arc<Ejection>>,
    /// Store revision of the last change to this service's instances: the index of blocking
    /// queries (`GET /v1/services/{ns}/{svc}?index=…&wait=…`).
    pub revision: i64,
}

/// The state an instance is served with on this node — the one answer DNS, the proxies, the API,
/// the CLI and the metrics all give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServedState {
    Healthy,
    Unhealthy,
    Draining,
    /// Registered healthy, but ejected by this node's load balancer.
    Ejected,
}

impl ServedState {
    pub const ALL: [ServedState; 4] = [
        ServedState::Healthy,
        ServedState::Unhealthy,
        ServedState::Draining,
        ServedState::Ejected,
    ];

    /// The registered state, unless this node ejected a healthy instance.
    #[inline]
    pub fn of(state: State, ejected: bool) -> Self {
        match state {
            State::Healthy if ejected => ServedState::Ejected,
            State::Healthy => ServedState::Healthy,
            State::Unhealthy => ServedState::Unhealthy,
            State::Draining => ServedState::Draining,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServedState::Healthy => "healthy",
            ServedState::Unhealthy => "unhealthy",
            ServedState::Draining => "draining",
            ServedState::Ejected => "ejected",
        }
    }
}

impl ServiceEndpoints {
    /// `all` sorted by id, with `healthy` derived through [`Self::served_state`].
    pub fn new(
        namespace: String,
        service: String,
        all: Vec<Arc<Endpoint>>,
        ejections: BTreeMap<Box<str>, Arc<Ejection>>,
        revision: i64,
    ) -> Self {
        let mut s = ServiceEndpoints {
            namespace,
            service,
            all,
            healthy: Vec::new(),
            ejections,
            revision,
        };
        s.healthy = s
            .all
            .iter()
            .filter(|e| s.served_state(e) == ServedState::Healthy)
            .cloned()
            .collect();
        s
    }

    /// How this node serves `endpoint` (an instance of this service).
    #[inline]
    pub fn served_state(&self, endpoint: &Endpoint) -> ServedState {
        ServedState::of(
            endpoint.state,
            !self.ejections.is_empty() && self.ejections.contains_key(&endpoint.id),
        )
    }

    /// This node's ejection of instance `id`, if any.
    pub fn ejection(&self, id: &str) -> Option<&Ejection> {
        self.ejections.get(id).map(|e| &**e)
    }

    /// Instances per served state, in [`ServedState::ALL`] order.
    pub fn count_by_state(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for e in &self.all {
            counts[self.served_state(e) as usize] += 1;
        }
        counts
    }
}

/// Keys are `Arc<str>` so copying the map on publish bumps refcounts instead of copying strings.
/// Number of shards the service map is split into. Publishing copies only the shards that hold a
/// changed service, so the cost of a publish is O(services / SHARDS) per changed shard, not
/// O(all services) — at 10k services, about 160 entries per shard.
const SHARDS: usize = 64;

type Hasher = foldhash::fast::FixedState;
/// `"<svc>.<ns>"` → endpoints. Keys are `Arc<str>` so copying a shard bumps refcounts instead of
/// copying strings.
type Shard = HashMap<Arc<str>, Arc<ServiceEndpoints>, Hasher>;

/// One consistent view of the registry at `revision`.
#[derive(Debug)]
pub struct EndpointSnapshot {
    pub revision: i64,
    shards: Vec<Arc<Shard>>,
    endpoint_count: usize,
    service_count: usize,
}

impl Default for EndpointSnapshot {
    fn default() -> Self {
        let empty = Arc::new(Shard::default());
        EndpointSnapshot {
            revision: 0,
            shards: vec![empty; SHARDS],
            endpoint_count: 0,
            service_count: 0,
        }
    }
}

fn shard_of(name: &str) -> usize {
    use std::hash::BuildHasher;
    (Hasher::default().hash_one(name) as usize) % SHARDS
}

/// Longest `"<svc>.<ns>"`: two 63-byte labels and the dot.
const MAX_NAME: usize = 127;

impl EndpointSnapshot {
    /// Looks up `"<svc>.<ns>"` — the form DNS names and proxy configs already carry — without
    /// allocating.
    #[inline]
    pub fn service_by_name(&self, name: &str) -> Option<&Arc<ServiceEndpoints>> {
        self.shards[shard_of(name)].get(name)
    }

    /// Looks up a service by its two labels, joining them on the stack.
    pub fn service(&self, namespace: &str, service: &str) -> Option<&Arc<ServiceEndpoints>> {
        let len = service.len() + 1 + namespace.len();
        if len > MAX_NAME {
            return None;
        }
        let mut buf = [0u8; MAX_NAME];
        buf[..service.len()].copy_from_slice(service.as_bytes());
        buf[service.len()] = b'.';
        buf[service.len() + 1..len].copy_from_slice(namespace.as_bytes());
        self.service_by_name(std::str::from_utf8(&buf[..len]).ok()?)
    }

    /// This snapshot with the named services (`"<svc>.<ns>"`, present here) replaced; the other
    /// shards are shared.
    pub fn with_services<'a>(
        &self,
        replaced: impl IntoIterator<Item = (&'a str, Arc<ServiceEndpoints>)>,
    ) -> EndpointSnapshot {
        let mut shards = self.shards.clone();
        for (name, service) in replaced {
            let shard = Arc::make_mut(&mut shards[shard_of(name)]);
            if let Some(slot) = shard.get_mut(name) {
                *slot = service;
            }
        }
        EndpointSnapshot {
            revision: self.revision,
            shards,
            endpoint_count: self.endpoint_count,
            service_count: self.service_count,
        }
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEndpoints>> {
        self.shards.iter().flat_map(|shard| shard.values())
    }

    /// Names (`"<svc>.<ns>"`) of the services that differ between `older` and this snapshot:
    /// added, removed or changed (a new `Arc`). Unchanged shards are skipped by pointer, so the
    /// cost follows the size of the change, not of the registry.
    pub fn changed_since<'a>(
        &'a self,
        older: &'a EndpointSnapshot,
    ) -> impl Iterator<Item = &'a Arc<str>> {
        self.shards
            .iter()
            .zip(&older.shards)
            .filter(|(new, old)| !Arc::ptr_eq(new, old))
            .flat_map(|(new, old)| {
                let changed = new.iter().filter(move |(name, svc)| {
                    !old.get(&***name).is_some_and(|o| Arc::ptr_eq(o, svc))
                });
                let removed = old.keys().filter(move |name| !new.contains_key(&***name));
                changed.map(|(name, _)| name).chain(removed)
            })
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoint_count
    }

    pub fn service_count(&self) -> usize {
        self.service_count
    }
}

/// Keys seen so far by a re-list in progress.
#[derive(Default)]
pub struct Relist {
    listed: HashSet<String>,
}

/// What applying one event did, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Already applied (a resumed watch repeated it); not counted as an event.
    Stale,
    Changed,
    Unchanged,
    /// The key or value did not parse; the key is treated as absent.
    Invalid {
        key: String,
        reason: String,
    },
}

/// The single writer: working state plus the set of services touched since the last publish.
#[derive(Default)]
pub struct SnapshotBuilder {
    /// ns → svc → id → endpoint; the source of truth between publishes.
    working: HashMap<String, HashMap<String, BTreeMap<String, Arc<Endpoint>>>>,
    dirty: HashSet<(String, String)>,
    revision: i64,
    endpoint_count: usize,
    /// Keys already reported invalid, so garbage is logged once, not on every re-list.
    reported_invalid: HashSet<String>,
    /// Shares port names, node names and tag/meta keys between endpoints.
    interner: Interner,
}

impl SnapshotBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Applies the events of one watch response. Events at or below the revision already applied
    /// were seen before (a resumed watch may repeat them) and are ignored: revisions only go
    /// forward. The floor is taken once per batch because one revision (a lease expiry, a
    /// transaction) can carry several events.
    pub fn apply_batch(&mut self, events: &[Event]) -> Vec<Applied> {
        let floor = self.revision;
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            if event.mod_revision <= floor {
                results.push(Applied::Stale);
                continue;
            }
            self.revision = self.revision.max(event.mod_revision);
            results.push(self.apply_unchecked(
                event.kind,
                &event.key,
                &event.value,
                event.mod_revision,
            ));
        }
        results
    }

    /// Applies a single event (see [`Self::apply_batch`]).
    pub fn apply(&mut self, event: &Event) -> Applied {
        self.apply_batch(std::slice::from_ref(event))
            .pop()
            .expect("one result per event")
    }

    /// Moves the revision forward without events (watch progress).
    pub fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    fn apply_unchecked(
        &mut self,
        kind: EventKind,
        key: &str,
        value: &[u8],
        mod_revision: i64,
    ) -> Applied {
        let Some(parsed) = InstanceKey::parse(key) else {
            return self.invalid(
                key,
                "key is not /svcd/v1/endpoints/<ns>/<service>/<id>".into(),
            );
        };
        match kind {
            EventKind::Delete => self.remove(&parsed),
            EventKind::Put => match Instance::from_json(value) {
                Ok(instance) => {
                    self.reported_invalid.remove(key);
                    self.upsert(parsed, instance, mod_revision)
                }
                Err(e) => {
                    // The key now holds garbage: whatever it held before is gone.
                    self.remove(&parsed);
                    let reason = if e.path.is_empty() {
                        e.message
                    } else {
                        format!("{}: {}", e.path, e.message)
                    };
                    self.invalid(key, reason)
                }
            },
        }
    }

    fn invalid(&mut self, key: &str, reason: String) -> Applied {
        if self.reported_invalid.insert(key.to_string()) {
            Applied::Invalid {
                key: key.to_string(),
                reason,
            }
        } else {
            Applied::Unchanged
        }
    }

    fn upsert(&mut self, key: InstanceKey, instance: Instance, mod_revision: i64) -> Applied {
        let ids = self
            .working
            .entry(key.namespace.clone())
            .or_default()
            .entry(key.service.clone())
            .or_default();
        if let Some(old) = ids.get(&key.id) {
            if old.same_as(&instance) {
                return Applied::Unchanged;
            }
        }
        let endpoint = Arc::new(self.interner.endpoint(&key.id, instance, mod_revision));
        if ids.insert(key.id, endpoint).is_none() {
            self.endpoint_count += 1;
        }
        self.dirty.insert((key.namespace, key.service));
        Applied::Changed
    }

    fn remove(&mut self, key: &InstanceKey) -> Applied {
        let Some(services) = self.working.get_mut(&key.namespace) else {
            return Applied::Unchanged;
        };
        let Some(ids) = services.get_mut(&key.service) else {
            return Applied::Unchanged;
        };
        if ids.remove(&key.id).is_none() {
            return Applied::Unchanged;
        }
        self.endpoint_count -= 1;
        if ids.is_empty() {
            services.remove(&key.service);
            if services.is_empty() {
                self.working.remove(&key.namespace);
            }
        }
        self.dirty
            .insert((key.namespace.clone(), key.service.clone()));
        Applied::Changed
    }

    /// Starts applying a full listing taken at one revision. Pages are applied as they arrive
    /// ([`Self::relist_page`]) so a 100k-key registry is never held twice in memory; keys the
    /// listing did not contain are deleted by [`Self::finish_relist`]. Together they turn the old
    /// state into the new one as events, so a re-list after compaction or a reconnect misses
    /// nothing and repeats nothing.
    pub fn begin_relist(&mut self) -> Relist {
        Relist::default()
    }

    pub fn relist_page(&mut self, relist: &mut Relist, kvs: &[KeyValue]) -> Vec<Applied> {
        kvs.iter()
            .map(|kv| {
                relist.listed.insert(kv.key.clone());
                self.apply_unchecked(EventKind::Put, &kv.key, &kv.value, kv.mod_revision)
            })
            .collect()
    }

    pub fn finish_relist(&mut self, relist: Relist, revision: i64) -> Vec<Applied> {
        let mut vanished = Vec::new();
        for (ns, services) in &self.working {
            for (svc, ids) in services {
                for id in ids.keys() {
                    let key = format!("{}{ns}/{svc}/{id}", crate::keys::ENDPOINTS_PREFIX);
                    if !relist.listed.contains(&key) {
                        vanished.push(key);
                    }
                }
            }
        }
        let results = vanished
            .iter()
            .map(|key| self.apply_unchecked(EventKind::Delete, key, &[], revision))
            .collect();
        // The listing is the state at `revision`: that is where the watch resumes, even when it
        // is lower than before (the store was wiped or restored from a backup).
        self.revision = revision;
        self.reported_invalid
            .retain(|key| relist.listed.contains(key));
        self.interner.prune();
        results
    }

    /// A whole listing in one call (tests, small registries).
    pub fn reset_to(&mut self, kvs: &[KeyValue], revision: i64) -> Vec<Applied> {
        let mut relist = self.begin_relist();
        let mut results = self.relist_page(&mut relist, kvs);
        results.extend(self.finish_relist(relist, revision));
        results
    }

    /// Builds the next snapshot from `previous`, rebuilding only dirty services and copying only
    /// the shards that hold them.
    pub fn build(&mut self, previous: &EndpointSnapshot) -> EndpointSnapshot {
        let mut shards = previous.shards.clone();
        let mut service_count = previous.service_count;
        for (ns, svc) in self.dirty.drain() {
            let name: Arc<str> = Arc::from(format!("{svc}.{ns}"));
            // Copy-on-write: the first change to a shard clones it, later ones reuse the copy.
            let shard = Arc::make_mut(&mut shards[shard_of(&name)]);
            match self.working.get(&ns).and_then(|s| s.get(&svc)) {
                Some(ids) => {
                    let all: Vec<Arc<Endpoint>> = ids.values().cloned().collect();
                    let endpoints = Arc::new(ServiceEndpoints::new(
                        ns,
                        svc,
                        all,
                        BTreeMap::new(),
                        self.revision,
                    ));
                    if shard.insert(name, endpoints).is_none() {
                        service_count += 1;
                    }
                }
                None => {
                    if shard.remove(&name).is_some() {
                        service_count -= 1;
                    }
                }
            }
        }
        EndpointSnapshot {
            revision: self.revision,
            shards,
            endpoint_count: self.endpoint_count,
            service_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, ip: &str, rev: i64) -> Event {
        Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/{key}"),
            value: format!(r#"{{"ip":"{ip}"}}"#).into_bytes(),
            mod_revision: rev,
        }
    }

    fn del(key: &str, rev: i64) -> Event {
        Event {
            kind: EventKind::Delete,
            key: format!("/svcd/v1/endpoints/{key}"),
            value: vec![],
            mod_revision: rev,
        }
    }

    #[test]
    fn unchanged_services_are_shared_between_snapshots() {
        let mut b = SnapshotBuilder::new();
        b.apply(&put("default/web/a", "10.0.0.1", 2));
        b.apply(&put("default/db/a", "10.0.0.2", 3));
        let s1 = b.build(&EndpointSnapshot::default());
        b.apply(&put("default/web/b", "10.0.0.3", 4));
        let s2 = b.build(&s1);
        assert!(Arc::ptr_eq(
            s1.service("default", "db").unwrap(),
            s2.service("default", "db").unwrap()
        ));
        assert_eq!(s2.service("default", "web").unwrap().healthy.len(), 2);
        assert_eq!(s2.endpoint_count(), 3);
        assert_eq!(s2.revision, 4);
    }

    #[test]
    fn old_revisions_ignored_and_garbage_skipped_once() {
        let mut b = SnapshotBuilder::new();
        assert_eq!(
            b.apply(&put("default/web/a", "10.0.0.1", 5)),
            Applied::Changed
        );
        assert_eq!(b.apply(&del("default/web/a", 4)), Applied::Stale);
        let mut garbage = put("default/web/a", "x", 6);
        garbage.value = b"{not json".to_vec();
        assert!(matches!(b.apply(&garbage), Applied::Invalid { .. }));
        let s = b.build(&EndpointSnapshot::default());
        assert!(
            s.service("default", "web").is_none(),
            "garbage replaced the endpoint"
        );
        garbage.mod_revision = 7;
        assert_eq!(b.apply(&garbage), Applied::Unchanged, "reported once");
    }

    #[test]
    fn reset_synthesizes_deletes() {
        let mut b = SnapshotBuilder::new();
        b.apply(&put("default/web/a", "10.0.0.1", 2));
        b.apply(&put("default/web/b", "10.0.0.2", 3));
        let s1 = b.build(&EndpointSnapshot::default());
        let kvs = vec![KeyValue {
            key: "/svcd/v1/endpoints/default/web/b".into(),
            value: br#"{"ip":"10.0.0.2"}"#.to_vec(),
            mod_revision: 3,
        }];
        b.reset_to(&kvs, 10);
        let s2 = b.build(&s1);
        let web = s2.service("default", "web").unwrap();
        assert_eq!(web.all.len(), 1);
        assert_eq!(&*web.all[0].id, "b");
        assert_eq!(s2.revision, 10);
    }

    #[test]
    fn changed_since_names_added_changed_and_removed_services() {
        let mut b = SnapshotBuilder::new();
        b.apply(&put("default/web/a", "10.0.0.1", 2));
        b.apply(&put("default/db/a", "10.0.0.2", 3));
        let s1 = b.build(&EndpointSnapshot::default());
        b.apply(&put("default/web/b", "10.0.0.3", 4));
        b.apply(&del("default/db/a", 5));
        b.apply(&put("default/cache/a", "10.0.0.4", 6));
        let s2 = b.build(&s1);
        let mut changed: Vec<&str> = s2.changed_since(&s1).map(|n| &**n).collect();
        changed.sort();
        assert_eq!(changed, ["cache.default", "db.default", "web.default"]);
        assert_eq!(s2.changed_since(&s2).count(), 0);
    }

    #[test]
    fn unhealthy_not_in_healthy_set() {
        let mut b = SnapshotBuilder::new();
        let mut e = put("default/web/a", "10.0.0.1", 2);
        e.value = br#"{"ip":"10.0.0.1","state":"draining"}"#.to_vec();
        b.apply(&e);
        let s = b.build(&EndpointSnapshot::default());
        let web = s.service("default", "web").unwrap();
        assert_eq!((web.all.len(), web.healthy.len()), (1, 0));
    }
}
