//! Reading certificates, keys and CA bundles from PEM files, and the checks a file must pass
//! before it replaces what a listener serves: it parses, the key matches the certificate, and
//! the certificate is in date.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use svcd_config::CertKeyFiles;
use x509_parser::extensions::GeneralName;

use crate::TlsError;

/// A certificate chain with its key, and what the listener needs to know about it.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The DNS names (lowercase; `*.` kept) it serves: its DNS SANs, or its subject's CN when it
    /// has none.
    pub names: Vec<String>,
    /// What the expiry metric calls it: its first name, or the file's path.
    pub label: String,
    /// Its end (`notAfter`), seconds since the epoch.
    pub not_after: i64,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Every certificate in a PEM file, in order.
pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::material(key, path, pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::material(key, path, pem_reason(e)))?;
    if certs.is_empty() {
        return Err(TlsError::material(
            key,
            path,
            "no certificate (PEM \"BEGIN CERTIFICATE\") in the file",
        ));
    }
    Ok(certs)
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not PEM: {other:?}"),
    }
}

/// The chain and key of `files`, checked: `key` is the config key of the table (`….tls` or
/// `….tls.certs[1]`).
pub fn load_cert(
    table: &str,
    files: &CertKeyFiles,
    provider: &CryptoProvider,
) -> Result<LoadedCert, TlsError> {
    let cert_key = format!("{table}.cert");
    let key_key = format!("{table}.key");
    let chain = read_certs(&cert_key, &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::material(&key_key, &files.key, pem_reason(e)))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        TlsError::material(
            &key_key,
            &files.key,
            format!("does not go with {}: {e}", files.cert.display()),
        )
    })?;
    let leaf = Leaf::parse(&certified.cert[0])
        .map_err(|reason| TlsError::material(&cert_key, &files.cert, reason))?;
    if leaf.not_after <= now_unix() {
        return Err(TlsError::material(
            &cert_key,
            &files.cert,
            format!("expired (notAfter {})", leaf.not_after_text),
        ));
    }
    let mut names = leaf.dns;
    if names.is_empty() {
        names.extend(leaf.common_name);
    }
    let label = names
        .first()
        .cloned()
        .unwrap_or_else(|| files.cert.display().to_string());
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        label,
        not_after: leaf.not_after,
    })
}

/// A CA bundle as roots to verify peers against.
pub fn load_roots(key: &str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(key, path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::material(key, path, format!("not a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// What svcd reads from an end-entity certificate.
pub struct Leaf {
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub common_name: Option<String>,
    /// The subject as RFC 4514 text.
    pub subject: String,
    pub not_after: i64,
    pub not_after_text: String,
}

/// `name` as RFC 4514 text, as OpenSSL's RFC 2253 printing gives it (what Envoy puts in
/// `x-forwarded-client-cert`): the most specific RDN first, `,` between RDNs, `+` within one,
/// and in values `,` `+` `"` `\` `<` `>` `;` escaped with `\`, as are a leading `#` or space
/// and a trailing space. An attribute whose value is not a string is left out.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .filter_map(|attr| {
                    let value = attr.as_str().ok()?;
                    let kind = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    Some(format!("{kind}={}", escape_value(value)))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .filter(|rdn| !rdn.is_empty())
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Leaf {
    pub fn parse(der: &[u8]) -> Result<Leaf, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let (mut dns, mut uris) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push(n.to_ascii_lowercase()),
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    _ => {}
                }
            }
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(|cn| cn.to_ascii_lowercase());
        let validity = cert.validity();
        Ok(Leaf {
            dns,
            uris,
            common_name,
            subject: rfc4514(cert.subject()),
            not_after: validity.not_after.timestamp(),
            not_after_text: validity.not_after.to_string(),
        })
    }
}
