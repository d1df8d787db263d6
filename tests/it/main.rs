//! svcd integration tests: one binary, real processes, real sockets, real etcd.
//!
//! Tests that need etcd start their own (`support::etcd::Etcd`) on free ports with a temporary
//! data dir; a missing `etcd` binary fails the test with the install hint, never skips it.

mod support;

mod admin_surface;
mod api_watch;
mod blame;
mod bridge;
mod config_cli;
mod conformance;
mod consul;
mod deploy;
mod dns;
mod dns_abuse;
mod dns_forward;
mod fast_path;
mod faults;
mod h2_resets;
mod health;
mod hostile_backend;
mod lb;
mod lifecycle;
mod limits;
mod proxy_http;
mod proxy_l4;
mod proxy_l4_series;
mod proxy_udp;
mod registry_e2e;
mod resolver;
mod security;
mod soak;
mod store_conformance;
mod tls;
mod tls_haproxy;
mod tls_passthrough;
mod tls_upstream;
mod xds;
