//! `LeaseKeeper`: this daemon's own registrations, held under one lease.
//!
//! Every key svcd writes is attached to the lease, so when this process or its machine dies,
//! nobody keeps the lease alive and the entries vanish after the TTL. While alive, the keeper
//! refreshes the lease every TTL/3; if the store says the lease is gone (expired during a
//! partition, or revoked), it grants a new one and re-puts every registration it owns. When the
//! sync loop finds the store wiped or replaced it does so at once, not at the next keep-alive.
//!
//! Registrations may carry their own expiry (`svcd exec` uses it): the holder must renew within
//! that time or the keeper deletes the entry — so a registering client that dies without
//! deregistering is removed even though this daemon lives on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use svcd_config::Instance;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::keys::InstanceKey;
use crate::metrics::RegistryMetrics;
use crate::store::{LeaseId, Store, StoreError, StoreResult};

/// One registration held by this daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnRegistration {
    pub key: InstanceKey,
    pub instance: Instance,
    /// The client must renew (re-register) before this; `None` = held until deregistered.
    pub expires: Option<(Duration, Instant)>,
    /// Whether the current value is known to be in the store under the current lease.
    pub written: bool,
    /// The active health check's verdict, if the registration has a check: an `Unhealthy`
    /// verdict overrides a registered `healthy` state (a registered `draining` always wins), and
    /// with no verdict yet a checked `healthy` registration is `pending` (not served).
    /// Kept apart from `instance` so a client renewing its registration cannot undo it. With
    /// the verdict, why (the last failing check's error), written as the instance's `reason`.
    pub health: Option<(svcd_config::State, String)>,
}

impl OwnRegistration {
    /// The value written to the store: the registration with the health verdict applied.
    pub fn effective(&self) -> Instance {
        use svcd_config::State;
        let mut instance = self.instance.clone();
        if instance.state == State::Healthy {
            match &self.health {
                Some((State::Unhealthy, reason)) => {
                    instance.state = State::Unhealthy;
                    instance.reason = Some(reason.clone());
                }
                None if instance.check.is_some() => instance.state = State::Pending,
                _ => {}
            }
        }
        instance
    }
}

/// How long a write on behalf of the API (register, state change, deregister, drain of
/// everything) may take in all before it fails as unavailable: what `docs/registry.md` promises.
pub const WRITE_BOUND: Duration = Duration::from_secs(4);

struct KeeperState {
    lease: Option<LeaseId>,
    own: BTreeMap<String, OwnRegistration>,
}

pub struct LeaseKeeper {
    store: Arc<dyn Store>,
    ttl: Duration,
    /// A tokio mutex: lease grant and puts must not interleave with a concurrent re-grant, and the
    /// critical section awaits the store. Only registration traffic takes it, never queries.
    state: Mutex<KeeperState>,
    metrics: RegistryMetrics,
}

impl LeaseKeeper {
    pub fn new(store: Arc<dyn Store>, ttl: Duration, metrics: RegistryMetrics) -> Self {
        LeaseKeeper {
            store,
            ttl,
            state: Mutex::new(KeeperState {
                lease: None,
                own: BTreeMap::new(),
            }),
            metrics,
        }
    }

    /// Adds registrations to be written by [`Self::run`] (static config entries): no store call
    /// here, so start-up does not depend on the store being reachable.
    pub async fn adopt(&self, entries: impl IntoIterator<Item = (InstanceKey, Instance)>) {
        let mut state = self.state.lock().await;
        for (key, instance) in entries {
            state.own.insert(
                key.to_key(),
                OwnRegistration {
                    key,
                    instance,
                    expires: None,
                    written: false,
                    health: None,
                },
            );
        }
        self.metrics.own_registrations.set(state.own.len() as i64);
    }

    /// Registers (or renews) an instance and writes it to the store. Re-registering an identical
    /// value only renews its expiry: no store write, no watch event across the cluster. Within
    /// [`WRITE_BOUND`].
    pub async fn register(
        &self,
        key: InstanceKey,
        instance: Instance,
        expires_after: Option<Duration>,
    ) -> StoreResult<()> {
        self.bounded(self.write_registration(key, instance, expires_after))
            .await
    }

