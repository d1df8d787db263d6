/// `svcd config default`: every key with its default value and what it does. This file parses to
/// exactly [`crate::Config::default()`] (tested), and `docs/svcd.example.toml` is a copy of it
/// (tested too), so the documentation cannot drift from the code.
pub const DEFAULT_CONFIG_TOML: &str = r#"# svcd configuration. Every key is optional; the values below are the built-in defaults.
# Precedence: command-line flag > SVCD_* environment variable > this file > default.
# Check a file with: svcd config check FILE

[admin]
# Admin/API listener: /healthz, /readyz, /metrics, /v1/... . svcd refuses to listen on a
# non-loopback address unless token_file is set. "unix:/run/svcd/admin.sock" listens on a unix
# socket (mode 0660) instead, which the CLI uses by default when it exists.
listen = "127.0.0.1:9901"
# Only /metrics, /healthz and /readyz, for Prometheus on another host while the API stays local
# (with token_file set, /metrics needs the token here too).
# metrics_listen = "0.0.0.0:9902"
# File holding a bearer token required on every admin request except /healthz and /readyz.
# token_file = "/etc/svcd/admin.token"
# HTTPS on listen and metrics_listen (same keys as [proxy.http.tls] below); with client_ca, a
# verified client certificate also lets a non-loopback listen go without token_file.
# [admin.tls]
# cert = "/etc/svcd/tls/admin.crt"
# key = "/etc/svcd/tls/admin.key"
# metrics_listen's own TLS in place of [admin.tls] there (same keys), e.g. HTTPS with
# Prometheus' client CA while listen stays plaintext on loopback or a unix socket.
# [admin.metrics_tls]
# cert = "/etc/svcd/tls/metrics.crt"
# key = "/etc/svcd/tls/metrics.key"
# client_ca = "/etc/svcd/tls/prometheus-ca.crt"
# One svcd_endpoint_state series per endpoint on /metrics (per-service counts by state,
# svcd_service_endpoints, are always there). Off by default: at 100k endpoints it is 100k series.
endpoint_state_series = false
# Above this many services, svcd_service_endpoints keeps per-service series only for services
# not fully healthy (the ones to look at; at most this many) and folds the rest into
# service="_folded" (sums by state), so a scrape stays small at a million endpoints.
max_service_series = 10000

[dns]
# DNS responder, UDP and TCP on each address: one, or a list (e.g. ["127.0.0.1:8600",
# "169.254.20.10:53"] for a node-local address on :53 that resolv.conf can name).
listen = "127.0.0.1:8600"
# Cluster domain: <svc>.<ns>.svc.<domain>
domain = "cluster.local"
# TTL of positive answers, and of negative answers (NXDOMAIN/NODATA, SOA minimum).
ttl = "5s"
negative_ttl = "5s"
# Most address records in one UDP answer.
max_answers = 20
# Upstream resolvers for names outside the domain: "IP[:PORT]", "resolv.conf" (the nameservers
# of /etc/resolv.conf, re-read on SIGHUP; svcd's own addresses skipped), or the absolute path of
# a file in that format. Answers are cached. A forwarding loop (a query svcd forwards coming back
# to it) stops forwarding and is logged. Empty: such queries are REFUSED. For svcd as a node's
# only nameserver: forward = ["resolv.conf"], with apps pointed at svcd (docs/deploy.md).
forward = []
# UDP worker threads, one socket each (SO_REUSEPORT); default: one per core.
# workers = 2

[dns.rrl]
# Response rate limiting over UDP per client network (as Knot and BIND): answers per second per
# network; past it every `slip`-th answer goes out truncated (honest clients retry over TCP,
# spoofed ones cannot) and the rest are dropped. 0 = off; set it when dns.listen is reachable
# from other hosts (the node-local default serves only this node's apps).
rate = 0
slip = 2
ipv4_prefix = 24
ipv6_prefix = 56

[dns.tcp]
# DNS over TCP: open connections in total and per client address (past either, new ones are
# closed at once), and how long a connection may sit without a complete query.
max_connections = 1024
max_per_client = 16
idle_timeout = "10s"

[dns.forwarding]
# Names outside the zone (dns.forward): questions waiting on an upstream at once, in all and per
# UDP worker thread (DNS over TCP counts as one more worker). Identical questions (name, type,
# class, DO bit) waiting together are asked once and count once. Past either bound a new question
# is answered SERVFAIL at once and counted (svcd_dns_forward_overflow_total), so a flood of
# outside names to a slow or silent upstream costs bounded memory and never delays the zone.
max_in_flight = 256
max_in_flight_per_worker = 128
# How long one forwarded question may take in all (over UDP the resolver sends it up to three
# times within it); past it the clients waiting on it get SERVFAIL. See docs/dns.md.
timeout = "1s"

