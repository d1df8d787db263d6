//! Steady client load for fault tests, recording what each request saw: HTTP/1.1 clients that
//! behave like real ones (a new connection per request, or keep-alive that retries a request
//! its reused connection closed before answering), and a DNS client over UDP.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one HTTP request ended with, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// 503, connection refused, or a reused keep-alive connection closed before any byte of
    /// the answer: what a retrying client retries (elsewhere, or once the proxy is back).
    Retryable(String),
    /// Anything else: a reset or a cut answer on a fresh connection, a 502, a timeout.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Sample<T> {
    pub sent: Instant,
    pub result: T,
}

/// Clients sending `GET /` with `Host: host` to `addr` until stopped.
pub struct HttpLoad {
    stop: CancellationToken,
    tasks: JoinSet<Vec<Sample<Outcome>>>,
}

impl HttpLoad {
    /// `fresh` clients open a connection per request; `keep_alive` clients reuse theirs.
    pub fn start(addr: SocketAddr, host: &str, fresh: usize, keep_alive: usize) -> HttpLoad {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for i in 0..fresh + keep_alive {
            let (stop, host) = (stop.clone(), host.to_string());
            tasks.spawn(http_client(addr, host, i >= fresh, stop));
        }
        HttpLoad { stop, tasks }
    }

    /// Stops every client and returns every sample, in send order.
    pub async fn finish(mut self) -> Vec<Sample<Outcome>> {
        self.stop.cancel();
        let mut all = Vec::new();
        while let Some(samples) = self.tasks.join_next().await {
            all.extend(samples.expect("load client"));
        }
        all.sort_by_key(|s| s.sent);
        all
    }
}

async fn http_client(
    addr: SocketAddr,
    host: String,
    keep_alive: bool,
    stop: CancellationToken,
) -> Vec<Sample<Outcome>> {
    let request = if keep_alive {
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
    } else {
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let mut samples = Vec::new();
    let mut conn: Option<TcpStream> = None;
    while !stop.is_cancelled() {
        let sent = Instant::now();
        let reused = conn.is_some();
        let stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    samples.push(Sample {
                        sent,
                        result: Outcome::Retryable("refused".into()),
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => {
                    samples.push(Sample {
                        sent,
                        result: Outcome::Failed(format!("connect: {e}")),
                    });
                    continue;
                }
            },
        };
        let (result, stream) = exchange(stream, request.as_bytes(), reused).await;
        if keep_alive {
            conn = stream;
        }
        if result != Outcome::Ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples.push(Sample { sent, result });
    }
    samples
}

/// One request and its answer (`Content-Length` bodies only, as the test backends send). Gives
/// the connection back when it may be reused.
async fn exchange(
    mut stream: TcpStream,
    request: &[u8],
    reused: bool,
) -> (Outcome, Option<TcpStream>) {
    let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let nothing_back = |what: String| {
        if reused {
            Outcome::Retryable(format!("reused connection {what} before answering"))
        } else {
            Outcome::Failed(format!("{what} (client port {port})"))
        }
    };
    if let Err(e) = stream.write_all(request).await {
        return (nothing_back(format!("write: {e}")), None);
    }
    let mut buf = Vec::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
        let n = match read {
            Err(_) => return (Outcome::Failed("no answer within 5 s".into()), None),
            Ok(Err(e)) if buf.is_empty() => return (nothing_back(format!("read: {e}")), None),
            Ok(Err(e)) => return (Outcome::Failed(format!("answer cut: {e}")), None),
            Ok(Ok(0)) if buf.is_empty() => return (nothing_back("closed".into()), None),
            Ok(Ok(0)) => return (Outcome::Failed("answer cut by close".into()), None),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some((status, complete, close)) = parse_response(&buf) {
            if !complete {
                continue;
            }
            let outcome = match status {
                200 => Outcome::Ok,
                503 => Outcome::Retryable("503".into()),
                other => Outcome::Failed(format!("status {other}")),
            };
            return (outcome, (!close).then_some(stream));
        }
    }
}

/// `(status, whole answer read, connection closes after it)` once the head is complete.
fn parse_response(buf: &[u8]) -> Option<(u16, bool, bool)> {
    let text = String::from_utf8_lossy(buf);
    let head_end = text.find("\r\n\r\n")?;
    let head = &text[..head_end];
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let close = header("connection").is_some_and(|v| v.contains("close"));
    Some((status, buf.len() >= head_end + 4 + length, close))
}

/// A UDP DNS client asking `name` (A) every `every` until stopped; each sample is the answer's
/// addresses, or `None` when nothing came back within a second.
pub struct DnsLoad {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<Sample<Option<Vec<String>>>>>,
}

impl DnsLoad {
    pub fn start(server: SocketAddr, name: &str, every: Duration) -> DnsLoad {
        let stop = CancellationToken::new();
        let (token, name) = (stop.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !token.is_cancelled() {
                let sent = Instant::now();
                let packet = super::dns::query(&name, RecordType::A, None);
                let result = super::dns::udp_raw(server, &packet)
                    .await
                    .and_then(|reply| hickory_proto::op::Message::from_vec(&reply).ok())
                    .map(|m| super::dns::addrs(&m));
                samples.push(Sample { sent, result });
                tokio::time::sleep(every).await;
            }
            samples
        });
        DnsLoad { stop, task }
    }

    pub async fn finish(self) -> Vec<Sample<Option<Vec<String>>>> {
        self.stop.cancel();
        self.task.await.expect("dns load")
    }
}
