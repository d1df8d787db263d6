//! Forwarding names outside the zone to configured upstreams (hickory-resolver), so apps can use
//! svcd as their only nameserver. Only built when `dns.forward` is set; never an open resolver
//! otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

pub struct Forwarder {
    resolver: TokioResolver,
}

impl Forwarder {
    pub fn new(upstreams: &[SocketAddr]) -> Result<Self, String> {
        let servers = upstreams
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())?;
        Ok(Forwarder { resolver })
    }

    /// Upstream's answer records and rcode.
    pub async fn forward(&self, name: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        match self.resolver.lookup(fqdn, qtype).await {
            Ok(lookup) => (ResponseCode::NoError, lookup.answers().to_vec()),
            Err(e) if e.is_nx_domain() => (ResponseCode::NXDomain, Vec::new()),
            Err(e) if e.is_no_records_found() => (ResponseCode::NoError, Vec::new()),
            Err(_) => (ResponseCode::ServFail, Vec::new()),
        }
    }
}
