//! HTTP/2 streams the client cancels before their answer: counted, kept from reaching an
//! instance when the cancel came first, and a connection that cancels most of its streams is
//! closed ("rapid reset", CVE-2023-44487).
//!
//! hyper runs each stream's handler in a task of its own and drops the handler when it sees the
//! client's `RST_STREAM` — but it polls the handler before it looks, so a stream whose reset
//! arrived in the same read as its request would still be sent upstream, over a new connection
//! when none is idle. [`Stream::begin`] therefore yields once before anything is sent: hyper
//! then sees the reset and drops the handler with nothing written. Each dropped handler is
//! counted, and the connection's [`StreamLedger`] applies Envoy's premature-reset rule: once
//! half of [`PREMATURE_RESET_LIMIT`] streams were cancelled early, or later at least half of all
//! streams, the connection is sent GOAWAY. Upstream connections opened for one client connection
//! are so bounded by its concurrent streams (a dropped handler closes the connect it started)
//! plus the streams it may cancel before the rule closes it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::Notify;

use super::metrics::HttpMetrics;

/// Envoy's `overload.premature_reset_total_stream_count` default: the rule looks at the share
/// of cancelled streams once this many have been opened, and trips before that at half of it.
pub const PREMATURE_RESET_LIMIT: u32 = 500;

/// One client connection's streams.
#[derive(Default)]
pub struct StreamLedger {
    /// Streams whose handler started.
    opened: AtomicU32,
    /// Of those, dropped before their response head was ready: the client reset them.
    cancelled: AtomicU32,
    /// Set once the rule tripped, so the GOAWAY and the count happen once.
    tripped: AtomicBool,
    /// Wakes the connection's task to send GOAWAY. (A `Notify` keeps the permit if the task
    /// is busy elsewhere when the rule trips.)
    flood: Notify,
}

impl StreamLedger {
    /// Resolves once the connection cancelled too many streams.
    pub async fn flooded(&self) {
        self.flood.notified().await
    }

    fn cancel(&self, metrics: &HttpMetrics) {
        metrics.streams_cancelled.inc();
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let opened = self.opened.load(Ordering::Relaxed);
        let over = if opened < PREMATURE_RESET_LIMIT {
            cancelled >= PREMATURE_RESET_LIMIT / 2
        } else {
            cancelled.saturating_mul(2) >= opened
        };
        if over && !self.tripped.swap(true, Ordering::Relaxed) {
            metrics.reset_floods.inc();
            self.flood.notify_one();
        }
    }
}

/// One HTTP/2 stream's handler, from its start to its response head; dropped before that, the
/// stream counts as cancelled.
pub struct Stream<'a> {
    ledger: &'a StreamLedger,
    metrics: &'a HttpMetrics,
    answered: bool,
}

impl<'a> Stream<'a> {
    /// Counts the stream, then yields once so that hyper looks for a reset that already arrived
    /// before the handler sends anything.
    pub async fn begin(ledger: &'a StreamLedger, metrics: &'a HttpMetrics) -> Stream<'a> {
        ledger.opened.fetch_add(1, Ordering::Relaxed);
        let stream = Stream {
            ledger,
            metrics,
            answered: false,
        };
        tokio::task::yield_now().await;
        stream
    }

    /// The response head is ready: the stream was not cancelled early.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.ledger.cancel(self.metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> std::sync::Arc<HttpMetrics> {
        HttpMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    fn run(ledger: &StreamLedger, m: &HttpMetrics, answered: bool) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = rt.block_on(Stream::begin(ledger, m));
        if answered {
            s.answered();
        }
    }

    #[test]
    fn a_connection_that_cancels_half_its_streams_trips_once() {
        let m = metrics();
        let ledger = StreamLedger::default();
        for _ in 0..PREMATURE_RESET_LIMIT / 2 - 1 {
            run(&ledger, &m, false);
        }
        assert!(!ledger.tripped.load(Ordering::Relaxed));
        run(&ledger, &m, false);
        assert!(ledger.tripped.load(Ordering::Relaxed));
        for _ in 0..10 {
            run(&ledger, &m, false);
        }
        assert_eq!(m.reset_floods.get(), 1);
        assert_eq!(
            m.streams_cancelled.get(),
            u64::from(PREMATURE_RESET_LIMIT / 2 + 10)
        );
    }

    #[test]
    fn answered_streams_keep_a_busy_connection_open() {
        let m = metrics();
        let ledger = StreamLedger::default();
        // Two answered for each cancelled, well past the limit: never trips.
        for _ in 0..PREMATURE_RESET_LIMIT * 2 {
            run(&ledger, &m, true);
            run(&ledger, &m, true);
            run(&ledger, &m, false);
        }
        assert!(!ledger.tripped.load(Ordering::Relaxed));
        assert_eq!(m.reset_floods.get(), 0);
    }
}
