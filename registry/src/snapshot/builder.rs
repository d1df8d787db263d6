//! The single writer of the snapshot: watch events and re-list pages applied to a working copy,
//! then, once per burst, a new [`EndpointSnapshot`] in which only the services that changed are
//! rebuilt and only their shards copied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use svcd_config::Instance;

use super::{shard_of, EndpointSnapshot, ServiceEndpoints};
use crate::endpoint::{Endpoint, Interner};
use crate::keys::parse_parts;
use crate::store::{Event, EventKind, KeyValue};

/// A re-list in progress: its number, which every entry it lists is stamped with, and the
/// invalid keys it listed.
pub struct Relist {
    number: u32,
    invalid_listed: HashSet<String>,
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

/// One service's instances in the working copy.
#[derive(Default)]
struct WorkingService {
    /// Sorted by id: 8 bytes an instance, where a map keyed by a copy of the id cost ~100 (at a
    /// million endpoints, the difference between fitting in 300 MB and not).
    endpoints: Vec<Arc<Endpoint>>,
    /// Parallel to `endpoints`: the number of the last re-list that listed each one, so a
    /// re-list finds what vanished without holding a set of every key it saw.
    listed: Vec<u32>,
    /// Changed since the last build (and queued in `SnapshotBuilder::dirty`).
    dirty: bool,
}

impl WorkingService {
    fn find(&self, id: &str) -> Result<usize, usize> {
        self.endpoints.binary_search_by(|e| (*e.id).cmp(id))
    }
}

/// The working service `ns`/`svc`, created empty when absent (allocating its names only then).
fn working_service<'a>(
    working: &'a mut HashMap<Box<str>, HashMap<Box<str>, WorkingService>>,
    ns: &str,
    svc: &str,
) -> &'a mut WorkingService {
    if !working.contains_key(ns) {
        working.insert(ns.into(), HashMap::new());
    }
    let services = working.get_mut(ns).expect("just inserted");
    if !services.contains_key(svc) {
        services.insert(svc.into(), WorkingService::default());
    }
    services.get_mut(svc).expect("just inserted")
}

