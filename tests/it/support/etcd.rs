//! A real etcd server for one test: free ports, temp data dir, killed on drop. Can be stopped
//! and restarted on the same ports and data (to test reconnects).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tls::TlsFiles;
use super::{eventually, free_port};

pub struct Etcd {
    pub client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// With TLS: the files etcd serves with (read at each start, so a test can rotate them) and
    /// what the test's own clients connect with.
    tls: Option<(TlsFiles, etcd_client::TlsOptions)>,
}

const INSTALL_HINT: &str = "etcd is required for this test and was not found on PATH.\n\
     Install it with: apt-get install -y etcd-server   (or run ./scripts/test, which installs it)";

fn etcd_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SVCD_TEST_ETCD") {
        return PathBuf::from(path);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{INSTALL_HINT}");
}

/// One etcd member's command line: fast elections (tests kill members), its own ports and data.
struct Member<'a> {
    name: &'a str,
    data: &'a std::path::Path,
    client_url: &'a str,
    peer_url: &'a str,
    initial_cluster: &'a str,
    /// Serve clients over TLS with these files, requiring client certificates.
    tls: Option<&'a TlsFiles>,
}

impl Member<'_> {
    fn spawn(&self, log: std::fs::File) -> Child {
        Command::new(etcd_binary())
            .args(["--name", self.name])
            .arg("--data-dir")
            .arg(self.data)
            .args(["--listen-client-urls", self.client_url])
            .args(["--advertise-client-urls", self.client_url])
            .args(["--listen-peer-urls", self.peer_url])
            .args(["--initial-advertise-peer-urls", self.peer_url])
            .args(["--initial-cluster", self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(self.tls.iter().flat_map(|t| {
                [
                    "--cert-file".into(),
                    t.cert.clone().into_os_string(),
                    "--key-file".into(),
                    t.key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}\n{INSTALL_HINT}"))
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// Starts etcd serving clients over TLS (`server`: its CA, certificate and key), requiring
    /// client certificates signed by that CA; the test's clients connect with `client`.
    pub async fn start_tls(server: TlsFiles, client: etcd_client::TlsOptions) -> Etcd {
        Etcd::start_with(Some((server, client))).await
    }

    async fn start_with(tls: Option<(TlsFiles, etcd_client::TlsOptions)>) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
            child: None,
            tls,
        };
        etcd.resume().await;
        etcd
    }

    /// What the test's clients connect with from now on (after a rotation).
    pub fn set_client_tls(&mut self, client: etcd_client::TlsOptions) {
        if let Some(tls) = &mut self.tls {
            tls.1 = client;
        }
    }

    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        self.tls
            .as_ref()
            .map(|(_, client)| etcd_client::ConnectOptions::new().with_tls(client.clone()))
    }

    /// `host:port` of the client endpoint, as svcd's config takes it.
    pub fn endpoint(&self) -> String {
        self.client_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string()
    }

    /// (Re)starts the process on the same ports and data dir.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let child = self.spawn_serving(&self.client_url.clone());
        self.child = Some(child);
        self.wait_answering(&self.client_url.clone()).await;
    }

    /// This member on its data dir and peer URL (so always the same member and cluster id),
    /// serving clients at `client_url`.
    fn spawn_serving(&self, client_url: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log file");
        let data = self.dir.path().join("data");
        let initial = format!("svcd-test={}", self.peer_url);
        let member = Member {
            name: "svcd-test",
            data: &data,
            client_url,
            peer_url: &self.peer_url,
            initial_cluster: &initial,
            tls: self.tls.as_ref().map(|t| &t.0),
        };
        member.spawn(log)
    }

    async fn wait_answering(&self, url: &str) {
        let options = self.connect_options();
        eventually(Duration::from_secs(20), "etcd to answer", || {
            let (url, options) = (url.to_string(), options.clone());
            async move {
                let mut client = etcd_client::Client::connect([url], options).await.ok()?;
                client.get("health-probe", None).await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// Kills the process (SIGKILL); data stays for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs the process: a hung etcd whose connections stay open and silent.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONTs a frozen process.
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("etcd running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal etcd");
    }

    /// Kills the process, deletes its data and starts it empty on the same ports: an etcd
    /// wiped (or restored from an old backup), whose revision starts over.
    pub async fn wipe(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("remove etcd data");
        self.resume().await;
    }

    /// Replaces this etcd with another one that its clients cannot tell apart by cluster id or
    /// revision: the process is killed and its data deleted, then an etcd with the same member
    /// name, peer URL and token (so the same cluster id: a cluster rebuilt and restored) starts
    /// from empty data on a client port nobody else knows, is written past `revision` and gets
    /// `kvs` (no lease), and only then serves on the usual ports. Returns its revision.
    pub async fn replace_ahead_of(&mut self, revision: i64, kvs: &[(&str, &str)]) -> i64 {
        let cluster_id = self.cluster_id().await;
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("remove etcd data");
        let scheme = self.client_url.split("://").next().expect("scheme");
        let hidden = format!("{scheme}://127.0.0.1:{}", free_port());
        let mut child = self.spawn_serving(&hidden);
        self.wait_answering(&hidden).await;
        let mut client = etcd_client::Client::connect([hidden], self.connect_options())
            .await
            .expect("connect to the replacement");
        let mut now = 0;
        let mut i = 0;
        while now <= revision {
            let put = client.put(format!("/filler/{i}"), "x", None).await;
            now = put
                .expect("fill the replacement")
                .header()
                .expect("header")
                .revision();
            i += 1;
        }
        for (key, value) in kvs {
            let put = client
                .put(*key, *value, None)
                .await
                .expect("put into the replacement");
            now = put.header().expect("header").revision();
        }
        drop(client);
        let _ = child.kill();
        let _ = child.wait();
        self.resume().await;
        assert_eq!(self.cluster_id().await, cluster_id, "same cluster id");
        now
    }

    async fn cluster_id(&self) -> u64 {
        let status = self.client().await.status().await.expect("etcd status");
        status.header().expect("header").cluster_id()
    }

    /// Writes an endpoint straight into etcd (no lease), as another node or tool would.
    pub async fn put_endpoint(&self, service: &str, id: &str, json: &str) {
        self.client()
            .await
            .put(
                format!("/svcd/v1/endpoints/default/{service}/{id}"),
                json,
                None,
            )
            .await
            .expect("put endpoint");
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.client_url.clone()], self.connect_options())
            .await
            .expect("connect to test etcd")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw(); // a frozen process would keep its ports until reaped
        }
        self.stop();
    }
}

/// A real 3-member etcd cluster (for member-loss tests): free ports, temp data dirs, killed on
/// drop.
pub struct EtcdCluster {
    pub client_urls: Vec<String>,
    _dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

impl EtcdCluster {
    pub async fn start(members: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let client_urls: Vec<String> = (0..members)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let peer_urls: Vec<String> = (0..members)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial: Vec<String> = peer_urls
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect();
        let initial = initial.join(",");
        let mut children = Vec::new();
        for i in 0..members {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("log");
            let (name, data) = (format!("m{i}"), dir.path().join(format!("m{i}")));
            let member = Member {
                name: &name,
                data: &data,
                client_url: &client_urls[i],
                peer_url: &peer_urls[i],
                initial_cluster: &initial,
                tls: None,
            };
            let child = member.spawn(log);
            children.push(Some(child));
        }
        for url in &client_urls {
            let url = url.clone();
            eventually(Duration::from_secs(30), "etcd member to answer", || {
                let url = url.clone();
                async move {
                    let mut client = etcd_client::Client::connect([url], None).await.ok()?;
                    client.put("health-probe", "1", None).await.ok().map(|_| ())
                }
            })
            .await;
        }
        EtcdCluster {
            client_urls,
            _dir: dir,
            children,
        }
    }

    /// `host:port` of every member, as svcd's config takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.client_urls
            .iter()
            .map(|u| u.trim_start_matches("http://").to_string())
            .collect()
    }

    /// The index of the member that is leader now, as the members themselves report it.
    pub async fn leader(&self) -> usize {
        let mut ids = Vec::new();
        let mut leader = 0;
        for url in &self.client_urls {
            let mut client = etcd_client::Client::connect([url.clone()], None)
                .await
                .expect("connect to member");
            let status = client.status().await.expect("member status");
            ids.push(status.header().expect("header").member_id());
            leader = status.leader();
        }
        ids.iter()
            .position(|id| *id == leader)
            .expect("a leader among the members")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
