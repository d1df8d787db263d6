//! Per-service balancers: which instance gets the next request or connection.
//!
//! A [`BalancerTable`] lives as long as the daemon (one per plane: L4, HTTP). It holds one
//! [`ServiceBalancer`] per service and port rule, created on first use and dropped when the
//! service leaves the registry. A reload changes the policy in place; per-endpoint state lives
//! in the [`LoadBalancer`] and is never reset by a reload.
//!
//! A balancer keeps a [`View`] — the snapshot's instances with the port, each paired with its
//! [`EndpointHealth`] and the plane's per-endpoint data — rebuilt only when the snapshot's entry
//! for the service changes (pointer comparison). A pick loads the view (no lock), applies the
//! panic threshold and chooses by smooth weighted round robin or weighted least request (power
//! of two choices); it allocates nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use svcd_config::Balance;
use svcd_registry::{Endpoint, EndpointSnapshot, ServiceEndpoints};

use crate::detector::Detector;
use crate::health::{EndpointHealth, ServiceHealth};
use crate::load_balancer::{LoadBalancer, Prune};
use crate::select::{least_request, WeightedSchedule};
use crate::ServiceName;

/// How a plane turns an instance into its per-endpoint data (address parts, metric handles).
/// Each plane has its own, so L4 slots carry no HTTP handles. Dropping the data is how a plane's
/// per-endpoint series go away when the instance leaves.
pub trait SlotFactory: Send + Sync + 'static {
    /// Per-endpoint data.
    type Extra: Send + Sync + 'static;
    /// Per-service data (the plane's service-level handles), made when the balancer is.
    type Service: Send + Sync + 'static;
    fn make_service(&self, service: &ServiceName) -> Self::Service;
    /// `None` skips the instance (e.g. an address the plane cannot use).
    fn make(
        &self,
        service: &ServiceName,
        endpoint: &Endpoint,
        addr: SocketAddr,
    ) -> Option<Self::Extra>;
}

/// Which port of an instance a balancer sends to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRule {
    /// The port registered under this name.
    Named(Box<str>),
    /// The instance's only port (L4 listeners that name none).
    Only,
    /// The only port, else `http`, `h2` or `grpc` (the HTTP proxy's default).
    Http,
}

impl PortRule {
    pub fn port_of(&self, endpoint: &Endpoint) -> Option<u16> {
        let only = || (endpoint.ports().len() == 1).then(|| endpoint.ports()[0].1);
        match self {
            PortRule::Named(name) => endpoint.port(name),
            PortRule::Only => only(),
            PortRule::Http => {
                only().or_else(|| ["http", "h2", "grpc"].iter().find_map(|n| endpoint.port(n)))
            }
        }
    }
}

/// An instance as a pick returns it.
pub struct Slot<X> {
    pub endpoint: Arc<Endpoint>,
    pub addr: SocketAddr,
    pub health: Arc<EndpointHealth>,
    /// The plane's per-endpoint data.
    pub extra: Arc<X>,
}

/// One version of a service's instances, with their state.
pub struct View<X> {
    /// The snapshot entry this view was built from.
    source: Option<Arc<ServiceEndpoints>>,
    /// Healthy (served state) instances with the port.
    pub usable: Vec<Slot<X>>,
    /// Every instance with the port that counts for panic (not draining, not pending: see
    /// [`svcd_registry::ServedState::counts_for_panic`]): the panic set, and the base of
    /// `max_ejection_percent`.
    pub fallback: Vec<Slot<X>>,
    usable_order: WeightedSchedule,
    fallback_order: WeightedSchedule,
}

impl<X> View<X> {
    fn empty() -> Self {
        View {
            source: None,
            usable: Vec::new(),
            fallback: Vec::new(),
            usable_order: WeightedSchedule::default(),
            fallback_order: WeightedSchedule::default(),
        }
    }
}

