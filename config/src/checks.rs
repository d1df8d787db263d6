//! `RawConfig` → `Config`: defaults filled in, every value checked, every error collected.

mod consul;
mod l7;
mod registry;
mod tls;
mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::FieldError;
use crate::model::*;
use crate::names;
use crate::raw::*;

impl Default for Config {
    fn default() -> Self {
        validate(RawConfig::default()).expect("built-in defaults are valid")
    }
}

/// Collects errors while turning raw values into typed ones; each helper returns the default on
/// error so checking continues and every problem is reported.
pub(crate) struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    pub(crate) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    pub(crate) fn addr(&mut self, path: &str, value: Option<String>, default: &str) -> SocketAddr {
        let text = value.unwrap_or_else(|| default.to_string());
        text.parse().unwrap_or_else(|_| {
            self.err(
                path,
                format!("invalid socket address {text:?} (want IP:PORT)"),
            );
            default.parse().expect("default address parses")
        })
    }

    pub(crate) fn duration(
        &mut self,
        path: &str,
        value: Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => {
                self.err(path, format!("{text:?} must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    path,
                    format!("invalid duration {text:?}: {e} (e.g. \"5s\", \"250ms\")"),
                );
                default
            }
        }
    }

    /// A duration that may be zero.
    pub(crate) fn duration_or_zero(
        &mut self,
        path: &str,
        value: Option<String>,
        default: Duration,
    ) -> Duration {
        match value.as_deref().map(humantime::parse_duration) {
            Some(Ok(d)) if d.is_zero() => d,
            _ => self.duration(path, value, default),
        }
    }

    /// A duration with an upper bound (`max`, inclusive).
    pub(crate) fn duration_at_most(
        &mut self,
        path: &str,
        value: Option<String>,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let text = value.clone();
        let d = self.duration(path, value, default);
        if d > max {
            self.err(
                path,
                format!(
                    "{:?} is longer than the maximum of {}",
                    text.unwrap_or_default(),
                    humantime::format_duration(max)
                ),
            );
            return default;
        }
        d
    }

    /// A listen address that must be present.
    fn required_addr(&mut self, path: &str, value: Option<String>) -> SocketAddr {
        if value.is_none() {
            self.err(path, "missing; every listener needs a listen address");
        }
        self.addr(path, value, "127.0.0.1:0")
    }

    /// `service = "<svc>[.<ns>]"` and an optional named `port` of a proxy listener at `base`.
    pub(crate) fn target(
        &mut self,
        base: &str,
        service: Option<String>,
        port: Option<String>,
    ) -> ProxyTarget {
        let (service, namespace) = match service.as_deref().map(names::parse_service_ref) {
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                self.err(format!("{base}.service"), e);
                Default::default()
            }
            None => {
                self.err(
                    format!("{base}.service"),
                    "missing (\"<svc>\" or \"<svc>.<ns>\")",
                );
                Default::default()
            }
        };
        if let Some(Err(e)) = port.as_deref().map(names::check_port_name) {
            self.err(format!("{base}.port"), format!("port name {e}"));
        }
        ProxyTarget {
            service,
            namespace,
            port,
        }
    }

    /// `[[proxy.tcp.sni]]` entries of the listener at `base` (`key` says which kind it is).
    fn sni_routes(
        &mut self,
        key: &str,
        base: &str,
        raw: Option<Vec<RawSniRoute>>,
    ) -> Vec<SniRoute> {
        let Some(raw) = raw else { return Vec::new() };
        if key != "proxy.tcp" {
            self.err(
                format!("{base}.sni"),
                "only TCP listeners route by SNI (TLS runs over TCP)",
            );
            return Vec::new();
        }
        let mut out: Vec<SniRoute> = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let at = format!("{base}.sni[{i}]");
            let name = match r.name {
                Some(n) => {
                    let n = n.to_ascii_lowercase();
                    let host = n.strip_prefix("*.").unwrap_or(&n);
                    let valid = !host.is_empty()
                        && host.split('.').all(|label| {
                            !label.is_empty()
                                && label
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        });
                    if !valid {
                        self.err(
                            format!("{at}.name"),
                            format!("invalid name {n:?} (a DNS name, or *.<name> for one label under it)"),
                        );
                    } else if out.iter().any(|o| o.name == n) {
                        self.err(format!("{at}.name"), format!("{n:?} is listed twice"));
                    }
                    n
                }
                None => {
                    self.err(format!("{at}.name"), "missing");
                    String::new()
                }
            };
            let target = self.target(&at, r.service, r.port);
            out.push(SniRoute { name, target });
        }
        out
    }

    /// `[[proxy.tcp]]` / `[[proxy.udp]]` entries under `key`.
    fn l4_listeners(
        &mut self,
        key: &str,
        raw: Option<Vec<RawL4Listener>>,
        idle_default: Duration,
    ) -> Vec<L4ListenerConfig> {
        raw.unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let base = format!("{key}[{i}]");
                let max_flows = match (key, l.max_flows) {
                    ("proxy.udp", value) => Some(self.range(
                        &format!("{base}.max_flows"),
                        value,
                        DEFAULT_MAX_FLOWS,
                        1,
                        1_000_000,
                    )),
                    (_, Some(_)) => {
                        self.err(
                            format!("{base}.max_flows"),
                            "only UDP listeners have flows (TCP: proxy.max_connections)",
                        );
                        None
                    }
                    (_, None) => None,
                };
                let sni = self.sni_routes(key, &base, l.sni);
                // With SNI routes the listener's own service is optional: without it, clients
                // naming no route are closed.
                let target = match (&l.service, sni.is_empty()) {
                    (None, false) => {
                        if l.port.is_some() {
                            self.err(format!("{base}.port"), "needs service");
                        }
                        None
                    }
                    _ => Some(self.target(&base, l.service, l.port)),
                };
                L4ListenerConfig {
                    listen: self.required_addr(&format!("{base}.listen"), l.listen),
                    target,
                    sni,
                    idle_timeout: self.duration(
                        &format!("{base}.idle_timeout"),
                        l.idle_timeout,
                        idle_default,
                    ),
                    max_flows,
                }
            })
            .collect()
    }

    pub(crate) fn range(
        &mut self,
        path: &str,
        value: Option<i64>,
        default: usize,
        min: i64,
        max: i64,
    ) -> usize {
        match value {
            None => default,
            Some(v) if (min..=max).contains(&v) => v as usize,
            Some(v) => {
                self.err(path, format!("{v} is out of range {min}..={max}"));
                default
            }
        }
    }
}

