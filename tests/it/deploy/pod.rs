//! deploy/kubernetes as a node runs it. `kubernetes-validate` checks the manifests' shape; this
//! starts what they describe, so a DaemonSet that would crash-loop on a cluster fails here:
//! the init containers and svcd run as the manifests say (user, groups with `fsGroup`,
//! capabilities, `allowPrivilegeEscalation`, a read-only root, the image's file capability),
//! with the ConfigMap's config, Secret files of the mode and group a kubelet mounts them with, a
//! hostPath directory as a kubelet creates it, and the lifecycle hooks run as Kubernetes runs
//! them (`$(VAR)` expanded in `command`, `args` and `env` only).
//!
//! Stand-ins, each where it is made: the host's paths and the volumes are directories of a
//! temporary "node"; the init containers run in a network namespace of their own (the
//! addresses they add are read there, the host's are never touched); svcd runs on the host's
//! loopback: a node address it binds becomes 127.b.c.d on the same port (`169.254.20.10:53` →
//! `127.254.20.10:53`, so port 53 is still bound by uid 10001), other ports become free ones;
//! etcd is a real one with TLS, client certificates and users; the application of the sidecar
//! example is `cat`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_client::{Certificate, Identity as EtcdIdentity, Permission, TlsOptions};
use hickory_proto::rr::RecordType;
use serde_json::Value;

use super::kubelet::{
    chmod, container_argv, container_env, exec_handlers, find, list, open_dir, run_init_containers,
    Mounts, Node, PodFacts,
};
use super::sandbox::{self, Identity};
use super::yaml_documents;
use crate::support::daemon::http;
use crate::support::etcd::Etcd;
use crate::support::tls::{TestCa, TlsFiles};
use crate::support::{eventually, free_port, svcd_bin};

