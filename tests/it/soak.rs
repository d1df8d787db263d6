//! Differential soak (issue 22): HTTP/1.1 keep-alive and HTTP/2 (h2c) clients send GET, HEAD
//! and POST requests, each with a unique id, through two svcd daemons sharing one etcd — one on
//! the HTTP/1.1 fast path, one with `http1_fast_path = false` (hyper) — to the same echo
//! backends (`support::echo`), which close idle keep-alive connections and write stray 408s on
//! them at random. Two of the five instances run under `svcd exec` (this test binary, in
//! [`exec_backend_process`]) and are SIGKILLed and started again every few seconds; the three
//! others stay up, so some instance is always there. Both daemons reload their config every few
//! seconds (pool limits, idle timeout, balancing).
//!
//! Asserted for each daemon:
//! - every response carries its own request's id (and path and body): zero tolerance. A stray
//!   408 is excused only when the backend saw that very request arrive within `echo::LINGER`
//!   of its 408 (they crossed on the wire, or the proxy's check could not have seen the 408
//!   yet), or when the 408's writer was killed in that time; a cut body only when it came from
//!   an instance that was killed. Each excuse is printed;
//! - no GET or HEAD is lost (svcd retries idempotent requests elsewhere); a POST may get 502
//!   (counted) but never another request's answer; nothing hangs;
//! - after the run, once the instances have gone, svcd's descriptors but those to etcd are back
//!   at their baseline (at most [`ETCD_CONNECTIONS`] to etcd), and its RSS within
//!   [`RSS_GROWTH_KB`] of the baseline.
//!
//! `SVCD_SOAK_SECS` sets the run's length (default 60, at least 20); `SVCD_SOAK_SEED` the seed
//! of every random choice (default: from the clock; printed at the start and in a failure; the
//! timing of a run is not repeatable, its schedule and behaviours are):
//! `SVCD_SOAK_SECS=600 SVCD_SOAK_SEED=7 cargo test --test it -- soak:: --nocapture`.

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::support::daemon::Daemon;
use crate::support::echo::{self, EchoBackend, Misbehaviour, Raced};
use crate::support::etcd::Etcd;
use crate::support::exec_backend::{self, Executed};
use crate::support::id_load::{IdLoad, IdLoadShape, Judged, Tally, Verdict};
use crate::support::proxy::{on_path, register, FAST_PATH, HYPER_PATH};

/// Instances in the test process, up the whole run.
const STEADY: [&str; 3] = ["b1", "b2", "b3"];
/// Instances under `svcd exec`, killed and started again.
const EXECUTED: [&str; 2] = ["e1", "e2"];

/// Per daemon.
const SHAPE: IdLoadShape = IdLoadShape {
    h1_clients: 6,
    h2_connections: 2,
    h2_streams: 4,
};

/// `[proxy.l7]` of each reload, in turn: the pool's limits and the balancing change under load
/// (0 idle per host closes every idle connection at once).
const L7: [&str; 5] = [
    "",
    "pool_max_idle_per_host = 4\nbalance = \"least_request\"\n",
    "pool_idle_timeout = \"3s\"\n",
    "pool_max_idle_per_host = 0\n",
    "pool_max_idle_per_host = 64\nbalance = \"least_request\"\n",
];

/// What svcd's RSS may keep after the run over its baseline (instances registered, nothing
/// proxied yet): each proxy worker keeps up to 64 pooled read buffers, and the allocator keeps
/// freed pages in its per-thread arenas. Measured: +2.5 to +3.5 MB after 25 and 60 s runs (5,000
/// to 18,000 requests a daemon, peaks of 30–31 MB from 28). A leak per request, connection or
/// reload would grow with the run; 16 MiB is several times what a run keeps.
const RSS_GROWTH_KB: u64 = 16 * 1024;

/// A daemon's connections to etcd: its watch's and its client's (see [`resources_return`]).
const ETCD_CONNECTIONS: usize = 2;

fn config(etcd: &str, path: &str, l7: &str) -> String {
    on_path(
        &format!("[registry.etcd]\nendpoints = [\"{etcd}\"]\n[proxy.l7]\n{l7}"),
        path,
    )
}

