//! What a node's service manager sees: the systemd unit verifies, and the daemon speaks the
//! notify protocol (READY=1 only once `/readyz` is ready, RELOADING=1 … READY=1 on SIGHUP,
//! STOPPING=1 at the drain, WATCHDOG=1 pings) over a real `NOTIFY_SOCKET`. The Prometheus rules
//! pass promtool and their unit tests; the Kubernetes manifests (`pod`) and the container image
//! (`image`) start as a node and a container runtime would run them.

mod image;
mod kubelet;
mod pod;
mod sandbox;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;
use tokio::time::Instant;

use crate::support::daemon::{http, Daemon};
use crate::support::etcd::Etcd;
use crate::support::{eventually, svcd_bin};

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/svcd.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload="));
    // Verified against the binary just built (the packaged path does not exist here).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svcd.service");
    std::fs::write(&path, unit.replace("/usr/bin/svcd", svcd_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

/// Every notification received, with when it came.
type Notes = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(socket: UnixDatagram) -> Notes {
    let notes: Notes = Arc::default();
    let seen = notes.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.lock().unwrap().push((Instant::now(), text));
        }
    });
    notes
}

fn texts(notes: &Notes) -> Vec<String> {
    notes
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| t.clone())
        .collect()
}

#[tokio::test]
async fn ready_is_sent_only_once_readyz_is_ready_then_reloading_stopping_and_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notes = listen(UnixDatagram::bind(&path).unwrap());
    // etcd down at start: the daemon runs but is not ready, and must not say it is.
    let mut etcd = Etcd::start().await;
    etcd.stop();
    let mut d = Daemon::spawn(
        &format!("[registry.etcd]\nendpoints = [\"{}\"]\n", etcd.endpoint()),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    eventually(Duration::from_secs(10), "the admin API up", || async {
        http(d.admin, "GET", "/readyz", None).await.ok().map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(d.get("/readyz").await.status, 503);
    assert!(
        !texts(&notes).iter().any(|t| t.contains("READY=1")),
        "READY=1 before ready: {:?}",
        texts(&notes)
    );
    // Watchdog pings come every 200 ms meanwhile.
    let pings = texts(&notes)
        .iter()
        .filter(|t| t.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 3, "{pings} watchdog pings in a second");

    etcd.resume().await;
    let ready_at = eventually(Duration::from_secs(10), "READY=1", || async {
        notes
            .lock()
            .unwrap()
            .iter()
            .find(|(_, t)| t.contains("READY=1"))
            .map(|(at, _)| *at)
    })
    .await;
    assert_eq!(d.get("/readyz").await.status, 200);
    eprintln!("READY=1 {:?} ago", ready_at.elapsed());

    // A reload is bracketed by RELOADING=1 (with the monotonic time systemd wants) and READY=1.
    let before = texts(&notes).len();
    d.signal(Signal::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "RELOADING=1 then READY=1",
        || async {
            let after: Vec<String> = texts(&notes)[before..]
                .iter()
                .filter(|t| !t.contains("WATCHDOG=1"))
                .cloned()
                .collect();
            (after.len() >= 2
                && after[0].contains("RELOADING=1")
                && after[0].contains("MONOTONIC_USEC=")
                && after[1].contains("READY=1"))
            .then_some(())
        },
    )
    .await;

    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    eventually(Duration::from_secs(2), "STOPPING=1", || async {
        texts(&notes)
            .iter()
            .any(|t| t.contains("STOPPING=1"))
            .then_some(())
    })
    .await;
}

/// The metric names a rules or dashboard file queries (recording rules' own names, which have
/// colons, left out; histogram suffixes stripped).
fn queried_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("svcd_") {
        let start = i + at;
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        let recorded = (start > 0 && bytes[start - 1] == b':') || text[end..].starts_with(':');
        if !recorded {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(name.to_string());
        }
        i = end;
    }
    names
}

#[tokio::test]
async fn every_metric_the_rules_and_dashboard_query_is_in_a_live_scrape() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/svcd-rules.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/svcd-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut queried = queried_metrics(&rules);
    queried.extend(queried_metrics(&dashboard));
    assert!(queried.len() >= 20, "{queried:?}");

    // A daemon with traffic in every plane, so every family has series.
    let (tcp, udp) = (crate::support::free_port(), crate::support::free_port());
    // An HTTPS listener too, for the TLS series.
    let ca = crate::support::tls::TestCa::new("deploy ca");
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca
        .issue_sans("web", &["web"], None, false)
        .write(tls_dir.path(), "web");
    let d = Daemon::start(&format!(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:{tcp}\"\nservice = \"web\"\n\
         [[proxy.udp]]\nlisten = \"127.0.0.1:{udp}\"\nservice = \"web\"\n\
         [[proxy.http]]\nlisten = \"127.0.0.1:{}\"\n[proxy.http.tls]\ncert = {:?}\nkey = {:?}\n",
        crate::support::free_port(),
        cert.display().to_string(),
        key.display().to_string(),
    ))
    .await;
    let backend = crate::support::backend::Backend::start("b1").await;
    crate::support::proxy::register(&d, "web", "w1", backend.addr, "http").await;
    crate::support::proxy::wait_routable(&d, "web", 1).await;
    let _ = tokio::net::TcpStream::connect(("127.0.0.1", tcp)).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"ping", ("127.0.0.1", udp)).await.unwrap();
    crate::support::dns::udp(
        d.dns,
        "web.default.svc.cluster.local.",
        hickory_proto::rr::RecordType::A,
        None,
    )
    .await;
    let scrape = eventually(Duration::from_secs(5), "UDP flow counted", || async {
        let body = d.get("/metrics").await.body;
        body.contains("svcd_udp_flows{").then_some(body)
    })
    .await;
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| !scrape.contains(&format!("# TYPE {name} ")))
        .collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
}

