//! The request's host, as RFC 9112 §3.2 / §3.2.2 and RFC 9113 §8.3.1 define it: exactly one
//! `Host`, the request-target's authority winning over `Host` in HTTP/1.1 absolute-form, and
//! `:authority` and `host` agreeing in HTTP/2. Anything else is refused with 400 before routing.

use http::header::HOST;
use http::{Request, Version};

/// Why a request's host was refused (the 400 body).
pub type HostError = &'static str;

/// The host to route on and send upstream.
pub fn request_host<B>(req: &Request<B>) -> Result<&str, HostError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let header = match header {
        Some(h) => Some(h.to_str().map_err(|_| "invalid Host")?),
        None => None,
    };
    let host = match (req.uri().authority(), header) {
        (Some(authority), Some(h))
            if req.version() == Version::HTTP_2 && !authority.as_str().eq_ignore_ascii_case(h) =>
        {
            return Err(":authority and host disagree");
        }
        // HTTP/2 :authority, or HTTP/1.1 absolute-form, whose authority replaces Host.
        (Some(authority), _) => authority.as_str(),
        (None, Some(h)) => h,
        (None, None) => return Err("missing Host"),
    };
    if !valid_host(host) {
        return Err("invalid Host");
    }
    Ok(host)
}

/// `uri-host [ ":" port ]`: a reg-name (no userinfo, no spaces) or a bracketed IPv6 literal, and a
/// port of at most 65535.
pub fn valid_host(host: &str) -> bool {
    let port = match host.strip_prefix('[') {
        Some(rest) => {
            let Some((addr, after)) = rest.split_once(']') else {
                return false;
            };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return false;
            }
            match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return false,
                },
            }
        }
        None => {
            let (name, port) = match host.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (host, None),
            };
            let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
            if name.is_empty() || !name.bytes().all(reg_name) {
                return false;
            }
            port
        }
    };
    match port {
        None | Some("") => true,
        Some(p) => {
            p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| n <= 65535)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_host_and_the_targets_authority_wins() {
        let h1 = Version::HTTP_11;
        assert_eq!(request_host(&req(h1, "/x", &["web"])), Ok("web"));
        assert_eq!(
            request_host(&req(h1, "/x", &["web", "other"])),
            Err("more than one Host header")
        );
        // Absolute-form: Host is ignored and replaced by the target's authority.
        assert_eq!(request_host(&req(h1, "http://hb/x", &["other"])), Ok("hb"));
        let h2 = Version::HTTP_2;
        assert_eq!(request_host(&req(h2, "http://web/x", &[])), Ok("web"));
        assert_eq!(request_host(&req(h2, "http://web/x", &["WEB"])), Ok("web"));
        assert_eq!(
            request_host(&req(h2, "http://web/x", &["other"])),
            Err(":authority and host disagree")
        );
        assert_eq!(request_host(&req(h1, "/x", &[])), Err("missing Host"));
    }

    #[test]
    fn host_syntax() {
        for good in [
            "web",
            "web:8080",
            "web.default.svc.cluster.local",
            "10.0.0.1:80",
            "[::1]:80",
            "[fd00::1]",
            "web:",
        ] {
            assert!(valid_host(good), "{good}");
        }
        for bad in [
            "",
            "we b",
            "user@web",
            "web:99999",
            "web:8o",
            "[::1",
            "[zz]:1",
            "[::1]x",
            ":80",
            "a:b:c",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}
