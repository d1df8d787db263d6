//! Choosing an instance: round robin over the healthy set of the current snapshot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use svcd_registry::{Endpoint, ServiceEndpoints};

/// Round-robin position of one listener. `Relaxed`: only the spread matters, not ordering with
/// other memory.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

/// The port to use on `endpoint`: the named one, or its only port when none is named.
#[inline]
pub fn port_of(endpoint: &Endpoint, name: Option<&str>) -> Option<u16> {
    match name {
        Some(name) => endpoint.port(name),
        None if endpoint.ports.len() == 1 => Some(endpoint.ports[0].1),
        None => None,
    }
}

impl RoundRobin {
    /// Up to `attempts` distinct candidates in round-robin order, starting at the next position:
    /// the first is the pick, the rest are where to go if it refuses. Endpoints without the port
    /// are skipped. No allocation: the iterator borrows the snapshot's slice.
    pub fn candidates<'s>(
        &self,
        service: &'s ServiceEndpoints,
        port: Option<&'s str>,
        attempts: usize,
    ) -> impl Iterator<Item = (&'s Arc<Endpoint>, u16)> + 's {
        let healthy = &service.healthy;
        let n = healthy.len();
        // Empty-set guard: no modulo by zero, no candidates.
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n)
            .map(move |k| &healthy[(start + k) % n])
            .filter_map(move |e| port_of(e, port).map(|p| (e, p)))
            .take(attempts)
    }
}