    async fn write_registration(
        &self,
        key: InstanceKey,
        instance: Instance,
        expires_after: Option<Duration>,
    ) -> StoreResult<()> {
        let mut state = self.state.lock().await;
        let store_key = key.to_key();
        let expires = expires_after.map(|d| (d, Instant::now() + d));
        let mut health = None;
        if let Some(existing) = state.own.get_mut(&store_key) {
            if existing.instance == instance && existing.written {
                existing.expires = expires;
                return Ok(());
            }
            // Same check (or none) as before: its verdict still holds.
            if existing.instance.check == instance.check {
                health = existing.health.clone();
            }
        }
        let reg = OwnRegistration {
            key,
            instance,
            expires,
            written: true,
            health,
        };
        let lease = self.ensure_lease(&mut state).await?;
        let value = reg.effective().to_json();
        match self.store.put(&store_key, value.clone(), Some(lease)).await {
            Err(StoreError::LeaseNotFound(_)) => {
                state.lease = None;
                let lease = self.ensure_lease(&mut state).await?;
                self.store.put(&store_key, value, Some(lease)).await?;
            }
            other => {
                other?;
            }
        }
        state.own.insert(store_key, reg);
        self.metrics.own_registrations.set(state.own.len() as i64);
        Ok(())
    }

    /// Records a health-check verdict; writes the registration only when its effective state
    /// changes (no store write per check). Returns whether it changed.
    pub async fn set_health(
        &self,
        key: &InstanceKey,
        verdict: svcd_config::State,
        reason: String,
    ) -> StoreResult<bool> {
        let mut state = self.state.lock().await;
        let store_key = key.to_key();
        let Some(reg) = state.own.get_mut(&store_key) else {
            return Ok(false);
        };
        let before = reg.effective();
        reg.health = Some((verdict, reason));
        let after = reg.effective();
        if before == after {
            return Ok(false);
        }
        // Until the put succeeds the keeper's rounds write it (a failed put is not lost: the
        // next verdict is the same and would write nothing).
        reg.written = false;
        let lease = self.ensure_lease(&mut state).await?;
        self.store
            .put(&store_key, after.to_json(), Some(lease))
            .await?;
        if let Some(reg) = state.own.get_mut(&store_key) {
            reg.written = true;
        }
        Ok(true)
    }

    /// Changes the serving state of one of this daemon's registrations (drain: `Draining`) and
    /// writes it. `None` when this daemon does not hold the registration: only the holder of an
    /// entry's lease may rewrite it. Within [`WRITE_BOUND`].
    pub async fn set_state(
        &self,
        key: &InstanceKey,
        new_state: svcd_config::State,
    ) -> StoreResult<Option<Instance>> {
        self.bounded(self.write_state(key, new_state)).await
    }

    async fn write_state(
        &self,
        key: &InstanceKey,
        new_state: svcd_config::State,
    ) -> StoreResult<Option<Instance>> {
        let mut state = self.state.lock().await;
        let store_key = key.to_key();
        let Some(reg) = state.own.get(&store_key) else {
            return Ok(None);
        };
        if reg.instance.state == new_state {
            return Ok(Some(reg.instance.clone()));
        }
        let mut instance = reg.instance.clone();
        instance.state = new_state;
        let lease = self.ensure_lease(&mut state).await?;
        self.store
            .put(&store_key, instance.to_json(), Some(lease))
            .await?;
        if let Some(reg) = state.own.get_mut(&store_key) {
            reg.instance = instance.clone();
            reg.written = true;
        }
        Ok(Some(instance))
    }

    /// Removes a registration from the store. Returns whether it existed (here or in the store).
    /// Within [`WRITE_BOUND`].
    pub async fn deregister(&self, key: &InstanceKey) -> StoreResult<bool> {
        self.bounded(async {
            let mut state = self.state.lock().await;
            let store_key = key.to_key();
            let owned = state.own.remove(&store_key).is_some();
            self.metrics.own_registrations.set(state.own.len() as i64);
            let deleted = self.store.delete(&store_key).await?;
            Ok(owned || deleted)
        })
        .await
    }

    /// Marks every registration this daemon holds `draining` in the store (shutdown: other nodes
    /// stop sending new work before this one stops serving). Returns the ones written. All of
    /// it within [`WRITE_BOUND`].
    pub async fn drain_all(&self) -> StoreResult<Vec<InstanceKey>> {
        self.bounded(async {
            let keys: Vec<InstanceKey> = self
                .state
                .lock()
                .await
                .own
                .values()
                .filter(|r| r.instance.state != svcd_config::State::Draining)
                .map(|r| r.key.clone())
                .collect();
            for key in &keys {
                self.write_state(key, svcd_config::State::Draining).await?;
            }
            Ok(keys)
        })
        .await
    }

