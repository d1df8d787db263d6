//! Criterion: picking an instance (round robin over the snapshot's healthy slice, port lookup)
//! — the per-connection work before connect. It allocates nothing.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use svcd_proxy::pick::RoundRobin;
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder};

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
