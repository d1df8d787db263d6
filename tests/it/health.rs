//! Health as a whole: passive ejection under load, the panic threshold, gRPC checks with their
//! reason, and draining with requests in flight — real daemon, real backends, real clients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_proto::rr::{RData, RecordType};
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::backend::Backend;
use crate::support::daemon::{metric_sum, Daemon};
use crate::support::proxy::{register, register_state, wait_routable, web_service, H1};
use crate::support::{dns, eventually};

/// Ports of the SRV answer for the `web` service, sorted.
async fn srv_ports(d: &Daemon) -> Vec<u16> {
    let m = dns::udp(
        d.dns,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
        None,
    )
    .await;
    let mut ports: Vec<u16> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    ports.sort();
    ports
}

async fn instance_json(d: &Daemon) -> serde_json::Value {
    d.get("/v1/services/default/api/instances/g1").await.json()
}

fn svcd_list(d: &Daemon, service: &str) -> String {
    let out = d.cli(&["list", service]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn backend_killed_under_load_is_ejected_from_proxy_and_local_dns() {
    let (d, backends) = web_service(
        "[proxy.outlier]\nconsecutive_failures = 3\nbase_ejection_time = \"30s\"\nmax_ejection_percent = 50\n",
        &["b1", "b2", "b3"],
    )
    .await;
    let mut all_ports: Vec<u16> = backends.iter().map(|b| b.addr.port()).collect();
    all_ports.sort();
    assert_eq!(srv_ports(&d).await, all_ports);

    // Load: four keep-alive clients sending GETs (retryable) until told to stop.
    let get_errors = Arc::new(AtomicUsize::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (errors, count, stop, addr) = (get_errors.clone(), gets.clone(), stop.clone(), d.http);
        load.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            while !stop.is_cancelled() {
                let (s, _) = c.get("web", "/").await;
                count.fetch_add(1, Ordering::SeqCst);
                if s != StatusCode::OK {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // The load is running (some answers in) before the instance dies.
    eventually(Duration::from_secs(5), "load running", || async {
        (gets.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    backends[2].kill();
    // Non-retryable requests (POST with a body), each on a new connection, while the load runs.
    let mut post_errors = 0;
    for _ in 0..30 {
        let req = Request::post("/")
            .header("host", "web")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let (s, _, _) = H1::connect(d.http).await.request(req).await;
        if s != StatusCode::OK {
            post_errors += 1;
        }
    }
    // The GET load goes on past the POSTs (more answers in) before it stops.
    let so_far = gets.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), "load past the POSTs", || async {
        (gets.load(Ordering::SeqCst) >= so_far + 20).then_some(())
    })
    .await;
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }
    assert!(gets.load(Ordering::SeqCst) > 100, "the load ran");
    assert_eq!(
        get_errors.load(Ordering::SeqCst),
        0,
        "retryable requests never failed"
    );
    assert!(
        post_errors <= 3,
        "{post_errors} client-visible errors for non-retryable requests (threshold 3)"
    );

    // Ejected here: gone from this node's DNS, shown with its reason, counted.
    let mut live_ports: Vec<u16> = backends[..2].iter().map(|b| b.addr.port()).collect();
    live_ports.sort();
    assert_eq!(
        srv_ports(&d).await,
        live_ports,
        "ejected instance left local DNS"
    );
    let service = d.get("/v1/services/default/web").await.json();
    let w3 = service["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "w3")
        .unwrap()
        .clone();
    assert!(
        w3["ejection"]["reason"]
            .as_str()
            .unwrap()
            .contains("consecutive failures"),
        "{w3}"
    );
    let listing = svcd_list(&d, "web");
    let line = listing.lines().find(|l| l.starts_with("w3")).unwrap();
    assert!(
        line.contains("ejected") && line.contains("consecutive failures"),
        "{listing}"
    );
    let metrics = d.get("/metrics").await.body;
    assert_eq!(
        metric_sum(
            &metrics,
            r#"svcd_outlier_ejections_total{service="web.default",detector="http"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(metrics.contains(r#"svcd_outlier_ejections_active{service="web.default"} 1"#));
    assert!(metrics.contains(r#"svcd_service_endpoints{service="web.default",state="ejected"} 1"#));
    assert!(metrics.contains(r#"svcd_service_endpoints{service="web.default",state="healthy"} 2"#));
    assert!(
        !metrics.contains("svcd_endpoint_state{"),
        "per-endpoint state series are opt-in"
    );
}

#[tokio::test]
async fn ejection_ends_after_the_ejection_time_and_at_most_half_are_ejected() {
    let (d, _backends) = web_service(
        "[proxy.outlier]\nconsecutive_failures = 2\nbase_ejection_time = \"1s\"\nmax_ejection_percent = 50\n",
        &["b1", "b2"],
    )
    .await;
    // Both answer 503: only one of two (50 %) may be ejected.
    let mut c = H1::connect(d.http).await;
    for _ in 0..10 {
        c.get("web", "/status/503").await;
    }
    let ejected = |v: serde_json::Value| {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i.get("ejection").is_some())
            .count()
    };
    assert_eq!(ejected(d.get("/v1/services/default/web").await.json()), 1);
    // It comes back after base_ejection_time.
    let started = Instant::now();
    eventually(Duration::from_secs(5), "ejection over", || async {
        (ejected(d.get("/v1/services/default/web").await.json()) == 0).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn panic_threshold_spreads_over_all_or_fails_as_configured() {
    for (mode, want_all) in [("balance_all", true), ("fail", false)] {
        let d = Daemon::start(&format!(
            "[proxy.outlier]\npanic_threshold = 50\npanic_mode = \"{mode}\"\n"
        ))
        .await;
        let backends = [
            Backend::start("b1").await,
            Backend::start("b2").await,
            Backend::start("b3").await,
        ];
        register(&d, "web", "w1", backends[0].addr, "http").await;
        wait_routable(&d, "web", 1).await;
        register_state(&d, "web", "w2", backends[1].addr, "http", "unhealthy").await;
        register_state(&d, "web", "w3", backends[2].addr, "http", "unhealthy").await;
        // 1 usable of 3 is under 50 %: panic.
        let seen = eventually(Duration::from_secs(5), "all registered", || async {
            let v = d.get("/v1/services/default/web").await.json();
            (v["instances"].as_array().unwrap().len() == 3).then_some(())
        });
        seen.await;
        let before: Vec<usize> = backends.iter().map(Backend::count).collect();
        let mut c = H1::connect(d.http).await;
        for _ in 0..30 {
            assert_eq!(c.get("web", "/").await.0, StatusCode::OK);
        }
        let got: Vec<usize> = backends
            .iter()
            .zip(&before)
            .map(|(b, n)| b.count() - n)
            .collect();
        if want_all {
            assert_eq!(got, [10, 10, 10], "panic: spread over all ({mode})");
        } else {
            assert_eq!(got, [30, 0, 0], "panic mode fail: the usable one only");
        }
    }
}

#[tokio::test]
async fn grpc_check_marks_not_serving_instance_unhealthy_and_says_why() {
    let d = Daemon::start("").await;
    let b = Backend::start("g1").await;
    let body = format!(
        r#"{{"ip":"127.0.0.1","ports":{{"grpc":{}}},"protocol":"grpc","check":{{"type":"grpc","interval":"200ms","timeout":"1s","healthy_threshold":2,"unhealthy_threshold":2}}}}"#,
        b.addr.port()
    );
    let r = d
        .request("PUT", "/v1/services/default/api/instances/g1", Some(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Pending until its first check passes, which records `healthy`.
    eventually(Duration::from_secs(5), "checked and healthy", || async {
        (instance_json(&d).await["state"] == "healthy").then_some(())
    })
    .await;
    assert!(d
        .metric(r#"svcd_health_checks_total{result="pass",service="api.default"}"#)
        .await
        .is_some_and(|n| n >= 1.0));
    b.set_serving(false);
    let v = eventually(Duration::from_secs(5), "unhealthy", || async {
        let v = instance_json(&d).await;
        (v["state"] == "unhealthy").then_some(v)
    })
    .await;
    assert!(v["reason"].as_str().unwrap().contains("NOT_SERVING"), "{v}");
    let listing = svcd_list(&d, "api");
    assert!(listing.contains("NOT_SERVING"), "{listing}");
    b.set_serving(true);
    let v = eventually(Duration::from_secs(5), "healthy again", || async {
        let v = instance_json(&d).await;
        (v["state"] == "healthy").then_some(v)
    })
    .await;
    assert!(v.get("reason").is_none(), "{v}");
}

#[tokio::test]
async fn drained_instance_finishes_its_open_request_and_gets_no_new_ones() {
    let d = Daemon::start("").await;
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    register(&d, "web", "w1", b1.addr, "http").await;
    wait_routable(&d, "web", 1).await;
    let addr = d.http;
    let asked = b1.count();
    let slow = tokio::spawn(async move { H1::connect(addr).await.get("web", "/slow").await });
    eventually(Duration::from_secs(5), "the slow request at w1", || async {
        (b1.count() > asked).then_some(())
    })
    .await;
    register(&d, "web", "w2", b2.addr, "http").await;
    let r = d
        .request("POST", "/v1/services/default/web/instances/w1/drain", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(5), "only w2 routable", || async {
        let mut c = H1::connect(d.http).await;
        let (s, b) = c.get("web", "/").await;
        (s == StatusCode::OK && b == "b2").then_some(())
    })
    .await;
    let before = b1.count();
    let mut c = H1::connect(d.http).await;
    for _ in 0..10 {
        assert_eq!(c.get("web", "/").await, (StatusCode::OK, "b2".to_string()));
    }
    assert_eq!(
        b1.count(),
        before,
        "no new request reached the drained instance"
    );
    assert_eq!(
        slow.await.unwrap(),
        (StatusCode::OK, "b1".to_string()),
        "the open request completed"
    );
    assert!(svcd_list(&d, "web").contains("drained"));
}

/// The A records DNS answers for `svc` (sorted).
async fn dns_addrs(d: &Daemon, svc: &str) -> Vec<String> {
    let name = format!("{svc}.default.svc.cluster.local.");
    dns::addrs(&dns::udp(d.dns, &name, RecordType::A, None).await)
}

/// Polls the instance's state until it is `until`, asserting DNS never answers it meanwhile;
/// returns every state the API showed, in order, without repeats.
async fn states_until_never_in_dns(d: &Daemon, svc: &str, id: &str, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen: Vec<String> = Vec::new();
    loop {
        assert_eq!(
            dns_addrs(d, svc).await,
            Vec::<String>::new(),
            "{svc} served: {seen:?}"
        );
        let r = d
            .get(&format!("/v1/services/default/{svc}/instances/{id}"))
            .await;
        if r.status == 200 {
            let v = r.json();
            assert_eq!(v["state"], v["served_state"], "{v}");
            let state = v["served_state"].as_str().unwrap().to_string();
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            if state == until {
                return seen;
            }
        }
        assert!(Instant::now() < deadline, "never {until}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registration with an active check is not served until its check passed once: with the
/// check on a dead port it is `pending` (API, CLI, metrics), never in DNS, then `unhealthy`; on a
/// live port it is healthy at its first check, long before `interval × healthy_threshold`. The
/// same for a static entry at daemon start (as after a restart).
#[tokio::test]
async fn a_checked_instance_is_pending_until_its_first_check_passes() {
    let dead = crate::support::free_port();
    let boot_dead = crate::support::free_port();
    let d = Daemon::start(&format!(
        "[[registry.static]]\nservice = \"boot\"\nid = \"b1\"\nip = \"127.0.0.1\"\n\
         ports = {{ http = {boot_dead} }}\n\
         check = {{ type = \"tcp\", interval = \"300ms\", timeout = \"200ms\" }}\n"
    ))
    .await;
    // Restored at start with its check on a dead port: pending, then unhealthy, never served.
    let boot = states_until_never_in_dns(&d, "boot", "b1", "unhealthy").await;
    assert!(
        boot.iter().all(|s| s == "pending" || s == "unhealthy"),
        "{boot:?}"
    );

    let check =
        r#""check":{"type":"tcp","interval":"500ms","timeout":"200ms","unhealthy_threshold":3}"#;
    let body = format!(r#"{{"ip":"127.0.0.1","ports":{{"http":{dead}}},{check}}}"#);
    let r = d
        .request("PUT", "/v1/services/default/dead/instances/d1", Some(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "pending", "{}", r.body);
    // Visible when the PUT answers: pending everywhere that shows a state.
    let v = d.get("/v1/services/default/dead/instances/d1").await.json();
    assert_eq!(v["served_state"], "pending", "{v}");
    let listing = svcd_list(&d, "dead");
    assert!(
        listing.contains("pending") && listing.contains("awaiting its first health check"),
        "{listing}"
    );
    assert_eq!(
        d.metric(r#"svcd_service_endpoints{service="dead.default",state="pending"}"#)
            .await,
        Some(1.0)
    );
    // Pending (seen above) until the third failure; never anything else.
    let states = states_until_never_in_dns(&d, "dead", "d1", "unhealthy").await;
    assert!(
        states.iter().all(|s| s == "pending" || s == "unhealthy"),
        "{states:?}"
    );
    assert_eq!(
        d.metric(r#"svcd_service_endpoints{service="dead.default",state="pending"}"#)
            .await,
        Some(0.0)
    );

    // A live port: healthy at the first check, not after 5 s × 3 passes.
    let b = Backend::start("live").await;
    let slow = r#""check":{"type":"tcp","interval":"5s","timeout":"1s","healthy_threshold":3}"#;
    let body = format!(
        r#"{{"ip":"127.0.0.1","ports":{{"http":{}}},{slow}}}"#,
        b.addr.port()
    );
    let registered = Instant::now();
    let r = d
        .request("PUT", "/v1/services/default/live/instances/l1", Some(&body))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(4), "live instance in DNS", || async {
        (dns_addrs(&d, "live").await == ["127.0.0.1"]).then_some(())
    })
    .await;
    assert!(registered.elapsed() < Duration::from_secs(4));
    let v = d.get("/v1/services/default/live/instances/l1").await.json();
    assert_eq!(v["served_state"], "healthy", "{v}");

    // `pending` is the daemon's to write: a registration asking for it is refused.
    let r = d
        .request(
            "PUT",
            "/v1/services/default/live/instances/l2",
            Some(r#"{"ip":"127.0.0.1","state":"pending"}"#),
        )
        .await;
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("state")));
}

/// An HTTP check on a closed port says why, as the TCP check does (`Connection refused`), not
/// hyper-util's `client error (Connect)`.
#[tokio::test]
async fn http_and_tcp_checks_on_a_closed_port_say_connection_refused() {
    let d = Daemon::start("").await;
    let closed = crate::support::free_port();
    for (id, kind) in [("h1", "http"), ("t1", "tcp")] {
        let body = format!(
            r#"{{"ip":"127.0.0.1","ports":{{"{kind}":{closed}}},"check":{{"type":"{kind}","path":"/healthz","interval":"200ms","unhealthy_threshold":2}}}}"#
        );
        let r = d
            .request(
                "PUT",
                &format!("/v1/services/default/db/instances/{id}"),
                Some(&body),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for id in ["h1", "t1"] {
        let path = format!("/v1/services/default/db/instances/{id}");
        let v = eventually(Duration::from_secs(5), "unhealthy", || async {
            let v = d.get(&path).await.json();
            (v["state"] == "unhealthy").then_some(v)
        })
        .await;
        let reason = v["reason"].as_str().expect("a reason").to_string();
        eprintln!("{id}: {reason}");
        assert!(reason.contains("Connection refused"), "{id}: {reason}");
        assert!(reason.contains(&closed.to_string()), "{id}: {reason}");
    }
    let listing = svcd_list(&d, "db");
    assert_eq!(
        listing.matches("Connection refused").count(),
        2,
        "{listing}"
    );
}
