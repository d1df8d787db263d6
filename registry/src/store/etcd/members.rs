//! Which etcd member failed. The client balances over every endpoint and its errors name none
//! (`transport error: Connection refused`), so when a call to a store of several members fails
//! as unavailable, each member is asked for its status on a connection of its own and the error
//! says what each answered: `members: http://a down (... Connection refused ...), http://b up
//! (leader), http://c up`.
//!
//! One probe at a time, its result reused by every failure seen before it started: a flood of
//! failing writes costs one probe per member at a time, not one per write, and no failure is
//! explained by a probe older than itself.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

use super::{map_err, StoreError};

/// How long a member has to answer the probe.
pub(super) const PROBE_BOUND: Duration = Duration::from_secs(1);

pub(super) struct Members {
    urls: Vec<String>,
    /// What the probes connect with (TLS, credentials): the store's options, replaced when
    /// they are read again. A std mutex: cloned out, never held across an await.
    options: std::sync::Mutex<ConnectOptions>,
    /// The last report and when its probe started. An async mutex held across the probe, so
    /// concurrent callers wait for one probe instead of starting their own.
    last: tokio::sync::Mutex<Option<(Instant, Arc<str>)>>,
}

impl Members {
    pub(super) fn new(urls: Vec<String>, options: ConnectOptions) -> Self {
        Members {
            urls,
            options: std::sync::Mutex::new(options),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether a report can tell more than the endpoint list: several members.
    pub(super) fn several(&self) -> bool {
        self.urls.len() > 1
    }

    pub(super) fn set_options(&self, options: ConnectOptions) {
        *self.options.lock().unwrap_or_else(|e| e.into_inner()) = options;
    }

    /// `members: URL up|down (why)|no answer, ...` as a probe started no earlier than `since`
    /// (the failure to explain) found them, each member probed within `bound` (at most
    /// [`PROBE_BOUND`]), in parallel.
    pub(super) async fn report(&self, since: Instant, bound: Duration) -> Arc<str> {
        let mut last = self.last.lock().await;
        if let Some((started, text)) = last.as_ref() {
            if *started >= since {
                return text.clone();
            }
        }
        let started = Instant::now();
        let bound = bound.min(PROBE_BOUND);
        let options = self
            .options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .with_connect_timeout(bound)
            .with_timeout(bound);
        let probes = self
            .urls
            .iter()
            .map(|url| probe(url, options.clone(), bound));
        let states = futures_util::future::join_all(probes).await;
        let text: Arc<str> = format!("members: {}", states.join(", ")).into();
        *last = Some((started, text.clone()));
        text
    }

    /// `e` with the member report appended, when it is a store unavailable and there are
    /// several members.
    pub(super) async fn explain(&self, e: StoreError, bound: Duration) -> StoreError {
        match e {
            StoreError::Unavailable(msg) if self.several() => {
                let report = self.report(Instant::now(), bound).await;
                StoreError::Unavailable(format!("{msg}; {report}"))
            }
            other => other,
        }
    }
}

/// One member's state: `URL up`, `URL up (leader)`, `URL up (no leader)`, `URL down (why)` or
/// `URL no answer within ...`.
async fn probe(url: &str, options: ConnectOptions, bound: Duration) -> String {
    let status = async {
        let mut client = Client::connect([url], Some(options)).await?;
        client.status().await
    };
    match tokio::time::timeout(bound, status).await {
        Ok(Ok(status)) => {
            let id = status.header().map(|h| h.member_id()).unwrap_or(0);
            let role = match status.leader() {
                0 => " (no leader)",
                leader if leader == id => " (leader)",
                _ => "",
            };
            let errors = status.errors().join("; ");
            if errors.is_empty() {
                format!("{url} up{role}")
            } else {
                format!("{url} up{role}: {errors}")
            }
        }
        Ok(Err(e)) => {
            let why = match map_err(e) {
                StoreError::Unavailable(msg) | StoreError::Other(msg) => msg,
                other => other.to_string(),
            };
            format!("{url} down ({why})")
        }
        Err(_) => format!("{url} no answer within {bound:?}"),
    }
}
