//! Real HTTP backends (hyper, HTTP/1.1 and h2c on one port) for the HTTP proxy tests.
//!
//! Paths: `/` answers the backend's name; `/headers` echoes the request headers; `/status/N`
//! answers N; `/hang` never answers; `/upload` counts the body; `/stream` echoes the body frame
//! by frame and ends with trailers (gRPC style); `/ws` upgrades and echoes raw bytes; `/slow`
//! answers the name after a second; `/stall` sends its head and one chunk, then nothing;
//! `/grpc.health.v1.Health/Check` answers SERVING or
//! NOT_SERVING as [`Backend::set_serving`] says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;
type Sender = http_body_util::channel::Sender<Bytes, hyper::Error>;

pub struct Backend {
    pub addr: SocketAddr,
    /// Requests that reached this backend.
    pub requests: Arc<AtomicUsize>,
    /// Connections open to it now.
    open: Arc<AtomicUsize>,
    serving: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let serving = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (count, token, up) = (requests.clone(), stop.clone(), serving.clone());
        let opened = open.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                };
                let (count, token, up) = (count.clone(), token.clone(), up.clone());
                let opened = opened.clone();
                opened.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        count.fetch_add(1, Ordering::SeqCst);
                        handle(name, up.load(Ordering::SeqCst), req)
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = token.cancelled() => {}
                    }
                    opened.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            requests,
            open,
            serving,
            stop,
        }
    }

    /// Closes the listener and every connection, as if the process died.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    /// What the gRPC health endpoint answers.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections open to this backend now (a closed one counts until the backend reads its
    /// end).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A gRPC-style response: `application/grpc`, a body that `send` streams, then the trailer
/// `grpc-status: 0`.
fn grpc_response<F, Fut>(send: F) -> Response<Body>
where
    F: FnOnce(Sender) -> Fut,
    Fut: std::future::Future<Output = Sender> + Send + 'static,
{
    let (tx, channel) = Channel::<Bytes, hyper::Error>::new(8);
    let sending = send(tx);
    tokio::spawn(async move {
        let mut tx = sending.await;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let _ = tx.send_trailers(trailers).await;
    });
    let mut r = Response::new(channel.boxed());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

fn headers_text(h: &HeaderMap) -> String {
    let mut lines: Vec<String> = h
        .iter()
        .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?")))
        .collect();
    lines.sort();
    lines.join("\n")
}

async fn handle(
    name: &'static str,
    serving: bool,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match path.as_str() {
        "/headers" => Response::new(full(format!(
            "{:?}\n{}",
            req.version(),
            headers_text(req.headers())
        ))),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Response::new(full(name))
        }
        "/grpc.health.v1.Health/Check" => {
            // HealthCheckResponse { status: SERVING (1) | NOT_SERVING (2) }, one message.
            let status = if serving { 1 } else { 2 };
            grpc_response(move |mut tx| async move {
                let _ = tx
                    .send_data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))
                    .await;
                tx
            })
        }
        "/stall" => {
            // The head and a first chunk, then nothing until the client goes away.
            let (mut tx, channel) = Channel::<Bytes, hyper::Error>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"first")).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(tx);
            });
            Response::new(channel.boxed())
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full(""))
        }
        "/upload" => {
            let mut n: u64 = 0;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map(|f| f.into_data()) {
                    n += data.map_or(0, |d| d.len() as u64);
                } else {
                    break;
                }
            }
            Response::new(full(n.to_string()))
        }
        "/stream" => {
            // Echo each data frame as it arrives.
            let mut body = req.into_body();
            grpc_response(move |mut tx| async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data() {
                        if tx.send_data(data).await.is_err() {
                            break;
                        }
                    }
                }
                tx
            })
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("upgrade"));
            r
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let mut r = Response::new(full(name));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r
        }
        _ => Response::new(full(name)),
    };
    Ok(response)
}
