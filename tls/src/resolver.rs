//! The certificate a ClientHello gets: exact SNI names first, then `*.` names one label up,
//! then the listener's first certificate (for clients without SNI or with a name none covers,
//! as HAProxy's and nginx's default certificate).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::material::LoadedCert;

/// Built once per (re)load and never changed: a reload builds a new one.
#[derive(Debug)]
pub struct SniCertificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`: `*.example.com` is under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniCertificates {
    /// `certs` is not empty (config validation requires one); the first is the default, and for a
    /// name two certificates both cover, the earlier one wins.
    pub fn new(certs: &[LoadedCert]) -> SniCertificates {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for cert in certs {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| cert.key.clone());
            }
        }
        SniCertificates {
            exact,
            wildcard,
            default: certs[0].key.clone(),
        }
    }

    /// The certificate for `sni`, and whether a name matched (false: the default).
    pub fn choose(&self, sni: Option<&str>) -> (&Arc<CertifiedKey>, bool) {
        let Some(name) = sni else {
            return (&self.default, false);
        };
        // rustls hands SNI over lowercased and without a trailing dot.
        if let Some(key) = self.exact.get(name) {
            return (key, true);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return (key, true);
            }
        }
        (&self.default, false)
    }
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()).0.clone())
    }
}