/// The outcome of a pick: the slice it came from and the chosen index.
pub struct Pick<'v, X> {
    pub slots: &'v [Slot<X>],
    pub first: usize,
    pub panic: bool,
}

impl<'v, X> Pick<'v, X> {
    /// The slot for attempt `k`: the pick, then the next ones in order (other instances to retry
    /// on), wrapping once.
    #[inline]
    pub fn attempt(&self, k: usize) -> Option<&'v Slot<X>> {
        (k < self.slots.len()).then(|| &self.slots[(self.first + k) % self.slots.len()])
    }
}

fn policy_code(b: Balance) -> u8 {
    match b {
        Balance::RoundRobin => 0,
        Balance::LeastRequest => 1,
    }
}

/// The balancer of one service and port rule.
pub struct ServiceBalancer<F: SlotFactory> {
    pub name: ServiceName,
    pub health: Arc<ServiceHealth>,
    /// The plane's per-service data.
    pub plane: F::Service,
    lb: Arc<LoadBalancer>,
    factory: Arc<F>,
    port: PortRule,
    /// [`Balance`] as a byte, so a reload changes it in place.
    policy: AtomicU8,
    view: ArcSwap<View<F::Extra>>,
    /// Round-robin position. `Relaxed`: only the spread matters.
    next: AtomicUsize,
    /// The plane's data by instance id, carried over view rebuilds. Locked only while a view is
    /// rebuilt or pruned, never by a pick.
    extras: Mutex<ExtrasById<F::Extra>>,
}

/// A plane's data by instance id, with the address it was made for.
type ExtrasById<X> = HashMap<Box<str>, (SocketAddr, Arc<X>)>;

impl<F: SlotFactory> ServiceBalancer<F> {
    pub fn policy(&self) -> Balance {
        match self.policy.load(Ordering::Relaxed) {
            0 => Balance::RoundRobin,
            _ => Balance::LeastRequest,
        }
    }

    /// The view for `service` (the snapshot's current entry), rebuilt if the entry changed.
    #[inline]
    pub fn view(&self, service: &Arc<ServiceEndpoints>) -> Arc<View<F::Extra>> {
        let view = self.view.load_full();
        if view
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, service))
        {
            return view;
        }
        self.rebuild(service)
    }

    #[cold]
    fn rebuild(&self, service: &Arc<ServiceEndpoints>) -> Arc<View<F::Extra>> {
        let mut extras = self.extras.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = |e: &Arc<Endpoint>| -> Option<Slot<F::Extra>> {
            let port = self.port.port_of(e)?;
            let addr = SocketAddr::new(e.ip, port);
            let extra = match extras.get(e.id.as_str()) {
                Some((a, x)) if *a == addr => x.clone(),
                _ => {
                    let x = Arc::new(self.factory.make(&self.name, e, addr)?);
                    extras.insert(e.id.as_str().into(), (addr, x.clone()));
                    x
                }
            };
            Some(Slot {
                endpoint: e.clone(),
                addr,
                health: self.lb.endpoint_health(&self.health, &e.id, e.ip),
                extra,
            })
        };
        let usable: Vec<_> = service.healthy.iter().filter_map(&mut slot).collect();
        let fallback: Vec<_> = service
            .all
            .iter()
            .filter(|e| service.served_state(e).counts_for_panic())
            .filter_map(&mut slot)
            .collect();
        // Forget the plane data of instances that left (their series go with it).
        extras.retain(|id, _| service.all.iter().any(|e| e.id == *id));
        let view = Arc::new(View {
            source: Some(service.clone()),
            usable_order: WeightedSchedule::new(usable.iter().map(|s| s.endpoint.weight)),
            fallback_order: WeightedSchedule::new(fallback.iter().map(|s| s.endpoint.weight)),
            usable,
            fallback,
        });
        self.view.store(view.clone());
        view
    }

    /// Chooses the instance for a request or connection. `None` when nothing can be picked (no
    /// usable instance, and panic mode `fail` or nothing to panic onto).
    #[inline]
    pub fn pick<'v>(&self, view: &'v View<F::Extra>) -> Option<Pick<'v, F::Extra>> {
        let (threshold, fail) = self.lb.panic_settings();
        let usable = view.usable.len();
        let total = view.fallback.len();
        // Panic: too few usable instances left to carry the load. With none usable at all there
        // is nobody to protect from overload: the service is down, not in panic.
        let panic = usable > 0 && (usable as u64) * 100 < (threshold as u64) * (total as u64);
        self.health.note_panic(panic);
        let (slots, order) = if panic && !fail {
            (&view.fallback[..], &view.fallback_order)
        } else {
            (&view.usable[..], &view.usable_order)
        };
        let n = slots.len();
        if n == 0 {
            return None;
        }
        let first = match self.policy() {
            Balance::RoundRobin => order.at(self.next.fetch_add(1, Ordering::Relaxed))?,
            Balance::LeastRequest if n == 1 => 0,
            Balance::LeastRequest => least_request(
                slots.len(),
                order,
                |i| slots[i].health.in_flight.load(Ordering::Relaxed) as u64,
                |i| u64::from(slots[i].endpoint.weight.max(1)),
            ),
        };
        Some(Pick {
            slots,
            first,
            panic,
        })
    }

    /// The attempt to `slot` worked.
    #[inline]
    pub fn success(&self, slot: &Slot<F::Extra>, detector: Detector) {
        self.lb.success(&slot.health, detector);
    }

    /// The backend behind `slot` failed an attempt; may eject it. Never for a client's fault.
    pub fn failure(
        &self,
        view: &View<F::Extra>,
        slot: &Slot<F::Extra>,
        detector: Detector,
        reason: &str,
    ) {
        self.lb.failure(
            &self.health,
            &slot.health,
            view.fallback.len(),
            detector,
            reason,
        );
    }
}

