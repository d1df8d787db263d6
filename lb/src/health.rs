//! [`LoadBalancer`]: endpoint state that outlives snapshots and reloads — per service and
//! instance — the ejection timers, and pruning what left the registry. Passive health (outcomes,
//! ejections) is in [`crate::outlier`].
//!
//! There is **one ejection record per endpoint**. It remembers which detectors hold it, each
//! until its own deadline; the instance returns only when no detector holds it. Every change is
//! published through the registry's [`SnapshotPublisher`], which records the ejection in the
//! snapshot: DNS, the proxies, the API, the CLI and the metrics read one served state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use futures_util::StreamExt as _;
use svcd_config::{OutlierConfig, PanicMode};
use svcd_registry::{EndpointSnapshot, SnapshotPublisher, SnapshotReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{info, warn};

use crate::metrics::{LbMetrics, ServiceLbMetrics};
use crate::outlier::EjectionRecord;
use crate::ServiceName;

/// Who judged an instance: each proxy plane is its own detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    /// L4 TCP connects (refused, timed out).
    Tcp = 0,
    /// HTTP requests (connect failures, resets, timeouts after the request was sent, 5xx,
    /// malformed responses).
    Http = 1,
}

pub(crate) const DETECTORS: usize = 2;

impl Detector {
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Tcp => "tcp",
            Detector::Http => "http",
        }
    }

    pub(crate) fn all() -> [Detector; DETECTORS] {
        [Detector::Tcp, Detector::Http]
    }
}

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
    fn new(id: &str, ip: IpAddr) -> Self {
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
    endpoints: Mutex<HashMap<Box<str>, Arc<EndpointHealth>>>,
    /// Instances currently ejected, against `max_ejection_percent`.
    pub(crate) ejected_now: AtomicUsize,
    /// Whether the last pick found the service in panic; only transitions touch the metrics.
    in_panic: AtomicBool,
    pub(crate) metrics: ServiceLbMetrics,
}

impl ServiceHealth {
    fn endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<EndpointHealth>>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The health of `id` at `ip`, created on first sight. A new address replaces the old entry,
    /// which is returned second: the caller ends it (its connections are told it left, its
    /// ejection holds end).
    fn endpoint(&self, id: &str, ip: IpAddr) -> (Arc<EndpointHealth>, Option<Arc<EndpointHealth>>) {
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
    fn panic_changed(&self, panic: bool) {
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

/// Something that holds per-service views and must drop what left the registry (the plane
/// tables); told after every publish.
pub(crate) trait Prune: Send + Sync {
    fn prune(&self, snapshot: &EndpointSnapshot, changed: &[&str]);
}

/// An ejection hold whose time is up.
pub(crate) struct Expiry {
    pub(crate) service: Arc<ServiceHealth>,
    pub(crate) endpoint: Arc<EndpointHealth>,
    pub(crate) detector: Detector,
    pub(crate) deadline: Instant,
}

/// The owner of endpoint health for the whole daemon. One per process, shared by every plane.
pub struct LoadBalancer {
    reader: SnapshotReader,
    pub(crate) publisher: Arc<SnapshotPublisher>,
    /// Passive health and panic settings; swapped on reload (state is kept).
    pub(crate) outlier: ArcSwap<OutlierConfig>,
    /// The two settings every pick reads, as plain atomics (`Relaxed`: a pick may see a reload
    /// a moment late), so a pick loads no `ArcSwap`.
    panic_threshold: AtomicU32,
    panic_fail: AtomicBool,
    /// Services being balanced, by name. Locked to add or prune a service (cold).
    services: Mutex<HashMap<ServiceName, Arc<ServiceHealth>>>,
    /// Ejection timers go to the one timer task ([`LoadBalancer::run`]).
    pub(crate) expiries: mpsc::UnboundedSender<Expiry>,
    expiries_rx: Mutex<Option<mpsc::UnboundedReceiver<Expiry>>>,
    /// The plane tables, told to prune after every publish.
    tables: Mutex<Vec<Weak<dyn Prune>>>,
    /// Bumped once instances have left (their `left` tokens cancelled), so what keeps state per
    /// instance elsewhere (the HTTP fast path's idle connections) drops it then: after the
    /// tokens, which a plain publish subscription would race.
    departures: watch::Sender<u64>,
    metrics: LbMetrics,
}

impl LoadBalancer {
    pub fn new(
        publisher: Arc<SnapshotPublisher>,
        outlier: OutlierConfig,
        metrics: LbMetrics,
    ) -> Arc<Self> {
        let (expiries, rx) = mpsc::unbounded_channel();
        Arc::new(LoadBalancer {
            reader: publisher.reader(),
            publisher,
            panic_threshold: AtomicU32::new(outlier.panic_threshold),
            panic_fail: AtomicBool::new(outlier.panic_mode == PanicMode::Fail),
            outlier: ArcSwap::from_pointee(outlier),
            services: Mutex::new(HashMap::new()),
            expiries,
            expiries_rx: Mutex::new(Some(rx)),
            tables: Mutex::new(Vec::new()),
            departures: watch::Sender::new(0),
            metrics,
        })
    }

    /// The snapshot every plane reads.
    pub fn reader(&self) -> &SnapshotReader {
        &self.reader
    }

    /// Fires after instances left the registry; their [`EndpointHealth::has_left`] is true by
    /// then.
    pub fn departures(&self) -> watch::Receiver<u64> {
        self.departures.subscribe()
    }

    fn announce_departures(&self) {
        self.departures.send_modify(|n| *n += 1);
    }

    /// New thresholds for the next failure and pick; ejections in force keep their deadlines.
    pub fn reconfigure(&self, outlier: OutlierConfig) {
        self.panic_threshold
            .store(outlier.panic_threshold, Ordering::Relaxed);
        self.panic_fail
            .store(outlier.panic_mode == PanicMode::Fail, Ordering::Relaxed);
        self.outlier.store(Arc::new(outlier));
    }

    /// `panic_threshold` (percent) and whether panic mode is `fail`, for a pick.
    #[inline]
    pub(crate) fn panic_settings(&self) -> (u32, bool) {
        (
            self.panic_threshold.load(Ordering::Relaxed),
            self.panic_fail.load(Ordering::Relaxed),
        )
    }

    pub fn outlier(&self) -> arc_swap::Guard<Arc<OutlierConfig>> {
        self.outlier.load()
    }

    /// The health of instance `id` at `ip` of `service`, created on first sight. An instance
    /// that moved to another address is another endpoint: the old state ends here.
    pub(crate) fn endpoint_health(
        &self,
        service: &Arc<ServiceHealth>,
        id: &str,
        ip: IpAddr,
    ) -> Arc<EndpointHealth> {
        let (health, replaced) = service.endpoint(id, ip);
        if let Some(old) = replaced {
            old.left.cancel();
            self.release_all(service, &old);
            self.announce_departures();
        }
        health
    }

    pub(crate) fn register_table(&self, table: Weak<dyn Prune>) {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(table);
    }

    /// The state of `name`, created on first use.
    pub fn service(&self, name: &ServiceName) -> Arc<ServiceHealth> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(ServiceHealth {
                    name: name.clone(),
                    endpoints: Mutex::new(HashMap::new()),
                    ejected_now: AtomicUsize::new(0),
                    in_panic: AtomicBool::new(false),
                    metrics: self.metrics.service(name),
                })
            })
            .clone()
    }

