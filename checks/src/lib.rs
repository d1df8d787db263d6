//! Active health checks for this daemon's own registrations.
//!
//! A registration with a `check` gets one task that probes it every `interval` (TCP connect,
//! HTTP `GET path` answered 2xx/3xx, or the gRPC health protocol `grpc.health.v1.Health/Check`
//! answered `SERVING`, each bounded by `timeout`). Until a verdict is recorded the instance is
//! `pending` (not served: the lease keeper writes it so); its first check runs as soon as this
//! daemon's snapshot shows the registration, and its first pass records `healthy` at once (as
//! Envoy, which needs one success for a host awaiting its first check). After that, after
//! `unhealthy_threshold` failures in a row the verdict `unhealthy` is recorded; after
//! `healthy_threshold` passes, `healthy` again. The store is written only when the effective
//! state changes — never once per check — and DNS and the proxies, which serve only healthy
//! instances, follow.
//!
//! The outside world sits behind two small traits so the thresholds are unit-tested with paused
//! time: [`Probe`] (what a check does on the network) and [`Verdicts`] (where verdicts go: the
//! lease keeper). Check tasks live in a `JoinSet` owned by [`run`], which stops them all on
//! cancellation.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use prometheus::{IntCounterVec, Opts};
use svcd_config::{CheckKind, CheckSpec, State};
use svcd_registry::{InstanceKey, LeaseKeeper, OwnRegistration, StoreError};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use svcd_registry::error_text::with_causes;
use svcd_registry::ServiceName;

/// One probe of a check target: `Ok` passes, `Err` says why it failed.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    async fn probe(&self, spec: &CheckSpec, addr: SocketAddr) -> Result<(), String>;
}

/// Where registrations to check come from and where verdicts go.
#[async_trait]
pub trait Verdicts: Send + Sync + 'static {
    async fn owned(&self) -> Vec<OwnRegistration>;
    /// Records a verdict; `Ok(true)` when the effective state changed.
    async fn set_health(
        &self,
        key: &InstanceKey,
        state: State,
        reason: String,
    ) -> Result<bool, StoreError>;
}

#[async_trait]
impl Verdicts for LeaseKeeper {
    async fn owned(&self) -> Vec<OwnRegistration> {
        LeaseKeeper::owned(self).await
    }
    async fn set_health(
        &self,
        key: &InstanceKey,
        state: State,
        reason: String,
    ) -> Result<bool, StoreError> {
        LeaseKeeper::set_health(self, key, state, reason).await
    }
}

/// What a running check task was started for; a change restarts it.
#[derive(PartialEq)]
struct Target {
    spec: CheckSpec,
    addr: SocketAddr,
}

/// `svcd_health_checks_total{service,result}`; a service's series go when its last check does.
#[derive(Clone)]
pub struct CheckMetrics {
    checks: IntCounterVec,
}

impl CheckMetrics {
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let checks = IntCounterVec::new(
            Opts::new(
                "svcd_health_checks_total",
                "Active health checks run, by service and result.",
            ),
            &["service", "result"],
        )?;
        registry.register(Box::new(checks.clone()))?;
        Ok(CheckMetrics { checks })
    }

    fn forget(&self, service: &str) {
        for result in ["pass", "fail"] {
            let _ = self.checks.remove_label_values(&[service, result]);
        }
    }
}

/// Keeps one check task per checked registration until `cancel`. The registrations are read
/// every 500 ms and whenever `changes` fires (every snapshot this daemon publishes: a new
/// registration is checked as soon as it is visible here, not up to a tick later).
pub async fn run(
    verdicts: Arc<dyn Verdicts>,
    probe: Arc<dyn Probe>,
    metrics: CheckMetrics,
    mut changes: watch::Receiver<i64>,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let mut running: HashMap<String, (ServiceName, Target, AbortHandle)> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    // Cleared when the publisher is gone; the tick goes on.
    let mut changes_open = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            changed = changes.changed(), if changes_open => changes_open = changed.is_ok(),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        }
        let mut wanted: HashMap<String, (InstanceKey, Target)> = HashMap::new();
        for reg in verdicts.owned().await {
            let Some(spec) = reg.instance.check.clone() else {
                continue;
            };
            let Some(port) = spec.target_port(&reg.instance.ports) else {
                continue;
            };
            let addr = SocketAddr::new(reg.instance.ip, port);
            wanted.insert(reg.key.to_key(), (reg.key, Target { spec, addr }));
        }
        let mut stopped = Vec::new();
        running.retain(|key, (service, target, task)| {
            let keep = wanted.get(key).is_some_and(|(_, t)| t == target);
            if !keep {
                task.abort();
                stopped.push(service.clone());
            }
            keep
        });
        for (key, (instance_key, target)) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let service = ServiceName::new(&instance_key.service, &instance_key.namespace);
            let counters =
                ["pass", "fail"].map(|r| metrics.checks.with_label_values(&[service.as_str(), r]));
            let task = tasks.spawn(check_loop(
                verdicts.clone(),
                probe.clone(),
                instance_key,
                target.spec.clone(),
                target.addr,
                counters,
            ));
            running.insert(key, (service, target, task));
        }
        // A service whose last check stopped loses its series.
        for service in stopped {
            if !running.values().any(|(s, _, _)| *s == service) {
                metrics.forget(service.as_str());
            }
        }
    }
    tasks.shutdown().await;
}

