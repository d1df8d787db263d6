//! TLS to instances (`[[proxy.upstream_tls]]`): the CA that verifies a service's instances, the
//! name their certificates must carry, and the client certificate svcd presents (mesh mode).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use svcd_config::UpstreamTlsConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::material::{load_roots, read_certs};
use crate::metrics::TlsMetrics;
use crate::TlsError;

/// What an instance is spoken to in, as ALPN offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAlpn {
    /// `http/1.1` (HTTP instances).
    Http1,
    /// `h2` (`h2` and `grpc` instances).
    H2,
    /// No ALPN (L4).
    None,
}

/// One service's TLS to its instances. Configs are built whole on (re)load and swapped.
pub struct UpstreamTls {
    /// `svc.ns`, the service whose instances get TLS; also its name in metrics and logs.
    service: String,
    /// Its name in the TLS series: `upstream/<svc>.<ns>`.
    label: String,
    /// The config key of its `[[proxy.upstream_tls]]` entry.
    key: String,
    spec: UpstreamTlsConfig,
    server_name: ServerName<'static>,
    /// One config per ALPN offer (ALPN is fixed per config in rustls); index: Http1, H2, None.
    configs: ArcSwap<[Arc<ClientConfig>; 3]>,
    metrics: TlsMetrics,
    /// Held by a reload while it builds and swaps; never by a connection.
    reloading: Mutex<()>,
}

impl UpstreamTls {
    pub fn new(
        key: impl Into<String>,
        spec: &UpstreamTlsConfig,
        metrics: &TlsMetrics,
    ) -> Result<Arc<UpstreamTls>, TlsError> {
        let key = key.into();
        let server_name =
            ServerName::try_from(spec.server_name.clone()).map_err(|e| TlsError::Config {
                key: format!("{key}.server_name"),
                reason: format!("{:?}: {e}", spec.server_name),
            })?;
        let configs = build(&key, spec)?;
        let service = format!("{}.{}", spec.service, spec.namespace);
        for result in ["ok", "failed"] {
            metrics
                .reloads
                .with_label_values(&[format!("upstream/{service}").as_str(), result]);
        }
        Ok(Arc::new(UpstreamTls {
            label: format!("upstream/{service}"),
            service,
            key,
            spec: spec.clone(),
            server_name,
            configs: ArcSwap::from_pointee(configs),
            metrics: metrics.clone(),
            reloading: Mutex::new(()),
        }))
    }

    /// `svc.ns`.
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn spec(&self) -> &UpstreamTlsConfig {
        &self.spec
    }

    /// The TLS handshake over a connected socket, within `timeout`. Errors say why (an instance
    /// failing it is judged as a failed connect).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        alpn: UpstreamAlpn,
        timeout: Duration,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let config = self.configs.load()[alpn as usize].clone();
        let connector = tokio_rustls::TlsConnector::from(config);
        let label = self.label.as_str();
        let result =
            tokio::time::timeout(timeout, connector.connect(self.server_name.clone(), tcp))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake with the instance timed out",
                    ))
                });
        match &result {
            Ok(s) => self
                .metrics
                .handshake_ok(label, s.get_ref().1.protocol_version()),
            Err(e) => self.metrics.handshake_failed(label, crate::Failure::of(e)),
        }
        result
    }

    /// Its series go with it (a reload that removes the entry).
    pub fn forget(&self) {
        self.metrics.forget(&self.label);
    }

    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.spec.ca.clone()];
        files.extend(self.spec.cert.clone());
        files.extend(self.spec.key.clone());
        files
    }

    pub fn reload(&self) -> Result<(), TlsError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let label = &self.label;
        match build(&self.key, &self.spec) {
            Ok(configs) => {
                self.configs.store(Arc::new(configs));
                self.metrics
                    .reloads
                    .with_label_values(&[label.as_str(), "ok"])
                    .inc();
                info!(service = %self.service, "upstream TLS files reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .reloads
                    .with_label_values(&[label.as_str(), "failed"])
                    .inc();
                warn!(service = %self.service, error = %e, "upstream TLS reload failed; the files in use stay");
                Err(e)
            }
        }
    }
}

impl crate::Reload for UpstreamTls {
    fn files(&self) -> Vec<PathBuf> {
        UpstreamTls::files(self)
    }

    fn reload(&self) -> Result<(), TlsError> {
        UpstreamTls::reload(self)
    }
}

fn build(key: &str, spec: &UpstreamTlsConfig) -> Result<[Arc<ClientConfig>; 3], TlsError> {
    let provider = crate::provider();
    let roots = load_roots(&format!("{key}.ca"), &spec.ca)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config {
            key: key.to_string(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match (&spec.cert, &spec.key) {
        (Some(cert), Some(key_file)) => {
            let chain = read_certs(&format!("{key}.cert"), cert)?;
            // An expired client certificate is refused here as a served one is: a reload keeps
            // the one in use, a start says which file.
            let leaf = chain
                .first()
                .map(|der| crate::material::Leaf::parse(der))
                .transpose()
                .map_err(|reason| TlsError::material(format!("{key}.cert"), cert, reason))?;
            if let Some(leaf) = leaf.filter(|l| l.not_after <= crate::material::now_unix()) {
                return Err(TlsError::material(
                    format!("{key}.cert"),
                    cert,
                    format!("expired (notAfter {})", leaf.not_after_text),
                ));
            }
            let private = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                TlsError::material(format!("{key}.key"), key_file, format!("{e:?}"))
            })?;
            let certified =
                rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider)
                    .map_err(|e| {
                        TlsError::material(
                            format!("{key}.key"),
                            key_file,
                            format!("does not go with {}: {e}", cert.display()),
                        )
                    })?;
            drop(certified);
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| TlsError::material(format!("{key}.cert"), cert, e))?
        }
        _ => builder.with_no_client_auth(),
    };
    let with_alpn = |alpn: &[&[u8]]| {
        let mut c = config.clone();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    };
    Ok([
        with_alpn(&[b"http/1.1"]),
        with_alpn(&[b"h2"]),
        with_alpn(&[]),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_client_certificate_is_refused_naming_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_file = write("ca.pem", ca.pem());
        let mut spec = UpstreamTlsConfig {
            service: "web".into(),
            namespace: "default".into(),
            ca: ca_file,
            server_name: "web.default.svc.cluster.local".into(),
            cert: None,
            key: None,
        };
        for (expired, name) in [(false, "fresh"), (true, "old")] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["node".to_string()]).unwrap();
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = params.self_signed(&key).unwrap();
            spec.cert = Some(write(&format!("{name}.pem"), cert.pem()));
            spec.key = Some(write(&format!("{name}.key"), key.serialize_pem()));
            let built = build("proxy.upstream_tls[0]", &spec);
            match (expired, built) {
                (false, Ok(_)) => {}
                (true, Err(e)) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("expired") && text.contains("old.pem"),
                        "{text}"
                    );
                }
                (expired, Err(e)) => panic!("expired={expired}: {e}"),
                (expired, Ok(_)) => panic!("expired={expired}: loaded"),
            }
        }
    }
}
