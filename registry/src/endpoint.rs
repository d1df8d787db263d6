//! The served form of an instance: compact and read-optimized.
//!
//! [`Instance`] is the wire model (JSON in etcd, the API, the config file). An [`Endpoint`] is what
//! a snapshot holds 100k of, so it trades `BTreeMap`s (a 300–500-byte node each, even for one
//! entry) for sorted boxed slices, and shares repeated strings — port names, node names, tag and
//! meta keys — through an [`Interner`]. At 100k endpoints this is the difference between ~160 MB
//! and well under 100 MB for the whole daemon.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use svcd_config::{Instance, Protocol, State};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Instance id (DNS label).
    pub id: Box<str>,
    pub ip: IpAddr,
    /// Named ports sorted by name; few enough that a linear scan beats hashing.
    pub ports: Box<[(Arc<str>, u16)]>,
    pub node: Arc<str>,
    pub weight: u32,
    pub protocol: Protocol,
    pub state: State,
    /// Why the state (the failing check's error), when the holder wrote one.
    pub reason: Option<Box<str>>,
    pub tags: Box<[Arc<str>]>,
    pub meta: Box<[(Arc<str>, Box<str>)]>,
    /// Store revision of the value; lets a re-list tell changed entries from unchanged ones.
    pub mod_revision: i64,
}

impl Endpoint {
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.state == State::Healthy
    }

    /// The port registered under `name`.
    #[inline]
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, p)| *p)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// Back to the wire model (admin API output).
    pub fn to_instance(&self) -> Instance {
        Instance {
            ip: self.ip,
            ports: self
                .ports
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect(),
            node: self.node.to_string(),
            weight: self.weight,
            tags: self.tags.iter().map(|t| t.to_string()).collect(),
            protocol: self.protocol,
            state: self.state,
            meta: self
                .meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // The check is run by the registering daemon; it is not part of what is served.
            check: None,
            reason: self.reason.as_deref().map(Into::into),
        }
    }

    /// Whether this endpoint already describes `instance` (an identical re-put changes nothing).
    pub fn same_as(&self, instance: &Instance) -> bool {
        self.ip == instance.ip
            && self.weight == instance.weight
            && self.protocol == instance.protocol
            && self.state == instance.state
            && self.reason.as_deref() == instance.reason.as_deref()
            && *self.node == *instance.node
            && self.ports.len() == instance.ports.len()
            && self
                .ports
                .iter()
                .zip(&instance.ports)
                .all(|((a, p), (b, q))| **a == **b && p == q)
            && self.tags.len() == instance.tags.len()
            && self
                .tags
                .iter()
                .zip(&instance.tags)
                .all(|(a, b)| **a == **b)
            && self.meta.len() == instance.meta.len()
            && self
                .meta
                .iter()
                .zip(&instance.meta)
                .all(|((a, x), (b, y))| **a == **b && **x == **y)
    }
}

/// Shares equal strings between endpoints. Owned by the single snapshot writer; pruned of
/// strings nobody uses on every full re-list, so churn in node names cannot grow it forever.
#[derive(Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(existing) = self.strings.get(s) {
            return existing.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(new.clone());
        new
    }

    /// Drops strings only the interner still holds.
    pub fn prune(&mut self) {
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }

    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    pub fn endpoint(&mut self, id: &str, instance: Instance, mod_revision: i64) -> Endpoint {
        Endpoint {
            id: id.into(),
            ip: instance.ip,
            ports: instance
                .ports
                .iter()
                .map(|(n, p)| (self.intern(n), *p))
                .collect(),
            node: self.intern(&instance.node),
            weight: instance.weight,
            protocol: instance.protocol,
            state: instance.state,
            reason: instance.reason.map(Into::into),
            tags: instance.tags.iter().map(|t| self.intern(t)).collect(),
            meta: instance
                .meta
                .iter()
                .map(|(k, v)| (self.intern(k), Box::from(v.as_str())))
                .collect(),
            mod_revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_sharing() {
        let json = br#"{"ip":"10.0.0.1","ports":{"http":80,"grpc":90},"node":"n1","tags":["a"],"meta":{"k":"v"}}"#;
        let instance = Instance::from_json(json).unwrap();
        let mut interner = Interner::default();
        let a = interner.endpoint("a", instance.clone(), 5);
        let b = interner.endpoint("b", instance.clone(), 6);
        assert!(Arc::ptr_eq(&a.node, &b.node));
        assert!(Arc::ptr_eq(&a.ports[0].0, &b.ports[0].0));
        assert_eq!(a.port("grpc"), Some(90));
        assert_eq!(a.port("nope"), None);
        assert_eq!(a.meta("k"), Some("v"));
        assert_eq!(a.to_instance(), instance);
        assert!(a.same_as(&instance));
        let mut other = instance.clone();
        other.ports.insert("x".into(), 1);
        assert!(!a.same_as(&other));
        drop((a, b));
        interner.prune();
        assert!(interner.is_empty());
    }
}
