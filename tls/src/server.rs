//! One TLS listener: its current `rustls::ServerConfig` (swapped whole on reload) and the
//! handshake every accepted connection goes through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ProducesTickets, StoresServerSessions, WebPkiClientVerifier};
use rustls::ServerConfig;
use svcd_config::TlsServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use crate::identity::PeerIdentity;
use crate::log_budget::LogBudget;
use crate::material::{load_cert, load_roots, LoadedCert};
use crate::metrics::{Failure, TlsMetrics};
use crate::resolver::SniCertificates;
use crate::TlsError;

/// The application protocols a listener offers in ALPN, in preference order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`, then `http/1.1` (the HTTP proxy).
    Http,
    /// `http/1.1` only (the admin API: hyper's HTTP/1 server).
    Http1,
    /// `h2` only (gRPC: the xDS server).
    H2,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::H2 => vec![b"h2".to_vec()],
        }
    }
}

/// A connection that completed its handshake.
pub struct Accepted<S> {
    pub stream: TlsStream<S>,
    /// The client chose `h2` in ALPN.
    pub h2: bool,
    /// The verified client certificate's identity (listeners with `client_ca`).
    pub peer: Option<PeerIdentity>,
}

/// A TLS listener's certificates and client verification, and its handshake.
pub struct ServerTls {
    /// The listener's name in metrics and logs, e.g. `http/127.0.0.1:8443` or `admin`.
    listener: String,
    /// The config key of its `tls` table, for errors (`proxy.http[0].tls`).
    key: String,
    spec: TlsServerConfig,
    alpn: Alpn,
    /// What handshakes use: `load()`ed per handshake, `store()`d by a reload (one writer: the
    /// reload path holds `reloading` while it builds).
    current: ArcSwap<ServerConfig>,
    /// Shared by every config this listener builds, so sessions resumed across a reload.
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
    /// Held while a reload builds and swaps, and holding the names of the certificates whose
    /// expiry series exist (removed when a reload drops them). Never taken by a handshake.
    reloading: Mutex<Vec<(String, i64)>>,
    metrics: TlsMetrics,
    log: LogBudget,
}

/// Sessions the server remembers for resumption (TLS 1.2 ids, TLS 1.3 stateful tickets).
const SESSION_CACHE: usize = 16 * 1024;

