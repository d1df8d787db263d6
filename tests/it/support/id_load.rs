//! The soak's clients: HTTP/1.1 keep-alive and HTTP/2 (prior knowledge) clients whose every
//! request carries a unique id, each answer judged against its own request as the echo backend
//! (`support::echo`) answers it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rand::rngs::StdRng;
use rand::RngExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// HTTP/1.1 keep-alive and HTTP/2 (prior knowledge) clients sending GET, HEAD and POST requests
/// to the echo backends (`support::echo`) through the proxy at `addr`, each with a unique id, and
/// judging each response against its own request: the soak's load.
///
/// Clients run in bursts: one HTTP/1.1 client and the first stream of each HTTP/2 connection
/// send all the time, the others only while `bursts` says so, so the proxy's pools fill in a
/// burst, idle in the lull between (when the backends close or 408 idle connections) and are
/// reused in the next.
pub struct IdLoad {
    stop: CancellationToken,
    tasks: JoinSet<Tally>,
    pub live: Arc<Live>,
}

/// Counts while the load runs, for progress lines.
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
}

/// How a load is made up.
#[derive(Debug, Clone, Copy)]
pub struct IdLoadShape {
    pub h1_clients: usize,
    pub h2_connections: usize,
    pub h2_streams: usize,
}

/// A request as sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: String,
    pub method: http::Method,
    pub path: String,
    pub body: Bytes,
}

/// What one request ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 200 with its own id, path and body.
    Ok,
    /// 200 carrying another request's id or body, or an answer no backend sends: it reached a
    /// request it does not belong to.
    Wrong(String),
    /// A stray 408 (the backend's `x-stray-from` given): wrong, unless the request provably
    /// crossed the backend's 408 on the wire.
    Stray408(String),
    /// A 200 head from `backend` whose body failed: wrong, unless that backend was killed.
    Cut { backend: String, error: String },
    /// svcd's own 502/503/504, or no response head: a lost request.
    Lost(String),
    /// No answer within [`ANSWER_WITHIN`].
    Hung,
}

/// Longer than svcd's request timeout (15 s): a request that takes this long was dropped.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// One request whose verdict was not `Ok`.
#[derive(Debug, Clone)]
pub struct Judged {
    pub client: String,
    /// When it was sent, and how long after the load started.
    pub at: Instant,
    pub sent_at: Duration,
    pub sent: Sent,
    pub verdict: Verdict,
}

