//! The validated configuration: what every consumer reads. Everything here is already checked
//! ([`crate::checks`] builds it from the raw serde form); consumers never re-validate.
//! `Serialize` renders the effective config with secrets redacted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::instance::Instance;

/// The validated, effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub dns: DnsConfig,
    pub proxy: ProxyConfig,
    pub registry: RegistryConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub consul: ConsulConfig,
    pub xds: XdsConfig,
}

/// `[xds]`: the xDS control plane for Envoy and proxyless gRPC (docs/xds.md). Off unless
/// `listen` is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct XdsConfig {
    /// ADS (state of the world) and the standalone CDS/EDS services: `IP:PORT` or `unix:/PATH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<AdminListen>,
    /// TLS (ALPN `h2`) on a TCP `listen`, optionally with client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsServerConfig>,
    /// Streams open at once; past it a stream is refused (`RESOURCE_EXHAUSTED`) and counted in
    /// `svcd_xds_streams_refused_total`.
    pub max_streams: usize,
    /// Resource names in one request; past it the stream is ended (`INVALID_ARGUMENT`) and
    /// counted in `svcd_xds_requests_rejected_total{reason="too_many_names"}`.
    pub max_names: usize,
}

/// `[consul]`: a Consul-compatible view of the registry for clients written against Consul
/// (docs/consul.md). Off unless `listen` is set; the DNS names under `dns_domain` are served
/// only then too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsulConfig {
    /// The Consul HTTP API subset (`/v1/health/service/...`, `/v1/catalog/...`, agent
    /// registration). Same bearer token as the admin API (`admin.token_file`), which must be set
    /// for a non-loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The DNS domain of Consul-style names (`<svc>.service.<dns_domain>`), lower case, without
    /// trailing dot.
    pub dns_domain: String,
    /// The datacenter this daemon reports (`/v1/agent/self`, the `Datacenter` fields) and
    /// accepts in `?dc=` and `<svc>.service.<dc>.<dns_domain>`.
    pub datacenter: String,
    /// The named port a Consul service's single `Port` is: read from each instance (else its
    /// first port by name) and written by agent registrations.
    pub port_name: String,
    /// Blocking queries (`?index=`) parked at once; past it a query is refused (429) and counted
    /// in `svcd_consul_blocking_refused_total`.
    pub max_blocking_queries: usize,
}

impl ConsulConfig {
    /// Whether the Consul API and DNS names are served.
    pub fn enabled(&self) -> bool {
        self.listen.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    pub listen: AdminListen,
    /// A second listener serving only `/metrics`, `/healthz` and `/readyz`: Prometheus on
    /// another host scrapes it while the mutating API stays on loopback or a unix socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the bearer token; read at start and on reload so the token never sits in the
    /// config text (and never appears in `/v1/config`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Export `svcd_endpoint_state{service,endpoint,state}`, one series per endpoint (opt-in, as
    /// Envoy's per-host stats; per-service counts are always exported).
    pub endpoint_state_series: bool,
    /// Above this many services, `svcd_service_endpoints` keeps per-service series only for
    /// services not fully healthy (at most this many) and folds the rest into
    /// `service="_folded"`: a scrape stays bounded at a million endpoints.
    pub max_service_series: usize,
    /// HTTPS on `listen` and `metrics_listen` (TCP only), optionally with client certificates:
    /// no plaintext port is then needed off the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsServerConfig>,
    /// The metrics listener's own TLS, in place of `tls` there: Prometheus across hosts gets
    /// HTTPS (and its own client CA) while the API stays plaintext on loopback or a unix socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_tls: Option<TlsServerConfig>,
}

impl AdminConfig {
    /// What the metrics listener serves with: its own table, else the API's; and that table's
    /// key.
    pub fn scrape_tls(&self) -> Option<(&TlsServerConfig, &'static str)> {
        match (&self.metrics_tls, &self.tls) {
            (Some(own), _) => Some((own, "admin.metrics_tls")),
            (None, Some(api)) => Some((api, "admin.tls")),
            (None, None) => None,
        }
    }
}

/// A listener's `tls` table: TLS is terminated with these certificates, chosen by the client's
/// SNI, and client certificates are required when `client_ca` is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsServerConfig {
    /// Certificate chains and their keys. Each serves the DNS names (exact and `*.`) of its
    /// certificate's SANs; the first also serves clients without SNI or with a name none covers.
    pub certs: Vec<CertKeyFiles>,
    /// CA bundle that verifies client certificates; set: a client without a valid one is
    /// refused in the handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Client identities (URI SAN such as `spiffe://td/ns/default/svc/web`, or DNS SAN) let in;
    /// others are answered 403. Empty: every certificate `client_ca` verifies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// A handshake not done by then is closed and counted (a ClientHello dribbled byte by byte
    /// must not hold a connection).
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
}

