//! The immutable endpoint snapshot that DNS and the proxies read, and the single writer that
//! builds it.
//!
//! Readers `load()` an `Arc<EndpointSnapshot>` from arc-swap: no lock, no allocation. The writer
//! ([`SnapshotBuilder`]) applies watch events to a working copy and, once per burst, builds a new
//! snapshot in which only the services that changed are rebuilt; every other service (and every
//! untouched namespace) is shared with the previous snapshot through its `Arc`.

mod builder;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use svcd_config::State;

use crate::endpoint::Endpoint;

pub use builder::{Applied, Relist, SnapshotBuilder};

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
    /// Instances by [`ServedState`], counted once here: a scrape reads 100k services' counts
    /// without touching a million endpoints.
    counts: [u32; ServedState::ALL.len()],
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
    /// Registered with an active check that has not passed yet (its first check runs at once).
    Pending,
}

impl ServedState {
    /// Every state, each at its own discriminant (the index of [`ServiceEndpoints::count_by_state`]).
    pub const ALL: [ServedState; 5] = [
        ServedState::Healthy,
        ServedState::Unhealthy,
        ServedState::Draining,
        ServedState::Ejected,
        ServedState::Pending,
    ];

    /// The registered state, unless this node ejected a healthy instance.
    #[inline]
    pub fn of(state: State, ejected: bool) -> Self {
        match state {
            State::Healthy if ejected => ServedState::Ejected,
            State::Healthy => ServedState::Healthy,
            State::Unhealthy => ServedState::Unhealthy,
            State::Draining => ServedState::Draining,
            State::Pending => ServedState::Pending,
        }
    }

    /// Whether the instance counts in a service's total for the panic threshold (and
    /// `max_ejection_percent`) and is picked in panic: every state but `draining` (leaving on
    /// purpose) and `pending` (never checked: as Envoy's hosts awaiting their first check, left
    /// out of the panic calculation, so new instances cannot tip a service into panic nor be
    /// sprayed with traffic before their check passed).
    #[inline]
    pub fn counts_for_panic(self) -> bool {
        !matches!(self, ServedState::Draining | ServedState::Pending)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServedState::Healthy => "healthy",
            ServedState::Unhealthy => "unhealthy",
            ServedState::Draining => "draining",
            ServedState::Ejected => "ejected",
            ServedState::Pending => "pending",
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
            counts: [0; ServedState::ALL.len()],
        };
        for e in &s.all {
            s.counts[s.served_state(e) as usize] += 1;
        }
        // Sized exactly: 100k services' growth slack would be megabytes.
        let mut healthy = Vec::with_capacity(s.counts[ServedState::Healthy as usize] as usize);
        healthy.extend(
            s.all
                .iter()
                .filter(|e| s.served_state(e) == ServedState::Healthy)
                .cloned(),
        );
        s.healthy = healthy;
        s
    }

    /// How this node serves `endpoint` (an instance of this service).
    #[inline]
    pub fn served_state(&self, endpoint: &Endpoint) -> ServedState {
        ServedState::of(
            endpoint.state,
            !self.ejections.is_empty() && self.ejections.contains_key(endpoint.id.as_str()),
        )
    }

    /// This node's ejection of instance `id`, if any.
    pub fn ejection(&self, id: &str) -> Option<&Ejection> {
        self.ejections.get(id).map(|e| &**e)
    }

    /// Instances per served state, in [`ServedState::ALL`] order.
    pub fn count_by_state(&self) -> [usize; ServedState::ALL.len()] {
        self.counts.map(|n| n as usize)
    }
}

/// Keys are `Arc<str>` so copying the map on publish bumps refcounts instead of copying strings.
/// Number of shards the service map is split into. Publishing copies only the shards that hold a
/// changed service, so the cost of a publish is O(services / SHARDS) per changed shard, not
/// O(all services) — at 100k services, about 100 entries per shard, so a publish of 50 changed
/// services (10,000 changes/s, 5 ms coalescing) copies ~5,000 entries instead of all 100k that 64
/// shards made it copy. The shard list itself (8 KiB) is copied per publish.
const SHARDS: usize = 1024;

type Hasher = foldhash::fast::FixedState;
/// `"<svc>.<ns>"` → endpoints. Keys are `Arc<str>` so copying a shard bumps refcounts instead of
/// copying strings.
type Shard = HashMap<Arc<str>, Arc<ServiceEndpoints>, Hasher>;

/// One consistent view of the registry at `revision`.
#[derive(Debug)]
pub struct EndpointSnapshot {
    pub revision: i64,
    /// The revision at which a service last lost its last instance (0: none has yet). The index
    /// of every absent service ([`Self::service_index`]): one number, not a tombstone per name,
    /// so names that come and go cost nothing (Consul's "last extinction index").
    pub extinct_revision: i64,
    shards: Vec<Arc<Shard>>,
    endpoint_count: usize,
    service_count: usize,
}

impl Default for EndpointSnapshot {
    fn default() -> Self {
        let empty = Arc::new(Shard::default());
        EndpointSnapshot {
            revision: 0,
            extinct_revision: 0,
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

    /// The index of blocking queries on a service: its revision while it has instances; once it
    /// has none (left, or never seen), the revision at which a service last lost its last
    /// instance, at least 1. It never goes backwards and is never 0: a service that leaves gets
    /// an index above its last one (its extinction came after its last change), and one that
    /// appears gets one above that (its first put came after the extinction). Only a store that
    /// went back in time (wiped, restored) moves it back.
    pub fn service_index(&self, namespace: &str, service: &str) -> i64 {
        match self.service(namespace, service) {
            Some(s) => s.revision,
            None => self.extinct_revision.max(1),
        }
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
            extinct_revision: self.extinct_revision,
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

/// Why and until when an instance is ejected on this node, for `svcd list`, the API and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Ejection {
    /// The detectors holding the ejection (`"http"`, `"tcp"`): it ends when none does.
    pub holders: Vec<&'static str>,
    pub reason: String,
    pub since: SystemTime,
    /// When the last holder's ejection ends.
    pub until: SystemTime,
    /// How many times this instance has been ejected (the ejection time grows with it).
    pub count: u32,
}
