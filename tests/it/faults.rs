//! Faults as operators meet them, through the real binary and real etcd processes: etcd killed
//! for 30 s, frozen, wiped, replaced by another cluster, its leader killed mid-stream, and
//! SIGTERM under load. Each case asserts its figure and prints what it measured.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::etcd::{Etcd, EtcdCluster};
use crate::support::eventually;
use crate::support::gate::Gate;
use crate::support::load::{DnsLoad, HttpLoad, Outcome, Sample};
use crate::support::proxy::{register, wait_routable};

const WAIT: Duration = Duration::from_secs(5);
const WEB: &str = "web.default.svc.cluster.local.";

fn etcd_config(endpoint: &str) -> String {
    format!("[registry]\nlease_ttl = \"2s\"\n[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

fn body(ip: &str) -> String {
    format!(r#"{{"ip":"{ip}","ports":{{"http":8080}}}}"#)
}

/// DNS samples sent within `window` that got no answer or an empty one.
fn dns_misses(samples: &[Sample<Option<Vec<String>>>], until: Instant) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.sent < until)
        .filter(|s| s.result.as_ref().is_none_or(|a| a.is_empty()))
        .map(|s| format!("{:?}", s.result))
        .collect()
}

#[tokio::test]
async fn a_wiped_etcd_is_noticed_and_relisted_at_once() {
    let mut etcd = Etcd::start().await;
    let a = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let mut client = etcd.client().await;
    // Push the revision well up, then: one leased registration through A, one bare key.
    for i in 0..50 {
        client.put(format!("/filler/{i}"), "x", None).await.unwrap();
    }
    client
        .put(
            "/svcd/v1/endpoints/default/web/bare",
            body("10.0.0.9"),
            None,
        )
        .await
        .unwrap();
    a.put_instance("web", "a1", &body("10.0.0.1")).await;
    b.wait_instances("default", "web", &["a1", "bare"], WAIT)
        .await;
    let before = b.metric("svcd_registry_revision").await.unwrap();
    assert!(before > 50.0);

    etcd.wipe().await;
    let healed = Instant::now();
    // B drops what the wiped store no longer has; A re-grants its lease and writes a1 again.
    b.wait_instances("default", "web", &["a1"], Duration::from_secs(8))
        .await;
    let took = healed.elapsed();
    let after = b.metric("svcd_registry_revision").await.unwrap();
    assert!(
        after < before,
        "revision follows the store back: {after} vs {before}"
    );
    assert_eq!(b.metric("svcd_registry_connected").await, Some(1.0));
    // A registration made now crosses nodes promptly.
    a.put_instance("web", "a2", &body("10.0.0.2")).await;
    b.wait_instances("default", "web", &["a1", "a2"], Duration::from_secs(2))
        .await;
    assert!(b.log().contains("went backwards"), "{}", b.log());
    eprintln!("wipe → stale entry gone on the other node after {took:?}");
}

/// A lease TTL of a minute: keep-alives every 20 s, so only re-registering when the store is
/// found replaced (not the next keep-alive) brings a daemon's own instances back promptly.
fn long_lease_config(endpoint: &str) -> String {
    format!("[registry]\nlease_ttl = \"60s\"\n[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

/// Own registrations must be back well before the next keep-alive (20 s away).
const BACK_PROMPTLY: Duration = Duration::from_secs(4);

/// etcd rebuilt with the same member name, peer URL and token (the same cluster id) and
/// restored to a revision past ours: neither the cluster id nor the revision tells, the store
/// marker does. Both daemons drop what the old store had and take what the new one has, and A's
/// own registration is written again at once.
#[tokio::test]
async fn an_etcd_replaced_with_the_same_cluster_id_and_a_higher_revision_is_relisted() {
    let mut etcd = Etcd::start().await;
    let a = Daemon::start(&long_lease_config(&etcd.endpoint())).await;
    let b = Daemon::start(&long_lease_config(&etcd.endpoint())).await;
    etcd.put_endpoint("web", "stale", &body("10.0.0.9")).await;
    a.put_instance("web", "a1", &body("10.0.0.1")).await;
    for d in [&a, &b] {
        d.wait_instances("default", "web", &["a1", "stale"], WAIT)
            .await;
    }
    let ours = b.metric("svcd_registry_revision").await.unwrap() as i64;

    let fresh = body("10.0.0.2");
    let theirs = etcd
        .replace_ahead_of(
            ours + 20,
            &[("/svcd/v1/endpoints/default/web/fresh", &fresh)],
        )
        .await;
    let healed = Instant::now();
    assert!(theirs > ours, "{theirs} vs {ours}");
    for d in [&a, &b] {
        d.wait_instances("default", "web", &["a1", "fresh"], BACK_PROMPTLY)
            .await;
    }
    let took = healed.elapsed();
    for d in [&a, &b] {
        assert_eq!(
            d.metric("svcd_registry_store_replaced_total{reason=\"marker\"}")
                .await,
            Some(1.0),
            "{}",
            d.log()
        );
        assert_eq!(d.metric("svcd_registry_connected").await, Some(1.0));
        assert!(d.log().contains("marker changed"), "{}", d.log());
        assert!(d.metric("svcd_registry_revision").await.unwrap() as i64 > theirs);
    }
    assert!(a
        .log()
        .contains("writing this daemon's registrations again"));
    eprintln!("replacement (same cluster id, revision {ours} -> {theirs}) relisted, own registration back, after {took:?}");
}

/// A wiped etcd: every daemon writes its own registrations again as soon as it notices, not
/// at its next keep-alive.
#[tokio::test]
async fn after_a_wipe_own_registrations_are_written_again_at_once() {
    let mut etcd = Etcd::start().await;
    let a = Daemon::start(&long_lease_config(&etcd.endpoint())).await;
    let b = Daemon::start(&long_lease_config(&etcd.endpoint())).await;
    a.put_instance("web", "a1", &body("10.0.0.1")).await;
    b.put_instance("web", "b1", &body("10.0.0.2")).await;
    for d in [&a, &b] {
        d.wait_instances("default", "web", &["a1", "b1"], WAIT)
            .await;
    }
    etcd.wipe().await;
    let healed = Instant::now();
    // In the store itself first (the daemons' snapshots still hold both until they notice).
    let client = etcd.client().await;
    eventually(BACK_PROMPTLY, "a1 and b1 written again", || {
        let mut client = client.clone();
        async move {
            let prefix = Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            );
            let got = client
                .get("/svcd/v1/endpoints/default/web/", prefix)
                .await
                .ok()?;
            (got.kvs().len() == 2).then_some(())
        }
    })
    .await;
    let stored = healed.elapsed();
    for d in [&a, &b] {
        eventually(BACK_PROMPTLY, "the wipe noticed", || async {
            (d.metric("svcd_registry_store_replaced_total").await == Some(1.0)).then_some(())
        })
        .await;
        d.wait_instances("default", "web", &["a1", "b1"], BACK_PROMPTLY)
            .await;
    }
    eprintln!(
        "wipe: own registrations back in etcd after {stored:?}, on both daemons after {:?}",
        healed.elapsed()
    );
}

#[tokio::test]
async fn etcd_killed_for_30s_under_dns_load_keeps_answering_and_converges_after_heal() {
    let mut etcd = Etcd::start().await;
    let a = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    a.put_instance("web", "w1", &body("10.0.0.1")).await;
    b.wait_instances("default", "web", &["w1"], WAIT).await;
    let loads = [&a, &b].map(|d| DnsLoad::start(d.dns, WEB, Duration::from_millis(20)));

    etcd.stop();
    let down = Instant::now();
    for d in [&a, &b] {
        eventually(WAIT, "the outage noticed", || async {
            (d.metric("svcd_registry_connected").await == Some(0.0)).then_some(())
        })
        .await;
    }
    tokio::time::sleep_until(down + Duration::from_secs(30)).await;
    // Stale, and says so.
    for d in [&a, &b] {
        let age = d
            .metric("svcd_registry_snapshot_age_seconds")
            .await
            .unwrap();
        assert!(age >= 25.0, "snapshot age {age} after 30 s without etcd");
        assert_eq!(d.metric("svcd_registry_connected").await, Some(0.0));
        assert_eq!(
            d.get("/readyz").await.status,
            200,
            "a stale snapshot still serves"
        );
    }

    etcd.resume().await; // returns once etcd answers
    let healed = Instant::now();
    let mut client = etcd.client().await;
    client
        .put(
            "/svcd/v1/endpoints/default/web/after",
            body("10.0.0.5"),
            None,
        )
        .await
        .unwrap();
    for d in [&a, &b] {
        d.wait_instances("default", "web", &["after", "w1"], Duration::from_secs(3))
            .await;
    }
    let took = healed.elapsed();
    let end = Instant::now();
    for (d, load) in [&a, &b].into_iter().zip(loads) {
        let samples = load.finish().await;
        let misses = dns_misses(&samples, end);
        assert!(
            misses.is_empty(),
            "{} of {} queries unanswered or empty: {misses:?}",
            misses.len(),
            samples.len()
        );
        assert!(samples.len() > 500, "{} queries", samples.len());
        assert!(
            d.metric("svcd_registry_snapshot_age_seconds")
                .await
                .unwrap()
                < 10.0
        );
    }
    eprintln!("30 s outage: DNS answered throughout; change after heal on both nodes in {took:?}");
    // Target 1 s (measured: tens of ms); the bound leaves room for a loaded CI machine.
    assert!(took < Duration::from_millis(2500), "{took:?} (target 1 s)");
}

#[tokio::test]
async fn a_frozen_etcd_is_noticed_by_the_watchdog_while_dns_keeps_answering() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    etcd.put_endpoint("web", "w1", &body("10.0.0.1")).await;
    d.wait_instances("default", "web", &["w1"], WAIT).await;
    let load = DnsLoad::start(d.dns, WEB, Duration::from_millis(50));

    // SIGSTOP: connections stay open, nothing answers; only the watch's own watchdog can tell.
    etcd.freeze();
    let frozen = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the hung store noticed",
        || async { (d.metric("svcd_registry_connected").await == Some(0.0)).then_some(()) },
    )
    .await;
    let noticed = frozen.elapsed();
    etcd.thaw();
    let thawed = Instant::now();
    etcd.put_endpoint("web", "w2", &body("10.0.0.2")).await;
    d.wait_instances("default", "web", &["w1", "w2"], Duration::from_secs(5))
        .await;
    let caught_up = thawed.elapsed();
    let samples = load.finish().await;
    let misses = dns_misses(&samples, Instant::now());
    assert!(misses.is_empty(), "{misses:?}");
    eprintln!("frozen etcd noticed after {noticed:?}; caught up {caught_up:?} after SIGCONT");
    // The watchdog is 15 s of silence; progress is asked for every 5 s.
    assert!(noticed <= Duration::from_secs(22), "{noticed:?}");
    eventually(WAIT, "connected again", || async {
        (d.metric("svcd_registry_connected").await == Some(1.0)).then_some(())
    })
    .await;
}

