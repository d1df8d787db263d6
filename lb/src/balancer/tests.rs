//! Selection, panic, state across views and reloads, and the one ejection record — with a real
//! publisher and paused time for the ejection timers.

use std::time::Duration;

use super::*;
use svcd_config::{Instance, OutlierConfig, PanicMode};
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{ServedState, SnapshotBuilder, SnapshotPublisher};

use crate::metrics::LbMetrics;

struct NoExtra;
impl SlotFactory for NoExtra {
    type Extra = ();
    type Service = ();
    fn make_service(&self, _: &ServiceName) {}
    fn make(&self, _: &ServiceName, _: &Endpoint, _: SocketAddr) -> Option<()> {
        Some(())
    }
}

fn outlier(panic_threshold: u32, panic_mode: PanicMode) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: 3,
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent: 50,
        panic_threshold,
        panic_mode,
    }
}

struct Fixture {
    publisher: Arc<SnapshotPublisher>,
    builder: SnapshotBuilder,
    rev: i64,
    lb: Arc<LoadBalancer>,
    table: Arc<BalancerTable<NoExtra>>,
}

impl Fixture {
    fn new(o: OutlierConfig) -> Self {
        let publisher = Arc::new(SnapshotPublisher::detached());
        let lb = LoadBalancer::new(publisher.clone(), o, LbMetrics::detached());
        let table = BalancerTable::new(&lb, NoExtra, PortRule::Only);
        Fixture {
            publisher,
            builder: SnapshotBuilder::new(),
            rev: 1,
            lb,
            table,
        }
    }

    /// Registers instance `id` (`extra`: more JSON fields, e.g. `"weight":3`).
    fn put(&mut self, id: &str, ip: u8, extra: &str) {
        self.rev += 1;
        let json = format!(r#"{{"ip":"10.0.0.{ip}","ports":{{"http":80}}{extra}}}"#);
        Instance::from_json(json.as_bytes()).expect("valid instance");
        self.builder.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/default/web/{id}"),
            value: json.into_bytes(),
            mod_revision: self.rev,
        });
        let b = &mut self.builder;
        self.publisher.publish_base(|prev| b.build(prev));
    }

    fn delete(&mut self, id: &str) {
        self.rev += 1;
        self.builder.apply(&Event {
            kind: EventKind::Delete,
            key: format!("/svcd/v1/endpoints/default/web/{id}"),
            value: vec![],
            mod_revision: self.rev,
        });
        let b = &mut self.builder;
        self.publisher.publish_base(|prev| b.build(prev));
    }

    fn service(&self) -> Arc<ServiceEndpoints> {
        self.lb
            .reader()
            .load()
            .service("default", "web")
            .cloned()
            .expect("web registered")
    }

    fn balancer(&self) -> Arc<ServiceBalancer<NoExtra>> {
        self.table.get("web", "default", None).unwrap()
    }

    fn pick_id(&self) -> Option<String> {
        let b = self.balancer();
        let view = b.view(&self.service());
        let pick = b.pick(&view)?;
        Some(pick.attempt(0).unwrap().endpoint.id.to_string())
    }

    /// Fails the attempt to `id` through `detector` `n` times.
    fn fail(&self, id: &str, detector: Detector, n: usize) {
        let b = self.balancer();
        let view = b.view(&self.service());
        let slot = view
            .fallback
            .iter()
            .find(|s| &*s.endpoint.id == id)
            .expect("slot");
        for _ in 0..n {
            b.failure(&view, slot, detector, "connect refused");
        }
    }

    fn state(&self, id: &str) -> ServedState {
        let s = self.service();
        let e = s.all.iter().find(|e| &*e.id == id).unwrap();
        s.served_state(e)
    }
}

fn share(picks: &[String], id: &str) -> f64 {
    picks.iter().filter(|p| *p == id).count() as f64 / picks.len() as f64
}

