//! Criterion: picking an instance — the plain round robin over the snapshot's healthy slice with
//! port lookup (UDP flows), and the balancer path (route by Host, service and balancer lookup,
//! round robin or least request with the panic check: the per-request work of the HTTP proxy;
//! the TCP proxy runs the same balancer without the route). Neither allocates: counted over 100k
//! picks each.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use svcd_config::{Balance, OutlierConfig, PanicMode};
use svcd_proxy::balance::BalancerTable;
use svcd_proxy::http::metrics::HttpMetrics;
use svcd_proxy::http::route::{Router, MAX_HOST};
use svcd_proxy::pick::RoundRobin;
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn bench(c: &mut Criterion) {
    let mut b = SnapshotBuilder::new();
    for i in 0..10 {
        b.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/default/db/db-{i}"),
            value: format!(
                r#"{{"ip":"10.0.0.{}","ports":{{"postgres":5432,"metrics":9187}}}}"#,
                i + 1
            )
            .into_bytes(),
            mod_revision: i + 2,
        });
    }
    let snapshot = b.build(&EndpointSnapshot::default());
    let rr = RoundRobin::default();
    // The pick path allocates nothing: count allocations over 100k lookups and picks.
    let region = Region::new(GLOBAL);
    for _ in 0..100_000 {
        let service = snapshot
            .service(black_box("default"), black_box("db"))
            .expect("service");
        black_box(rr.candidates(service, Some("postgres"), 3).next());
    }
    let stats = region.change();
    println!(
        "pick path: {} allocations, {} bytes over 100000 picks",
        stats.allocations, stats.bytes_allocated
    );
    assert_eq!(stats.allocations, 0, "the pick path must not allocate");
    c.bench_function("lookup_and_pick_endpoint", |bench| {
        bench.iter(|| {
            let service = snapshot
                .service(black_box("default"), black_box("db"))
                .expect("service");
            let (endpoint, port) = rr
                .candidates(service, Some("postgres"), 3)
                .next()
                .expect("candidate");
            black_box((endpoint.ip, port))
        })
    });
}

/// Route, look up and pick for one HTTP request; returns the chosen instance's address.
fn http_pick(
    router: &Router,
    snapshot: &EndpointSnapshot,
    table: &BalancerTable,
    outlier: &OutlierConfig,
) -> std::net::SocketAddr {
    let mut buf = [0u8; MAX_HOST];
    let target = router
        .route(
            black_box("web.default.svc.cluster.local:8080"),
            black_box("/api/x"),
            &mut buf,
        )
        .expect("route");
    let service = snapshot
        .service(target.namespace, target.service)
        .expect("service");
    let balancer = table
        .get(target.service, target.namespace, target.port)
        .expect("balancer");
    let view = balancer.view(service);
    let pick = balancer.pick(&view, outlier).expect("pick");
    pick.attempt(0).expect("slot").addr
}

fn bench_http(c: &mut Criterion) {
    let mut b = SnapshotBuilder::new();
    for i in 0..3 {
        b.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/default/web/web-{i}"),
            value: format!(r#"{{"ip":"10.0.1.{}","ports":{{"http":8080}}}}"#, i + 1).into_bytes(),
            mod_revision: 2 + i,
        });
    }
    let snapshot = b.build(&EndpointSnapshot::default());
    let router = Router::new(&[], "cluster.local", std::time::Duration::from_secs(15), 2);
    let outlier = OutlierConfig {
        consecutive_failures: 5,
        base_ejection_time: std::time::Duration::from_secs(30),
        max_ejection_percent: 50,
        panic_threshold: 50,
        panic_mode: PanicMode::BalanceAll,
    };
    for balance in [Balance::RoundRobin, Balance::LeastRequest] {
        let metrics = HttpMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let table = BalancerTable::new(balance, Default::default(), metrics);
        // First request for a service builds its balancer and view (once per service/change).
        http_pick(&router, &snapshot, &table, &outlier);
        let region = Region::new(GLOBAL);
        for _ in 0..100_000 {
            black_box(http_pick(&router, &snapshot, &table, &outlier));
        }
        let stats = region.change();
        println!(
            "HTTP route+pick ({balance:?}): {} allocations, {} bytes over 100000 requests",
            stats.allocations, stats.bytes_allocated
        );
        assert_eq!(
            stats.allocations, 0,
            "the HTTP route/pick path must not allocate"
        );
        c.bench_function(&format!("http_route_and_pick_{balance:?}"), |bench| {
            bench.iter(|| black_box(http_pick(&router, &snapshot, &table, &outlier)))
        });
    }
}

criterion_group!(benches, bench, bench_http);
criterion_main!(benches);