/// Validates a raw config, returning the typed config or every error found.
pub(crate) fn validate(raw: RawConfig) -> Result<Config, Vec<FieldError>> {
    let mut c = Checker { errors: Vec::new() };
    let admin = admin(&mut c, raw.admin.unwrap_or_default());
    let dns = dns(&mut c, raw.dns.unwrap_or_default());
    let proxy = proxy(&mut c, raw.proxy.unwrap_or_default(), &dns.domain);
    let registry = registry::registry(&mut c, raw.registry.unwrap_or_default());
    let raw_shutdown = raw.shutdown.unwrap_or_default();
    let shutdown = ShutdownConfig {
        drain_timeout: c.duration(
            "shutdown.drain_timeout",
            raw_shutdown.drain_timeout,
            Duration::from_secs(10),
        ),
        readiness_grace: c.duration_or_zero(
            "shutdown.readiness_grace",
            raw_shutdown.readiness_grace,
            Duration::ZERO,
        ),
    };
    let log = log(&mut c, raw.log.unwrap_or_default());
    let consul = consul::consul(&mut c, raw.consul.unwrap_or_default(), &admin);
    let xds = xds::xds(&mut c, raw.xds.unwrap_or_default());
    let config = Config {
        admin,
        dns,
        proxy,
        registry,
        shutdown,
        log,
        consul,
        xds,
    };
    check_port_clashes(&mut c, &config);
    if c.errors.is_empty() {
        Ok(config)
    } else {
        Err(c.errors)
    }
}

