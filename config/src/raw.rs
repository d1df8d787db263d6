//! The file as written: every key optional, every unknown key an error. Addresses and durations
//! stay strings here so that a bad one becomes a validation error with its key path, collected
//! together with every other, rather than a serde error that stops at the first.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub admin: Option<RawAdmin>,
    pub dns: Option<RawDns>,
    pub proxy: Option<RawProxy>,
    pub registry: Option<RawRegistry>,
    pub shutdown: Option<RawShutdown>,
    pub log: Option<RawLog>,
    pub consul: Option<RawConsul>,
    pub xds: Option<RawXds>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub token_file: Option<String>,
    pub endpoint_state_series: Option<bool>,
    pub max_service_series: Option<i64>,
    pub tls: Option<RawTls>,
    pub metrics_tls: Option<RawTls>,
}

/// A listener's `tls` table (`[[proxy.http]]`, `[admin]`, `admin.metrics_tls`).
#[derive(Debug, Default, Deserialize)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certs: Option<Vec<RawCertKey>>,
    pub client_ca: Option<String>,
    pub allow: Option<Vec<String>>,
    pub handshake_timeout: Option<String>,
}

/// One `certs` entry of a `tls` table.
#[derive(Debug, Default, Deserialize)]
pub struct RawCertKey {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDns {
    pub listen: Option<OneOrMany>,
    pub domain: Option<String>,
    pub ttl: Option<String>,
    pub negative_ttl: Option<String>,
    pub max_answers: Option<i64>,
    pub forward: Option<Vec<String>>,
    pub workers: Option<i64>,
    pub rrl: Option<RawRrl>,
    pub tcp: Option<RawDnsTcp>,
    pub forwarding: Option<RawDnsForwarding>,
}

/// A key that takes one value or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRrl {
    pub rate: Option<i64>,
    pub slip: Option<i64>,
    pub ipv4_prefix: Option<i64>,
    pub ipv6_prefix: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDnsTcp {
    pub max_connections: Option<i64>,
    pub max_per_client: Option<i64>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDnsForwarding {
    pub max_in_flight: Option<i64>,
    pub max_in_flight_per_worker: Option<i64>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawProxy {
    pub http: Option<Vec<RawHttpListener>>,
    pub tcp: Option<Vec<RawL4Listener>>,
    pub udp: Option<Vec<RawL4Listener>>,
    pub workers: Option<i64>,
    pub max_connections: Option<i64>,
    pub splice: Option<bool>,
    pub connect_timeout: Option<String>,
    pub connect_attempts: Option<i64>,
    pub idle_timeout: Option<String>,
    pub routes: Option<Vec<RawRoute>>,
    pub l7: Option<RawL7>,
    pub outlier: Option<RawOutlier>,
    pub upstream_tls: Option<Vec<RawUpstreamTls>>,
}

/// A `[[proxy.upstream_tls]]` entry: the proxies speak TLS to this service's instances.
#[derive(Debug, Default, Deserialize)]
pub struct RawUpstreamTls {
    pub service: Option<String>,
    pub ca: Option<String>,
    pub server_name: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// A `[[proxy.routes]]` entry: explicit HTTP routing by host and path prefix.
#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub service: Option<String>,
    pub port: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<i64>,
    pub allow: Option<Vec<String>>,
}

/// `[proxy.l7]`: HTTP proxy behaviour and limits.
#[derive(Debug, Default, Deserialize)]
pub struct RawL7 {
    pub balance: Option<String>,
    pub balance_by_service: Option<std::collections::BTreeMap<String, String>>,
    pub retries: Option<i64>,
    pub request_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub max_headers: Option<i64>,
    pub max_concurrent_streams: Option<i64>,
    pub max_pending_accept_reset_streams: Option<i64>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle_per_host: Option<i64>,
    pub access_log: Option<bool>,
    pub http1_fast_path: Option<bool>,
}

/// `[proxy.outlier]`: passive health (outlier ejection) and the panic threshold.
#[derive(Debug, Default, Deserialize)]
pub struct RawOutlier {
    pub consecutive_failures: Option<i64>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub panic_threshold: Option<i64>,
    pub panic_mode: Option<String>,
}

/// A `[[proxy.tcp]]` or `[[proxy.udp]]` entry.
#[derive(Debug, Default, Deserialize)]
pub struct RawL4Listener {
    pub listen: Option<String>,
    pub service: Option<String>,
    pub port: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_flows: Option<i64>,
    pub sni: Option<Vec<RawSniRoute>>,
}

/// A `[[proxy.tcp.sni]]` entry: TLS clients naming `name` go to `service` (SNI passthrough).
#[derive(Debug, Default, Deserialize)]
pub struct RawSniRoute {
    pub name: Option<String>,
    pub service: Option<String>,
    pub port: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHttpListener {
    pub listen: Option<String>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRegistry {
    pub backend: Option<String>,
    pub lease_ttl: Option<String>,
    pub resync_interval: Option<String>,
    pub node: Option<String>,
    pub advertise_ip: Option<String>,
    pub read_only: Option<bool>,
    pub etcd: Option<RawEtcd>,
    /// Kept as tables: `service`/`id` are split off and the rest is checked as an
    /// [`crate::Instance`] so the instance schema is defined once.
    #[serde(rename = "static")]
    pub static_instances: Option<Vec<toml::Table>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEtcd {
    pub endpoints: Option<Vec<String>>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub keepalive_interval: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub tls: Option<RawEtcdTls>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawEtcdTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawShutdown {
    pub drain_timeout: Option<String>,
    pub readiness_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawConsul {
    pub listen: Option<String>,
    pub dns_domain: Option<String>,
    pub datacenter: Option<String>,
    pub port_name: Option<String>,
    pub max_blocking_queries: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawXds {
    pub listen: Option<String>,
    pub tls: Option<RawTls>,
    pub max_streams: Option<i64>,
    pub max_names: Option<i64>,
}
