//! Criterion: the cost of the single writer — applying one event and publishing — at 100k
//! endpoints in 10k services. It must not grow with the total number of endpoints (only changed
//! services are rebuilt), and reads must be a plain `load()`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder};

fn event(service: usize, instance: usize, rev: i64) -> Event {
    Event {
        kind: EventKind::Put,
        key: format!("/svcd/v1/endpoints/default/svc-{service}/inst-{instance}"),
        value: format!(
            r#"{{"ip":"10.{}.{}.{}","ports":{{"http":8080}},"meta":{{"rev":"{rev}"}}}}"#,
            service / 256 % 256,
            service % 256,
            instance % 200 + 1
        )
        .into_bytes(),
        mod_revision: rev,
    }
}

fn loaded(services: usize, per_service: usize) -> (SnapshotBuilder, EndpointSnapshot, i64) {
    let mut builder = SnapshotBuilder::new();
    let mut rev = 1;
    for s in 0..services {
        for i in 0..per_service {
            rev += 1;
            builder.apply(&event(s, s * per_service + i, rev));
        }
    }
    let snapshot = builder.build(&EndpointSnapshot::default());
    (builder, snapshot, rev)
}

fn bench(c: &mut Criterion) {
    let (mut builder, mut snapshot, mut rev) = loaded(10_000, 10);
    c.bench_function("apply_one_event_and_publish_100k_endpoints", |b| {
        b.iter(|| {
            rev += 1;
            builder.apply(&event(rev as usize % 10_000, 7, rev));
            snapshot = builder.build(&snapshot);
            black_box(snapshot.revision)
        })
    });
    let (mut builder, mut snapshot, mut rev) = loaded(100, 10);
    c.bench_function("apply_one_event_and_publish_1k_endpoints", |b| {
        b.iter(|| {
            rev += 1;
            builder.apply(&event(rev as usize % 100, 7, rev));
            snapshot = builder.build(&snapshot);
            black_box(snapshot.revision)
        })
    });
    c.bench_function("lookup_service_in_100k_snapshot", |b| {
        let (_, snapshot, _) = loaded(10_000, 10);
        b.iter(|| {
            black_box(
                snapshot
                    .service(black_box("default"), black_box("svc-4242"))
                    .map(|s| s.healthy.len()),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
