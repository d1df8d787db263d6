//! A real `svcd run` process on free ports with a config file in a temp dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{eventually, free_port, svcd_bin};

pub struct Daemon {
    child: Option<Child>,
    pub admin: SocketAddr,
    /// DNS over UDP and TCP.
    pub dns: SocketAddr,
    /// The HTTP proxy listener.
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Config text with every listener on a free loopback port, and more keys of the `[dns]` table
/// (which the base config already opens, so a test cannot open it again).
pub fn base_config_with(admin_port: u16, dns_port: u16, http_port: u16, dns_keys: &str) -> String {
    base_config_listening(admin_port, dns_port, http_port, &[], dns_keys, "")
}

/// [`base_config_with`], DNS also listening on `also_listen`, and more keys of the `[admin]`
/// table.
fn base_config_listening(
    admin_port: u16,
    dns_port: u16,
    http_port: u16,
    also_listen: &[&str],
    dns_keys: &str,
    admin_keys: &str,
) -> String {
    let also: String = also_listen.iter().map(|a| format!(", \"{a}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{admin_keys}[dns]\nlisten = [\"127.0.0.1:{dns_port}\"{also}]\n{dns_keys}[[proxy.http]]\nlisten = \"127.0.0.1:{http_port}\"\n"
    )
}

impl Daemon {
    /// Starts `svcd run` with the base config plus `extra` TOML and waits for `/readyz`.
    pub async fn start(extra: &str) -> Daemon {
        Self::start_with(extra, &[]).await
    }

    pub async fn start_with(extra: &str, env: &[(&str, &str)]) -> Daemon {
        let d = Self::spawn(extra, env);
        d.wait_ready().await;
        d
    }

    /// Starts under an open-files limit of `nofile` (soft and hard, through util-linux's
    /// `prlimit`), as a node with a small `LimitNOFILE` would run it.
    pub async fn start_with_nofile(extra: &str, nofile: u64) -> Daemon {
        let d = Self::spawn_wrapped(extra, &[], Some(nofile));
        d.wait_ready().await;
        d
    }

    /// Starts without waiting for readiness.
    pub fn spawn(extra: &str, env: &[(&str, &str)]) -> Daemon {
        Self::spawn_wrapped(extra, env, None)
    }

    /// Starts with DNS also listening on `also_listen` and more keys of the `[dns]` table, and
    /// waits for `/readyz`.
    pub async fn start_with_dns(also_listen: &[&str], dns_keys: &str, extra: &str) -> Daemon {
        let d = Self::spawn_full(also_listen, dns_keys, extra, &[], None, "");
        d.wait_ready().await;
        d
    }

    /// Starts with more keys of the `[admin]` table (`metrics_listen`, `token_file`) and waits
    /// for `/readyz`.
    pub async fn start_with_admin(admin_keys: &str, extra: &str) -> Daemon {
        let d = Self::spawn_full(&[], "", extra, &[], None, admin_keys);
        d.wait_ready().await;
        d
    }

    fn spawn_wrapped(extra: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Daemon {
        Self::spawn_full(&[], "", extra, env, nofile, "")
    }

    fn spawn_full(
        also_listen: &[&str],
        dns_keys: &str,
        extra: &str,
        env: &[(&str, &str)],
        nofile: Option<u64>,
        admin_keys: &str,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let (admin_port, dns_port, http_port) = (free_port(), free_port(), free_port());
        let config_path = dir.path().join("svcd.toml");
        let base = base_config_listening(
            admin_port,
            dns_port,
            http_port,
            also_listen,
            dns_keys,
            admin_keys,
        );
        std::fs::write(&config_path, format!("{base}{extra}")).expect("write config");
        let log = std::fs::File::create(dir.path().join("svcd.log")).expect("log file");
        let mut cmd = match nofile {
            None => Command::new(svcd_bin()),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(svcd_bin());
                c
            }
        };
        cmd.args(["run", "--config", config_path.to_str().expect("utf-8 path")])
            .env_remove("RUST_LOG")
            .env("SVCD_LOG_LEVEL", "info,svcd_registry=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn svcd");
        Daemon {
            child: Some(child),
            admin: format!("127.0.0.1:{admin_port}").parse().expect("addr"),
            dns: format!("127.0.0.1:{dns_port}").parse().expect("addr"),
            http: format!("127.0.0.1:{http_port}").parse().expect("addr"),
            dir,
            config_path,
        }
    }

    pub async fn wait_ready(&self) {
        let admin = self.admin;
        let log = self.dir.path().join("svcd.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http(admin, "GET", "/readyz", None).await {
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "svcd not ready in 20s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Replaces the config file with the base config plus `extra`, sends SIGHUP and waits for
    /// the reload to be counted as applied.
    pub async fn reload_with(&self, extra: &str) {
        self.reload_with_dns("", extra).await
    }

    /// [`Self::reload_with`], with more keys for the `[dns]` table.
    pub async fn reload_with_dns(&self, dns_keys: &str, extra: &str) {
        let before = self
            .metric("svcd_config_reloads_total{result=\"ok\"}")
            .await
            .unwrap_or(0.0);
        std::fs::write(
            &self.config_path,
            format!(
                "{}{extra}",
                base_config_with(
                    self.admin.port(),
                    self.dns.port(),
                    self.http.port(),
                    dns_keys
                )
            ),
        )
        .expect("write config");
        self.signal(Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .metric("svcd_config_reloads_total{result=\"ok\"}")
            .await
            != Some(before + 1.0)
        {
            assert!(
                Instant::now() < deadline,
                "reload not applied; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("svcd.log")).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Reply {
        http(self.admin, "GET", path, None)
            .await
            .expect("admin request")
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        http(self.admin, method, path, body)
            .await
            .expect("admin request")
    }

    /// `PUT /v1/services/default/{svc}/instances/{id}` with `json`; asserts it was accepted.
    pub async fn put_instance(&self, svc: &str, id: &str, json: &str) {
        let r = self
            .request(
                "PUT",
                &format!("/v1/services/default/{svc}/instances/{id}"),
                Some(json),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`…).
    pub fn status_kb(&self, field: &str) -> u64 {
        status_kb_of(self.pid(), field)
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// The daemon's resident memory (`VmRSS` of /proc/<pid>/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kb("VmRSS")
    }

    /// The file descriptors svcd has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("svcd's /proc fd dir")
            .count()
    }

    /// What each open descriptor is (`socket:[inode]` of a TCP socket becomes
    /// `tcp <local> -> <remote> <state>`), to tell which one a test did not expect.
    pub fn describe_fds(&self) -> Vec<String> {
        let mut tcp = std::collections::HashMap::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() > 9 {
                    let port = |a: &str| {
                        let p = a.rsplit(':').next().unwrap_or("0");
                        u16::from_str_radix(p, 16).unwrap_or(0)
                    };
                    let what = format!("tcp :{} -> :{} state {}", port(f[1]), port(f[2]), f[3]);
                    tcp.insert(format!("socket:[{}]", f[9]), what);
                }
            }
        }
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return Vec::new();
        };
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|target| {
                let target = target.display().to_string();
                tcp.get(&target).cloned().unwrap_or(target)
            })
            .collect()
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal svcd");
    }

    /// Waits for exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("svcd did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon (SIGKILL) and starts a new one on the same config file and ports, as a
    /// supervisor restarting it would; waits for readiness.
    pub async fn crash_and_restart(&mut self) {
        self.kill9();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("svcd.log"))
            .expect("log file");
        let child = Command::new(svcd_bin())
            .args([
                "run",
                "--config",
                self.config_path.to_str().expect("utf-8 path"),
            ])
            .env_remove("RUST_LOG")
            .env("SVCD_LOG_LEVEL", "info,svcd_registry=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("respawn svcd");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// The exit status if the daemon has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a client command (`svcd register …`) against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(svcd_bin())
            .args(args)
            .env("SVCD_ADMIN_LISTEN", self.admin.to_string())
            .output()
            .expect("run svcd client command")
    }

    /// The sum of the samples in `/metrics` that match `selector`, e.g.
    /// `svcd_config_reloads_total{result="failed"}`: the same name, and every label given (others,
    /// such as `listener`, may be there too). `None` when no sample matches.
    pub async fn metric(&self, selector: &str) -> Option<f64> {
        let body = self.get("/metrics").await.body;
        metric_sum(&body, selector)
    }

    /// Ids of the instances of `ns/svc` in this daemon's snapshot.
    pub async fn instance_ids(&self, ns: &str, svc: &str) -> Vec<String> {
        let r = self.get(&format!("/v1/services/{ns}/{svc}")).await;
        if r.status == 404 {
            return Vec::new();
        }
        r.json()["instances"]
            .as_array()
            .expect("instances array")
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// Waits until the instance ids of `ns/svc` are exactly `want` (sorted).
    pub async fn wait_instances(&self, ns: &str, svc: &str, want: &[&str], timeout: Duration) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        eventually(
            timeout,
            &format!("{svc}.{ns} instances == {want:?}"),
            || {
                let want = want.clone();
                async move { (self.instance_ids(ns, svc).await == want).then_some(()) }
            },
        )
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One HTTP/1.1 request over a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Reply> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Reply { status, body })
}

/// `svcd exec` registered with a daemon, whose child writes its pid first (then execs its
/// command in place) so a test can kill the child alone. Dropping it kills `svcd exec`, whose
/// child then gets its parent-death signal.
pub struct ExecJob {
    pub exec: Child,
    pidfile: PathBuf,
}

impl ExecJob {
    /// `svcd exec --service job --id ID --ip 10.1.0.1 --port http=80 -- sleep 60`.
    pub fn start(daemon: &Daemon, id: &str) -> ExecJob {
        Self::start_with(daemon, id, &[])
    }

    /// [`Self::start`] with more `svcd exec` options (e.g. `--ttl 1s`).
    pub fn start_with(daemon: &Daemon, id: &str, options: &[&str]) -> ExecJob {
        // No health check: nothing listens at 10.1.0.1, and tests send nothing off loopback.
        let mut all = vec!["--ip", "10.1.0.1", "--port", "http=80", "--check", "none"];
        all.extend_from_slice(options);
        Self::spawn(
            daemon,
            "job",
            id,
            &all,
            &["sleep", "60"],
            Command::new(svcd_bin()),
        )
    }

    /// `svcd exec --service SERVICE --id ID OPTIONS -- COMMAND`, run from `base` (a `Command` of
    /// the svcd binary, where a test sets the environment and output its child inherits).
    pub fn spawn(
        daemon: &Daemon,
        service: &str,
        id: &str,
        options: &[&str],
        command: &[&str],
        mut base: Command,
    ) -> ExecJob {
        let pidfile = daemon.dir.path().join(format!("{id}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let script = format!("echo $$ > {}; exec \"$@\"", pidfile.display());
        let exec = base
            .args(["exec", "--service", service, "--id", id])
            .args(options)
            .arg("--")
            .args(["sh", "-c", &script, "sh"])
            .args(command)
            .env("SVCD_ADMIN_LISTEN", daemon.admin.to_string())
            .spawn()
            .expect("spawn svcd exec");
        ExecJob { exec, pidfile }
    }

    /// Waits until `svcd exec` has exited; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let exec = &mut self.exec;
        eventually(timeout, "svcd exec exited", || {
            let status = exec.try_wait().expect("try_wait");
            async move { status }
        })
        .await
    }

    /// The child's pid, once it has written it.
    pub async fn child_pid(&self) -> Pid {
        let pid: i32 = eventually(Duration::from_secs(5), "child pid file", || async {
            std::fs::read_to_string(&self.pidfile)
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .await;
        Pid::from_raw(pid)
    }

    /// SIGKILLs the child (not `svcd exec`), once it has written its pid.
    pub async fn kill_child(&self) {
        kill(self.child_pid().await, Signal::SIGKILL).expect("kill child");
    }
}

impl Drop for ExecJob {
    fn drop(&mut self) {
        let _ = self.exec.kill();
        let _ = self.exec.wait();
    }
}

/// A `/proc/<pid>/status` field (`VmRSS`, `VmHWM`…) of process `pid`, in kB.
pub fn status_kb_of(pid: Pid, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The resident memory (`VmRSS` of /proc/<pid>/status) of process `pid`, in KiB.
pub fn rss_kib_of(pid: Pid) -> Option<u64> {
    status_kb_of(pid, "VmRSS")
}

/// `name{l1="v1",…}` → (name, ["l1=\"v1\"", …]).
fn parse_selector(selector: &str) -> (&str, Vec<&str>) {
    match selector.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (selector, Vec::new()),
    }
}

/// See [`Daemon::metric`]; works on any exposition text.
pub fn metric_sum(body: &str, selector: &str) -> Option<f64> {
    let (name, want) = parse_selector(selector);
    let mut sum = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, labels) = parse_selector(series);
        if series_name != name || !want.iter().all(|w| labels.contains(w)) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}
