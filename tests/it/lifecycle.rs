//! Daemon lifecycle through the real binary: readiness, graceful drain, second signal, SIGHUP
//! reload (good and broken), admin token.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;

use crate::support::daemon::{http, Daemon};
use crate::support::{eventually, free_port};

#[tokio::test]
async fn ready_then_sigterm_exits_zero_within_drain_timeout() {
    let mut d = Daemon::start("[shutdown]\ndrain_timeout = \"2s\"\n").await;
    assert_eq!(d.get("/healthz").await.status, 200);
    assert_eq!(d.get("/readyz").await.body, "ready\n");
    let metrics = d.get("/metrics").await.body;
    assert!(metrics.contains("svcd_build_info{"), "{metrics}");
    let build = metrics
        .lines()
        .find(|l| l.starts_with("svcd_build_info{"))
        .unwrap();
    let revision = build
        .split("revision=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(!revision.is_empty(), "{build}");
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "process metrics missing"
    );
    assert!(metrics.contains("svcd_registry_connected 1"));
    let started = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "idle daemon exits promptly"
    );
}

/// A connection to `admin` with a request half sent, so a drain has something to wait for.
/// It has been accepted once a connection opened after it is answered: one accept loop takes
/// connections in the order of the listen queue.
async fn half_sent_request(admin: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let later = http(admin, "GET", "/healthz", None).await.unwrap();
    assert_eq!(later.status, 200);
    s
}

