//! Criterion: picking an instance through `svcd-lb` as the proxies do — the L4 path (service
//! lookup in the snapshot, the listener's balancer, weighted round robin with the panic check:
//! the per-connection work of TCP and UDP listeners) and the HTTP path (route by Host, service
//! and balancer lookup, round robin or least request: the per-request work of the HTTP proxy).
//! Neither allocates: counted over 100k picks each, equal and unequal weights.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use svcd_config::{Balance, OutlierConfig, PanicMode};
use svcd_lb::{BalancerTable, LbMetrics, LoadBalancer, PortRule, SlotFactory};
use svcd_proxy::fds::FdBudget;
use svcd_proxy::http::metrics::{HttpMetrics, HttpSlots};
use svcd_proxy::http::route::{Router, MAX_HOST};
use svcd_proxy::{L4Slots, ProxyMetrics, Transport};
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder, SnapshotPublisher};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn outlier() -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: 5,
        base_ejection_time: std::time::Duration::from_secs(30),
        max_ejection_percent: 50,
        panic_threshold: 50,
        panic_mode: PanicMode::BalanceAll,
    }
}

/// A load balancer over a published snapshot of `service` with `n` instances; `weighted` gives
/// them weights 1, 2, 3, …
fn published(service: &str, n: usize, ports: &str, weighted: bool) -> Arc<LoadBalancer> {
    let mut b = SnapshotBuilder::new();
    for i in 0..n {
        let weight = if weighted { i + 1 } else { 1 };
        b.apply(&Event {
            kind: EventKind::Put,
            key: format!("/svcd/v1/endpoints/default/{service}/{service}-{i}"),
            value: format!(
                r#"{{"ip":"10.0.0.{}","ports":{{{ports}}},"weight":{weight}}}"#,
                i + 1
            )
            .into_bytes(),
            mod_revision: i as i64 + 2,
        });
    }
    let publisher = Arc::new(SnapshotPublisher::detached());
    publisher.publish_base(|prev| b.build(prev));
    LoadBalancer::new(publisher, outlier(), LbMetrics::detached())
}

fn assert_no_allocation(what: &str, mut f: impl FnMut()) {
    f(); // the first call builds the balancer and its view (once per service change)
    let region = Region::new(GLOBAL);
    for _ in 0..100_000 {
        f();
    }
    let stats = region.change();
    println!(
        "{what}: {} allocations, {} bytes over 100000 picks",
        stats.allocations, stats.bytes_allocated
    );
    assert_eq!(
        stats.allocations, 0,
        "{what}: the pick path must not allocate"
    );
}

/// One L4 connection's pick: snapshot lookup and balancer by the keys the listener made once
/// from its config, weighted round robin.
fn l4_pick<F: SlotFactory>(
    snapshot: &EndpointSnapshot,
    table: &BalancerTable<F>,
) -> std::net::SocketAddr {
    // As a listener does: the keys were made once, from its config.
    let service = snapshot
        .service_by_name(black_box("db.default"))
        .expect("service");
    let balancer = table.get_keyed(
        black_box("db.default:postgres"),
        "db",
        "default",
        Some("postgres"),
    );
    let view = balancer.view(service);
    let pick = balancer.pick(&view).expect("pick");
    pick.attempt(0).expect("slot").addr
}

fn bench_l4(c: &mut Criterion) {
    for weighted in [false, true] {
        let lb = published("db", 10, r#""postgres":5432,"metrics":9187"#, weighted);
        let slots = L4Slots {
            metrics: ProxyMetrics::new(&prometheus::Registry::new(), FdBudget::unlimited())
                .expect("metrics"),
            transport: Transport::Tcp,
            listener: "tcp/127.0.0.1:5432".into(),
        };
        let table = BalancerTable::new(&lb, slots, PortRule::Only);
        let snapshot = lb.reader().load_full();
        let name = if weighted {
            "l4_pick_weighted"
        } else {
            "l4_pick"
        };
        assert_no_allocation(name, || {
            black_box(l4_pick(&snapshot, &table));
        });
        c.bench_function(name, |bench| {
            bench.iter(|| black_box(l4_pick(&snapshot, &table)))
        });
    }
}

/// Route, look up and pick for one HTTP request; returns the chosen instance's address.
fn http_pick(
    router: &Router,
    snapshot: &EndpointSnapshot,
    table: &BalancerTable<HttpSlots>,
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
    let pick = balancer.pick(&view).expect("pick");
    pick.attempt(0).expect("slot").addr
}

fn bench_http(c: &mut Criterion) {
    let router = Router::new(&[], "cluster.local", std::time::Duration::from_secs(15), 2);
    for balance in [Balance::RoundRobin, Balance::LeastRequest] {
        let lb = published("web", 3, r#""http":8080"#, false);
        let metrics = HttpMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let table = BalancerTable::new(&lb, HttpSlots { metrics }, PortRule::Http);
        table.set_policies(balance, Default::default());
        let snapshot = lb.reader().load_full();
        let name = format!("http_route_and_pick_{balance:?}");
        assert_no_allocation(&name, || {
            black_box(http_pick(&router, &snapshot, &table));
        });
        c.bench_function(&name, |bench| {
            bench.iter(|| black_box(http_pick(&router, &snapshot, &table)))
        });
    }
}

criterion_group!(benches, bench_l4, bench_http);
criterion_main!(benches);
