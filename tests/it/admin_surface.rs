//! The admin surface exposes nothing by accident: the API on a unix socket only its group can
//! reach, a metrics listener with nothing but scrape and probes, a token re-read on SIGHUP, and
//! mutating endpoints on their methods only.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::daemon::{http, Daemon};
use crate::support::{eventually, free_port, svcd_bin};

/// One request over the unix socket; the status and body.
async fn unix_request(path: &std::path::Path, method: &str, target: &str) -> (u16, String) {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    let req = format!("{method} {target} HTTP/1.1\r\nHost: svcd\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// A daemon started by hand, killed if the test fails before it stops it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn admin_api_on_a_unix_socket_and_metrics_on_their_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let scrape: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("svcd.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"unix:{}\"\nmetrics_listen = \"{scrape}\"\n\
             [dns]\nlisten = \"127.0.0.1:{}\"\n[[proxy.http]]\nlisten = \"127.0.0.1:{}\"\n",
            socket.display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("svcd.log")).unwrap();
    let spawn = || {
        Command::new(svcd_bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log.try_clone().unwrap()))
            .spawn()
            .unwrap()
    };
    let mut daemon = KillOnDrop(Some(spawn()));
    eventually(
        Duration::from_secs(20),
        "ready on the metrics listener",
        || async {
            let r = http(scrape, "GET", "/readyz", None).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;

    // The socket: mode 0660, the whole API.
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let admin = format!("unix:{}", socket.display());
    let out = Command::new(svcd_bin())
        .args(["register", "--admin", &admin, "web", "w1"])
        .args(["--ip", "10.0.0.1", "--port", "http=80"])
        .output()
        .unwrap();
    crate::support::assert_success(&out);
    let out = Command::new(svcd_bin())
        .args(["list", "web"])
        .env("SVCD_ADMIN_LISTEN", &admin)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("w1"));
    let (status, body) = unix_request(&socket, "GET", "/v1/services/default/web").await;
    assert_eq!(status, 200, "{body}");

    // The metrics listener: scrape and probes, nothing else.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            http(scrape, "GET", path, None).await.unwrap().status,
            200,
            "{path}"
        );
    }
    for (method, path) in [
        ("GET", "/v1/services"),
        ("GET", "/v1/config"),
        ("PUT", "/v1/services/default/web/instances/x"),
        ("DELETE", "/v1/services/default/web/instances/w1"),
    ] {
        let r = http(scrape, method, path, Some("{}")).await.unwrap();
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }

    // A second daemon on the same socket refuses to start rather than steal it.
    let mut second = spawn();
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(dir.path().join("svcd.log")).unwrap();
    assert!(text.contains("in use by a running process"), "{text}");

    // At exit the socket file goes.
    let mut child = daemon.0.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists());
}

#[tokio::test]
async fn mutating_endpoints_answer_only_their_methods() {
    let d = Daemon::start("").await;
    d.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;
    for (method, path, allow) in [
        ("POST", "/metrics", "GET"),
        ("DELETE", "/v1/config", "GET"),
        ("POST", "/v1/services", "GET"),
        ("PUT", "/v1/services/default/web", "GET"),
        (
            "POST",
            "/v1/services/default/web/instances/w1",
            "GET, PUT, DELETE",
        ),
        (
            "PATCH",
            "/v1/services/default/web/instances/w1",
            "GET, PUT, DELETE",
        ),
        ("GET", "/v1/services/default/web/instances/w1/drain", "POST"),
    ] {
        let r = d.request(method, path, Some("{}")).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert!(
            r.body.contains(&format!("use {allow}")),
            "{method} {path}: {}",
            r.body
        );
    }
    // Nothing changed.
    let w1 = d.get("/v1/services/default/web/instances/w1").await.json();
    assert_eq!(w1["state"], "healthy");
}

#[tokio::test]
async fn the_admin_token_is_read_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "old-token\n").unwrap();
    let d = Daemon::start_with("", &[("SVCD_ADMIN_TOKEN_FILE", token.to_str().unwrap())]).await;
    let with = |file: &std::path::Path| {
        d.cli(&["list", "--token-file", file.to_str().unwrap()])
            .status
            .success()
    };
    let old = dir.path().join("old");
    std::fs::write(&old, "old-token").unwrap();
    let new = dir.path().join("new");
    std::fs::write(&new, "new-token").unwrap();
    assert!(with(&old));
    assert!(!with(&new));

    std::fs::write(&token, "new-token\n").unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "the new token accepted", || async {
        with(&new).then_some(())
    })
    .await;
    assert!(!with(&old), "the old token no longer works");
    let r = d.get("/v1/config").await;
    assert_eq!(r.status, 401);
}

/// Above `admin.max_service_series` services, only services not fully healthy keep their own
/// `svcd_service_endpoints` series; the rest fold into `service="_folded"`, totals kept.
#[tokio::test]
async fn service_series_fold_above_the_limit_keeping_the_unhealthy_ones() {
    use crate::support::proxy::register_state;
    let d = crate::support::daemon::Daemon::start_with_admin("max_service_series = 2\n", "").await;
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (svc, state) in [("a", "healthy"), ("b", "healthy"), ("c", "healthy")] {
        register_state(&d, svc, "i1", addr, "http", state).await;
    }
    register_state(&d, "sick", "i1", addr, "http", "healthy").await;
    register_state(&d, "sick", "i2", addr, "http", "draining").await;
    d.wait_instances(
        "default",
        "sick",
        &["i1", "i2"],
        std::time::Duration::from_secs(5),
    )
    .await;
    let m = d.get("/metrics").await.body;
    let line = |s: &str| m.lines().find(|l| l.starts_with(s)).map(str::to_string);
    assert_eq!(
        line(r#"svcd_service_endpoints{service="_folded",state="healthy"}"#).as_deref(),
        Some(r#"svcd_service_endpoints{service="_folded",state="healthy"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"svcd_service_endpoints{service="sick.default",state="draining"} 1"#),
        "{m}"
    );
    assert!(!m.contains(r#"service="a.default""#), "{m}");
    assert_eq!(
        line("svcd_service_series_folded ").as_deref(),
        Some("svcd_service_series_folded 3")
    );
}
