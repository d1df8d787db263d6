//! Per-service balancing for the HTTP proxy: which instance gets the next request.
//!
//! A [`ServiceBalancer`] lives as long as its service is routed to. It keeps a [`ServiceView`] —
//! the snapshot's instances paired with their [`EndpointStats`] — rebuilt only when the snapshot's
//! entry for the service changes (pointer comparison). A pick loads the view (no lock), applies
//! the panic threshold and chooses round robin or least request; it allocates nothing.
//!
//! `EndpointStats` survive view rebuilds (carried over by instance id), so in-flight counts and
//! outlier records are not lost when an unrelated instance joins.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::uri::Authority;
use svcd_config::{Balance, OutlierConfig, PanicMode, State};
use svcd_registry::{Endpoint, ServiceEndpoints};

use crate::pick::port_of;

/// State of one instance that outlives snapshots.
pub struct EndpointStats {
    pub id: Box<str>,
    /// Requests sent and not yet finished (response body done); least_request compares these.
    pub in_flight: AtomicUsize,
    /// Connect failures / 5xx in a row; reset by any success.
    pub consecutive_failures: AtomicU32,
    /// Times ejected so far; the ejection time is `base × ejections`.
    pub ejections: AtomicU32,
    /// Set while ejected, so only one ejection is started per run of failures.
    pub ejected: AtomicBool,
    /// Handles resolved once per instance, never looked up per request.
    pub metrics: crate::http::metrics::EndpointHttpMetrics,
}

/// An instance as a pick returns it: where to send, and its stats.
pub struct Slot {
    pub endpoint: Arc<Endpoint>,
    pub addr: SocketAddr,
    /// `ip:port`, built once per view so the upstream URI costs no formatting per request.
    pub authority: Authority,
    pub stats: Arc<EndpointStats>,
}

/// One version of a service's instances, paired with their stats.
pub struct ServiceView {
    /// The snapshot entry this view was built from.
    source: Option<Arc<ServiceEndpoints>>,
    /// Healthy (and not ejected) instances that have the wanted port.
    pub usable: Vec<Slot>,
    /// Every instance that is not draining and has the port: the panic set.
    pub fallback: Vec<Slot>,
}

/// Which slice a pick comes from, with the index of the pick in it.
pub struct Pick<'v> {
    pub slots: &'v [Slot],
    pub first: usize,
    pub panic: bool,
}

impl<'v> Pick<'v> {
    /// The slot for attempt `k`: the pick, then the next ones in order (other instances to retry
    /// on), wrapping once.
    pub fn attempt(&self, k: usize) -> Option<&'v Slot> {
        (k < self.slots.len()).then(|| &self.slots[(self.first + k) % self.slots.len()])
    }
}

pub struct ServiceBalancer {
    /// `"<svc>.<ns>"`.
    pub name: Box<str>,
    /// Named port to send to; `None`: the instance's only port, else `http`, `h2` or `grpc`.
    port: Option<Box<str>>,
    pub balance: Balance,
    view: ArcSwap<ServiceView>,
    /// Round-robin position. `Relaxed`: only the spread matters.
    next: AtomicUsize,
    /// Stats by instance id, to carry them over rebuilds. Locked only while rebuilding a view (a
    /// snapshot change), never by a pick.
    stats: Mutex<HashMap<Box<str>, Arc<EndpointStats>>>,
    /// Instances of this service currently ejected, against `max_ejection_percent`.
    pub ejected_now: AtomicUsize,
    pub metrics: crate::http::metrics::ServiceHttpMetrics,
}

fn http_port(endpoint: &Endpoint, name: Option<&str>) -> Option<u16> {
    port_of(endpoint, name).or_else(|| {
        name.is_none()
            .then(|| ["http", "h2", "grpc"].iter().find_map(|n| endpoint.port(n)))
            .flatten()
    })
}