/// What docs/registry.md promises a writer while etcd does not answer: the API answers 503
/// within 4 s. Written back to back, so the keeper's keep-alive rounds (every second with a 3 s
/// lease) hang on the frozen etcd meanwhile too, then three at once.
#[tokio::test]
async fn a_write_while_etcd_hangs_fails_within_the_documented_bound() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&format!(
        "[registry]\nlease_ttl = \"3s\"\n[registry.etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoint()
    ))
    .await;
    d.put_instance("web", "w0", &body("10.0.0.1")).await;
    etcd.freeze();
    let mut took = Vec::new();
    let mut last = String::new();
    for i in 1..=4 {
        let started = Instant::now();
        let r = d
            .request(
                "PUT",
                &format!("/v1/services/default/web/instances/w{i}"),
                Some(&body("10.0.0.2")),
            )
            .await;
        took.push(started.elapsed());
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            r.body.contains(&etcd.endpoint()),
            "names the store: {}",
            r.body
        );
        last = r.body;
    }
    // At once: each waits for the others' turn at the store, and still answers in time.
    let timed = |i: usize| {
        let admin = d.admin;
        async move {
            let started = Instant::now();
            let r = crate::support::daemon::http(
                admin,
                "PUT",
                &format!("/v1/services/default/web/instances/c{i}"),
                Some(&body("10.0.0.3")),
            )
            .await
            .expect("admin API answers");
            assert_eq!(r.status, 503, "{}", r.body);
            started.elapsed()
        }
    };
    let (t1, t2, t3) = tokio::join!(timed(1), timed(2), timed(3));
    took.extend([t1, t2, t3]);
    etcd.thaw();
    eprintln!("writes to a frozen etcd failed after {took:?}: {last}");
    // 4 s, and room for the answer to travel on a loaded machine.
    let bound = Duration::from_millis(4300);
    assert!(took.iter().all(|t| *t <= bound), "{took:?}");
}

