//! `/readyz`: ready once the registry has synced and every listener is bound, until shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use svcd_registry::SyncStatus;

pub struct Readiness {
    /// Set after every configured listener bound.
    pub listeners_bound: AtomicBool,
    /// Set on the first shutdown signal: load balancers stop sending before we stop accepting.
    pub shutting_down: AtomicBool,
    pub registry: Arc<SyncStatus>,
}

impl Readiness {
    pub fn new(registry: Arc<SyncStatus>) -> Self {
        Readiness {
            listeners_bound: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            registry,
        }
    }

    /// `Ok` when ready (with a note when the snapshot served is stale), otherwise the reason.
    pub fn check(&self) -> Result<Option<String>, String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if !self.listeners_bound.load(Ordering::Relaxed) {
            return Err("listeners not bound yet".into());
        }
        let error = self.registry.last_error();
        let why = |e: &Option<std::sync::Arc<String>>| match e {
            Some(e) => format!(": {e}"),
            None => String::new(),
        };
        if !self.registry.is_synced() {
            return Err(format!("registry not synced yet{}", why(&error)));
        }
        if !self.registry.is_connected() {
            // A stale snapshot still serves (DNS and proxies keep answering), and says so.
            return Ok(Some(format!(
                "serving a snapshot last confirmed {}s ago; registry store not connected{}",
                self.registry.snapshot_age().as_secs(),
                why(&error)
            )));
        }
        Ok(None)
    }
}