/// One daemon under test and its load.
struct Subject {
    tag: &'static str,
    path: &'static str,
    daemon: Daemon,
    baseline_fds: usize,
    /// What the baseline descriptors are, to compare with what is left after the run.
    baseline_listing: Vec<String>,
    baseline_rss_kb: u64,
    /// How its connections to etcd show in [`Daemon::describe_fds`] (`-> :<port> `).
    to_etcd: String,
    peak_fds: usize,
    peak_rss_kb: u64,
}

impl Subject {
    async fn start(tag: &'static str, path: &'static str, etcd: &str) -> Subject {
        let daemon = Daemon::start(&config(etcd, path, L7[0])).await;
        Subject {
            tag,
            path,
            baseline_fds: 0,
            baseline_listing: Vec::new(),
            baseline_rss_kb: 0,
            to_etcd: format!("-> :{} ", etcd.rsplit(':').next().unwrap_or_default()),
            peak_fds: 0,
            peak_rss_kb: 0,
            daemon,
        }
    }

    /// Takes the baseline: the instances registered (a daemon that registers keeps more
    /// connections to etcd), no request proxied yet.
    fn baseline(&mut self) {
        self.baseline_fds = self.daemon.open_fds();
        self.baseline_listing = self.daemon.describe_fds();
        self.baseline_rss_kb = self.daemon.status_kb("VmRSS");
    }

