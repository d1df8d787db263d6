//! What a container runtime does to a process, done with util-linux on this machine: the user,
//! its groups, the capabilities a container keeps (`setpriv`: the bounding set, no ambient or
//! inheritable ones, `no_new_privs`), the image's file capability on the binary (`setcap`), a
//! read-only root (a private mount namespace), a network namespace of its own (`unshare`).
//! The tests run as root (CI does); every namespace is private, so the host is left as it was.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// Who a container's process is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the pod's `supplementalGroups` and `fsGroup`.
    pub groups: Vec<u32>,
    /// The bounding set (lowercase names, `net_bind_service`): what the container keeps.
    pub capabilities: Vec<String>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem: true`.
    pub read_only_root: bool,
}

/// Capabilities a container keeps when its manifest names none (containerd's and Docker's
/// default set).
const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
];

impl Identity {
    /// A Kubernetes container's identity: its `securityContext` over the pod's, the image's
    /// user when neither names one.
    pub fn of_container(pod: &Value, container: &Value, image_uid: u32, image_gid: u32) -> Self {
        let pod_ctx = &pod["securityContext"];
        let ctx = &container["securityContext"];
        let pick = |key: &str| ctx[key].as_u64().or(pod_ctx[key].as_u64());
        let uid = pick("runAsUser").map_or(image_uid, |v| v as u32);
        let gid = pick("runAsGroup").map_or(image_gid, |v| v as u32);
        let mut groups: Vec<u32> = pod_ctx["supplementalGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .map(|g| g as u32)
            .collect();
        if let Some(fs_group) = pod_ctx["fsGroup"].as_u64() {
            groups.push(fs_group as u32);
        }
        let names = |key: &str| -> Vec<String> {
            ctx["capabilities"][key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
                .collect()
        };
        let (add, drop) = (names("add"), names("drop"));
        let mut capabilities: Vec<String> = if drop.iter().any(|c| c == "all") {
            Vec::new()
        } else {
            RUNTIME_DEFAULT_CAPS
                .iter()
                .map(|c| c.to_string())
                .filter(|c| !drop.contains(c))
                .collect()
        };
        capabilities.extend(add);
        Identity {
            uid,
            gid,
            groups,
            capabilities,
            no_new_privs: ctx["allowPrivilegeEscalation"] == false,
            read_only_root: ctx["readOnlyRootFilesystem"] == true,
        }
    }

    /// `setpriv` options that make a root process this identity.
    pub fn setpriv_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
        ];
        if self.groups.is_empty() {
            args.push("--clear-groups".into());
        } else {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            args.push(format!("--groups={}", groups.join(",")));
        }
        // No inheritable and so no ambient capabilities: what Kubernetes gives a process.
        args.push("--inh-caps=-all".into());
        let mut bounding = String::from("-all");
        for cap in &self.capabilities {
            bounding.push_str(&format!(",+{cap}"));
        }
        args.push(format!("--bounding-set={bounding}"));
        if self.no_new_privs {
            args.push("--no-new-privs".into());
        }
        args.push("--".into());
        args
    }

    /// The command line that runs `argv` as this identity: `setpriv`, inside a private mount
    /// namespace whose root is read-only (but `writable`) when the container's is.
    pub fn argv(&self, argv: &[String], writable: &[PathBuf]) -> Vec<String> {
        let mut setpriv = vec!["setpriv".to_string()];
        setpriv.extend(self.setpriv_args());
        setpriv.extend(argv.iter().cloned());
        if !self.read_only_root {
            return setpriv;
        }
        let mut out: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "set -e; while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$1\"; shift; done; \
             shift; mount -o remount,bind,ro /; exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec();
        out.extend(writable.iter().map(|p| p.display().to_string()));
        out.push("--".into());
        out.extend(setpriv);
        out
    }

    /// [`Self::argv`] as a command.
    pub fn command(&self, argv: &[String], writable: &[PathBuf]) -> Command {
        command(&self.argv(argv, writable))
    }
}

/// `argv[0]` with the rest as its arguments.
pub fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Runs `cmd` with only `env` (and a PATH) in its environment, as a container has; its output.
pub fn run(mut cmd: Command, env: &[(String, String)]) -> Output {
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run a sandboxed command (util-linux: setpriv, unshare)")
}

/// [`run`], left running with its stderr in `log`.
pub fn spawn(mut cmd: Command, env: &[(String, String)], log: &Path) -> Child {
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn a sandboxed command (util-linux: setpriv, unshare)")
}

/// The Dockerfile at the repository root.
pub fn dockerfile() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap()
}

/// The image's `/usr/bin/svcd`: a copy of the binary under test in `dir` (which every user can
/// read), with the file capabilities the Dockerfile's final stage gives it (`setcap`).
pub fn image_binary(dir: &Path) -> PathBuf {
    let path = dir.join("svcd");
    std::fs::copy(crate::support::svcd_bin(), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dockerfile = dockerfile();
    let final_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    for line in final_stage.lines() {
        if let Some(caps) = line
            .strip_prefix("RUN setcap ")
            .and_then(|rest| rest.strip_suffix(" /usr/bin/svcd"))
        {
            let out = Command::new("setcap")
                .arg(caps)
                .arg(&path)
                .output()
                .expect("setcap (libcap2-bin)");
            crate::support::assert_success(&out);
        }
    }
    path
}

/// The image's user (`USER` of the final stage) and its uid and gid from the `useradd` and
/// `groupadd` lines that create it.
pub fn image_user() -> (u32, u32) {
    let dockerfile = dockerfile();
    let final_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = final_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image names its USER")
        .trim();
    let number = |command: &str, flag: &str| -> u32 {
        let line = final_stage
            .lines()
            .find(|l| {
                let l = l.trim_end().trim_end_matches('\\').trim_end();
                l.contains(command) && l.ends_with(&format!(" {user}"))
            })
            .unwrap_or_else(|| panic!("no {command} … {user} in the Dockerfile"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == flag)
            .unwrap_or_else(|| panic!("{command} of {user} sets no {flag}: {line}"));
        words[at + 1].parse().unwrap()
    };
    (number("useradd", "--uid"), number("groupadd", "--gid"))
}
