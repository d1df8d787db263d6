//! The protocol state machine and the resources, on snapshots built in memory.

use std::sync::Arc;

use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder};

use crate::cache::{CacheWriter, XdsCache};
use crate::clients::Clients;
use crate::metrics::XdsMetrics;
use crate::names::ResourceType;
use crate::stream::{Rejected, StreamState};

fn put(b: &mut SnapshotBuilder, rev: i64, key: &str, value: &str) {
    b.apply(&Event {
        kind: EventKind::Put,
        key: format!("/svcd/v1/endpoints/{key}"),
        value: value.as_bytes().to_vec(),
        mod_revision: rev,
    });
    b.advance(rev);
}

fn delete(b: &mut SnapshotBuilder, rev: i64, key: &str) {
    b.apply(&Event {
        kind: EventKind::Delete,
        key: format!("/svcd/v1/endpoints/{key}"),
        value: Vec::new(),
        mod_revision: rev,
    });
    b.advance(rev);
}

struct Fixture {
    builder: SnapshotBuilder,
    last: Arc<EndpointSnapshot>,
    writer: CacheWriter,
    cache: XdsCache,
    metrics: XdsMetrics,
    clients: Arc<Clients>,
}

impl Fixture {
    fn new() -> Fixture {
        let (cache, writer) = XdsCache::new();
        let mut f = Fixture {
            builder: SnapshotBuilder::new(),
            last: Arc::new(EndpointSnapshot::default()),
            writer,
            cache,
            metrics: XdsMetrics::new(&prometheus::Registry::new()).unwrap(),
            clients: Arc::new(Clients::default()),
        };
        put(
            &mut f.builder,
            2,
            "default/echo/e1",
            r#"{"ip":"10.0.0.1","ports":{"grpc":5001},"weight":1,"meta":{"zone":"a"}}"#,
        );
        put(
            &mut f.builder,
            3,
            "default/echo/e2",
            r#"{"ip":"10.0.0.2","ports":{"grpc":5002},"weight":3,"state":"draining"}"#,
        );
        put(
            &mut f.builder,
            4,
            "default/web/w1",
            r#"{"ip":"10.0.1.1","ports":{"http":80,"admin":81}}"#,
        );
        f.publish();
        f
    }

    fn publish(&mut self) {
        let next = Arc::new(self.builder.build(&self.last));
        self.last = next.clone();
        self.writer.update(next);
    }

    fn stream(&self) -> StreamState {
        StreamState::new(
            None,
            100,
            Default::default(),
            "cluster.local".into(),
            self.metrics.clone(),
            self.clients.register("ads", "test".into()),
        )
    }

    fn ask(&self, s: &mut StreamState, r: DiscoveryRequest) -> Result<(), Rejected> {
        s.on_request(r, self.cache.load().as_deref())
    }

    /// Subscribes `s` to the ClusterLoadAssignment `name`, takes the first push and ACKs it.
    fn subscribe_and_ack(&self, s: &mut StreamState, name: &str) -> DiscoveryResponse {
        let kind = ResourceType::Endpoint;
        self.ask(s, request(kind, &[name], "", "")).unwrap();
        let first = self.push(s).unwrap();
        self.ask(s, request(kind, &[name], &first.version_info, &first.nonce))
            .unwrap();
        first
    }

    fn push(&self, s: &mut StreamState) -> Option<DiscoveryResponse> {
        s.next_push(&self.cache.load().unwrap())
            .map(|p| p.to_response())
    }
}

fn request(kind: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: kind.type_url().into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn names_of(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| match r.type_url.as_str() {
            u if u == ResourceType::Cluster.type_url() => {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(&a.value[..])
                    .unwrap()
                    .name
            }
            u if u == ResourceType::Endpoint.type_url() => {
                ClusterLoadAssignment::decode(&a.value[..])
                    .unwrap()
                    .cluster_name
            }
            u if u == ResourceType::Listener.type_url() => {
                Listener::decode(&a.value[..]).unwrap().name
            }
            _ => RouteConfiguration::decode(&a.value[..]).unwrap().name,
        })
        .collect()
}