#[test]
fn weights_split_round_robin_and_least_request_within_5_percent() {
    for policy in [Balance::RoundRobin, Balance::LeastRequest] {
        let mut f = Fixture::new(outlier(50, PanicMode::BalanceAll));
        f.put("a", 1, r#","weight":1"#);
        f.put("b", 2, r#","weight":3"#);
        f.table.set_policies(policy, BTreeMap::new());
        let picks: Vec<String> = (0..10_000).map(|_| f.pick_id().unwrap()).collect();
        let a = share(&picks, "a");
        assert!(
            (a - 0.25).abs() <= 0.05 * 0.25 + 0.0125,
            "{policy:?}: a got {a}"
        );
    }
}

#[test]
fn least_request_avoids_the_busy_instance() {
    let mut f = Fixture::new(outlier(50, PanicMode::BalanceAll));
    f.put("a", 1, "");
    f.put("b", 2, "");
    f.table.set_policies(Balance::LeastRequest, BTreeMap::new());
    let b = f.balancer();
    let view = b.view(&f.service());
    view.usable[0].health.in_flight.store(10, Ordering::Relaxed);
    assert!((0..100).all(|_| f.pick_id().as_deref() == Some("b")));
}

#[test]
fn panic_spreads_over_all_but_draining_or_fails() {
    let mut f = Fixture::new(outlier(50, PanicMode::BalanceAll));
    f.put("e0", 1, "");
    f.put("e1", 2, r#","state":"unhealthy""#);
    f.put("e2", 3, r#","state":"unhealthy""#);
    f.put("e3", 4, r#","state":"draining""#);
    let mut seen: Vec<String> = (0..30).filter_map(|_| f.pick_id()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["e0", "e1", "e2"], "the draining one never");
    assert!(f.balancer().health.in_panic());
    f.lb.reconfigure(outlier(50, PanicMode::Fail));
    assert!((0..10).all(|_| f.pick_id().as_deref() == Some("e0")));
    // 1 of 3 is 33 % >= 30 %: no panic.
    f.lb.reconfigure(outlier(30, PanicMode::BalanceAll));
    assert!((0..10).all(|_| f.pick_id().as_deref() == Some("e0")));
    assert!(!f.balancer().health.in_panic());
}

#[test]
fn pending_instances_are_never_picked_nor_counted_for_panic() {
    let mut f = Fixture::new(outlier(50, PanicMode::BalanceAll));
    // Every instance awaiting its first check (a daemon just started): nothing to pick, and not
    // a panic that would spray traffic onto them.
    for (id, ip) in [("p0", 1), ("p1", 2), ("p2", 3)] {
        f.put(id, ip, r#","state":"pending""#);
    }
    assert_eq!(f.state("p0"), ServedState::Pending);
    assert_eq!(f.pick_id(), None);
    assert!(!f.balancer().health.in_panic());
    // One passes its check: 1 usable of 1 counted, no panic although 3 of 4 are pending.
    f.put("p0", 1, "");
    assert!((0..20).all(|_| f.pick_id().as_deref() == Some("p0")));
    assert!(!f.balancer().health.in_panic());
    // The panic set holds the unhealthy, not the pending: 1 of 2 counted is below 60 %.
    f.put("u", 4, r#","state":"unhealthy""#);
    f.lb.reconfigure(outlier(60, PanicMode::BalanceAll));
    let mut seen: Vec<String> = (0..30).filter_map(|_| f.pick_id()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["p0", "u"], "pending ones never, even in panic");
    assert!(f.balancer().health.in_panic());
    let view = f.balancer().view(&f.service());
    assert_eq!(
        view.fallback.len(),
        2,
        "the base of max_ejection_percent too"
    );
}

#[test]
fn state_survives_new_views_and_reloads() {
    let mut f = Fixture::new(outlier(50, PanicMode::BalanceAll));
    f.put("a", 1, "");
    f.put("b", 2, "");
    let b = f.balancer();
    let v1 = b.view(&f.service());
    v1.usable[1].health.in_flight.store(3, Ordering::Relaxed);
    f.fail("b", Detector::Http, 2);
    f.put("c", 3, "");
    f.table.set_policies(Balance::LeastRequest, BTreeMap::new());
    f.lb.reconfigure(outlier(10, PanicMode::Fail));
    let b2 = f.balancer();
    assert!(Arc::ptr_eq(&b, &b2), "a reload keeps the balancer");
    assert_eq!(b2.policy(), Balance::LeastRequest);
    let v2 = b2.view(&f.service());
    assert_eq!(v2.usable.len(), 3);
    assert_eq!(v2.usable[1].health.in_flight.load(Ordering::Relaxed), 3);
    assert_eq!(v2.usable[1].health.failure_run(Detector::Http), 2);
}

#[tokio::test(start_paused = true)]
async fn one_ejection_record_held_by_both_detectors_until_the_last_lets_go() {
    let mut f = Fixture::new(outlier(0, PanicMode::Fail));
    for (id, ip) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        f.put(id, ip, "");
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(f.lb.clone().run(cancel.clone()));
    f.fail("a", Detector::Tcp, 3);
    assert_eq!(f.state("a"), ServedState::Ejected);
    tokio::time::sleep(Duration::from_secs(10)).await;
    f.fail("a", Detector::Http, 3);
    let ejection = f.service().ejection("a").cloned().unwrap();
    assert_eq!(ejection.holders, ["tcp", "http"]);
    assert_eq!(ejection.count, 1, "one ejection, two holders");
    // The TCP hold ends at 30 s; HTTP still holds it until 40 s.
    tokio::time::sleep(Duration::from_secs(21)).await;
    assert_eq!(f.state("a"), ServedState::Ejected);
    assert_eq!(f.service().ejection("a").unwrap().holders, ["http"]);
    assert!(f.service().healthy.iter().all(|e| &*e.id != "a"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(f.state("a"), ServedState::Healthy);
    assert_eq!(f.balancer().health.ejected_now(), 0);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_counts_instances_not_holds() {
    let mut f = Fixture::new(outlier(0, PanicMode::Fail));
    for (id, ip) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        f.put(id, ip, "");
    }
    // 50 % of 4: two instances at most, however many detectors hold them.
    f.fail("a", Detector::Tcp, 3);
    f.fail("a", Detector::Http, 3);
    f.fail("b", Detector::Http, 3);
    f.fail("c", Detector::Tcp, 3);
    let states: Vec<ServedState> = ["a", "b", "c", "d"].iter().map(|id| f.state(id)).collect();
    assert_eq!(
        states,
        [
            ServedState::Ejected,
            ServedState::Ejected,
            ServedState::Healthy,
            ServedState::Healthy
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn leaving_instances_wake_their_connections_and_drop_their_state() {
    let mut f = Fixture::new(outlier(0, PanicMode::Fail));
    f.put("a", 1, "");
    f.put("b", 2, "");
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(f.lb.clone().run(cancel.clone()));
    let view = f.balancer().view(&f.service());
    let (a, b) = (view.usable[0].health.clone(), view.usable[1].health.clone());
    f.fail("b", Detector::Tcp, 3);
    f.put("c", 3, "");
    tokio::task::yield_now().await;
    assert!(
        !a.has_left() && !b.has_left(),
        "another instance joining wakes nobody"
    );
    f.delete("b");
    tokio::time::timeout(Duration::from_secs(1), b.left())
        .await
        .expect("b's connections are told");
    assert!(!a.has_left());
    assert_eq!(
        f.balancer().health.ejected_now(),
        0,
        "its ejection ended with it"
    );
    // The whole service leaves: the table drops its balancer.
    f.delete("a");
    f.delete("c");
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(f.table.is_empty());
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_moves_address_is_a_new_endpoint() {
    let mut f = Fixture::new(outlier(0, PanicMode::Fail));
    for (id, ip) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        f.put(id, ip, "");
    }
    let old = f.balancer().view(&f.service()).usable[0].health.clone();
    f.fail("a", Detector::Http, 3);
    assert_eq!(f.state("a"), ServedState::Ejected);
    // Re-registered at another address: not the instance that failed.
    f.put("a", 9, "");
    // The first view of the new registration ends the old endpoint (and its ejection); the
    // snapshot that follows serves the new one.
    f.balancer().view(&f.service());
    let view = f.balancer().view(&f.service());
    let new = view.usable.iter().find(|s| &*s.endpoint.id == "a").unwrap();
    assert_eq!(new.addr.ip().to_string(), "10.0.0.9");
    assert!(old.has_left(), "connections to the old address are told");
    assert_eq!(f.state("a"), ServedState::Healthy);
    assert_eq!(new.health.failure_run(Detector::Http), 0);
    assert_eq!(f.balancer().health.ejected_now(), 0);
}
