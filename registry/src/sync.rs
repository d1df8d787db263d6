//! Store → snapshot: list at one revision, publish, watch from the next revision, and never miss
//! or repeat an event across broken streams, compaction, hung streams and restarts.
//!
//! ```text
//!  ┌─► list_all(prefix) @R (paged) ─► builder.reset_to (diff) ─► publish
//!  │        │
//!  │        ▼
//!  │   watch(prefix, R+1) ──events──► builder.apply_batch ──(coalesce ≤ 5 ms)──► publish
//!  │        │  broken / hung ──► backoff, watch again from last revision + 1
//!  └────────┴─ compacted / resync timer
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::keys::ENDPOINTS_PREFIX;
use crate::metrics::RegistryMetrics;
use crate::publisher::SnapshotPublisher;
use crate::snapshot::{Applied, SnapshotBuilder};
use crate::store::{Store, StoreError, StoreResult, WatchMessage, WatchStream};

/// Timings of the sync loop; tests shrink them.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Keys per list page; keeps every response far below gRPC message limits.
    pub page_size: usize,
    /// A burst of events within this window becomes one publish.
    pub coalesce: Duration,
    /// How often to ask the store for a progress notification (heartbeat).
    pub progress_interval: Duration,
    /// No message at all for this long means the stream is hung: reconnect.
    pub watchdog: Duration,
    /// Full re-list and diff, to catch anything else.
    pub resync_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            page_size: 5000,
            coalesce: Duration::from_millis(5),
            progress_interval: Duration::from_secs(5),
            watchdog: Duration::from_secs(15),
            resync_interval: Duration::from_secs(300),
            backoff_min: Duration::from_millis(100),
            // Short: a retry against a down store is one refused connect, and a change made
            // when it heals must reach every node within a second. The jitter spreads nodes.
            backoff_max: Duration::from_millis(800),
        }
    }
}

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
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            base: Instant::now(),
            confirmed_nanos: AtomicU64::new(0),
            last_error: ArcSwapOption::empty(),
        }
    }
}

