//! Test harness: etcd and svcd processes, free ports, polling helpers.

pub mod backend;
pub mod daemon;
pub mod dns;
pub mod echo;
pub mod etcd;
pub mod exec_backend;
pub mod gate;
pub mod id_load;
pub mod load;
pub mod proxy;
pub mod tls;

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Ports handed out by [`free_port`] come from below the kernel's ephemeral range (32768+), so
/// the many client sockets the tests open can never take one between the check and the bind.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port free for TCP and UDP on 127.0.0.1 a moment ago, never handed out twice by this test
/// process (a counter walks the range from a per-process offset).
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORTS.end - PORTS.start;
    let offset = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORTS.start + (offset + n) % span;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `svcd` binary built for this test run.
pub fn svcd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_svcd")
}

/// Panics with the command's stderr unless it exited 0.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
