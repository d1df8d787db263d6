//! A real etcd server for one test: free ports, temp data dir, killed on drop. Can be stopped
//! and restarted on the same ports and data (to test reconnects).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

pub struct Etcd {
    pub client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
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

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut etcd = Etcd {
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
            child: None,
        };
        etcd.resume().await;
        etcd
    }

    /// `host:port` of the client endpoint, as svcd's config takes it.
    pub fn endpoint(&self) -> String {
        self.client_url.trim_start_matches("http://").to_string()
    }

    /// (Re)starts the process on the same ports and data dir.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file");
        let child = Command::new(etcd_binary())
            .args([
                "--name",
                "svcd-test",
                "--data-dir",
                self.dir
                    .path()
                    .join("data")
                    .to_str()
                    .expect("utf-8 temp path"),
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
                "--initial-cluster",
                &format!("svcd-test={}", self.peer_url),
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}\n{INSTALL_HINT}"));
        self.child = Some(child);
        let url = self.client_url.clone();
        eventually(Duration::from_secs(20), "etcd to answer", || {
            let url = url.clone();
            async move {
                let mut client = etcd_client::Client::connect([url], None).await.ok()?;
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

    /// Kills the process, deletes its data and starts it empty on the same ports: an etcd
    /// wiped (or restored from an old backup), whose revision starts over.
    pub async fn wipe(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("remove etcd data");
        self.resume().await;
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.client_url.clone()], None)
            .await
            .expect("connect to test etcd")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
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
            let child = Command::new(etcd_binary())
                .args([
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    dir.path().join(format!("m{i}")).to_str().expect("utf-8"),
                    "--listen-client-urls",
                    &client_urls[i],
                    "--advertise-client-urls",
                    &client_urls[i],
                    "--listen-peer-urls",
                    &peer_urls[i],
                    "--initial-advertise-peer-urls",
                    &peer_urls[i],
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--heartbeat-interval",
                    "50",
                    "--election-timeout",
                    "500",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start etcd: {e}\n{INSTALL_HINT}"));
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