    fn sample(&mut self) -> (usize, u64) {
        let (fds, rss) = (self.daemon.open_fds(), self.daemon.status_kb("VmRSS"));
        self.peak_fds = self.peak_fds.max(fds);
        self.peak_rss_kb = self.peak_rss_kb.max(rss);
        (fds, rss)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_their_own_requests_through_churn() {
    let secs: u64 = std::env::var("SVCD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
        .max(20);
    let seed: u64 = std::env::var("SVCD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "soak: seed {seed}, {secs} s (SVCD_SOAK_SEED={seed} SVCD_SOAK_SECS={secs} repeat it)"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let mut subjects = [
        Subject::start("fast", FAST_PATH, &endpoint).await,
        Subject::start("hyper", HYPER_PATH, &endpoint).await,
    ];
    let steady: Vec<EchoBackend> = {
        let mut v = Vec::new();
        for name in STEADY {
            let b = EchoBackend::start(name, seed).await;
            register(&subjects[0].daemon, "web", name, b.addr, "http").await;
            v.push(b);
        }
        v
    };
    let mut executed: Vec<Executed> = EXECUTED
        .iter()
        .map(|id| Executed::new(&subjects[0].daemon, id, seed))
        .collect();
    for e in &mut executed {
        e.start(&subjects[0].daemon);
    }
    let mut all: Vec<&str> = STEADY.iter().chain(EXECUTED.iter()).copied().collect();
    all.sort();
    for s in &mut subjects {
        s.daemon
            .wait_instances("default", "web", &all, Duration::from_secs(10))
            .await;
        s.baseline();
    }

    let (bursts_tx, bursts) = watch::channel(true);
    let loads: Vec<IdLoad> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| IdLoad::start(s.daemon.http, s.tag, SHAPE, bursts.clone(), seed ^ i as u64))
        .collect();
    let until = Instant::now() + Duration::from_secs(secs);
    let (reloads, killed, peaks) = {
        let daemons: Vec<&Daemon> = subjects.iter().map(|s| &s.daemon).collect();
        let mut rngs: Vec<StdRng> = (0..2 + executed.len())
            .map(|_| StdRng::seed_from_u64(rng.random()))
            .collect();
        let (reload_rng, rest) = rngs.split_first_mut().unwrap();
        let (burst_rng, exec_rngs) = rest.split_first_mut().unwrap();
        let cycles = executed
            .iter_mut()
            .zip(exec_rngs)
            .map(|(e, rng)| e.cycle(&daemons, rng, until));
        let (reloads, killed, (), peaks) = tokio::join!(
            reload_loop(&subjects, &endpoint, reload_rng, until),
            futures_util::future::join_all(cycles),
            burst_loop(&bursts_tx, burst_rng, until),
            progress(&loads, &daemons, until),
        );
        (reloads, killed.concat(), peaks)
    };
    for (s, (fds, rss)) in subjects.iter_mut().zip(peaks) {
        s.peak_fds = fds;
        s.peak_rss_kb = rss;
    }
    let _ = bursts_tx.send(true);
    let mut tallies = Vec::new();
    for load in loads {
        tallies.push(load.finish().await);
    }
    for s in &mut subjects {
        s.sample();
    }

    // The instances go: the killed ones deregister themselves, the steady ones are removed and
    // stopped. svcd's pools and client connections must then all be gone.
    let mut killed: Killed = killed.into_iter().collect();
    let mut raced: Vec<Raced> = steady.iter().flat_map(|b| b.raced()).collect();
    for e in &mut executed {
        killed.extend(e.stop(&subjects[0].daemon).await);
        raced.extend(echo::read_race_file(&e.race_file));
    }
    for name in STEADY {
        let path = format!("/v1/services/default/web/instances/{name}");
        let r = subjects[0].daemon.request("DELETE", &path, None).await;
        assert!(r.status < 300, "{}", r.body);
    }
    for b in &steady {
        b.stop().await;
    }
    for s in &subjects {
        s.daemon
            .wait_instances("default", "web", &[], Duration::from_secs(10))
            .await;
    }

    eprintln!(
        "soak: {reloads} reloads of each daemon; killed {:?}; {} requests reached a backend that had closed or 408ed their connection",
        sorted(&killed),
        raced.len()
    );
    let mut failures = churn_happened(reloads, &steady, &subjects, &tallies);
    for (s, tally) in subjects.iter_mut().zip(&tallies) {
        failures.extend(verdict(s, tally, &raced, &killed));
        failures.extend(resources_return(s).await);
    }
    assert!(
        failures.is_empty(),
        "soak failed (seed {seed}, {secs} s; repeat with SVCD_SOAK_SEED={seed}):\n{}",
        failures.join("\n")
    );
}

/// What did not happen of the churn the soak is about: reloads, the backends' idle closes and
/// stray 408s, answers from an instance after it came back.
fn churn_happened(
    reloads: usize,
    steady: &[EchoBackend],
    subjects: &[Subject],
    tallies: &[Tally],
) -> Vec<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut missing = Vec::new();
    if reloads < 3 {
        missing.push(format!("only {reloads} reloads"));
    }
    for (b, name) in steady.iter().zip(STEADY) {
        let c = b.counters();
        let line = format!(
            "{name}: {} connections, {} requests, {} idle closes, {} stray 408s",
            c.connections.load(Relaxed),
            c.requests.load(Relaxed),
            c.idle_closes.load(Relaxed),
            c.stray_408s.load(Relaxed)
        );
        eprintln!("soak: {line}");
        if c.idle_closes.load(Relaxed) == 0 || c.stray_408s.load(Relaxed) == 0 {
            missing.push(format!("a backend that never misbehaved: {line}"));
        }
    }
    for (s, tally) in subjects.iter().zip(tallies) {
        for id in EXECUTED {
            let back = |b: &&String| b.starts_with(&format!("{id}.")) && **b != format!("{id}.1");
            if !tally.backends.iter().any(|b| back(&b)) {
                missing.push(format!(
                    "{}: no answer from {id} after it came back; answered: {:?}",
                    s.tag, tally.backends
                ));
            }
        }
    }
    missing
}

/// The incarnations killed (`e1.2`), and when.
type Killed = HashMap<String, Instant>;

fn sorted(killed: &Killed) -> Vec<&String> {
    let mut v: Vec<&String> = killed.keys().collect();
    v.sort();
    v
}

/// The failures among `tally`'s requests, after excusing what `raced` and `killed` explain;
/// prints the counts.
fn verdict(s: &Subject, tally: &Tally, raced: &[Raced], killed: &Killed) -> Vec<String> {
    let crossed_408: std::collections::HashMap<&str, &Raced> = raced
        .iter()
        .filter(|r| r.after == Misbehaviour::Stray408)
        .map(|r| (r.id.as_str(), r))
        .collect();
    let (mut excused, mut post_lost) = (Vec::new(), std::collections::BTreeMap::new());
    let mut failed: Vec<&Judged> = Vec::new();
    for j in &tally.not_ok {
        let idempotent = j.sent.method != http::Method::POST;
        match &j.verdict {
            Verdict::Stray408(from) if crossed_408.contains_key(j.sent.id.as_str()) => {
                let r = crossed_408[j.sent.id.as_str()];
                excused.push(format!(
                    "{} {} ({} at {:.3}s): a stray 408 ({from}) it reached {} {:.2} ms after the 408",
                    j.sent.method,
                    j.sent.id,
                    j.client,
                    j.sent_at.as_secs_f64(),
                    r.backend,
                    r.delay.as_secs_f64() * 1000.0
                ))
            }
            Verdict::Stray408(from) if killed_lingering(from, j, killed) => excused.push(format!(
                "{} {} ({} at {:.3}s): a stray 408 ({from}) from an instance killed while it lingered",
                j.sent.method,
                j.sent.id,
                j.client,
                j.sent_at.as_secs_f64(),
            )),
            Verdict::Cut { backend, error } if killed.contains_key(backend) => excused.push(format!(
                "{} {} ({} at {:.3}s): body cut by {backend}, killed: {error}",
                j.sent.method,
                j.sent.id,
                j.client,
                j.sent_at.as_secs_f64()
            )),
            Verdict::Lost(why) if !idempotent => *post_lost.entry(why.as_str()).or_insert(0) += 1,
            _ => failed.push(j),
        }
    }
    let total: u64 = tally.counts.values().sum();
    eprintln!(
        "soak {} ({}): {total} requests, {} failed, {} excused, POST lost {post_lost:?}; counts {:?}; fds {} -> peak {}, RSS {} -> peak {} kB",
        s.tag,
        if s.path.is_empty() { "fast path" } else { "http1_fast_path = false" },
        failed.len(),
        excused.len(),
        tally.counts,
        s.baseline_fds,
        s.peak_fds,
        s.baseline_rss_kb,
        s.peak_rss_kb,
    );
    for e in &excused {
        eprintln!("soak {}: excused {e}", s.tag);
    }
    failed.sort_by_key(|j| j.sent_at);
    let mut out = Vec::new();
    for method in ["GET", "HEAD", "POST"] {
        if tally.count(method, "ok") < 100 {
            out.push(format!(
                "{}: fewer than 100 {method} answered: {:?}",
                s.tag, tally.counts
            ));
        }
    }
    if !failed.is_empty() {
        out.push(format!(
            "{}: {} of {total} requests failed; the first ones:",
            s.tag,
            failed.len()
        ));
    }
    for j in failed.iter().take(25) {
        out.push(format!(
            "  {} at {:.3}s: {} {} got {}",
            j.client,
            j.sent_at.as_secs_f64(),
            j.sent.method,
            j.sent.id,
            describe(&j.verdict)
        ));
    }
    out
}

/// Whether the stray 408 `from` (`<incarnation> conn <n>`) came from an incarnation killed within
/// [`echo::LINGER`] (and some scheduling) after `j` was sent: it may have reached the backend
/// while it lingered, with nobody left to record it.
fn killed_lingering(from: &str, j: &Judged, killed: &Killed) -> bool {
    let name = from.split(' ').next().unwrap_or_default();
    killed
        .get(name)
        .is_some_and(|&at| at >= j.at && at - j.at <= echo::LINGER + Duration::from_millis(100))
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Ok => "its answer".into(),
        Verdict::Wrong(what) => format!("another request's answer: {what}"),
        Verdict::Stray408(from) => format!("a stray 408 written on an idle connection ({from})"),
        Verdict::Cut { backend, error } => format!("a body cut by {backend}, still up: {error}"),
        Verdict::Lost(what) => format!("lost: {what}"),
        Verdict::Hung => format!(
            "no answer within {:?}",
            crate::support::id_load::ANSWER_WITHIN
        ),
    }
}

