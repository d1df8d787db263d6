//! Who a verified client is: its certificate's URI SANs (SPIFFE IDs), DNS SANs and subject,
//! as `allow` lists match them and as the instance sees them in `x-forwarded-client-cert`.

use crate::material::Leaf;

/// A verified client certificate's identity, read once per connection (at the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs, e.g. `spiffe://example.org/ns/default/svc/web`.
    pub uris: Vec<String>,
    /// DNS SANs, lowercase.
    pub dns: Vec<String>,
    /// The subject, RFC 4514 text.
    pub subject: String,
    /// SHA-256 of the certificate (DER), lowercase hex: Envoy's `Hash` element.
    pub hash: String,
}

impl PeerIdentity {
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        let leaf = Leaf::parse(der).ok()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut hash = String::with_capacity(64);
        for b in digest.as_ref() {
            hash.push_str(&format!("{b:02x}"));
        }
        Some(PeerIdentity {
            uris: leaf.uris,
            dns: leaf.dns,
            subject: leaf.subject,
            hash,
        })
    }

    /// Whether `allow` lets this identity in: empty lets every verified client in; otherwise
    /// one of its URI or DNS SANs must be listed exactly.
    pub fn allowed(&self, allow: &[String]) -> bool {
        allow.is_empty()
            || allow
                .iter()
                .any(|a| self.uris.iter().chain(&self.dns).any(|n| n == a))
    }

    /// The `x-forwarded-client-cert` value in Envoy's format: `Hash=…;Subject="…";URI=…;DNS=…`
    /// (a `By=` element naming this proxy's own identity first when it has one).
    pub fn xfcc(&self, by: Option<&str>) -> String {
        let mut out = String::new();
        if let Some(by) = by {
            out.push_str("By=");
            out.push_str(&quoted_if_needed(by));
            out.push(';');
        }
        out.push_str("Hash=");
        out.push_str(&self.hash);
        out.push_str(";Subject=\"");
        // RFC 4514 text escapes `"` and `\` already, which is what the quoted value needs
        // (Envoy writes OpenSSL's RFC 2253 subject as it is).
        out.push_str(&self.subject);
        out.push('"');
        for uri in &self.uris {
            out.push_str(";URI=");
            out.push_str(&quoted_if_needed(uri));
        }
        for dns in &self.dns {
            out.push_str(";DNS=");
            out.push_str(&quoted_if_needed(dns));
        }
        out
    }
}

/// Envoy quotes an element value that holds `,`, `;` or `=`.
fn quoted_if_needed(value: &str) -> String {
    if value.contains([',', ';', '=', '"']) {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_cert() -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["client.example".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://td/ns/default/svc/client".try_into().unwrap(),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client, \"the\" one");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_from_a_certificate_and_its_xfcc() {
        let der = client_cert();
        let id = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.uris, ["spiffe://td/ns/default/svc/client"]);
        assert_eq!(id.dns, ["client.example"]);
        assert_eq!(id.hash.len(), 64);
        let xfcc = id.xfcc(Some("spiffe://td/ns/default/svc/web"));
        assert!(
            xfcc.starts_with(&format!(
                "By=spiffe://td/ns/default/svc/web;Hash={};",
                id.hash
            )),
            "{xfcc}"
        );
        assert!(
            xfcc.contains(r#";Subject="CN=client\, \"the\" one";"#),
            "{xfcc}"
        );
        assert!(
            xfcc.ends_with(";URI=spiffe://td/ns/default/svc/client;DNS=client.example"),
            "{xfcc}"
        );
    }

    #[test]
    fn allow_matches_uri_or_dns_exactly() {
        let id = PeerIdentity::from_der(&client_cert()).unwrap();
        assert!(id.allowed(&[]));
        assert!(id.allowed(&["spiffe://td/ns/default/svc/client".into()]));
        assert!(id.allowed(&["client.example".into()]));
        assert!(!id.allowed(&["spiffe://td/ns/default/svc/other".into()]));
        assert!(!id.allowed(&["spiffe://td/ns/default/svc".into()]));
    }
}
