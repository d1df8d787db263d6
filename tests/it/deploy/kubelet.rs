//! What a kubelet does with a pod's manifest, on a temporary "node": the volumes (Secret and
//! ConfigMap files with their mode and `fsGroup` group, hostPath directories as created, emptyDir),
//! each container's mounts (its paths mapped to the node's), environment (`fieldRef`,
//! `secretKeyRef`, `$(VAR)` expansion in `command`, `args` and `env` only) and command line, and
//! the init containers, run in a network namespace of their own.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::sandbox::Identity;

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

pub fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Every exec handler of a pod (lifecycle hooks, exec probes) with where it is.
pub fn exec_handlers(pod: &Value) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for c in list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
    {
        for (what, handler) in [
            ("preStop", &c["lifecycle"]["preStop"]),
            ("postStart", &c["lifecycle"]["postStart"]),
            ("livenessProbe", &c["livenessProbe"]),
            ("readinessProbe", &c["readinessProbe"]),
            ("startupProbe", &c["startupProbe"]),
        ] {
            if let Some(command) = handler["exec"]["command"].as_array() {
                out.push((
                    format!("{}: {what}", c["name"].as_str().unwrap_or("?")),
                    command
                        .iter()
                        .map(|a| a.as_str().unwrap().to_string())
                        .collect(),
                ));
            }
        }
    }
    out
}

/// The node: directories standing in for the host's paths and each pod's volumes, and the
/// Secrets the operator created.
pub struct Node {
    pub dir: tempfile::TempDir,
    /// Secret name → key → content.
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory every user can traverse, as the kubelet's are.
pub fn open_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chmod(path, 0o755);
    path.to_path_buf()
}

impl Node {
    pub fn new(secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        Node { dir, secrets }
    }

    /// The stand-in for the host's `path`.
    pub fn host(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("host")
            .join(path.trim_start_matches('/'))
    }

    /// Files of a Secret or ConfigMap volume, as the kubelet writes them: owned by root, the
    /// volume's mode, and with `fsGroup` the group and its read bit (volume_linux.go).
    pub fn write_files(
        dir: &Path,
        files: &BTreeMap<String, Vec<u8>>,
        mode: u32,
        fs_group: Option<u32>,
    ) {
        open_dir(dir);
        if let Some(group) = fs_group {
            chown(dir, 0, group);
            chmod(dir, 0o2755);
        }
        for (key, content) in files {
            let path = dir.join(key);
            std::fs::write(&path, content).unwrap();
            chown(&path, 0, fs_group.unwrap_or(0));
            chmod(&path, mode | if fs_group.is_some() { 0o440 } else { 0 });
        }
    }

    /// Every volume of `pod` (named `pod_name`), made as the kubelet makes it: name → where.
    pub fn volumes(
        &self,
        pod_name: &str,
        pod: &Value,
        config_maps: &[&Value],
    ) -> BTreeMap<String, PathBuf> {
        let fs_group = pod["securityContext"]["fsGroup"].as_u64().map(|g| g as u32);
        let mut out = BTreeMap::new();
        for v in list(&pod["volumes"]) {
            let name = v["name"].as_str().unwrap().to_string();
            let own = self.dir.path().join("pods").join(pod_name).join(&name);
            let mode = |source: &Value| source["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            let path = if let Some(path) = v["hostPath"]["path"].as_str() {
                let host = self.host(path);
                match v["hostPath"]["type"].as_str().unwrap_or("") {
                    // Created root:root 0755 when missing.
                    "DirectoryOrCreate" if !host.exists() => {
                        open_dir(&host);
                    }
                    "Directory" | "DirectoryOrCreate" => assert!(
                        host.is_dir(),
                        "hostPath {path} (type Directory) does not exist on the node"
                    ),
                    other => panic!("hostPath type {other:?} not modelled"),
                }
                host
            } else if v["secret"].is_object() {
                let secret = v["secret"]["secretName"].as_str().unwrap();
                let files = self
                    .secrets
                    .get(secret)
                    .unwrap_or_else(|| panic!("the test has no Secret {secret}"));
                Self::write_files(&own, files, mode(&v["secret"]), fs_group);
                own
            } else if v["configMap"].is_object() {
                let name = v["configMap"]["name"].as_str().unwrap();
                let map = config_maps
                    .iter()
                    .find(|m| m["metadata"]["name"] == name)
                    .unwrap_or_else(|| panic!("no ConfigMap {name}"));
                let files = map["data"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec()))
                    .collect();
                Self::write_files(&own, &files, mode(&v["configMap"]), fs_group);
                own
            } else if v["emptyDir"].is_object() {
                // 0777, and with fsGroup its group and the setgid bit.
                std::fs::create_dir_all(&own).unwrap();
                chmod(&own, 0o777);
                if let Some(group) = fs_group {
                    chown(&own, 0, group);
                    chmod(&own, 0o2777);
                }
                own
            } else {
                panic!("volume {name}: kind not modelled: {v}");
            };
            out.insert(name, path);
        }
        out
    }
}

/// A container's filesystem as mounted: its paths → the node's, longest first; `/usr/bin/svcd`
/// is the image's binary.
pub struct Mounts {
    pub paths: Vec<(String, PathBuf)>,
    /// Volumes the container may write (hostPath, emptyDir mounted without readOnly).
    pub writable: Vec<PathBuf>,
}