/// The probe the daemon uses: real TCP connects, HTTP GETs and gRPC health calls.
pub struct NetworkProbe {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl Default for NetworkProbe {
    fn default() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        NetworkProbe {
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector),
        }
    }
}

#[async_trait]
impl Probe for NetworkProbe {
    async fn probe(&self, spec: &CheckSpec, addr: SocketAddr) -> Result<(), String> {
        let limit = spec.timeout();
        match spec.kind {
            CheckKind::Tcp => match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("tcp connect {addr}: {e}")),
                Err(_) => Err(format!("tcp connect {addr}: timed out after {limit:?}")),
            },
            CheckKind::Grpc => match timeout(limit, grpc_check(addr)).await {
                Ok(result) => result,
                Err(_) => Err(format!("grpc health {addr}: timed out after {limit:?}")),
            },
            CheckKind::Http => {
                let host = match addr.ip() {
                    IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
                    IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
                };
                let uri = format!("http://{host}{}", spec.path);
                let uri: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
                match timeout(limit, self.http.get(uri.clone())).await {
                    Ok(Ok(resp))
                        if resp.status().is_success() || resp.status().is_redirection() =>
                    {
                        Ok(())
                    }
                    Ok(Ok(resp)) => Err(format!("GET {uri}: {}", resp.status())),
                    Ok(Err(e)) => Err(format!("GET {uri}: {}", client_failure(&e))),
                    Err(_) => Err(format!("GET {uri}: timed out after {limit:?}")),
                }
            }
        }
    }
}

/// `grpc.health.v1.Health/Check` for the whole server (empty service name) through tonic-health:
/// passes when the call succeeds and says `SERVING`.
async fn grpc_check(addr: SocketAddr) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc health {addr}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("grpc health {addr}: {}", with_causes(&e)))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("grpc health {addr}: {:?}: {}", s.code(), s.message()))?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!(
            "grpc health {addr}: status {}",
            other.as_str_name()
        )),
    }
}

/// Why an HTTP check's request failed, as the TCP check says it: hyper-util's error reads only
/// `client error (Connect)`; the cause (`Connection refused`, a reset) is in its sources.
fn client_failure(e: &hyper_util::client::legacy::Error) -> String {
    let stage = if e.is_connect() { "connect" } else { "request" };
    match std::error::Error::source(e) {
        Some(cause) => format!("{stage}: {}", with_causes(cause)),
        None => format!("{stage}: {e}"),
    }
}

async fn check_loop(
    keeper: Arc<dyn Verdicts>,
    probe: Arc<dyn Probe>,
    key: InstanceKey,
    spec: CheckSpec,
    addr: SocketAddr,
    [passed, failed]: [prometheus::IntCounter; 2],
) {
    let (mut passes, mut fails) = (0u32, 0u32);
    // The verdict this task last recorded; `None`: none yet, the instance is pending.
    let mut recorded: Option<State> = None;
    // The first tick is immediate: the first check runs at once.
    let mut interval = tokio::time::interval(spec.interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let verdict = match probe.probe(&spec, addr).await {
            Ok(()) => {
                passed.inc();
                passes += 1;
                fails = 0;
                // A pending instance needs one pass; a judged one, the threshold.
                (recorded.is_none() || passes == spec.healthy_threshold)
                    .then_some((State::Healthy, String::new()))
            }
            Err(reason) => {
                failed.inc();
                fails += 1;
                passes = 0;
                (fails == spec.unhealthy_threshold).then_some((State::Unhealthy, reason))
            }
        };
        let Some((state, reason)) = verdict.filter(|(state, _)| recorded != Some(*state)) else {
            continue;
        };
        match keeper.set_health(&key, state, reason.clone()).await {
            Ok(changed) => {
                recorded = Some(state);
                match (changed, state) {
                    (true, State::Unhealthy) => warn!(instance = %key, %reason,
                        "health check failing: instance marked unhealthy"),
                    (true, _) => info!(instance = %key, "health check passing: instance healthy"),
                    (false, _) => {}
                }
            }
            Err(e) => {
                warn!(instance = %key, error = %e, "could not record health verdict; retrying on the next check");
                // Step back so the next check reaches the threshold again and retries.
                passes = passes.saturating_sub(1);
                fails = fails.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
