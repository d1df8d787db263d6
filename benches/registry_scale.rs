//! Registry at scale against a real etcd (started here on free ports):
//!
//! 1. initial sync of 100k endpoints in 10k services → published snapshot (median of 5);
//! 2. churn at 1,000 changes/s for 10 s against those 100k: put → visible latency p50/p99;
//! 3. resident memory of a whole `svcd run` daemon holding the 100k-endpoint snapshot (after the
//!    readiness polling, which scrapes `/metrics`), the time and size of a scrape, and the memory
//!    30 more scrapes leave behind;
//! 4. `svcd exec` child SIGKILLed → gone from another daemon's snapshot, p50/p99 of 30.
//!
//! Run: `cargo bench --bench registry_scale` (needs etcd: `scripts/setup --with-etcd`).

#[allow(dead_code)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use svcd_config::EtcdConfig;
use svcd_registry::{run_sync, EtcdStore, SnapshotPublisher, SnapshotReader, Store, SyncOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use support::daemon::{Daemon, ExecJob};
use support::etcd::Etcd;

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn key(service: usize, instance: usize) -> String {
    format!("/svcd/v1/endpoints/default/svc-{service}/inst-{instance}")
}

fn value(service: usize, instance: usize, seq: u64) -> String {
    format!(
        r#"{{"ip":"10.{}.{}.{}","ports":{{"http":8080,"grpc":9090}},"node":"node-{}","protocol":"http","meta":{{"seq":"{seq}"}}}}"#,
        service / 256 % 256,
        service % 256,
        instance % 250 + 1,
        service % 50
    )
}

async fn load(etcd: &Etcd) {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let mut client = etcd.client().await;
        tasks.spawn(async move {
            for s in (worker..SERVICES).step_by(16) {
                let ops: Vec<TxnOp> = (0..PER_SERVICE)
                    .map(|i| TxnOp::put(key(s, i), value(s, i, 0), None))
                    .collect();
                client
                    .txn(Txn::new().and_then(ops))
                    .await
                    .expect("load txn");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    eprintln!(
        "loaded {} endpoints in {:.1?}",
        SERVICES * PER_SERVICE,
        started.elapsed()
    );
}

struct Sync {
    snapshot: SnapshotReader,
    changes: watch::Receiver<i64>,
    cancel: CancellationToken,
}

fn start_sync(store: Arc<dyn Store>) -> Sync {
    let cancel = CancellationToken::new();
    let publisher = Arc::new(SnapshotPublisher::detached());
    let snapshot = publisher.reader();
    let changes = snapshot.changes();
    tokio::spawn(run_sync(
        store,
        publisher,
        SyncOptions::default(),
        cancel.clone(),
    ));
    Sync {
        snapshot,
        changes,
        cancel,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn initial_sync(store: Arc<dyn Store>) -> Duration {
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut sync = start_sync(store.clone());
        sync.changes.changed().await.expect("first publish");
        times.push(started.elapsed());
        assert_eq!(
            sync.snapshot.load().endpoint_count(),
            SERVICES * PER_SERVICE
        );
        sync.cancel.cancel();
    }
    times.sort();
    eprintln!(
        "initial sync runs: {:?}",
        times.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    times[2]
}

/// (service, instance) → (latest seq written, when its put was sent).
type Pending = HashMap<(usize, usize), (u64, Instant)>;

async fn churn(etcd: &Etcd, store: Arc<dyn Store>) -> Vec<Duration> {
    let mut sync = start_sync(store);
    sync.changes.changed().await.expect("first publish");
    let pending: Arc<Mutex<Pending>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let observer = {
        let (pending, latencies, snapshot) =
            (pending.clone(), latencies.clone(), sync.snapshot.clone());
        let mut changes = sync.changes.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let snap = snapshot.load();
                let now = Instant::now();
                let mut pending = pending.lock().unwrap();
                pending.retain(|(s, i), (seq, sent)| {
                    let visible = snap
                        .service("default", &format!("svc-{s}"))
                        .and_then(|svc| {
                            svc.all
                                .iter()
                                .find(|e| *e.id == *format!("inst-{i}"))
                                .cloned()
                        })
                        .is_some_and(|e| {
                            e.meta("seq").and_then(|v| v.parse::<u64>().ok()) >= Some(*seq)
                        });
                    if visible {
                        latencies.lock().unwrap().push(now - *sent);
                    }
                    !visible
                });
            }
        })
    };
    let client = etcd.client().await;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let started = Instant::now();
    let mut seq = 0u64;
    let mut writers = tokio::task::JoinSet::new();
    while started.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        seq += 1;
        let (s, i) = ((seq as usize * 7919) % SERVICES, seq as usize % PER_SERVICE);
        let mut client = client.clone();
        let pending = pending.clone();
        writers.spawn(async move {
            let sent = Instant::now();
            pending.lock().unwrap().insert((s, i), (seq, sent));
            client
                .put(key(s, i), value(s, i, seq), None)
                .await
                .expect("churn put");
        });
        while writers.try_join_next().is_some() {}
    }
    while writers.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pending.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let missing = pending.lock().unwrap().len();
    sync.cancel.cancel();
    observer.abort();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    eprintln!(
        "churn: {} changes in {:.1?} ({:.0}/s), {missing} not seen",
        seq,
        started.elapsed(),
        seq as f64 / started.elapsed().as_secs_f64()
    );
    l
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

fn etcd_config(endpoint: &str) -> String {
    format!("[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

async fn exec_kill_latency(a: &Daemon, b: &Daemon, rounds: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for round in 0..rounds {
        let id = format!("job-{round}");
        let mut job = ExecJob::start(a, &id);
        b.wait_instances("default", "job", &[id.as_str()], Duration::from_secs(10))
            .await;
        let killed = Instant::now();
        job.kill_child().await;
        loop {
            if b.instance_ids("default", "job").await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(killed.elapsed());
        job.exec.wait().expect("exec exits");
    }
    out.sort();
    out
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("registry_scale: run with `cargo bench --bench registry_scale`");
        return;
    }
    let etcd = Etcd::start().await;

    // Baseline memory of an empty daemon, for context.
    let empty = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let empty_rss = rss_kib(empty.pid().as_raw() as u32);
    drop(empty);

    load(&etcd).await;
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(5),
        username: None,
        password: None,
        password_file: None,
        tls: None,
    };
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&config).await.expect("etcd store"));

    let sync_median = initial_sync(store.clone()).await;
    let churn_latencies = churn(&etcd, store.clone()).await;

    let a = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    support::eventually(
        Duration::from_secs(30),
        "daemon to hold 100k endpoints",
        || async {
            (b.metric("svcd_registry_endpoints").await == Some((SERVICES * PER_SERVICE) as f64))
                .then_some(())
        },
    )
    .await;
    let full_rss = rss_kib(b.pid().as_raw() as u32);
    // Prometheus scraping the daemon: 30 scrapes, each timed; RSS after them.
    let mut scrapes = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..30 {
        let started = Instant::now();
        let body = b.get("/metrics").await.body;
        scrapes.push(started.elapsed());
        scrape_bytes = body.len();
        assert!(body.contains("svcd_service_endpoints{"));
    }
    scrapes.sort();
    let scraped_rss = rss_kib(b.pid().as_raw() as u32);
    let exec_latencies = exec_kill_latency(&a, &b, 30).await;

    println!();
    println!(
        "registry_scale ({} endpoints in {} services, etcd 3.4 on loopback)",
        SERVICES * PER_SERVICE,
        SERVICES
    );
    println!("{:<52} {:>12} {:>12}", "measure", "result", "target");
    println!(
        "{:<52} {:>12} {:>12}",
        "initial sync → published snapshot (median of 5)",
        ms(sync_median),
        "< 2000 ms"
    );
    println!(
        "{:<52} {:>12} {:>12}",
        format!(
            "churn put → visible p50 ({} samples)",
            churn_latencies.len()
        ),
        ms(percentile(&churn_latencies, 0.5)),
        ""
    );
    println!(
        "{:<52} {:>12} {:>12}",
        "churn put → visible p99",
        ms(percentile(&churn_latencies, 0.99)),
        "< 50 ms"
    );
    println!(
        "{:<52} {:>12} {:>12}",
        "churn put → visible max",
        ms(*churn_latencies.last().unwrap()),
        ""
    );
    println!(
        "{:<52} {:>9} MiB {:>12}",
        "daemon RSS, empty registry",
        empty_rss / 1024,
        ""
    );
    println!(
        "{:<52} {:>9} MiB {:>12}",
        "daemon RSS holding 100k endpoints",
        full_rss / 1024,
        "< 100 MB"
    );
    println!(
        "{:<52} {:>12} {:>12}",
        format!("scrape /metrics median of 30 ({} KiB)", scrape_bytes / 1024),
        ms(percentile(&scrapes, 0.5)),
        "< 100 ms"
    );
    println!(
        "{:<52} {:>9} MiB {:>12}",
        "daemon RSS after 30 more scrapes",
        scraped_rss / 1024,
        "< 100 MB"
    );
    println!(
        "{:<52} {:>9} MiB {:>12}",
        "RSS retained by those scrapes",
        scraped_rss.saturating_sub(full_rss) / 1024,
        "< 5 MB"
    );
    println!(
        "{:<52} {:>12} {:>12}",
        "exec child SIGKILL → gone on other daemon p50 (30)",
        ms(percentile(&exec_latencies, 0.5)),
        ""
    );
    println!(
        "{:<52} {:>12} {:>12}",
        "exec child SIGKILL → gone on other daemon p99 (30)",
        ms(percentile(&exec_latencies, 0.99)),
        "< 250 ms"
    );
}
