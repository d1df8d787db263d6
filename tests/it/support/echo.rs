//! A hand-written HTTP/1.1 backend that echoes each request's id, and misbehaves at random as
//! real servers do: it closes idle keep-alive connections, or writes a stray
//! `408 Request Timeout` on one before closing it. The soak (`tests/it/soak.rs`) runs it in the
//! test process and, under `svcd exec`, as a process of its own that dies and comes back.
//!
//! A request carries its id in the path (`/soak/<id>`) and in [`ID_HEADER`]; the answer is 200
//! with [`ECHO_HEADER`] (the id the backend received in the header), [`BACKEND_HEADER`] (who
//! answered) and, but for HEAD, the body [`echo_body`] of what it received, framed at random
//! with Content-Length (in one write or two) or chunked (one to four chunks, a write each).
//!
//! After each answer the connection's next idle period gets a behaviour, drawn from a seeded RNG
//! per connection: wait for the next request (most often), or after 20–400 ms of silence close
//! it, or write [`STRAY_408`] and close it. A closing backend half-closes and keeps reading for
//! [`LINGER`], as Apache's lingering close does: a request that arrives in that time may have
//! crossed the backend's decision on the wire (no proxy can tell), and is recorded as [`Raced`]
//! with its id.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The request's id, set by the client.
pub const ID_HEADER: &str = "x-req-id";
/// The id the backend found in [`ID_HEADER`].
pub const ECHO_HEADER: &str = "x-echo-id";
/// `<backend name> conn <n>`: who answered, on which of its connections.
pub const BACKEND_HEADER: &str = "x-backend";
/// On the stray 408 only: which backend and connection wrote it.
pub const STRAY_HEADER: &str = "x-stray-from";

/// What a backend writes on an idle connection it then closes (with [`STRAY_HEADER`] added):
/// no framing, so the body runs until the close, as several servers send it.
pub const STRAY_408: &str = "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n";

/// How long a closing backend keeps reading after its FIN (or stray 408), to see requests that
/// crossed it on the wire. A proxy that checks a pooled connection before reuse writes onto one
/// whose 408 or FIN has not reached it yet only within its own scheduling delay (hyper-util's
/// pool learns of it from its connection task), some milliseconds on a loaded debug build;
/// 100 ms bounds that with room. A proxy that reuses connections unchecked also writes onto ones
/// that held the 408 for longer: those requests are not recorded, and are not excused.
pub const LINGER: Duration = Duration::from_millis(100);

/// The body answered for a request (GET and POST; HEAD gets its length alone).
pub fn echo_body(id: &str, path: &str, method: &str, body: &[u8]) -> String {
    format!(
        "id={id};path={path};method={method};body={}",
        String::from_utf8_lossy(body)
    )
}

/// What a backend did to an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    Closed,
    Stray408,
}

impl Misbehaviour {
    fn as_str(self) -> &'static str {
        match self {
            Misbehaviour::Closed => "closed",
            Misbehaviour::Stray408 => "stray408",
        }
    }
}

/// A request that reached a backend within [`LINGER`] after it closed the connection (or wrote
/// its stray 408): the two crossed on the wire.
#[derive(Debug, Clone)]
pub struct Raced {
    pub id: String,
    pub backend: String,
    pub after: Misbehaviour,
    /// From the backend's FIN or 408 to the request's arrival.
    pub delay: Duration,
}

/// What a backend did, for the test to check that the misbehaviour really happened.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub idle_closes: AtomicU64,
    pub stray_408s: AtomicU64,
}

/// State shared by a backend's connections.
struct Shared {
    name: String,
    seed: u64,
    counters: Counters,
    raced: Mutex<Vec<Raced>>,
    /// A process of its own (`svcd exec`) also appends each [`Raced`] here, one line each, for
    /// the test process to read ([`read_race_file`]).
    race_file: Option<PathBuf>,
}

