//! Minimal admin-API client for the CLI commands (`register`, `list`, `exec`, …).

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::cli::AdminArgs;

pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
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
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        Ok(AdminClient {
            base: format!("http://{}", args.addr),
            token,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
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
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = tokio::time::timeout(deadline, self.http.request(req))
            .await
            .with_context(|| format!("admin API did not answer within {deadline:?}"))?
            .with_context(|| {
                format!(
                    "cannot reach the svcd admin API at {} (is `svcd run` up?)",
                    self.base
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
