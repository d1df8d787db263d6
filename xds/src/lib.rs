//! svcd xDS: the control plane for Envoy and proxyless gRPC, from the same snapshot as DNS and
//! the proxies (docs/xds.md).
//!
//! ```text
//!  SnapshotReader ──changes──► CacheWriter (one task): Cluster + ClusterLoadAssignment per
//!                                 │ service and named port, rebuilt only for changed services
//!                                 ▼ watch<Arc<XdsSnapshot>>
//!  ADS / CDS / EDS stream tasks ── StreamState: subscriptions, nonces, ACK/NACK, what was sent
//!          │ bounded output queue (newest state wins)
//!          ▼
//!  gRPC framing (pushes written in 16 KiB chunks as HTTP/2 has room, requests decoded and
//!  their buffer let go) on hyper HTTP/2 (TCP, TLS or unix socket), every task in the xDS phase
//! ```
//!
//! * [`names`]: resource types, cluster names, listener names (gRPC targets) → clusters.
//! * [`resources`]: the Envoy protos built from a service; the health mapping.
//! * [`cache`]: the shared, incrementally rebuilt [`XdsSnapshot`].
//! * [`stream`]: one stream's protocol state, without I/O.
//! * [`subscriptions`]: equal subscriptions of different streams, held once.
//! * [`server`] and [`listener`]: the xDS methods, the stream tasks and the accept loop; the
//!   stream bound.
//! * [`grpc`]: gRPC messages in and out of a stream without per-stream buffers.
//! * [`clients`]: what `GET /v1/xds/clients` shows.
//! * [`bootstrap`]: `svcd xds-bootstrap`'s gRPC and Envoy bootstraps.
//! * [`metrics`]: the `svcd_xds_*` families.

pub mod bootstrap;
pub mod cache;
pub mod clients;
pub mod grpc;
pub mod listener;
pub mod metrics;
pub mod names;
pub mod resources;
pub mod server;
pub mod stream;
pub mod subscriptions;

use std::sync::Arc;

use svcd_config::XdsConfig;
use svcd_lifecycle::Phase;
use svcd_registry::{SnapshotReader, SyncStatus};

pub use cache::{XdsCache, XdsSnapshot};
pub use clients::ClientInfo;
pub use listener::XdsSocket;
pub use metrics::XdsMetrics;
pub use names::ResourceType;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xds.listen: cannot bind {0}: {1}")]
    Bind(String, #[source] std::io::Error),
    #[error("xds.tls: {0}")]
    Tls(#[from] svcd_tls::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The running xDS server.
pub struct XdsServer {
    shared: Arc<server::Shared>,
    addr: String,
    tls: Option<Arc<svcd_tls::ServerTls>>,
}

impl XdsServer {
    /// Binds `config.listen` and starts the cache writer and the accept loop in `phase`.
    /// `domain` is the cluster domain of `<svc>.<ns>.svc.<domain>` targets.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &XdsConfig,
        listen: &svcd_config::AdminListen,
        domain: &str,
        reader: SnapshotReader,
        status: Arc<SyncStatus>,
        prometheus: &prometheus::Registry,
        tls_metrics: &svcd_tls::TlsMetrics,
        phase: &Phase,
    ) -> Result<XdsServer, XdsError> {
        let metrics = XdsMetrics::new(prometheus)?;
        let tls = config
            .tls
            .as_ref()
            .map(|t| svcd_tls::ServerTls::new("xds", "xds.tls", t, svcd_tls::Alpn::H2, tls_metrics))
            .transpose()?;
        let socket = XdsSocket::bind(listen).await?;
        let addr = socket.describe();
        let (cache, writer) = XdsCache::new();
        phase.spawn(writer.run(reader, status, phase.token()));
        let shared = server::Shared::new(
            cache,
            metrics,
            phase.clone(),
            config.max_streams,
            config.max_names,
            domain,
        );
        phase.spawn(listener::serve(socket, shared.clone(), tls.clone()));
        Ok(XdsServer { shared, addr, tls })
    }

    /// The bound address (`IP:PORT`) or `unix:PATH`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The connected clients, oldest stream first.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.shared.clients.list()
    }

    /// The listener's TLS, for the certificate reloader.
    pub fn tls(&self) -> Option<Arc<svcd_tls::ServerTls>> {
        self.tls.clone()
    }
}

#[cfg(test)]
mod tests;
