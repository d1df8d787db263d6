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
//!                                 proxy ejections ──► LocalOverlay (node-local, one publisher)
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
//! * [`overlay`]: [`LocalOverlay`], instances this node's proxy ejected, taken out of `healthy`
//!   in every snapshot published here (DNS and the proxies agree; other nodes are unaffected).

pub mod endpoint;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod overlay;
pub mod snapshot;
pub mod store;
pub mod sync;

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use svcd_config::{Backend, FieldError, RegistryConfig};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use endpoint::Endpoint;
pub use keys::{InstanceKey, ENDPOINTS_PREFIX};
pub use lease::{LeaseKeeper, OwnRegistration};
pub use metrics::RegistryMetrics;
pub use overlay::{Ejection, LocalOverlay};
pub use snapshot::{EndpointSnapshot, ServiceEndpoints, SnapshotBuilder};
pub use store::{EmbeddedStore, EtcdStore, Store, StoreError};
pub use svcd_config::{Instance, Protocol, State};
pub use sync::{run_sync, Publisher, SyncOptions, SyncStatus};

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
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    changes: watch::Receiver<i64>,
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
/// registrations, and the published snapshot.
pub struct Registry {
    pub store: Arc<dyn Store>,
    pub keeper: Arc<LeaseKeeper>,
    pub status: Arc<SyncStatus>,
    metrics: RegistryMetrics,
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    /// The publishing point shared by the sync loop and the proxy's ejections.
    overlay: Arc<LocalOverlay>,
    changes_rx: watch::Receiver<i64>,
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
        let (changes_tx, changes_rx) = watch::channel(0);
        let snapshot = Arc::new(ArcSwap::from_pointee(EndpointSnapshot::default()));
        Ok(Registry {
            store,
            keeper,
            status: Arc::new(SyncStatus::default()),
            metrics,
            overlay: Arc::new(LocalOverlay::new(snapshot.clone(), changes_tx)),
            snapshot,
            changes_rx,
        })
    }

    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            snapshot: self.snapshot.clone(),
            changes: self.changes_rx.clone(),
        }
    }

    /// Node-local ejections (passive health), applied to every published snapshot.
    pub fn overlay(&self) -> Arc<LocalOverlay> {
        self.overlay.clone()
    }

    /// Starts the sync loop and the lease keeper; both stop on `cancel` (the keeper revoking its
    /// lease on the way out).
    pub fn spawn(&self, tasks: &mut JoinSet<()>, options: SyncOptions, cancel: CancellationToken) {
        let publisher = Publisher {
            overlay: self.overlay.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
        };
        tasks.spawn(run_sync(
            self.store.clone(),
            publisher,
            options,
            cancel.clone(),
        ));
        tasks.spawn(self.keeper.clone().run(cancel));
    }

    /// Updates gauges that are derived at scrape time: snapshot age, and each endpoint's state
    /// (O(endpoints), paid per scrape rather than per change).
    pub fn refresh_gauges(&self) {
        self.metrics
            .snapshot_age_seconds
            .set(self.status.snapshot_age().as_secs_f64());
        let ejections = self.overlay.all_ejections();
        let states = &self.metrics.endpoint_state;
        states.reset();
        let snapshot = self.snapshot.load_full();
        for service in snapshot.services() {
            let name = format!("{}.{}", service.service, service.namespace);
            let ejected = ejections.get(&name);
            for e in &service.all {
                let state = if ejected.is_some_and(|ids| ids.contains_key(&e.id)) {
                    "ejected"
                } else {
                    e.state.as_str()
                };
                states
                    .with_label_values(&[name.as_str(), &e.id, state])
                    .set(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
