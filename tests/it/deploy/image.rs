//! The container image (Dockerfile) as a runtime runs it, without Docker: the image's command
//! as its user (uid and gid from the Dockerfile, Docker's default capabilities, the binary's file
//! capability) in a network namespace of its own, with the image's /run/svcd and the config the
//! image bakes in. Every EXPOSEd port must be bound on all addresses, the HEALTHCHECK and the
//! header's examples must work.

use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::sandbox::{self, Identity};
use crate::support::eventually;

/// A JSON-array instruction's words (`CMD ["run", "--config", "…"]`).
fn json_words(line: &str) -> Vec<String> {
    let start = line.find('[').expect("a JSON array");
    serde_json::from_str(&line[start..]).expect("a JSON array of strings")
}

/// The final stage's instruction `name` (first line of it, continuation lines joined).
fn instruction(stage: &str, name: &str) -> Option<String> {
    let mut lines = stage.lines();
    let mut out = lines
        .by_ref()
        .find(|l| l.starts_with(&format!("{name} ")))?
        .to_string();
    while out.ends_with('\\') {
        out.pop();
        out.push_str(lines.next().unwrap_or(""));
    }
    Some(out)
}

/// The header's `docker run` examples: the words after the image name (`svcd`), continuation
/// lines joined, and the `-v HOST:CONTAINER` mounts.
fn docker_run_examples(dockerfile: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let header: Vec<&str> = dockerfile
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < header.len() {
        if header[i].starts_with("docker run ") {
            let mut line = header[i].to_string();
            while line.ends_with('\\') && i + 1 < header.len() {
                line.pop();
                i += 1;
                line.push(' ');
                line.push_str(header[i]);
            }
            let words: Vec<String> = line
                .split_whitespace()
                .map(|w| w.trim_matches('"').to_string())
                .collect();
            let image = words.iter().position(|w| w == "svcd").expect("the image");
            let volumes = words[..image]
                .windows(2)
                .filter(|w| w[0] == "-v")
                .map(|w| w[1].split(':').nth(1).unwrap().to_string())
                .collect();
            out.push((words[image + 1..].to_vec(), volumes));
        }
        i += 1;
    }
    out
}

/// `program args…` inside the namespaces of process `pid`, as `identity`.
fn inside(pid: u32, identity: &Identity, argv: &[String]) -> std::process::Output {
    let mut full = vec![
        "nsenter".to_string(),
        format!("--target={pid}"),
        "--net".into(),
        "--mount".into(),
        "--".into(),
    ];
    full.extend(identity.argv(argv, &[]));
    sandbox::run(sandbox::command(&full), &[])
}

