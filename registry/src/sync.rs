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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::keys::{ENDPOINTS_PREFIX, STORE_MARKER_KEY};
use crate::metrics::RegistryMetrics;
use crate::publisher::SnapshotPublisher;
use crate::snapshot::{Applied, SnapshotBuilder};
use crate::status::StoreReplaced;
use crate::store::{ListPage, Store, StoreError, StoreResult, WatchMessage, WatchStream};

/// Timings of the sync loop; tests shrink them.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Keys in the first list page. Later pages are sized by `page_bytes` from the mean key and
    /// value size seen so far, never below this.
    pub page_size: usize,
    /// Bytes a list page aims at. Few large pages matter at scale: etcd walks every remaining
    /// key of the range for each page (to count them), so a listing in pages of P keys costs
    /// N²/2P key visits — at a million keys, 30 s in 5,000-key pages, under 1 s in 16 MiB ones.
    pub page_bytes: usize,
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
            page_bytes: 16 << 20,
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

/// Where a listing stands: its revision, in which history (see `ListPage::history`), and the
/// store's marker when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    revision: i64,
    history: u64,
    marker: Option<Marker>,
}

/// The store's identity ([`STORE_MARKER_KEY`]): its random value and the revision that created
/// it. A copy made by mirroring keeps the value but not the create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    value: Vec<u8>,
    create_revision: i64,
}

/// What one read of the store says about its history.
struct Identity {
    revision: i64,
    history: u64,
    marker: Option<Marker>,
}

/// Reads the store's marker, creating it when absent. `None` when it is absent and this node
/// may not write it (a read-only user): the cluster id and revision still tell what they can.
async fn read_identity(store: &dyn Store) -> StoreResult<Identity> {
    let page = store.list(STORE_MARKER_KEY, "", 0, 1).await?;
    let found = page.kvs.into_iter().find(|kv| kv.key == STORE_MARKER_KEY);
    let kv = match found {
        Some(kv) => Some(kv),
        None => {
            let value = format!("{:032x}", rand::random::<u128>()).into_bytes();
            match store.put_if_absent(STORE_MARKER_KEY, value).await {
                Ok(kv) => Some(kv),
                Err(e @ StoreError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    debug!(error = %e, key = STORE_MARKER_KEY, "cannot write the store marker");
                    None
                }
            }
        }
    };
    Ok(Identity {
        revision: page.revision,
        history: page.history,
        marker: kv.map(|kv| Marker {
            value: kv.value,
            create_revision: kv.create_revision,
        }),
    })
}

/// Lists the whole prefix at one revision, page by page, applying each page as it arrives.
/// The marker is read first: a store replaced between the two reads is then seen at the next
/// reconnect (a listing of the new store under the old marker), never missed.
async fn relist(
    store: &dyn Store,
    builder: &mut SnapshotBuilder,
    metrics: &RegistryMetrics,
    options: &SyncOptions,
) -> StoreResult<Position> {
    let marker = read_identity(store).await?.marker;
    let mut relist = builder.begin_relist();
    let mut page_size = options.page_size.max(1);
    let (mut keys, mut bytes) = (0usize, 0usize);
    let mut page = list_page(store, ENDPOINTS_PREFIX, 0, &mut page_size).await?;
    // The first page fixes the listing's revision and later pages are read at it. (etcd's
    // header carries the store's current revision, not the one a read was pinned to: taking a
    // later page's would resume the watch past writes made during the listing.)
    let revision = page.revision;
    let history = page.history;
    loop {
        keys += page.kvs.len();
        bytes += page
            .kvs
            .iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum::<usize>();
        if keys > 0 {
            page_size = (options.page_bytes / bytes.div_ceil(keys)).max(options.page_size.max(1));
        }
        let next_start = match page.kvs.last() {
            Some(last) if page.more => Some(format!("{}\0", last.key)),
            _ => None,
        };
        // The next page is asked for before this one is applied: etcd reads and sends it while
        // this daemon decodes the current one (at a million keys, the two halves of the work).
        let next = async {
            match &next_start {
                Some(start) => Some(list_page(store, start, revision, &mut page_size).await),
                None => None,
            }
        };
        let apply = async { report_invalid(metrics, &builder.relist_page(&mut relist, &page.kvs)) };
        let (next, ()) = tokio::join!(next, apply);
        match next {
            Some(next) => page = next?,
            None => break,
        }
    }
    report_invalid(metrics, &builder.finish_relist(relist, revision));
    Ok(Position {
        revision,
        history,
        marker,
    })
}

