//! The one way every long-lived task and thread of svcd starts, is tracked and ends.
//!
//! The daemon's life is a few [`Phase`]s, stopped in order at shutdown (`src/daemon.rs` reads as
//! that list): the proxies drain first, then DNS and the admin API stop answering, then the
//! registry (watch, checks, balancer, lease) goes last, so requests in flight read a live
//! snapshot to the end. A phase owns
//!
//! - its **stop signal**, a `CancellationToken`; parts take child tokens ([`Phase::token`]), so a
//!   part can stop early (a listener a reload removed) without stopping the phase;
//! - everything **running in it**: async tasks spawned through it, on any runtime
//!   ([`Phase::spawn`], [`Phase::spawn_on`]), futures others spawn for it (hyper's executor,
//!   [`Phase::track`]), and OS threads ([`Phase::thread`]), which hold a tracker token until they
//!   return.
//!
//! [`Phase::stop`] cancels and waits for all of it; [`Phase::live`] counts what still runs (the
//! daemon logs it per phase at exit, and `tests/it/lifecycle.rs` asserts it is zero).
//!
//! ```text
//! Phase::new("proxy") ─ token() ─► accept loops, connections   ─┐
//!                     ─ thread() ─► worker threads (block_on)    ├─ stop(): cancel, wait, count
//!                     ─ spawn_on() ─► tasks on a worker runtime ─┘
//! ```

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::task_tracker::TrackedFuture;
use tokio_util::task::TaskTracker;

/// One stage of the daemon's life: its stop signal and everything running in it. Cloning gives
/// another handle on the same phase.
#[derive(Clone)]
pub struct Phase {
    /// For logs: which phase left something running.
    name: &'static str,
    /// Cancelled when the phase stops; parts hold children of it.
    token: CancellationToken,
    /// Every task and thread of the phase; counted until it ends.
    tracker: TaskTracker,
}

impl Phase {
    pub fn new(name: &'static str) -> Phase {
        Phase {
            name,
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A stop signal for one part: cancelled with the phase, or on its own before.
    pub fn token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Resolves when the phase stops.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_stopping(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Runs `task` on the current runtime, tracked.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `task` on `runtime` (a proxy worker's), tracked.
    pub fn spawn_on<F>(&self, task: F, runtime: &Handle) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(task, runtime)
    }

    /// `task`, counted in this phase until it completes or is dropped: for futures something
    /// else spawns (hyper's executor).
    pub fn track<F: Future>(&self, task: F) -> TrackedFuture<F> {
        self.tracker.track_future(task)
    }

    /// Starts an OS thread running `body`, counted in this phase until `body` returns. The body
    /// watches [`Phase::token`] (or a runtime blocked on it) to know when to end.
    pub fn thread<F>(&self, name: String, body: F) -> io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let running = self.tracker.token();
        std::thread::Builder::new().name(name).spawn(move || {
            let _running = running;
            body();
        })
    }

    /// Tasks and threads still running.
    pub fn live(&self) -> usize {
        self.tracker.len()
    }

    /// Signals the stop and waits until everything tracked has ended.
    pub async fn stop(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Lets what runs finish by itself for up to `grace` (nothing new should start: the caller
    /// has stopped accepting), then signals the stop and waits for the rest. Returns whether
    /// everything had ended within the grace.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        let ended = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        self.stop().await;
        ended
    }

    /// [`Phase::stop`], waiting at most `limit`: `Err(n)` with the `n` tasks and threads still
    /// running then (they are the caller's to abandon, and to log).
    pub async fn stop_within(&self, limit: Duration) -> Result<(), usize> {
        match tokio::time::timeout(limit, self.stop()).await {
            Ok(()) => Ok(()),
            Err(_) => {
                let left = self.live();
                tracing::warn!(phase = self.name, left, "phase did not end in time");
                Err(left)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn stop_waits_for_tasks_and_threads() {
        let phase = Phase::new("test");
        let token = phase.token();
        phase.spawn(async move { token.cancelled().await });
        let token = phase.token();
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        phase
            .thread("t".into(), move || {
                while !token.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                flag.store(true, Ordering::SeqCst);
            })
            .unwrap();
        assert_eq!(phase.live(), 2);
        phase.stop().await;
        assert_eq!(phase.live(), 0);
        assert!(
            ended.load(Ordering::SeqCst),
            "the thread ended before stop returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_within_reports_what_is_left() {
        let phase = Phase::new("test");
        phase.spawn(std::future::pending::<()>());
        let token = phase.token();
        phase.spawn(async move { token.cancelled().await });
        assert_eq!(phase.stop_within(Duration::from_secs(1)).await, Err(1));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_a_grace_then_stops() {
        let phase = Phase::new("test");
        phase.spawn(tokio::time::sleep(Duration::from_millis(10)));
        assert!(
            phase.drain(Duration::from_secs(1)).await,
            "ended within the grace"
        );
        let phase = Phase::new("test");
        let token = phase.token();
        phase.spawn(async move { token.cancelled().await });
        let started = tokio::time::Instant::now();
        assert!(
            !phase.drain(Duration::from_secs(1)).await,
            "stopped after the grace"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(phase.live(), 0);
    }

    #[test]
    fn a_part_may_stop_before_its_phase() {
        let phase = Phase::new("test");
        let part = phase.token();
        part.cancel();
        assert!(!phase.is_stopping());
        let other = phase.token();
        let phase2 = phase.clone();
        phase2.token.cancel();
        assert!(other.is_cancelled());
    }
}
