//! Registry at scale against a real etcd (started here on free ports). One summary line per
//! figure, with its target:
//!
//! 1. initial sync of the whole registry → published snapshot, in process (median of 5, or of 3
//!    above 200k endpoints);
//! 2. churn against it: puts at a fixed rate, put → visible latency p50/p99;
//! 3. a fresh `svcd run` daemon: start → `/readyz` 200 (synced and serving), its RSS, the time
//!    and size of a `/metrics` scrape and the RSS after 30 scrapes;
//! 4. DNS qps for one name (dnsperf) on that daemon against a daemon whose registry holds 1,000
//!    endpoints, rounds alternating;
//! 5. `svcd exec` child SIGKILLed → gone from another daemon's snapshot, p50/p99 of 30.
//!
//! Run: `cargo bench --bench registry_scale [-- --endpoints N --per-service K --churn-rate R
//! --churn-secs S]` (defaults 100,000 endpoints, 10 per service, 1,000 changes/s for 10 s).
//! Needs etcd (`scripts/setup --with-etcd`) and dnsperf (`apt-get install dnsperf`).

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

use support::daemon::{http, Daemon, ExecJob};
use support::etcd::Etcd;

/// What to measure, from the command line.
#[derive(Clone, Copy)]
struct Scale {
    endpoints: usize,
    per_service: usize,
    churn_rate: u64,
    churn_secs: u64,
}

impl Scale {
    fn from_args() -> Scale {
        let mut scale = Scale {
            endpoints: 100_000,
            per_service: 10,
            churn_rate: 1_000,
            churn_secs: 10,
        };
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| -> Option<u64> {
            let at = args.iter().position(|a| a == name)?;
            let v = args
                .get(at + 1)
                .unwrap_or_else(|| panic!("{name} needs a value"));
            Some(
                v.replace('_', "")
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: not a count: {v}")),
            )
        };
        if let Some(v) = value("--endpoints") {
            scale.endpoints = v as usize;
        }
        if let Some(v) = value("--per-service") {
            scale.per_service = v as usize;
        }
        if let Some(v) = value("--churn-rate") {
            scale.churn_rate = v;
        }
        if let Some(v) = value("--churn-secs") {
            scale.churn_secs = v;
        }
        assert!(scale.per_service > 0 && scale.endpoints >= scale.per_service);
        scale
    }

    fn services(&self) -> usize {
        self.endpoints / self.per_service
    }
}

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

