//! What the sync loop tells the rest of the daemon about the store: whether the snapshot is
//! synced and current, the last error, and when the store was found replaced. Written by the
//! sync loop only; read lock-free by readiness, metrics, the admin API, the publisher and the
//! lease keeper.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::store::StoreError;

/// Shared, lock-free view of the sync state for readiness, metrics and the admin API.
#[derive(Debug)]
pub struct SyncStatus {
    /// Set once the first full listing was published; never cleared (a stale snapshot still
    /// serves).
    pub synced: AtomicBool,
    /// Whether the watch is currently healthy.
    pub connected: AtomicBool,
    /// Origin for `confirmed_nanos`.
    base: Instant,
    /// When the snapshot was last known current (event, progress or listing), as nanoseconds
    /// after `base`; an atomic so the scrape path reads it without a lock.
    confirmed_nanos: AtomicU64,
    /// Why the store is not connected (the last error), for `/readyz`; cleared on connect.
    last_error: ArcSwapOption<String>,
    /// Bumped each time the store is found wiped or replaced: the lease keeper writes this
    /// daemon's registrations again at once (the store lost them) instead of at its next
    /// keep-alive.
    replacements: watch::Sender<u64>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            base: Instant::now(),
            confirmed_nanos: AtomicU64::new(0),
            last_error: ArcSwapOption::empty(),
            replacements: watch::Sender::new(0),
        }
    }
}

impl SyncStatus {
    pub(crate) fn confirm(&self) {
        let nanos = self.base.elapsed().as_nanos() as u64;
        self.confirmed_nanos.store(nanos, Ordering::Relaxed);
    }

    /// How stale the snapshot may be: time since it was last confirmed current.
    pub fn snapshot_age(&self) -> Duration {
        let confirmed = Duration::from_nanos(self.confirmed_nanos.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(confirmed)
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The last store error while not connected.
    pub fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }

    pub(crate) fn set_error(&self, error: &StoreError) {
        self.last_error.store(Some(Arc::new(error.to_string())));
    }

    pub(crate) fn clear_error(&self) {
        self.last_error.store(None);
    }

    /// Changes each time the store is found wiped or replaced.
    pub fn replacements(&self) -> watch::Receiver<u64> {
        self.replacements.subscribe()
    }

    pub(crate) fn replaced(&self) {
        self.replacements.send_modify(|n| *n += 1);
    }
}

/// How the store was found to hold another history than the snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreReplaced {
    /// Its revision is behind ours: wiped, or restored from a backup.
    RevisionBehind,
    /// Another cluster id: another cluster behind the same endpoints.
    ClusterId,
    /// Its marker differs or is gone: wiped or rebuilt with the same cluster id (same member
    /// names, peer URLs and token) and a revision that alone would not tell.
    Marker,
}

impl StoreReplaced {
    pub const ALL: [StoreReplaced; 3] = [
        StoreReplaced::RevisionBehind,
        StoreReplaced::ClusterId,
        StoreReplaced::Marker,
    ];

    /// The `reason` label of `svcd_registry_store_replaced_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreReplaced::RevisionBehind => "revision_behind",
            StoreReplaced::ClusterId => "cluster_id",
            StoreReplaced::Marker => "marker",
        }
    }
}
