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

    /// `Ok` when ready, otherwise the reason.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down");
        }
        if !self.listeners_bound.load(Ordering::Relaxed) {
            return Err("listeners not bound yet");
        }
        if !self.registry.is_synced() {
            return Err("registry not synced yet");
        }
        Ok(())
    }
}
