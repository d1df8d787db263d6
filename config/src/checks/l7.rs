//! Checks of the HTTP proxy settings (`[[proxy.routes]]`, `[proxy.l7]`) and passive health
//! (`[proxy.outlier]`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::Checker;
use crate::model::{Balance, HttpRoute, L7Config, OutlierConfig, PanicMode, MAX_REQUEST_TIMEOUT};
use crate::names;
use crate::raw::{RawL7, RawOutlier, RawRoute};

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
        let timeout = r.timeout.map(|t| {
            c.duration_at_most(
                &format!("{base}.timeout"),
                Some(t),
                Duration::from_secs(15),
                MAX_REQUEST_TIMEOUT,
            )
        });
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
        let allow = super::tls::identities(c, &format!("{base}.allow"), r.allow);
        out.push(HttpRoute {
            host,
            path_prefix,
            target,
            timeout,
            retries,
            allow,
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
        request_timeout: c.duration_at_most(
            "proxy.l7.request_timeout",
            raw.request_timeout,
            secs(15),
            MAX_REQUEST_TIMEOUT,
        ),
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
        access_log: raw.access_log.unwrap_or(false),
        http1_fast_path: raw.http1_fast_path.unwrap_or(true),
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