pub struct EchoBackend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl EchoBackend {
    /// On a new loopback port.
    pub async fn start(name: &str, seed: u64) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, name, seed, None)
    }

    /// On `listener`; every [`Raced`] also appended to `race_file`.
    pub fn serve(
        listener: TcpListener,
        name: &str,
        seed: u64,
        race_file: Option<PathBuf>,
    ) -> EchoBackend {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            seed,
            counters: Counters::default(),
            raced: Mutex::new(Vec::new()),
            race_file,
        });
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (shared2, stop2, tasks2) = (shared.clone(), stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let n = shared2.counters.connections.fetch_add(1, Ordering::Relaxed);
                let (shared, stop) = (shared2.clone(), stop2.clone());
                tasks2.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve_connection(stream, &shared, n) => {}
                    }
                });
            }
        });
        EchoBackend {
            addr,
            shared,
            stop,
            tasks,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn raced(&self) -> Vec<Raced> {
        self.shared.raced.lock().unwrap().clone()
    }

    /// Closes the listener and every connection, and waits for their tasks to end.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Serves until the process ends (the `svcd exec` backend).
    pub async fn run_forever(&self) {
        self.stop.cancelled().await;
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The [`Raced`] lines a backend process appended to `path` (none if it wrote none).
pub fn read_race_file(path: &std::path::Path) -> Vec<Raced> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (id, backend, after, us) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some(Raced {
                id: id.to_string(),
                backend: backend.to_string(),
                after: if after == "stray408" {
                    Misbehaviour::Stray408
                } else {
                    Misbehaviour::Closed
                },
                delay: Duration::from_micros(us.parse().ok()?),
            })
        })
        .collect()
}

/// A request head as the backend needs it.
struct Head {
    len: usize,
    method: String,
    path: String,
    id: String,
    framing: Framing,
    close: bool,
}

enum Framing {
    Length(usize),
    Chunked,
}

/// Heads and bodies past these are refused by closing (the soak's requests are far smaller).
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1 << 20;

/// Parses the head at the start of `buf`; `None` until it is complete or when it is malformed
/// (then `len` is 0).
fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    let (method, path) = (request.next()?.to_string(), request.next()?.to_string());
    let (mut id, mut length, mut chunked, mut close) = (String::new(), 0, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            ID_HEADER => id = value.to_string(),
            "content-length" => length = value.parse().ok()?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(length)
    };
    Some(Head {
        len: end,
        method,
        path,
        id,
        framing,
        close,
    })
}

/// Reads more into `buf`; false when the peer closed or the read failed.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// Reads until `buf` holds `n` bytes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        if !read_more(s, buf).await {
            return false;
        }
    }
    true
}

/// Reads the line at the start of `buf` (without its CRLF) and takes it out.
async fn take_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Some(line);
        }
        if buf.len() > MAX_HEAD || !read_more(s, buf).await {
            return None;
        }
    }
}

/// The request body after `head` (taken out of `buf`); `None` when it is cut or malformed.
async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, framing: &Framing) -> Option<Vec<u8>> {
    match *framing {
        Framing::Length(n) if n <= MAX_BODY => {
            if !fill(s, buf, n).await {
                return None;
            }
            Some(buf.drain(..n).collect())
        }
        Framing::Length(_) => None,
        Framing::Chunked => {
            let mut body = Vec::new();
            loop {
                let line = take_line(s, buf).await?;
                let size = line.split(';').next()?.trim();
                let size = usize::from_str_radix(size, 16).ok()?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !take_line(s, buf).await?.is_empty() {}
                    return Some(body);
                }
                if body.len() + size > MAX_BODY || !fill(s, buf, size + 2).await {
                    return None;
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
            }
        }
    }
}

