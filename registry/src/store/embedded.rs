//! In-process store with etcd's semantics: a global revision per write, leases that expire and
//! delete their keys in one revision, prefix watches from any retained revision, compaction.
//!
//! One `std::sync::Mutex` guards the state: writes are rare (registrations, not queries), no lock
//! is held across an `.await`, and readers of endpoints never come here — they read the snapshot.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::*;

/// Retained history for watches that resume from an older revision.
const HISTORY_LIMIT: usize = 100_000;
/// How often expired leases are collected.
const EXPIRY_TICK: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Every committed revision, sent while the state lock is held so a watcher that subscribes
    /// under the same lock sees no gap and no duplicate.
    changes: broadcast::Sender<Arc<Batch>>,
    /// Drawn at creation: a recreated store is another history, as a new etcd cluster is.
    history: u64,
}

struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
    /// Kept across puts to an existing key, as etcd does.
    create_revision: i64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

/// The events of one revision.
struct Batch {
    revision: i64,
    events: Vec<Event>,
}

struct State {
    revision: i64,
    compact_revision: i64,
    kv: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<Arc<Batch>>,
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedStore {
    /// Creates the store and its lease-expiry task (needs a tokio runtime). The task ends when the
    /// last handle is dropped.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                revision: 1,
                compact_revision: 0,
                kv: BTreeMap::new(),
                leases: HashMap::new(),
                next_lease: 0x5_0000,
                history: VecDeque::new(),
            }),
            changes,
            history: rand::random(),
        });
        // Untracked on purpose: the store is made before the daemon's phases and outlives them
        // all; the task holds only a `Weak` and ends at its next tick once the store is gone.
        tokio::spawn(expire_leases(Arc::downgrade(&shared)));
        EmbeddedStore { shared }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    /// Commits `events` as one new revision.
    fn commit(&self, state: &mut State, mut events: Vec<Event>) -> i64 {
        state.revision += 1;
        let revision = state.revision;
        for e in &mut events {
            e.mod_revision = revision;
        }
        let batch = Arc::new(Batch { revision, events });
        state.history.push_back(batch.clone());
        if state.history.len() > HISTORY_LIMIT {
            if let Some(old) = state.history.pop_front() {
                state.compact_revision = state.compact_revision.max(old.revision);
            }
        }
        // No receivers is fine.
        let _ = self.changes.send(batch);
        revision
    }
}

fn delete_key(state: &mut State, key: &str) -> Option<Event> {
    let entry = state.kv.remove(key)?;
    if let Some(lease) = entry.lease.and_then(|id| state.leases.get_mut(&id)) {
        lease.keys.remove(key);
    }
    Some(Event {
        kind: EventKind::Delete,
        key: key.to_string(),
        value: Vec::new(),
        mod_revision: 0,
    })
}

/// Deletes a lease and its keys in one revision.
fn drop_lease(shared: &Shared, state: &mut State, id: LeaseId) -> bool {
    let Some(lease) = state.leases.remove(&id) else {
        return false;
    };
    let mut keys: Vec<String> = lease.keys.into_iter().collect();
    keys.sort();
    let events: Vec<Event> = keys.iter().filter_map(|k| delete_key(state, k)).collect();
    if !events.is_empty() {
        shared.commit(state, events);
    }
    true
}

