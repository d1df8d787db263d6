//! Test harness: etcd and svcd processes, free ports, polling helpers.

pub mod backend;
pub mod daemon;
pub mod dns;
pub mod etcd;
pub mod gate;
pub mod proxy;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
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
