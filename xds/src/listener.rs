//! The xDS listener: TCP (optionally TLS, `h2` only) or a unix socket, HTTP/2 only (gRPC). Every
//! connection, and every HTTP/2 stream hyper runs, is a task of the xDS phase.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use svcd_config::AdminListen;
use svcd_lifecycle::Phase;
use svcd_tls::ServerTls;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use crate::server::{PeerAddr, Shared};
use crate::XdsError;

/// A bound xDS listener.
pub enum XdsSocket {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    Unix(UnixListener, SocketFile),
}

/// The path of a unix socket svcd bound, removed again at exit.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl XdsSocket {
    pub async fn bind(listen: &AdminListen) -> Result<XdsSocket, XdsError> {
        let bind_error = |e: std::io::Error| XdsError::Bind(listen.to_string(), e);
        match listen {
            AdminListen::Tcp(addr) => Ok(XdsSocket::Tcp(
                TcpListener::bind(addr).await.map_err(bind_error)?,
            )),
            AdminListen::Unix(path) => {
                // A file left by a daemon that died; one another process listens on stays an
                // error (bind fails on it).
                if path.exists() && tokio::net::UnixStream::connect(path).await.is_err() {
                    let _ = std::fs::remove_file(path);
                }
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                let file = SocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(bind_error)?;
                Ok(XdsSocket::Unix(listener, file))
            }
        }
    }

    /// The bound address or socket path.
    pub fn describe(&self) -> String {
        match self {
            XdsSocket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            XdsSocket::Unix(_, file) => format!("unix:{}", file.0.display()),
        }
    }
}

/// Bytes of responses queued in HTTP/2 per stream: four of [`crate::grpc::CHUNK_BYTES`].
const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// Spawns hyper's HTTP/2 stream futures as tasks of the phase.
#[derive(Clone)]
struct PhaseExecutor(Phase);

impl<F> hyper::rt::Executor<F> for PhaseExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Accepts connections until the phase stops.
pub async fn serve(socket: XdsSocket, shared: Arc<Shared>, tls: Option<Arc<ServerTls>>) {
    let phase = shared.phase.clone();
    // Connections, as many as streams may be open: each stream needs one, and a client that
    // opens connections and never a stream must not spend the daemon's descriptors.
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.max_streams));
    let mut builder = hyper::server::conn::http2::Builder::new(PhaseExecutor(phase.clone()));
    // An idle ADS stream is normal; keepalives find dead peers.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        // What a stream may have handed to HTTP/2 and not yet written (hyper's default is
        // 400 KB): h2 keeps a slot per queued frame and never shrinks that table, so a large
        // first push would cost every connection that much for its whole life.
        .max_send_buf_size(SEND_BUFFER_BYTES);
    loop {
        let accepted: std::io::Result<(Box<dyn Io>, SocketAddr, bool)> = tokio::select! {
            _ = phase.stopping() => break,
            a = accept(&socket) => a,
        };
        let (stream, peer, is_tcp) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "xDS accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.connections_refused.inc();
            debug!(%peer, "xDS connection refused: xds.max_streams connections are open");
            continue; // closed as it drops
        };
        let shared = shared.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let stop = phase.token();
        phase.spawn(async move {
            let _slot = slot;
            let io: Box<dyn Io> = match (&tls, is_tcp) {
                (Some(tls), true) => {
                    let Some(accepted) = tls.accept(stream, peer).await else {
                        return;
                    };
                    let allowed = match &accepted.peer {
                        Some(identity) => identity.allowed(tls.allow()),
                        None => tls.allow().is_empty(),
                    };
                    if !allowed {
                        debug!(%peer, "xDS client certificate identity not allowed");
                        return;
                    }
                    Box::new(accepted.stream)
                }
                _ => stream,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                // A unix socket's client has no address: the API shows it as `unix`.
                if is_tcp {
                    req.extensions_mut().insert(PeerAddr(peer));
                }
                std::future::ready(Ok::<_, std::convert::Infallible>(shared.handle(req)))
            });
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "xDS connection ended") },
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn accept(socket: &XdsSocket) -> std::io::Result<(Box<dyn Io>, SocketAddr, bool)> {
    Ok(match socket {
        XdsSocket::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            (Box::new(s), peer, true)
        }
        XdsSocket::Unix(l, _) => (
            Box::new(l.accept().await?.0),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            false,
        ),
    })
}
