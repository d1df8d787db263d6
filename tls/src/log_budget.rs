//! Handshake failures are logged at a bounded rate: a flood of bad clients must not become a
//! flood of log lines (every failure is still counted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// At most [`LogBudget::PER_SECOND`] lines a second; the rest are dropped (and counted by the
/// caller's metrics). Two atomics, no lock: called on every failed handshake.
#[derive(Default)]
pub struct LogBudget {
    /// The second the count below belongs to.
    second: AtomicU64,
    /// Lines allowed so far in `second`.
    used: AtomicU64,
}

impl LogBudget {
    pub const PER_SECOND: u64 = 5;

    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        self.used.fetch_add(1, Ordering::Relaxed) < Self::PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_burst_is_cut_to_the_budget() {
        let budget = super::LogBudget::default();
        let allowed = (0..1000).filter(|_| budget.allow()).count() as u64;
        // A second boundary may fall inside the burst: at most two seconds' worth.
        assert!(allowed >= super::LogBudget::PER_SECOND, "{allowed}");
        assert!(allowed <= 2 * super::LogBudget::PER_SECOND, "{allowed}");
    }
}