/// A tool scripts/setup --with-etcd puts in target/tools (or the one on PATH). Missing, the test
/// fails with the hint: it never skips.
pub(crate) fn tool(name: &str) -> String {
    let local = format!("{}/target/tools/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::path::Path::new(&local).exists() {
        return local;
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file());
    match on_path {
        Some(path) => path.display().to_string(),
        None => panic!("{name} not found: run scripts/setup --with-etcd, which fetches it"),
    }
}

/// Every document of a YAML file, as JSON. Read with PyYAML from the venv scripts/setup
/// --with-etcd makes for kubernetes-validate (which depends on it), so the build needs no YAML
/// crate.
pub(crate) fn yaml_documents(path: &str) -> Vec<serde_json::Value> {
    let python = format!(
        "{}/target/tools/venv/bin/python3",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
            path,
        ])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}: run scripts/setup --with-etcd, which makes it"));
    crate::support::assert_success(&out);
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

#[test]
fn the_prometheus_rules_pass_promtool() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(format!("{root}/deploy/prometheus/svcd-rules.yml"))
        .output()
        .expect("run promtool");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS"), "{text}");
}

/// The names of the alerts in a rules file.
fn alert_names(rules: &serde_json::Value) -> BTreeSet<String> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_alert_has_a_promtool_unit_test_where_it_fires_and_one_where_it_stays_silent() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules_path = format!("{root}/deploy/prometheus/svcd-rules.yml");
    let tests_path = format!("{root}/deploy/prometheus/svcd-rules.test.yml");
    let alerts = alert_names(&yaml_documents(&rules_path)[0]);
    assert!(alerts.len() >= 10, "{alerts:?}");
    let tests = &yaml_documents(&tests_path)[0];
    assert_eq!(tests["rule_files"], serde_json::json!(["svcd-rules.yml"]));
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"].as_array().expect("tests") {
        for check in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = check["alertname"].as_str().expect("alertname").to_string();
            match check["exp_alerts"].as_array().map(Vec::len) {
                Some(0) | None => silent.insert(name),
                Some(_) => fires.insert(name),
            };
        }
    }
    let never_fires: Vec<_> = alerts.difference(&fires).collect();
    let never_silent: Vec<_> = alerts.difference(&silent).collect();
    assert!(
        never_fires.is_empty(),
        "no case where these fire: {never_fires:?}"
    );
    assert!(
        never_silent.is_empty(),
        "no case where these stay silent: {never_silent:?}"
    );

    let out = Command::new(tool("promtool"))
        .args(["test", "rules", &tests_path])
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_kubernetes_manifests_validate_and_carry_a_valid_svcd_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let validate = format!("{root}/target/tools/venv/bin/kubernetes-validate");
    let manifests = [
        format!("{root}/deploy/kubernetes/daemonset.yaml"),
        format!("{root}/deploy/kubernetes/sidecar.yaml"),
    ];
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&manifests)
        .output()
        .unwrap_or_else(|e| {
            panic!("{validate}: {e}: run scripts/setup --with-etcd, which installs it")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 6, "{text}");
    // The DaemonSet's svcd.toml is a config svcd accepts, with the environment it sets.
    let daemonset = std::fs::read_to_string(&manifests[0]).unwrap();
    let start = daemonset.find("svcd.toml: |\n").unwrap() + "svcd.toml: |\n".len();
    let end = start + daemonset[start..].find("\n---").unwrap();
    let toml: String = daemonset[start..end]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svcd.toml");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(svcd_bin())
        .args(["config", "check"])
        .arg(&file)
        .env("SVCD_ETCD_USERNAME", "svcd-node")
        .env("SVCD_NODE", "node-1")
        .output()
        .unwrap();
    crate::support::assert_success(&out);
}