#[tokio::test]
async fn drain_is_bounded_and_second_signal_exits_at_once() {
    // A half-sent request keeps a connection in flight, so the drain has something to wait for.
    let mut d = Daemon::start("[shutdown]\ndrain_timeout = \"1500ms\"\n").await;
    let _stuck = half_sent_request(d.admin).await;
    let started = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(4));
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1400),
        "drained for the timeout, took {took:?}"
    );
    assert!(
        took < Duration::from_millis(3500),
        "drain bounded by the timeout, took {took:?}"
    );

    let mut d = Daemon::start("[shutdown]\ndrain_timeout = \"30s\"\n").await;
    let _stuck = half_sent_request(d.admin).await;
    d.signal(Signal::SIGTERM);
    // The second signal must land in the drain, after the first was taken.
    eventually(Duration::from_secs(2), "readyz 503 (draining)", || async {
        (d.get("/readyz").await.status == 503).then_some(())
    })
    .await;
    let started = Instant::now();
    d.signal(Signal::SIGINT);
    let status = d.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(130), "second signal exits at once");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn sighup_applies_a_valid_file_and_rejects_a_broken_one() {
    let d = Daemon::start("").await;
    let base = std::fs::read_to_string(&d.config_path).unwrap();
    assert_eq!(d.get("/v1/config").await.json()["dns"]["ttl"], "5s");

    let changed = format!("{base}[shutdown]\ndrain_timeout = \"3s\"\n")
        .replace("[dns]\n", "[dns]\nttl = \"7s\"\n");
    std::fs::write(&d.config_path, changed).unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "reload ok counter", || async {
        (d.metric("svcd_config_reloads_total{result=\"ok\"}").await == Some(1.0)).then_some(())
    })
    .await;
    let config = d.get("/v1/config").await.json();
    assert_eq!(config["dns"]["ttl"], "7s");
    assert_eq!(config["shutdown"]["drain_timeout"], "3s");

    std::fs::write(&d.config_path, "[dns]\nttl = \"whenever\"\nbogus = 1\n").unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "reload failed counter", || async {
        (d.metric("svcd_config_reloads_total{result=\"failed\"}")
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    assert_eq!(
        d.get("/v1/config").await.json()["dns"]["ttl"],
        "7s",
        "old config keeps serving"
    );
    assert_eq!(d.get("/readyz").await.status, 200);
    assert!(d.log().contains("config reload rejected"), "{}", d.log());
}

/// A reload whose one new listener cannot bind (its port is taken) applies everything else and
/// says exactly what did not take effect: the listener, by key path and address, counted as a
/// partial reload, not as a rejected one (which would claim the old config kept serving).
#[tokio::test]
async fn a_reload_that_cannot_bind_a_listener_says_what_took_effect() {
    let d = Daemon::start("").await;
    let base = std::fs::read_to_string(&d.config_path).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let changed =
        format!("{base}[[proxy.tcp]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"web\"\n")
            .replace("[dns]\n", "[dns]\nttl = \"7s\"\n");
    std::fs::write(&d.config_path, changed).unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "partial reload counted", || async {
        (d.metric("svcd_config_reloads_total{result=\"partial\"}")
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    assert_eq!(
        d.metric("svcd_config_reloads_total{result=\"failed\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(
        d.get("/v1/config").await.json()["dns"]["ttl"],
        "7s",
        "the rest applied"
    );
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("config reloaded except this listener"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("proxy.tcp[0].listen") && line.contains(&port.to_string()),
        "{line}"
    );
    assert!(!log.contains("config reload rejected"), "{log}");
}

#[tokio::test]
async fn readyz_says_why_until_the_registry_syncs() {
    // etcd backend pointing at a port nobody listens on: alive, not ready, with the reason.
    let dead = free_port();
    let d = Daemon::spawn(
        &format!("[registry.etcd]\nendpoints = [\"127.0.0.1:{dead}\"]\n"),
        &[],
    );
    readyz_waits_for_the_registry(&d).await;
}

#[tokio::test]
async fn with_etcd_credentials_and_etcd_down_the_daemon_also_starts_and_waits() {
    // It used to exit 1: etcd-client authenticates while connecting. The store now connects on
    // first use and keeps retrying.
    let dead = free_port();
    let mut d = Daemon::spawn(
        &format!(
            "[registry.etcd]\nendpoints = [\"127.0.0.1:{dead}\"]\nusername = \"svcd\"\npassword = \"pw\"\n"
        ),
        &[],
    );
    readyz_waits_for_the_registry(&d).await;
    assert!(d.try_exit_status().is_none(), "still running:\n{}", d.log());
}

async fn readyz_waits_for_the_registry(d: &Daemon) {
    // The admin API answers first; the DNS listener binds a moment later.
    let reply = eventually(Duration::from_secs(10), "listeners bound", || async {
        let r = http(d.admin, "GET", "/readyz", None).await.ok()?;
        (!r.body.contains("listeners")).then_some(r)
    })
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "not ready: registry not synced yet\n");
    assert_eq!(d.get("/healthz").await.status, 200);
    assert_eq!(d.metric("svcd_registry_connected").await, Some(0.0));
}

#[tokio::test]
async fn admin_token_guards_everything_but_probes() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let d = Daemon::start_with("", &[("SVCD_ADMIN_TOKEN_FILE", token.to_str().unwrap())]).await;
    assert_eq!(d.get("/healthz").await.status, 200);
    assert_eq!(d.get("/readyz").await.status, 200);
    assert_eq!(d.get("/v1/config").await.status, 401);
    assert_eq!(d.get("/metrics").await.status, 401);
    let token_path = token.to_str().unwrap();
    let out = d.cli(&["list", "--token-file", token_path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["list"]);
    assert!(!out.status.success());
    // What to do, not a status code.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--token-file") && !stderr.contains("401"),
        "{stderr}"
    );
}

#[tokio::test]
async fn every_metric_family_exposed_is_documented() {
    // Traffic in every plane first, so their families exist.
    let tcp = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:{tcp}\"\nservice = \"web\"\n[[proxy.udp]]\nlisten = \"127.0.0.1:{}\"\nservice = \"web\"\n[xds]\nlisten = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    ))
    .await;
    let backend = crate::support::backend::Backend::start("b1").await;
    crate::support::proxy::register(&d, "web", "w1", backend.addr, "http").await;
    crate::support::proxy::wait_routable(&d, "web", 1).await;
    let _ = tokio::net::TcpStream::connect(("127.0.0.1", tcp)).await;
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let metrics = d.get("/metrics").await.body;
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("svcd_"))
        .collect();
    assert!(families.len() >= 30, "{families:?}");
    let missing: Vec<&&str> = families
        .iter()
        .filter(|name| !docs.contains(&format!("`{name}`")))
        .collect();
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
}

#[tokio::test]
async fn sigterm_goes_unready_marks_draining_and_keeps_dns_and_admin_through_the_grace() {
    let mut d =
        Daemon::start("[shutdown]\nreadiness_grace = \"2s\"\ndrain_timeout = \"2s\"\n").await;
    d.put_instance("web", "w1", r#"{"ip":"10.0.0.1"}"#).await;
    let started = Instant::now();
    d.signal(Signal::SIGTERM);
    // At once: not ready, and the registration is draining (DNS stops answering with it).
    eventually(Duration::from_millis(1000), "readyz 503", || async {
        (d.get("/readyz").await.status == 503).then_some(())
    })
    .await;
    eventually(Duration::from_millis(1000), "draining", || async {
        let w1 = d.get("/v1/services/default/web/instances/w1").await.json();
        (w1["state"] == "draining").then_some(())
    })
    .await;
    // Through the grace, DNS and the admin API keep answering, and so does the HTTP proxy.
    while started.elapsed() < Duration::from_millis(1600) {
        assert_eq!(d.get("/healthz").await.status, 200);
        let soa = crate::support::dns::udp(
            d.dns,
            "cluster.local.",
            hickory_proto::rr::RecordType::SOA,
            None,
        )
        .await;
        assert_eq!(soa.answers.len(), 1);
        assert!(tokio::net::TcpStream::connect(d.http).await.is_ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = d.wait_exit(Duration::from_secs(6));
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the grace was kept"
    );
}

#[tokio::test]
async fn a_reload_names_each_key_that_needs_a_restart_and_shows_it_pending() {
    let d = Daemon::start("").await;
    d.reload_with_dns(
        "ttl = \"9s\"\n",
        "[registry]\nlease_ttl = \"30s\"\nresync_interval = \"1m\"\n",
    )
    .await;
    let config = d.get("/v1/config").await.json();
    // The live part applied; the registry runs as it was, with the file's values beside it.
    assert_eq!(config["dns"]["ttl"], "9s");
    assert_eq!(config["registry"]["lease_ttl"], "10s");
    let pending = config["pending_restart"].as_array().unwrap();
    let keys: Vec<&str> = pending.iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(keys, vec!["registry.lease_ttl", "registry.resync_interval"]);
    assert_eq!(pending[0]["running"], "10s");
    assert_eq!(pending[0]["pending"], "30s");
    let log = d.log();
    assert!(
        log.contains("registry.lease_ttl") && log.contains("takes effect on restart"),
        "{log}"
    );
}

#[tokio::test]
async fn json_logs_put_fields_at_the_top_and_the_access_log_has_one_line_per_request() {
    let d = Daemon::start_with(
        "[proxy.l7]\naccess_log = true\n",
        &[("SVCD_LOG_FORMAT", "json")],
    )
    .await;
    let backend = crate::support::backend::Backend::start("b1").await;
    crate::support::proxy::register(&d, "web", "w1", backend.addr, "http").await;
    crate::support::proxy::wait_routable(&d, "web", 1).await;
    let mut c = crate::support::proxy::H1::connect(d.http).await;
    let (status, _) = c.get("web", "/hello").await;
    assert_eq!(status, 200);
    let access = eventually(Duration::from_secs(3), "the access line", || async {
        d.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "svcd::access" && v["path"] == "/hello")
    })
    .await;
    assert_eq!(access["status"], 200);
    assert_eq!(access["method"], "GET");
    assert_eq!(access["host"], "web");
    assert_eq!(access["service"], "web.default");
    assert_eq!(access["client"], "127.0.0.1");
    assert!(access["ms"].as_f64().is_some());
    // Every line is JSON with its fields at the top level.
    for line in d.log().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("fields").is_none(), "{line}");
        assert!(!line.contains("Some(\\\""), "{line}");
    }
}