/// Longest table key: `"<svc>.<ns>:<port>"`.
const MAX_KEY: usize = 63 + 1 + 63 + 1 + 15;

type ByKey<F> = HashMap<Box<str>, Arc<ServiceBalancer<F>>, foldhash::fast::FixedState>;

/// The balancers of one plane, by `"<svc>.<ns>"` (or `"<svc>.<ns>:<port>"` for a named port).
/// Read without locking; a service seen for the first time is added under `insert`, once.
pub struct BalancerTable<F: SlotFactory> {
    lb: Arc<LoadBalancer>,
    factory: Arc<F>,
    /// The rule for lookups that name no port.
    default_port: PortRule,
    by_key: ArcSwap<ByKey<F>>,
    /// Serialises additions and removals, never taken by a lookup.
    insert: Mutex<()>,
    /// Policy per service and the default; swapped on reload.
    policies: ArcSwap<(Balance, BTreeMap<String, Balance>)>,
}

impl<F: SlotFactory> BalancerTable<F> {
    /// A table for one plane, registered with `lb` so services that leave are dropped.
    pub fn new(lb: &Arc<LoadBalancer>, factory: F, default_port: PortRule) -> Arc<Self> {
        let table = Arc::new(BalancerTable {
            lb: lb.clone(),
            factory: Arc::new(factory),
            default_port,
            by_key: ArcSwap::from_pointee(ByKey::default()),
            insert: Mutex::new(()),
            policies: ArcSwap::from_pointee((Balance::RoundRobin, BTreeMap::new())),
        });
        let weak: std::sync::Weak<dyn Prune> = Arc::downgrade(&table) as _;
        lb.register_table(weak);
        table
    }

    pub fn lb(&self) -> &Arc<LoadBalancer> {
        &self.lb
    }

