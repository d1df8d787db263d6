//! svcd registry: the process → IP mapping.
//!
//! This crate owns where registrations live and how the rest of svcd sees them:
//!
//! ```text
//!  admin API / CLI / svcd exec / static config
//!        │ register / deregister
//!        ▼
//!  LeaseKeeper ──put with lease, keep-alive every TTL/3──► Store (etcd │ embedded)
//!                                                           │ list @R (paged) + watch from R+1
//!                                                           ▼
//!                                        run_sync: SnapshotBuilder (single writer)
//!                                                           │ base snapshot
//!                       lb ejections ──► SnapshotPublisher (base + node-local ejections)
//!                                                           │ store(Arc<EndpointSnapshot>)
//!                                                           ▼
//!                        ArcSwap ◄── load() ── DNS responder, proxies, admin API (no locks)
//! ```
//!
//! * [`store`]: the small [`Store`] trait and its two backends, with identical semantics.
//! * [`keys`]: the key layout `/svcd/v1/endpoints/<ns>/<service>/<id>` (see `docs/registry.md`).
//! * [`snapshot`]: the immutable [`EndpointSnapshot`] and its builder; unchanged services are
//!   shared between snapshots.
//! * [`sync`]: the list/watch loop, resilient to broken streams, compaction and hung watches.
//! * [`lease`]: [`LeaseKeeper`], holding this daemon's registrations under one TTL lease.
//! * [`publisher`]: [`SnapshotPublisher`], the one publishing point: bases from the sync loop
//!   with this node's ejections recorded in them, so every reader sees one [`ServedState`]
//!   (DNS, proxies, API, CLI and metrics agree; other nodes are unaffected).
//! * [`name`]: [`ServiceName`], the one spelling of `"<svc>.<ns>"`.

mod backoff;
pub mod endpoint;
pub mod error_text;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod name;
pub mod publisher;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod sync;

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use svcd_config::{Backend, FieldError, RegistryConfig};
use svcd_lifecycle::Phase;
use tokio::sync::watch;

pub use endpoint::Endpoint;
pub use keys::{InstanceKey, ENDPOINTS_PREFIX, STORE_MARKER_KEY};
pub use lease::{LeaseKeeper, OwnRegistration};
pub use metrics::RegistryMetrics;
pub use name::ServiceName;
pub use publisher::SnapshotPublisher;
pub use snapshot::{Ejection, EndpointSnapshot, ServedState, ServiceEndpoints, SnapshotBuilder};
pub use status::{StoreReplaced, SyncStatus};
pub use store::{EmbeddedStore, EtcdStore, Store, StoreError};
pub use svcd_config::{Instance, Protocol, State};
pub use sync::{run_sync, SyncOptions};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Invalid(FieldError),
}

/// Read side of the registry: cheap to clone, lock-free to read.
#[derive(Clone)]
pub struct SnapshotReader {
    pub(crate) snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    pub(crate) changes: watch::Receiver<i64>,
}

impl SnapshotReader {
    /// The current snapshot. Hold the guard briefly (one query, one connection pick).
    #[inline]
    pub fn load(&self) -> Guard<Arc<EndpointSnapshot>> {
        self.snapshot.load()
    }

    /// A reader of one fixed snapshot (tests and tools that have no store).
    pub fn fixed(snapshot: EndpointSnapshot) -> Self {
        let (_tx, changes) = watch::channel(snapshot.revision);
        SnapshotReader {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            changes,
        }
    }

    /// The current snapshot as an owned `Arc`, for work that outlives a short borrow.
    pub fn load_full(&self) -> Arc<EndpointSnapshot> {
        self.snapshot.load_full()
    }

    /// Fires with the revision of every published snapshot.
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.changes.clone()
    }
}

/// The registry as the daemon wires it: a store, the lease keeper for this daemon's own
/// registrations, and the publisher of the snapshot.
pub struct Registry {
    pub store: Arc<dyn Store>,
    pub keeper: Arc<LeaseKeeper>,
    pub status: Arc<SyncStatus>,
    metrics: RegistryMetrics,
    /// The one publishing point, shared by the sync loop and the load balancer's ejections.
    publisher: Arc<SnapshotPublisher>,
}