/// What a load's clients saw: counts by `protocol method outcome`, the requests that were not
/// `Ok`, and the backends (incarnations) that answered.
#[derive(Debug, Default)]
pub struct Tally {
    pub counts: BTreeMap<String, u64>,
    pub not_ok: Vec<Judged>,
    pub backends: BTreeSet<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.counts {
            *self.counts.entry(k).or_default() += v;
        }
        self.not_ok.extend(other.not_ok);
        self.backends.extend(other.backends);
    }

    /// Requests of `method` with this `outcome` (`ok`, `lost`, …), on either protocol.
    pub fn count(&self, method: &str, outcome: &str) -> u64 {
        self.counts
            .iter()
            .filter(|(k, _)| {
                let mut w = k.split(' ').skip(1);
                w.next() == Some(method) && w.next() == Some(outcome)
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// Judges the answer to `sent`: status, head and body (or the body's failure).
pub fn judge(
    sent: &Sent,
    status: http::StatusCode,
    headers: &http::HeaderMap,
    body: Result<Bytes, String>,
) -> Verdict {
    use super::echo::{echo_body, BACKEND_HEADER, ECHO_HEADER, STRAY_HEADER};
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let backend = header(BACKEND_HEADER);
    match status.as_u16() {
        200 => {
            let echoed = header(ECHO_HEADER);
            if echoed != sent.id {
                return Verdict::Wrong(format!("200 carrying id {echoed:?} (from {backend:?})"));
            }
            let body = match body {
                Ok(b) => b,
                Err(error) => return Verdict::Cut { backend, error },
            };
            let want = if sent.method == http::Method::HEAD {
                String::new()
            } else {
                echo_body(&sent.id, &sent.path, sent.method.as_str(), &sent.body)
            };
            if body != want.as_bytes() {
                let got = String::from_utf8_lossy(&body);
                let got: String = got.chars().take(160).collect();
                return Verdict::Wrong(format!("200 from {backend:?} with body {got:?}"));
            }
            Verdict::Ok
        }
        408 => Verdict::Stray408(header(STRAY_HEADER)),
        s @ (502..=504) => Verdict::Lost(format!("{s} from svcd")),
        s => Verdict::Wrong(format!("status {s} (from {backend:?})")),
    }
}

impl IdLoad {
    /// Starts the clients; request ids are `<tag>-<protocol>-<n>`.
    pub fn start(
        addr: SocketAddr,
        tag: &'static str,
        shape: IdLoadShape,
        bursts: watch::Receiver<bool>,
        seed: u64,
    ) -> IdLoad {
        let stop = CancellationToken::new();
        let live = Arc::new(Live::default());
        let ids = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        let client = |name: String, steady: bool, n: u64| IdClient {
            name,
            tag,
            ids: ids.clone(),
            live: live.clone(),
            bursts: bursts.clone(),
            steady,
            stop: stop.clone(),
            rng: rand::SeedableRng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            started,
            tally: Tally::default(),
        };
        for i in 0..shape.h1_clients {
            let c = client(format!("{tag} h1 client {i}"), i == 0, i as u64);
            tasks.spawn(h1_client(addr, c));
        }
        for i in 0..shape.h2_connections {
            let streams = (0..shape.h2_streams)
                .map(|s| {
                    let n = 1000 + (i * shape.h2_streams + s) as u64;
                    client(format!("{tag} h2 connection {i} stream {s}"), s == 0, n)
                })
                .collect();
            tasks.spawn(h2_connection(addr, streams));
        }
        IdLoad { stop, tasks, live }
    }

    /// Stops every client (each ends its request in flight) and returns what they saw.
    pub async fn finish(mut self) -> Tally {
        self.stop.cancel();
        let mut all = Tally::default();
        while let Some(t) = self.tasks.join_next().await {
            all.merge(t.expect("load client"));
        }
        all
    }
}

/// One client's state (an HTTP/1.1 connection, or one stream loop of an HTTP/2 one).
struct IdClient {
    name: String,
    tag: &'static str,
    ids: Arc<AtomicU64>,
    live: Arc<Live>,
    bursts: watch::Receiver<bool>,
    /// Sends in the lulls too.
    steady: bool,
    stop: CancellationToken,
    rng: StdRng,
    started: Instant,
    tally: Tally,
}

impl IdClient {
    /// Waits for a burst (a steady client does not); false once stopped.
    async fn wait_turn(&mut self) -> bool {
        if !self.steady {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                r = self.bursts.wait_for(|on| *on) => if r.is_err() { return false },
            }
        }
        !self.stop.is_cancelled()
    }

    /// The next request: GET (60 %), HEAD (15 %) or POST with a body of up to 3 kB (25 %).
    fn next_request(
        &mut self,
        proto: &str,
        uri_prefix: &str,
    ) -> (Sent, http::Request<Full<Bytes>>) {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{proto}-{n}", self.tag);
        let path = format!("/soak/{id}");
        let roll = self.rng.random_range(0..100u32);
        let (method, body) = match roll {
            0..60 => (http::Method::GET, Bytes::new()),
            60..75 => (http::Method::HEAD, Bytes::new()),
            _ => {
                let pad = "p".repeat(self.rng.random_range(0..3000usize));
                (http::Method::POST, format!("post-{id}-{pad}").into())
            }
        };
        let req = http::Request::builder()
            .method(method.clone())
            .uri(format!("{uri_prefix}{path}"))
            .header("host", "web")
            .header(super::echo::ID_HEADER, &id)
            .body(Full::new(body.clone()))
            .expect("request");
        (
            Sent {
                id,
                method,
                path,
                body,
            },
            req,
        )
    }

    /// Records the verdict on `sent` (sent at `at`).
    fn record(
        &mut self,
        proto: &str,
        sent: Sent,
        at: Instant,
        verdict: Verdict,
        backend: Option<String>,
    ) {
        self.live.sent.fetch_add(1, Ordering::Relaxed);
        let outcome = match &verdict {
            Verdict::Ok => "ok",
            Verdict::Wrong(_) => "wrong",
            Verdict::Stray408(_) => "stray408",
            Verdict::Cut { .. } => "cut",
            Verdict::Lost(_) => "lost",
            Verdict::Hung => "hung",
        };
        *self
            .tally
            .counts
            .entry(format!("{proto} {} {outcome}", sent.method))
            .or_default() += 1;
        if let Some(b) = backend {
            self.tally.backends.insert(b);
        }
        if verdict == Verdict::Ok {
            self.live.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.tally.not_ok.push(Judged {
                client: self.name.clone(),
                at,
                sent_at: at - self.started,
                sent,
                verdict,
            });
        }
    }
}

/// The answer to a request sent with `send`, judged; `None` when the request never went out
/// (the connection had closed before it).
async fn judged_answer<F>(sent: &Sent, send: F) -> Option<(Verdict, Option<String>)>
where
    F: std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
{
    let answer = async {
        let r = match send.await {
            Ok(r) => r,
            Err(e) if e.is_canceled() => return None,
            Err(e) => return Some((Verdict::Lost(format!("no response head: {e}")), None)),
        };
        let (parts, body) = r.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string());
        let backend = parts
            .headers
            .get(super::echo::BACKEND_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(' ').next())
            .map(str::to_string);
        Some((judge(sent, parts.status, &parts.headers, body), backend))
    };
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(judged) => judged,
        Err(_) => Some((Verdict::Hung, None)),
    }
}

