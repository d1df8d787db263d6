//! TLS to instances (`[[proxy.upstream_tls]]`): the CA that verifies a service's instances, the
//! name their certificates must carry, and the client certificate svcd presents (mesh mode).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use svcd_config::UpstreamTlsConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::material::load_roots;
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
    /// Held by a reload while it builds and swaps, and holding the name and end of the client
    /// certificate whose expiry series exists (the 14-day alert sees it as it sees served
    /// ones). Never taken by a connection.
    reloading: Mutex<Option<(String, i64)>>,
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
        let (configs, client_cert) = build(&key, spec)?;
        let service = format!("{}.{}", spec.service, spec.namespace);
        let label = format!("upstream/{service}");
        for result in ["ok", "failed"] {
            metrics.reloads.with_label_values(&[label.as_str(), result]);
        }
        let tls = UpstreamTls {
            label,
            service,
            key,
            spec: spec.clone(),
            server_name,
            configs: ArcSwap::from_pointee(configs),
            metrics: metrics.clone(),
            reloading: Mutex::new(None),
        };
        tls.set_expiry(&mut tls.lock(), client_cert);
        Ok(Arc::new(tls))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, i64)>> {
        self.reloading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the client certificate's expiry series (`held` is `self.reloading`'s).
    fn set_expiry(&self, held: &mut Option<(String, i64)>, cert: Option<(String, i64)>) {
        if let Some((gone, _)) = held.take() {
            let _ = self
                .metrics
                .expiry
                .remove_label_values(&[self.label.as_str(), gone.as_str()]);
        }
        if let Some((name, not_after)) = &cert {
            self.metrics
                .expiry
                .with_label_values(&[self.label.as_str(), name.as_str()])
                .set(*not_after);
        }
        *held = cert;
    }

    /// Sets the expiry series again: the entry this one replaced (same service, changed
    /// spec) removed its own, which may have had the same name.
    pub fn republish(&self) {
        let mut held = self.lock();
        let cert = held.clone();
        self.set_expiry(&mut held, cert);
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
        self.forget_expiry();
    }

    /// Its client certificate's expiry series goes (the entry is replaced by another).
    pub fn forget_expiry(&self) {
        self.set_expiry(&mut self.lock(), None);
    }

    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.spec.ca.clone()];
        files.extend(self.spec.cert.clone());
        files.extend(self.spec.key.clone());
        files
    }

    pub fn reload(&self) -> Result<(), TlsError> {
        let mut held = self.lock();
        let label = &self.label;
        match build(&self.key, &self.spec) {
            Ok((configs, client_cert)) => {
                self.configs.store(Arc::new(configs));
                self.set_expiry(&mut held, client_cert);
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

/// The client certificate an instance asks for: always this node's (one per service entry).
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The configs (one per ALPN offer) and the client certificate's expiry-series name and end.
type Built = ([Arc<ClientConfig>; 3], Option<(String, i64)>);

fn build(key: &str, spec: &UpstreamTlsConfig) -> Result<Built, TlsError> {
    let provider = crate::provider();
    let roots = load_roots(&format!("{key}.ca"), &spec.ca)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config {
            key: key.to_string(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let (config, client_cert) = match (&spec.cert, &spec.key) {
        (Some(cert), Some(key_file)) => {
            // Checked as a served certificate is (parses, goes with its key, in date): a reload
            // keeps the one in use, a start says which file.
            let files = svcd_config::CertKeyFiles {
                cert: cert.clone(),
                key: key_file.clone(),
            };
            let loaded = crate::material::load_cert(key, &files, &provider)?;
            let expiry = (loaded.label.clone(), loaded.not_after);
            (
                builder.with_client_cert_resolver(Arc::new(ClientCert(loaded.key))),
                Some(expiry),
            )
        }
        _ => (builder.with_no_client_auth(), None),
    };
    let with_alpn = |alpn: &[&[u8]]| {
        let mut c = config.clone();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    };
    Ok((
        [
            with_alpn(&[b"http/1.1"]),
            with_alpn(&[b"h2"]),
            with_alpn(&[]),
        ],
        client_cert,
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn write(dir: &Path, name: &str, text: String) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// An entry for `web.default` trusting a fresh CA, without a client certificate.
    fn spec(dir: &Path) -> UpstreamTlsConfig {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        UpstreamTlsConfig {
            service: "web".into(),
            namespace: "default".into(),
            ca: write(dir, "ca.pem", ca.pem()),
            server_name: "web.default.svc.cluster.local".into(),
            cert: None,
            key: None,
        }
    }

    /// Writes a self-signed client certificate for `dns` as `<file>.pem`/`<file>.key` and
    /// points `spec` at it; returns its notAfter.
    fn client_cert(
        dir: &Path,
        spec: &mut UpstreamTlsConfig,
        file: &str,
        dns: &str,
        expired: bool,
    ) -> i64 {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.self_signed(&key).unwrap();
        spec.cert = Some(write(dir, &format!("{file}.pem"), cert.pem()));
        spec.key = Some(write(dir, &format!("{file}.key"), key.serialize_pem()));
        params.not_after.unix_timestamp()
    }

    /// `svcd_tls_certificate_expiry_timestamp_seconds` as (labels, value).
    fn expiry(metrics: &TlsMetrics) -> Vec<(Vec<String>, i64)> {
        use prometheus::core::Collector;
        metrics
            .expiry
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| {
                let labels = m
                    .get_label()
                    .iter()
                    .map(|l| l.value().to_string())
                    .collect();
                (labels, m.get_gauge().get_value() as i64)
            })
            .collect()
    }

    #[test]
    fn an_expired_client_certificate_is_refused_naming_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        for (expired, name) in [(false, "fresh"), (true, "old")] {
            client_cert(dir.path(), &mut spec, name, "node", expired);
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

    /// The 14-day alert reads the expiry series: the client certificate svcd presents to
    /// instances is in it, follows a reload, stays when a reload fails, and goes with the entry.
    #[test]
    fn the_client_certificate_is_in_the_expiry_series() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = TlsMetrics::unregistered();
        let mut spec = spec(dir.path());
        let none = UpstreamTls::new("proxy.upstream_tls[0]", &spec, &metrics).unwrap();
        assert!(
            expiry(&metrics).is_empty(),
            "no client certificate, no series"
        );
        none.forget();

        let first = client_cert(dir.path(), &mut spec, "node", "node-a.example", false);
        let tls = UpstreamTls::new("proxy.upstream_tls[0]", &spec, &metrics).unwrap();
        let label = "upstream/web.default".to_string();
        assert_eq!(
            expiry(&metrics),
            [(vec![label.clone(), "node-a.example".into()], first)]
        );

        // Rotated in place (same files, another name): the old series goes.
        let second = client_cert(dir.path(), &mut spec, "node", "node-b.example", false);
        tls.reload().unwrap();
        assert_eq!(
            expiry(&metrics),
            [(vec![label.clone(), "node-b.example".into()], second)]
        );

        // An expired replacement is refused: the series still shows the one in use.
        client_cert(dir.path(), &mut spec, "node", "node-c.example", true);
        assert!(tls.reload().is_err());
        assert_eq!(
            expiry(&metrics),
            [(vec![label.clone(), "node-b.example".into()], second)]
        );

        tls.forget();
        assert!(expiry(&metrics).is_empty());
    }
}