/// A certificate chain file and its private key file (PEM), as cert-manager and SPIRE write them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertKeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the admin API listens: a TCP address, or a unix socket (`unix:/run/svcd/admin.sock`,
/// mode 0660) that only local users its file mode lets in can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AdminListen {
    /// The unix socket the CLI uses when neither `--admin` nor `SVCD_ADMIN_LISTEN` is given and
    /// it exists (the packaged daemon's).
    pub const DEFAULT_UNIX: &'static str = "/run/svcd/admin.sock";

    /// `IP:PORT` or `unix:PATH`.
    pub fn parse(text: &str) -> Result<AdminListen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: the socket path must be absolute"));
            }
            return Ok(AdminListen::Unix(PathBuf::from(path)));
        }
        text.parse()
            .map(AdminListen::Tcp)
            .map_err(|_| format!("invalid socket address {text:?} (want IP:PORT or unix:/PATH)"))
    }
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminListen::Tcp(addr) => write!(f, "{addr}"),
            AdminListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Serialize for AdminListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsConfig {
    /// Every address DNS answers on, UDP and TCP each (e.g. `127.0.0.1:8600` and a node-local
    /// `169.254.20.10:53`).
    pub listen: Vec<SocketAddr>,
    /// Cluster domain, lower case, without trailing dot.
    pub domain: String,
    #[serde(serialize_with = "ser_duration")]
    pub ttl: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub negative_ttl: Duration,
    pub max_answers: usize,
    pub forward: Vec<ForwardTarget>,
    /// UDP worker threads (one SO_REUSEPORT socket each); `None` means one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    pub rrl: RrlConfig,
    pub tcp: DnsTcpConfig,
    pub forwarding: DnsForwardingConfig,
}

/// Where names outside the zone go: a resolver's address, or the nameservers of a
/// resolv.conf-format file (read at start and on SIGHUP; svcd's own addresses skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardTarget {
    Server(SocketAddr),
    ResolvConf(PathBuf),
}

impl ForwardTarget {
    /// The host's resolver configuration, for `dns.forward = ["resolv.conf"]`.
    pub const SYSTEM_RESOLV_CONF: &'static str = "/etc/resolv.conf";
}

impl std::fmt::Display for ForwardTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardTarget::Server(addr) => write!(f, "{addr}"),
            ForwardTarget::ResolvConf(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Serialize for ForwardTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Response rate limiting over UDP, per client network (as Knot's and BIND's): each network
/// gets `rate` answers a second (a token bucket holding one second's worth); past it, every
/// `slip`-th answer goes out truncated (an honest client retries over TCP, which a spoofed
/// source cannot) and the rest are dropped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RrlConfig {
    /// Answers per second per client network; 0 turns rate limiting off.
    pub rate: u32,
    /// Every `slip`-th limited answer is sent truncated; 0 drops them all, 1 truncates them all.
    pub slip: u32,
    /// Client networks: IPv4 addresses are grouped by this prefix length ...
    pub ipv4_prefix: u8,
    /// ... and IPv6 addresses by this one.
    pub ipv6_prefix: u8,
}

/// DNS over TCP: connection limits, so one client cannot hold every socket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsTcpConfig {
    /// Open connections in total; past it new ones are closed at once.
    pub max_connections: usize,
    /// Open connections per client address.
    pub max_per_client: usize,
    /// A connection with no complete query for this long is closed.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
}

/// Forwarding names outside the zone (`dns.forward`): how much of it may be under way at once,
/// so a flood of outside names to a slow or silent upstream costs bounded memory, and how long
/// one question may take.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsForwardingConfig {
    /// Questions waiting on an upstream at once, across the server; past it a new question is
    /// answered SERVFAIL at once. Identical questions waiting together count once.
    pub max_in_flight: usize,
    /// The same per UDP worker thread (DNS over TCP counts as one more worker), so one busy
    /// socket cannot take every slot.
    pub max_in_flight_per_worker: usize,
    /// How long one forwarded question may take in all (the resolver's retransmissions over UDP
    /// included) before the clients waiting on it get SERVFAIL.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    pub http: Vec<HttpListenerConfig>,
    pub tcp: Vec<L4ListenerConfig>,
    pub udp: Vec<L4ListenerConfig>,
    /// Proxy worker threads; `None` means one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Open TCP connections across all L4 listeners; excess connections are closed at once.
    pub max_connections: usize,
    /// Forward TCP with splice(2) (Linux); false forces the user-space copy path.
    pub splice: bool,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Instances tried per connection before giving up (refused / timed out → next instance).
    pub connect_attempts: usize,
    /// Explicit HTTP routes; requests matching none are routed by their Host name.
    pub routes: Vec<HttpRoute>,
    pub l7: L7Config,
    pub outlier: OutlierConfig,
    /// Services whose instances the HTTP and L4 proxies reach over TLS.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream_tls: Vec<UpstreamTlsConfig>,
}

