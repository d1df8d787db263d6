//! Re-reading TLS material: every TLS object of the daemon on SIGHUP, and the ones whose files
//! changed when the file watcher (inotify, through `notify`) sees their directories move.
//! Directories, not files: cert-manager and kubelet replace a secret volume's files by swapping
//! a symlink, which a watch on the old file would never see.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::Watcher;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{ServerTls, TlsError};

/// Something whose TLS material is read from files and can be read again.
pub trait Reload: Send + Sync {
    fn files(&self) -> Vec<PathBuf>;
    fn reload(&self) -> Result<(), TlsError>;
}

impl Reload for ServerTls {
    fn files(&self) -> Vec<PathBuf> {
        ServerTls::files(self)
    }

    fn reload(&self) -> Result<(), TlsError> {
        ServerTls::reload(self)
    }
}

/// Every TLS object the daemon serves with, re-read together.
pub struct TlsReloader {
    /// Replaced whole when a config reload changes the listeners (one writer: the daemon's
    /// reload path); read by SIGHUP and the watcher task.
    items: ArcSwap<Vec<Arc<dyn Reload>>>,
    /// Bumped by `set`: the watcher then watches the directories of the new item set.
    changed: tokio::sync::watch::Sender<u64>,
    /// The content hash of each item's files when last read, by the item's address: a watch
    /// event in a directory with other files does not reload what did not change. Only the
    /// watcher task takes it.
    seen: Mutex<Vec<(usize, u64)>>,
    /// How long after the first event of a burst the files are read (a writer replacing a
    /// certificate and then its key is one change).
    debounce: Duration,
}

impl TlsReloader {
    pub fn new(debounce: Duration) -> Arc<TlsReloader> {
        Arc::new(TlsReloader {
            items: ArcSwap::from_pointee(Vec::new()),
            changed: tokio::sync::watch::Sender::new(0),
            seen: Mutex::new(Vec::new()),
            debounce,
        })
    }

    /// The items to reload from now on.
    pub fn set(&self, items: Vec<Arc<dyn Reload>>) {
        self.items.store(Arc::new(items));
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// SIGHUP: every item re-reads its files. Returns the failures (each already logged and
    /// counted by the item).
    pub fn reload_all(&self) -> Vec<TlsError> {
        let items = self.items.load_full();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.clear();
        items
            .iter()
            .filter_map(|item| {
                seen.push((key(item), contents(&item.files())));
                item.reload().err()
            })
            .collect()
    }

    /// Reloads the items whose files' contents changed since they were last read.
    fn reload_changed(&self) {
        let items = self.items.load_full();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for item in items.iter() {
            let now = contents(&item.files());
            match seen.iter_mut().find(|(k, _)| *k == key(item)) {
                Some((_, before)) if *before == now => continue,
                Some((_, before)) => *before = now,
                None => seen.push((key(item), now)),
            }
            let _ = item.reload(); // logged and counted by the item
        }
    }

    /// Watches the items' directories until `stop`; meant to run as a task of the serving phase.
    /// notify's inotify backend reads events on a thread of its own, which ends when the watcher
    /// below is dropped (when this returns).
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut changed = self.changed.subscribe();
        {
            let items = self.items.load_full();
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            *seen = items
                .iter()
                .map(|i| (key(i), contents(&i.files())))
                .collect();
        }
        loop {
            let (tx, mut events) = tokio::sync::mpsc::channel::<()>(1);
            let watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if event.is_ok() {
                        // Full: a reload is already due, which reads the files after this event.
                        let _ = tx.try_send(());
                    }
                });
            let mut watcher = match watcher {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "cannot watch TLS files; they are re-read on SIGHUP only");
                    stop.cancelled().await;
                    return;
                }
            };
            changed.borrow_and_update();
            let mut dirs: Vec<PathBuf> = self
                .items
                .load()
                .iter()
                .flat_map(|i| i.files())
                .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
                .collect();
            dirs.sort();
            dirs.dedup();
            for dir in &dirs {
                if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                    warn!(dir = %dir.display(), error = %e, "cannot watch a TLS directory; its files are re-read on SIGHUP only");
                }
            }
            debug!(?dirs, "watching TLS files");
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = changed.changed() => break,
                    Some(()) = events.recv() => {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(self.debounce) => {}
                        }
                        while events.try_recv().is_ok() {}
                        self.reload_changed();
                    }
                }
            }
        }
    }
}

/// An item's identity in `seen`: its address (items live in `Arc`s the reloader holds).
fn key(item: &Arc<dyn Reload>) -> usize {
    Arc::as_ptr(item) as *const () as usize
}

/// A hash of the files' contents (a missing file hashes as such).
fn contents(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}
