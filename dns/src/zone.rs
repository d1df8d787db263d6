//! Which part of the cluster zone a query name points at (Kubernetes DNS naming).
//!
//! ```text
//! <domain>                                   apex: SOA, NS
//! dns-version.<domain>                       TXT
//! svc.<domain>, <ns>.svc.<domain>            empty non-terminals
//! <svc>.<ns>.svc.<domain>                    A / AAAA of healthy instances
//! <id>.<svc>.<ns>.svc.<domain>               A / AAAA of one instance
//! _<port>._<proto>.<svc>.<ns>.svc.<domain>   SRV
//! <reversed ip>.in-addr.arpa / ip6.arpa      PTR of registered instance IPs
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Apex,
    Version,
    /// `svc.<domain>`
    ServiceRoot,
    /// `<ns>.svc.<domain>`
    Namespace(&'a str),
    Service {
        svc: &'a str,
        ns: &'a str,
    },
    Instance {
        id: &'a str,
        svc: &'a str,
        ns: &'a str,
    },
    Srv {
        port: &'a str,
        svc: &'a str,
        ns: &'a str,
    },
    ReverseV4(Ipv4Addr),
    ReverseV6(Ipv6Addr),
    /// In the zone, but no such name can exist.
    Unknown,
    /// Not ours (forward or refuse).
    OutOfZone,
}

/// Classifies lower-case `labels` (left to right, without the root) against `domain` labels.
pub fn classify<'a>(labels: &[&'a str], domain: &[&str]) -> Target<'a> {
    if let Some(t) = reverse(labels) {
        return t;
    }
    if labels.len() < domain.len() || labels[labels.len() - domain.len()..] != *domain {
        return Target::OutOfZone;
    }
    let rel = &labels[..labels.len() - domain.len()];
    match rel {
        [] => Target::Apex,
        ["dns-version"] => Target::Version,
        ["svc"] => Target::ServiceRoot,
        [ns, "svc"] => Target::Namespace(ns),
        [svc, ns, "svc"] => Target::Service { svc, ns },
        [port, proto, svc, ns, "svc"]
            if port.starts_with('_') && (*proto == "_tcp" || *proto == "_udp") =>
        {
            Target::Srv {
                port: &port[1..],
                svc,
                ns,
            }
        }
        [id, svc, ns, "svc"] => Target::Instance { id, svc, ns },
        _ => Target::Unknown,
    }
}

fn reverse<'a>(labels: &[&'a str]) -> Option<Target<'a>> {
    match labels {
        [octets @ .., "in-addr", "arpa"] => {
            if octets.len() != 4 {
                return Some(Target::OutOfZone);
            }
            let mut ip = [0u8; 4];
            for (i, label) in octets.iter().rev().enumerate() {
                ip[i] = label.parse().ok().filter(|_| !label.starts_with('+'))?;
            }
            Some(Target::ReverseV4(Ipv4Addr::from(ip)))
        }
        [nibbles @ .., "ip6", "arpa"] => {
            if nibbles.len() != 32 {
                return Some(Target::OutOfZone);
            }
            let mut ip = 0u128;
            for label in nibbles.iter().rev() {
                let [c] = label.as_bytes() else {
                    return Some(Target::OutOfZone);
                };
                let nibble = (*c as char).to_digit(16)?;
                ip = (ip << 4) | nibble as u128;
            }
            Some(Target::ReverseV6(Ipv6Addr::from(ip)))
        }
        _ => None,
    }
}

/// `d.c.b.a.in-addr.arpa.` / nibble form for an address.
pub fn reverse_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        std::net::IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &[&str] = &["cluster", "local"];

    fn check(name: &str, expect: Target<'_>) {
        let labels: Vec<&str> = name.split('.').collect();
        assert_eq!(classify(&labels, D), expect, "{name}");
    }

    #[test]
    fn names() {
        check("cluster.local", Target::Apex);
        check("dns-version.cluster.local", Target::Version);
        check(
            "web.default.svc.cluster.local",
            Target::Service {
                svc: "web",
                ns: "default",
            },
        );
        check(
            "web-1.web.default.svc.cluster.local",
            Target::Instance {
                id: "web-1",
                svc: "web",
                ns: "default",
            },
        );
        check(
            "_http._tcp.web.default.svc.cluster.local",
            Target::Srv {
                port: "http",
                svc: "web",
                ns: "default",
            },
        );
        check("default.svc.cluster.local", Target::Namespace("default"));
        check("svc.cluster.local", Target::ServiceRoot);
        check("x.y.z.w.v.svc.cluster.local", Target::Unknown);
        check("foo.cluster.local", Target::Unknown);
        check("example.com", Target::OutOfZone);
        check("local", Target::OutOfZone);
        check(
            "5.0.0.10.in-addr.arpa",
            Target::ReverseV4("10.0.0.5".parse().unwrap()),
        );
        check("0.10.in-addr.arpa", Target::OutOfZone);
        check("999.0.0.10.in-addr.arpa", Target::OutOfZone);
    }

    #[test]
    fn reverse_names_roundtrip() {
        for ip in ["10.0.0.5", "fd00::1"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let name = reverse_name(ip);
            let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
            let t = classify(&labels, D);
            match (ip, t) {
                (std::net::IpAddr::V4(a), Target::ReverseV4(b)) => assert_eq!(a, b),
                (std::net::IpAddr::V6(a), Target::ReverseV6(b)) => assert_eq!(a, b),
                other => panic!("{other:?}"),
            }
        }
    }
}
