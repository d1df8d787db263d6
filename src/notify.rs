//! systemd's service notification protocol, for `Type=notify` units: `READY=1` once `/readyz`
//! would answer 200 (the registry synced, every listener bound), `RELOADING=1` … `READY=1`
//! around a SIGHUP reload, `STOPPING=1` when the shutdown begins, and `WATCHDOG=1` at half the
//! unit's `WatchdogSec` from the main runtime (a stuck runtime misses its pings and systemd
//! restarts the daemon). Without `NOTIFY_SOCKET` every call does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use svcd_lifecycle::Phase;
use tracing::{debug, warn};

use crate::readiness::Readiness;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// Starts the tasks that say `READY=1` once ready and ping the watchdog while running.
pub fn spawn(readiness: Arc<Readiness>, phase: &Phase) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let until_ready = phase.token();
    phase.spawn(async move {
        loop {
            if readiness.check().is_ok() {
                send(&[NotifyState::Ready, NotifyState::Status("serving")]);
                debug!("told the service manager we are ready");
                return;
            }
            tokio::select! {
                _ = until_ready.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    if let Some(period) = sd_notify::watchdog_enabled() {
        let cancel = phase.token();
        phase.spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => send(&[NotifyState::Watchdog]),
                }
            }
        });
    }
}

/// A SIGHUP reload begins.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over (applied or rejected: either way the daemon serves).
pub fn reloaded() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}