#[tokio::test]
async fn a_store_replaced_by_another_cluster_is_relisted() {
    let old = Etcd::start().await;
    let gate = Gate::start(old.endpoint().parse().unwrap()).await;
    let d = Daemon::start(&etcd_config(&gate.addr.to_string())).await;
    let mut client = old.client().await;
    client
        .put("/svcd/v1/endpoints/default/web/old", body("10.0.0.1"), None)
        .await
        .unwrap();
    d.wait_instances("default", "web", &["old"], WAIT).await;
    let ours = d.metric("svcd_registry_revision").await.unwrap();

    // Another cluster, already further along than ours: its revision alone would not tell.
    let new = Etcd::start().await;
    let mut client = new.client().await;
    for i in 0..(ours as usize + 20) {
        client.put(format!("/filler/{i}"), "x", None).await.unwrap();
    }
    client
        .put("/svcd/v1/endpoints/default/web/new", body("10.0.0.2"), None)
        .await
        .unwrap();
    gate.redirect(new.endpoint().parse().unwrap());
    let switched = Instant::now();
    d.wait_instances("default", "web", &["new"], Duration::from_secs(5))
        .await;
    eprintln!("replaced store relisted after {:?}", switched.elapsed());
    assert!(d.log().contains("another cluster"), "{}", d.log());
}

