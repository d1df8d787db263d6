//! `svcd config …` and start-up refusals, through the real binary.

use std::process::Command;

use crate::support::svcd_bin;

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