async fn expire_leases(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            drop_lease(&shared, &mut state, id);
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn list(
        &self,
        prefix: &str,
        start: &str,
        revision: i64,
        limit: usize,
    ) -> StoreResult<ListPage> {
        let state = self.lock();
        // Only the latest revision is kept (no MVCC); a page request pinned to an older revision
        // cannot be answered consistently, so it is reported as compacted and the caller re-lists.
        if revision != 0 && revision != state.revision {
            return Err(StoreError::Compacted {
                compact_revision: state.revision,
            });
        }
        let start = if start.is_empty() { prefix } else { start };
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut kvs = Vec::new();
        let mut more = false;
        for (key, entry) in state.kv.range(start.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(KeyValue {
                key: key.clone(),
                value: entry.value.clone(),
                mod_revision: entry.mod_revision,
                create_revision: entry.create_revision,
            });
        }
        Ok(ListPage {
            kvs,
            revision: state.revision,
            more,
            history: self.shared.history,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> StoreResult<i64> {
        let mut state = self.lock();
        if let Some(id) = lease {
            let l = state
                .leases
                .get_mut(&id)
                .ok_or(StoreError::LeaseNotFound(id))?;
            l.keys.insert(key.to_string());
        }
        let create_revision = state.kv.get(key).map_or(0, |e| e.create_revision);
        let previous = state.kv.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                mod_revision: 0,
                create_revision,
                lease,
            },
        );
        if let Some(old_lease) = previous
            .and_then(|e| e.lease)
            .filter(|old| Some(*old) != lease)
        {
            if let Some(l) = state.leases.get_mut(&old_lease) {
                l.keys.remove(key);
            }
        }
        let revision = self.shared.commit(
            &mut state,
            vec![Event {
                kind: EventKind::Put,
                key: key.to_string(),
                value,
                mod_revision: 0,
            }],
        );
        let entry = state.kv.get_mut(key).expect("just inserted");
        entry.mod_revision = revision;
        if entry.create_revision == 0 {
            entry.create_revision = revision;
        }
        Ok(revision)
    }

    async fn put_if_absent(&self, key: &str, value: Vec<u8>) -> StoreResult<KeyValue> {
        let mut state = self.lock();
        if let Some(entry) = state.kv.get(key) {
            return Ok(KeyValue {
                key: key.to_string(),
                value: entry.value.clone(),
                mod_revision: entry.mod_revision,
                create_revision: entry.create_revision,
            });
        }
        let revision = self.shared.commit(
            &mut state,
            vec![Event {
                kind: EventKind::Put,
                key: key.to_string(),
                value: value.clone(),
                mod_revision: 0,
            }],
        );
        state.kv.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                mod_revision: revision,
                create_revision: revision,
                lease: None,
            },
        );
        Ok(KeyValue {
            key: key.to_string(),
            value,
            mod_revision: revision,
            create_revision: revision,
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let mut state = self.lock();
        match delete_key(&mut state, key) {
            Some(event) => {
                self.shared.commit(&mut state, vec![event]);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let mut state = self.lock();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: HashSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Option<Duration>> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(Some(l.ttl))
            }
            _ => Ok(None),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> StoreResult<()> {
        let mut state = self.lock();
        drop_lease(&self.shared, &mut state, lease);
        Ok(())
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> StoreResult<Box<dyn WatchStream>> {
        let state = self.lock();
        let from = if from_revision <= 0 {
            state.revision + 1
        } else {
            from_revision
        };
        let mut backlog = VecDeque::new();
        if from <= state.compact_revision {
            backlog.push_back(WatchMessage::Compacted {
                compact_revision: state.compact_revision + 1,
            });
        } else {
            for batch in state.history.iter().filter(|b| b.revision >= from) {
                if let Some(m) = filter_batch(batch, prefix) {
                    backlog.push_back(m);
                }
            }
        }
        let rx = self.shared.changes.subscribe();
        Ok(Box::new(EmbeddedWatch {
            store: self.clone(),
            prefix: prefix.to_string(),
            from,
            backlog,
            rx,
            progress_requested: false,
            done: false,
        }))
    }

    async fn compact(&self, revision: i64) -> StoreResult<()> {
        let mut state = self.lock();
        if revision > state.revision {
            return Err(StoreError::Other(format!(
                "cannot compact to {revision}: newer than current revision {}",
                state.revision
            )));
        }
        if revision <= state.compact_revision {
            return Err(StoreError::Compacted {
                compact_revision: state.compact_revision,
            });
        }
        state.compact_revision = revision;
        while state
            .history
            .front()
            .is_some_and(|b| b.revision <= revision)
        {
            state.history.pop_front();
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded".into()
    }
}

fn filter_batch(batch: &Batch, prefix: &str) -> Option<WatchMessage> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| e.key.starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then_some(WatchMessage::Events {
        revision: batch.revision,
        events,
    })
}

struct EmbeddedWatch {
    store: EmbeddedStore,
    prefix: String,
    /// Revisions below this were delivered from the backlog (or predate the watch).
    from: i64,
    backlog: VecDeque<WatchMessage>,
    rx: broadcast::Receiver<Arc<Batch>>,
    progress_requested: bool,
    done: bool,
}

#[async_trait]
impl WatchStream for EmbeddedWatch {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>> {
        if self.done {
            return Ok(None);
        }
        if let Some(m) = self.backlog.pop_front() {
            self.done = matches!(m, WatchMessage::Compacted { .. });
            return Ok(Some(m));
        }
        loop {
            if self.progress_requested {
                // Under the state lock nothing can be committed, so an empty channel means every
                // revision up to the current one was delivered.
                let state = self.store.lock();
                match self.rx.try_recv() {
                    Err(broadcast::error::TryRecvError::Empty) => {
                        self.progress_requested = false;
                        return Ok(Some(WatchMessage::Progress {
                            revision: state.revision,
                        }));
                    }
                    other => {
                        drop(state);
                        if let Some(m) = self.on_batch(other.map_err(|e| e.to_string()))? {
                            return Ok(Some(m));
                        }
                        continue;
                    }
                }
            }
            let got = self.rx.recv().await.map_err(|e| e.to_string());
            if let Some(m) = self.on_batch(got)? {
                return Ok(Some(m));
            }
        }
    }

    async fn request_progress(&mut self) -> StoreResult<()> {
        self.progress_requested = true;
        Ok(())
    }
}

impl EmbeddedWatch {
    fn on_batch(&mut self, got: Result<Arc<Batch>, String>) -> StoreResult<Option<WatchMessage>> {
        match got {
            Ok(batch) if batch.revision < self.from => Ok(None),
            Ok(batch) => Ok(filter_batch(&batch, &self.prefix)),
            // Lagged: the receiver fell behind; end the stream so the caller resumes from its last
            // revision (served from history).
            Err(e) => {
                self.done = true;
                Err(StoreError::Unavailable(format!(
                    "embedded watch broke: {e}"
                )))
            }
        }
    }
}
