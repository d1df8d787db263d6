//! Key layout in the store: `/svcd/v1/endpoints/<namespace>/<service>/<instance-id>`.
//! Documented in `docs/registry.md` so any etcd client can register.

use std::fmt;

use svcd_config::{names, FieldError};

/// Prefix of every endpoint key; the watch covers exactly this range.
pub const ENDPOINTS_PREFIX: &str = "/svcd/v1/endpoints/";

/// The store's identity: a random value the first daemon to find the key absent writes (once,
/// without a lease). A store wiped, rebuilt or restored into a new cluster has none or another
/// one, whatever its cluster id and revision say (see `docs/registry.md`).
pub const STORE_MARKER_KEY: &str = "/svcd/v1/store-id";

/// Identifies one instance: namespace, service and instance id, each an RFC 1123 label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub namespace: String,
    pub service: String,
    pub id: String,
}

impl InstanceKey {
    /// Checks all three labels; the error names the field.
    pub fn new(namespace: &str, service: &str, id: &str) -> Result<Self, FieldError> {
        names::check_label(namespace).map_err(|e| FieldError::new("namespace", e))?;
        names::check_label(service).map_err(|e| FieldError::new("service", e))?;
        names::check_label(id).map_err(|e| FieldError::new("id", e))?;
        Ok(InstanceKey {
            namespace: namespace.into(),
            service: service.into(),
            id: id.into(),
        })
    }

    pub fn to_key(&self) -> String {
        format!(
            "{ENDPOINTS_PREFIX}{}/{}/{}",
            self.namespace, self.service, self.id
        )
    }

    /// Parses a store key; `None` for anything that is not a well-formed endpoint key.
    pub fn parse(key: &str) -> Option<Self> {
        let (namespace, service, id) = parse_parts(key)?;
        Some(InstanceKey {
            namespace: namespace.into(),
            service: service.into(),
            id: id.into(),
        })
    }
}

/// A store key's namespace, service and id, borrowed from it (the snapshot writer parses a
/// million keys at start-up and allocates only for what it keeps); `None` for anything that is
/// not a well-formed endpoint key.
pub fn parse_parts(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix(ENDPOINTS_PREFIX)?;
    let mut parts = rest.split('/');
    let (ns, svc, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    for label in [ns, svc, id] {
        names::check_label(label).ok()?;
    }
    Some((ns, svc, id))
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}/{}", self.service, self.namespace, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let k = InstanceKey::new("default", "web", "web-1").unwrap();
        assert_eq!(k.to_key(), "/svcd/v1/endpoints/default/web/web-1");
        assert_eq!(InstanceKey::parse(&k.to_key()), Some(k));
        assert_eq!(InstanceKey::parse("/svcd/v1/endpoints/default/web"), None);
        assert_eq!(
            InstanceKey::parse("/svcd/v1/endpoints/default/web/a/b"),
            None
        );
        assert_eq!(InstanceKey::parse("/svcd/v1/endpoints/default/Web/a"), None);
        assert_eq!(InstanceKey::parse("/other/default/web/a"), None);
    }
}