fn manifest(name: &str) -> Vec<Value> {
    yaml_documents(&format!(
        "{}/deploy/kubernetes/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// What a kubelet refuses, or what Kubernetes never does, that no schema catches.
fn assert_admissible(pod: &Value) {
    if pod["hostNetwork"] == true {
        for sysctl in list(&pod["securityContext"]["sysctls"]) {
            let name = sysctl["name"].as_str().unwrap();
            assert!(
                !name.starts_with("net."),
                "kubelet refuses the sysctl {name} for a hostNetwork pod (SysctlForbidden)"
            );
        }
    }
    for (at, command) in exec_handlers(pod) {
        assert!(
            !command.iter().any(|a| a.contains("$(")),
            "{at}: Kubernetes does not expand $(VAR) in an exec handler: {command:?}"
        );
    }
}
/// Every address the config binds, by key.
fn bound_addresses(config: &toml::Table) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    let mut push = |key: String, v: Option<&toml::Value>| {
        if let Some(text) = v.and_then(toml::Value::as_str) {
            if let Ok(addr) = text.parse() {
                out.push((key, addr));
            }
        }
    };
    push(
        "admin.listen".into(),
        config.get("admin").and_then(|a| a.get("listen")),
    );
    push(
        "admin.metrics_listen".into(),
        config.get("admin").and_then(|a| a.get("metrics_listen")),
    );
    match config.get("dns").and_then(|d| d.get("listen")) {
        Some(toml::Value::Array(list)) => {
            for (i, v) in list.iter().enumerate() {
                push(format!("dns.listen[{i}]"), Some(v));
            }
        }
        other => push("dns.listen".into(), other),
    }
    for kind in ["http", "tcp", "udp"] {
        let listeners = config
            .get("proxy")
            .and_then(|p| p.get(kind))
            .and_then(toml::Value::as_array);
        for (i, l) in listeners.into_iter().flatten().enumerate() {
            push(format!("proxy.{kind}[{i}].listen"), l.get("listen"));
        }
    }
    out
}

/// Sets `key` (as [`bound_addresses`] names it) to `addr`.
fn set_address(config: &mut toml::Table, key: &str, addr: SocketAddr) {
    let value = toml::Value::String(addr.to_string());
    let (path, index) = match key.split_once('[') {
        Some((path, rest)) => (
            path,
            Some(rest.split(']').next().unwrap().parse::<usize>().unwrap()),
        ),
        None => (key, None),
    };
    let parts: Vec<&str> = path.split('.').collect();
    let mut table = config.get_mut(parts[0]).unwrap();
    for part in &parts[1..] {
        table = table.get_mut(*part).unwrap();
    }
    match (index, key.ends_with(".listen") && key.contains("proxy.")) {
        (Some(i), true) => table[i]["listen"] = value,
        (Some(i), false) => table[i] = value,
        (None, _) => *table = value,
    }
}

/// Where svcd binds `addr` on this machine: a node address on loopback (127 and its last three
/// octets), the wildcard on 127.0.0.1; privileged ports kept (that is what is tested), others
/// free ones (the test shares the machine).
fn stand_in(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() => Ipv4Addr::LOCALHOST,
        IpAddr::V4(v4) => {
            let [_, b, c, d] = v4.octets();
            Ipv4Addr::new(127, b, c, d)
        }
        IpAddr::V6(v6) => panic!("IPv6 {v6} not modelled"),
    };
    let port = if addr.port() < 1024 {
        addr.port()
    } else {
        free_port()
    };
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The Secrets the DaemonSet's header comment tells the operator to create, with files from
/// `ca`; etcd's user `svcd-node`.
fn secrets(ca: &TestCa) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let client = ca.issue("svcd-node", false);
    let etcd: BTreeMap<String, Vec<u8>> = [
        ("username", b"svcd-node".to_vec()),
        ("password", b"node-pw\n".to_vec()),
        ("ca.pem", ca.pem().into_bytes()),
        ("cert.pem", client.cert.into_bytes()),
        ("key.pem", client.key.into_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let token: BTreeMap<String, Vec<u8>> =
        [("token".to_string(), b"admin-token\n".to_vec())].into();
    [
        ("svcd-etcd".to_string(), etcd),
        ("svcd-admin-token".to_string(), token),
    ]
    .into()
}

/// etcd as the ConfigMap expects it: TLS with client certificates from `ca`, users on, the
/// node's user with read-write on `/svcd/v1/`.
async fn etcd(ca: &TestCa, dir: &Path) -> Etcd {
    let server = TlsFiles::write(&dir.join("etcd"), ca, &ca.issue("etcd", false));
    let root = ca.issue("root", false);
    let client = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(EtcdIdentity::from_pem(root.cert, root.key));
    let etcd = Etcd::start_tls(server, client).await;
    let mut c = etcd.client().await;
    c.user_add("root", "root-pw", None).await.unwrap();
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("svcd-node").await.unwrap();
    c.role_grant_permission(
        "svcd-node",
        Permission::read_write("/svcd/v1/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("svcd-node", "node-pw", None).await.unwrap();
    c.user_grant_role("svcd-node", "svcd-node").await.unwrap();
    c.auth_enable().await.unwrap();
    etcd
}

/// `svcd list SERVICE -o json` through `socket` with `token` (as root: the test's own view).
fn instances(socket: &Path, token: &Path, service: &str) -> Vec<Value> {
    let out = Command::new(svcd_bin())
        .args(["list", service, "-o", "json"])
        .arg(format!("--admin=unix:{}", socket.display()))
        .arg("--token-file")
        .arg(token)
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["instances"].as_array().cloned().unwrap_or_default()
}

/// A process killed when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_daemonset_and_the_sidecar_run_as_their_manifests_say() {
    let daemonset_docs = manifest("daemonset.yaml");
    let config_map = find(&daemonset_docs, "ConfigMap", "svcd");
    let pod = &find(&daemonset_docs, "DaemonSet", "svcd")["spec"]["template"]["spec"];
    let sidecar_docs = manifest("sidecar.yaml");
    let app_pod = &find(&sidecar_docs, "Deployment", "web")["spec"]["template"]["spec"];
    assert_admissible(pod);
    assert_admissible(app_pod);

    let ca = TestCa::new("svcd-test-ca");
    let node = Node::new(secrets(&ca));
    let etcd = etcd(&ca, node.dir.path()).await;
    let image_dir = open_dir(&node.dir.path().join("image"));
    let binary = sandbox::image_binary(&image_dir);
    let image = sandbox::image_user();

    // The node as the DaemonSet's pod finds it, after its init containers; they run again on
    // every restart of the pod, and must succeed then too.
    let volumes = node.volumes("svcd-node-1", pod, &[config_map]);
    let mut addresses = Vec::new();
    for _ in 0..2 {
        addresses = run_init_containers(pod, &volumes, &node, &binary, image);
    }

    // svcd's container.
    let container = list(&pod["containers"])
        .iter()
        .find(|c| c["name"] == "svcd")
        .expect("the svcd container");
    let identity = Identity::of_container(pod, container, image.0, image.1);
    let mounts = Mounts::of(container, pod, &volumes, &binary);
    let facts = PodFacts {
        name: "svcd-node-1",
        ip: "127.0.0.1",
        node: "node-1",
    };
    let env = container_env(container, &facts, &node, &mounts);
    let argv = container_argv(container, &env, &mounts);
    let config_at = PathBuf::from(&argv[argv.iter().position(|a| a == "--config").unwrap() + 1]);

    // Its config: container paths mapped to the node's, every address it binds checked to
    // exist on the node and moved to its stand-in, etcd's endpoints to the test's etcd.
    let text = mounts.map(&std::fs::read_to_string(&config_at).unwrap());
    let mut config: toml::Table = toml::from_str(&text).unwrap();
    let mut moved = BTreeMap::new();
    for (key, addr) in bound_addresses(&config) {
        let ip = addr.ip();
        assert!(
            ip.is_loopback() || ip.is_unspecified() || addresses.contains(&ip),
            "{key} = {addr}: nothing on the node has {ip} (init containers left {addresses:?})"
        );
        let here = stand_in(addr);
        set_address(&mut config, &key, here);
        moved.insert(key, (addr, here));
    }
    config["registry"]["etcd"]["endpoints"] = toml::Value::Array(vec![etcd.endpoint().into()]);
    // The file stays the one the kubelet wrote (owner, group, mode); only its text changes.
    std::fs::write(&config_at, toml::to_string(&config).unwrap()).unwrap();

    // The probes ask the listener that serves them.
    let (metrics, metrics_here) = moved["admin.metrics_listen"];
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"].as_u64(),
            Some(u64::from(metrics.port())),
            "{probe} asks another port than admin.metrics_listen"
        );
    }

    let log = node.dir.path().join("svcd.log");
    let daemon = std::cell::RefCell::new(Running(sandbox::spawn(
        identity.command(&argv, &mounts.writable),
        &env,
        &log,
    )));
    eventually(
        Duration::from_secs(30),
        "svcd ready (/readyz 200)",
        || async {
            if let Some(status) = daemon.borrow_mut().0.try_wait().unwrap() {
                panic!(
                    "svcd exited ({status}) as the DaemonSet runs it:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let r = http(metrics_here, "GET", "/readyz", None).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;

    // DNS answers on every address it was given (port 53 bound by uid 10001 included).
    for (key, (_, here)) in &moved {
        if key.starts_with("dns.listen") {
            let answer = crate::support::dns::udp(
                *here,
                "dns-version.cluster.local.",
                RecordType::TXT,
                None,
            )
            .await;
            assert!(!answer.answers.is_empty(), "{key} at {here}: {answer:?}");
        }
    }

    // The sidecar example: its container registers the app through the node's socket, as the
    // app's user (the image's own; 1000 here) with the pod's groups, and its preStop drains it.
    let app_volumes = node.volumes("web-0", app_pod, &[]);
    let app = &list(&app_pod["containers"])[0];
    let app_identity = Identity::of_container(app_pod, app, 1000, 1000);
    let app_binary = open_dir(&node.dir.path().join("app-image")).join("svcd");
    std::fs::copy(svcd_bin(), &app_binary).unwrap();
    chmod(&app_binary, 0o755);
    let app_mounts = Mounts::of(app, app_pod, &app_volumes, &app_binary);
    let app_facts = PodFacts {
        name: "web-5d8c7-x2k9p",
        ip: "127.0.0.77",
        node: "node-1",
    };
    let app_env = container_env(app, &app_facts, &node, &app_mounts);
    let mut app_argv = container_argv(app, &app_env, &app_mounts);
    let cmd_at = app_argv
        .iter()
        .position(|a| a == "--")
        .expect("svcd exec … -- CMD");
    app_argv.truncate(cmd_at + 1);
    app_argv.push("cat".into()); // the application: runs until its stdin closes
    let mut cmd = app_identity.command(&app_argv, &app_mounts.writable);
    cmd.stdin(Stdio::piped());
    let exec_log = node.dir.path().join("exec.log");
    let _exec = Running(sandbox::spawn(cmd, &app_env, &exec_log));
    let socket = PathBuf::from(mounts.map("/run/svcd/admin.sock"));
    let token = PathBuf::from(mounts.map("/etc/svcd/token/token"));
    let registered = tokio::time::timeout(Duration::from_secs(15), async {
        while !instances(&socket, &token, "web")
            .iter()
            .any(|i| i["id"] == app_facts.name)
        {
            tokio::time::sleep(Duration::from_millis(50)).await; // a poll interval
        }
    })
    .await;
    assert!(
        registered.is_ok(),
        "the sidecar's svcd exec did not register the app:\n{}",
        std::fs::read_to_string(&exec_log).unwrap_or_default()
    );

    let hook = |pod: &Value, identity: &Identity, env: &[(String, String)], mounts: &Mounts| {
        let (_, command) = exec_handlers(pod)
            .into_iter()
            .find(|(at, _)| at.ends_with("preStop"))
            .expect("a preStop hook");
        // No $(VAR) expansion: Kubernetes does none in an exec handler.
        let argv: Vec<String> = command.iter().map(|a| mounts.map(a)).collect();
        let out = sandbox::run(identity.command(&argv, &mounts.writable), env);
        assert!(
            out.status.success(),
            "preStop {command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    hook(app_pod, &app_identity, &app_env, &app_mounts);
    let state = instances(&socket, &token, "web")
        .into_iter()
        .find(|i| i["id"] == app_facts.name)
        .map(|i| i["state"].clone());
    assert_eq!(
        state,
        Some(Value::from("draining")),
        "after the sidecar's preStop"
    );

    // The DaemonSet's own preStop: every registration of the node draining, through its CLI.
    let said = hook(pod, &identity, &env, &mounts);
    assert!(said.contains("draining"), "{said}");

    assert!(
        daemon.borrow_mut().0.try_wait().unwrap().is_none(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