/// A `[[proxy.upstream_tls]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTlsConfig {
    pub service: String,
    pub namespace: String,
    /// CA bundle the instances' certificates must chain to.
    pub ca: PathBuf,
    /// The name their certificates must carry (default: `<svc>.<ns>.svc.<dns.domain>`).
    pub server_name: String,
    /// This node's certificate and key, presented to instances that ask (mTLS, mesh mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Where a proxy listener sends traffic: `<svc>.<ns>` and an optional named port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyTarget {
    pub service: String,
    pub namespace: String,
    /// Named port of the instances; `None`: the instance's only port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// One L4 listener (`[[proxy.tcp]]` or `[[proxy.udp]]`): the same shape for both transports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L4ListenerConfig {
    pub listen: SocketAddr,
    /// Where connections go; with `sni`, those whose ClientHello names no `sni` entry (`None`:
    /// they are closed).
    #[serde(flatten)]
    pub target: Option<ProxyTarget>,
    /// TCP only: TLS passthrough by SNI. The ClientHello is read (not decrypted) and its
    /// server name picks the target; the bytes read are replayed to the instance.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniRoute>,
    /// TCP: both directions silent this long closes the connection (default `proxy.idle_timeout`).
    /// UDP: a flow with no datagram either way is forgotten (default 30 s).
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// UDP only: most client flows (one descriptor each) at once; a new client past it evicts
    /// the oldest flow. Bounds what a flood of sources can take from the other listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<usize>,
}

/// One `[[proxy.tcp.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SniRoute {
    /// Lowercase; `*.example.com` matches one label under `example.com` (exact names win).
    pub name: String,
    #[serde(flatten)]
    pub target: ProxyTarget,
}

impl L4ListenerConfig {
    /// The `sni` entry a ClientHello naming `sni` goes to: an exact name, then a `*.` name one
    /// label up. `None`: the listener's own target (if it has one).
    pub fn sni_route(&self, sni: Option<&str>) -> Option<usize> {
        let name = sni?;
        self.sni.iter().position(|r| r.name == name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.sni
                .iter()
                .position(|r| r.name.strip_prefix("*.") == Some(parent))
        })
    }
}

/// Default `max_flows` of a UDP listener.
pub const DEFAULT_MAX_FLOWS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpListenerConfig {
    pub listen: SocketAddr,
    /// HTTPS: TLS terminated here, ALPN choosing HTTP/2 or HTTP/1.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsServerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Etcd,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryConfig {
    pub backend: Backend,
    /// TTL of the lease this daemon holds its registrations under; a dead daemon's entries vanish
    /// after it.
    #[serde(serialize_with = "ser_duration")]
    pub lease_ttl: Duration,
    /// Full re-list and diff against the snapshot, to catch anything a watch could have missed.
    #[serde(serialize_with = "ser_duration")]
    pub resync_interval: Duration,
    /// Name of this node, stamped on registrations that do not set one. Defaults to the hostname.
    pub node: String,
    /// The address registrations made here without an IP get (`svcd register` without `--ip`,
    /// `svcd exec`). Unset: detected (the address of the default route's interface) with the
    /// etcd backend, 127.0.0.1 with the embedded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_ip: Option<std::net::IpAddr>,
    /// A consumer node: it serves DNS and the proxies from the registry but owns no
    /// registrations (the API answers writes with 403; its etcd user may be read-only).
    pub read_only: bool,
    pub etcd: EtcdConfig,
    #[serde(rename = "static")]
    pub static_instances: Vec<StaticInstance>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub keepalive_interval: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub keepalive_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(
        serialize_with = "ser_redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub password: Option<String>,
    /// The password read from this file (trailing newline dropped) at start and on SIGHUP, so
    /// it need not sit in the config file; exclusive with `password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS to etcd; files are read at start and again on SIGHUP (rotation without restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTlsConfig>,
}

/// TLS to etcd: the CA that signed etcd's server certificates, and optionally this node's
/// client certificate (etcd's `--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EtcdTlsConfig {
    pub ca: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The name to check etcd's certificate against, when it is not the endpoint's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A registration written in the config file, for things outside the cluster (a managed database).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StaticInstance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    #[serde(flatten)]
    pub instance: Instance,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownConfig {
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    /// After SIGTERM, how long everything keeps serving — `/readyz` already 503 and this node's
    /// registrations already `draining` — before the proxies stop accepting: time for load
    /// balancers and other nodes to stop sending.
    #[serde(serialize_with = "ser_duration")]
    pub readiness_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter, e.g. `info,svcd_registry=debug`.
    pub level: String,
    pub format: LogFormat,
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_redacted<S: Serializer>(_: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

impl Config {
    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("Config serializes to TOML")
    }
}

// ---- HTTP proxy settings (`[[proxy.routes]]`, `[proxy.l7]`) and passive health
// (`[proxy.outlier]`).

/// Longest request timeout (global or per route): the HTTP latency histograms' buckets reach it.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// Client identities (URI or DNS SANs of a certificate an HTTPS listener verified) the
    /// route serves; others, and clients without one, are answered 403. Empty: everyone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
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
    /// One INFO event per request (target `svcd::access`): client, method, host, path, status,
    /// service, time to the response head. Off by default.
    pub access_log: bool,
    /// HTTP/1.1 requests served by svcd's own exchange loop (one task per client connection,
    /// heads parsed once, upstream connections from the worker's pool), and hyper's bodiless
    /// requests to HTTP/1.1 instances sent over that pool (the bridge); off, hyper and
    /// hyper-util serve every request. Unusual requests go to hyper either way.
    pub http1_fast_path: bool,
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
