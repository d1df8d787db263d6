//! HTTP proxy settings (`[[proxy.routes]]`, `[proxy.l7]`) and passive health
//! (`[proxy.outlier]`): typed forms and their validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::names;
use crate::raw::{RawL7, RawOutlier, RawRoute};
use crate::validate::{ser_duration, Checker, ProxyTarget};

/// How a service's requests are spread over its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Next instance in turn.
    RoundRobin,
    /// Power of two choices on in-flight requests: two random instances, the less busy wins.
    LeastRequest,
}

/// An explicit route: requests for `host` whose path starts with `path_prefix` go to `target`.
/// Longest prefix wins among routes of one host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpRoute {
    /// Lower case, without port.
    pub host: String,
    pub path_prefix: String,
    #[serde(flatten)]
    pub target: ProxyTarget,
    /// Time to the response head; `None`: `proxy.l7.request_timeout`.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<usize>,
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// `[proxy.l7]`: HTTP behaviour and the limits that protect the proxy from abusive clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L7Config {
    pub balance: Balance,
    /// `"<svc>.<ns>"` → balance for that service, overriding `balance`.
    pub balance_by_service: BTreeMap<String, Balance>,
    /// Extra attempts, on other instances, for idempotent requests that failed before any
    /// response byte.
    pub retries: usize,
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// A client must send a whole request head within this time (slowloris guard).
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// A client connection with no bytes either way this long is closed.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Request head size limit (→ 431).
    pub max_header_bytes: usize,
    /// Request header count limit (→ 431).
    pub max_headers: usize,
    pub max_concurrent_streams: u32,
    /// HTTP/2 rapid-reset guard.
    pub max_pending_accept_reset_streams: usize,
    /// Idle upstream connections are closed after this.
    #[serde(serialize_with = "ser_duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// What to do when too few instances are usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PanicMode {
    /// Spread over every instance that is not draining, healthy or not (Envoy's panic routing).
    BalanceAll,
    /// Keep to the usable few.
    Fail,
}

/// `[proxy.outlier]`: passive health, local to this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierConfig {
    /// Consecutive connect failures or 5xx responses that eject an instance; 0 disables.
    pub consecutive_failures: u32,
    /// Ejection lasts this × the instance's number of ejections so far.
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Duration,
    /// At most this share of a service's instances is ejected at once.
    pub max_ejection_percent: u32,
    /// Below this share of usable instances the service is in panic.
    pub panic_threshold: u32,
    pub panic_mode: PanicMode,
}

fn balance(c: &mut Checker, path: &str, text: &str) -> Balance {
    match text {
        "round_robin" => Balance::RoundRobin,
        "least_request" => Balance::LeastRequest,
        other => {
            c.err(
                path,
                format!("unknown balance {other:?} (round_robin | least_request)"),
            );
            Balance::RoundRobin
        }
    }
}

pub(crate) fn routes(c: &mut Checker, raw: Option<Vec<RawRoute>>) -> Vec<HttpRoute> {
    let mut out: Vec<HttpRoute> = Vec::new();
    for (i, r) in raw.unwrap_or_default().into_iter().enumerate() {
        let base = format!("proxy.routes[{i}]");
        let host = match r.host {
            Some(h) if !h.is_empty() && !h.contains(['/', ' ', ':']) => h.to_ascii_lowercase(),
            Some(h) => {
                c.err(
                    format!("{base}.host"),
                    format!("invalid host {h:?} (a host name without port)"),
                );
                String::new()
            }
            None => {
                c.err(format!("{base}.host"), "missing");
                String::new()
            }
        };
        let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') {
            c.err(
                format!("{base}.path_prefix"),
                format!("{path_prefix:?} must start with \"/\""),
            );
        }
        let target = c.target(&base, r.service, r.port);
        let timeout = r
            .timeout
            .map(|t| c.duration(&format!("{base}.timeout"), Some(t), Duration::from_secs(15)));
        let retries = r
            .retries
            .map(|n| c.range(&format!("{base}.retries"), Some(n), 2, 0, 10));
        if out
            .iter()
            .any(|o| o.host == host && o.path_prefix == path_prefix)
        {
            c.err(
                format!("{base}.path_prefix"),
                format!("duplicate route for host {host:?} and prefix {path_prefix:?}"),
            );
        }
        out.push(HttpRoute {
            host,
            path_prefix,
            target,
            timeout,
            retries,
        });
    }
    out
}

