//! The gRPC side: ADS (`StreamAggregatedResources`) and the standalone CDS/EDS streams, each
//! stream a task of the xDS phase with a bounded output queue.
//!
//! A stream's task owns its [`StreamState`]; it waits for the client's next request, for a new
//! [`XdsSnapshot`], or — only when a push is due — for room in its output queue
//! ([`OUTPUT_QUEUE`] responses). Pushes are built when there is room, from the newest snapshot:
//! a client that stops reading holds at most that many responses (and its HTTP/2 window) while
//! the changes it missed collapse into one push (`svcd_xds_pushes_superseded_total`), and it
//! never slows another stream down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use svcd_lifecycle::Phase;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::cache::XdsCache;
use crate::clients::Clients;
use crate::metrics::XdsMetrics;
use crate::names::ResourceType;
use crate::stream::{Rejected, StreamState};

/// Responses a stream may have waiting for its client (one per type would do; two lets a push
/// be built while the previous one is still being written).
pub const OUTPUT_QUEUE: usize = 2;

/// Largest request accepted (a subscription to every cluster of a 100k-service registry fits).
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The peer of a connection, put in each request's extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// What every stream shares.
pub struct Shared {
    pub cache: XdsCache,
    pub metrics: XdsMetrics,
    pub clients: Arc<Clients>,
    /// Streams run in it and end with it.
    pub phase: Phase,
    pub max_streams: usize,
    pub max_names: usize,
    /// The cluster domain (`<svc>.<ns>.svc.<domain>` listener names).
    pub domain: Arc<str>,
    /// Streams open now (the `max_streams` bound).
    open: AtomicUsize,
}

impl Shared {
    pub fn new(
        cache: XdsCache,
        metrics: XdsMetrics,
        phase: Phase,
        max_streams: usize,
        max_names: usize,
        domain: &str,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            cache,
            metrics,
            clients: Arc::new(Clients::default()),
            phase,
            max_streams,
            max_names,
            domain: domain.into(),
            open: AtomicUsize::new(0),
        })
    }

    /// The tonic services: ADS, CDS and EDS.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        let service = XdsService(self.clone());
        tonic::service::Routes::new(
            AggregatedDiscoveryServiceServer::new(service.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ClusterDiscoveryServiceServer::new(service.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            EndpointDiscoveryServiceServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
    }

    /// Opens a stream: refused past `max_streams`, else run as a task of the phase.
    fn open(
        self: &Arc<Self>,
        api: &'static str,
        fixed: Option<ResourceType>,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_streams {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.streams_refused.inc();
            return Err(Status::resource_exhausted(format!(
                "{} xDS streams are open (xds.max_streams)",
                self.max_streams
            )));
        }
        let guard = OpenStream(self.clone());
        self.metrics.streams.inc();
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map_or_else(|| "unix".to_string(), |p| p.0.to_string());
        let client = self.clients.register(api, peer.clone());
        let state = StreamState::new(
            fixed,
            self.max_names,
            self.domain.clone(),
            self.metrics.clone(),
            client,
        );
        let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
        debug!(%peer, api, "xDS stream opened");
        self.phase
            .spawn(run(self.clone(), state, request.into_inner(), tx, guard));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Counts an open stream until dropped.
struct OpenStream(Arc<Shared>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.streams.dec();
    }
}

type Responses = ReceiverStream<Result<DiscoveryResponse, Status>>;

/// One stream until the client leaves, breaks the protocol, or the phase stops.
async fn run(
    shared: Arc<Shared>,
    mut state: StreamState,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    _open: OpenStream,
) {
    let mut changes = shared.cache.changes();
    let stop = shared.phase.token();
    loop {
        let due = state.has_due() && changes.borrow().is_some();
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tx.closed() => break,
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    let snapshot = changes.borrow().clone();
                    if let Err(rejected) = state.on_request(request, snapshot.as_deref()) {
                        let reason = match rejected {
                            Rejected::TooManyNames { .. } => "too_many_names",
                            Rejected::UnknownType(_) => "unknown_type",
                        };
                        shared.metrics.requests_rejected.with_label_values(&[reason]).inc();
                        info!(error = %rejected, "xDS stream ended");
                        // The output queue may be full (a client that does not read): then
                        // the stream simply ends.
                        let _ = tx.try_send(Err(Status::invalid_argument(rejected.to_string())));
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    debug!(%status, "xDS stream broke");
                    break;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                shared.metrics.pushes_superseded.inc_by(state.on_change());
            }
            permit = tx.reserve(), if due => {
                let Ok(permit) = permit else { break };
                let snapshot = changes.borrow_and_update().clone();
                if let Some(response) = snapshot.and_then(|s| state.next_push(&s)) {
                    permit.send(Ok(response));
                }
            }
        }
    }
}

/// The tonic handlers; every stream shares [`Shared`].
#[derive(Clone)]
struct XdsService(Arc<Shared>);

type DeltaResponses = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

fn no_delta() -> Status {
    Status::unimplemented("svcd serves state-of-the-world xDS only (no delta xDS)")
}

fn no_fetch() -> Status {
    Status::unimplemented("svcd serves streaming xDS only (no REST-style fetch)")
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        self.0.open("ads", None, request)
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(no_delta())
    }
}

#[tonic::async_trait]
impl ClusterDiscoveryService for XdsService {
    type StreamClustersStream = Responses;
    type DeltaClustersStream = DeltaResponses;

    async fn stream_clusters(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        self.0.open("cds", Some(ResourceType::Cluster), request)
    }

    async fn delta_clusters(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(no_delta())
    }

    async fn fetch_clusters(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(no_fetch())
    }
}

#[tonic::async_trait]
impl EndpointDiscoveryService for XdsService {
    type StreamEndpointsStream = Responses;
    type DeltaEndpointsStream = DeltaResponses;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        self.0.open("eds", Some(ResourceType::Endpoint), request)
    }

    async fn delta_endpoints(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(no_delta())
    }

    async fn fetch_endpoints(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(no_fetch())
    }
}