impl Registry {
    /// Opens the configured backend. For etcd the connection is lazy: an unreachable etcd is
    /// retried in the background while the daemon starts.
    pub async fn open_store(config: &RegistryConfig) -> Result<Arc<dyn Store>, RegistryError> {
        Ok(match config.backend {
            Backend::Embedded => Arc::new(EmbeddedStore::new()),
            Backend::Etcd => Arc::new(EtcdStore::connect(&config.etcd).await?),
        })
    }

    pub fn new(
        store: Arc<dyn Store>,
        config: &RegistryConfig,
        prometheus: &prometheus::Registry,
    ) -> Result<Self, RegistryError> {
        let metrics = RegistryMetrics::new(prometheus)?;
        let keeper = Arc::new(LeaseKeeper::new(
            store.clone(),
            config.lease_ttl,
            metrics.clone(),
        ));
        let status = Arc::new(SyncStatus::default());
        Ok(Registry {
            store,
            keeper,
            publisher: Arc::new(SnapshotPublisher::new(status.clone(), metrics.clone())),
            status,
            metrics,
        })
    }

    pub fn reader(&self) -> SnapshotReader {
        self.publisher.reader()
    }

    /// Waits until this daemon's snapshot shows `key` as `want` (`Some`: an instance equal to
    /// it; `None`: absent), at most `timeout`. Read-your-writes for the API: a registration
    /// returns once DNS and the proxies here serve it. `false` on timeout.
    pub async fn wait_visible(
        &self,
        key: &InstanceKey,
        want: Option<&Instance>,
        timeout: std::time::Duration,
    ) -> bool {
        self.wait_all_visible(&[(key, want)], timeout).await
    }

    /// [`Self::wait_visible`] for several keys at once (a drain of every own registration):
    /// `true` once the snapshot shows all of them as wanted, within one `timeout`.
    pub async fn wait_all_visible(
        &self,
        wants: &[(&InstanceKey, Option<&Instance>)],
        timeout: std::time::Duration,
    ) -> bool {
        let reader = self.reader();
        let mut changes = reader.changes();
        let visible = || {
            let snapshot = reader.load();
            wants.iter().all(|(key, want)| {
                let found = snapshot
                    .service(&key.namespace, &key.service)
                    .and_then(|s| s.all.iter().find(|e| *e.id == *key.id));
                match (found, want) {
                    (Some(e), Some(want)) => e.same_as(want),
                    (None, None) => true,
                    _ => false,
                }
            })
        };
        tokio::time::timeout(timeout, async {
            while !visible() {
                if changes.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }

    /// Where node-local ejections are published (the load balancer holds it).
    pub fn publisher(&self) -> Arc<SnapshotPublisher> {
        self.publisher.clone()
    }

    /// Starts the sync loop and the lease keeper in `phase`; both stop with it (the keeper
    /// revoking its lease on the way out).
    pub fn spawn(&self, phase: &Phase, options: SyncOptions) {
        phase.spawn(run_sync(
            self.store.clone(),
            self.publisher.clone(),
            options,
            phase.token(),
        ));
        phase.spawn(
            self.keeper
                .clone()
                .run(self.status.replacements(), phase.token()),
        );
    }

    /// Updates the gauges derived at scrape time (snapshot age).
    pub fn refresh_gauges(&self) {
        self.metrics
            .snapshot_age_seconds
            .set(self.status.snapshot_age().as_secs_f64());
    }

    /// Appends the endpoint-state families to a Prometheus text exposition, straight from the
    /// snapshot: `svcd_service_endpoints{service,state}` always, and with `per_endpoint`
    /// `svcd_endpoint_state{service,endpoint,state}` (opt-in, as Envoy's per-host stats). Written
    /// as text rather than through gauge vectors so a scrape of 100k endpoints retains nothing
    /// and a vanished service or endpoint has no series left behind.
    pub fn write_state_metrics(&self, out: &mut String, per_endpoint: bool, max_services: usize) {
        metrics::write_state_metrics(&self.reader().load_full(), out, per_endpoint, max_services);
    }
}

#[cfg(test)]
mod tests;
