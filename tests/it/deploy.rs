//! What a node's service manager sees: the systemd unit verifies, and the daemon speaks the
//! notify protocol (READY=1 only once `/readyz` is ready, RELOADING=1 … READY=1 on SIGHUP,
//! STOPPING=1 at the drain, WATCHDOG=1 pings) over a real `NOTIFY_SOCKET`.

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