    /// `op` (a write on behalf of the API), failing as unavailable past [`WRITE_BOUND`], the
    /// wait for other writes included. A write cut short may still have reached the store, as
    /// any write whose answer is lost: the caller learns it failed and may repeat it.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(WRITE_BOUND, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: write not done within {WRITE_BOUND:?}",
                self.store.describe()
            ))),
        }
    }

    /// The value this daemon wrote (or will write) for `key`: the registration with its health
    /// verdict applied. `None` if it holds no such registration.
    pub async fn effective(&self, key: &InstanceKey) -> Option<Instance> {
        self.state
            .lock()
            .await
            .own
            .get(&key.to_key())
            .map(OwnRegistration::effective)
    }

    pub async fn owned(&self) -> Vec<OwnRegistration> {
        self.state.lock().await.own.values().cloned().collect()
    }

    async fn ensure_lease(&self, state: &mut KeeperState) -> StoreResult<LeaseId> {
        if let Some(id) = state.lease {
            return Ok(id);
        }
        let id = self.store.grant(self.ttl).await?;
        self.metrics.lease_grants.inc();
        info!(lease = id, ttl = ?self.ttl, "granted registration lease");
        state.lease = Some(id);
        for reg in state.own.values_mut() {
            reg.written = false;
        }
        Ok(id)
    }

    /// Writes every registration not yet in the store under the current lease.
    async fn write_pending(&self, state: &mut KeeperState) -> StoreResult<()> {
        let lease = self.ensure_lease(state).await?;
        for reg in state.own.values_mut().filter(|r| !r.written) {
            self.store
                .put(&reg.key.to_key(), reg.effective().to_json(), Some(lease))
                .await?;
            reg.written = true;
        }
        Ok(())
    }

    /// Deletes registrations whose holder stopped renewing them.
    async fn expire_stale(&self, state: &mut KeeperState) -> StoreResult<()> {
        let now = Instant::now();
        let stale: Vec<String> = state
            .own
            .iter()
            .filter(|(_, r)| r.expires.is_some_and(|(_, at)| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            info!(%key, "registration not renewed in time; removing");
            self.store.delete(&key).await?;
            state.own.remove(&key);
        }
        self.metrics.own_registrations.set(state.own.len() as i64);
        Ok(())
    }

    /// Refreshes the lease, forgetting it when the store says it is gone. The state is not held
    /// meanwhile: a store that hangs holds up this round, not registrations.
    async fn refresh_lease(&self) -> StoreResult<()> {
        let Some(id) = self.state.lock().await.lease else {
            return Ok(());
        };
        if self.store.keep_alive(id).await?.is_none() {
            let mut state = self.state.lock().await;
            // Unless a registration re-granted meanwhile.
            if state.lease == Some(id) {
                warn!(
                    lease = id,
                    "registration lease gone; re-granting and re-registering"
                );
                state.lease = None;
            }
        }
        Ok(())
    }

    /// One keep-alive round: refresh, re-grant if gone, write what is pending, expire the stale.
    async fn tick(&self) -> StoreResult<()> {
        self.refresh_lease().await?;
        let mut state = self.state.lock().await;
        if !state.own.is_empty() || state.lease.is_some() {
            self.write_pending(&mut state).await?;
        }
        self.expire_stale(&mut state).await
    }

    /// The store was found wiped or replaced: whatever it holds of ours (likely nothing, maybe
    /// an old copy) is not to be trusted, so every registration is written again in the next
    /// round, under a new lease if the old one is gone.
    async fn store_replaced(&self) {
        let mut state = self.state.lock().await;
        for reg in state.own.values_mut() {
            reg.written = false;
        }
        if !state.own.is_empty() {
            info!(
                registrations = state.own.len(),
                "registry store replaced; writing this daemon's registrations again"
            );
        }
    }

    /// Keeps the lease alive until `cancel`, then revokes it (deleting this daemon's entries at
    /// once instead of after the TTL). Each change of `replacements` (the sync loop found the
    /// store wiped or replaced) starts a round at once that writes every registration again.
    pub async fn run(
        self: Arc<Self>,
        mut replacements: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        let period = self.ttl / 3;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                Ok(()) = replacements.changed() => self.store_replaced().await,
            }
            next = match self.tick().await {
                Ok(()) => Instant::now() + period,
                Err(e) => {
                    warn!(error = %e, "registration lease keep-alive failed; retrying");
                    Instant::now() + (period / 4).max(Duration::from_millis(200))
                }
            };
            // The shortest renewal window among registrations also bounds the period.
            let earliest = self
                .state
                .lock()
                .await
                .own
                .values()
                .filter_map(|r| r.expires.map(|(_, at)| at))
                .min();
            if let Some(at) = earliest {
                next = next.min(at.max(Instant::now() + Duration::from_millis(50)));
            }
        }
        self.revoke().await;
    }

    /// Revokes the lease (clean shutdown).
    pub async fn revoke(&self) {
        let mut state = self.state.lock().await;
        if let Some(id) = state.lease.take() {
            match tokio::time::timeout(Duration::from_secs(2), self.store.revoke(id)).await {
                Ok(Ok(())) => info!(lease = id, "revoked registration lease"),
                Ok(Err(e)) => {
                    warn!(lease = id, error = %e, "lease revoke failed; entries expire after the TTL")
                }
                Err(_) => warn!(
                    lease = id,
                    "lease revoke timed out; entries expire after the TTL"
                ),
            }
        }
    }
}