fn admin(c: &mut Checker, raw: RawAdmin) -> AdminConfig {
    let text = raw.listen.unwrap_or_else(|| "127.0.0.1:9901".into());
    let listen = AdminListen::parse(&text).unwrap_or_else(|e| {
        c.err("admin.listen", e);
        AdminListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 9901)))
    });
    let token_file = raw.token_file.map(PathBuf::from);
    let tls = raw.tls.map(|t| tls::server(c, "admin.tls", t));
    let client_certs = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    match &listen {
        AdminListen::Tcp(addr)
            if !addr.ip().is_loopback() && token_file.is_none() && !client_certs =>
        {
            c.err(
                "admin.listen",
                format!(
                    "{addr} is not a loopback address; set admin.token_file (or admin.tls.client_ca) to expose the admin API"
                ),
            );
        }
        AdminListen::Unix(_) if tls.is_some() => c.err(
            "admin.tls",
            "TLS needs a TCP admin.listen (a unix socket is guarded by its file mode); \
             for HTTPS on admin.metrics_listen alone use admin.metrics_tls",
        ),
        _ => {}
    }
    let metrics_listen = raw
        .metrics_listen
        .map(|text| c.addr("admin.metrics_listen", Some(text), "127.0.0.1:0"));
    let metrics_tls = raw
        .metrics_tls
        .map(|t| tls::server(c, "admin.metrics_tls", t));
    if metrics_tls.is_some() && metrics_listen.is_none() {
        c.err(
            "admin.metrics_tls",
            "is the metrics listener's TLS; set admin.metrics_listen too",
        );
    }
    AdminConfig {
        listen,
        metrics_listen,
        token_file,
        endpoint_state_series: raw.endpoint_state_series.unwrap_or(false),
        max_service_series: c.range(
            "admin.max_service_series",
            raw.max_service_series,
            10_000,
            1,
            10_000_000,
        ),
        tls,
        metrics_tls,
    }
}

