//! The etcd backend over etcd-client. The client's balanced channel reconnects by itself; every
//! call is bounded by the configured request timeout and maps transport failures to
//! `StoreError::Unavailable` so the layers above retry instead of failing.

use crate::backoff::Backoff;
use crate::error_text::{with_causes, with_sources};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchStream as EtcdWatchStream,
};
use svcd_config::EtcdConfig;

use super::*;

mod members;

use members::{Members, PROBE_BOUND};

pub struct EtcdStore {
    /// The client, connected on first use and kept until credentials are re-read. Cheap to
    /// clone (shared channel); each call clones it because etcd-client methods take `&mut
    /// self`. Lazy because with credentials etcd-client authenticates while connecting, which
    /// needs etcd up: the daemon must start and wait for an unreachable etcd either way (a
    /// failed connect is retried by the next call). An async mutex: taken once per store call
    /// (never per query) and held across a connect so concurrent callers wait for one attempt.
    connection: tokio::sync::Mutex<Connection>,
    /// The config the files are named in, to read them again on reload.
    config: EtcdConfig,
    urls: Vec<String>,
    endpoints: String,
    /// Says which member failed when a call fails as unavailable (shared with the watches).
    members: Arc<Members>,
}

struct Connection {
    options: ConnectOptions,
    client: Option<Client>,
}

/// How long an operation retries an unavailable store before giving up: past a leader election.
/// A write ends within it. docs/registry.md promises API writes answer within 4 s (the lease
/// keeper's `WRITE_BOUND`); ending 100 ms before lets this call's error (what etcd said, which
/// member failed) be the answer rather than the keeper's bare timeout.
const RETRY_FOR: Duration = Duration::from_millis(3900);

/// One attempt of a write (put, delete, lease grant, keep-alive) before it is sent again.
const WRITE_ATTEMPT: Duration = Duration::from_secs(1);

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            // A status made from a transport failure carries it as its source.
            let msg = with_sources(
                status.message().to_string(),
                std::error::Error::source(&status),
            );
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
                    // tonic's answer to a message over `max_decoding_message_size`.
                    Code::OutOfRange if msg.contains("message length too large") => {
                        StoreError::ResponseTooLarge(msg)
                    }
                    _ => StoreError::Other(msg),
                }
            }
        }
        E::LeaseKeepAliveError(msg) if msg.contains("not found") => StoreError::LeaseNotFound(0),
        // tonic's transport error says only "transport error"; the cause (refused, a TLS
        // certificate rejected, ...) is in its sources.
        E::TransportError(e) => StoreError::Unavailable(with_causes(&e)),
        E::IoError(e) => StoreError::Unavailable(with_causes(&e)),
        other => StoreError::Other(with_causes(&other)),
    }
}

/// `e` saying which etcd it came from (once: an error already named is kept as it is).
fn named(endpoints: &str, e: StoreError) -> StoreError {
    let prefix = format!("etcd {endpoints}: ");
    let name = |msg: String| {
        if msg.starts_with(&prefix) {
            msg
        } else {
            format!("{prefix}{msg}")
        }
    };
    match e {
        StoreError::Unavailable(msg) => StoreError::Unavailable(name(msg)),
        StoreError::Other(msg) => StoreError::Other(name(msg)),
        other => other,
    }
}

/// The member report of one [`EtcdStore::retrying`] call: not needed yet, under way (driven
/// along with the retries), or done.
enum Report<'a> {
    NotStarted,
    Running(std::pin::Pin<Box<dyn std::future::Future<Output = Arc<str>> + Send + 'a>>),
    Done(Arc<str>),
}

impl Report<'_> {
    /// Runs `fut`, driving a report under way meanwhile.
    async fn alongside<T>(&mut self, fut: impl std::future::Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        loop {
            let Report::Running(probe) = self else {
                return fut.await;
            };
            tokio::select! {
                out = &mut fut => return out,
                text = probe => *self = Report::Done(text),
            }
        }
    }

    /// The report, once it is done (`None` if it was never needed).
    async fn finish(&mut self) -> Option<Arc<str>> {
        match std::mem::replace(self, Report::NotStarted) {
            Report::NotStarted => None,
            Report::Running(probe) => Some(probe.await),
            Report::Done(text) => Some(text),
        }
    }
}

/// A file the config names, read for the client (credentials, certificates).
fn read_named(key: &str, path: &std::path::Path) -> StoreResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| StoreError::Config(format!("{key}: {}: {e}", path.display())))
}

/// What the client connects with: timeouts from the config, credentials and certificates from
/// the files it names (read now).
/// The largest list response accepted: pages aim at `SyncOptions::page_bytes` (16 MiB), and one
/// page always holds at least one key, whose value etcd caps at 1.5 MiB by default.
const LIST_MAX_MESSAGE_BYTES: usize = 64 << 20;

