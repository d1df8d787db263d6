//! The `Store` contract: the handful of etcd operations the registry needs. Two implementations —
//! [`EtcdStore`] over etcd-client and [`EmbeddedStore`] in process — pass one conformance suite, so
//! everything above this module is written once.

mod embedded;
mod etcd;

use std::time::Duration;

use async_trait::async_trait;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

pub type LeaseId = i64;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The requested revision is older than the store keeps; re-list.
    #[error("revision compacted (oldest available {compact_revision})")]
    Compacted { compact_revision: i64 },
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    #[error("store error: {0}")]
    Other(String),
    /// The store's settings cannot be used (a credentials or certificate file unreadable).
    #[error("{0}")]
    Config(String),
    /// A list page's response was larger than this client accepts; ask for fewer keys.
    #[error("list response too large: {0}")]
    ResponseTooLarge(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The revision that created the key (a key deleted and put again gets a new one).
    pub create_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub key: String,
    /// Empty for deletes.
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// One page of a prefix listing, all pages taken at the same `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub kvs: Vec<KeyValue>,
    /// The revision the page was read at; pass it back to read the next page consistently.
    pub revision: i64,
    /// More keys follow the last one in `kvs`.
    pub more: bool,
    /// Which history `revision` belongs to (etcd's cluster id). A store replaced by another
    /// cluster, or recreated, has another one; its revisions say nothing about ours.
    pub history: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events in revision order; `revision` is the store revision after them.
    Events { revision: i64, events: Vec<Event> },
    /// Everything up to `revision` has been delivered (answer to `request_progress`).
    Progress { revision: i64 },
    /// The start revision was compacted away; the stream is over, re-list.
    Compacted { compact_revision: i64 },
}

/// An open watch. `next` returns `Ok(None)` when the stream ended (the caller resumes from its
/// last revision) and `Err` when it broke.
#[async_trait]
pub trait WatchStream: Send {
    async fn next(&mut self) -> StoreResult<Option<WatchMessage>>;
    /// Asks for a `Progress` message; used as a heartbeat to detect hung streams.
    async fn request_progress(&mut self) -> StoreResult<()>;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Up to `limit` keys under `prefix`, starting at key `start` (inclusive; empty = the prefix),
    /// read at `revision` (0 = latest).
    async fn list(
        &self,
        prefix: &str,
        start: &str,
        revision: i64,
        limit: usize,
    ) -> StoreResult<ListPage>;
    /// Returns the revision of the write.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> StoreResult<i64>;
    /// Creates `key` with `value` unless it exists, in one atomic step (of several writers
    /// racing, one creates it). Returns what the key holds afterwards: `value` when this call
    /// created it, the existing value otherwise. No lease: the key outlives every daemon.
    async fn put_if_absent(&self, key: &str, value: Vec<u8>) -> StoreResult<KeyValue>;
    /// Returns whether a key was deleted.
    async fn delete(&self, key: &str) -> StoreResult<bool>;
    async fn grant(&self, ttl: Duration) -> StoreResult<LeaseId>;
    /// Refreshes the lease; `None` means it no longer exists (expired or revoked).
    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Option<Duration>>;
    /// Revokes the lease and deletes its keys; revoking an unknown lease is not an error.
    async fn revoke(&self, lease: LeaseId) -> StoreResult<()>;
    /// Watches `prefix` from `from_revision` (inclusive).
    async fn watch(&self, prefix: &str, from_revision: i64) -> StoreResult<Box<dyn WatchStream>>;
    /// Discards history before `revision` (tests and operators).
    async fn compact(&self, revision: i64) -> StoreResult<()>;
    /// Short description for logs and `/readyz`.
    fn describe(&self) -> String;

    /// Reads credentials and certificates again (SIGHUP); later connections use them.
    async fn reload_credentials(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// The end of a prefix range: the prefix with its last byte incremented (etcd's convention).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Reads every key under `prefix` at one revision, in pages of `page_size`, so a large registry
/// never produces one huge response. Returns the kvs and the revision they were read at.
pub async fn list_all(
    store: &dyn Store,
    prefix: &str,
    page_size: usize,
) -> StoreResult<(Vec<KeyValue>, i64)> {
    let mut kvs = Vec::new();
    let mut revision = 0;
    let mut start = prefix.to_string();
    loop {
        let page = store.list(prefix, &start, revision, page_size).await?;
        // Later pages are read at the first page's revision (etcd's header says the current).
        if revision == 0 {
            revision = page.revision;
        }
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            start = format!("{}\0", last.key);
        }
        kvs.extend(page.kvs);
        if !more {
            return Ok((kvs, revision));
        }
    }
}
