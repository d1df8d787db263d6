//! Forwarding names outside the zone to configured upstreams (hickory-resolver, with its
//! cache), so apps can use svcd as their only nameserver. Only built when `dns.forward` is set;
//! never an open resolver otherwise.
//!
//! Upstreams are addresses or the nameservers of a resolv.conf file (svcd's own addresses
//! skipped). A forwarding loop — svcd → an upstream → … → svcd — is found as CoreDNS's `loop`
//! plugin finds it: svcd asks itself a random name under `svcd-loop-check.`; if that query
//! comes back to it through the upstreams, forwarding stops (SERVFAIL at once rather than
//! queries circling until they time out), and the log and `svcd_dns_forward_loop` say so.
//!
//! One lookup takes at most `dns.forwarding.timeout` in all, the resolver's retransmissions over
//! UDP included; how many run at once, and which client questions share one, is
//! [`crate::inflight`]'s business.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use svcd_config::ForwardTarget;
use tracing::{error, info, warn};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

pub struct Forwarder {
    resolver: TokioResolver,
    /// The upstreams it was built for.
    pub upstreams: Vec<SocketAddr>,
    /// The name svcd asks itself to find a loop.
    pub probe: Name,
    /// Times the probe arrived here to be forwarded. More arrivals than probes sent is a loop.
    probe_seen: AtomicU32,
    /// Probes this server sent itself (a probe lost on the way is sent again).
    probes_sent: AtomicU32,
    pub looped: AtomicBool,
    /// The whole budget of one lookup (`dns.forwarding.timeout`).
    pub timeout: Duration,
}

/// The upstream addresses `targets` name: servers as given, resolv.conf files read now
/// (nameservers on port 53), minus `own` (svcd's listen addresses: asking ourselves is a loop).
pub fn upstreams(targets: &[ForwardTarget], own: &[SocketAddr]) -> Vec<SocketAddr> {
    let is_own = |ns: &SocketAddr| {
        own.iter().any(|a| {
            a.port() == ns.port()
                && (a.ip() == ns.ip() || (a.ip().is_unspecified() && ns.ip().is_loopback()))
        })
    };
    let mut out = Vec::new();
    for target in targets {
        let found = match target {
            ForwardTarget::Server(addr) => vec![*addr],
            ForwardTarget::ResolvConf(path) => resolv_conf_servers(path),
        };
        for ns in found {
            if is_own(&ns) {
                info!(nameserver = %ns, "dns.forward: skipping svcd's own address");
            } else if !out.contains(&ns) {
                out.push(ns);
            }
        }
    }
    out
}

fn resolv_conf_servers(path: &Path) -> Vec<SocketAddr> {
    let parsed = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|e| e.to_string())
        });
    match parsed {
        Ok((config, _)) => config
            .name_servers()
            .iter()
            .map(|ns| SocketAddr::new(ns.ip, 53))
            .collect(),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "dns.forward: cannot read nameservers");
            Vec::new()
        }
    }
}

impl Forwarder {
    pub fn new(upstreams: &[SocketAddr], timeout: Duration) -> Result<Self, String> {
        let label = format!("{:016x}", rand::random::<u64>());
        let probe =
            Name::from_ascii(format!("{label}.svcd-loop-check.")).map_err(|e| e.to_string())?;
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
        // hickory-resolver 0.26 spends at most this on a lookup across its name servers; over UDP
        // it sends the query again (from a new port) every max(333 ms, 1.2 x the server's
        // smoothed RTT), three sends at most, within it. `attempts` is not read by 0.26.
        opts.timeout = timeout;
        opts.ndots = 0;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())?;
        Ok(Forwarder {
            resolver,
            upstreams: upstreams.to_vec(),
            probe,
            probe_seen: AtomicU32::new(0),
            probes_sent: AtomicU32::new(0),
            looped: AtomicBool::new(false),
            timeout,
        })
    }

    /// Counts a probe about to be sent (before it is: its arrival must not look like a loop).
    pub fn probe_sending(&self) {
        self.probes_sent.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether `name` is the loop probe; counts its arrivals and flags a loop when more arrive
    /// than were sent (one came back through the upstreams).
    fn is_probe(&self, name: &Name) -> bool {
        if !name.eq_case(&self.probe) && name != &self.probe {
            return false;
        }
        let seen = self.probe_seen.fetch_add(1, Ordering::SeqCst) + 1;
        if seen > self.probes_sent.load(Ordering::SeqCst)
            && !self.looped.swap(true, Ordering::Relaxed)
        {
            error!(
                upstreams = ?self.upstreams,
                "DNS forwarding loop: a query svcd forwarded came back to it; forwarding stopped \
                 (out-of-zone names get SERVFAIL). Point dns.forward at resolvers that do not \
                 send back to svcd, then reload"
            );
        }
        true
    }

    /// Whether a question for `name` must not go upstream: forwarding stopped on a loop. Called
    /// once per client question (the probe's arrivals are counted here, before identical
    /// questions are merged, or a probe coming back would join itself and never be seen).
    pub fn stopped_for(&self, name: &Name) -> bool {
        self.is_probe(name);
        self.looped.load(Ordering::Relaxed)
    }

    /// The upstream's answer records and rcode: SERVFAIL when no upstream answered within
    /// [`Self::timeout`].
    pub async fn lookup(&self, name: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        // The resolver keeps to its timeout between rounds; this makes it the whole budget.
        match tokio::time::timeout(self.timeout, self.resolver.lookup(fqdn, qtype)).await {
            Ok(Ok(lookup)) => (ResponseCode::NoError, lookup.answers().to_vec()),
            Ok(Err(e)) if e.is_nx_domain() => (ResponseCode::NXDomain, Vec::new()),
            Ok(Err(e)) if e.is_no_records_found() => (ResponseCode::NoError, Vec::new()),
            Ok(Err(_)) | Err(_) => (ResponseCode::ServFail, Vec::new()),
        }
    }
}