[proxy]
# Worker threads for the proxies, each running its own event loop with its own socket on every
# TCP listener (SO_REUSEPORT when more than one: the kernel spreads new connections over them);
# default: one per core. Takes effect at restart.
# workers = 2
# Open L4 (TCP) connections at most; excess connections are closed at once and counted.
max_connections = 10000
# Forward TCP with splice(2): bytes move kernel to kernel. false: user-space copy.
splice = true
# Upstream connect timeout, and instances tried per connection (refused/timed out → next).
connect_timeout = "1s"
connect_attempts = 3
# Close a TCP connection silent both ways this long (default for [[proxy.tcp]] entries).
idle_timeout = "1h"

# L4 listeners (reloadable on SIGHUP without dropping open connections):
# [[proxy.tcp]]
# listen = "127.0.0.1:15432"
# service = "db.default"          # <svc> or <svc>.<ns>
# port = "postgres"               # named port; optional when instances have one port
# idle_timeout = "1h"
#
# [[proxy.udp]]
# listen = "127.0.0.1:15353"
# service = "dns-cache.default"
# idle_timeout = "30s"            # a flow with no datagram either way is forgotten
# max_flows = 4096                # clients at once (one descriptor each); the oldest is evicted

# HTTP proxy listeners; routes requests by Host to healthy instances. Several allowed;
# `http = []` under [proxy] disables the HTTP proxy.
[[proxy.http]]
listen = "127.0.0.1:8080"
# HTTPS on this listener (docs/tls.md): ALPN picks HTTP/2 or HTTP/1.1; files are PEM and are
# re-read on SIGHUP and when they change on disk (a bad file keeps the old one).
# [proxy.http.tls]
# cert = "/etc/svcd/tls/web.crt"           # chain, leaf first
# key = "/etc/svcd/tls/web.key"
# certs = [{ cert = "...", key = "..." }]  # more, chosen by SNI (their DNS SANs, *. too);
#                                          # the first serves clients without a matching SNI
# client_ca = "/etc/svcd/tls/clients.pem"  # require client certificates from this CA
# allow = ["spiffe://example.org/ns/default/svc/web"]  # identities let in; others get 403
# handshake_timeout = "5s"

# Explicit HTTP routes; longest path_prefix of the request's host wins. Requests matching no
# route go to the service their Host names: <svc>, <svc>.<ns> or <svc>.<ns>.svc.<domain>.
# [[proxy.routes]]
# host = "api.example.com"
# path_prefix = "/v1"
# service = "api.default"
# port = "http"                   # named port; optional when instances have one port
# timeout = "5s"                  # as proxy.l7.request_timeout, for this route
# retries = 1                     # default proxy.l7.retries

[proxy.l7]
# round_robin (smooth weighted) | least_request (weighted power of two choices on in-flight
# requests). Both honour each instance's registered weight.
balance = "round_robin"
# Per-service override: { "api.default" = "least_request" }
balance_by_service = {}
# Extra attempts on other instances for idempotent requests that failed before any response.
retries = 2
# Time for an instance to send its response head, counted from the moment the whole request
# (head and body) has been sent to it: it bounds the backend, never a slow client upload.
# At most 5m.
request_timeout = "15s"
# Limits against abusive clients. header_read_timeout also bounds how long an idle HTTP/1.1
# keep-alive connection waits for its next request (as HAProxy's http-keep-alive defaults to
# http-request); idle_timeout closes HTTP/2 and upgraded connections silent that long.
header_read_timeout = "10s"
idle_timeout = "1m"
max_header_bytes = 65536
max_headers = 100
max_concurrent_streams = 256
max_pending_accept_reset_streams = 20
# Upstream keep-alive pool. An instance that leaves the registry takes its idle connections with
# it; a reload applies new limits to the idle connections at once.
pool_idle_timeout = "1m 30s"
pool_max_idle_per_host = 256
# One log event per request (target svcd::access; with --log-format json, one JSON object each):
# client, method, host, path, status, service, milliseconds to the response head.
access_log = false
# HTTP/1.1 requests on svcd's own exchange loop (heads parsed once, upstream connections kept per
# worker), and the bodiless requests hyper serves (HTTP/2 clients) sent to HTTP/1.1 instances over
# those same connections; false sends every request through hyper and hyper-util's client.
# HTTP/2, upgrades, HTTP/1.0, Expect and anything malformed go to hyper either way.
http1_fast_path = true