#[test]
fn wildcard_cds_then_eds_by_name_with_acks_and_versions() {
    let f = Fixture::new();
    let mut s = f.stream();
    f.ask(&mut s, request(ResourceType::Cluster, &[], "", ""))
        .unwrap();
    let cds = f.push(&mut s).unwrap();
    assert_eq!(
        names_of(&cds),
        ["echo.default:grpc", "web.default:admin", "web.default:http"]
    );
    assert_eq!(cds.version_info, "4");
    assert!(f.push(&mut s).is_none(), "one response per request");
    // ACK: nothing is re-sent.
    f.ask(&mut s, request(ResourceType::Cluster, &[], "4", &cds.nonce))
        .unwrap();
    assert!(f.push(&mut s).is_none());
    assert_eq!(f.metrics.acks.with_label_values(&["cluster"]).get(), 1);

    f.ask(
        &mut s,
        request(ResourceType::Endpoint, &["echo.default:grpc"], "", ""),
    )
    .unwrap();
    let eds = f.push(&mut s).unwrap();
    assert_eq!(names_of(&eds), ["echo.default:grpc"]);
    let cla = ClusterLoadAssignment::decode(&eds.resources[0].value[..]).unwrap();
    // Each instance in its own locality (zone, node), weighted by its instances' weights;
    // draining is announced as DRAINING.
    let mut seen: Vec<(u32, i32, u32)> = cla
        .endpoints
        .iter()
        .flat_map(|l| {
            l.lb_endpoints.iter().map(move |e| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("no endpoint")
                };
                let _ = ep;
                (
                    l.load_balancing_weight.as_ref().unwrap().value,
                    e.health_status,
                    e.load_balancing_weight.as_ref().unwrap().value,
                )
            })
        })
        .collect();
    seen.sort();
    assert_eq!(seen, [(1, 1, 1), (3, 3, 3)]);
    // The localities: e1's registration names zone `a`; e2 names none.
    let mut localities: Vec<(String, String, u32)> = cla
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().expect("a locality");
            let ports: Vec<u32> = l
                .lb_endpoints
                .iter()
                .map(|e| e.load_balancing_weight.as_ref().unwrap().value)
                .collect();
            assert_eq!(ports.len(), 1);
            (loc.region.clone(), loc.zone.clone(), ports[0])
        })
        .collect();
    localities.sort();
    assert_eq!(
        localities,
        [
            (String::new(), String::new(), 3),
            (String::new(), "a".to_string(), 1)
        ]
    );
}

#[test]
fn nack_is_counted_and_recorded_and_the_client_is_not_re_sent() {
    let f = Fixture::new();
    let mut s = f.stream();
    f.ask(&mut s, request(ResourceType::Cluster, &[], "", ""))
        .unwrap();
    let cds = f.push(&mut s).unwrap();
    let mut nack = request(ResourceType::Cluster, &[], "", &cds.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad cluster".into(),
        details: vec![],
    });
    f.ask(&mut s, nack.clone()).unwrap();
    assert!(f.push(&mut s).is_none());
    assert_eq!(f.metrics.nacks.with_label_values(&["cluster"]).get(), 1);
    let clients = f.clients.list();
    let recorded = clients[0].types["cluster"].last_nack.as_ref().unwrap();
    assert_eq!(recorded.error, "bad cluster");
    assert_eq!(recorded.rejected_version, "4");
    // The same NACK again (a replay, or a subscription change naming the same nonce): counted
    // once; a client's huge message is kept cut.
    nack.error_detail.as_mut().unwrap().message = "x".repeat(1 << 20);
    for _ in 0..3 {
        f.ask(&mut s, nack.clone()).unwrap();
    }
    assert_eq!(f.metrics.nacks.with_label_values(&["cluster"]).get(), 1);
    let mut long = request(ResourceType::Cluster, &[], "", "");
    long.type_url = "t".repeat(1 << 20);
    let rejected = f.ask(&mut f.stream(), long).unwrap_err().to_string();
    assert!(rejected.len() < 1024, "{} bytes", rejected.len());
    // A stale nonce is ignored: neither ACK nor NACK.
    f.ask(&mut s, request(ResourceType::Cluster, &[], "4", "999"))
        .unwrap();
    assert_eq!(f.metrics.acks.with_label_values(&["cluster"]).get(), 0);
}

