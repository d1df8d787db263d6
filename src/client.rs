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
}

/// A non-2xx answer, with the daemon's JSON reason when it gave one.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
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
            AdminListen::Unix(path) => {
                exchange(tokio::net::UnixStream::connect(path).await?, req).await
            }
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
        let resp = tokio::time::timeout(deadline, self.send(req))
            .await
            .with_context(|| format!("admin API did not answer within {deadline:?}"))?
            .with_context(|| {
                format!(
                    "cannot reach the svcd admin API at {} (is `svcd run` up?)",
                    self.target
                )
            })?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let message = match value["field"].as_str() {
                Some(field) => format!("{field}: {message}"),
                None => message,
            };
            return Err(ApiError { status, message }.into());
        }
        Ok(value)
    }
}

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
