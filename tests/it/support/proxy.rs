//! Clients of the HTTP proxy and registration shortcuts for the proxy and health tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::backend::Backend;
use super::daemon::Daemon;
use super::eventually;

/// Config of the HTTP/1.1 fast path (the default), and of hyper serving every request: tests
/// that must hold on both run on both.
pub const FAST_PATH: &str = "";
pub const HYPER_PATH: &str = "[proxy.l7]\nhttp1_fast_path = false\n";

/// `config` on the HTTP/1.1 path `path` ([`FAST_PATH`] or [`HYPER_PATH`]): the key joins a
/// `[proxy.l7]` table `config` already has.
pub fn on_path(config: &str, path: &str) -> String {
    if path.is_empty() {
        return config.to_string();
    }
    match config.find("[proxy.l7]\n") {
        Some(i) => {
            let at = i + "[proxy.l7]\n".len();
            format!(
                "{}http1_fast_path = false\n{}",
                &config[..at],
                &config[at..]
            )
        }
        None => format!("{config}{path}"),
    }
}

/// A daemon (base config plus `extra`) with one backend per name registered as instances
/// `w1`, `w2`, … of service `web` (protocol http), and the proxy already routing to all of them.
pub async fn web_service(extra: &str, names: &[&'static str]) -> (Daemon, Vec<Backend>) {
    let d = Daemon::start(extra).await;
    let mut backends = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let b = Backend::start(name).await;
        register(&d, "web", &format!("w{}", i + 1), b.addr, "http").await;
        backends.push(b);
    }
    wait_routable(&d, "web", names.len()).await;
    (d, backends)
}

pub async fn register(d: &Daemon, svc: &str, id: &str, addr: SocketAddr, protocol: &str) {
    register_state(d, svc, id, addr, protocol, "healthy").await;
}

pub async fn register_state(
    d: &Daemon,
    svc: &str,
    id: &str,
    addr: SocketAddr,
    protocol: &str,
    state: &str,
) {
    let body = format!(
        r#"{{"ip":"{}","ports":{{"http":{}}},"protocol":"{protocol}","state":"{state}"}}"#,
        addr.ip(),
        addr.port()
    );
    d.put_instance(svc, id, &body).await;
}

/// Waits until the proxy answers `host` with 200 from `n` distinct backends (a new connection
/// per probe).
pub async fn wait_routable(d: &Daemon, host: &str, n: usize) {
    let addr = d.http;
    eventually(Duration::from_secs(10), "service routable", || async move {
        let mut c = H1::connect(addr).await;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n * 2 {
            let (s, b) = c.get(host, "/").await;
            if s != StatusCode::OK {
                return None;
            }
            seen.insert(b);
        }
        (seen.len() == n).then_some(())
    })
    .await;
}

/// One HTTP/1.1 keep-alive connection to the proxy.
pub struct H1 {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        H1::try_connect(addr).await.expect("connect to the proxy")
    }

    /// [`Self::connect`], the failure returned.
    pub async fn try_connect(addr: SocketAddr) -> Result<H1, Box<dyn std::error::Error>> {
        H1::over(TcpStream::connect(addr).await?).await
    }

    /// HTTP/1.1 over an established `stream` (a TLS one, say).
    pub async fn over<S>(stream: S) -> Result<H1, Box<dyn std::error::Error>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(H1 { send })
    }

    /// Whether the proxy closed the connection (a request sent now would not go out).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    pub async fn request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> (StatusCode, http::HeaderMap, String) {
        self.send.ready().await.expect("connection usable");
        let r = self.send.send_request(req).await.expect("response");
        let (parts, body) = r.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into(),
        )
    }

    /// Sends `req` and returns the response head, once it has come; the body is read apart so
    /// a caller can tell a failure before the head from one in the body.
    pub async fn try_send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        self.send.ready().await?;
        self.send.send_request(req).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> (StatusCode, String) {
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (s, _, b) = self.request(req).await;
        (s, b)
    }
}

/// Sends raw bytes to `addr` (where a library client would tidy them), returns everything the
/// proxy answers until it closes (or 5 s).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2 (prior knowledge) client connection to `addr`; the connection task runs until it
/// closes (its handle tells when).
pub async fn h2_connect<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

/// One HTTP/1.1 GET with `Connection: close` through `addr`, over a raw socket: (status, body).
pub async fn get_close(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let reply = raw_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}
