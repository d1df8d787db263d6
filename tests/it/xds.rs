//! xDS with real clients (docs/xds.md): grpcio's and grpc-js's `xds:///` resolvers balancing
//! over gRPC echo servers registered in svcd, following registrations, drains and failing
//! checks within a second.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::daemon::Daemon;
use crate::support::{assert_success, eventually, free_port};

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// A tool scripts/setup installs under target/tools; missing is a failure, never a skip.
fn tool(rel: &str) -> String {
    let path = format!("{}/target/tools/{rel}", root());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} missing: run scripts/setup --with-etcd, which installs it"
    );
    path
}

fn script(name: &str) -> String {
    format!("{}/tests/it/xds/{name}", root())
}

/// A child process whose stdout lines are collected with the time they arrived; killed (and
/// its stdin closed) when dropped.
struct Lines {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Lines {
    fn spawn(mut command: Command) -> Lines {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn test client");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Lines {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// gRPC echo servers (tests/it/xds/grpc_echo.py), one per id; their ports by id.
struct EchoServers {
    lines: Lines,
    control: tempfile::TempDir,
}

impl EchoServers {
    async fn start(ids: &[&str]) -> EchoServers {
        let control = tempfile::tempdir().unwrap();
        let mut command = Command::new(tool("venv/bin/python3"));
        command
            .arg(script("grpc_echo.py"))
            .arg(control.path())
            .args(ids);
        let lines = Lines::spawn(command);
        eventually(Duration::from_secs(20), "echo servers ready", || {
            let ready = lines.snapshot().iter().any(|(_, l)| l == "ready");
            async move { ready.then_some(()) }
        })
        .await;
        EchoServers { lines, control }
    }

    fn port(&self, id: &str) -> u16 {
        self.lines
            .snapshot()
            .iter()
            .find_map(|(_, l)| {
                let (i, p) = l.split_once(' ')?;
                (i == id).then(|| p.parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no echo server {id}"))
    }

    /// Makes `id` answer its gRPC health check NOT_SERVING.
    fn fail_check(&self, id: &str) {
        std::fs::write(self.control.path().join(format!("{id}.down")), b"").unwrap();
    }
}

/// Registers echo server `id` (a gRPC health check every 100 ms, one failure marks it down).
async fn register(d: &Daemon, echo: &EchoServers, id: &str) {
    d.put_instance(
        "echo",
        id,
        &format!(
            r#"{{"ip":"127.0.0.1","ports":{{"grpc":{}}},"check":{{"type":"grpc","interval":"100ms","timeout":"500ms","healthy_threshold":1,"unhealthy_threshold":1}}}}"#,
            echo.port(id)
        ),
    )
    .await;
}

async fn xds_daemon() -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start(&format!("[xds]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    (d, port)
}

/// `svcd xds-bootstrap` written to a file in the daemon's directory.
fn bootstrap(d: &Daemon, port: u16, node: &str, envoy: bool) -> std::path::PathBuf {
    let server = format!("127.0.0.1:{port}");
    let mut args = vec!["xds-bootstrap", "--server", &server, "--node-id", node];
    if envoy {
        args.push("--envoy");
    }
    let out = d.cli(&args);
    assert_success(&out);
    // Envoy picks the parser by extension.
    let ext = if envoy { "yaml" } else { "json" };
    let path = d.dir.path().join(format!("{node}.{ext}"));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&out.stdout)
        .unwrap();
    path
}

/// Which servers answered the calls after `from` (line index), by id.
fn answers_after(client: &Lines, from: usize) -> Vec<String> {
    client.snapshot()[from..]
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("ok ").map(str::to_string))
        .collect()
}

/// Waits until `client` has made `calls` calls since `from` and returns who answered them.
async fn next_calls(client: &Lines, calls: usize) -> Vec<String> {
    let from = client.len();
    eventually(Duration::from_secs(10), "client calls", || {
        let answers = answers_after(client, from);
        async move { (answers.len() >= calls).then_some(answers) }
    })
    .await
}

/// Waits until `id` answers again (after `since`), and returns how long after `since` its first
/// answer came.
async fn starts_answering(client: &Lines, id: &str, since: Instant) -> Duration {
    let from = client.len();
    eventually(Duration::from_secs(5), &format!("{id} answering"), || {
        let first = client.snapshot()[from..]
            .iter()
            .find(|(_, l)| l.strip_prefix("ok ") == Some(id))
            .map(|(t, _)| t.duration_since(since));
        async move { first }
    })
    .await
}

/// Waits until the client has made 40 calls in a row none of which `id` answered, and returns
/// how long after `since` `id`'s last answer came (zero if none after it).
async fn stops_answering(client: &Lines, id: &str, since: Instant) -> Duration {
    let from = client.len();
    eventually(
        Duration::from_secs(5),
        &format!("{id} no longer answering"),
        || {
            let lines = client.snapshot()[from..].to_vec();
            let last = lines
                .iter()
                .rposition(|(_, l)| l.strip_prefix("ok ") == Some(id));
            let after = lines[last.map_or(0, |i| i + 1)..]
                .iter()
                .filter(|(_, l)| l.starts_with("ok "))
                .count();
            let took = last.map_or(Duration::ZERO, |i| {
                lines[i].0.saturating_duration_since(since)
            });
            async move { (after >= 40).then_some(took) }
        },
    )
    .await
}

fn share(answers: &[String], id: &str) -> f64 {
    answers.iter().filter(|a| *a == id).count() as f64 / answers.len() as f64
}

/// The client's next 100 calls are spread over `e1` and `e2`, 30–70 % each.
async fn balanced_over_e1_and_e2(client: &Lines) {
    let answers = next_calls(client, 100).await;
    for id in ["e1", "e2"] {
        let s = share(&answers, id);
        assert!((0.3..=0.7).contains(&s), "{id} got {s} of {answers:?}");
    }
}

/// `method path` on the admin API succeeds, and `id` gets no calls within 1 s of it.
async fn stops_within_a_second(d: &Daemon, client: &Lines, method: &str, path: &str, id: &str) {
    let t = Instant::now();
    let r = d.request(method, path, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let took = stops_answering(client, id, t).await;
    assert!(
        took < Duration::from_secs(1),
        "{id} answered {took:?} after {method} {path}"
    );
}

/// The grpc-js client (tests/it/xds/grpc_js_client.js) calling `target` with `bootstrap`.
fn grpc_js_client(target: &str, bootstrap: &std::path::Path) -> Lines {
    let mut command = Command::new("node");
    command
        .arg(script("grpc_js_client.js"))
        .arg(target)
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .env("NODE_PATH", tool("node/node_modules"));
    Lines::spawn(command)
}

/// Runs the balancing scenario against one client process.
async fn balances_and_follows_changes(d: &Daemon, echo: &EchoServers, client: &Lines) {
    // Balanced over the two registered instances.
    balanced_over_e1_and_e2(client).await;

    // A new instance gets traffic within 1 s.
    let t = Instant::now();
    register(d, echo, "e3").await;
    let took = starts_answering(client, "e3", t).await;
    assert!(
        took < Duration::from_secs(1),
        "e3 first answered after {took:?}"
    );

    // Deregistered: no traffic within 1 s.
    let instances = "/v1/services/default/echo/instances";
    stops_within_a_second(d, client, "DELETE", &format!("{instances}/e1"), "e1").await;

    // Drained: no new traffic within 1 s.
    stops_within_a_second(d, client, "POST", &format!("{instances}/e2/drain"), "e2").await;

    // Failing its active check: no traffic within 1 s of the failure.
    register(d, echo, "e4").await;
    starts_answering(client, "e4", Instant::now()).await;
    let t = Instant::now();
    echo.fail_check("e3");
    let took = stops_answering(client, "e3", t).await;
    assert!(
        took < Duration::from_secs(1),
        "e3 answered {took:?} after its check failed"
    );
    let answers = next_calls(client, 50).await;
    assert!(answers.iter().all(|a| a == "e4"), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_xds_client_balances_and_follows_registrations_drains_and_checks() {
    let (d, port) = xds_daemon().await;
    let echo = EchoServers::start(&["e1", "e2", "e3", "e4"]).await;
    register(&d, &echo, "e1").await;
    register(&d, &echo, "e2").await;
    let bootstrap = bootstrap(&d, port, "py-client", false);
    let mut command = Command::new(tool("venv/bin/python3"));
    command
        .arg(script("grpc_xds_client.py"))
        .arg("echo.default.svc.cluster.local")
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap);
    let client = Lines::spawn(command);
    balances_and_follows_changes(&d, &echo, &client).await;

    // The admin API lists the client: its node, subscriptions and ACKed versions.
    let clients = d.get("/v1/xds/clients").await.json();
    let c = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["node_id"] == "py-client")
        .unwrap_or_else(|| panic!("{clients}"))
        .clone();
    assert_eq!(
        c["types"]["listener"]["names"][0],
        "echo.default.svc.cluster.local"
    );
    assert_eq!(c["types"]["cluster"]["names"][0], "echo.default:grpc");
    assert!(c["types"]["endpoint"]["acked_version"].is_string(), "{c}");
    assert!(
        d.metric("svcd_xds_acks_total{type=\"endpoint\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(d.metric("svcd_xds_streams").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_xds_client_resolves_the_same_target() {
    let (d, port) = xds_daemon().await;
    let echo = EchoServers::start(&["e1", "e2", "e3", "e4"]).await;
    register(&d, &echo, "e1").await;
    register(&d, &echo, "e2").await;
    let bootstrap = bootstrap(&d, port, "js-client", false);
    let client = grpc_js_client("echo.default.svc.cluster.local", &bootstrap);
    balanced_over_e1_and_e2(&client).await;
    stops_within_a_second(
        &d,
        &client,
        "DELETE",
        "/v1/services/default/echo/instances/e1",
        "e1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_reaches_xds_over_tls_with_a_client_certificate() {
    let ca = crate::support::tls::TestCa::new("xds-ca");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue("svcd", false).write(certs.path(), "server");
    let (client_cert, client_key) = ca.issue("client", false).write(certs.path(), "client");
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let port = free_port();
    let d = Daemon::start(&format!(
        "[xds]\nlisten = \"127.0.0.1:{port}\"\n[xds.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca_file:?}\n"
    ))
    .await;
    let echo = EchoServers::start(&["e1", "e2"]).await;
    register(&d, &echo, "e1").await;
    register(&d, &echo, "e2").await;
    let server = format!("127.0.0.1:{port}");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ca_file, client_cert, client_key) =
        (path(&ca_file), path(&client_cert), path(&client_key));
    let out = d.cli(&[
        "xds-bootstrap",
        "--server",
        &server,
        "--node-id",
        "tls-client",
        "--tls-ca",
        &ca_file,
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
        "--tls-server-name",
        "localhost",
    ]);
    assert_success(&out);
    let bootstrap = d.dir.path().join("tls-client.json");
    std::fs::write(&bootstrap, &out.stdout).unwrap();
    let mut command = Command::new(tool("venv/bin/python3"));
    command
        .arg(script("grpc_xds_client.py"))
        .arg("echo.default")
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap);
    let client = Lines::spawn(command);
    balanced_over_e1_and_e2(&client).await;
    let clients = d.get("/v1/xds/clients").await.json();
    assert_eq!(clients["clients"][0]["node_id"], "tls-client");
}

/// Over a unix socket with grpc-js (which sends `:authority: localhost` there). gRPC C-core
/// clients (grpcio) send the percent-encoded socket path instead, which the HTTP/2 library
/// refuses as a malformed authority (hyperium/h2#487); docs/xds.md says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_reaches_xds_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xds.sock");
    let d = Daemon::start(&format!("[xds]\nlisten = \"unix:{}\"\n", socket.display())).await;
    let echo = EchoServers::start(&["e1", "e2"]).await;
    register(&d, &echo, "e1").await;
    register(&d, &echo, "e2").await;
    let server = format!("unix:{}", socket.display());
    let out = d.cli(&[
        "xds-bootstrap",
        "--server",
        &server,
        "--node-id",
        "unix-client",
    ]);
    assert_success(&out);
    let bootstrap = d.dir.path().join("unix-client.json");
    std::fs::write(&bootstrap, &out.stdout).unwrap();
    let client = grpc_js_client("echo.default.svc.cluster.local", &bootstrap);
    balanced_over_e1_and_e2(&client).await;
    let clients = d.get("/v1/xds/clients").await.json();
    assert_eq!(clients["clients"][0]["node_id"], "unix-client");
    assert_eq!(clients["clients"][0]["peer"], "unix");
}

mod envoy;
mod protocol;