    /// Runs the ejection timers and prunes what left the registry after every publish, until
    /// `cancel`. Call once.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let Some(mut expiries) = self
            .expiries_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return warn!("LoadBalancer::run called twice");
        };
        let mut timers: DelayQueue<Expiry> = DelayQueue::new();
        let mut changes = self.reader.changes();
        let mut last = self.reader.load_full();
        // Cleared when the publisher is gone: nothing more will change; the timers go on.
        let mut changes_open = true;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                Some(expiry) = expiries.recv() => {
                    let deadline = expiry.deadline;
                    timers.insert_at(expiry, deadline);
                }
                Some(expired) = timers.next(), if !timers.is_empty() => {
                    let e = expired.into_inner();
                    self.release(&e.service, &e.endpoint, e.detector, Some(e.deadline));
                }
                changed = changes.changed(), if changes_open => {
                    if changed.is_err() {
                        changes_open = false;
                        continue;
                    }
                    let now = self.reader.load_full();
                    self.prune(&now, &last);
                    last = now;
                }
            }
        }
    }

    /// Forgets instances and services that left between `old` and `now`, in this table and the
    /// plane tables (their metric series go with them).
    fn prune(&self, now: &EndpointSnapshot, old: &EndpointSnapshot) {
        let changed: Vec<&str> = now.changed_since(old).map(|n| &**n).collect();
        if changed.is_empty() {
            return;
        }
        let mut departed = false;
        {
            let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            for name in &changed {
                let Some(health) = services.get(*name).cloned() else {
                    continue;
                };
                let current = now.service_by_name(name);
                let mut gone = Vec::new();
                health.endpoints().retain(|id, h| {
                    let keep =
                        current.is_some_and(|s| s.all.iter().any(|e| e.id == *id && e.ip == h.ip));
                    if !keep {
                        h.left.cancel();
                        gone.push(h.clone());
                    }
                    keep
                });
                for h in gone {
                    departed = true;
                    self.release_all(&health, &h);
                }
                if current.is_none() {
                    services.remove(*name);
                }
            }
        }
        if departed {
            self.announce_departures();
        }
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.retain(|t| match t.upgrade() {
            Some(t) => {
                t.prune(now, &changed);
                true
            }
            None => false,
        });
    }
}
