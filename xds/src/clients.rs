//! The connected xDS clients, for `GET /v1/xds/clients`: node, subscriptions, the versions they
//! ACKed and their last NACK. Each stream writes its own entry (only on requests, never per
//! push to other streams); the admin API reads them all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::subscriptions::NameList;

/// At most this many subscribed names are listed per type (the count is always exact).
const NAMES_SHOWN: usize = 100;

#[derive(Default)]
pub struct Clients {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Arc<Mutex<ClientInfo>>>>,
}

/// One stream as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo {
    pub stream: u64,
    /// Which service the stream speaks: `ads`, `cds` or `eds`.
    pub api: &'static str,
    pub peer: String,
    /// From the stream's first request that carried a node.
    pub node_id: Option<String>,
    pub node_cluster: Option<String>,
    pub user_agent: Option<String>,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
    /// By type (`listener`, `route`, `cluster`, `endpoint`), those the client asked for.
    pub types: BTreeMap<&'static str, TypeInfo>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeInfo {
    /// Subscribed to every resource of the type (LDS/CDS without names).
    pub wildcard: bool,
    /// The subscribed names, sorted (the stream's own list, shared): the first 100 are shown.
    #[serde(serialize_with = "first_names")]
    pub names: NameList,
    pub names_count: usize,
    /// The `version_info` of the last response sent, and its nonce.
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    /// The last version the client ACKed.
    pub acked_version: Option<String>,
    pub last_nack: Option<NackInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NackInfo {
    /// The version the client rejected (it keeps its last good one).
    pub rejected_version: String,
    pub nonce: String,
    pub error: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl TypeInfo {
    pub fn set_names(&mut self, wildcard: bool, names: &NameList) {
        self.wildcard = wildcard;
        self.names_count = names.len();
        self.names = names.clone();
    }
}

fn first_names<S: serde::Serializer>(names: &NameList, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().take(NAMES_SHOWN).map(|n| &**n))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Clients {
    /// Adds a stream; it is listed until the returned handle is dropped.
    pub fn register(self: &Arc<Self>, api: &'static str, peer: String) -> ClientHandle {
        let stream = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(Mutex::new(ClientInfo {
            stream,
            api,
            peer,
            node_id: None,
            node_cluster: None,
            user_agent: None,
            connected_at: unix_now(),
            types: BTreeMap::new(),
        }));
        self.lock().insert(stream, info.clone());
        ClientHandle {
            clients: self.clone(),
            stream,
            info,
        }
    }

    /// Every connected stream, oldest first.
    pub fn list(&self) -> Vec<ClientInfo> {
        let streams: Vec<_> = self.lock().values().cloned().collect();
        streams
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Mutex<ClientInfo>>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream's entry; removed when dropped.
pub struct ClientHandle {
    clients: Arc<Clients>,
    stream: u64,
    info: Arc<Mutex<ClientInfo>>,
}

impl ClientHandle {
    pub fn update(&self, f: impl FnOnce(&mut ClientInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.stream);
    }
}