/// The single writer: working state plus the services touched since the last publish.
#[derive(Default)]
pub struct SnapshotBuilder {
    /// ns → svc → instances; the source of truth between publishes. A service whose last
    /// instance left stays (empty, dirty) until the next build removes it.
    working: HashMap<Box<str>, HashMap<Box<str>, WorkingService>>,
    /// (ns, svc) of every service with `dirty` set, each once.
    dirty: Vec<(Box<str>, Box<str>)>,
    revision: i64,
    endpoint_count: usize,
    /// The number entries are stamped with when applied: the current re-list's, or the last.
    listing: u32,
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
        let Some((ns, svc, id)) = parse_parts(key) else {
            return self.invalid(
                key,
                "key is not /svcd/v1/endpoints/<ns>/<service>/<id>".into(),
            );
        };
        match kind {
            EventKind::Delete => self.remove(ns, svc, id),
            EventKind::Put => match Instance::from_json(value) {
                Ok(instance) => {
                    if !self.reported_invalid.is_empty() {
                        self.reported_invalid.remove(key);
                    }
                    self.upsert(ns, svc, id, instance, mod_revision)
                }
                Err(e) => {
                    // The key now holds garbage: whatever it held before is gone.
                    self.remove(ns, svc, id);
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

    fn mark_dirty(
        dirty: &mut Vec<(Box<str>, Box<str>)>,
        ws: &mut WorkingService,
        ns: &str,
        svc: &str,
    ) {
        if !ws.dirty {
            ws.dirty = true;
            dirty.push((ns.into(), svc.into()));
        }
    }

    fn upsert(
        &mut self,
        ns: &str,
        svc: &str,
        id: &str,
        instance: Instance,
        mod_revision: i64,
    ) -> Applied {
        let ws = working_service(&mut self.working, ns, svc);
        let at = ws.find(id);
        if let Ok(i) = at {
            ws.listed[i] = self.listing;
            if ws.endpoints[i].same_as(&instance) {
                return Applied::Unchanged;
            }
        }
        let endpoint = Arc::new(self.interner.endpoint(id, instance, mod_revision));
        match at {
            Ok(i) => ws.endpoints[i] = endpoint,
            Err(i) => {
                ws.endpoints.insert(i, endpoint);
                ws.listed.insert(i, self.listing);
                self.endpoint_count += 1;
            }
        }
        Self::mark_dirty(&mut self.dirty, ws, ns, svc);
        Applied::Changed
    }

    fn remove(&mut self, ns: &str, svc: &str, id: &str) -> Applied {
        let Some(ws) = self.working.get_mut(ns).and_then(|s| s.get_mut(svc)) else {
            return Applied::Unchanged;
        };
        let Ok(i) = ws.find(id) else {
            return Applied::Unchanged;
        };
        ws.endpoints.remove(i);
        ws.listed.remove(i);
        self.endpoint_count -= 1;
        Self::mark_dirty(&mut self.dirty, ws, ns, svc);
        Applied::Changed
    }

    /// Starts applying a full listing taken at one revision. Pages are applied as they arrive
    /// ([`Self::relist_page`]) so a large registry is never held twice in memory; entries the
    /// listing did not contain are deleted by [`Self::finish_relist`]. Together they turn the old
    /// state into the new one as events, so a re-list after compaction or a reconnect misses
    /// nothing and repeats nothing.
    pub fn begin_relist(&mut self) -> Relist {
        self.listing = self.listing.wrapping_add(1);
        Relist {
            number: self.listing,
            invalid_listed: HashSet::new(),
        }
    }

    pub fn relist_page(&mut self, relist: &mut Relist, kvs: &[KeyValue]) -> Vec<Applied> {
        debug_assert_eq!(relist.number, self.listing, "one re-list at a time");
        kvs.iter()
            .map(|kv| {
                let applied =
                    self.apply_unchecked(EventKind::Put, &kv.key, &kv.value, kv.mod_revision);
                if !self.reported_invalid.is_empty() && self.reported_invalid.contains(&kv.key) {
                    relist.invalid_listed.insert(kv.key.clone());
                }
                applied
            })
            .collect()
    }

    pub fn finish_relist(&mut self, relist: Relist, revision: i64) -> Vec<Applied> {
        let mut vanished = Vec::new();
        for (ns, services) in &self.working {
            for (svc, ws) in services {
                for (e, listed) in ws.endpoints.iter().zip(&ws.listed) {
                    if *listed != relist.number {
                        vanished.push((ns.clone(), svc.clone(), e.id.clone()));
                    }
                }
            }
        }
        let results = vanished
            .iter()
            .map(|(ns, svc, id)| self.remove(ns, svc, id))
            .collect();
        // Growth slack of a listing (10 instances in a 16-slot vector) is 7 MB at 100k services.
        for ws in self.working.values_mut().flat_map(|s| s.values_mut()) {
            ws.endpoints.shrink_to_fit();
            ws.listed.shrink_to_fit();
        }
        // The listing is the state at `revision`: that is where the watch resumes, even when it
        // is lower than before (the store was wiped or restored from a backup).
        self.revision = revision;
        self.reported_invalid
            .retain(|key| relist.invalid_listed.contains(key));
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
        self.interner.prune_if_grown();
        let mut shards = previous.shards.clone();
        let mut service_count = previous.service_count;
        let mut extinct_revision = previous.extinct_revision;
        for (ns, svc) in std::mem::take(&mut self.dirty) {
            let name: Arc<str> = Arc::from(format!("{svc}.{ns}"));
            // Copy-on-write: the first change to a shard clones it, later ones reuse the copy.
            let shard = Arc::make_mut(&mut shards[shard_of(&name)]);
            let services = self
                .working
                .get_mut(&ns)
                .expect("dirty services are in the working copy");
            let ws = services
                .get_mut(&svc)
                .expect("dirty services are in the working copy");
            ws.dirty = false;
            if ws.endpoints.is_empty() {
                services.remove(&svc);
                if services.is_empty() {
                    self.working.remove(&ns);
                }
                if shard.remove(&name).is_some() {
                    service_count -= 1;
                    extinct_revision = self.revision;
                }
                continue;
            }
            let endpoints = Arc::new(ServiceEndpoints::new(
                ns.into(),
                svc.into(),
                ws.endpoints.clone(),
                BTreeMap::new(),
                self.revision,
            ));
            if shard.insert(name, endpoints).is_none() {
                service_count += 1;
            }
        }
        EndpointSnapshot {
            revision: self.revision,
            extinct_revision,
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
            create_revision: 3,
        }];
        b.reset_to(&kvs, 10);
        let s2 = b.build(&s1);
        let web = s2.service("default", "web").unwrap();
        assert_eq!(web.all.len(), 1);
        assert_eq!(&*web.all[0].id, "b");
        assert_eq!(s2.revision, 10);
    }

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: format!("/svcd/v1/endpoints/{key}"),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
        }
    }