impl ServerTls {
    /// Loads every file of `spec`; an error names the key and file (a daemon does not start
    /// with a TLS listener it cannot serve).
    pub fn new(
        listener: impl Into<String>,
        key: impl Into<String>,
        spec: &TlsServerConfig,
        alpn: Alpn,
        metrics: &TlsMetrics,
    ) -> Result<Arc<ServerTls>, TlsError> {
        let (listener, key) = (listener.into(), key.into());
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        let ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config {
            key: key.clone(),
            reason: format!("session tickets: {e}"),
        })?;
        let (config, certs) = build(&key, spec, alpn, &sessions, &ticketer)?;
        let tls = ServerTls {
            listener,
            key,
            spec: spec.clone(),
            alpn,
            current: ArcSwap::from_pointee(config),
            sessions,
            ticketer,
            reloading: Mutex::new(Vec::new()),
            metrics: metrics.clone(),
            log: LogBudget::default(),
        };
        tls.publish_expiry(&certs);
        // Both results from 0, so increase() sees the first failure.
        for result in ["ok", "failed"] {
            tls.metrics
                .reloads
                .with_label_values(&[tls.listener.as_str(), result]);
        }
        Ok(Arc::new(tls))
    }

    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Identities let in (`allow`); empty: every verified client (or every client without
    /// `client_ca`).
    pub fn allow(&self) -> &[String] {
        &self.spec.allow
    }

    /// Every file this listener reads, for the file watcher.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = self
            .spec
            .certs
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect();
        files.extend(self.spec.client_ca.clone());
        files
    }

    /// Re-reads every file. On success new handshakes use the new material (established
    /// connections keep theirs); on failure the old stays, and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut names = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        match build(
            &self.key,
            &self.spec,
            self.alpn,
            &self.sessions,
            &self.ticketer,
        ) {
            Ok((config, certs)) => {
                self.current.store(Arc::new(config));
                for (gone, _) in names.iter() {
                    if !certs.iter().any(|c| &c.label == gone) {
                        let _ = self
                            .metrics
                            .expiry
                            .remove_label_values(&[self.listener.as_str(), gone.as_str()]);
                    }
                }
                *names = self.set_expiry(&certs);
                self.metrics
                    .reloads
                    .with_label_values(&[self.listener.as_str(), "ok"])
                    .inc();
                info!(listener = %self.listener, "TLS certificates reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .reloads
                    .with_label_values(&[self.listener.as_str(), "failed"])
                    .inc();
                warn!(listener = %self.listener, error = %e, "TLS reload failed; the certificates in use stay");
                Err(e)
            }
        }
    }

    fn publish_expiry(&self, certs: &[LoadedCert]) {
        let names = self.set_expiry(certs);
        *self.reloading.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    fn set_expiry(&self, certs: &[LoadedCert]) -> Vec<(String, i64)> {
        for c in certs {
            self.metrics
                .expiry
                .with_label_values(&[self.listener.as_str(), c.label.as_str()])
                .set(c.not_after);
        }
        certs
            .iter()
            .map(|c| (c.label.clone(), c.not_after))
            .collect()
    }

    /// Sets the expiry series again (after another listener object of the same name, replaced
    /// by a reload, forgot them).
    pub fn republish(&self) {
        for (name, not_after) in self
            .reloading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            self.metrics
                .expiry
                .with_label_values(&[self.listener.as_str(), name.as_str()])
                .set(*not_after);
        }
    }

    /// The listener's series go with it (a reload that removes the listener or its TLS).
    pub fn forget(&self) {
        self.metrics.forget(&self.listener);
        for (name, _) in self
            .reloading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = self
                .metrics
                .expiry
                .remove_label_values(&[self.listener.as_str(), name.as_str()]);
        }
    }

    /// The handshake, bounded by `handshake_timeout`. `None`: it failed, was counted by reason,
    /// logged within the listener's log budget, and the connection is closed (dropped).
    pub async fn accept<S>(&self, stream: S, peer: SocketAddr) -> Option<Accepted<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let result =
            tokio::time::timeout(self.spec.handshake_timeout, acceptor.accept(stream)).await;
        let failure = match result {
            Ok(Ok(stream)) => {
                let (_, conn) = stream.get_ref();
                self.metrics
                    .handshake_ok(&self.listener, conn.protocol_version());
                let h2 = conn.alpn_protocol() == Some(b"h2");
                let identity = conn
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| PeerIdentity::from_der(leaf));
                return Some(Accepted {
                    stream,
                    h2,
                    peer: identity,
                });
            }
            Ok(Err(e)) => (Failure::of(&e), e.to_string()),
            Err(_) => (Failure::Timeout, "handshake not done in time".to_string()),
        };
        self.failed(failure.0, peer, &failure.1);
        None
    }

    /// Counts (and logs, within budget) a failed handshake.
    pub fn failed(&self, reason: Failure, peer: SocketAddr, detail: &str) {
        self.metrics.handshake_failed(&self.listener, reason);
        if self.log.allow() {
            warn!(listener = %self.listener, %peer, reason = reason.label(), detail, "TLS handshake failed");
        }
    }
}

/// A whole `ServerConfig` from the files of `spec`, and the certificates it serves.
fn build(
    key: &str,
    spec: &TlsServerConfig,
    alpn: Alpn,
    sessions: &Arc<dyn StoresServerSessions>,
    ticketer: &Arc<dyn ProducesTickets>,
) -> Result<(ServerConfig, Vec<LoadedCert>), TlsError> {
    let provider = crate::provider();
    let many = spec.certs.len() > 1;
    let certs = spec
        .certs
        .iter()
        .enumerate()
        .map(|(i, files)| {
            // The first pair may come from `cert`/`key` or from `certs[0]`; name the key the
            // user most likely wrote.
            let table = if many || i > 0 {
                format!("{key}.certs[{i}]")
            } else {
                key.to_string()
            };
            load_cert(&table, files, &provider)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
    let builder = match &spec.client_ca {
        Some(ca) => {
            let ca_key = format!("{key}.client_ca");
            let roots = load_roots(&ca_key, ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::material(&ca_key, ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniCertificates::new(&certs)));
    config.alpn_protocols = alpn.protocols();
    config.session_storage = sessions.clone();
    config.ticketer = ticketer.clone();
    Ok((config, certs))
}

#[cfg(test)]
mod tests;