/// Waits until `s`'s descriptors are back at their baseline and its RSS within
/// [`RSS_GROWTH_KB`] of it; the failure otherwise. Connections to etcd are counted apart: after
/// a reload the store connects again for its next call while the open watch keeps the
/// connection it started on (`EtcdStore::reload_credentials`), so a daemon that writes holds
/// up to [`ETCD_CONNECTIONS`] at any time, whatever it held at the baseline.
async fn resources_return(s: &mut Subject) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let marker = s.to_etcd.clone();
    let to_etcd = |listing: &[String]| listing.iter().filter(|e| e.contains(&marker)).count();
    let baseline_others = s.baseline_fds - to_etcd(&s.baseline_listing);
    loop {
        let rss = s.sample().1;
        let listing = s.daemon.describe_fds();
        let etcd = to_etcd(&listing);
        let others = listing.len() - etcd;
        if others <= baseline_others
            && etcd <= ETCD_CONNECTIONS
            && rss <= s.baseline_rss_kb + RSS_GROWTH_KB
        {
            eprintln!(
                "soak {}: after the run {} fds ({etcd} to etcd), RSS {rss} kB",
                s.tag,
                listing.len()
            );
            return None;
        }
        if Instant::now() > deadline {
            // What is open now and was not at the baseline (the same kind counted as often).
            let mut extra = listing;
            for was in &s.baseline_listing {
                if let Some(i) = extra.iter().position(|e| e == was) {
                    extra.remove(i);
                }
            }
            return Some(format!(
                "{}: 15 s after the run {others} fds besides {etcd} to etcd (baseline {baseline_others}, at most {ETCD_CONNECTIONS} to etcd) and RSS {rss} kB (baseline {}, allowed +{RSS_GROWTH_KB}); open beyond the baseline: {extra:?}",
                s.tag, s.baseline_rss_kb
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reloads both daemons every 2–5 s until `until`, cycling through [`L7`]; how many times.
async fn reload_loop(subjects: &[Subject], etcd: &str, rng: &mut StdRng, until: Instant) -> usize {
    let mut n = 0;
    loop {
        let at = Instant::now() + Duration::from_millis(rng.random_range(2000..5000));
        if at >= until {
            return n;
        }
        tokio::time::sleep_until(at).await;
        n += 1;
        for s in subjects {
            s.daemon
                .reload_with(&config(etcd, s.path, L7[n % L7.len()]))
                .await;
        }
    }
}

/// Bursts of 0.3–1.2 s with lulls of 0.1–0.9 s between, until `until`.
async fn burst_loop(tx: &watch::Sender<bool>, rng: &mut StdRng, until: Instant) {
    while Instant::now() < until {
        let _ = tx.send(true);
        let burst = Duration::from_millis(rng.random_range(300..1200));
        tokio::time::sleep_until(until.min(Instant::now() + burst)).await;
        let _ = tx.send(false);
        let lull = Duration::from_millis(rng.random_range(100..900));
        tokio::time::sleep_until(until.min(Instant::now() + lull)).await;
    }
}

/// Samples each daemon's descriptors and RSS every second and prints a line every 10 s, until
/// `until`; the peaks (descriptors, RSS in kB) per daemon.
async fn progress(loads: &[IdLoad], daemons: &[&Daemon], until: Instant) -> Vec<(usize, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let start = Instant::now();
    let mut peaks = vec![(0, 0); daemons.len()];
    let mut next_line = start + Duration::from_secs(10);
    while Instant::now() + Duration::from_secs(1) < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: Vec<(usize, u64)> = daemons
            .iter()
            .map(|d| (d.open_fds(), d.status_kb("VmRSS")))
            .collect();
        for (peak, (fds, rss)) in peaks.iter_mut().zip(&now) {
            *peak = (peak.0.max(*fds), peak.1.max(*rss));
        }
        if Instant::now() >= next_line {
            next_line += Duration::from_secs(10);
            let lines: Vec<String> = loads
                .iter()
                .zip(&now)
                .map(|(l, (fds, rss))| {
                    format!(
                        "{}/{} ok, {fds} fds, RSS {rss} kB",
                        l.live.ok.load(Relaxed),
                        l.live.sent.load(Relaxed)
                    )
                })
                .collect();
            eprintln!("soak: {:.0?} {lines:?}", start.elapsed());
        }
    }
    peaks
}

/// The backend process of an [`Executed`] instance, started by `svcd exec` through
/// [`exec_backend::ENTRY`]. Without its environment (a plain `--ignored` run) it returns at
/// once: it is an entry point, not a test.
#[tokio::test]
#[ignore = "the soak's backend process, started by svcd exec"]
async fn exec_backend_process() {
    exec_backend::serve_from_env().await;
}
