//! TLS for svcd's listeners: the certificates a listener serves (chosen by the client's SNI),
//! the client certificates it requires, the identity a verified client carries to the instance,
//! and the reload that swaps all of it without touching established connections.
//!
//! ```text
//! PEM files ──► material::load_cert / load_roots ──► ServerTls { ArcSwap<rustls::ServerConfig> }
//!                  ▲                                      │ load() per handshake
//!   SIGHUP, inotify (watch::TlsReloader, debounced) ──────┘ store() a new config; a bad file
//!                                                           keeps the old one (counted, logged)
//! client TCP ──► ServerTls::accept (bounded by handshake_timeout) ──► Accepted {
//!                  stream, ALPN (h2 | http/1.1), PeerIdentity (URI/DNS SANs, subject, hash) }
//!                  └─ a failure: closed, counted by reason, logged at a bounded rate
//! ```
//!
//! SNI passthrough (`[[proxy.tcp.sni]]`) only reads: [`Passthrough`] parses the ClientHello with
//! rustls's `Acceptor` (bounded in bytes and time) and hands back the bytes to replay.
//!
//! Reading is lock-free: a handshake `load()`s the listener's current `ServerConfig`; only a
//! reload builds a new one (whole: certificates, SNI table and client verifier), sharing the
//! session cache and ticket keys of the old so resumption survives it.

mod client;
mod error;
mod identity;
mod log_budget;
mod material;
mod metrics;
mod passthrough;
mod resolver;
mod server;
mod watch;

pub use client::{UpstreamAlpn, UpstreamTls};
pub use error::TlsError;
pub use identity::PeerIdentity;
pub use metrics::{Failure, TlsMetrics};
pub use passthrough::{ClientHello, Passthrough, CLIENT_HELLO_TIMEOUT, MAX_CLIENT_HELLO};
pub use server::{Accepted, Alpn, ServerTls};
pub use watch::{Reload, TlsReloader};

/// The crypto provider every TLS object of the daemon uses (ring, as etcd-client's rustls).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
