//! `svcd config …`, start-up refusals and what the client commands tell a user, through the
//! real binary.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::daemon::http;
use crate::support::{eventually, free_port, svcd_bin};

fn svcd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(svcd_bin());
    cmd.args(args).env_remove("RUST_LOG");
    for (k, _) in svcd_config::ENV_OVERRIDES {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run svcd")
}

#[test]
fn config_default_matches_docs_example_and_checks_clean() {
    let out = svcd(&["config", "default"], &[]);
    assert!(out.status.success());
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/svcd.example.toml"
    ))
    .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), example);
    let out = svcd(
        &[
            "config",
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/svcd.example.toml"),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_check_reports_every_error_with_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[admin]\nlisten = \"x\"\n[[proxy.http]]\nlisten = \"127.0.0.1:1\"\n[[proxy.http]]\nlisten = \"x:99999\"\n[dns]\nttl = \"soon\"\n",
    )
    .unwrap();
    let out = svcd(&["config", "check", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for needle in [
        "admin.listen: invalid socket address \"x\"",
        "proxy.http[1].listen: invalid socket address \"x:99999\"",
        "dns.ttl: invalid duration \"soon\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn config_check_applies_env_and_flag_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.toml");
    std::fs::write(
        &file,
        "[dns]\nlisten = \"127.0.0.1:1111\"\nttl = \"9s\"\n[log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    let out = svcd(
        &[
            "config",
            "check",
            file.to_str().unwrap(),
            "--log-level",
            "debug",
            "--set",
            "dns.max_answers=3",
        ],
        &[
            ("SVCD_DNS_LISTEN", "127.0.0.1:2222"),
            ("SVCD_LOG_LEVEL", "error"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        effective["dns"]["listen"],
        toml::Value::Array(vec!["127.0.0.1:2222".into()]),
        "env beats file"
    );
    assert_eq!(
        effective["dns"]["ttl"].as_str(),
        Some("9s"),
        "file beats default"
    );
    assert_eq!(
        effective["log"]["level"].as_str(),
        Some("debug"),
        "flag beats env"
    );
    assert_eq!(effective["dns"]["max_answers"].as_integer(), Some(3));
    assert_eq!(
        effective["dns"]["negative_ttl"].as_str(),
        Some("5s"),
        "default"
    );
}

#[test]
fn run_refuses_invalid_config_and_exposed_admin_without_token() {
    let out = svcd(&["run", "--admin-listen", "0.0.0.0:0"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("admin.listen: 0.0.0.0:0 is not a loopback address"),
        "{stderr}"
    );

    let out = svcd(&["run", "--set", "dns.bogus=1"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dns.bogus: unknown key"), "{stderr}");
}

#[test]
fn an_unknown_key_gets_the_key_that_was_meant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[dns]\nlisen = \"127.0.0.1:53\"\n[shutdown]\nbogus = 1\n",
    )
    .unwrap();
    let out = svcd(&["config", "check", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dns.lisen: unknown key; did you mean \"listen\"?"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "shutdown.bogus: unknown key; expected one of: drain_timeout, readiness_grace"
        ),
        "{stderr}"
    );
}

#[test]
fn run_help_names_the_variable_of_every_flag_that_has_one() {
    let out = svcd(&["run", "--help"], &[]);
    crate::support::assert_success(&out);
    let help = String::from_utf8_lossy(&out.stdout);
    for (var, _) in svcd_config::ENV_OVERRIDES {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    for flag in [
        "--admin-listen",
        "--dns-listen",
        "--etcd-endpoints",
        "--log-level",
    ] {
        let line = help.lines().position(|l| l.contains(flag)).unwrap();
        let block: String = help.lines().skip(line).take(3).collect();
        assert!(block.contains("[env: SVCD_"), "{flag}:\n{help}");
    }
    let out = svcd(&["register", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        !help.contains("exec"),
        "register --help describes exec:\n{help}"
    );
}

/// `svcd ARGS` as user nobody with no supplementary groups (util-linux `setpriv`), with its
/// stderr.
fn as_nobody(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(svcd_bin())
        .args(args)
        .env_remove("SVCD_ADMIN_LISTEN")
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_user_outside_the_sockets_group_is_told_to_join_it_not_sent_to_another_listener() {
    // The packaged layout, in a mount namespace of its own (so the host's /run is untouched):
    // /run/svcd is the daemon's group's (0750), the socket inside. Before, a user who could
    // not see the socket fell back to 127.0.0.1:9901 - a packaged node's metrics listener.
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -m 0750 /run/svcd && touch /run/svcd/admin.sock \\
         && exec setpriv --reuid 65534 --regid 65534 --clear-groups -- {} list",
        svcd_bin()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("SVCD_ADMIN_LISTEN")
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "svcd: no permission on /run/svcd/admin.sock; add yourself to group svcd (then log in again)"
    );
}

#[tokio::test]
async fn client_errors_say_what_went_wrong_and_what_to_do_without_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let scrape = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("svcd.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"unix:{}\"\nmetrics_listen = \"{scrape}\"\ntoken_file = \"{}\"\n\
             [dns]\nlisten = \"127.0.0.1:{}\"\n[[proxy.http]]\nlisten = \"127.0.0.1:{}\"\n",
            socket.display(),
            token.display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("svcd.log")).unwrap();
    let mut daemon = KillOnDrop(
        Command::new(svcd_bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = scrape.parse().unwrap();
    eventually(Duration::from_secs(20), "ready", || async {
        let r = http(addr, "GET", "/readyz", None).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    let admin = format!("unix:{}", socket.display());
    let client = |args: &[&str]| {
        let out = Command::new(svcd_bin())
            .args(args)
            .env_remove("SVCD_ADMIN_LISTEN")
            .env_remove("SVCD_ADMIN_TOKEN_FILE")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let no_status = |stderr: &str| {
        for code in ["401", "404", "Unauthorized", "Not Found"] {
            assert!(!stderr.contains(code), "{code} in: {stderr}");
        }
    };

    // No token: where to give it.
    let (code, stderr) = client(&["list", "--admin", &admin]);
    assert_eq!(code, Some(1));
    no_status(&stderr);
    assert!(stderr.contains("--token-file"), "{stderr}");
    // A wrong one: which file held it.
    let (_, stderr) = client(&[
        "list",
        "--admin",
        &admin,
        "--token-file",
        wrong.to_str().unwrap(),
    ]);
    no_status(&stderr);
    assert!(
        stderr.contains(&format!("refused the token in {}", wrong.display())),
        "{stderr}"
    );

    // The daemon's reason, in words.
    let with_token = ["--admin", &admin, "--token-file", token.to_str().unwrap()];
    let (code, stderr) = client(&[&["deregister", "nosuch/x"][..], &with_token[..]].concat());
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), "svcd: instance nosuch.default/x not found");

    // The metrics listener is not the API: say so, and which flag points elsewhere.
    let (code, stderr) = client(&[
        "list",
        "--admin",
        &scrape,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    no_status(&stderr);
    assert!(
        stderr.contains(&format!(
            "{scrape} is svcd's metrics listener (admin.metrics_listen)"
        )) && stderr.contains("--admin"),
        "{stderr}"
    );

    // A socket the user may not open (its directory is root's, 0700): no permission, not
    // "cannot reach".
    let (code, stderr) = as_nobody(&["list", "--admin", &admin]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no permission on {}", socket.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot reach"), "{stderr}");
    daemon.stop();
}

/// A daemon started by hand, killed if the test fails before it stops.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}