    #[test]
    fn a_relist_in_pages_deletes_only_what_no_page_listed_and_reports_garbage_once() {
        let mut b = SnapshotBuilder::new();
        let ip = |n: u8| format!(r#"{{"ip":"10.0.0.{n}"}}"#);
        b.reset_to(
            &[
                kv("default/web/a", &ip(1), 2),
                kv("default/web/b", &ip(2), 3),
                kv("default/db/a", &ip(3), 4),
                kv("other/cache/a", &ip(4), 5),
                kv("default/web/bad", "{", 6),
            ],
            6,
        );
        let s1 = b.build(&EndpointSnapshot::default());
        assert_eq!((s1.endpoint_count(), s1.service_count()), (4, 3));

        // Second listing, in two pages: web/b and the whole `other` namespace are gone, db/a
        // changed, web/c is new; the garbage is still there and not reported again.
        let mut relist = b.begin_relist();
        let first = b.relist_page(
            &mut relist,
            &[
                kv("default/db/a", &ip(9), 7),
                kv("default/web/a", &ip(1), 2),
            ],
        );
        let second = b.relist_page(
            &mut relist,
            &[
                kv("default/web/bad", "{", 6),
                kv("default/web/c", &ip(5), 8),
            ],
        );
        assert_eq!(first, [Applied::Changed, Applied::Unchanged]);
        assert_eq!(second, [Applied::Unchanged, Applied::Changed]);
        let deleted = b.finish_relist(relist, 9);
        assert_eq!(deleted, [Applied::Changed, Applied::Changed]);
        let s2 = b.build(&s1);
        let ids = |svc: &str| -> Vec<String> {
            s2.service("default", svc)
                .map(|s| s.all.iter().map(|e| e.id.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids("web"), ["a", "c"]);
        assert_eq!(
            s2.service("default", "db").unwrap().all[0].ip.to_string(),
            "10.0.0.9"
        );
        assert!(s2.service("other", "cache").is_none());
        assert_eq!((s2.endpoint_count(), s2.service_count()), (3, 2));
        assert_eq!(s2.revision, 9);

        // A third listing without the garbage forgets it: it is reported again if it returns.
        b.reset_to(&[kv("default/web/a", &ip(1), 2)], 10);
        let results = b.reset_to(&[kv("default/web/bad", "{", 11)], 11);
        assert!(matches!(results[0], Applied::Invalid { .. }), "{results:?}");
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
    fn a_service_index_never_goes_back_or_to_zero_as_the_service_leaves_and_returns() {
        let mut b = SnapshotBuilder::new();
        let s0 = b.build(&EndpointSnapshot::default());
        let never_seen = s0.service_index("default", "web");
        assert!(never_seen > 0);
        b.apply(&put("default/web/a", "10.0.0.1", 2));
        b.apply(&put("default/db/a", "10.0.0.2", 3));
        let s1 = b.build(&s0);
        let present = s1.service_index("default", "web");
        assert!(present > never_seen);
        // The last instance leaves: the index moves on, not back to 0.
        b.apply(&del("default/web/a", 4));
        let s2 = b.build(&s1);
        assert!(s2.service("default", "web").is_none());
        let gone = s2.service_index("default", "web");
        assert!(gone > present, "{gone} > {present}");
        // Other services changing leaves an absent service's index alone.
        b.apply(&put("default/db/b", "10.0.0.3", 5));
        let s3 = b.build(&s2);
        assert_eq!(s3.service_index("default", "web"), gone);
        // Another service going extinct moves it forward; the service returning, further.
        b.apply(&del("default/db/a", 6));
        b.apply(&del("default/db/b", 7));
        let s4 = b.build(&s3);
        let later = s4.service_index("default", "web");
        assert!(later > gone);
        assert_eq!(s4.service_index("default", "never"), later);
        b.apply(&put("default/web/a", "10.0.0.1", 8));
        let s5 = b.build(&s4);
        assert!(s5.service_index("default", "web") > later);
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