/// Loads `services × per_service` endpoints, 120 puts a transaction (etcd allows 128).
async fn load(etcd: &Etcd, services: usize, per_service: usize) {
    let started = Instant::now();
    let per_txn = (120 / per_service).max(1);
    let batches: Vec<(usize, usize)> = (0..services)
        .step_by(per_txn)
        .map(|s| (s, (s + per_txn).min(services)))
        .collect();
    let batches = Arc::new(batches);
    let mut tasks = tokio::task::JoinSet::new();
    const WORKERS: usize = 8;
    for worker in 0..WORKERS {
        let mut client = etcd.client().await;
        let batches = batches.clone();
        tasks.spawn(async move {
            for &(from, to) in batches.iter().skip(worker).step_by(WORKERS) {
                let ops: Vec<TxnOp> = (from..to)
                    .flat_map(|s| (0..per_service).map(move |i| (s, i)))
                    .map(|(s, i)| TxnOp::put(key(s, i), value(s, i, 0), None))
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
        services * per_service,
        started.elapsed()
    );
}

struct Sync {
    publisher: Arc<SnapshotPublisher>,
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
        publisher.clone(),
        SyncOptions::default(),
        cancel.clone(),
    ));
    Sync {
        publisher,
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

async fn initial_sync(store: Arc<dyn Store>, scale: Scale) -> Duration {
    let runs = if scale.endpoints > 200_000 { 3 } else { 5 };
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut sync = start_sync(store.clone());
        sync.changes.changed().await.expect("first publish");
        times.push(started.elapsed());
        assert_eq!(sync.snapshot.load().endpoint_count(), scale.endpoints);
        sync.cancel.cancel();
    }
    times.sort();
    eprintln!(
        "initial sync runs: {:?}",
        times.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    times[runs / 2]
}

/// A change in flight: the latest seq written to an instance, when its transaction was sent
/// and when etcd answered it (committed).
struct InFlight {
    seq: u64,
    sent: Instant,
    committed: Option<Instant>,
}

/// service → instance → the change in flight.
type Pending = HashMap<usize, HashMap<usize, InFlight>>;

/// Put → visible latencies, and commit → visible (svcd's share: the watch event leaves etcd
/// after the commit).
#[derive(Default)]
struct Seen {
    put: Vec<Duration>,
    commit: Vec<Duration>,
}

/// What a churn run measured, each sorted.
struct Churn {
    /// svcd's share from its own histogram: (mean, p50 bucket bound, p99 bucket bound).
    event_to_publish: (Duration, Duration, Duration),
    put_visible: Vec<Duration>,
    commit_visible: Vec<Duration>,
    txn_round_trips: Vec<Duration>,
    rate: f64,
}

/// Puts at `churn_rate` for `churn_secs` in 1 ms transactions and measures when each change
/// becomes visible in the snapshot. The observer looks only at the services each publish
/// changed, so the harness costs little next to what it measures.
async fn churn(etcd: &Etcd, store: Arc<dyn Store>, scale: Scale) -> Churn {
    let mut sync = start_sync(store);
    sync.changes.changed().await.expect("first publish");
    let pending: Arc<Mutex<Pending>> = Arc::default();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let observer = {
        let (pending, seen, snapshot) = (pending.clone(), seen.clone(), sync.snapshot.clone());
        let mut changes = sync.changes.clone();
        tokio::spawn(async move {
            let mut previous = snapshot.load_full();
            while changes.changed().await.is_ok() {
                let snap = snapshot.load_full();
                let now = Instant::now();
                let mut pending = pending.lock().unwrap();
                let mut seen = seen.lock().unwrap();
                for name in snap.changed_since(&previous) {
                    let Some(s) = name
                        .strip_prefix("svc-")
                        .and_then(|n| n.strip_suffix(".default"))
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let (Some(waiting), Some(svc)) =
                        (pending.get_mut(&s), snap.service_by_name(name))
                    else {
                        continue;
                    };
                    for e in svc.all.iter() {
                        let Some(i) = e.id.strip_prefix("inst-").and_then(|i| i.parse().ok())
                        else {
                            continue;
                        };
                        let Some(change) = waiting.get(&i) else {
                            continue;
                        };
                        if e.meta("seq").and_then(|v| v.parse::<u64>().ok()) >= Some(change.seq) {
                            seen.put.push(now - change.sent);
                            seen.commit
                                .push(change.committed.map_or(Duration::ZERO, |c| now - c));
                            waiting.remove(&i);
                        }
                    }
                    if waiting.is_empty() {
                        pending.remove(&s);
                    }
                }
                previous = snap;
            }
        })
    };
    let client = etcd.client().await;
    // How long etcd took to answer each transaction: the part of put → visible that is not svcd.
    let commits: Arc<Mutex<Vec<Duration>>> = Arc::default();
    // Every millisecond, the changes due by then go out as one transaction (at 10,000/s, ten
    // puts): one put per request would measure etcd's request rate on two cores, not svcd. At
    // most 64 transactions are in flight; past that a tick's changes wait for the next.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let duration = Duration::from_secs(scale.churn_secs);
    let started = Instant::now();
    let mut seq = 0u64;
    let mut writers = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        while writers.try_join_next().is_some() {}
        if writers.len() >= 64 {
            continue;
        }
        let due = (started.elapsed().as_secs_f64() * scale.churn_rate as f64) as u64;
        let mut ops = Vec::new();
        let mut batch = Vec::new();
        while seq < due && ops.len() < 120 {
            seq += 1;
            let (s, i) = (
                (seq as usize * 7919) % scale.services(),
                seq as usize % scale.per_service,
            );
            ops.push(TxnOp::put(key(s, i), value(s, i, seq), None));
            batch.push(((s, i), seq));
        }
        if ops.is_empty() {
            continue;
        }
        let mut client = client.clone();
        let (pending, commits) = (pending.clone(), commits.clone());
        writers.spawn(async move {
            let sent = Instant::now();
            {
                let mut pending = pending.lock().unwrap();
                for &((s, i), seq) in &batch {
                    let change = InFlight {
                        seq,
                        sent,
                        committed: None,
                    };
                    pending.entry(s).or_default().insert(i, change);
                }
            }
            client
                .txn(Txn::new().and_then(ops))
                .await
                .expect("churn txn");
            let committed = Instant::now();
            commits.lock().unwrap().push(committed - sent);
            let mut pending = pending.lock().unwrap();
            for ((s, i), seq) in batch {
                if let Some(change) = pending.get_mut(&s).and_then(|w| w.get_mut(&i)) {
                    if change.seq == seq {
                        change.committed = Some(committed);
                    }
                }
            }
        });
    }
    let rate = seq as f64 / started.elapsed().as_secs_f64();
    while writers.join_next().await.is_some() {}
    // Waits for the last changes (up to 60 s: a saturated etcd delivers watch events late) and
    // says how many were still waiting after 5 s and when the last arrived, so a lag is told
    // from a loss.
    let writes_done = Instant::now();
    let waiting = || -> usize { pending.lock().unwrap().values().map(HashMap::len).sum() };
    let mut after_5s = None;
    while waiting() > 0 && writes_done.elapsed() < Duration::from_secs(60) {
        if after_5s.is_none() && writes_done.elapsed() >= Duration::from_secs(5) {
            after_5s = Some(waiting());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let missing = waiting();
    eprintln!(
        "churn: {} changes still waiting 5 s after the last write, {missing} after {:.1?}",
        after_5s.unwrap_or(0),
        writes_done.elapsed()
    );
    sync.cancel.cancel();
    observer.abort();
    let event_to_publish = histogram_summary(&sync.publisher.metrics.event_to_publish_seconds);
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut txn_round_trips = commits.lock().unwrap().clone();
    for l in [&mut seen.put, &mut seen.commit, &mut txn_round_trips] {
        l.sort();
    }
    eprintln!(
        "churn: {seq} changes in {:.1?} ({rate:.0}/s), {missing} not seen",
        started.elapsed(),
    );
    Churn {
        event_to_publish,
        put_visible: seen.put,
        commit_visible: seen.commit,
        txn_round_trips,
        rate,
    }
}

/// Mean, and the upper bounds of the buckets holding the 50th and 99th percentiles.
fn histogram_summary(h: &prometheus::Histogram) -> (Duration, Duration, Duration) {
    use prometheus::core::Collector;
    let family = h.collect();
    let m = family[0].get_metric()[0].get_histogram();
    let count = m.get_sample_count().max(1);
    let bound = |q: f64| {
        let want = (count as f64 * q).ceil() as u64;
        m.get_bucket()
            .iter()
            .find(|b| b.cumulative_count() >= want)
            .map_or(f64::INFINITY, |b| b.upper_bound())
    };
    let secs = |s: f64| Duration::from_secs_f64(s.min(3600.0));
    (
        secs(m.get_sample_sum() / count as f64),
        secs(bound(0.5)),
        secs(bound(0.99)),
    )
}

fn etcd_config(endpoint: &str) -> String {
    format!("[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

/// Starts `svcd run` against `endpoint` at warn level (debug logging of the registry would be
/// the bulk of the work at this scale) and returns it with the time from spawn to `/readyz`
/// 200, which the daemon answers once the registry is synced and DNS and the proxies serve.
async fn start_timed(endpoint: &str) -> (Daemon, Duration) {
    let started = Instant::now();
    let d = Daemon::spawn(&etcd_config(endpoint), &[("SVCD_LOG_LEVEL", "warn")]);
    support::eventually(Duration::from_secs(180), "svcd /readyz", || async {
        let r = http(d.admin, "GET", "/readyz", None).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    (d, started.elapsed())
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

/// dnsperf's queries per second for `name` A on `server`, 5 s (16 clients, 200 outstanding, as
/// benches/dns/qps.sh).
async fn dnsperf_qps(server: std::net::SocketAddr, name: &str) -> f64 {
    let queries = tempfile::NamedTempFile::new().expect("queries file");
    std::fs::write(queries.path(), format!("{name} A\n")).expect("write queries");
    let out = tokio::process::Command::new("dnsperf")
        .args([
            "-s",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-d")
        .arg(queries.path())
        .args(["-l", "5", "-c", "16", "-q", "200", "-T", "1"])
        .output()
        .await
        .expect("dnsperf (apt-get install dnsperf)");
    let text = String::from_utf8_lossy(&out.stdout);
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("dnsperf output without a qps:\n{text}"));
    let lost = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or("?");
    eprintln!("dnsperf {server}: {qps:.0} qps, lost {}", lost.trim());
    qps
}

/// The median qps for one name on `big` and on `small` over 3 alternating rounds.
async fn dns_qps(big: &Daemon, small: &Daemon, name: &str) -> (f64, f64) {
    for d in [big, small] {
        support::eventually(Duration::from_secs(10), "name answered", || async {
            let r = support::dns::udp(
                d.dns,
                &format!("{name}."),
                hickory_proto::rr::RecordType::A,
                None,
            )
            .await;
            (!r.answers.is_empty()).then_some(())
        })
        .await;
    }
    let (mut b, mut s) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        b.push(dnsperf_qps(big.dns, name).await);
        s.push(dnsperf_qps(small.dns, name).await);
    }
    b.sort_by(f64::total_cmp);
    s.sort_by(f64::total_cmp);
    (b[1], s[1])
}

fn line(measure: impl std::fmt::Display, result: impl std::fmt::Display, target: &str) {
    println!("{measure:<56} {result:>12} {target:>12}");
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("registry_scale: run with `cargo bench --bench registry_scale`");
        return;
    }
    let scale = Scale::from_args();
    let etcd = Etcd::start().await;

    // Baseline memory of an empty daemon, for context.
    let (empty, _) = start_timed(&etcd.endpoint()).await;
    let empty_rss = empty.rss_kib();
    drop(empty);

    load(&etcd, scale.services(), scale.per_service).await;
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

    let sync_median = initial_sync(store.clone(), scale).await;
    let churned = churn(&etcd, store.clone(), scale).await;

    let (b, ready) = start_timed(&etcd.endpoint()).await;
    let ready_rss = b.rss_kib();
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
    let scraped_rss = b.rss_kib();

    // DNS for one name while holding the whole registry, against a registry of 1,000.
    let small_etcd = Etcd::start().await;
    load(&small_etcd, 1_000 / scale.per_service, scale.per_service).await;
    let (small, _) = start_timed(&small_etcd.endpoint()).await;
    let (big_qps, small_qps) = dns_qps(&b, &small, "svc-7.default.svc.cluster.local").await;
    drop(small);

    let (a, _) = start_timed(&etcd.endpoint()).await;
    let exec_latencies = exec_kill_latency(&a, &b, 30).await;

    let n = scale.endpoints;
    println!();
    println!(
        "registry_scale ({n} endpoints in {} services, etcd 3.4 on loopback)",
        scale.services()
    );
    line("measure", "result", "target");
    line(
        "initial sync → published snapshot (median)",
        ms(sync_median),
        if n >= 1_000_000 {
            "< 10000 ms"
        } else {
            "< 2000 ms"
        },
    );
    let churn_line = |what: &str, l: &[Duration], target: &str| {
        line(format!("churn {what} p50"), ms(percentile(l, 0.5)), "");
        line(format!("churn {what} p99"), ms(percentile(l, 0.99)), target);
    };
    line(
        format!(
            "churn: {:.0} changes/s for {} s",
            churned.rate, scale.churn_secs
        ),
        format!("{} seen", churned.put_visible.len()),
        "10000/s",
    );
    churn_line("put → visible", &churned.put_visible, "< 50 ms");
    churn_line("commit → visible", &churned.commit_visible, "");
    let (mean, p50, p99) = churned.event_to_publish;
    line(
        "churn event received → published (svcd), mean",
        ms(mean),
        "",
    );
    line(
        "churn event received → published p50 (bucket ≤)",
        ms(p50),
        "",
    );
    line(
        "churn event received → published p99 (bucket ≤)",
        ms(p99),
        "< 50 ms",
    );
    churn_line(
        &format!("etcd txn round trip ({})", churned.txn_round_trips.len()),
        &churned.txn_round_trips,
        "",
    );
    line(
        "fresh svcd run: start → /readyz 200",
        ms(ready),
        if n >= 1_000_000 { "< 10000 ms" } else { "" },
    );
    line(
        "daemon RSS, empty registry",
        format!("{} MiB", empty_rss / 1024),
        "",
    );
    line(
        format!("daemon RSS holding {n} endpoints, ready"),
        format!("{} MiB", ready_rss / 1024),
        "",
    );
    line(
        format!("scrape /metrics median of 30 ({} KiB)", scrape_bytes / 1024),
        ms(percentile(&scrapes, 0.5)),
        if n >= 1_000_000 {
            "< 200 ms"
        } else {
            "< 100 ms"
        },
    );
    line(
        "scrape /metrics size",
        format!("{} KiB", scrape_bytes / 1024),
        "< 10 MB",
    );
    line(
        "daemon RSS after 30 scrapes",
        format!("{} MiB", scraped_rss / 1024),
        if n >= 1_000_000 {
            "< 300 MB"
        } else {
            "< 100 MB"
        },
    );
    line(
        format!("DNS qps, one name, holding {n}"),
        format!("{big_qps:.0}"),
        "",
    );
    line(
        "DNS qps, one name, holding 1000",
        format!("{small_qps:.0}"),
        "",
    );
    line(
        "DNS qps ratio (holding all / holding 1000)",
        format!("{:.2}", big_qps / small_qps),
        ">= 0.90",
    );
    line(
        "exec child SIGKILL → gone on other daemon p50 (30)",
        ms(percentile(&exec_latencies, 0.5)),
        "",
    );
    line(
        "exec child SIGKILL → gone on other daemon p99 (30)",
        ms(percentile(&exec_latencies, 0.99)),
        "< 250 ms",
    );
}