async fn h1_client(addr: SocketAddr, mut c: IdClient) -> Tally {
    let mut conn: Option<super::proxy::H1> = None;
    while c.wait_turn().await {
        let h1 = match conn.take() {
            Some(h) if !h.is_closed() => conn.insert(h),
            _ => match super::proxy::H1::try_connect(addr).await {
                Ok(h) => conn.insert(h),
                Err(e) => panic!("{}: cannot connect to svcd: {e}", c.name),
            },
        };
        let (sent, req) = c.next_request("h1", "");
        let at = Instant::now();
        match judged_answer(&sent, h1.try_send(req)).await {
            Some((verdict, backend)) => {
                if verdict != Verdict::Ok {
                    conn = None; // a fresh connection after anything unusual
                }
                c.record("h1", sent, at, verdict, backend);
            }
            None => conn = None,
        }
    }
    c.tally
}

/// One HTTP/2 connection with a stream loop per client; reconnects when svcd closes it.
async fn h2_connection(addr: SocketAddr, mut clients: Vec<IdClient>) -> Tally {
    let stop = clients[0].stop.clone();
    let mut tally = Tally::default();
    while !stop.is_cancelled() {
        let (send, conn) = super::proxy::h2_connect::<Full<Bytes>>(addr).await;
        let mut streams = JoinSet::new();
        for c in clients.drain(..) {
            streams.spawn(h2_stream(send.clone(), c));
        }
        drop(send);
        while let Some(done) = streams.join_next().await {
            clients.push(done.expect("h2 stream loop"));
        }
        conn.abort();
    }
    for c in clients {
        tally.merge(c.tally);
    }
    tally
}

/// Requests one after another on a stream of `send`'s connection, until stopped or the
/// connection closes.
async fn h2_stream(
    mut send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    mut c: IdClient,
) -> IdClient {
    while c.wait_turn().await {
        if send.ready().await.is_err() {
            break;
        }
        let (sent, req) = c.next_request("h2", "http://web");
        let at = Instant::now();
        match judged_answer(&sent, send.send_request(req)).await {
            Some((verdict, backend)) => c.record("h2", sent, at, verdict, backend),
            None => break,
        }
        if send.is_closed() {
            break;
        }
    }
    c
}
