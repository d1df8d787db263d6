//! Request → service. Explicit routes (`[[proxy.routes]]`, by host and longest path prefix) come
//! first; otherwise the Host names the service: `<svc>`, `<svc>.<ns>` or `<svc>.<ns>.svc.<domain>`
//! (any port ignored). Matching borrows from the request and the router; nothing is allocated.

use std::collections::HashMap;
use std::time::Duration;

use svcd_config::HttpRoute;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target<'a> {
    pub service: &'a str,
    pub namespace: &'a str,
    /// Named port; `None`: the instance's only (or `http`/`h2`/`grpc`) port.
    pub port: Option<&'a str>,
    pub timeout: Duration,
    pub retries: usize,
    /// The route's `allow` list (empty: everyone; always empty for Host-name routing).
    pub allow: &'a [String],
}

struct Prefix {
    prefix: String,
    route: HttpRoute,
}

pub struct Router {
    /// Host → its routes, longest prefix first.
    by_host: HashMap<String, Vec<Prefix>, foldhash::fast::FixedState>,
    /// `.svc.<domain>`.
    cluster_suffix: String,
    timeout: Duration,
    retries: usize,
}

/// Host names longer than this are not service names (two labels and a domain fit easily).
pub const MAX_HOST: usize = 253;

impl Router {
    pub fn new(routes: &[HttpRoute], domain: &str, timeout: Duration, retries: usize) -> Self {
        let mut by_host: HashMap<String, Vec<Prefix>, foldhash::fast::FixedState> =
            HashMap::default();
        for r in routes {
            by_host.entry(r.host.clone()).or_default().push(Prefix {
                prefix: r.path_prefix.clone(),
                route: r.clone(),
            });
        }
        for list in by_host.values_mut() {
            list.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        }
        Router {
            by_host,
            cluster_suffix: format!(".svc.{domain}"),
            timeout,
            retries,
        }
    }

    /// The target for a request to `host` (Host header or :authority) and `path`.
    pub fn route<'a>(
        &'a self,
        host: &'a str,
        path: &str,
        buf: &'a mut [u8; MAX_HOST],
    ) -> Option<Target<'a>> {
        let host = lower(strip_port(host)?, buf)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(list) = self.by_host.get(host) {
            if let Some(p) = list.iter().find(|p| path.starts_with(&p.prefix)) {
                let r = &p.route;
                return Some(Target {
                    service: &r.target.service,
                    namespace: &r.target.namespace,
                    port: r.target.port.as_deref(),
                    timeout: r.timeout.unwrap_or(self.timeout),
                    retries: r.retries.unwrap_or(self.retries),
                    allow: &r.allow,
                });
            }
        }
        let name = host
            .strip_suffix(self.cluster_suffix.as_str())
            .unwrap_or(host);
        let (service, namespace) = match name.split_once('.') {
            None => (name, "default"),
            Some((svc, ns)) if !ns.contains('.') => (svc, ns),
            Some(_) => return None,
        };
        if service.is_empty() || namespace.is_empty() {
            return None;
        }
        Some(Target {
            service,
            namespace,
            port: None,
            timeout: self.timeout,
            retries: self.retries,
            allow: &[],
        })
    }
}

/// `host[:port]` → `host`; IP literals are not service names.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    (!name.is_empty()).then_some(name)
}

/// `host` in lower case: itself when it already is (the common case), else a copy in `buf`.
fn lower<'a>(host: &'a str, buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(host);
    }
    let out = buf.get_mut(..host.len())?;
    for (o, b) in out.iter_mut().zip(host.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcd_config::ProxyTarget;

    fn route(host: &str, prefix: &str, svc: &str) -> HttpRoute {
        HttpRoute {
            host: host.into(),
            path_prefix: prefix.into(),
            target: ProxyTarget {
                service: svc.into(),
                namespace: "default".into(),
                port: None,
            },
            timeout: Some(Duration::from_secs(1)),
            retries: None,
            allow: Vec::new(),
        }
    }

    fn router() -> Router {
        Router::new(
            &[
                route("api.example.com", "/", "web"),
                route("api.example.com", "/v1", "api"),
                route("api.example.com", "/v1/admin", "admin"),
            ],
            "cluster.local",
            Duration::from_secs(15),
            2,
        )
    }

    fn svc<'a>(
        r: &'a Router,
        host: &'a str,
        path: &str,
        buf: &'a mut [u8; MAX_HOST],
    ) -> Option<(&'a str, &'a str)> {
        r.route(host, path, buf).map(|t| (t.service, t.namespace))
    }

    #[test]
    fn host_names_map_to_services() {
        let r = router();
        let b = &mut [0; MAX_HOST];
        assert_eq!(svc(&r, "web", "/", b), Some(("web", "default")));
        assert_eq!(svc(&r, "web:8080", "/", b), Some(("web", "default")));
        assert_eq!(svc(&r, "web.prod", "/", b), Some(("web", "prod")));
        assert_eq!(
            svc(&r, "Web.Prod.svc.cluster.local", "/", b),
            Some(("web", "prod"))
        );
        assert_eq!(
            svc(&r, "web.prod.svc.cluster.local.:80", "/", b),
            Some(("web", "prod"))
        );
        assert_eq!(svc(&r, "a.b.c", "/", b), None);
        assert_eq!(svc(&r, "[::1]:80", "/", b), None);
        assert_eq!(svc(&r, "", "/", b), None);
        assert_eq!(svc(&r, "web:x", "/", b), None);
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router();
        let b = &mut [0; MAX_HOST];
        assert_eq!(
            svc(&r, "api.example.com", "/v1/admin/x", b),
            Some(("admin", "default"))
        );
        assert_eq!(
            svc(&r, "API.example.com:443", "/v1/x", b),
            Some(("api", "default"))
        );
        assert_eq!(
            svc(&r, "api.example.com", "/v2", b),
            Some(("web", "default"))
        );
        let t = r.route("api.example.com", "/v1", b).unwrap();
        assert_eq!((t.timeout, t.retries), (Duration::from_secs(1), 2));
    }
}