fn dns(c: &mut Checker, raw: RawDns) -> DnsConfig {
    let listen = match raw.listen {
        None => vec![c.addr("dns.listen", None, "127.0.0.1:8600")],
        Some(OneOrMany::One(text)) => vec![c.addr("dns.listen", Some(text), "127.0.0.1:8600")],
        Some(OneOrMany::Many(list)) => {
            if list.is_empty() {
                c.err("dns.listen", "needs at least one address");
            }
            list.into_iter()
                .enumerate()
                .map(|(i, text)| c.addr(&format!("dns.listen[{i}]"), Some(text), "127.0.0.1:8600"))
                .collect()
        }
    };
    let domain = raw
        .domain
        .unwrap_or_else(|| "cluster.local".into())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if domain.is_empty() || domain.len() > 200 {
        c.err("dns.domain", "must be 1..=200 characters");
    }
    for label in domain.split('.') {
        if let Err(e) = names::check_label(label) {
            c.err("dns.domain", format!("label {e}"));
            break;
        }
    }
    let ttl = c.duration("dns.ttl", raw.ttl, Duration::from_secs(5));
    let negative_ttl = c.duration("dns.negative_ttl", raw.negative_ttl, Duration::from_secs(5));
    let max_answers = c.range("dns.max_answers", raw.max_answers, 20, 1, 1000);
    let mut forward = Vec::new();
    for (i, text) in raw.forward.unwrap_or_default().into_iter().enumerate() {
        let path = format!("dns.forward[{i}]");
        // "resolv.conf": the host's; an absolute path: a file in that format.
        if text == "resolv.conf" {
            forward.push(ForwardTarget::ResolvConf(
                ForwardTarget::SYSTEM_RESOLV_CONF.into(),
            ));
            continue;
        }
        if text.starts_with('/') {
            forward.push(ForwardTarget::ResolvConf(PathBuf::from(text)));
            continue;
        }
        // A bare IP means port 53, as in resolv.conf.
        let text = if text.parse::<std::net::IpAddr>().is_ok() {
            format!("{text}:53")
        } else {
            text
        };
        forward.push(ForwardTarget::Server(c.addr(
            &path,
            Some(text),
            "127.0.0.1:53",
        )));
    }
    let workers = raw
        .workers
        .map(|w| c.range("dns.workers", Some(w), 1, 1, 256));
    let rrl = raw.rrl.unwrap_or_default();
    let rrl = RrlConfig {
        rate: c.range("dns.rrl.rate", rrl.rate, 0, 0, 1_000_000) as u32,
        slip: c.range("dns.rrl.slip", rrl.slip, 2, 0, 100) as u32,
        ipv4_prefix: c.range("dns.rrl.ipv4_prefix", rrl.ipv4_prefix, 24, 8, 32) as u8,
        ipv6_prefix: c.range("dns.rrl.ipv6_prefix", rrl.ipv6_prefix, 56, 16, 128) as u8,
    };
    let tcp = raw.tcp.unwrap_or_default();
    let tcp = DnsTcpConfig {
        max_connections: c.range(
            "dns.tcp.max_connections",
            tcp.max_connections,
            1024,
            1,
            1_000_000,
        ),
        max_per_client: c.range(
            "dns.tcp.max_per_client",
            tcp.max_per_client,
            16,
            1,
            1_000_000,
        ),
        idle_timeout: c.duration(
            "dns.tcp.idle_timeout",
            tcp.idle_timeout,
            Duration::from_secs(10),
        ),
    };
    if tcp.max_per_client > tcp.max_connections {
        c.err(
            "dns.tcp.max_per_client",
            format!(
                "{} is more than dns.tcp.max_connections ({})",
                tcp.max_per_client, tcp.max_connections
            ),
        );
    }
    let forwarding = dns_forwarding(c, raw.forwarding.unwrap_or_default());
    DnsConfig {
        listen,
        domain,
        ttl,
        negative_ttl,
        max_answers,
        forward,
        workers,
        rrl,
        tcp,
        forwarding,
    }
}

fn dns_forwarding(c: &mut Checker, raw: RawDnsForwarding) -> DnsForwardingConfig {
    let max_in_flight = c.range(
        "dns.forwarding.max_in_flight",
        raw.max_in_flight,
        256,
        1,
        100_000,
    );
    // Unset, the per-worker bound follows a smaller total down.
    let per_worker_set = raw.max_in_flight_per_worker.is_some();
    let max_in_flight_per_worker = c.range(
        "dns.forwarding.max_in_flight_per_worker",
        raw.max_in_flight_per_worker,
        128.min(max_in_flight),
        1,
        100_000,
    );
    if per_worker_set && max_in_flight_per_worker > max_in_flight {
        c.err(
            "dns.forwarding.max_in_flight_per_worker",
            format!(
                "{max_in_flight_per_worker} is more than dns.forwarding.max_in_flight \
                 ({max_in_flight})"
            ),
        );
    }
    DnsForwardingConfig {
        max_in_flight,
        max_in_flight_per_worker,
        timeout: c.duration_at_most(
            "dns.forwarding.timeout",
            raw.timeout,
            Duration::from_secs(1),
            Duration::from_secs(30),
        ),
    }
}