#[test]
fn names_that_appear_later_are_pushed_then_and_only_changes_are_pushed() {
    let mut f = Fixture::new();
    let mut s = f.stream();
    let first = f.subscribe_and_ack(&mut s, "new.default:grpc");
    assert!(first.resources.is_empty());
    assert_eq!(first.version_info, "4");
    // A change to another service: nothing for this client.
    put(
        &mut f.builder,
        5,
        "default/web/w2",
        r#"{"ip":"10.0.1.2","ports":{"http":80}}"#,
    );
    f.publish();
    s.on_change();
    assert!(f.push(&mut s).is_none());
    // Its service appears: pushed.
    put(
        &mut f.builder,
        6,
        "default/new/n1",
        r#"{"ip":"10.0.2.1","ports":{"grpc":7000}}"#,
    );
    f.publish();
    s.on_change();
    let pushed = f.push(&mut s).unwrap();
    assert_eq!(names_of(&pushed), ["new.default:grpc"]);
    assert_eq!(pushed.version_info, "6");
    // Another instance: only the changed assignment is pushed (EDS is not wildcard).
    f.ask(
        &mut s,
        request(
            ResourceType::Endpoint,
            &["new.default:grpc", "web.default:http"],
            "6",
            &pushed.nonce,
        ),
    )
    .unwrap();
    let both = f.push(&mut s).unwrap();
    assert_eq!(names_of(&both), ["new.default:grpc", "web.default:http"]);
    put(
        &mut f.builder,
        7,
        "default/new/n2",
        r#"{"ip":"10.0.2.2","ports":{"grpc":7000}}"#,
    );
    f.publish();
    s.on_change();
    assert_eq!(names_of(&f.push(&mut s).unwrap()), ["new.default:grpc"]);
    // It leaves: nothing on EDS (its cluster leaves CDS, which tells clients).
    delete(&mut f.builder, 8, "default/new/n1");
    delete(&mut f.builder, 9, "default/new/n2");
    f.publish();
    s.on_change();
    assert!(f.push(&mut s).is_none());
}

#[test]
fn listener_names_resolve_grpc_targets_to_routes_and_clusters() {
    let f = Fixture::new();
    let mut s = f.stream();
    let targets = [
        "echo.default.svc.cluster.local",
        "echo.default",
        "echo.default:grpc",
        "echo.default:5001",
        "web.default",
        "nope.default",
    ];
    f.ask(&mut s, request(ResourceType::Listener, &targets, "", ""))
        .unwrap();
    let lds = f.push(&mut s).unwrap();
    // web has two ports and none named grpc: no default; nope does not exist.
    let mut expected = targets[..4].to_vec();
    expected.sort();
    assert_eq!(names_of(&lds), expected);
    f.ask(
        &mut s,
        request(
            ResourceType::Route,
            &["echo.default.svc.cluster.local"],
            "",
            "",
        ),
    )
    .unwrap();
    let rds = f.push(&mut s).unwrap();
    let route = RouteConfiguration::decode(&rds.resources[0].value[..]).unwrap();
    let action = route.virtual_hosts[0].routes[0].action.clone().unwrap();
    let route::Action::Route(action) = action else {
        panic!("not a route")
    };
    assert_eq!(
        action.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster(
            "echo.default:grpc".into()
        ))
    );
}

#[test]
fn requests_past_the_limits_end_the_stream() {
    let f = Fixture::new();
    let mut s = f.stream();
    let many: Vec<String> = (0..101).map(|i| format!("s{i}.default:grpc")).collect();
    let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        f.ask(&mut s, request(ResourceType::Endpoint, &names, "", "")),
        Err(Rejected::TooManyNames {
            count: 101,
            limit: 100
        })
    );
    let mut odd = request(ResourceType::Cluster, &[], "", "");
    odd.type_url = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into();
    assert!(matches!(f.ask(&mut s, odd), Err(Rejected::UnknownType(_))));
}

