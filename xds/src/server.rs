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

use hyper::body::{Body, Bytes};
use svcd_lifecycle::Phase;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info};

use crate::cache::XdsCache;
use crate::clients::Clients;
use crate::grpc::{
    Ending, Output, ReadError, RequestBudget, RequestLimits, Requests, ResponseBody,
};
use crate::metrics::XdsMetrics;
use crate::names::ResourceType;
use crate::stream::{Rejected, StreamState};
use crate::subscriptions::SubscriptionLists;

/// Responses a stream may have waiting for its client (one per type would do; two lets a push
/// be built while the previous one is still being written).
pub const OUTPUT_QUEUE: usize = 2;

/// Largest request accepted (a subscription to every cluster of a 100k-service registry fits).
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// What requests being read may hold, all streams together: four of the largest at once.
const REQUEST_BUDGET_BYTES: usize = 4 * MAX_REQUEST_BYTES;

/// The peer of a connection, put in each request's extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// What every stream shares.
pub struct Shared {
    pub cache: XdsCache,
    pub metrics: XdsMetrics,
    pub clients: Arc<Clients>,
    /// Equal subscriptions of different streams, held once.
    lists: Arc<SubscriptionLists>,
    /// What requests not complete yet may hold, all streams together.
    request_budget: Arc<RequestBudget>,
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
            lists: Arc::default(),
            request_budget: RequestBudget::new(REQUEST_BUDGET_BYTES),
            phase,
            max_streams,
            max_names,
            domain: domain.into(),
            open: AtomicUsize::new(0),
        })
    }

    /// Answers one HTTP/2 request: an xDS stream, or a gRPC error.
    pub fn handle<B>(self: &Arc<Self>, request: hyper::Request<B>) -> hyper::Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let (api, fixed) = match request.uri().path() {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources" => {
                ("ads", None)
            }
            "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters" => {
                ("cds", Some(ResourceType::Cluster))
            }
            "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints" => {
                ("eds", Some(ResourceType::Endpoint))
            }
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            | "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters"
            | "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints" => {
                return no_delta().into_http();
            }
            "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters"
            | "/envoy.service.endpoint.v3.EndpointDiscoveryService/FetchEndpoints" => {
                return no_fetch().into_http();
            }
            path => {
                return Status::unimplemented(format!("{path} is not an xDS method svcd serves"))
                    .into_http();
            }
        };
        let grpc = request
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v == "application/grpc"
                    || v.starts_with("application/grpc+")
                    || v.starts_with("application/grpc;")
            });
        if request.method() != hyper::Method::POST || !grpc {
            // What the gRPC spec asks of a server for a request that is not gRPC.
            let mut response = hyper::Response::new(ResponseBody::default());
            *response.status_mut() = hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return response;
        }
        match self.open(api, fixed, request) {
            Ok(body) => {
                let mut response = hyper::Response::new(body);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        }
    }

    /// Opens a stream: refused past `max_streams`, else run as a task of the phase.
    fn open<B>(
        self: &Arc<Self>,
        api: &'static str,
        fixed: Option<ResourceType>,
        request: hyper::Request<B>,
    ) -> Result<ResponseBody, Status>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
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
            self.lists.clone(),
            self.domain.clone(),
            self.metrics.clone(),
            client,
        );
        let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
        let ending = Ending::default();
        debug!(%peer, api, "xDS stream opened");
        let limits = RequestLimits {
            max_bytes: MAX_REQUEST_BYTES,
            max_names: self.max_names,
        };
        let requests = Requests::new(request.into_body(), limits, self.request_budget.clone());
        let out = Out {
            tx,
            ending: ending.clone(),
        };
        self.phase
            .spawn(run(self.clone(), state, requests, out, guard));
        Ok(ResponseBody::new(rx, ending))
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

/// One stream until the client leaves, breaks the protocol, or the phase stops.
async fn run<B>(
    shared: Arc<Shared>,
    mut state: StreamState,
    mut requests: Requests<B>,
    out: Out,
    _open: OpenStream,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut changes = shared.cache.changes();
    let stop = shared.phase.token();
    let tx = &out.tx;
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
                        let status = Status::invalid_argument(rejected.to_string());
                        end_refused(&shared, &out, reason, status);
                        break;
                    }
                }
                Ok(None) => break,
                Err(ReadError::Refused { reason, status }) => {
                    end_refused(&shared, &out, reason, status);
                    break;
                }
                Err(ReadError::Broken(error)) => {
                    debug!(%error, "xDS stream broke");
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
                    permit.send(Box::new(response));
                }
            }
        }
    }
}

/// A stream task's side of its response body: pushes, and the status it ends with.
struct Out {
    tx: mpsc::Sender<Output>,
    ending: Ending,
}

/// Ends a stream over a request svcd does not take: counted, logged, and told to the client
/// (after the pushes already queued).
fn end_refused(shared: &Shared, out: &Out, reason: &'static str, status: Status) {
    shared
        .metrics
        .requests_rejected
        .with_label_values(&[reason])
        .inc();
    info!(reason, error = %status.message(), "xDS stream ended");
    *out.ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
}

fn no_delta() -> Status {
    Status::unimplemented("svcd serves state-of-the-world xDS only (no delta xDS)")
}

fn no_fetch() -> Status {
    Status::unimplemented("svcd serves streaming xDS only (no REST-style fetch)")
}