/// The page of the listing at `start`, read at `revision`; while the response is too large for
/// this client (values larger than the pages so far), the same page in half as many keys.
async fn list_page(
    store: &dyn Store,
    start: &str,
    revision: i64,
    page_size: &mut usize,
) -> StoreResult<ListPage> {
    loop {
        match store
            .list(ENDPOINTS_PREFIX, start, revision, *page_size)
            .await
        {
            Err(StoreError::ResponseTooLarge(e)) if *page_size > 1 => {
                *page_size /= 2;
                debug!(error = %e, page_size = *page_size, "list page too large; asking for fewer keys");
            }
            result => return result,
        }
    }
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

/// Whether the store's history is still ours, by one read (and, when the marker is missing, one
/// write): a store behind our revision, of another cluster or with another marker is not, and
/// watching on from our revision would miss or invent events. A marker that appeared since we
/// listed without one (a read-only node, a writer created it since) is adopted.
async fn check_history(
    store: &dyn Store,
    ours: &mut Position,
) -> StoreResult<Option<StoreReplaced>> {
    let now = read_identity(store).await?;
    if now.history != ours.history {
        warn!(
            store_cluster = format_args!("{:x}", now.history),
            snapshot_cluster = format_args!("{:x}", ours.history),
            "registry store is another cluster than the one listed (replaced); re-listing"
        );
        return Ok(Some(StoreReplaced::ClusterId));
    }
    if now.revision < ours.revision {
        warn_backwards(now.revision, ours.revision);
        return Ok(Some(StoreReplaced::RevisionBehind));
    }
    match (&ours.marker, now.marker) {
        (Some(listed), found) if found.as_ref() != Some(listed) => {
            warn!(
                key = STORE_MARKER_KEY,
                listed = %String::from_utf8_lossy(&listed.value),
                listed_created = listed.create_revision,
                found = %found.as_ref().map_or("none".into(), |m| String::from_utf8_lossy(&m.value).into_owned()),
                found_created = found.as_ref().map_or(0, |m| m.create_revision),
                store_revision = now.revision,
                snapshot_revision = ours.revision,
                "registry store marker changed: the store was wiped or replaced (same cluster id); re-listing"
            );
            Ok(Some(StoreReplaced::Marker))
        }
        (None, found @ Some(_)) => {
            ours.marker = found;
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn warn_backwards(now: i64, ours: i64) {
    warn!(
        store_revision = now,
        snapshot_revision = ours,
        "registry store revision went backwards (wiped or restored from a backup); re-listing"
    );
}

/// Counts a replacement and tells the lease keeper, which writes this daemon's own
/// registrations again at once.
fn on_replaced(publisher: &SnapshotPublisher, how: StoreReplaced) {
    publisher.metrics.store_replaced[how as usize].inc();
    publisher.status.replaced();
}

/// Why a watch session ended.
enum WatchEnd {
    Cancelled,
    /// Re-list (compaction or scheduled reconciliation).
    Relist,
    /// Stream broke or hung; watch again from the last revision.
    Reconnect,
    /// The stream said something only a replaced store would (a progress revision below what
    /// was applied): check the store's history by a fresh read, then re-list or watch on.
    Verify,
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
    // Whether the store has ever answered a progress request: if it has, a silent stream is hung;
    // if not (etcd's grpc-proxy drops them), the watchdog asks the store before replacing it.
    let mut progress_answered = false;
    'relist: loop {
        // 1. Full listing at one revision, applied as a diff.
        let listed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = relist(store.as_ref(), &mut builder, &publisher.metrics, &options) => r,
        };
        let mut position = match listed {
            Ok(position) => {
                publisher.metrics.relists.inc();
                publisher.publish_base(|previous| builder.build(previous));
                publisher.status.synced.store(true, Ordering::Relaxed);
                publisher.set_connected(true);
                publisher.status.confirm();
                debug!(revision = position.revision, "registry listed");
                position
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
            // A store that comes back behind us (wiped, restored), as another cluster or
            // with another marker has a history that is not ours any more: re-list at once.
            // Not knowing (the store unreachable) is not a reason to watch on.
            let checked = if std::mem::take(&mut first_watch) {
                Ok(None)
            } else {
                position.revision = builder.revision();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = check_history(store.as_ref(), &mut position) => r,
                }
            };
            let stream = match checked {
                Ok(Some(how)) => {
                    on_replaced(&publisher, how);
                    continue 'relist;
                }
                Ok(None) => {
                    let from = builder.revision() + 1;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        s = store.watch(ENDPOINTS_PREFIX, from) => s,
                    }
                }
                Err(e) => Err(e),
            };
            let end = match stream {
                Ok(stream) => {
                    backoff.reset();
                    watch_session(
                        store.as_ref(),
                        position.history,
                        &mut progress_answered,
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
                // The loop's next turn checks the store's history before watching again.
                WatchEnd::Verify => {}
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

#[allow(clippy::too_many_arguments)]
async fn watch_session(
    store: &dyn Store,
    history: u64,
    progress_answered: &mut bool,
    mut stream: Box<dyn WatchStream>,
    builder: &mut SnapshotBuilder,
    publisher: &SnapshotPublisher,
    options: &SyncOptions,
    cancel: &CancellationToken,
    resync_at: Instant,
) -> WatchEnd {
    let mut progress_at = Instant::now() + options.progress_interval;
    let mut watchdog_at = Instant::now() + options.watchdog;
    // Changes applied but not yet published (a session that ended before its publish) go out
    // with the first coalescing window.
    let mut publish_at = builder
        .has_changes()
        .then(|| Instant::now() + options.coalesce);
    // When the first event not yet published arrived (`svcd_registry_event_to_publish_seconds`).
    let mut burst_since: Option<Instant> = None;
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
                if let Some(since) = burst_since.take() {
                    publisher.metrics.event_to_publish_seconds.observe(since.elapsed().as_secs_f64());
                }
            }
            message = stream.next() => {
                watchdog_at = Instant::now() + options.watchdog;
                match message {
                    Ok(Some(WatchMessage::Events { revision, events })) => {
                        let arrived = Instant::now();
                        let results = builder.apply_batch(&events);
                        record(&publisher.metrics, &results, events.iter().map(|e| e.kind == crate::store::EventKind::Put));
                        // The header revision is not advanced to: for a watch still catching up
                        // it can run ahead of events not yet delivered.
                        let _ = revision;
                        if builder.has_changes() && publish_at.is_none() {
                            publish_at = Some(Instant::now() + options.coalesce);
                            burst_since.get_or_insert(arrived);
                        }
                        publisher.status.confirm();
                    }
                    Ok(Some(WatchMessage::Progress { revision })) if revision < builder.revision() => {
                        // Not proof on its own: etcd 3.4 can send a progress revision below
                        // events it already delivered (etcd-io/etcd#15220), which re-listed
                        // hundreds of daemons of a fleet at once. The store's own answer decides.
                        debug!(progress = revision, applied = builder.revision(), "watch progress below the applied revision; checking the store");
                        if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                        return WatchEnd::Verify;
                    }
                    Ok(Some(WatchMessage::Progress { revision })) => {
                        *progress_answered = true;
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
                // Silent: no events, no answer to progress requests. Where the store answers them,
                // that is a hung stream. Behind etcd's grpc-proxy, which drops them
                // (etcd-io/etcd#19710), every quiet stream is silent: it is hung only if the store
                // moved past what it delivered, so ask the store (bounded: a frozen store answers
                // nothing and the stream is replaced).
                if !*progress_answered {
                    let read = tokio::select! {
                        _ = cancel.cancelled() => return WatchEnd::Cancelled,
                        r = tokio::time::timeout(options.progress_interval, store.list(STORE_MARKER_KEY, "", 0, 1)) => r,
                    };
                    match read {
                        Ok(Ok(page)) if page.revision == builder.revision() && page.history == history => {
                            debug!(revision = page.revision, "registry watch quiet and nothing written since; keeping it");
                            watchdog_at = Instant::now() + options.watchdog;
                            continue;
                        }
                        Ok(Ok(page)) if page.revision < builder.revision() || page.history != history => {
                            if builder.has_changes() { publisher.publish_base(|previous| builder.build(previous)); }
                            return WatchEnd::Verify;
                        }
                        _ => {}
                    }
                }
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
