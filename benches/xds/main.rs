//! xDS at scale (issue #26): N concurrent ADS streams (a light Rust client: tonic and the
//! envoy-types protos), each holding every cluster of a 10k-endpoint registry (1,000 services
//! × 10 instances), against the real svcd binary.
//!
//!   cargo bench --bench xds                       (N = 100 and 1,000; 20 changes each)
//!   XDS_BENCH_STREAMS=100,1000,2000 XDS_BENCH_CHANGES=50 cargo bench --bench xds
//!
//! Per N: a change (one instance re-registered with a new port) → every stream has received
//! and ACKed its push, p50/p99 of each stream's latency and of the slowest stream per change;
//! svcd's RSS per stream (growth of VmRSS over the N streams, opened one after another, divided
//! by N; and the marginal figure, the growth over the last nine tenths divided by their number,
//! which leaves out one-time costs); CPU per push (svcd's user+system time over the changes,
//! divided by changes × N). Targets: p99 < 1 s at 1,000
//! streams, < 50 KiB RSS per stream.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Svcd {
    child: Child,
    admin: SocketAddr,
    xds: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Svcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Svcd {
    fn start(services: usize, per_service: usize) -> Svcd {
        let dir = tempfile::tempdir().unwrap();
        let (admin, dns, http, xds) = (free_port(), free_port(), free_port(), free_port());
        let mut config = format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[dns]\nlisten = [\"127.0.0.1:{dns}\"]\n\
             [[proxy.http]]\nlisten = \"127.0.0.1:{http}\"\n\
             [xds]\nlisten = \"127.0.0.1:{xds}\"\nmax_streams = 100000\n"
        );
        for s in 0..services {
            for i in 0..per_service {
                config.push_str(&format!(
                    "[[registry.static]]\nservice = \"s{s}\"\nid = \"i{i}\"\nip = \"10.{}.{}.{}\"\nports = {{ http = 8080 }}\n",
                    s / 256,
                    s % 256,
                    i + 1
                ));
            }
        }
        let path = dir.path().join("svcd.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_svcd"))
            .args(["run", "--config", path.to_str().unwrap()])
            .env("SVCD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start svcd");
        Svcd {
            child,
            admin: ([127, 0, 0, 1], admin).into(),
            xds,
            _dir: dir,
        }
    }

    fn proc_field(&self, file: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        self.proc_field("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU time, in clock ticks (100 per second).
    fn cpu_ticks(&self) -> u64 {
        let stat = self.proc_field("stat");
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields
            .get(11)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
    }

    async fn put(&self, service: &str, id: &str, body: &str) {
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let req = format!(
            "PUT /v1/services/default/{service}/instances/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
}

fn request(type_url: &str, names: &[String], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.to_vec(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// One stream: subscribes to every cluster and its endpoints, ACKs everything, and reports each
/// EDS push after the initial one (time received).
async fn client(
    channel: Channel,
    names: Arc<Vec<String>>,
    ready: mpsc::Sender<()>,
    pushes: mpsc::UnboundedSender<Instant>,
) {
    let (tx, requests) = mpsc::channel(8);
    tx.send(request(CDS, &[], "", "")).await.unwrap();
    let mut rx = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_aggregated_resources(ReceiverStream::new(requests))
        .await
        .expect("stream")
        .into_inner();
    let mut subscribed = false;
    let mut eds_received = 0;
    while let Ok(Some(r)) = rx.message().await {
        let now = Instant::now();
        let empty = Vec::new();
        let acked: &[String] = if r.type_url == EDS { &names } else { &empty };
        if tx
            .send(request(&r.type_url, acked, &r.version_info, &r.nonce))
            .await
            .is_err()
        {
            return;
        }
        if r.type_url == CDS && !subscribed {
            subscribed = true;
            tx.send(request(EDS, &names, "", "")).await.unwrap();
        } else if r.type_url == EDS {
            // The first push may come in parts: ready once every assignment arrived.
            if eds_received < names.len() {
                eds_received += r.resources.len();
                if eds_received >= names.len() {
                    let _ = ready.send(()).await;
                }
            } else {
                let _ = pushes.send(now);
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(svcd: &Svcd, streams: usize, changes: usize, names: Arc<Vec<String>>) {
    let rss_before = svcd.rss_kib();
    let (ready_tx, mut ready_rx) = mpsc::channel(streams);
    let (push_tx, mut push_rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    // RSS once a tenth of the streams are open: what the rest add is the cost per stream
    // without the one-time costs (allocator arenas, the shared subscription list).
    let mut rss_tenth = rss_before;
    for i in 0..streams {
        if i == streams / 10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_tenth = svcd.rss_kib();
        }
        // One connection per stream, as every Envoy or gRPC client has its own.
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", svcd.xds))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        tasks.push(tokio::spawn(client(
            channel,
            names.clone(),
            ready_tx.clone(),
            push_tx.clone(),
        )));
        // One after another: the RSS measured is what streams hold, not the peak of N initial
        // pushes (~600 KB each here) in flight at once, which the allocator keeps afterwards.
        ready_rx.recv().await.unwrap();
    }
    // Let allocations settle before reading RSS (the streams are idle now).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = svcd.rss_kib();
    let rss_per_stream = rss_after.saturating_sub(rss_before) as f64 / streams as f64;
    let rss_marginal =
        rss_after.saturating_sub(rss_tenth) as f64 / (streams - streams / 10).max(1) as f64;

    let mut each = Vec::new();
    let mut slowest = Vec::new();
    let cpu_before = svcd.cpu_ticks();
    for c in 0..changes {
        let t0 = Instant::now();
        svcd.put(
            "s0",
            "i0",
            &format!(r#"{{"ip":"10.0.0.1","ports":{{"http":{}}}}}"#, 9000 + c),
        )
        .await;
        let mut worst = Duration::ZERO;
        for _ in 0..streams {
            let at = tokio::time::timeout(Duration::from_secs(30), push_rx.recv())
                .await
                .expect("every stream pushed within 30 s")
                .unwrap();
            let d = at.saturating_duration_since(t0);
            worst = worst.max(d);
            each.push(d);
        }
        slowest.push(worst);
    }
    let cpu_ticks = svcd.cpu_ticks() - cpu_before;
    each.sort();
    slowest.sort();
    println!(
        "streams={streams:>5}  change→pushed+ACKed per stream p50={:>8.2?} p99={:>8.2?}  \
         all streams p50={:>8.2?} p99={:>8.2?}  RSS/stream={:>6.1} KiB (marginal {:>5.1} KiB)  \
         CPU/push={:>6.1} µs",
        percentile(&each, 0.5),
        percentile(&each, 0.99),
        percentile(&slowest, 0.5),
        percentile(&slowest, 0.99),
        rss_per_stream,
        rss_marginal,
        cpu_ticks as f64 * 10_000.0 / (changes * streams) as f64,
    );
    for t in tasks {
        t.abort();
    }
}

fn main() {
    // Criterion-style filters (`cargo bench -- NAME`) do not apply: this runs as a whole.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let streams: Vec<usize> = env_or("XDS_BENCH_STREAMS", "100,1000")
        .split(',')
        .map(|s| s.trim().parse().expect("XDS_BENCH_STREAMS: numbers"))
        .collect();
    let changes: usize = env_or("XDS_BENCH_CHANGES", "20").parse().unwrap();
    let services: usize = env_or("XDS_BENCH_SERVICES", "1000").parse().unwrap();
    let per_service: usize = env_or("XDS_BENCH_PER_SERVICE", "10").parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let names: Arc<Vec<String>> = Arc::new(
            (0..services)
                .map(|s| format!("s{s}.default:http"))
                .collect(),
        );
        for n in streams {
            // A fresh daemon per N, so RSS and CPU are this N's alone.
            let svcd = Svcd::start(services, per_service);
            // Ready when one stream sees every cluster.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "svcd did not serve {services} clusters"
                );
                if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{}", svcd.xds))
                    .unwrap()
                    .connect()
                    .await
                {
                    let (tx, requests) = mpsc::channel(1);
                    tx.send(request(CDS, &[], "", "")).await.unwrap();
                    if let Ok(r) = AggregatedDiscoveryServiceClient::new(channel)
                        .max_decoding_message_size(usize::MAX)
                        .stream_aggregated_resources(ReceiverStream::new(requests))
                        .await
                    {
                        let mut rx = r.into_inner();
                        let first: Option<DiscoveryResponse> =
                            tokio::time::timeout(Duration::from_secs(5), rx.message())
                                .await
                                .ok()
                                .and_then(|m| m.ok().flatten());
                        if first.is_some_and(|r| r.resources.len() == services) {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!(
                "svcd: {services} services × {per_service} instances = {} endpoints",
                services * per_service
            );
            run(&svcd, n, changes, names.clone()).await;
        }
    });
}