/// This connection's RNG: the backend's seed, its name and the connection's number.
fn connection_rng(shared: &Shared, n: u64) -> StdRng {
    let name = shared.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    StdRng::seed_from_u64(shared.seed ^ name ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

async fn serve_connection(mut s: TcpStream, shared: &Shared, n: u64) {
    let mut rng = connection_rng(shared, n);
    let who = format!("{} conn {n}", shared.name);
    let mut buf = Vec::new();
    loop {
        // This idle period's behaviour, while nothing of a next request has arrived.
        let roll = rng.random_range(0..100u32);
        let idle = Duration::from_millis(rng.random_range(20..400u64));
        let misbehaviour = match roll {
            0..15 => Some(Misbehaviour::Closed),
            15..35 => Some(Misbehaviour::Stray408),
            _ => None,
        };
        let head = loop {
            if let Some(head) = parse_head(&buf) {
                break head;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            let read = match (misbehaviour, buf.is_empty()) {
                (Some(m), true) => {
                    match tokio::time::timeout(idle, read_more(&mut s, &mut buf)).await {
                        Ok(read) => read,
                        Err(_) => return misbehave(s, shared, m, &who).await,
                    }
                }
                _ => read_more(&mut s, &mut buf).await,
            };
            if !read {
                return;
            }
        };
        buf.drain(..head.len);
        let Some(body) = read_body(&mut s, &mut buf, &head.framing).await else {
            return;
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let close = head.close || rng.random_range(0..100u32) < 3;
        let answer = answer(&head, &body, &who, close, &mut rng);
        for piece in answer {
            if s.write_all(&piece).await.is_err() {
                return;
            }
        }
        if close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// The response to `head`, in the pieces to write one by one.
fn answer(head: &Head, body: &[u8], who: &str, close: bool, rng: &mut StdRng) -> Vec<Vec<u8>> {
    let text = echo_body(&head.id, &head.path, &head.method, body).into_bytes();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\n{ECHO_HEADER}: {}\r\n{BACKEND_HEADER}: {who}\r\n",
        head.id
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    let bodiless = head.method == "HEAD";
    if rng.random_bool(0.5) {
        out.push_str(&format!("Content-Length: {}\r\n\r\n", text.len()));
        let mut whole = out.into_bytes();
        if bodiless {
            return vec![whole];
        }
        whole.extend_from_slice(&text);
        // One write, or two split anywhere.
        if rng.random_bool(0.5) {
            return vec![whole];
        }
        let at = rng.random_range(1..whole.len());
        let rest = whole.split_off(at);
        return vec![whole, rest];
    }
    out.push_str("Transfer-Encoding: chunked\r\n\r\n");
    let mut pieces = vec![out.into_bytes()];
    if bodiless {
        return pieces;
    }
    let chunks = rng.random_range(1..=4usize).min(text.len());
    let mut start = 0;
    for i in 0..chunks {
        let end = if i + 1 == chunks {
            text.len()
        } else {
            rng.random_range(start + 1..=text.len() - (chunks - 1 - i))
        };
        let mut chunk = format!("{:x}\r\n", end - start).into_bytes();
        chunk.extend_from_slice(&text[start..end]);
        chunk.extend_from_slice(b"\r\n");
        pieces.push(chunk);
        start = end;
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    pieces
}

/// Closes an idle connection (after a stray 408 for [`Misbehaviour::Stray408`]), then lingers,
/// recording the requests that crossed the close on the wire.
async fn misbehave(mut s: TcpStream, shared: &Shared, m: Misbehaviour, who: &str) {
    match m {
        Misbehaviour::Closed => shared.counters.idle_closes.fetch_add(1, Ordering::Relaxed),
        Misbehaviour::Stray408 => {
            let stray = format!("{STRAY_408}{STRAY_HEADER}: {who}\r\n\r\n");
            if s.write_all(stray.as_bytes()).await.is_err() {
                return;
            }
            shared.counters.stray_408s.fetch_add(1, Ordering::Relaxed)
        }
    };
    let _ = s.shutdown().await;
    let since = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(LINGER, async {
        while read_more(&mut s, &mut buf).await {
            while let Some(head) = parse_head(&buf) {
                buf.drain(..head.len);
                record(shared, m, head.id, since.elapsed());
            }
        }
    })
    .await;
}

fn record(shared: &Shared, after: Misbehaviour, id: String, delay: Duration) {
    if let Some(path) = &shared.race_file {
        let line = format!(
            "{id} {} {} {}\n",
            shared.name,
            after.as_str(),
            delay.as_micros()
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
    shared.raced.lock().unwrap().push(Raced {
        id,
        backend: shared.name.clone(),
        after,
        delay,
    });
}
