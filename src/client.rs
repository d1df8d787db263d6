//! Minimal admin-API client for the CLI commands (`register`, `list`, `exec`, …).

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use svcd_config::AdminListen;

use crate::cli::AdminArgs;

pub struct AdminClient {
    /// A TCP address or a unix socket; a connection per call (the CLI makes a few).
    target: AdminListen,
    token: Option<String>,
    /// Where the token came from, for the message when the daemon refuses it.
    token_file: Option<std::path::PathBuf>,
}

/// A non-2xx answer: the daemon's reason (its JSON `error`, with the `field` when it named one),
/// in words. The status is kept for callers that branch on it, never printed: a CLI user wants
/// "service x has no instances", not "404 Not Found".
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

/// What a user outside the socket's group is told, instead of the connection error (or, before,
/// a fallback to the TCP address, which on a packaged node is the metrics-only listener).
pub fn no_permission(path: &std::path::Path) -> anyhow::Error {
    if path == std::path::Path::new(AdminListen::DEFAULT_UNIX) {
        anyhow::anyhow!(
            "no permission on {}; add yourself to group svcd (then log in again)",
            path.display()
        )
    } else {
        anyhow::anyhow!(
            "no permission on {}; join the group that owns it (then log in again)",
            path.display()
        )
    }
}

/// The daemon's reason for a refusal, with what to do about it where the CLI knows.
fn explain(
    status: StatusCode,
    message: String,
    target: &AdminListen,
    token_file: Option<&std::path::Path>,
) -> String {
    match status {
        StatusCode::UNAUTHORIZED => match token_file {
            None => format!(
                "the daemon requires its admin token ({message}): pass --token-file FILE or set \
                 SVCD_ADMIN_TOKEN_FILE (the file admin.token_file names)"
            ),
            Some(file) => format!(
                "the daemon refused the token in {} ({message}): --token-file must hold the token \
                 of the daemon's admin.token_file",
                file.display()
            ),
        },
        // The scrape-only listener (admin.metrics_listen) names itself in its refusal.
        StatusCode::NOT_FOUND if message.contains("admin.metrics_listen") => format!(
            "{target} is svcd's metrics listener (admin.metrics_listen), which serves /metrics, \
             /healthz and /readyz only: pass --admin with the admin API's address (admin.listen)"
        ),
        _ => message,
    }
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> anyhow::Result<Self> {
        let token = match &args.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(AdminClient {
            target: args.target()?,
            token,
            token_file: args.token_file.clone(),
        })
    }

    /// Sends `req` on a new connection to the daemon.
    async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<http::Response<Incoming>> {
        match &self.target {
            AdminListen::Tcp(addr) => {
                let stream = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .map_err(|_| anyhow::anyhow!("connect timed out"))??;
                exchange(stream, req).await
            }
            AdminListen::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(stream) => exchange(stream, req).await,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Err(NoPermission(no_permission(path)).into())
                }
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Sends one request; a 2xx JSON body is returned, anything else becomes an error naming the
    /// daemon's reason.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Value> {
        self.call_within(method, path, body, Duration::from_secs(15))
            .await
    }

    /// [`Self::call`] with its own deadline (blocking queries wait up to their `wait`).
    pub async fn call_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> anyhow::Result<Value> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = match tokio::time::timeout(deadline, self.send(req))
            .await
            .with_context(|| format!("admin API did not answer within {deadline:?}"))?
        {
            Ok(resp) => resp,
            // The daemon is up; the user may not talk to it: say why, not "cannot reach".
            Err(e) if e.is::<NoPermission>() => return Err(e),
            Err(e) => {
                return Err(e.context(format!(
                    "cannot reach the svcd admin API at {} (is `svcd run` up?)",
                    self.target
                )))
            }
        };
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let message = match value["field"].as_str() {
                Some(field) if !field.is_empty() => format!("{field}: {message}"),
                _ => message,
            };
            let message = explain(status, message, &self.target, self.token_file.as_deref());
            return Err(ApiError { status, message }.into());
        }
        Ok(value)
    }
}

/// Connecting to the unix socket was refused for lack of permission.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoPermission(anyhow::Error);

/// One HTTP/1.1 request on `io`.
async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> anyhow::Result<http::Response<Incoming>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The CLI's one request: the connection task ends with the exchange (or the process).
    tokio::spawn(conn);
    Ok(send.send_request(req).await?)
}
