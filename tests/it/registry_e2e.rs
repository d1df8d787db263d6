//! The registry end to end: two daemons sharing a real etcd, registrations through every path,
//! process death, daemon death, etcd restarts, partitions with compaction, garbage values.

use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, ExecJob};
use crate::support::etcd::Etcd;
use crate::support::eventually;
use crate::support::gate::Gate;

const WAIT: Duration = Duration::from_secs(5);

fn etcd_config(endpoint: &str) -> String {
    format!("[registry]\nlease_ttl = \"2s\"\n[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

fn body(ip: &str) -> String {
    format!(r#"{{"ip":"{ip}","ports":{{"http":8080}}}}"#)
}

#[tokio::test]
async fn registrations_from_api_cli_and_config_reach_a_second_daemon() {
    let etcd = Etcd::start().await;
    let a_extra = format!(
        "{}[[registry.static]]\nservice = \"db.prod\"\nid = \"db-1\"\nip = \"10.9.0.1\"\nports = {{ postgres = 5432 }}\n",
        etcd_config(&etcd.endpoint())
    );
    let a = Daemon::start(&a_extra).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;

    // API on A
    let r = a
        .request(
            "PUT",
            "/v1/services/default/web/instances/web-1",
            Some(&body("10.0.0.1")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // CLI on B
    let out = b.cli(&[
        "register",
        "web",
        "web-2",
        "--ip",
        "10.0.0.2",
        "--port",
        "http=8080",
        "--tag",
        "canary",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    a.wait_instances("default", "web", &["web-1", "web-2"], WAIT)
        .await;
    b.wait_instances("default", "web", &["web-1", "web-2"], WAIT)
        .await;
    b.wait_instances("prod", "db", &["db-1"], WAIT).await; // static entry of A

    let out = b.cli(&["resolve", "web", "--port", "http"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "10.0.0.1:8080\n10.0.0.2:8080\n"
    );
    let out = b.cli(&["list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("web.default") && listing.contains("db.prod"),
        "{listing}"
    );

    // Bad registrations: 400 naming the field, nothing stored.
    let r = a
        .request(
            "PUT",
            "/v1/services/default/web/instances/web-3",
            Some(r#"{"ip":"10.0.0.3","weight":0}"#),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["field"], "weight");
    let r = a
        .request(
            "PUT",
            "/v1/services/default/Web/instances/x",
            Some(&body("10.0.0.3")),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (400, Some("service"))
    );
    let r = a
        .request("PUT", "/v1/services/default/web/instances/web-3", Some("{"))
        .await;
    assert_eq!(r.status, 400);
    let r = a
        .request(
            "PUT",
            "/v1/services/default/web/instances/web-3?ttl=soon",
            Some(&body("10.0.0.3")),
        )
        .await;
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("ttl")));
    let out = a.cli(&[
        "register", "web", "web-3", "--ip", "10.0.0.3", "--port", "http=x",
    ]);
    assert!(!out.status.success());

    // Deregister through the CLI of the other daemon (keys are shared).
    let out = b.cli(&["deregister", "web/web-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_instances("default", "web", &["web-2"], WAIT).await;
    assert_eq!(
        a.request("DELETE", "/v1/services/default/web/instances/nope", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn exec_child_killed_leaves_at_once_and_dead_daemon_leaves_after_ttl() {
    let etcd = Etcd::start().await;
    let mut a = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;

    // svcd exec on A; the child is SIGKILLed, svcd exec survives and deregisters.
    let mut job = ExecJob::start(&a, "job-1");
    b.wait_instances("default", "job", &["job-1"], WAIT).await;
    let killed = Instant::now();
    job.kill_child().await;
    b.wait_instances("default", "job", &[], Duration::from_secs(1))
        .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after < Duration::from_millis(1000),
        "took {gone_after:?}"
    );
    let status = job.exec.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "exec exits with the child's status"
    );

    // Daemon A dies hard: nobody keeps its lease alive, its entries vanish after the TTL (2s).
    let r = a
        .request(
            "PUT",
            "/v1/services/default/web/instances/web-a",
            Some(&body("10.0.0.1")),
        )
        .await;
    assert_eq!(r.status, 200);
    b.wait_instances("default", "web", &["web-a"], WAIT).await;
    a.kill9();
    let died = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        b.instance_ids("default", "web").await,
        ["web-a"],
        "still there before the TTL"
    );
    b.wait_instances("default", "web", &[], Duration::from_secs(4))
        .await;
    let gone_after = died.elapsed();
    assert!(
        gone_after <= Duration::from_secs(3) + Duration::from_millis(500),
        "gone after {gone_after:?} (TTL 2s + 1s)"
    );
}

#[tokio::test]
async fn exec_registration_expires_when_exec_itself_is_killed() {
    let a = Daemon::start("").await;
    let mut exec = std::process::Command::new(crate::support::svcd_bin())
        .args([
            "exec",
            "--service",
            "job",
            "--id",
            "job-1",
            "--ttl",
            "1s",
            "--",
            "sleep",
            "30",
        ])
        .env("SVCD_ADMIN_LISTEN", a.admin.to_string())
        .spawn()
        .unwrap();
    a.wait_instances("default", "job", &["job-1"], WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        a.instance_ids("default", "job").await,
        ["job-1"],
        "renewed while exec lives"
    );
    exec.kill().unwrap();
    exec.wait().unwrap();
    a.wait_instances("default", "job", &[], Duration::from_secs(3))
        .await;
}

#[tokio::test]
async fn etcd_restart_with_changes_meanwhile_misses_and_repeats_nothing() {
    let mut etcd = Etcd::start().await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let mut client = etcd.client().await;
    let key = |id: &str| format!("/svcd/v1/endpoints/default/web/{id}");
    client.put(key("w1"), body("10.0.0.1"), None).await.unwrap();
    client.put(key("w2"), body("10.0.0.2"), None).await.unwrap();
    b.wait_instances("default", "web", &["w1", "w2"], WAIT)
        .await;
    let puts_before = b
        .metric("svcd_registry_events_total{type=\"put\"}")
        .await
        .unwrap();
    let deletes_before = b
        .metric("svcd_registry_events_total{type=\"delete\"}")
        .await
        .unwrap();

    etcd.stop();
    eventually(WAIT, "svcd to notice etcd is gone", || async {
        (b.metric("svcd_registry_connected").await == Some(0.0)).then_some(())
    })
    .await;
    // Stale, not empty, and still ready.
    assert_eq!(b.instance_ids("default", "web").await, ["w1", "w2"]);
    assert_eq!(b.get("/readyz").await.status, 200);

    etcd.resume().await;
    let mut client = etcd.client().await;
    client.put(key("w3"), body("10.0.0.3"), None).await.unwrap();
    client.delete(key("w1"), None).await.unwrap();
    client
        .put(key("w2"), body("10.0.0.22"), None)
        .await
        .unwrap();
    b.wait_instances("default", "web", &["w2", "w3"], Duration::from_secs(10))
        .await;
    // The three changes may arrive in separate watch responses: wait for the last one too.
    eventually(WAIT, "w2 updated", || async {
        let w2 = b.get("/v1/services/default/web/instances/w2").await.json();
        (w2["ip"] == "10.0.0.22").then_some(())
    })
    .await;
    eventually(WAIT, "reconnected", || async {
        (b.metric("svcd_registry_connected").await == Some(1.0)).then_some(())
    })
    .await;
    let puts = b
        .metric("svcd_registry_events_total{type=\"put\"}")
        .await
        .unwrap()
        - puts_before;
    let deletes = b
        .metric("svcd_registry_events_total{type=\"delete\"}")
        .await
        .unwrap()
        - deletes_before;
    assert_eq!(
        (puts, deletes),
        (2.0, 1.0),
        "each change applied exactly once"
    );
}

#[tokio::test]
async fn compaction_during_a_partition_relists_to_the_right_answer() {
    let etcd = Etcd::start().await;
    let gate = Gate::start(etcd.endpoint().parse().unwrap()).await;
    let b = Daemon::start(&etcd_config(&gate.addr.to_string())).await;
    let mut client = etcd.client().await;
    let key = |id: &str| format!("/svcd/v1/endpoints/default/web/{id}");
    for id in ["w1", "w2", "w3"] {
        client.put(key(id), body("10.0.0.1"), None).await.unwrap();
    }
    b.wait_instances("default", "web", &["w1", "w2", "w3"], WAIT)
        .await;
    let relists_before = b.metric("svcd_registry_relists_total").await.unwrap();

    gate.cut();
    eventually(WAIT, "svcd to notice the partition", || async {
        (b.metric("svcd_registry_connected").await == Some(0.0)).then_some(())
    })
    .await;
    client.delete(key("w1"), None).await.unwrap();
    client.put(key("w4"), body("10.0.0.4"), None).await.unwrap();
    let rev = client
        .put(key("w2"), body("10.0.0.2"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.unwrap();
    gate.restore();

    b.wait_instances(
        "default",
        "web",
        &["w2", "w3", "w4"],
        Duration::from_secs(15),
    )
    .await;
    eventually(WAIT, "w2 updated", || async {
        let w2 = b.get("/v1/services/default/web/instances/w2").await.json();
        (w2["ip"] == "10.0.0.2").then_some(())
    })
    .await;
    assert!(
        b.metric("svcd_registry_relists_total").await.unwrap() > relists_before,
        "re-listed after compaction"
    );
    assert!(b.log().contains("compacted"), "{}", b.log());
}

#[tokio::test]
async fn garbage_values_are_skipped_logged_and_counted() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let key = |id: &str| format!("/svcd/v1/endpoints/default/web/{id}");
    client
        .put(key("good"), body("10.0.0.1"), None)
        .await
        .unwrap();
    client
        .put(key("bad-json"), "{not json", None)
        .await
        .unwrap();
    client
        .put("/svcd/v1/endpoints/default/web", body("10.0.0.9"), None)
        .await
        .unwrap(); // short key
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    b.wait_instances("default", "web", &["good"], WAIT).await;
    assert_eq!(
        b.metric("svcd_registry_invalid_values_total").await,
        Some(2.0)
    );
    // Live garbage over a valid entry removes it (the key no longer holds a valid instance).
    client
        .put(key("good"), r#"{"ip":"10.0.0.1","weight":-1}"#, None)
        .await
        .unwrap();
    b.wait_instances("default", "web", &[], WAIT).await;
    assert_eq!(
        b.metric("svcd_registry_invalid_values_total").await,
        Some(3.0)
    );
    client
        .put(key("good"), body("10.0.0.1"), None)
        .await
        .unwrap();
    b.wait_instances("default", "web", &["good"], WAIT).await;
    assert!(b.log().contains("skipping invalid registry entry"));
    assert_eq!(b.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn drain_hides_an_instance_from_dns_and_exec_drains_before_stopping() {
    use crate::support::dns::{addrs, udp};
    use hickory_proto::rr::RecordType;

    let a = Daemon::start("").await;
    let name = "job.default.svc.cluster.local.";
    let r = a
        .request(
            "PUT",
            "/v1/services/default/job/instances/j1",
            Some(&body("10.0.0.1")),
        )
        .await;
    assert_eq!(r.status, 200);
    let out = a.cli(&["drain", "job/j1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(WAIT, "draining state", || async {
        let v = a.get("/v1/services/default/job/instances/j1").await.json();
        (v["state"] == "draining").then_some(())
    })
    .await;
    assert_eq!(
        udp(a.dns, name, RecordType::A, None).await.answers.len(),
        0,
        "draining: not in DNS"
    );
    assert_eq!(
        a.request("POST", "/v1/services/default/nope/instances/x/drain", None)
            .await
            .status,
        404
    );
    assert_eq!(
        a.request("DELETE", "/v1/services/default/job/instances/j1", None)
            .await
            .status,
        200
    );

    // svcd exec: SIGTERM → drained at once, child stopped only after --drain-timeout.
    let mut exec = std::process::Command::new(crate::support::svcd_bin())
        .args([
            "exec",
            "--service",
            "job",
            "--id",
            "j2",
            "--ip",
            "10.0.0.2",
            "--drain-timeout",
            "1s",
            "--",
            "sleep",
            "30",
        ])
        .env("SVCD_ADMIN_LISTEN", a.admin.to_string())
        .spawn()
        .unwrap();
    eventually(WAIT, "exec registered in DNS", || async {
        (addrs(&udp(a.dns, name, RecordType::A, None).await) == ["10.0.0.2"]).then_some(())
    })
    .await;
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(exec.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    eventually(WAIT, "drained out of DNS", || async {
        (udp(a.dns, name, RecordType::A, None)
            .await
            .answers
            .is_empty())
        .then_some(())
    })
    .await;
    assert!(
        signalled.elapsed() < Duration::from_millis(900),
        "drained before the child was stopped"
    );
    assert!(
        exec.try_wait().unwrap().is_none(),
        "child still running during the drain"
    );
    let status = exec.wait().unwrap();
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "child stopped after the drain timeout"
    );
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "exit status of the SIGTERMed child"
    );
    a.wait_instances("default", "job", &[], WAIT).await;
}

/// An HTTP backend whose `/healthz` answers 200 or 503 as `healthy` says.
async fn flappy_backend(
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let status = if healthy.load(std::sync::atomic::Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn active_checks_take_failing_instances_out_of_dns_and_back() {
    use crate::support::dns::{addrs, udp};
    use hickory_proto::rr::RecordType;
    use std::sync::atomic::{AtomicBool, Ordering};

    let a = Daemon::start("").await;
    let healthy = std::sync::Arc::new(AtomicBool::new(true));
    let backend = flappy_backend(healthy.clone()).await;
    let check = r#""check":{"type":"http","path":"/healthz","interval":"200ms","timeout":"500ms","healthy_threshold":2,"unhealthy_threshold":2}"#;
    let body = format!(
        r#"{{"ip":"127.0.0.1","ports":{{"http":{}}},{check}}}"#,
        backend.port()
    );
    assert_eq!(
        a.request("PUT", "/v1/services/default/web/instances/h1", Some(&body))
            .await
            .status,
        200
    );
    let name = "web.default.svc.cluster.local.";
    eventually(WAIT, "healthy in DNS", || async {
        (addrs(&udp(a.dns, name, RecordType::A, None).await) == ["127.0.0.1"]).then_some(())
    })
    .await;

    healthy.store(false, Ordering::SeqCst);
    let failing = Instant::now();
    eventually(WAIT, "failing check removes it from DNS", || async {
        (udp(a.dns, name, RecordType::A, None)
            .await
            .metadata
            .response_code
            == hickory_proto::op::ResponseCode::NXDomain)
            .then_some(())
    })
    .await;
    assert!(
        failing.elapsed() < Duration::from_millis(2500),
        "within interval x threshold (+ slack for a loaded machine), took {:?}",
        failing.elapsed()
    );
    assert_eq!(
        a.get("/v1/services/default/web/instances/h1").await.json()["state"],
        "unhealthy"
    );

    healthy.store(true, Ordering::SeqCst);
    eventually(WAIT, "recovered", || async {
        (addrs(&udp(a.dns, name, RecordType::A, None).await) == ["127.0.0.1"]).then_some(())
    })
    .await;
    assert!(
        a.metric("svcd_health_checks_total{result=\"fail\",service=\"web.default\"}")
            .await
            .unwrap()
            >= 2.0
    );

    // A TCP check on a closed port: unhealthy.
    let closed = crate::support::free_port();
    let body = format!(
        r#"{{"ip":"127.0.0.1","ports":{{"tcp":{closed}}},"check":{{"type":"tcp","interval":"200ms","unhealthy_threshold":2}}}}"#
    );
    assert_eq!(
        a.request("PUT", "/v1/services/default/db/instances/d1", Some(&body))
            .await
            .status,
        200
    );
    eventually(WAIT, "closed port marked unhealthy", || async {
        (a.get("/v1/services/default/db/instances/d1").await.json()["state"] == "unhealthy")
            .then_some(())
    })
    .await;
    // A bad check is a 400 naming the field.
    let bad = r#"{"ip":"127.0.0.1","ports":{"http":80},"check":{"type":"http","port":"nope"}}"#;
    let r = a
        .request("PUT", "/v1/services/default/web/instances/h2", Some(bad))
        .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (400, Some("check.port"))
    );
}

#[tokio::test]
async fn a_thousand_garbage_keys_give_a_summary_and_oversized_or_array_values_are_skipped() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let key = |id: &str| format!("/svcd/v1/endpoints/default/web/{id}");
    client
        .put(key("good"), body("10.0.0.1"), None)
        .await
        .unwrap();
    // Written straight into etcd, past the API: a value over 64 KiB and a JSON array.
    let huge = format!(
        r#"{{"ip":"10.0.0.2","meta":{{"blob":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    client.put(key("huge"), huge, None).await.unwrap();
    client
        .put(key("array"), r#"["10.0.0.3"]"#, None)
        .await
        .unwrap();
    let ops: Vec<etcd_client::TxnOp> = (0..1000)
        .map(|i| etcd_client::TxnOp::put(key(&format!("junk-{i}")), "{not json", None))
        .collect();
    for chunk in ops.chunks(100) {
        client
            .txn(etcd_client::Txn::new().and_then(chunk.to_vec()))
            .await
            .unwrap();
    }
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    b.wait_instances("default", "web", &["good"], WAIT).await;
    assert_eq!(
        b.metric("svcd_registry_invalid_values_total").await,
        Some(1002.0)
    );
    let log = b.log();
    let lines = log.matches("skipping invalid registry entry").count();
    assert!(lines <= 10, "{lines} lines for 1002 invalid entries");
    assert!(
        log.contains("skipping more invalid registry entries"),
        "{log}"
    );
    // The API refuses the same shapes with a reason.
    let r = b
        .request(
            "PUT",
            "/v1/services/default/web/instances/x",
            Some(r#"["10.0.0.3"]"#),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("JSON object"), "{}", r.body);
}

#[tokio::test]
async fn a_sigkilled_exec_takes_its_child_with_it() {
    let d = Daemon::start("").await;
    let mut job = ExecJob::start(&d, "job-orphan");
    d.wait_instances("default", "job", &["job-orphan"], WAIT)
        .await;
    let child = job.child_pid().await;
    job.exec.kill().unwrap(); // SIGKILL to svcd exec itself
    job.exec.wait().unwrap();
    // The kernel's parent-death signal ends the child: no orphan keeps running unregistered.
    eventually(Duration::from_secs(3), "child gone", || async {
        let alive = nix::sys::signal::kill(child, None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{child}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        (!alive).then_some(())
    })
    .await;
}

/// Drives `svcd exec` from a pseudo-terminal as a person at a shell does (python3's pty module):
/// Ctrl-C reaches the child once, not twice. The child takes SIGINTs one by one with
/// sigwaitinfo, so a second delivery (exec forwarding what the terminal already sent) is seen.
const CTRL_C_DRIVER: &str = r#"import os, pty, sys, time, select
svcd, admin, out = sys.argv[1], sys.argv[2], sys.argv[3]
child = f"import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})\nopen({out!r}, 'a').write('ready\\n')\nwhile True:\n    i = signal.sigwaitinfo({{signal.SIGINT}})\n    open({out!r}, 'a').write(f'INT from {{i.si_pid}}\\n')\n"
pid, fd = pty.fork()
if pid == 0:
    os.environ["SVCD_ADMIN_LISTEN"] = admin
    os.execv(svcd, [svcd, "exec", "--service", "ctrlc", "--check", "none", "--", sys.executable, "-c", child])
deadline = time.time() + 10
while time.time() < deadline:
    if os.path.exists(out) and "ready" in open(out).read():
        break
    time.sleep(0.05)
time.sleep(0.3)
os.write(fd, b"\x03")  # Ctrl-C: the terminal signals the foreground group
time.sleep(1.0)
os.kill(pid, 9)
"#;

#[tokio::test]
async fn ctrl_c_reaches_the_exec_child_once() {
    let d = Daemon::start("").await;
    let driver = d.dir.path().join("ctrlc.py");
    std::fs::write(&driver, CTRL_C_DRIVER).unwrap();
    let out = d.dir.path().join("signals");
    let status = std::process::Command::new("python3")
        .arg(&driver)
        .arg(crate::support::svcd_bin())
        .arg(d.admin.to_string())
        .arg(&out)
        .status()
        .expect("python3 (Debian's python3 package)");
    assert!(status.success());
    let seen = std::fs::read_to_string(&out).unwrap();
    assert!(seen.contains("ready"), "{seen}");
    assert_eq!(
        seen.matches("INT").count(),
        1,
        "SIGINT delivered once: {seen:?}"
    );
}

#[tokio::test]
async fn exec_registers_again_when_its_daemon_comes_back() {
    let mut d = Daemon::start("").await;
    let mut job = ExecJob::start_with(&d, "j1", &["--ttl", "1s"]);
    d.wait_instances("default", "job", &["j1"], WAIT).await;
    // The daemon dies and a supervisor restarts it (embedded store: it comes back empty).
    d.crash_and_restart().await;
    let back = Instant::now();
    d.wait_instances("default", "job", &["j1"], Duration::from_secs(3))
        .await;
    eprintln!(
        "re-registered {:?} after the daemon was ready again",
        back.elapsed()
    );
    let _ = job.exec.kill();
    let _ = job.exec.wait();
}