#[tokio::test]
async fn the_leader_killed_during_a_stream_of_registrations_fails_and_loses_none() {
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let d = Daemon::start(&format!(
        "[registry]\nlease_ttl = \"5s\"\n[registry.etcd]\nendpoints = [{}]\n",
        endpoints.join(", ")
    ))
    .await;
    d.put_instance("web", "before", &body("10.0.0.1")).await;
    let leader = cluster.leader().await;

    const WRITES: usize = 40;
    let (progress, mut written) = tokio::sync::watch::channel(0usize);
    let admin = d.admin;
    let stream = tokio::spawn(async move {
        let mut results = Vec::new();
        for i in 0..WRITES {
            let started = Instant::now();
            let r = crate::support::daemon::http(
                admin,
                "PUT",
                &format!("/v1/services/default/web/instances/w{i}"),
                Some(&body("10.0.0.2")),
            )
            .await
            .expect("admin API answers");
            results.push((i, r.status, r.body, started.elapsed()));
            let _ = progress.send(i + 1);
        }
        results
    });
    written.wait_for(|n| *n >= 10).await.unwrap();
    cluster.kill(leader);
    let results = stream.await.unwrap();

    let failed: Vec<_> = results.iter().filter(|r| r.1 != 200).collect();
    assert!(
        failed.is_empty(),
        "writes failed with quorum intact: {failed:?}"
    );
    let mut latencies: Vec<Duration> = results.iter().map(|r| r.3).collect();
    latencies.sort();
    let p50 = latencies[WRITES / 2];
    let max = latencies[WRITES - 1];
    eprintln!("leader m{leader} killed after 10 of {WRITES} writes: p50 {p50:?}, max {max:?}");
    // The target is a p99 under 2 s; bounded here by the retry window, as CI machines are
    // loaded and an election comes first.
    assert!(max < Duration::from_secs(4), "{latencies:?}");
    // None lost: every write is in this daemon's view and in the surviving members.
    assert_eq!(d.instance_ids("default", "web").await.len(), WRITES + 1);
    let survivor = (leader + 1) % 3;
    let mut client = etcd_client::Client::connect([cluster.client_urls[survivor].clone()], None)
        .await
        .unwrap();
    let stored = client
        .get(
            "/svcd/v1/endpoints/default/web/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(stored.count() as usize, WRITES + 1);
}

/// Three etcd endpoints, two members killed (no quorum): a write fails within the same 4 s and
/// says which member is down and which is up, where the client's error names none.
#[tokio::test]
async fn with_three_members_a_failing_write_names_the_members_that_failed() {
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let d = Daemon::start(&format!(
        "[registry]\nlease_ttl = \"5s\"\n[registry.etcd]\nendpoints = [{}]\n",
        endpoints.join(", ")
    ))
    .await;
    d.put_instance("web", "before", &body("10.0.0.1")).await;
    cluster.kill(0);
    cluster.kill(1);
    let started = Instant::now();
    let r = d
        .request(
            "PUT",
            "/v1/services/default/web/instances/w1",
            Some(&body("10.0.0.2")),
        )
        .await;
    let took = started.elapsed();
    eprintln!("write without quorum failed after {took:?}: {}", r.body);
    assert_eq!(r.status, 503, "{}", r.body);
    for dead in &cluster.client_urls[..2] {
        assert!(
            r.body.contains(&format!("{dead} down (")),
            "{dead}: {}",
            r.body
        );
    }
    let alive = &cluster.client_urls[2];
    assert!(
        r.body.contains(&format!("{alive} up")),
        "{alive}: {}",
        r.body
    );
    assert!(took <= Duration::from_millis(4300), "{took:?}");
}

/// A daemon proxying `web` (registered by another node) under steady HTTP and DNS load gets
/// SIGTERM: it goes unready first, keeps DNS and the proxy serving through the grace, then
/// stops; no client sees anything a retrying client would not retry.
#[tokio::test]
async fn sigterm_under_http_and_dns_load_fails_no_retrying_client() {
    let etcd = Etcd::start().await;
    let grace = Duration::from_secs(2);
    let mut a = Daemon::start_with(
        &format!(
            "{}[shutdown]\nreadiness_grace = \"2s\"\ndrain_timeout = \"3s\"\n",
            etcd_config(&etcd.endpoint())
        ),
        &[("SVCD_LOG_LEVEL", "info,svcd_proxy=debug")],
    )
    .await;
    let other = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let backend = Backend::start("b1").await;
    register(&other, "web", "w1", backend.addr, "http").await;
    wait_routable(&a, "web", 1).await;

    let http = HttpLoad::start(a.http, "web", 2, 2);
    let dns = DnsLoad::start(a.dns, WEB, Duration::from_millis(10));
    // Under load: the instance has answered a steady stream through `a` before the signal.
    eventually(
        Duration::from_secs(10),
        "200 requests through the proxy",
        || async { (backend.count() >= 200).then_some(()) },
    )
    .await;
    a.signal(Signal::SIGTERM);
    let term = Instant::now();
    let unready = eventually(Duration::from_secs(1), "readyz 503", || async {
        (a.get("/readyz").await.status == 503).then(Instant::now)
    })
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let status = a.wait_exit(Duration::from_secs(10));
        (status, a)
    });
    let (status, a) = status.await.unwrap();
    let exited = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http = http.finish().await;
    let dns = dns.finish().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", a.log());

    let failed: Vec<_> = http
        .iter()
        .filter(|s| matches!(s.result, Outcome::Failed(_)))
        .map(|s| (s.sent - term, &s.result))
        .collect();
    let first_retry = http
        .iter()
        .find(|s| s.result != Outcome::Ok)
        .map(|s| s.sent);
    let ok = http.iter().filter(|s| s.result == Outcome::Ok).count();
    eprintln!(
        "SIGTERM under load: {ok} ok, {} retryable, {} failed of {}; unready after {:?}; \
         first non-200 at {:?}; exit after {:?}",
        http.iter()
            .filter(|s| matches!(s.result, Outcome::Retryable(_)))
            .count(),
        failed.len(),
        http.len(),
        unready - term,
        first_retry.map(|t| t - term),
        exited - term,
    );
    if !failed.is_empty() {
        eprintln!("LOG {}", a.log());
    }
    assert!(failed.is_empty(), "{failed:?}");
    // Readiness first; the proxy served through the grace.
    let first_retry = first_retry.expect("the proxy stopped at the end");
    assert!(first_retry > unready && first_retry - term >= grace - Duration::from_millis(200));
    assert!(ok > 50, "{ok} requests served");
    // DNS answered every query sent during the grace.
    let misses = dns_misses(&dns, term + grace - Duration::from_millis(100));
    assert!(misses.is_empty(), "{misses:?}");
}

/// A daemon paused past its lease TTL (a VM stall, a stopped process): its registrations expire
/// in etcd, other nodes drop them, and once it runs again it grants a new lease and writes them
/// back.
#[tokio::test]
async fn a_daemon_paused_past_its_lease_ttl_registers_again_when_it_resumes() {
    let etcd = Etcd::start().await;
    let a = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let b = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    a.put_instance("web", "w1", &body("10.0.0.1")).await;
    b.wait_instances("default", "web", &["w1"], WAIT).await;

    a.signal(Signal::SIGSTOP);
    // TTL 2 s: etcd expires the lease and B drops the instance.
    b.wait_instances("default", "web", &[], Duration::from_secs(6))
        .await;
    a.signal(Signal::SIGCONT);
    let resumed = Instant::now();
    b.wait_instances("default", "web", &["w1"], Duration::from_secs(5))
        .await;
    eprintln!("re-registered {:?} after SIGCONT", resumed.elapsed());
}
