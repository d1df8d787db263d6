//! [`LoadBalancer`]: the owner of endpoint health for the whole daemon — per service and
//! instance state ([`crate::health`]) that outlives snapshots and reloads, the ejection timers,
//! and pruning what left the registry. Passive health (outcomes, ejections) is in
//! [`crate::outlier`]. Every change is published through the registry's [`SnapshotPublisher`],
//! which records the ejection in the snapshot: DNS, the proxies, the API, the CLI and the
//! metrics read one served state.

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
use tracing::warn;

use crate::detector::Detector;
use crate::health::{EndpointHealth, ServiceHealth};
use crate::metrics::LbMetrics;
use crate::ServiceName;

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