pub(crate) fn l7(c: &mut Checker, raw: RawL7) -> L7Config {
    let default_balance = raw
        .balance
        .as_deref()
        .map(|b| balance(c, "proxy.l7.balance", b))
        .unwrap_or(Balance::RoundRobin);
    let mut balance_by_service = BTreeMap::new();
    for (name, b) in raw.balance_by_service.unwrap_or_default() {
        let path = format!("proxy.l7.balance_by_service.{name}");
        match names::parse_service_ref(&name) {
            Ok((svc, ns)) => {
                balance_by_service.insert(format!("{svc}.{ns}"), balance(c, &path, &b));
            }
            Err(e) => c.err(path, e),
        }
    }
    let secs = Duration::from_secs;
    L7Config {
        balance: default_balance,
        balance_by_service,
        retries: c.range("proxy.l7.retries", raw.retries, 2, 0, 10),
        request_timeout: c.duration("proxy.l7.request_timeout", raw.request_timeout, secs(15)),
        header_read_timeout: c.duration(
            "proxy.l7.header_read_timeout",
            raw.header_read_timeout,
            secs(10),
        ),
        idle_timeout: c.duration("proxy.l7.idle_timeout", raw.idle_timeout, secs(60)),
        max_header_bytes: c.range(
            "proxy.l7.max_header_bytes",
            raw.max_header_bytes,
            64 * 1024,
            8192,
            1024 * 1024,
        ),
        max_headers: c.range("proxy.l7.max_headers", raw.max_headers, 100, 8, 1000),
        max_concurrent_streams: c.range(
            "proxy.l7.max_concurrent_streams",
            raw.max_concurrent_streams,
            256,
            1,
            10_000,
        ) as u32,
        max_pending_accept_reset_streams: c.range(
            "proxy.l7.max_pending_accept_reset_streams",
            raw.max_pending_accept_reset_streams,
            20,
            1,
            10_000,
        ),
        pool_idle_timeout: c.duration(
            "proxy.l7.pool_idle_timeout",
            raw.pool_idle_timeout,
            secs(90),
        ),
        pool_max_idle_per_host: c.range(
            "proxy.l7.pool_max_idle_per_host",
            raw.pool_max_idle_per_host,
            256,
            0,
            100_000,
        ),
    }
}

pub(crate) fn outlier(c: &mut Checker, raw: RawOutlier) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: c.range(
            "proxy.outlier.consecutive_failures",
            raw.consecutive_failures,
            5,
            0,
            1000,
        ) as u32,
        base_ejection_time: c.duration(
            "proxy.outlier.base_ejection_time",
            raw.base_ejection_time,
            Duration::from_secs(30),
        ),
        max_ejection_percent: c.range(
            "proxy.outlier.max_ejection_percent",
            raw.max_ejection_percent,
            50,
            0,
            100,
        ) as u32,
        panic_threshold: c.range(
            "proxy.outlier.panic_threshold",
            raw.panic_threshold,
            50,
            0,
            100,
        ) as u32,
        panic_mode: match raw.panic_mode.as_deref() {
            None | Some("balance_all") => PanicMode::BalanceAll,
            Some("fail") => PanicMode::Fail,
            Some(other) => {
                c.err(
                    "proxy.outlier.panic_mode",
                    format!("unknown panic mode {other:?} (balance_all | fail)"),
                );
                PanicMode::BalanceAll
            }
        },
    }
}