impl SyncStatus {
    fn confirm(&self) {
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
}

fn record(metrics: &RegistryMetrics, results: &[Applied], kinds: impl Iterator<Item = bool>) {
    report_invalid(metrics, results);
    for (result, is_put) in results.iter().zip(kinds) {
        match result {
            Applied::Invalid { .. } | Applied::Stale => {}
            Applied::Changed | Applied::Unchanged => {
                if is_put {
                    metrics.events_put.inc();
                } else {
                    metrics.events_delete.inc();
                }
            }
        }
    }
}

struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// Full jitter over the current step, then the step doubles.
    fn step(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random_range(0.5..=1.0);
        current.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Where a listing stands: its revision, in which history (see `ListPage::history`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    revision: i64,
    history: u64,
}

/// Lists the whole prefix at one revision, page by page, applying each page as it arrives.
async fn relist(
    store: &dyn Store,
    builder: &mut SnapshotBuilder,
    metrics: &RegistryMetrics,
    page_size: usize,
) -> StoreResult<Position> {
    let mut relist = builder.begin_relist();
    let mut revision = 0;
    let mut history;
    let mut start = ENDPOINTS_PREFIX.to_string();
    loop {
        let page = store
            .list(ENDPOINTS_PREFIX, &start, revision, page_size)
            .await?;
        revision = page.revision;
        history = page.history;
        report_invalid(metrics, &builder.relist_page(&mut relist, &page.kvs));
        match page.kvs.last() {
            Some(last) if page.more => start = format!("{}\0", last.key),
            _ => break,
        }
    }
    report_invalid(metrics, &builder.finish_relist(relist, revision));
    Ok(Position { revision, history })
}

/// Invalid entries logged one by one per batch or listing page; past that, one summary line.
const INVALID_LOGGED: usize = 5;

/// Counts every invalid entry; logs the first few of a batch and a summary of the rest, so a
/// store holding a thousand garbage keys gives a few lines at start, not a thousand.
fn report_invalid(metrics: &RegistryMetrics, results: &[Applied]) {
    let mut invalid = 0usize;
    for r in results {
        if let Applied::Invalid { key, reason } = r {
            metrics.invalid_values.inc();
            invalid += 1;
            if invalid <= INVALID_LOGGED {
                warn!(%key, %reason, "skipping invalid registry entry");
            }
        }
    }
    if invalid > INVALID_LOGGED {
        warn!(
            more = invalid - INVALID_LOGGED,
            total = invalid,
            "skipping more invalid registry entries (all counted in svcd_registry_invalid_values_total)"
        );
    }
}

/// Whether the store's history is no longer ours, by reading one key: its revision went behind
/// ours (wiped, or restored from a backup) or it is another cluster (replaced behind the same
/// endpoints). Either way, watching on from our revision would miss or invent events.
async fn history_changed(store: &dyn Store, ours: Position) -> bool {
    let Ok(page) = store.list(ENDPOINTS_PREFIX, ENDPOINTS_PREFIX, 0, 1).await else {
        return false;
    };
    if page.history != ours.history {
        warn!(
            store_cluster = format_args!("{:x}", page.history),
            snapshot_cluster = format_args!("{:x}", ours.history),
            "registry store is another cluster than the one listed (replaced); re-listing"
        );
        return true;
    }
    if page.revision < ours.revision {
        warn_backwards(page.revision, ours.revision);
        return true;
    }
    false
}

fn warn_backwards(now: i64, ours: i64) {
    warn!(
        store_revision = now,
        snapshot_revision = ours,
        "registry store revision went backwards (wiped or restored from a backup); re-listing"
    );
}

/// Why a watch session ended.
enum WatchEnd {
    Cancelled,
    /// Re-list (compaction or scheduled reconciliation).
    Relist,
    /// Stream broke or hung; watch again from the last revision.
    Reconnect,
}

/// Runs until `cancel` fires.
pub async fn run_sync(
    store: Arc<dyn Store>,
    publisher: Arc<SnapshotPublisher>,
    options: SyncOptions,
    cancel: CancellationToken,
) {
    let mut builder = SnapshotBuilder::new();
    let mut backoff = Backoff::new(options.backoff_min, options.backoff_max);
    'relist: loop {
        // 1. Full listing at one revision, applied as a diff.
        let listed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = relist(store.as_ref(), &mut builder, &publisher.metrics, options.page_size) => r,
        };
        let history = match listed {
            Ok(Position { revision, history }) => {
                publisher.metrics.relists.inc();
                publisher.publish_base(|previous| builder.build(previous));
                publisher.status.synced.store(true, Ordering::Relaxed);
                publisher.set_connected(true);
                publisher.status.confirm();
                debug!(revision, "registry listed");
                history
            }
            Err(e) => {
                publisher.status.set_error(&e);
                publisher.set_connected(false);
                let delay = backoff.step();
                warn!(error = %e, ?delay, "registry list failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = sleep(delay) => continue 'relist,
                }
            }
        };
        let resync_at = Instant::now() + options.resync_interval;
        // 2. Watch from the revision after everything applied, re-opening as needed.
        let mut first_watch = true;
        loop {
            // A store that comes back behind us (wiped, restored) or as another cluster has
            // a history that is not ours any more: re-list at once.
            if !std::mem::take(&mut first_watch) {
                let ours = Position {
                    revision: builder.revision(),
                    history,
                };
                if history_changed(store.as_ref(), ours).await {
                    continue 'relist;
                }
            }
            let from = builder.revision() + 1;
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                s = store.watch(ENDPOINTS_PREFIX, from) => s,
            };
            let end = match stream {
                Ok(stream) => {
                    backoff.reset();
                    watch_session(
                        stream,
                        &mut builder,
                        &publisher,
                        &options,
                        &cancel,
                        resync_at,
                    )
                    .await
                }
                Err(StoreError::Compacted { .. }) => WatchEnd::Relist,
                Err(e) => {
                    publisher.status.set_error(&e);
                    warn!(error = %e, "registry watch failed to start");
                    WatchEnd::Reconnect
                }
            };
            match end {
                WatchEnd::Cancelled => return,
                WatchEnd::Relist => continue 'relist,
                WatchEnd::Reconnect => {
                    publisher.set_connected(false);
                    let delay = backoff.step();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }
}

async fn watch_session(
    mut stream: Box<dyn WatchStream>,
    builder: &mut SnapshotBuilder,
    publisher: &SnapshotPublisher,
    options: &SyncOptions,
    cancel: &CancellationToken,
    resync_at: Instant,
) -> WatchEnd {
    let mut progress_at = Instant::now() + options.progress_interval;
    let mut watchdog_at = Instant::now() + options.watchdog;
    let mut publish_at: Option<Instant> = None;
    // The first message proves the stream is live; until then the store may still be down.
    let mut live = false;
    loop {
        let publish_deadline =
            publish_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                return WatchEnd::Cancelled;
            }
            _ = sleep_until(publish_deadline), if publish_at.is_some() => {
                publisher.publish_base(|previous| builder.build(previous));
                publish_at = None;
            }
            message = stream.next() => {
                watchdog_at = Instant::now() + options.watchdog;
                match message {
                    Ok(Some(WatchMessage::Events { revision, events })) => {
                        let results = builder.apply_batch(&events);
                        record(&publisher.metrics, &results, events.iter().map(|e| e.kind == crate::store::EventKind::Put));
                        // The header revision is not advanced to: for a watch still catching up
                        // it can run ahead of events not yet delivered.
                        let _ = revision;
                        if builder.has_changes() && publish_at.is_none() {
                            publish_at = Some(Instant::now() + options.coalesce);
                        }
                        publisher.status.confirm();
                    }
                    Ok(Some(WatchMessage::Progress { revision })) if revision < builder.revision() => {
                        warn_backwards(revision, builder.revision());
                        return WatchEnd::Relist;
                    }
                    Ok(Some(WatchMessage::Progress { revision })) => {
                        // Everything up to `revision` was delivered.
                        builder.advance(revision);
                        publisher.status.confirm();
                        if !builder.has_changes() {
                            publisher.metrics.revision.set(builder.revision());
                        }
                    }
                    Ok(Some(WatchMessage::Compacted { compact_revision })) => {
                        warn!(compact_revision, from = builder.revision() + 1, "registry watch revision compacted; re-listing");
                        if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                        return WatchEnd::Relist;
                    }
                    Ok(None) => {
                        if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                        return WatchEnd::Reconnect;
                    }
                    Err(e) => {
                        publisher.status.set_error(&e);
                        warn!(error = %e, "registry watch broke; resuming");
                        if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                        return WatchEnd::Reconnect;
                    }
                }
                if !live {
                    live = true;
                    publisher.set_connected(true);
                }
            }
            _ = sleep_until(progress_at) => {
                progress_at = Instant::now() + options.progress_interval;
                if let Err(e) = stream.request_progress().await {
                    warn!(error = %e, "registry watch progress request failed; reconnecting");
                    return WatchEnd::Reconnect;
                }
            }
            _ = sleep_until(watchdog_at) => {
                warn!(timeout = ?options.watchdog, "registry watch silent past the watchdog; reconnecting");
                if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                return WatchEnd::Reconnect;
            }
            _ = sleep_until(resync_at) => {
                if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                debug!("scheduled registry reconciliation");
                return WatchEnd::Relist;
            }
        }
    }
}