/// Every listener kind (admin API, DNS, HTTP and L4 TCP and UDP proxies)
/// serving load when SIGTERM comes: the daemon exits 0 and its last line says every task and
/// thread of every phase had ended, none abandoned.
#[tokio::test]
async fn sigterm_under_load_ends_every_task_and_thread_of_every_phase() {
    let (tcp, udp) = (free_port(), free_port());
    let mut d = Daemon::start(&format!(
        "[shutdown]\nreadiness_grace = \"200ms\"\ndrain_timeout = \"3s\"\n\
         [[proxy.tcp]]\nlisten = \"127.0.0.1:{tcp}\"\nservice = \"web\"\nport = \"http\"\n\
         [[proxy.udp]]\nlisten = \"127.0.0.1:{udp}\"\nservice = \"web\"\nport = \"http\"\n"
    ))
    .await;
    let backend = crate::support::backend::Backend::start("b1").await;
    crate::support::proxy::register(&d, "web", "w1", backend.addr, "http").await;
    crate::support::proxy::wait_routable(&d, "web", 1).await;
    let load = crate::support::load::HttpLoad::start(d.http, "web", 2, 2);
    let dns = crate::support::load::DnsLoad::start(
        d.dns,
        "web.default.svc.cluster.local.",
        Duration::from_millis(5),
    );
    // Something on every listener: a TCP connection through the L4 proxy, a UDP flow, a scrape.
    let mut through = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
        .await
        .unwrap();
    through
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let flow = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    flow.send_to(b"ping", ("127.0.0.1", udp)).await.unwrap();
    assert_eq!(d.get("/metrics").await.status, 200);
    // The load is under way (answers in) when the signal comes.
    eventually(Duration::from_secs(5), "load answered", || async {
        (backend.count() >= 20).then_some(())
    })
    .await;
    d.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let status = d.wait_exit(Duration::from_secs(10));
        (status, d)
    });
    let (status, d) = status.await.unwrap();
    let _ = (load.finish().await, dns.finish().await);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    let stopped = log
        .lines()
        .find(|l| l.contains("svcd stopped"))
        .unwrap_or_else(|| panic!("no 'svcd stopped' line:\n{log}"));
    assert!(stopped.contains("all_ended=true"), "{stopped}");
    for phase in [
        "http proxy",
        "l4 proxy",
        "proxy workers",
        "dns and admin",
        "registry",
    ] {
        assert!(
            stopped.contains(&format!("{phase}: 0")),
            "{phase}: {stopped}"
        );
    }
}