    /// New policies, applied in place to existing balancers (their state is kept).
    pub fn set_policies(&self, default: Balance, by_service: BTreeMap<String, Balance>) {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        for b in self.by_key.load().values() {
            let p = by_service.get(b.name.as_str()).copied().unwrap_or(default);
            b.policy.store(policy_code(p), Ordering::Relaxed);
        }
        self.policies.store(Arc::new((default, by_service)));
    }

    /// The balancer for a service and named port, created on first use. Allocation-free once
    /// the balancer exists.
    pub fn get(
        &self,
        service: &str,
        namespace: &str,
        port: Option<&str>,
    ) -> Option<Arc<ServiceBalancer<F>>> {
        let mut buf = [0u8; MAX_KEY];
        let mut len = 0;
        for part in [service, ".", namespace, ":", port.unwrap_or("")] {
            if part == ":" && port.is_none() {
                break;
            }
            buf.get_mut(len..len + part.len())?
                .copy_from_slice(part.as_bytes());
            len += part.len();
        }
        let key = std::str::from_utf8(&buf[..len]).ok()?;
        Some(self.get_keyed(key, service, namespace, port))
    }

    /// [`Self::get`] with the key already made (`"<svc>.<ns>"` or `"<svc>.<ns>:<port>"`, see
    /// [`Self::key`]): for callers whose target is fixed, such as an L4 listener.
    #[inline]
    pub fn get_keyed(
        &self,
        key: &str,
        service: &str,
        namespace: &str,
        port: Option<&str>,
    ) -> Arc<ServiceBalancer<F>> {
        if let Some(b) = self.by_key.load().get(key) {
            return b.clone();
        }
        self.add(key, service, namespace, port)
    }

    /// The table key of a service and named port.
    pub fn key(service: &str, namespace: &str, port: Option<&str>) -> String {
        match port {
            Some(port) => format!("{service}.{namespace}:{port}"),
            None => format!("{service}.{namespace}"),
        }
    }

    #[cold]
    fn add(
        &self,
        key: &str,
        service: &str,
        namespace: &str,
        port: Option<&str>,
    ) -> Arc<ServiceBalancer<F>> {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = self.by_key.load().get(key) {
            return b.clone();
        }
        let name = ServiceName::new(service, namespace);
        let policies = self.policies.load();
        let policy = policies.1.get(name.as_str()).copied().unwrap_or(policies.0);
        let balancer = Arc::new(ServiceBalancer {
            health: self.lb.service(&name),
            plane: self.factory.make_service(&name),
            name,
            lb: self.lb.clone(),
            factory: self.factory.clone(),
            port: port.map_or_else(|| self.default_port.clone(), |p| PortRule::Named(p.into())),
            policy: AtomicU8::new(policy_code(policy)),
            view: ArcSwap::from_pointee(View::empty()),
            next: AtomicUsize::new(0),
            extras: Mutex::new(HashMap::new()),
        });
        let mut map = ByKey::clone(&self.by_key.load());
        map.insert(key.into(), balancer.clone());
        self.by_key.store(Arc::new(map));
        balancer
    }

    /// How many balancers the table holds (tests).
    pub fn len(&self) -> usize {
        self.by_key.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<F: SlotFactory> Prune for BalancerTable<F> {
    fn prune(&self, snapshot: &EndpointSnapshot, changed: &[&str]) {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.by_key.load();
        let mut removed = false;
        for b in current.values() {
            if !changed.contains(&b.name.as_str()) {
                continue;
            }
            match snapshot.service_by_name(b.name.as_str()) {
                // Rebuild now, so instances that left drop their plane data at once.
                Some(service) => {
                    b.view(service);
                }
                None => removed = true,
            }
        }
        if removed {
            let map: ByKey<F> = current
                .iter()
                .filter(|(_, b)| snapshot.service_by_name(b.name.as_str()).is_some())
                .map(|(k, b)| (k.clone(), b.clone()))
                .collect();
            self.by_key.store(Arc::new(map));
        }
    }
}

#[cfg(test)]
mod tests;
