//! Checks of `tls` tables (`[[proxy.http]].tls`, `[admin].tls`): the shape only. Whether the
//! files exist, parse, match and are in date is the TLS crate's to say when it loads them (at
//! start and on every reload, keeping the old material when they do not).

use std::path::PathBuf;
use std::time::Duration;

use super::Checker;
use crate::model::{CertKeyFiles, TlsServerConfig, UpstreamTlsConfig};
use crate::raw::{RawTls, RawUpstreamTls};

/// Default `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn file(c: &mut Checker, path: &str, value: Option<String>) -> PathBuf {
    match value {
        Some(v) if !v.trim().is_empty() => PathBuf::from(v),
        Some(_) => {
            c.err(path, "must be a file path (PEM)");
            PathBuf::new()
        }
        None => {
            c.err(path, "missing");
            PathBuf::new()
        }
    }
}

pub(crate) fn server(c: &mut Checker, base: &str, raw: RawTls) -> TlsServerConfig {
    let mut certs = Vec::new();
    match (raw.cert, raw.key) {
        (None, None) => {}
        (cert, key) => certs.push(CertKeyFiles {
            cert: file(c, &format!("{base}.cert"), cert),
            key: file(c, &format!("{base}.key"), key),
        }),
    }
    for (i, pair) in raw.certs.unwrap_or_default().into_iter().enumerate() {
        certs.push(CertKeyFiles {
            cert: file(c, &format!("{base}.certs[{i}].cert"), pair.cert),
            key: file(c, &format!("{base}.certs[{i}].key"), pair.key),
        });
    }
    if certs.is_empty() {
        c.err(
            format!("{base}.cert"),
            "missing: a TLS listener needs `cert` and `key`, or `certs = [{ cert, key }, …]`",
        );
    }
    let client_ca = raw
        .client_ca
        .map(|ca| file(c, &format!("{base}.client_ca"), Some(ca)));
    let allow = identities(c, &format!("{base}.allow"), raw.allow);
    if !allow.is_empty() && client_ca.is_none() {
        c.err(
            format!("{base}.allow"),
            "needs client_ca: identities come from verified client certificates",
        );
    }
    let handshake_timeout = c.duration(
        &format!("{base}.handshake_timeout"),
        raw.handshake_timeout,
        DEFAULT_HANDSHAKE_TIMEOUT,
    );
    TlsServerConfig {
        certs,
        client_ca,
        allow,
        handshake_timeout,
    }
}

/// `[[proxy.upstream_tls]]` entries: one per service, a CA always (instances are verified), a
/// client certificate and key together or not at all.
pub(crate) fn upstream(
    c: &mut Checker,
    raw: Vec<RawUpstreamTls>,
    domain: &str,
) -> Vec<UpstreamTlsConfig> {
    let mut out: Vec<UpstreamTlsConfig> = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let base = format!("proxy.upstream_tls[{i}]");
        let target = c.target(&base, u.service, None);
        if out
            .iter()
            .any(|o| o.service == target.service && o.namespace == target.namespace)
        {
            c.err(
                format!("{base}.service"),
                format!("{}.{} is listed twice", target.service, target.namespace),
            );
        }
        let ca = file(c, &format!("{base}.ca"), u.ca);
        let (cert, key) = match (u.cert, u.key) {
            (None, None) => (None, None),
            (cert, key) => (
                Some(file(c, &format!("{base}.cert"), cert)),
                Some(file(c, &format!("{base}.key"), key)),
            ),
        };
        let server_name = match u.server_name {
            Some(n) if !n.is_empty() && !n.contains(char::is_whitespace) => n,
            Some(n) => {
                c.err(
                    format!("{base}.server_name"),
                    format!("invalid name {n:?} (a DNS name or an IP address)"),
                );
                n
            }
            None => format!("{}.{}.svc.{domain}", target.service, target.namespace),
        };
        out.push(UpstreamTlsConfig {
            service: target.service,
            namespace: target.namespace,
            ca,
            server_name,
            cert,
            key,
        });
    }
    out
}

/// An `allow` list: client identities, each a URI SAN or a DNS name.
pub(crate) fn identities(c: &mut Checker, key: &str, raw: Option<Vec<String>>) -> Vec<String> {
    let allow = raw.unwrap_or_default();
    for (i, identity) in allow.iter().enumerate() {
        if identity.is_empty() || identity.chars().any(|ch| ch.is_whitespace()) {
            c.err(
                format!("{key}[{i}]"),
                format!("invalid identity {identity:?} (a URI SAN such as spiffe://td/ns/default/svc/web, or a DNS name)"),
            );
        }
    }
    allow
}
