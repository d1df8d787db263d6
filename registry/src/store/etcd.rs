//! The etcd backend over etcd-client. The client's balanced channel reconnects by itself; every
//! call is bounded by the configured request timeout and maps transport failures to
//! `StoreError::Unavailable` so the layers above retry instead of failing.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions,
    WatchStream as EtcdWatchStream,
};
use svcd_config::EtcdConfig;

use super::*;

#[derive(Clone)]
pub struct EtcdStore {
    /// Connected on first use, then kept. Cheap to clone (shared channel); each call clones it
    /// because etcd-client methods take `&mut self`. Lazy because with credentials etcd-client
    /// authenticates while connecting, which needs etcd up: the daemon must start and wait for
    /// an unreachable etcd either way (a failed connect is retried by the next call).
    client: tokio::sync::OnceCell<Client>,
    urls: Vec<String>,
    options: ConnectOptions,
    endpoints: String,
}

/// How long an operation retries an unavailable store before giving up: past a leader election.
const RETRY_FOR: Duration = Duration::from_secs(4);

/// One attempt of a write (put, delete, lease grant) before it is sent again.
const WRITE_ATTEMPT: Duration = Duration::from_secs(1);

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let msg = status.message().to_string();
            if msg.contains("required revision has been compacted") {
                StoreError::Compacted {
                    compact_revision: 0,
                }
            } else if msg.contains("requested lease not found") {
                StoreError::LeaseNotFound(0)
            } else {
                use tonic::Code;
                match status.code() {
                    code @ (Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown) => StoreError::Unavailable(format!("{code:?}: {msg}")),
                    _ => StoreError::Other(msg),
                }
            }
        }
        E::LeaseKeepAliveError(msg) if msg.contains("not found") => StoreError::LeaseNotFound(0),
        E::TransportError(e) => StoreError::Unavailable(e.to_string()),
        E::IoError(e) => StoreError::Unavailable(e.to_string()),
        other => StoreError::Other(other.to_string()),
    }
}

impl EtcdStore {
    /// Builds the client. Connection is lazy: this succeeds while etcd is down, and calls fail
    /// with `Unavailable` until it is reachable.
    pub async fn connect(config: &EtcdConfig) -> StoreResult<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(config.keepalive_interval, config.keepalive_timeout)
            .with_keep_alive_while_idle(true);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user, password);
        }
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        Ok(EtcdStore {
            client: tokio::sync::OnceCell::new(),
            endpoints: endpoints.join(","),
            urls: endpoints,
            options,
        })
    }

    /// Runs `op`, retrying a store that is unavailable for up to [`RETRY_FOR`]: with several
    /// members, a request that reached a dead one is sent again and lands on a live one (the
    /// client balances over the endpoints), so with quorum no write fails. The operations
    /// retried are idempotent (a put of the same value, a delete, a lease grant whose extra
    /// lease expires unused). A final failure names the endpoints.
    ///
    /// Each attempt of a write is bounded by [`WRITE_ATTEMPT`]: a request sitting at a member
    /// whose leader was just killed is only answered after etcd's own request timeout (seconds);
    /// asked again, it lands where the new leader is.
    async fn retrying<T, F, Fut>(&self, attempt: Option<Duration>, mut op: F) -> StoreResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(25);
        loop {
            let result = match self.client().await {
                Ok(client) => match attempt {
                    Some(limit) => match tokio::time::timeout(limit, op(client)).await {
                        Ok(r) => r.map_err(map_err),
                        Err(_) => Err(StoreError::Unavailable(format!(
                            "no answer within {limit:?}"
                        ))),
                    },
                    None => op(client).await.map_err(map_err),
                },
                Err(e) => Err(e),
            };
            match result {
                Err(StoreError::Unavailable(msg)) if started.elapsed() + pause < RETRY_FOR => {
                    tracing::debug!(endpoints = %self.endpoints, error = %msg, "etcd unavailable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(400));
                }
                Err(StoreError::Unavailable(msg)) => {
                    return Err(StoreError::Unavailable(format!(
                        "etcd {}: {msg}",
                        self.endpoints
                    )))
                }
                other => return other,
            }
        }
    }

    /// The connected client, connecting (and with credentials, authenticating) on first use.
    async fn client(&self) -> StoreResult<Client> {
        self.client
            .get_or_try_init(|| async {
                Client::connect(&self.urls, Some(self.options.clone()))
                    .await
                    .map_err(map_err)
            })
            .await
            .cloned()
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn list(
        &self,
        prefix: &str,
        start: &str,
        revision: i64,
        limit: usize,
    ) -> StoreResult<ListPage> {
        let start = if start.is_empty() { prefix } else { start };
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_revision(revision)
            .with_limit(limit as i64);
        let resp = self
            .retrying(None, |mut c| {
                let options = options.clone();
                async move { c.get(start, Some(options)).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
        let history = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| KeyValue {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok(ListPage {
            kvs,
            revision,
            more: resp.more(),
            history,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> StoreResult<i64> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let resp = self
            .retrying(Some(WRITE_ATTEMPT), |mut c| {
                let (value, options) = (value.clone(), options.clone());
                async move { c.put(key, value, options).await }
            })
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease.unwrap_or(0)),
                other => other,
            })?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let resp = self
            .retrying(Some(WRITE_ATTEMPT), |mut c| async move {
                c.delete(key, None).await
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .retrying(Some(WRITE_ATTEMPT), |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Option<Duration>> {
        let client = self.client().await?;
        let once = async {
            let (mut keeper, mut stream) = client.clone().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match once.await.map_err(map_err) {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Some(Duration::from_secs(resp.ttl() as u64))),
            Ok(Some(_)) | Err(StoreError::LeaseNotFound(_)) => Ok(None),
            Ok(None) => Err(StoreError::Unavailable("keep-alive stream closed".into())),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> StoreResult<()> {
        match self
            .client()
            .await?
            .lease_revoke(lease)
            .await
            .map_err(map_err)
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> StoreResult<Box<dyn WatchStream>> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if from_revision > 0 {
            options = options.with_start_revision(from_revision);
        }
        let stream = self
            .client()
            .await?
            .watch(prefix, Some(options))
            .await
            .map_err(map_err)?;
        Ok(Box::new(EtcdWatch { stream }))
    }

    async fn compact(&self, revision: i64) -> StoreResult<()> {
        self.client()
            .await?
            .compact(revision, None)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd({})", self.endpoints)
    }
}

struct EtcdWatch {
    stream: EtcdWatchStream,
}

#[async_trait]
impl WatchStream for EtcdWatch {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>> {
        loop {
            let Some(resp) = self.stream.message().await.map_err(map_err)? else {
                return Ok(None);
            };
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.compact_revision() > 0 {
                return Ok(Some(WatchMessage::Compacted {
                    compact_revision: resp.compact_revision(),
                }));
            }
            if resp.canceled() {
                return Err(StoreError::Unavailable(format!(
                    "watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            if resp.created() && resp.events().is_empty() {
                continue;
            }
            if resp.events().is_empty() {
                return Ok(Some(WatchMessage::Progress { revision }));
            }
            let events = resp
                .events()
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    Some(Event {
                        kind: match e.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        },
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    })
                })
                .collect();
            return Ok(Some(WatchMessage::Events { revision, events }));
        }
    }

    async fn request_progress(&mut self) -> StoreResult<()> {
        self.stream.request_progress().await.map_err(map_err)
    }
}
