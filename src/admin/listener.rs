//! The admin API's listeners: TCP or a unix socket for the whole API, and an optional TCP
//! listener serving only the scrape and probe endpoints. One accept loop serves any of them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use svcd_config::AdminListen;
use svcd_lifecycle::Phase;
use svcd_tls::ServerTls;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use super::AdminState;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything, mutating endpoints included.
    Api,
    /// `/metrics`, `/healthz`, `/readyz` and `/v1/prometheus/sd` only (`admin.metrics_listen`).
    Scrape,
    /// The Consul-compatible API (`consul.listen`, [`crate::consul`]).
    Consul,
}

/// A bound admin listener.
pub enum AdminSocket {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    Unix(UnixListener, UnixSocketFile),
}

/// The path of a unix socket this daemon bound, removed again at exit.
pub struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Owner and group may connect; nobody else.
const SOCKET_MODE: u32 = 0o660;

impl AdminSocket {
    pub async fn bind(listen: &AdminListen, key: &str) -> anyhow::Result<AdminSocket> {
        match listen {
            AdminListen::Tcp(addr) => Ok(AdminSocket::Tcp(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("{key}: cannot bind {addr}"))?,
            )),
            AdminListen::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("{key}: cannot bind unix:{}", path.display()))?;
                let file = UnixSocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                    .with_context(|| format!("{key}: cannot set the mode of {}", path.display()))?;
                Ok(AdminSocket::Unix(listener, file))
            }
        }
    }

    /// What to tell the operator: the bound address or the socket path.
    pub fn describe(&self) -> String {
        match self {
            AdminSocket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            AdminSocket::Unix(_, file) => format!("unix:{}", file.0.display()),
        }
    }
}

/// A socket file left by a daemon that died is removed; one another daemon still listens on is
/// an error (two daemons must not share it).
async fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        anyhow::bail!(
            "admin.listen: unix:{} is in use by a running process",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("admin.listen: cannot remove stale {}", path.display()))
}

/// Accepts connections until `phase` stops, then lets in-flight requests finish (each
/// connection is a task of `phase`, so the phase's stop waits for them; the caller bounds it).
/// With `tls`, each connection's handshake runs in its own task (bounded by the listener's
/// `handshake_timeout`), so a slow client never holds up the accept loop.
pub async fn serve(
    socket: AdminSocket,
    state: Arc<AdminState>,
    surface: Surface,
    phase: Phase,
    tls: Option<Arc<ServerTls>>,
) {
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            _ = phase.stopping() => break,
            a = accept(&socket) => a,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        phase.spawn(async move {
            let (io, denied): (AdminIo, bool) = match (&tls, stream) {
                (Some(tls), AdminAccepted::Tcp(tcp)) => {
                    let Some(accepted) = tls.accept(tcp, peer).await else {
                        return;
                    };
                    let allowed = match &accepted.peer {
                        Some(identity) => identity.allowed(tls.allow()),
                        None => tls.allow().is_empty(),
                    };
                    (TokioIo::new(Box::new(accepted.stream)), !allowed)
                }
                (_, AdminAccepted::Tcp(tcp)) => (TokioIo::new(Box::new(tcp)), false),
                (_, AdminAccepted::Unix(unix)) => (TokioIo::new(Box::new(unix)), false),
            };
            let service = service_fn(move |req| {
                let state = state.clone();
                async move {
                    if denied {
                        return Ok(super::text(
                            hyper::StatusCode::FORBIDDEN,
                            "client certificate identity not allowed\n",
                        ));
                    }
                    state.handle(req, surface).await
                }
            });
            let conn = builder.serve_connection(io, service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                debug!(error = %e, "admin connection ended with error");
            }
        });
    }
    drop(socket);
    graceful.shutdown().await;
}

/// Either kind of stream, as one type for hyper.
type AdminIo = TokioIo<Box<dyn AdminStream>>;

trait AdminStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AdminStream for T {}

/// An accepted connection, before any TLS.
enum AdminAccepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(socket: &AdminSocket) -> std::io::Result<(AdminAccepted, std::net::SocketAddr)> {
    Ok(match socket {
        AdminSocket::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            (AdminAccepted::Tcp(s), peer)
        }
        AdminSocket::Unix(l, _) => (
            AdminAccepted::Unix(l.accept().await?.0),
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ),
    })
}
