//! Criterion: picking an instance (round robin over the snapshot's healthy slice, port lookup)
//! — the per-connection work before connect. It allocates nothing.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
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

criterion_group!(benches, bench);
criterion_main!(benches);
