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

use compact_str::CompactString;
use svcd_config::{Instance, Protocol, State};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Instance id (DNS label), inline up to 24 bytes.
    pub id: CompactString,
    pub ip: IpAddr,
    /// Ports, tags and meta: what a service's replicas usually share, interned as one record so
    /// an endpoint holds one pointer to them (96 bytes an endpoint in all, see the size test).
    pub attributes: Arc<EndpointAttributes>,
    pub node: Arc<str>,
    pub weight: u32,
    pub protocol: Protocol,
    pub state: State,
    /// Why the state (the failing check's error), when the holder wrote one.
    pub reason: Option<Box<str>>,
    /// Store revision of the value; lets a re-list tell changed entries from unchanged ones.
    pub mod_revision: i64,
}

/// An instance's named ports, tags and meta, shared between the endpoints that carry the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EndpointAttributes {
    /// Named ports sorted by name; few enough that a linear scan beats hashing.
    pub ports: Box<[(Arc<str>, u16)]>,
    pub tags: Box<[Arc<str>]>,
    /// Sorted by key.
    pub meta: Box<[(Arc<str>, Arc<str>)]>,
}

impl Endpoint {
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.state == State::Healthy
    }

    /// The port registered under `name`.
    #[inline]
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports()
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, p)| *p)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.attributes
            .meta
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// Named ports, sorted by name.
    #[inline]
    pub fn ports(&self) -> &[(Arc<str>, u16)] {
        &self.attributes.ports
    }

    pub fn tags(&self) -> &[Arc<str>] {
        &self.attributes.tags
    }

    /// Meta entries, sorted by key.
    pub fn meta_entries(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.attributes.meta
    }

    /// Back to the wire model (admin API output).
    pub fn to_instance(&self) -> Instance {
        Instance {
            ip: self.ip,
            ports: self
                .ports()
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect(),
            node: self.node.to_string(),
            weight: self.weight,
            tags: self.tags().iter().map(|t| t.to_string()).collect(),
            protocol: self.protocol,
            state: self.state,
            meta: self
                .meta_entries()
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
            && self.ports().len() == instance.ports.len()
            && self
                .ports()
                .iter()
                .zip(&instance.ports)
                .all(|((a, p), (b, q))| **a == **b && p == q)
            && self.tags().len() == instance.tags.len()
            && self
                .tags()
                .iter()
                .zip(&instance.tags)
                .all(|(a, b)| **a == **b)
            && self.meta_entries().len() == instance.meta.len()
            && self
                .meta_entries()
                .iter()
                .zip(&instance.meta)
                .all(|((a, x), (b, y))| **a == **b && **x == **y)
    }
}

/// Shares equal strings — and equal port, tag and meta lists — between endpoints. Owned by the
/// single snapshot writer; pruned of what nobody uses on every full re-list, so churn in node
/// names cannot grow it forever.
#[derive(Default)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    attributes: HashSet<Arc<EndpointAttributes>>,
    /// `len()` after the last prune: churn through unique values (a per-instance meta value)
    /// prunes again once the interner has doubled, so it stays within twice what is in use.
    pruned_at: usize,
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

    fn intern_attributes(&mut self, attributes: EndpointAttributes) -> Arc<EndpointAttributes> {
        if let Some(existing) = self.attributes.get(&attributes) {
            return existing.clone();
        }
        let new = Arc::new(attributes);
        self.attributes.insert(new.clone());
        new
    }

    /// Drops what only the interner still holds (attributes first: they hold strings).
    pub fn prune(&mut self) {
        self.attributes.retain(|a| Arc::strong_count(a) > 1);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.pruned_at = self.len();
    }

    /// Prunes when the interner has doubled since the last prune (amortised O(1) an entry).
    pub fn prune_if_grown(&mut self) {
        if self.len() > 2 * self.pruned_at + 1024 {
            self.prune();
        }
    }

    /// Strings and attribute records held.
    pub fn len(&self) -> usize {
        self.strings.len() + self.attributes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn endpoint(&mut self, id: &str, instance: Instance, mod_revision: i64) -> Endpoint {
        let attributes = EndpointAttributes {
            ports: instance
                .ports
                .iter()
                .map(|(n, p)| (self.intern(n), *p))
                .collect(),
            tags: instance.tags.iter().map(|t| self.intern(t)).collect(),
            meta: instance
                .meta
                .iter()
                .map(|(k, v)| (self.intern(k), self.intern(v)))
                .collect(),
        };
        Endpoint {
            id: id.into(),
            ip: instance.ip,
            attributes: self.intern_attributes(attributes),
            node: self.intern(&instance.node),
            weight: instance.weight,
            protocol: instance.protocol,
            state: instance.state,
            reason: instance.reason.map(Into::into),
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
        assert!(Arc::ptr_eq(&a.ports()[0].0, &b.ports()[0].0));
        assert!(
            Arc::ptr_eq(&a.attributes, &b.attributes),
            "one attributes record"
        );
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

    #[test]
    fn an_endpoint_record_stays_small() {
        // A million of these is the snapshot; a field added here costs a megabyte a byte.
        assert_eq!(std::mem::size_of::<Endpoint>(), 96);
    }
}
