//! Checks of `[consul]`: the Consul-compatible API's listener, its DNS domain and datacenter,
//! the port name a Consul `Port` maps to, and the bound on parked blocking queries.

use super::Checker;
use crate::model::*;
use crate::names;
use crate::raw::*;

pub(super) fn consul(c: &mut Checker, raw: RawConsul, admin: &AdminConfig) -> ConsulConfig {
    let listen = raw
        .listen
        .map(|text| c.addr("consul.listen", Some(text), "127.0.0.1:8500"));
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && admin.token_file.is_none() {
            c.err(
                "consul.listen",
                format!(
                    "{addr} is not a loopback address; set admin.token_file (the Consul API takes \
                     the admin API's token) to expose it"
                ),
            );
        }
    }
    let dns_domain = raw
        .dns_domain
        .unwrap_or_else(|| "consul".into())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if dns_domain.is_empty() || dns_domain.len() > 200 {
        c.err("consul.dns_domain", "must be 1..=200 characters");
    }
    for label in dns_domain.split('.') {
        if let Err(e) = names::check_label(label) {
            c.err("consul.dns_domain", format!("label {e}"));
            break;
        }
    }
    let datacenter = raw
        .datacenter
        .unwrap_or_else(|| "dc1".into())
        .to_ascii_lowercase();
    if let Err(e) = names::check_label(&datacenter) {
        c.err("consul.datacenter", format!("{datacenter:?}: {e}"));
    }
    let port_name = raw.port_name.unwrap_or_else(|| "http".into());
    if let Err(e) = names::check_port_name(&port_name) {
        c.err("consul.port_name", format!("port name {e}"));
    }
    let max_blocking_queries = c.range(
        "consul.max_blocking_queries",
        raw.max_blocking_queries,
        4096,
        1,
        1_000_000,
    );
    ConsulConfig {
        listen,
        dns_domain,
        datacenter,
        port_name,
        max_blocking_queries,
    }
}