impl Mounts {
    pub fn of(
        container: &Value,
        pod: &Value,
        volumes: &BTreeMap<String, PathBuf>,
        binary: &Path,
    ) -> Mounts {
        let mut paths = vec![("/usr/bin/svcd".to_string(), binary.to_path_buf())];
        let mut writable = Vec::new();
        for m in list(&container["volumeMounts"]) {
            let volume = m["name"].as_str().unwrap();
            let mut node = volumes[volume].clone();
            if let Some(sub) = m["subPath"].as_str() {
                node = node.join(sub);
            }
            let spec = list(&pod["volumes"])
                .iter()
                .find(|v| v["name"] == volume)
                .unwrap();
            if m["readOnly"] != true
                && (spec["hostPath"].is_object() || spec["emptyDir"].is_object())
            {
                writable.push(node.clone());
            }
            paths.push((m["mountPath"].as_str().unwrap().to_string(), node));
        }
        paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Mounts { paths, writable }
    }

    /// `text` with every container path under a mount replaced by the node's path. A path
    /// starts after the start, a space, a quote, `:` or `=`, and ends at the end, `/`, a
    /// space or a quote.
    pub fn map(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (inside, node) in &self.paths {
            let node = node.display().to_string();
            let mut result = String::new();
            let mut rest = out.as_str();
            let mut at_start = true;
            while let Some(i) = rest.find(inside.as_str()) {
                let before = rest[..i].chars().last();
                let after = rest[i + inside.len()..].chars().next();
                let starts = (at_start && i == 0) || before.is_some_and(|c| " \"':=".contains(c));
                let ends = after.is_none_or(|c| "/ \"'".contains(c));
                result.push_str(&rest[..i]);
                result.push_str(if starts && ends { &node } else { inside });
                rest = &rest[i + inside.len()..];
                at_start = false;
            }
            result.push_str(rest);
            out = result;
        }
        out
    }

    /// Where the CLI in this container finds the daemon: its `/run/svcd/admin.sock` is a node
    /// path here, which the binary's built-in default cannot know.
    pub fn admin_socket_env(&self) -> Vec<(String, String)> {
        let socket = svcd_config::AdminListen::DEFAULT_UNIX;
        let mapped = self.map(socket);
        if mapped == socket {
            return Vec::new();
        }
        vec![("SVCD_ADMIN_LISTEN".into(), format!("unix:{mapped}"))]
    }
}

/// Kubernetes' `$(VAR)` expansion (command, args, env values): defined variables only.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// What a pod's fields stand for here.
pub struct PodFacts<'a> {
    pub name: &'a str,
    pub ip: &'a str,
    pub node: &'a str,
}

/// A container's environment as the kubelet sets it, container paths mapped.
pub fn container_env(
    container: &Value,
    facts: &PodFacts,
    node: &Node,
    mounts: &Mounts,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in list(&container["env"]) {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            mounts.map(&expand(v, &env))
        } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => facts.name.to_string(),
                "status.podIP" => facts.ip.to_string(),
                "spec.nodeName" => facts.node.to_string(),
                other => panic!("fieldRef {other} not modelled"),
            }
        } else if let Some(secret) = e["valueFrom"]["secretKeyRef"].as_object() {
            let bytes =
                &node.secrets[secret["name"].as_str().unwrap()][secret["key"].as_str().unwrap()];
            String::from_utf8(bytes.clone()).unwrap()
        } else {
            panic!("env {name}: source not modelled: {e}");
        };
        env.push((name, value));
    }
    env.extend(mounts.admin_socket_env());
    env
}

/// The container's command line: `command` (else the image's entrypoint) and `args`, `$(VAR)`
/// expanded, paths mapped.
pub fn container_argv(container: &Value, env: &[(String, String)], mounts: &Mounts) -> Vec<String> {
    let strings = |v: &Value| -> Vec<String> {
        list(v)
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let mut argv = strings(&container["command"]);
    if argv.is_empty() {
        argv.push("/usr/bin/svcd".into()); // the image's ENTRYPOINT
    }
    argv.extend(strings(&container["args"]));
    argv.iter().map(|a| mounts.map(&expand(a, env))).collect()
}

/// Runs a pod's init containers (in order, as the kubelet does) in a network namespace of
/// their own; the addresses that namespace has afterwards.
pub fn run_init_containers(
    pod: &Value,
    volumes: &BTreeMap<String, PathBuf>,
    node: &Node,
    binary: &Path,
    image: (u32, u32),
) -> Vec<IpAddr> {
    let mut script = String::from("set -e; ip link set lo up\n");
    let mut argvs = Vec::new();
    for init in list(&pod["initContainers"]) {
        let identity = Identity::of_container(pod, init, image.0, image.1);
        let mounts = Mounts::of(init, pod, volumes, binary);
        let facts = PodFacts {
            name: "svcd-node-1",
            ip: "127.0.0.1",
            node: "node-1",
        };
        let env = container_env(init, &facts, node, &mounts);
        let argv = identity.argv(&container_argv(init, &env, &mounts), &mounts.writable);
        let quoted: Vec<String> = argv
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let assignments: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\'', "'\\''")))
            .collect();
        script.push_str(&format!(
            "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {} {}\n",
            assignments.join(" "),
            quoted.join(" ")
        ));
        argvs.push(argv);
    }
    script.push_str("ip -o addr show\n");
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    assert!(
        out.status.success(),
        "an init container failed ({argvs:?}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "inet" || *w == "inet6")?;
            words[at + 1].split('/').next()?.parse().ok()
        })
        .collect()
}
