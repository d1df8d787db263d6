//! Per-endpoint and per-service state that outlives snapshots and reloads: in-flight counts,
//! failure runs, and the **one ejection record per endpoint**, which remembers which detectors
//! hold it, each until its own deadline (the instance returns only when none does). Owned by the
//! [`crate::LoadBalancer`]; passive health ([`crate::outlier`]) changes it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::detector::{Detector, DETECTORS};
use crate::metrics::ServiceLbMetrics;
use crate::ServiceName;

/// State of one instance of one service that outlives snapshot changes and reloads.
pub struct EndpointHealth {
    pub id: Box<str>,
    /// The address this state is about: a re-registration at another IP is another endpoint.
    pub ip: IpAddr,
    /// Requests or connections in flight to it, across planes (least request compares these).
    pub in_flight: AtomicUsize,
    /// Failures in a row, per detector; any success from that detector resets its run.
    pub(crate) failures: [AtomicU32; DETECTORS],
    /// Times ejected so far; the ejection time grows with it.
    pub(crate) ejections: AtomicU32,
    /// Cancelled when the instance leaves the registry: its open connections start draining.
    /// Lets a connection wait for its own instance instead of waking on every publish.
    pub(crate) left: CancellationToken,
    /// The ejection record. A mutex: taken only when an ejection starts or ends (cold), never by
    /// a pick.
    record: Mutex<EjectionRecord>,
}

impl EndpointHealth {
    pub(crate) fn new(id: &str, ip: IpAddr) -> Self {
        EndpointHealth {
            id: id.into(),
            ip,
            in_flight: AtomicUsize::new(0),
            failures: Default::default(),
            ejections: AtomicU32::new(0),
            left: CancellationToken::new(),
            record: Mutex::new(EjectionRecord::default()),
        }
    }

    /// Resolves once the instance has left the registry (or moved to another address).
    pub async fn left(&self) {
        self.left.cancelled().await
    }

    pub fn has_left(&self) -> bool {
        self.left.is_cancelled()
    }

    pub(crate) fn record(&self) -> std::sync::MutexGuard<'_, EjectionRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any detector currently holds an ejection.
    pub fn is_ejected(&self) -> bool {
        self.record().is_held()
    }

    /// Consecutive failures the detector has seen.
    pub fn failure_run(&self, detector: Detector) -> u32 {
        self.failures[detector as usize].load(Ordering::Relaxed)
    }

    /// How many times it has been ejected.
    pub fn ejection_count(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// Per-service state: the endpoints' health by id and the ejection budget.
pub struct ServiceHealth {
    pub name: ServiceName,
    /// By instance id. Locked when a view is rebuilt (a snapshot change) or pruned, never by a
    /// pick.
    pub(crate) endpoints: Mutex<HashMap<Box<str>, Arc<EndpointHealth>>>,
    /// Instances currently ejected, against `max_ejection_percent`.
    pub(crate) ejected_now: AtomicUsize,
    /// Whether the last pick found the service in panic; only transitions touch the metrics.
    pub(crate) in_panic: AtomicBool,
    pub(crate) metrics: ServiceLbMetrics,
}

impl ServiceHealth {
    pub(crate) fn endpoints(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<EndpointHealth>>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The health of `id` at `ip`, created on first sight. A new address replaces the old entry,
    /// which is returned second: the caller ends it (its connections are told it left, its
    /// ejection holds end).
    pub(crate) fn endpoint(
        &self,
        id: &str,
        ip: IpAddr,
    ) -> (Arc<EndpointHealth>, Option<Arc<EndpointHealth>>) {
        let mut map = self.endpoints();
        if let Some(h) = map.get(id) {
            if h.ip == ip {
                return (h.clone(), None);
            }
        }
        let h = Arc::new(EndpointHealth::new(id, ip));
        let replaced = map.insert(id.into(), h.clone());
        (h, replaced)
    }

    /// Notes whether a pick found the service in panic; counts entries into panic.
    #[inline]
    pub(crate) fn note_panic(&self, panic: bool) {
        if self.in_panic.load(Ordering::Relaxed) != panic {
            self.panic_changed(panic);
        }
    }

    #[cold]
    pub(crate) fn panic_changed(&self, panic: bool) {
        if self.in_panic.swap(panic, Ordering::Relaxed) == panic {
            return;
        }
        self.metrics.panic.set(panic as i64);
        if panic {
            self.metrics.panics.inc();
            warn!(service = %self.name, "service in panic: too few usable instances");
        } else {
            info!(service = %self.name, "service out of panic");
        }
    }

    pub fn in_panic(&self) -> bool {
        self.in_panic.load(Ordering::Relaxed)
    }

    /// Takes one place in the ejection budget if fewer than `limit` instances are out: the check
    /// and the count are one atomic step, so workers ejecting different instances at the same
    /// moment cannot both pass the check and exceed `max_ejection_percent` together.
    pub(crate) fn reserve_ejection(&self, limit: usize) -> bool {
        self.ejected_now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn ejected_now(&self) -> usize {
        self.ejected_now.load(Ordering::Relaxed)
    }
}

/// One detector's hold on an ejection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold {
    /// When the timer ends it (monotonic; `tokio::time` so tests can pause it).
    pub(crate) deadline: Instant,
    /// The same moment on the wall clock, for the API.
    pub(crate) until: SystemTime,
}

#[derive(Debug, Default)]
pub(crate) struct EjectionRecord {
    pub(crate) held: [Option<Hold>; DETECTORS],
    pub(crate) reason: String,
    pub(crate) since: Option<SystemTime>,
}

impl EjectionRecord {
    pub(crate) fn is_held(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }
}
