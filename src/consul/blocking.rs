//! The bound on parked blocking queries (`?index=`): each one holds a connection and a task for
//! up to its `wait`, so a client opening thousands must not grow the daemon without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{IntCounter, IntGauge, Opts, Registry};

/// Counts parked queries against `consul.max_blocking_queries`.
#[derive(Clone)]
pub struct BlockingSlots {
    /// Queries parked now; the gauge mirrors it (an atomic decides, so two racing queries
    /// cannot both take the last slot).
    parked: Arc<AtomicUsize>,
    /// `svcd_consul_blocking_queries`.
    gauge: IntGauge,
    /// `svcd_consul_blocking_refused_total`: queries answered 429 because every slot was taken.
    refused: IntCounter,
}

/// A taken slot; given back when dropped (the query answered or its client went away).
pub struct Slot {
    slots: BlockingSlots,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.parked.fetch_sub(1, Ordering::AcqRel);
        self.slots.gauge.dec();
    }
}

impl BlockingSlots {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = IntGauge::with_opts(Opts::new(
            "svcd_consul_blocking_queries",
            "Consul API blocking queries (?index=) waiting for a change now.",
        ))?;
        let refused = IntCounter::with_opts(Opts::new(
            "svcd_consul_blocking_refused_total",
            "Consul API blocking queries refused (429) because consul.max_blocking_queries were \
             already waiting.",
        ))?;
        registry.register(Box::new(gauge.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(BlockingSlots {
            parked: Arc::new(AtomicUsize::new(0)),
            gauge,
            refused,
        })
    }

    /// A slot if fewer than `limit` queries are parked; `None` (counted) otherwise.
    pub fn try_take(&self, limit: usize) -> Option<Slot> {
        let taken = self
            .parked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.refused.inc();
            return None;
        }
        self.gauge.inc();
        Some(Slot {
            slots: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_counted_and_given_back() {
        let slots = BlockingSlots::new(&Registry::new()).unwrap();
        let a = slots.try_take(2).unwrap();
        let _b = slots.try_take(2).unwrap();
        assert!(slots.try_take(2).is_none());
        assert_eq!(slots.refused.get(), 1);
        assert_eq!(slots.gauge.get(), 2);
        drop(a);
        assert_eq!(slots.gauge.get(), 1);
        assert!(slots.try_take(2).is_some());
    }
}
