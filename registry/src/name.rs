//! [`ServiceName`]: the one spelling of a service, `"<svc>.<ns>"` — the snapshot's key, the
//! metrics label, the name in logs and in the balancer and health tables.
//!
//! It lives here, in the lowest crate that names services (the snapshot is keyed by it); `svcd-lb`
//! re-exports it for the proxies and the binary.

use std::fmt;
use std::sync::Arc;

/// `"<svc>.<ns>"`, shared (`Arc<str>`): cloning it into a table or a metric label is a refcount.
/// Equality, order and hash are those of the full string, so maps keyed by it are looked up by
/// `&str`.
#[derive(Clone)]
pub struct ServiceName {
    full: Arc<str>,
    /// Where the namespace starts in `full` (after the dot).
    split: usize,
}

impl ServiceName {
    /// `service` and `namespace` are DNS labels (no dots), as the registry's keys guarantee.
    pub fn new(service: &str, namespace: &str) -> Self {
        ServiceName {
            full: Arc::from(format!("{service}.{namespace}")),
            split: service.len() + 1,
        }
    }

    /// Parses `"<svc>.<ns>"` (the form configs and `svcd` commands take).
    pub fn parse(name: &str) -> Option<Self> {
        let (service, namespace) = name.split_once('.')?;
        (!service.is_empty() && !namespace.is_empty() && !namespace.contains('.'))
            .then(|| ServiceName::new(service, namespace))
    }

    /// The full `"<svc>.<ns>"`.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.full
    }

    #[inline]
    pub fn service(&self) -> &str {
        &self.full[..self.split - 1]
    }

    #[inline]
    pub fn namespace(&self) -> &str {
        &self.full[self.split..]
    }

    /// The shared string, for maps keyed by `Arc<str>`.
    pub fn shared(&self) -> &Arc<str> {
        &self.full
    }
}

impl PartialEq for ServiceName {
    fn eq(&self, other: &Self) -> bool {
        self.full == other.full
    }
}

impl Eq for ServiceName {}

impl PartialOrd for ServiceName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.full.cmp(&other.full)
    }
}

impl std::hash::Hash for ServiceName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so `Borrow<str>` lookups find it.
        (*self.full).hash(state)
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.full, f)
    }
}

#[cfg(test)]
mod tests {
    use super::ServiceName;

    #[test]
    fn parts_and_parse() {
        let n = ServiceName::new("web", "prod");
        assert_eq!(
            (n.as_str(), n.service(), n.namespace()),
            ("web.prod", "web", "prod")
        );
        assert_eq!(ServiceName::parse("web.prod"), Some(n));
        assert_eq!(ServiceName::parse("web"), None);
        assert_eq!(ServiceName::parse("a.b.c"), None);
        assert_eq!(ServiceName::parse(".b"), None);
    }
}