fn connect_options(config: &EtcdConfig) -> StoreResult<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(config.request_timeout)
        .with_keep_alive(config.keepalive_interval, config.keepalive_timeout)
        .with_keep_alive_while_idle(true);
    let password = match (&config.password, &config.password_file) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(path)) => {
            let raw = read_named("registry.etcd.password_file", path)?;
            let text = String::from_utf8(raw).map_err(|_| {
                StoreError::Config(format!(
                    "registry.etcd.password_file: {}: not UTF-8",
                    path.display()
                ))
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
        (None, None) => None,
    };
    if let (Some(user), Some(password)) = (&config.username, password) {
        options = options.with_user(user, password);
    }
    if let Some(tls) = &config.tls {
        let ca = read_named("registry.etcd.tls.ca", &tls.ca)?;
        let mut settings = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            let cert = read_named("registry.etcd.tls.cert", cert)?;
            let key = read_named("registry.etcd.tls.key", key)?;
            settings = settings.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &tls.server_name {
            settings = settings.domain_name(name.clone());
        }
        options = options.with_tls(settings);
    }
    Ok(options)
}

impl EtcdStore {
    /// Reads the credentials and certificates and prepares the client. Connection is lazy:
    /// this succeeds while etcd is down, and calls fail with `Unavailable` until it is
    /// reachable. A file that cannot be read is a `Config` error.
    pub async fn connect(config: &EtcdConfig) -> StoreResult<Self> {
        let options = connect_options(config)?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        Ok(EtcdStore {
            members: Arc::new(Members::new(endpoints.clone(), options.clone())),
            connection: tokio::sync::Mutex::new(Connection {
                options,
                client: None,
            }),
            config: config.clone(),
            endpoints: endpoints.join(","),
            urls: endpoints,
        })
    }

    /// Runs `op`, retrying a store that is unavailable for up to [`RETRY_FOR`]: with several
    /// members, a request that reached a dead one is sent again and lands on a live one (the
    /// client balances over the endpoints), so with quorum no write fails. The operations
    /// retried are idempotent (a put of the same value, a delete, a lease grant whose extra
    /// lease expires unused, a keep-alive). A final failure names the endpoints.
    ///
    /// Each attempt of a write is bounded by [`WRITE_ATTEMPT`] (connecting included): a request
    /// sitting at a member whose leader was just killed is only answered after etcd's own
    /// request timeout (seconds); asked again, it lands where the new leader is. With `attempt`
    /// the whole call ends within [`RETRY_FOR`]: the last attempt gets what is left.
    ///
    /// With several members, the first failure starts a probe of each (see [`members`]) that
    /// runs alongside the retries, so a final failure says which member failed without taking
    /// longer.
    async fn retrying<T, F, Fut>(&self, attempt: Option<Duration>, mut op: F) -> StoreResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let deadline = started + RETRY_FOR;
        let mut pause = Backoff::new(Duration::from_millis(25), Duration::from_millis(400));
        let mut tries = 0u32;
        let mut report = Report::NotStarted;
        loop {
            tries += 1;
            let once = async {
                let client = self.client().await?;
                op(client).await.map_err(map_err)
            };
            let result = match attempt {
                Some(limit) => {
                    let limit = limit.min(deadline - tokio::time::Instant::now());
                    let bounded = tokio::time::timeout(limit, once);
                    match report.alongside(bounded).await {
                        Ok(r) => r,
                        Err(_) => Err(StoreError::Unavailable(format!(
                            "no answer within {limit:?}"
                        ))),
                    }
                }
                None => report.alongside(once).await,
            };
            let msg = match result {
                Err(StoreError::Unavailable(msg)) => msg,
                // Done, or refused (permission, authentication).
                other => return other.map_err(|e| named(&self.endpoints, e)),
            };
            if matches!(report, Report::NotStarted) && self.members.several() {
                let bound = PROBE_BOUND.min(deadline - tokio::time::Instant::now());
                let since = tokio::time::Instant::now();
                report = Report::Running(Box::pin(self.members.report(since, bound)));
            }
            let wait = pause.step();
            if tokio::time::Instant::now() + wait < deadline {
                tracing::debug!(endpoints = %self.endpoints, error = %msg, "etcd unavailable; retrying");
                report.alongside(tokio::time::sleep(wait)).await;
                continue;
            }
            let mut msg = msg;
            if tries > 1 {
                let spent = started.elapsed();
                msg = format!("{msg} (tried {tries} times in {spent:.1?})");
            }
            // The probe ends within its bound; what is left of the deadline is waited at most.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Ok(Some(members)) = tokio::time::timeout(left, report.finish()).await {
                msg = format!("{msg}; {members}");
            }
            return Err(named(&self.endpoints, StoreError::Unavailable(msg)));
        }
    }

    /// The connected client, connecting (and with credentials, authenticating) on first use.
    async fn client(&self) -> StoreResult<Client> {
        let mut connection = self.connection.lock().await;
        if let Some(client) = &connection.client {
            return Ok(client.clone());
        }
        let client = Client::connect(&self.urls, Some(connection.options.clone()))
            .await
            .map_err(|e| named(&self.endpoints, map_err(e)))?;
        connection.client = Some(client.clone());
        Ok(client)
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
        let mut resp = self
            .retrying(None, |c| {
                let options = options.clone();
                // A page is sized by bytes (see `SyncOptions::page_bytes`), past tonic's 4 MiB
                // default: allow what the largest page can be.
                let mut kv = c
                    .kv_client()
                    .max_decoding_message_size(LIST_MAX_MESSAGE_BYTES);
                async move { kv.get(start, Some(options)).await }
            })
            .await?;
        // A pinned read is at the revision asked for; the header carries the store's current
        // one, and a listing that took it would resume its watch past writes made meanwhile.
        let revision = match revision {
            0 => resp.header().map(|h| h.revision()).unwrap_or(0),
            pinned => pinned,
        };
        let history = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        // Owned, not copied: at a million keys the listing is the bulk of the start-up work.
        let kvs = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (mod_revision, create_revision) = (kv.mod_revision(), kv.create_revision());
                let (key, value) = kv.into_key_value();
                KeyValue {
                    key: String::from_utf8(key)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                    value,
                    mod_revision,
                    create_revision,
                }
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

    async fn put_if_absent(&self, key: &str, value: Vec<u8>) -> StoreResult<KeyValue> {
        // Sent again after a lost answer, the compare fails and the get returns what the first
        // attempt wrote: idempotent.
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .retrying(Some(WRITE_ATTEMPT), |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(KeyValue {
                key: key.to_string(),
                value,
                mod_revision: revision,
                create_revision: revision,
            });
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| KeyValue {
                key: key.to_string(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
            }),
            _ => None,
        });
        // The compare failed because the key exists; gone by the get only if deleted in
        // between, which the next call sees.
        existing.ok_or_else(|| StoreError::Other(format!("{key}: deleted while being read")))
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
        // Bounded as a write: a hung etcd must not hold the keeper's round for etcd's request
        // timeout (10 s by default, as long as a lease).
        let answer = self
            .retrying(Some(WRITE_ATTEMPT), |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match answer {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Some(Duration::from_secs(resp.ttl() as u64))),
            Ok(Some(_)) | Err(StoreError::LeaseNotFound(_)) => Ok(None),
            Ok(None) => Err(named(
                &self.endpoints,
                StoreError::Unavailable("keep-alive stream closed".into()),
            )),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> StoreResult<()> {
        match self
            .client()
            .await?
            .lease_revoke(lease)
            .await
            .map_err(|e| named(&self.endpoints, map_err(e)))
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
        let opened = async {
            self.client()
                .await?
                .watch(prefix, Some(options))
                .await
                .map_err(map_err)
        };
        let stream = match opened.await {
            Ok(stream) => stream,
            Err(e) => {
                let e = named(&self.endpoints, e);
                return Err(self.members.explain(e, PROBE_BOUND).await);
            }
        };
        Ok(Box::new(EtcdWatch {
            stream,
            endpoints: self.endpoints.clone(),
            members: self.members.clone(),
        }))
    }

    async fn compact(&self, revision: i64) -> StoreResult<()> {
        self.client()
            .await?
            .compact(revision, None)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn reload_credentials(&self) -> StoreResult<()> {
        let options = connect_options(&self.config)?;
        self.members.set_options(options.clone());
        let mut connection = self.connection.lock().await;
        connection.options = options;
        // The next call connects with them; a watch open now keeps its connection until it
        // breaks (TLS checks certificates at the handshake only).
        connection.client = None;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("etcd({})", self.endpoints)
    }
}

struct EtcdWatch {
    stream: EtcdWatchStream,
    /// For the errors it reports.
    endpoints: String,
    members: Arc<Members>,
}

#[async_trait]
impl WatchStream for EtcdWatch {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>> {
        loop {
            let message = match self.stream.message().await {
                Ok(message) => message,
                Err(e) => {
                    let e = named(&self.endpoints, map_err(e));
                    return Err(self.members.explain(e, PROBE_BOUND).await);
                }
            };
            let Some(resp) = message else {
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
        let sent = self.stream.request_progress().await;
        sent.map_err(|e| named(&self.endpoints, map_err(e)))
    }
}
