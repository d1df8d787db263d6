//! Active health checks for this daemon's own registrations.
//!
//! A registration with a `check` gets one task that probes it every `interval` (TCP connect, or
//! HTTP `GET path` answered 2xx/3xx, each bounded by `timeout`). After `unhealthy_threshold`
//! failures in a row the lease keeper records an `unhealthy` verdict; after `healthy_threshold`
//! passes, `healthy` again. The store is written only when the effective state changes — never
//! once per check — and DNS and the proxies, which serve only healthy instances, follow.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounterVec, Opts};
use svcd_config::{CheckKind, CheckSpec, State};
use svcd_registry::{InstanceKey, LeaseKeeper};
use tokio::task::AbortHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// What a running check task was started for; a change restarts it.
#[derive(PartialEq)]
struct Target {
    spec: CheckSpec,
    addr: SocketAddr,
}

/// Keeps one check task per checked registration until `cancel`.
pub async fn run(
    keeper: Arc<LeaseKeeper>,
    prometheus: prometheus::Registry,
    cancel: CancellationToken,
) {
    let checks = match IntCounterVec::new(
        Opts::new(
            "svcd_health_checks_total",
            "Active health checks run, by service and result.",
        ),
        &["service", "result"],
    ) {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "health check metrics"),
    };
    if let Err(e) = prometheus.register(Box::new(checks.clone())) {
        return warn!(error = %e, "health check metrics");
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut running: HashMap<String, (Target, AbortHandle)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let owned = keeper.owned().await;
        let mut wanted: HashMap<String, (InstanceKey, Target)> = HashMap::new();
        for reg in owned {
            let Some(spec) = reg.instance.check.clone() else {
                continue;
            };
            let Some(port) = spec.target_port(&reg.instance.ports) else {
                continue;
            };
            let addr = SocketAddr::new(reg.instance.ip, port);
            wanted.insert(reg.key.to_key(), (reg.key, Target { spec, addr }));
        }
        running.retain(|key, (target, task)| {
            let keep = wanted.get(key).is_some_and(|(_, t)| t == target);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (instance_key, target)) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let service = format!("{}.{}", instance_key.service, instance_key.namespace);
            let task = tokio::spawn(check_loop(
                keeper.clone(),
                instance_key,
                target.spec.clone(),
                target.addr,
                http.clone(),
                [
                    checks.with_label_values(&[&service, "pass"]),
                    checks.with_label_values(&[&service, "fail"]),
                ],
            ))
            .abort_handle();
            running.insert(key, (target, task));
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

async fn probe(spec: &CheckSpec, addr: SocketAddr, http: &HttpClient) -> Result<(), String> {
    let limit = spec.timeout();
    match spec.kind {
        CheckKind::Tcp => match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp connect {addr}: {e}")),
            Err(_) => Err(format!("tcp connect {addr}: timed out after {limit:?}")),
        },
        CheckKind::Http | CheckKind::Grpc => {
            let host = match addr.ip() {
                IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
                IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
            };
            let uri = format!("http://{host}{}", spec.path);
            let uri: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
            match timeout(limit, http.get(uri.clone())).await {
                Ok(Ok(resp)) if resp.status().is_success() || resp.status().is_redirection() => {
                    Ok(())
                }
                Ok(Ok(resp)) => Err(format!("GET {uri}: {}", resp.status())),
                Ok(Err(e)) => Err(format!("GET {uri}: {e}")),
                Err(_) => Err(format!("GET {uri}: timed out after {limit:?}")),
            }
        }
    }
}

async fn check_loop(
    keeper: Arc<LeaseKeeper>,
    key: InstanceKey,
    spec: CheckSpec,
    addr: SocketAddr,
    http: HttpClient,
    [passed, failed]: [prometheus::IntCounter; 2],
) {
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut interval = tokio::time::interval(spec.interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let verdict = match probe(&spec, addr, &http).await {
            Ok(()) => {
                passed.inc();
                passes += 1;
                fails = 0;
                (passes == spec.healthy_threshold).then_some((State::Healthy, String::new()))
            }
            Err(reason) => {
                failed.inc();
                fails += 1;
                passes = 0;
                (fails == spec.unhealthy_threshold).then_some((State::Unhealthy, reason))
            }
        };
        let Some((state, reason)) = verdict else {
            continue;
        };
        match keeper.set_health(&key, state).await {
            Ok(true) if state == State::Unhealthy => {
                warn!(instance = %key, %reason, "health check failing: instance marked unhealthy")
            }
            Ok(true) => info!(instance = %key, "health check passing: instance healthy again"),
            Ok(false) => {}
            Err(e) => {
                warn!(instance = %key, error = %e, "could not record health verdict; retrying on the next check");
                // Step back so the next check reaches the threshold again and retries.
                passes = passes.saturating_sub(1);
                fails = fails.saturating_sub(1);
            }
        }
    }
}
