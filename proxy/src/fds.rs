//! The descriptor budget: what the proxies may hold open, so a flood on them can never take the
//! descriptors the admin API and DNS need.
//!
//! The daemon lifts the soft `RLIMIT_NOFILE` to the hard limit at start; the budget is that limit
//! minus a reserve (an eighth of it, at least 128, at most half). Every descriptor the proxies
//! hold for a client — a TCP connection and its upstream (2), an HTTP client connection (1), a
//! UDP flow's upstream socket (1) — takes a permit first; none left means the connection is
//! closed at once or the flow refused, and counted. The admin API and DNS take no permits: the
//! reserve is theirs. And no one listener may hold more than half of the budget
//! ([`ListenerShare`]), so a flood on one listener always leaves the others room; per-listener
//! settings (`proxy.max_connections`, a UDP listener's `max_flows`) bound it further.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct FdBudget {
    /// Descriptors the proxies may hold at once.
    limit: usize,
    /// Held now. `Relaxed` suffices: only the count matters, and an overshoot by a racing
    /// acquire is undone at once.
    used: AtomicUsize,
    in_use: IntGauge,
    refusals: IntCounterVec,
}

/// What one listener holds of the budget, against its share (half the budget).
#[derive(Default)]
pub struct ListenerShare {
    used: AtomicUsize,
}

impl ListenerShare {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Descriptors held for one connection or flow; given back when dropped.
pub struct FdPermit {
    budget: Arc<FdBudget>,
    share: Arc<ListenerShare>,
    n: usize,
}

impl Drop for FdPermit {
    fn drop(&mut self) {
        self.share.used.fetch_sub(self.n, Ordering::Relaxed);
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
        self.budget.in_use.sub(self.n as i64);
    }
}

/// The reserve kept for the admin API, DNS and the registry out of `limit` descriptors.
pub fn reserve_for(limit: usize) -> usize {
    (limit / 8).max(128).min(limit / 2)
}

impl FdBudget {
    /// The budget under the process's current soft `RLIMIT_NOFILE`.
    pub fn from_rlimit(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        use nix::sys::resource::{getrlimit, Resource};
        let limit = getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft as usize)
            .unwrap_or(1024);
        Self::new(limit - reserve_for(limit), registry)
    }

    pub fn new(limit: usize, registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let budget = FdBudget {
            limit,
            used: AtomicUsize::new(0),
            in_use: IntGauge::new(
                "svcd_proxy_descriptors_in_use",
                "Descriptors the proxies hold for clients and their upstreams (against \
                 svcd_proxy_descriptor_limit).",
            )?,
            refusals: IntCounterVec::new(
                Opts::new(
                    "svcd_proxy_descriptor_refusals_total",
                    "Connections closed at accept, or UDP flows refused, because the proxies' \
                     descriptor budget was spent, by listener.",
                ),
                &["listener"],
            )?,
        };
        let limit_gauge = IntGauge::new(
            "svcd_proxy_descriptor_limit",
            "Descriptors the proxies may hold: RLIMIT_NOFILE less the reserve kept for the \
             admin API and DNS.",
        )?;
        limit_gauge.set(limit as i64);
        registry.register(Box::new(budget.in_use.clone()))?;
        registry.register(Box::new(budget.refusals.clone()))?;
        registry.register(Box::new(limit_gauge))?;
        Ok(Arc::new(budget))
    }

    /// A budget registered nowhere (unit tests, benchmarks).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX / 2, &Registry::new()).expect("fresh registry")
    }

    /// `n` descriptors for a connection or flow of the listener holding `share`, if the budget
    /// has them and the listener stays within half of it.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>, share: &Arc<ListenerShare>, n: usize) -> Option<FdPermit> {
        let mine = share.used.fetch_add(n, Ordering::Relaxed);
        if mine + n > self.limit / 2 {
            share.used.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            share.used.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        self.in_use.add(n as i64);
        Some(FdPermit {
            budget: self.clone(),
            share: share.clone(),
            n,
        })
    }

    /// The refusal counter of one listener (`tcp/<addr>`, `udp/<addr>`, `http/<addr>`).
    pub fn refusals(&self, listener: &str) -> IntCounter {
        self.refusals.with_label_values(&[listener])
    }

    /// Drops a removed listener's refusal series.
    pub fn forget(&self, listener: &str) {
        let _ = self.refusals.remove_label_values(&[listener]);
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_bounded_per_listener_and_overall_and_given_back() {
        let b = FdBudget::new(6, &Registry::new()).unwrap();
        let (x, y, z) = (
            ListenerShare::new(),
            ListenerShare::new(),
            ListenerShare::new(),
        );
        let x2 = b.try_acquire(&x, 2).unwrap();
        assert!(b.try_acquire(&x, 2).is_none(), "x may hold half (3)");
        let x1 = b.try_acquire(&x, 1).unwrap();
        let y3 = b.try_acquire(&y, 3).unwrap();
        assert!(b.try_acquire(&z, 1).is_none(), "all 6 held");
        assert_eq!((b.used(), x.used(), y.used(), z.used()), (6, 3, 3, 0));
        drop(x2);
        assert_eq!((b.used(), x.used()), (4, 1));
        assert!(b.try_acquire(&z, 2).is_some());
        drop((x1, y3));
    }

    #[test]
    fn the_reserve() {
        assert_eq!(reserve_for(20_000), 2_500);
        assert_eq!(reserve_for(400), 128);
        assert_eq!(reserve_for(100), 50);
    }
}