fn proxy(c: &mut Checker, raw: RawProxy, domain: &str) -> ProxyConfig {
    let http = match raw.http {
        None => vec![HttpListenerConfig {
            listen: "127.0.0.1:8080".parse().expect("default parses"),
            tls: None,
        }],
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, l)| HttpListenerConfig {
                listen: c.required_addr(&format!("proxy.http[{i}].listen"), l.listen),
                tls: l
                    .tls
                    .map(|t| tls::server(c, &format!("proxy.http[{i}].tls"), t)),
            })
            .collect(),
    };
    let idle_default = c.duration(
        "proxy.idle_timeout",
        raw.idle_timeout,
        Duration::from_secs(3600),
    );
    let tcp = c.l4_listeners("proxy.tcp", raw.tcp, idle_default);
    let udp = c.l4_listeners("proxy.udp", raw.udp, Duration::from_secs(30));
    let workers = raw
        .workers
        .map(|w| c.range("proxy.workers", Some(w), 1, 1, 1024));
    ProxyConfig {
        http,
        tcp,
        udp,
        workers,
        max_connections: c.range(
            "proxy.max_connections",
            raw.max_connections,
            10_000,
            1,
            10_000_000,
        ),
        splice: raw.splice.unwrap_or(true),
        connect_timeout: c.duration(
            "proxy.connect_timeout",
            raw.connect_timeout,
            Duration::from_secs(1),
        ),
        connect_attempts: c.range("proxy.connect_attempts", raw.connect_attempts, 3, 1, 100),
        routes: l7::routes(c, raw.routes),
        l7: l7::l7(c, raw.l7.unwrap_or_default()),
        outlier: l7::outlier(c, raw.outlier.unwrap_or_default()),
        upstream_tls: tls::upstream(c, raw.upstream_tls.unwrap_or_default(), domain),
    }
}

fn log(c: &mut Checker, raw: RawLog) -> LogConfig {
    let level = raw.level.unwrap_or_else(|| "info".into());
    if level.trim().is_empty() {
        c.err(
            "log.level",
            "must not be empty (e.g. \"info\" or \"info,svcd_registry=debug\")",
        );
    }
    let format = match raw.format.as_deref() {
        None | Some("human") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            c.err(
                "log.format",
                format!("{other:?} is not one of \"human\", \"json\""),
            );
            LogFormat::Human
        }
    };
    LogConfig { level, format }
}

/// Two listeners of the same transport on one address would fail at bind time with a less helpful
/// message; catch it here with both key paths.
fn check_port_clashes(c: &mut Checker, config: &Config) {
    let dns_listen = |i: usize| {
        if config.dns.listen.len() == 1 {
            "dns.listen".to_string()
        } else {
            format!("dns.listen[{i}]")
        }
    };
    // DNS listens on each address over both transports.
    let dns: Vec<(String, SocketAddr)> = config
        .dns
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (dns_listen(i), *a))
        .collect();
    let mut tcp = dns.clone();
    if let AdminListen::Tcp(addr) = config.admin.listen {
        tcp.insert(0, ("admin.listen".into(), addr));
    }
    if let Some(addr) = config.admin.metrics_listen {
        tcp.push(("admin.metrics_listen".into(), addr));
    }
    if let Some(addr) = config.consul.listen {
        tcp.push(("consul.listen".into(), addr));
    }
    if let Some(AdminListen::Tcp(addr)) = config.xds.listen {
        tcp.push(("xds.listen".into(), addr));
    }
    for (i, l) in config.proxy.http.iter().enumerate() {
        tcp.push((format!("proxy.http[{i}].listen"), l.listen));
    }
    for (i, l) in config.proxy.tcp.iter().enumerate() {
        tcp.push((format!("proxy.tcp[{i}].listen"), l.listen));
    }
    let mut udp = dns;
    for (i, l) in config.proxy.udp.iter().enumerate() {
        udp.push((format!("proxy.udp[{i}].listen"), l.listen));
    }
    for (i, (path, addr)) in udp.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        if let Some((other, _)) = udp[..i].iter().find(|(_, a)| a == addr) {
            c.err(path.clone(), format!("{addr} is already used by {other}"));
        }
    }
    for (i, (path, addr)) in tcp.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        if let Some((other, _)) = tcp[..i].iter().find(|(_, a)| a == addr) {
            c.err(path.clone(), format!("{addr} is already used by {other}"));
        }
    }
}
