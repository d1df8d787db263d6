//! Active health checks for this daemon's own registrations.
//!
//! A registration with a `check` gets one task that probes it every `interval` (TCP connect,
//! HTTP `GET path` answered 2xx/3xx, or the gRPC health protocol `grpc.health.v1.Health/Check`
//! answered `SERVING` over h2c, each bounded by `timeout`). After `unhealthy_threshold`
//! failures in a row the lease keeper records an `unhealthy` verdict; after `healthy_threshold`
//! passes, `healthy` again. The store is written only when the effective state changes — never
//! once per check — and DNS and the proxies, which serve only healthy instances, follow.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
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
type GrpcClient = Client<HttpConnector, Full<Bytes>>;

/// The two clients checks use: HTTP/1.1 for `http`, h2c (prior knowledge) for `grpc`.
#[derive(Clone)]
struct Clients {
    http: HttpClient,
    grpc: GrpcClient,
}

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
    let clients = Clients {
        http: Client::builder(TokioExecutor::new()).build(connector.clone()),
        grpc: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector),
    };
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
                clients.clone(),
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

async fn probe(spec: &CheckSpec, addr: SocketAddr, clients: &Clients) -> Result<(), String> {
    let limit = spec.timeout();
    match spec.kind {
        CheckKind::Tcp => match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp connect {addr}: {e}")),
            Err(_) => Err(format!("tcp connect {addr}: timed out after {limit:?}")),
        },
        CheckKind::Grpc => match timeout(limit, grpc_check(addr, &clients.grpc)).await {
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
            match timeout(limit, clients.http.get(uri.clone())).await {
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

/// `grpc.health.v1.Health/Check` for the whole server (empty service name): passes when the
/// call ends with `grpc-status: 0` and the response says `SERVING`.
async fn grpc_check(addr: SocketAddr, client: &GrpcClient) -> Result<(), String> {
    let uri = format!("http://{addr}/grpc.health.v1.Health/Check");
    // One uncompressed gRPC message: flag 0, length 0 — an empty HealthCheckRequest.
    let request = http::Request::post(&uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .map_err(|e| format!("{uri}: {e}"))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("grpc health {addr}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("grpc health {addr}: HTTP {}", response.status()));
    }
    let headers_status = response.headers().get("grpc-status").cloned();
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("grpc health {addr}: {e}"))?;
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(headers_status);
    match status.as_ref().map(|s| s.as_bytes()) {
        Some(b"0") => {}
        Some(code) => {
            return Err(format!(
                "grpc health {addr}: grpc-status {}",
                String::from_utf8_lossy(code)
            ))
        }
        None => return Err(format!("grpc health {addr}: no grpc-status")),
    }
    match serving_status(&collected.to_bytes()) {
        Some(1) => Ok(()),
        Some(n) => Err(format!(
            "grpc health {addr}: status {}",
            match n {
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            }
        )),
        None => Err(format!("grpc health {addr}: malformed response")),
    }
}

/// The `status` (field 1, varint) of a length-prefixed HealthCheckResponse; absent = 0.
fn serving_status(frame: &[u8]) -> Option<u64> {
    let (&[compressed, a, b, c, d], message) = frame.split_first_chunk::<5>()?;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if compressed != 0 || message.len() < len {
        return None;
    }
    let mut rest = &message[..len];
    let mut status = 0;
    while let Some((&tag, tail)) = rest.split_first() {
        let (value, tail) = varint(tail)?;
        rest = match tag & 7 {
            0 => {
                if tag == 0x08 {
                    status = value;
                }
                tail
            }
            2 => tail.get(value as usize..)?, // a length-delimited field: skipped
            _ => return None,
        };
    }
    Some(status)
}

fn varint(mut bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((value, bytes));
        }
    }
    None
}

async fn check_loop(
    keeper: Arc<LeaseKeeper>,
    key: InstanceKey,
    spec: CheckSpec,
    addr: SocketAddr,
    clients: Clients,
    [passed, failed]: [prometheus::IntCounter; 2],
) {
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut interval = tokio::time::interval(spec.interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let verdict = match probe(&spec, addr, &clients).await {
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
        match keeper.set_health(&key, state, reason.clone()).await {
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

#[cfg(test)]
mod tests {
    use super::serving_status;

    #[test]
    fn health_responses_parse() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x02]), Some(2));
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(serving_status(&[1, 0, 0, 0, 0]), None, "compressed");
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None, "short");
        assert_eq!(serving_status(&[0, 0]), None);
    }
}