#[test]
fn a_slow_stream_folds_changes_into_one_push_of_the_newest_state() {
    let mut f = Fixture::new();
    let mut s = f.stream();
    f.ask(
        &mut s,
        request(ResourceType::Endpoint, &["web.default:http"], "", ""),
    )
    .unwrap();
    // Three changes arrive before the stream has room to push.
    for (rev, id) in [(5, "w2"), (6, "w3"), (7, "w4")] {
        put(
            &mut f.builder,
            rev,
            &format!("default/web/{id}"),
            r#"{"ip":"10.0.1.9","ports":{"http":80}}"#,
        );
        f.publish();
        s.on_change();
    }
    let pushed = f.push(&mut s).unwrap();
    assert_eq!(pushed.version_info, "7");
    assert!(f.push(&mut s).is_none());
}

#[test]
fn an_ejection_on_this_node_is_pushed_though_the_revision_did_not_move() {
    let mut f = Fixture::new();
    let mut s = f.stream();
    let first = f.subscribe_and_ack(&mut s, "web.default:http");
    assert_eq!(first.version_info, "4");
    // What the publisher does for an ejection: the same revision, the service replaced.
    let web = f.last.service("default", "web").unwrap();
    let ejection = svcd_registry::Ejection {
        holders: vec!["http"],
        reason: "5xx".into(),
        since: std::time::SystemTime::now(),
        until: std::time::SystemTime::now(),
        count: 1,
    };
    let ejected = svcd_registry::ServiceEndpoints::new(
        web.namespace.clone(),
        web.service.clone(),
        web.all.clone(),
        [(Box::<str>::from("w1"), Arc::new(ejection))].into(),
        web.revision,
    );
    let next = Arc::new(f.last.with_services([("web.default", Arc::new(ejected))]));
    f.last = next.clone();
    f.writer.update(next);
    s.on_change();
    let pushed = f.push(&mut s).unwrap();
    assert_eq!(pushed.version_info, "4.1");
    let cla = ClusterLoadAssignment::decode(&pushed.resources[0].value[..]).unwrap();
    assert_eq!(
        cla.endpoints[0].lb_endpoints[0].health_status,
        envoy_types::pb::envoy::config::core::v3::HealthStatus::Unhealthy as i32
    );
}

/// 600 services of one instance each, and a stream subscribed to all their assignments whose
/// EDS pushes are cut at `cut` bytes; the names, sorted.
fn six_hundred_subscribed(cut: usize) -> (Fixture, StreamState, Vec<String>) {
    let mut f = Fixture::new();
    for i in 0..600 {
        put(
            &mut f.builder,
            10 + i,
            &format!("default/s{i}/a"),
            r#"{"ip":"10.9.0.1","ports":{"http":80}}"#,
        );
    }
    f.publish();
    let mut names: Vec<String> = (0..600).map(|i| format!("s{i}.default:http")).collect();
    names.sort();
    let mut s = StreamState::new(
        None,
        1000,
        Default::default(),
        "cluster.local".into(),
        f.metrics.clone(),
        f.clients.register("ads", "test".into()),
    )
    .cut_eds_at(cut);
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    f.ask(&mut s, request(ResourceType::Endpoint, &refs, "", ""))
        .unwrap();
    (f, s, names)
}