impl ServiceBalancer {
    pub fn new(
        name: &str,
        port: Option<&str>,
        balance: Balance,
        metrics: crate::http::metrics::ServiceHttpMetrics,
    ) -> Self {
        ServiceBalancer {
            name: name.into(),
            port: port.map(Into::into),
            balance,
            view: ArcSwap::from_pointee(ServiceView {
                source: None,
                usable: Vec::new(),
                fallback: Vec::new(),
            }),
            next: AtomicUsize::new(0),
            stats: Mutex::new(HashMap::new()),
            ejected_now: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The view for `service` (the snapshot's current entry), rebuilt if the entry changed.
    pub fn view(&self, service: &Arc<ServiceEndpoints>) -> Arc<ServiceView> {
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
    fn rebuild(&self, service: &Arc<ServiceEndpoints>) -> Arc<ServiceView> {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = |e: &Arc<Endpoint>| -> Option<Slot> {
            let port = http_port(e, self.port.as_deref())?;
            let addr = SocketAddr::new(e.ip, port);
            let s = stats
                .entry(e.id.clone())
                .or_insert_with(|| {
                    Arc::new(EndpointStats {
                        id: e.id.clone(),
                        in_flight: AtomicUsize::new(0),
                        consecutive_failures: AtomicU32::new(0),
                        ejections: AtomicU32::new(0),
                        ejected: AtomicBool::new(false),
                        metrics: self.metrics.endpoint(&e.id),
                    })
                })
                .clone();
            Some(Slot {
                endpoint: e.clone(),
                addr,
                authority: Authority::try_from(addr.to_string()).ok()?,
                stats: s,
            })
        };
        let usable = service.healthy.iter().filter_map(&mut slot).collect();
        let fallback = service
            .all
            .iter()
            .filter(|e| e.state != State::Draining)
            .filter_map(&mut slot)
            .collect();
        // Forget instances that left, except ejected ones whose timer still refers to them.
        stats.retain(|id, s| {
            s.ejected.load(Ordering::Relaxed) || service.all.iter().any(|e| &e.id == id)
        });
        let view = Arc::new(ServiceView {
            source: Some(service.clone()),
            usable,
            fallback,
        });
        self.view.store(view.clone());
        view
    }

    /// Chooses the instance for a request. `None` when nothing can be picked (no usable
    /// instance, and panic mode `fail` or nothing to panic onto).
    pub fn pick<'v>(&self, view: &'v ServiceView, outlier: &OutlierConfig) -> Option<Pick<'v>> {
        let usable = view.usable.len();
        let total = view.fallback.len();
        // Panic: too few usable instances left to carry the load. With none usable at all there
        // is nobody to protect from overload: the service is down (503), not in panic.
        let panic =
            usable > 0 && (usable as u64) * 100 < (outlier.panic_threshold as u64) * (total as u64);
        let slots: &[Slot] = if panic && outlier.panic_mode == PanicMode::BalanceAll {
            &view.fallback
        } else {
            &view.usable
        };
        let n = slots.len();
        if n == 0 {
            return None;
        }
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        let first = match self.balance {
            Balance::RoundRobin => rr % n,
            Balance::LeastRequest if n == 1 => 0,
            Balance::LeastRequest => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |i: usize| slots[i].stats.in_flight.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        };
        Some(Pick {
            slots,
            first,
            panic,
        })
    }
}

/// The balancers of every service the HTTP proxy has routed to, by `"<svc>.<ns>"` (or
/// `"<svc>.<ns>:<port>"` for a route naming a port). Read without locking; a service seen for the
/// first time is added under `insert`, once.
pub struct BalancerTable {
    by_name: ArcSwap<HashMap<Box<str>, Arc<ServiceBalancer>, foldhash::fast::FixedState>>,
    /// Serialises additions (first request to a new service), never taken by a lookup.
    insert: Mutex<()>,
    /// Policy per service and the default, from `proxy.l7`.
    balance: Balance,
    balance_by_service: std::collections::BTreeMap<String, Balance>,
    metrics: Arc<crate::http::metrics::HttpMetrics>,
}

/// Longest table key: `"<svc>.<ns>:<port>"`.
const MAX_KEY: usize = 63 + 1 + 63 + 1 + 15;

impl BalancerTable {
    pub fn new(
        balance: Balance,
        balance_by_service: std::collections::BTreeMap<String, Balance>,
        metrics: Arc<crate::http::metrics::HttpMetrics>,
    ) -> Self {
        BalancerTable {
            by_name: ArcSwap::from_pointee(HashMap::default()),
            insert: Mutex::new(()),
            balance,
            balance_by_service,
            metrics,
        }
    }

    /// The balancer for a service and named port, created on first use.
    pub fn get(
        &self,
        service: &str,
        namespace: &str,
        port: Option<&str>,
    ) -> Option<Arc<ServiceBalancer>> {
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
        if let Some(b) = self.by_name.load().get(key) {
            return Some(b.clone());
        }
        Some(self.add(key, service.len() + 1 + namespace.len(), port))
    }

    #[cold]
    fn add(&self, key: &str, name_len: usize, port: Option<&str>) -> Arc<ServiceBalancer> {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = self.by_name.load().get(key) {
            return b.clone();
        }
        let name = &key[..name_len];
        let balance = self
            .balance_by_service
            .get(name)
            .copied()
            .unwrap_or(self.balance);
        let balancer = Arc::new(ServiceBalancer::new(
            name,
            port,
            balance,
            self.metrics.service(name),
        ));
        let mut map = HashMap::clone(&self.by_name.load());
        map.insert(key.into(), balancer.clone());
        self.by_name.store(Arc::new(map));
        balancer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcd_config::Instance;
    use svcd_registry::endpoint::Interner;

    fn service(states: &[&str]) -> Arc<ServiceEndpoints> {
        let mut interner = Interner::default();
        let all: Vec<Arc<Endpoint>> = states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                let json = format!(
                    r#"{{"ip":"127.0.0.{}","ports":{{"http":80}},"state":"{state}"}}"#,
                    i + 1
                );
                let instance = Instance::from_json(json.as_bytes()).unwrap();
                Arc::new(interner.endpoint(&format!("e{i}"), instance, 1))
            })
            .collect();
        let healthy = all.iter().filter(|e| e.is_healthy()).cloned().collect();
        Arc::new(ServiceEndpoints {
            namespace: "default".into(),
            service: "web".into(),
            all,
            healthy,
        })
    }

    fn balancer(balance: Balance) -> ServiceBalancer {
        let metrics = crate::http::metrics::HttpMetrics::new(&prometheus::Registry::new()).unwrap();
        ServiceBalancer::new("web.default", None, balance, metrics.service("web.default"))
    }

    fn outlier(panic_threshold: u32, panic_mode: PanicMode) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: std::time::Duration::from_secs(30),
            max_ejection_percent: 50,
            panic_threshold,
            panic_mode,
        }
    }

    fn picked(
        b: &ServiceBalancer,
        svc: &Arc<ServiceEndpoints>,
        o: &OutlierConfig,
    ) -> Option<String> {
        let view = b.view(svc);
        let pick = b.pick(&view, o)?;
        Some(pick.attempt(0).unwrap().stats.id.to_string())
    }

    #[test]
    fn least_request_avoids_the_busy_instance() {
        let b = balancer(Balance::LeastRequest);
        let svc = service(&["healthy", "healthy"]);
        let view = b.view(&svc);
        view.usable[0].stats.in_flight.store(10, Ordering::Relaxed);
        let o = outlier(50, PanicMode::BalanceAll);
        for _ in 0..100 {
            assert_eq!(picked(&b, &svc, &o).unwrap(), "e1");
        }
    }

    #[test]
    fn panic_spreads_over_all_but_draining_or_fails() {
        let svc = service(&["healthy", "unhealthy", "unhealthy", "draining"]);
        // 1 usable of 3 non-draining < 50 %: panic, all three get picks; the draining one never.
        let b = balancer(Balance::RoundRobin);
        let o = outlier(50, PanicMode::BalanceAll);
        let mut seen: Vec<String> = (0..30).filter_map(|_| picked(&b, &svc, &o)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ["e0", "e1", "e2"]);
        // Mode fail: only the usable one.
        let o = outlier(50, PanicMode::Fail);
        assert!((0..10).all(|_| picked(&b, &svc, &o).as_deref() == Some("e0")));
        // Below the threshold by share only: 1 of 3 is 33 % >= 30 %: no panic.
        let o = outlier(30, PanicMode::BalanceAll);
        assert!((0..10).all(|_| picked(&b, &svc, &o).as_deref() == Some("e0")));
        // Nothing usable: down, not panic.
        let down = service(&["unhealthy", "unhealthy"]);
        assert!(picked(&b, &down, &outlier(50, PanicMode::BalanceAll)).is_none());
    }

    #[test]
    fn stats_survive_a_new_view() {
        let b = balancer(Balance::RoundRobin);
        let v1 = b.view(&service(&["healthy", "healthy"]));
        v1.usable[1].stats.in_flight.store(3, Ordering::Relaxed);
        let v2 = b.view(&service(&["healthy", "healthy", "healthy"]));
        assert_eq!(v2.usable.len(), 3);
        assert_eq!(v2.usable[1].stats.in_flight.load(Ordering::Relaxed), 3);
    }
}
