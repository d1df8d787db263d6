//! Timing logic under `tokio::time::pause()`: lease expiry and re-grant, renewal expiry, the
//! watchdog on a hung watch, burst coalescing. Real-etcd behaviour is tested in `tests/it`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::*;
use crate::*;

/// For a keeper run without a sync loop: never changes.
fn no_replacements() -> watch::Receiver<u64> {
    watch::channel(0).1
}

fn instance(ip: &str) -> Instance {
    Instance::new(ip.parse().unwrap())
}

async fn keys(store: &dyn Store) -> Vec<String> {
    list_all(store, ENDPOINTS_PREFIX, 100)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn embedded_lease_expires_after_ttl() {
    let store = EmbeddedStore::new();
    let lease = store.grant(Duration::from_secs(10)).await.unwrap();
    store
        .put(
            "/svcd/v1/endpoints/default/a/b",
            b"{}".to_vec(),
            Some(lease),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(keys(&store).await.len(), 1);
    assert!(store.keep_alive(lease).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(keys(&store).await.len(), 1, "keep-alive extended the lease");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(keys(&store).await.is_empty());
    assert_eq!(store.keep_alive(lease).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn keeper_regrants_and_reputs_after_losing_its_lease() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new());
    let metrics = RegistryMetrics::unregistered();
    let keeper = Arc::new(LeaseKeeper::new(
        store.clone(),
        Duration::from_secs(3),
        metrics.clone(),
    ));
    let key = InstanceKey::new("default", "web", "w1").unwrap();
    keeper
        .register(key.clone(), instance("10.0.0.1"), None)
        .await
        .unwrap();
    assert_eq!(keys(store.as_ref()).await, [key.to_key()]);
    // Nobody keeps the lease alive (a long pause, a partition): it expires with its key.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(keys(store.as_ref()).await.is_empty());
    // The keeper notices on its next round and puts everything back under a new lease.
    let cancel = CancellationToken::new();
    let task = tokio::spawn(keeper.clone().run(no_replacements(), cancel.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(keys(store.as_ref()).await, [key.to_key()]);
    assert_eq!(metrics.lease_grants.get(), 2);
    // Kept alive from now on.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(keys(store.as_ref()).await, [key.to_key()]);
    // Clean shutdown revokes: entries go at once.
    cancel.cancel();
    task.await.unwrap();
    assert!(keys(store.as_ref()).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn keeper_drops_registrations_not_renewed_in_time() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new());
    let keeper = Arc::new(LeaseKeeper::new(
        store.clone(),
        Duration::from_secs(10),
        RegistryMetrics::unregistered(),
    ));
    let cancel = CancellationToken::new();
    tokio::spawn(keeper.clone().run(no_replacements(), cancel.clone()));
    let key = InstanceKey::new("default", "job", "j1").unwrap();
    keeper
        .register(
            key.clone(),
            instance("10.0.0.1"),
            Some(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Renewing with the same value writes nothing, only extends the deadline.
        keeper
            .register(
                key.clone(),
                instance("10.0.0.1"),
                Some(Duration::from_secs(2)),
            )
            .await
            .unwrap();
    }
    assert_eq!(keys(store.as_ref()).await, [key.to_key()]);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        keys(store.as_ref()).await.is_empty(),
        "not renewed: removed"
    );
    cancel.cancel();
}

/// Wraps a store; the first watch hangs forever (no events, no progress), later ones work. A
/// list asking for more than `max_list` keys is refused as too large (as tonic refuses a
/// response over its decoding limit).
struct HangingFirstWatch {
    inner: EmbeddedStore,
    watches: AtomicUsize,
    max_list: usize,
}

impl HangingFirstWatch {
    fn new(inner: EmbeddedStore, max_list: usize) -> Arc<Self> {
        Arc::new(HangingFirstWatch {
            inner,
            watches: AtomicUsize::new(0),
            max_list,
        })
    }
}

/// Registers `default/web/a` straight in the store, as another daemon would.
async fn put_web_a(store: &EmbeddedStore) {
    store
        .put(
            "/svcd/v1/endpoints/default/web/a",
            br#"{"ip":"10.0.0.1"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
}

struct Hung;

#[async_trait]
impl WatchStream for Hung {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>> {
        std::future::pending().await
    }
    async fn request_progress(&mut self) -> StoreResult<()> {
        Ok(())
    }
}

#[async_trait]
impl Store for HangingFirstWatch {
    async fn list(&self, p: &str, s: &str, r: i64, l: usize) -> StoreResult<ListPage> {
        if l > self.max_list {
            return Err(StoreError::ResponseTooLarge(format!("{l} keys")));
        }
        self.inner.list(p, s, r, l).await
    }
    async fn put(&self, k: &str, v: Vec<u8>, l: Option<LeaseId>) -> StoreResult<i64> {
        self.inner.put(k, v, l).await
    }
    async fn put_if_absent(&self, k: &str, v: Vec<u8>) -> StoreResult<KeyValue> {
        self.inner.put_if_absent(k, v).await
    }
    async fn delete(&self, k: &str) -> StoreResult<bool> {
        self.inner.delete(k).await
    }
    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, l: LeaseId) -> StoreResult<Option<Duration>> {
        self.inner.keep_alive(l).await
    }
    async fn revoke(&self, l: LeaseId) -> StoreResult<()> {
        self.inner.revoke(l).await
    }
    async fn watch(&self, p: &str, from: i64) -> StoreResult<Box<dyn WatchStream>> {
        if self.watches.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(Box::new(Hung));
        }
        self.inner.watch(p, from).await
    }
    async fn compact(&self, r: i64) -> StoreResult<()> {
        self.inner.compact(r).await
    }
    fn describe(&self) -> String {
        "hanging".into()
    }
}

struct Harness {
    snapshot: SnapshotReader,
    metrics: RegistryMetrics,
    changes: watch::Receiver<i64>,
    cancel: CancellationToken,
}

fn start_sync(store: Arc<dyn Store>, options: SyncOptions) -> Harness {
    let metrics = RegistryMetrics::unregistered();
    let cancel = CancellationToken::new();
    let publisher = Arc::new(SnapshotPublisher::new(
        Arc::new(SyncStatus::default()),
        metrics.clone(),
    ));
    let snapshot = publisher.reader();
    let changes = snapshot.changes();
    tokio::spawn(run_sync(store, publisher, options, cancel.clone()));
    Harness {
        snapshot,
        metrics,
        changes,
        cancel,
    }
}

#[tokio::test(start_paused = true)]
async fn hung_watch_is_detected_and_resumed_without_loss() {
    let inner = EmbeddedStore::new();
    let store = HangingFirstWatch::new(inner.clone(), usize::MAX);
    let h = start_sync(store.clone(), SyncOptions::default());
    tokio::time::sleep(Duration::from_millis(10)).await;
    put_web_a(&inner).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.snapshot.load().service("default", "web").is_none(),
        "the hung stream delivered nothing"
    );
    // Past the watchdog the stream is replaced and resumes from the last revision.
    tokio::time::sleep(SyncOptions::default().watchdog + Duration::from_secs(6)).await;
    let snap = h.snapshot.load();
    assert_eq!(snap.service("default", "web").unwrap().all.len(), 1);
    assert!(store.watches.load(Ordering::SeqCst) >= 2);
    h.cancel.cancel();
}

/// A stream that never answers a progress request (as behind etcd's grpc-proxy) is kept while
/// the store has nothing it did not deliver, and replaced once the store moves past it.
#[tokio::test(start_paused = true)]
async fn a_silent_stream_is_kept_until_the_store_moves_past_it() {
    let inner = EmbeddedStore::new();
    let store = HangingFirstWatch::new(inner.clone(), usize::MAX);
    let h = start_sync(store.clone(), SyncOptions::default());
    tokio::time::sleep(SyncOptions::default().watchdog * 3).await;
    assert_eq!(
        store.watches.load(Ordering::SeqCst),
        1,
        "quiet, nothing missed: kept"
    );
    put_web_a(&inner).await;
    tokio::time::sleep(SyncOptions::default().watchdog + Duration::from_secs(6)).await;
    assert_eq!(
        h.snapshot
            .load()
            .service("default", "web")
            .unwrap()
            .all
            .len(),
        1
    );
    assert_eq!(
        store.watches.load(Ordering::SeqCst),
        2,
        "replaced once it missed a write"
    );
    h.cancel.cancel();
}

/// A page too large for the client is asked for again in fewer keys, down to what fits.
#[tokio::test(start_paused = true)]
async fn a_list_page_too_large_is_read_again_in_fewer_keys() {
    let inner = EmbeddedStore::new();
    for i in 0..50 {
        inner
            .put(
                &format!("/svcd/v1/endpoints/default/web/i{i:02}"),
                br#"{"ip":"10.0.0.1"}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
    }
    let store = HangingFirstWatch::new(inner, 7);
    let mut h = start_sync(store, SyncOptions::default());
    tokio::time::timeout(Duration::from_secs(60), h.changes.changed())
        .await
        .expect("listed within a minute")
        .unwrap();
    assert_eq!(h.snapshot.load().endpoint_count(), 50);
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_events_is_one_publish() {
    let inner = EmbeddedStore::new();
    let mut h = start_sync(Arc::new(inner.clone()), SyncOptions::default());
    h.changes.changed().await.unwrap(); // initial listing
    let before = h.metrics.publishes.get();
    for i in 0..200 {
        inner
            .put(
                &format!("/svcd/v1/endpoints/default/web/i{i}"),
                br#"{"ip":"10.0.0.1"}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let snap = h.snapshot.load();
    assert_eq!(snap.service("default", "web").unwrap().all.len(), 200);
    let publishes = h.metrics.publishes.get() - before;
    assert!(publishes <= 2, "200 events took {publishes} publishes");
    h.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn compaction_does_not_disturb_a_live_watch() {
    let inner = EmbeddedStore::new();
    let h = start_sync(Arc::new(inner.clone()), SyncOptions::default());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let relists = h.metrics.relists.get();
    // A watch resuming from before the compaction point gets Compacted and must re-list.
    let rev = inner
        .put(
            "/svcd/v1/endpoints/default/web/a",
            br#"{"ip":"10.0.0.1"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    inner.compact(rev).await.unwrap();
    let mut w = inner.watch(ENDPOINTS_PREFIX, 1).await.unwrap();
    assert!(matches!(
        w.next().await,
        Ok(Some(WatchMessage::Compacted { .. }))
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(h.snapshot.load().endpoint_count(), 1);
    assert_eq!(
        h.metrics.relists.get(),
        relists,
        "a live watch is not disturbed by compaction"
    );
    h.cancel.cancel();
}

#[test]
fn a_checked_healthy_registration_is_pending_until_a_verdict() {
    use svcd_config::{CheckSpec, State};
    let reg = |state: State, check: bool, health: Option<State>| OwnRegistration {
        key: InstanceKey::new("default", "web", "a").unwrap(),
        instance: Instance {
            state,
            check: check.then(|| CheckSpec::tcp(None)),
            ..instance("10.0.0.1")
        },
        expires: None,
        written: true,
        health: health.map(|s| (s, "refused".to_string())),
    };
    let effective = |r: OwnRegistration| r.effective().state;
    assert_eq!(effective(reg(State::Healthy, true, None)), State::Pending);
    assert_eq!(effective(reg(State::Healthy, false, None)), State::Healthy);
    let passed = reg(State::Healthy, true, Some(State::Healthy));
    assert_eq!(effective(passed), State::Healthy);
    let failed = reg(State::Healthy, true, Some(State::Unhealthy)).effective();
    assert_eq!(
        (failed.state, failed.reason.as_deref()),
        (State::Unhealthy, Some("refused"))
    );
    // A registered state other than healthy wins, checked or not.
    assert_eq!(effective(reg(State::Draining, true, None)), State::Draining);
    assert_eq!(
        effective(reg(State::Unhealthy, true, None)),
        State::Unhealthy
    );
}

/// A store that can be swapped for another behind the same "endpoints": every backend reports
/// one cluster id (a store rebuilt with the same members and token), and a swap ends the watch
/// streams open on the old one (the connection drops).
struct Swappable {
    current: std::sync::Mutex<EmbeddedStore>,
    swaps: watch::Sender<u64>,
}

impl Swappable {
    fn new(first: EmbeddedStore) -> Self {
        Swappable {
            current: std::sync::Mutex::new(first),
            swaps: watch::Sender::new(0),
        }
    }

    fn get(&self) -> EmbeddedStore {
        self.current.lock().unwrap().clone()
    }

    fn swap(&self, next: EmbeddedStore) {
        *self.current.lock().unwrap() = next;
        self.swaps.send_modify(|n| *n += 1);
    }
}

struct EndsOnSwap {
    inner: Box<dyn WatchStream>,
    swaps: watch::Receiver<u64>,
}

#[async_trait]
impl WatchStream for EndsOnSwap {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>> {
        tokio::select! {
            _ = self.swaps.changed() => Err(StoreError::Unavailable("connection lost".into())),
            m = self.inner.next() => m,
        }
    }
    async fn request_progress(&mut self) -> StoreResult<()> {
        self.inner.request_progress().await
    }
}

#[async_trait]
impl Store for Swappable {
    async fn list(&self, p: &str, s: &str, r: i64, l: usize) -> StoreResult<ListPage> {
        let mut page = self.get().list(p, s, r, l).await?;
        page.history = 0x5eed;
        Ok(page)
    }
    async fn put(&self, k: &str, v: Vec<u8>, l: Option<LeaseId>) -> StoreResult<i64> {
        self.get().put(k, v, l).await
    }
    async fn put_if_absent(&self, k: &str, v: Vec<u8>) -> StoreResult<KeyValue> {
        self.get().put_if_absent(k, v).await
    }
    async fn delete(&self, k: &str) -> StoreResult<bool> {
        self.get().delete(k).await
    }
    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.get().grant(ttl).await
    }
    async fn keep_alive(&self, l: LeaseId) -> StoreResult<Option<Duration>> {
        self.get().keep_alive(l).await
    }
    async fn revoke(&self, l: LeaseId) -> StoreResult<()> {
        self.get().revoke(l).await
    }
    async fn watch(&self, p: &str, from: i64) -> StoreResult<Box<dyn WatchStream>> {
        let mut swaps = self.swaps.subscribe();
        swaps.mark_unchanged();
        let inner = self.get().watch(p, from).await?;
        Ok(Box::new(EndsOnSwap { inner, swaps }))
    }
    async fn compact(&self, r: i64) -> StoreResult<()> {
        self.get().compact(r).await
    }
    fn describe(&self) -> String {
        "swappable".into()
    }
}

async fn put_bare(store: &EmbeddedStore, id: &str) -> i64 {
    store
        .put(
            &format!("/svcd/v1/endpoints/default/web/{id}"),
            br#"{"ip":"10.0.0.1"}"#.to_vec(),
            None,
        )
        .await
        .unwrap()
}

fn ids(snapshot: &EndpointSnapshot) -> Vec<String> {
    snapshot
        .service("default", "web")
        .map(|s| s.all.iter().map(|e| e.id.to_string()).collect())
        .unwrap_or_default()
}

/// The replacement has the same cluster id and a higher revision: only the marker tells.
#[tokio::test(start_paused = true)]
async fn a_replacement_with_the_same_cluster_id_and_a_higher_revision_is_relisted() {
    let old = EmbeddedStore::new();
    put_bare(&old, "stale").await;
    let store = Arc::new(Swappable::new(old.clone()));
    let mut h = start_sync(store.clone(), SyncOptions::default());
    h.changes.changed().await.unwrap();
    assert_eq!(ids(&h.snapshot.load()), ["stale"]);
    let ours = h.snapshot.load().revision;

    let new = EmbeddedStore::new();
    let mut revision = 0;
    while revision <= ours + 10 {
        revision = put_bare(&new, "fresh").await;
    }
    store.swap(new);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ids(&h.snapshot.load()),
        ["fresh"],
        "relisted from the new store"
    );
    assert_eq!(
        h.metrics.store_replaced[2].get(),
        1,
        "counted as a marker change"
    );
    assert_eq!(h.metrics.store_replaced[0].get(), 0);
    assert_eq!(h.metrics.store_replaced[1].get(), 0);

    // Reconnecting to the same store again is no replacement.
    let again = store.get();
    store.swap(again.clone());
    put_bare(&again, "later").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ids(&h.snapshot.load()), ["fresh", "later"]);
    assert_eq!(h.metrics.store_replaced[2].get(), 1);
    h.cancel.cancel();
}

/// Told the store was replaced, the keeper writes its registrations again at once, not at its
/// next keep-alive (a TTL of a minute: 20 s away).
#[tokio::test(start_paused = true)]
async fn keeper_writes_everything_again_when_told_the_store_was_replaced() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new());
    let metrics = RegistryMetrics::unregistered();
    let keeper = Arc::new(LeaseKeeper::new(
        store.clone(),
        Duration::from_secs(60),
        metrics.clone(),
    ));
    let (replaced, replacements) = watch::channel(0);
    let cancel = CancellationToken::new();
    tokio::spawn(keeper.clone().run(replacements, cancel.clone()));
    let key = InstanceKey::new("default", "web", "w1").unwrap();
    keeper
        .register(key.clone(), instance("10.0.0.1"), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The store lost the key (its lease is still there: a restored copy, say).
    store.delete(&key.to_key()).await.unwrap();
    replaced.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(keys(store.as_ref()).await, [key.to_key()]);
    cancel.cancel();
}