# Passive health: instances failing in the proxy are ejected, locally, from the proxy and from
# this node's DNS answers.
[proxy.outlier]
# Consecutive failures of an instance, as one proxy plane (tcp or http) saw them, that eject it
# from this node (0 disables). Only the backend's faults count: connect refused or timed out,
# reset by the backend, no response within the request timeout, 5xx, a malformed response.
# A client's abort, cancel, slow upload or malformed body never does.
consecutive_failures = 5
# An ejection lasts this x the instance's number of ejections.
base_ejection_time = "30s"
max_ejection_percent = 50
# Below this percentage of usable instances (of those neither draining nor pending their first
# check), a service is in panic: balance_all spreads over all of those; fail keeps to the usable
# ones.
panic_threshold = 50
panic_mode = "balance_all"

[registry]
# "embedded": in-process store (single node, nothing else needed).
# "etcd": shared store for a cluster; set registry.etcd.endpoints. Giving endpoints without a
# backend selects etcd.
backend = "embedded"
# Lease TTL of this daemon's registrations: entries of a dead daemon vanish after it.
lease_ttl = "10s"
# Full re-list and diff against the snapshot, a safety net under the watch.
resync_interval = "5m"
# Name of this node, stamped on registrations that do not name one. Default: the hostname.
# node = "node-1"
# The address `svcd register` (without --ip) and `svcd exec` publish. Default: with etcd, the
# address of the interface of the default route (other nodes must reach it); embedded: 127.0.0.1.
# advertise_ip = "10.0.0.5"
# A consumer node: serves DNS and the proxies from the registry, owns no registrations (the API
# answers writes 403). Its etcd user then needs read access only (docs/registry.md, RBAC).
read_only = false

[registry.etcd]
endpoints = []
connect_timeout = "5s"
request_timeout = "10s"
# HTTP/2 keepalive pings to etcd, so a dead connection is noticed.
keepalive_interval = "10s"
keepalive_timeout = "5s"
# Credentials: the password from a file (or the SVCD_ETCD_PASSWORD environment variable),
# re-read on SIGHUP; `password = "..."` works too but keeps the secret in this file.
# username = "svcd"
# password_file = "/etc/svcd/etcd-password"

# TLS to etcd (endpoints without a scheme then use https). cert/key: a client certificate, for
# etcd's --client-cert-auth. The files are re-read on SIGHUP (rotation without a restart).
# [registry.etcd.tls]
# ca = "/etc/svcd/etcd-ca.pem"
# cert = "/etc/svcd/etcd-client.pem"
# key = "/etc/svcd/etcd-client-key.pem"
# server_name = "etcd.internal"   # when etcd's certificate does not name the endpoint's host

# Static registrations, for things outside the cluster. Held by this daemon's lease.
# [[registry.static]]
# service = "db.default"          # <svc> or <svc>.<ns>
# id = "db-1"
# ip = "10.0.0.9"
# ports = { postgres = 5432 }
# protocol = "tcp"                # tcp | http | h2 | grpc

[shutdown]
# On SIGTERM/SIGINT, in order: /readyz answers 503 and this node's registrations are marked
# draining in the store (other nodes stop sending); everything keeps serving for
# readiness_grace (give load balancers time to notice, e.g. "5s" under Kubernetes); then the
# proxies stop accepting and in-flight work gets up to drain_timeout, while DNS and the admin API
# still answer; last, the lease is revoked and svcd exits 0.
readiness_grace = "0s"
drain_timeout = "10s"

[consul]
# A Consul-compatible view of the registry (docs/consul.md): the HTTP subset Consul clients and
# Prometheus's consul_sd_configs use, on this address, and Consul-style DNS names
# (<svc>.service.<dns_domain>) on the DNS listener. Off unless listen is set. Takes the admin
# API's token (admin.token_file), which a non-loopback address requires.
# listen = "127.0.0.1:8500"
dns_domain = "consul"
# The datacenter reported to clients and accepted in ?dc= and <svc>.service.<dc>.<dns_domain>.
datacenter = "dc1"
# A Consul service has one Port: the instance's port of this name (else its first by name).
# Agent registrations write their Port under it.
port_name = "http"
# Blocking queries (?index=) waiting at once; past it a query gets 429.
max_blocking_queries = 4096

[xds]
# The xDS control plane (docs/xds.md): ADS for Envoy and proxyless gRPC (xds:///<svc>.<ns>),
# clusters <svc>.<ns>:<port> with the endpoints DNS serves. Off unless listen is set; IP:PORT or
# unix:/PATH. `svcd xds-bootstrap` prints the clients' bootstrap files. Optional [xds.tls] as
# [admin.tls] (cert, key, client_ca, allow).
# listen = "127.0.0.1:18000"
# Streams open at once; past it a stream is refused (RESOURCE_EXHAUSTED).
max_streams = 4096
# Resource names in one request; past it the stream is ended (INVALID_ARGUMENT).
max_names = 100000

[log]
# RUST_LOG-style filter (RUST_LOG itself wins when set).
level = "info"
# "human" or "json".
format = "human"
"#;