#[tokio::test]
async fn the_image_serves_every_exposed_port_and_its_healthcheck_and_examples_work() {
    let dockerfile = sandbox::dockerfile();
    let (build, stage) = dockerfile.rsplit_once("\nFROM ").unwrap();

    // The revision: .git is not in the build context, so it comes in as a build argument.
    let cargo_build = build.find("RUN cargo build").expect("the build");
    for line in ["ARG SVCD_REVISION", "ENV SVCD_REVISION=${SVCD_REVISION}"] {
        let at = build
            .find(line)
            .unwrap_or_else(|| panic!("the build stage lacks {line}"));
        assert!(at < cargo_build, "{line} after the build");
    }

    // The image's user is the one the DaemonSet runs svcd as.
    let (uid, gid) = sandbox::image_user();
    let daemonset = super::yaml_documents(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/daemonset.yaml"
    ));
    let ds = daemonset.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let svcd = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(
        (svcd["runAsUser"].as_u64(), svcd["runAsGroup"].as_u64()),
        (Some(u64::from(uid)), Some(u64::from(gid))),
        "the image's svcd user is not the DaemonSet's"
    );

    // The config the image bakes in, and the image's /run/svcd.
    let copy = stage
        .lines()
        .find(|l| l.starts_with("COPY ") && l.trim_end().ends_with(" /etc/svcd/svcd.toml"))
        .expect("the image copies its config to /etc/svcd/svcd.toml");
    let source = copy.split_whitespace().nth(1).unwrap();
    assert!(
        !source.starts_with("--from"),
        "the config comes from the repository: {copy}"
    );
    assert!(
        stage.contains("install -d -o svcd -g svcd -m 0750 /run/svcd"),
        "the image makes /run/svcd for the socket"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = dir.path().join("svcd.toml");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join(source), &config).unwrap();
    let binary = sandbox::image_binary(dir.path());
    let map = |words: &[String]| -> Vec<String> {
        words
            .iter()
            .map(|w| match w.as_str() {
                "/usr/bin/svcd" => binary.display().to_string(),
                "/etc/svcd/svcd.toml" => config.display().to_string(),
                _ => w.clone(),
            })
            .collect()
    };
    let mut argv = json_words(&instruction(stage, "ENTRYPOINT").expect("ENTRYPOINT"));
    argv.extend(json_words(&instruction(stage, "CMD").expect("CMD")));
    let argv = map(&argv);

    // Docker's defaults: the user's groups, the default capabilities, privilege escalation on.
    let identity = Identity::of_container(&serde_json::json!({}), &serde_json::json!({}), uid, gid);
    let identity = Identity {
        groups: vec![gid],
        ..identity
    };
    let log = dir.path().join("svcd.log");
    let mut script = format!(
        "set -e; ip link set lo up; mount -t tmpfs tmpfs /run; \
         install -d -o {uid} -g {gid} -m 0750 /run/svcd; exec"
    );
    for word in identity.argv(&argv, &[]) {
        script.push_str(&format!(" '{}'", word.replace('\'', "'\\''")));
    }
    let mut container = Command::new("unshare");
    container.args([
        "--net",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]);
    let child = RefCell::new(sandbox::spawn(container, &[], &log));
    let pid = child.borrow().id();
    let ready = [
        binary.display().to_string(),
        "health".into(),
        "--ready".into(),
    ];
    let waited = eventually(
        Duration::from_secs(20),
        "the image's svcd ready",
        || async {
            if let Some(status) = child.borrow_mut().try_wait().unwrap() {
                return Some(Err(format!(
                    "exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            inside(pid, &identity, &ready)
                .status
                .success()
                .then_some(Ok(()))
        },
    )
    .await;
    if let Err(e) = waited {
        panic!("the image's command {argv:?}: {e}");
    }

    // Every EXPOSEd port, bound on all addresses (not loopback: nothing could reach it).
    let listening = inside(pid, &identity, &["ss".into(), "-H".into(), "-lntu".into()]);
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    let expose = instruction(stage, "EXPOSE").expect("EXPOSE");
    for port in expose.split_whitespace().skip(1) {
        let (number, proto) = port.split_once('/').unwrap_or((port, "tcp"));
        let on_all = listening.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&proto)
                && ["0.0.0.0", "*", "[::]"]
                    .iter()
                    .any(|a| cols.get(4) == Some(&format!("{a}:{number}").as_str()))
        });
        assert!(
            on_all,
            "EXPOSE {port}: not bound on all addresses:\n{listening}"
        );
    }

    // The HEALTHCHECK as written, and `docker exec CONTAINER svcd list`.
    let health = instruction(stage, "HEALTHCHECK").expect("HEALTHCHECK");
    let health = map(&json_words(health.split(" CMD ").nth(1).expect("CMD")));
    for check in [health, map(&["/usr/bin/svcd".into(), "list".into()])] {
        let out = inside(pid, &identity, &check);
        assert!(
            out.status.success(),
            "{check:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut child = child.into_inner();
    let _ = child.kill();
    let _ = child.wait();

    // The header's `docker run` examples: the config each one gives svcd is accepted.
    let examples = docker_run_examples(&dockerfile);
    assert!(!examples.is_empty());
    for (words, volumes) in examples {
        let mut args = if words.is_empty() {
            json_words(&instruction(stage, "CMD").unwrap())
        } else {
            words
        };
        for volume in &volumes {
            let file = dir.path().join(Path::new(volume).file_name().unwrap());
            std::fs::write(&file, "example-token\n").unwrap();
            for a in &mut args {
                if a == volume {
                    *a = file.display().to_string();
                }
            }
        }
        assert_eq!(args[0], "run", "{args:?}");
        let config_at = args.iter().position(|a| a == "--config").unwrap();
        let overrides: Vec<String> = args[1..]
            .iter()
            .enumerate()
            .filter(|(i, _)| *i + 1 != config_at && *i + 1 != config_at + 1)
            .map(|(_, a)| a.clone())
            .collect();
        let mut check = vec![
            binary.display().to_string(),
            "config".into(),
            "check".into(),
            config.display().to_string(),
        ];
        check.extend(overrides);
        let out = sandbox::run(sandbox::command(&check), &[]);
        assert!(
            out.status.success(),
            "docker run … {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