#[test]
fn a_large_eds_push_is_cut_into_parts_that_together_hold_everything() {
    const CUT: usize = 8 * 1024;
    let (mut f, mut s, names) = six_hundred_subscribed(CUT);
    let mut got = Vec::new();
    let mut parts = 0;
    while let Some(r) = f.push(&mut s) {
        assert!(r.encoded_len() < 2 * CUT);
        got.extend(names_of(&r));
        parts += 1;
    }
    assert!(parts > 1, "one response of {} resources", got.len());
    got.sort();
    assert_eq!(got, names);
    // All sent: a change pushes just the changed assignment.
    put(
        &mut f.builder,
        700,
        "default/s3/b",
        r#"{"ip":"10.9.0.2","ports":{"http":80}}"#,
    );
    f.publish();
    s.on_change();
    assert_eq!(names_of(&f.push(&mut s).unwrap()), ["s3.default:http"]);
    assert!(f.push(&mut s).is_none());
}

#[test]
fn a_change_to_a_part_already_sent_is_pushed_after_the_last_part() {
    let (mut f, mut s, _) = six_hundred_subscribed(8 * 1024);
    let first = f.push(&mut s).unwrap();
    let sent = names_of(&first);
    assert!(sent.len() < 600, "the push is cut");
    // A resource of the part already sent changes while the rest is still to go.
    let changed = sent[0].trim_end_matches(".default:http").to_string();
    put(
        &mut f.builder,
        700,
        &format!("default/{changed}/b"),
        r#"{"ip":"10.9.0.2","ports":{"http":80}}"#,
    );
    f.publish();
    s.on_change();
    let mut later = Vec::new();
    while let Some(r) = f.push(&mut s) {
        later.push(names_of(&r));
    }
    let last = later.last().expect("more parts");
    assert_eq!(
        last,
        &vec![sent[0].clone()],
        "after the parts, the change to {changed}: {later:?}"
    );
}

#[test]
fn duplicate_names_are_answered_once_and_pending_instances_are_left_out() {
    let mut f = Fixture::new();
    put(
        &mut f.builder,
        9,
        "default/echo/e3",
        r#"{"ip":"10.0.0.3","ports":{"grpc":5003},"state":"pending"}"#,
    );
    f.publish();
    let echo = f.last.service("default", "echo").unwrap();
    let e3 = echo
        .all
        .iter()
        .find(|e| &*e.id == "e3")
        .expect("e3 registered");
    assert_eq!(echo.served_state(e3), svcd_registry::ServedState::Pending);
    let mut s = f.stream();
    let names = ["echo.default:grpc", "echo.default:grpc", "web.default:http"];
    f.ask(&mut s, request(ResourceType::Endpoint, &names, "", ""))
        .unwrap();
    let eds = f.push(&mut s).unwrap();
    assert_eq!(names_of(&eds), ["echo.default:grpc", "web.default:http"]);
    let cla = ClusterLoadAssignment::decode(&eds.resources[0].value[..]).unwrap();
    let hosts: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(hosts, 2, "e1 and e2; e3 awaits its first check");
}

#[test]
fn listeners_and_routes_are_built_once_per_snapshot_for_every_stream() {
    let mut f = Fixture::new();
    let names: Vec<Arc<str>> = vec!["echo.default.svc.cluster.local".into(), "nope.x".into()];
    let snapshot = f.cache.load().unwrap();
    for kind in [ResourceType::Listener, ResourceType::Route] {
        let a = snapshot.select(kind, Some(&names), "cluster.local");
        let b = snapshot.select(kind, Some(&names), "cluster.local");
        assert_eq!(a.len(), 1, "the name that resolves");
        assert!(Arc::ptr_eq(&a[0], &b[0]), "{kind:?} built twice");
    }
    let wildcard = snapshot.select(ResourceType::Listener, None, "cluster.local");
    assert!(!wildcard.is_empty());
    // The next snapshot builds anew (what a name resolves to may have changed).
    put(
        &mut f.builder,
        20,
        "default/echo/e9",
        r#"{"ip":"10.0.0.9","ports":{"grpc":5009}}"#,
    );
    f.publish();
    let next = f.cache.load().unwrap();
    let c = next.select(ResourceType::Listener, Some(&names), "cluster.local");
    let a = snapshot.select(ResourceType::Listener, Some(&names), "cluster.local");
    assert!(!Arc::ptr_eq(&a[0], &c[0]));
    assert_eq!(a[0].hash, c[0].hash, "the same bytes");
}
