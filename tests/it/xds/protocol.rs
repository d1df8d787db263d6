//! xDS protocol edge cases with a light ADS client (tonic, the envoy-types protos): a NACK,
//! names that do not exist yet, 200 streams holding every cluster, a client that stops reading,
//! and the stream limit.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::support::daemon::Daemon;
use crate::support::{eventually, free_port};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// One ADS stream: requests go in through `tx`, responses come out of `rx`.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to xds.listen")
}

async fn open(channel: Channel, node: &str) -> Result<Ads, tonic::Status> {
    let (tx, requests) = mpsc::channel(16);
    let mut first = request(CDS, &[], "", "");
    first.node = Some(Node {
        id: node.into(),
        ..Default::default()
    });
    tx.send(first).await.unwrap();
    let rx = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(requests))
        .await?
        .into_inner();
    Ok(Ads { tx, rx })
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

impl Ads {
    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .expect("stream open")
            .expect("a response")
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.tx
            .send(request(&r.type_url, names, &r.version_info, &r.nonce))
            .await
            .unwrap();
    }
}

async fn daemon(extra: &str) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start(&format!("[xds]\nlisten = \"127.0.0.1:{port}\"\n{extra}")).await;
    (d, port)
}

async fn put(d: &Daemon, svc: &str, id: &str, port: u16) {
    d.put_instance(
        svc,
        id,
        &format!(r#"{{"ip":"127.0.0.1","ports":{{"http":{port}}}}}"#),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_recorded_and_names_that_appear_later_are_pushed() {
    let (d, port) = daemon("").await;
    put(&d, "web", "w1", 8001).await;
    let mut ads = open(channel(port).await, "nacker").await.unwrap();
    let cds = ads.next().await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.resources.len(), 1);
    // NACK it: counted, shown, not re-sent.
    let mut nack = request(CDS, &[], "", &cds.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "rejected on purpose".into(),
        details: vec![],
    });
    ads.tx.send(nack).await.unwrap();
    eventually(Duration::from_secs(5), "the NACK counted", || async {
        (d.metric("svcd_xds_nacks_total{type=\"cluster\"}").await == Some(1.0)).then_some(())
    })
    .await;
    let clients = d.get("/v1/xds/clients").await.json();
    let c = &clients["clients"][0];
    assert_eq!(c["node_id"], "nacker");
    assert_eq!(
        c["types"]["cluster"]["last_nack"]["error"],
        "rejected on purpose"
    );

    // A name that does not exist yet: an empty answer, then the resource once it appears.
    ads.tx
        .send(request(EDS, &["later.default:http"], "", ""))
        .await
        .unwrap();
    let eds = ads.next().await;
    assert_eq!(eds.type_url, EDS);
    assert!(eds.resources.is_empty());
    ads.ack(&eds, &["later.default:http"]).await;
    put(&d, "later", "l1", 8002).await;
    // CDS (wildcard) changes too: the new cluster, then its endpoints.
    let mut got_eds = None;
    for _ in 0..3 {
        let r = ads.next().await;
        if r.type_url == EDS {
            got_eds = Some(r);
            break;
        }
    }
    let eds = got_eds.expect("the new name pushed");
    assert_eq!(eds.resources.len(), 1);
    assert!(eds.version_info.parse::<i64>().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_holding_every_cluster_all_get_a_change() {
    let (d, port) = daemon("").await;
    for i in 0..20 {
        put(&d, &format!("s{i}"), "a", 9000 + i).await;
    }
    let names: Vec<String> = (0..20).map(|i| format!("s{i}.default:http")).collect();
    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    // 200 streams over 10 connections.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(channel(port).await);
    }
    let mut streams = Vec::new();
    for i in 0..200 {
        let mut ads = open(channels[i % 10].clone(), &format!("n{i}"))
            .await
            .unwrap();
        let cds = ads.next().await;
        assert_eq!(cds.resources.len(), 20);
        ads.ack(&cds, &[]).await;
        ads.tx.send(request(EDS, &names, "", "")).await.unwrap();
        let eds = ads.next().await;
        assert_eq!(eds.resources.len(), 20);
        ads.ack(&eds, &names).await;
        streams.push(ads);
    }
    assert_eq!(d.metric("svcd_xds_streams").await, Some(200.0));
    // One change: every stream gets the new endpoints (and only EDS: no cluster changed).
    put(&d, "s7", "b", 9100).await;
    let mut versions = Vec::new();
    for ads in &mut streams {
        let r = ads.next().await;
        assert_eq!(r.type_url, EDS);
        // Only the changed assignment (EDS responses need not repeat unchanged ones).
        assert_eq!(r.resources.len(), 1);
        ads.ack(&r, &names).await;
        versions.push(r.version_info);
    }
    versions.dedup();
    assert_eq!(versions.len(), 1, "{versions:?}");
    eventually(Duration::from_secs(10), "every push ACKed", || async {
        let acks = d.metric("svcd_xds_acks_total{type=\"endpoint\"}").await?;
        (acks >= 400.0).then_some(())
    })
    .await;
    // Each stream was pushed its first assignments and the change (400 EDS pushes, 200 CDS),
    // and every ACK was timed.
    assert_eq!(
        d.metric("svcd_xds_pushes_total{type=\"endpoint\"}").await,
        Some(400.0)
    );
    assert_eq!(
        d.metric("svcd_xds_pushes_total{type=\"cluster\"}").await,
        Some(200.0)
    );
    assert_eq!(
        d.metric("svcd_xds_push_ack_seconds_count{type=\"endpoint\"}")
            .await,
        Some(400.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_nothing_up() {
    let (d, port) = daemon("").await;
    // Many endpoints (a ~10 KB assignment), so what the stalled stream does not read soon
    // exceeds its HTTP/2 window and hyper's send buffer, and svcd's own queue fills.
    for i in 0..200u16 {
        d.put_instance(
            "big",
            &format!("i{i}"),
            &format!(
                r#"{{"ip":"127.0.0.{}","ports":{{"http":{}}}}}"#,
                i + 1,
                8000 + i
            ),
        )
        .await;
    }
    let mut stalled = open(channel(port).await, "stalled").await.unwrap();
    let first = stalled.next().await;
    stalled.ack(&first, &[]).await;
    stalled
        .tx
        .send(request(EDS, &["big.default:http"], "", ""))
        .await
        .unwrap();
    // From here on `stalled` is never read again. `reader` reads and ACKs everything.
    let mut reader = open(channel(port).await, "reader").await.unwrap();
    let cds = reader.next().await;
    reader.ack(&cds, &[]).await;
    reader
        .tx
        .send(request(EDS, &["big.default:http"], "", ""))
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        while let Ok(Some(r)) = reader.rx.message().await {
            let names: &[&str] = if r.type_url == EDS {
                &["big.default:http"]
            } else {
                &[]
            };
            if reader
                .tx
                .send(request(&r.type_url, names, &r.version_info, &r.nonce))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let rss_before = d.rss_kib();
    for round in 0..300u16 {
        d.put_instance(
            "big",
            "i0",
            &format!(
                r#"{{"ip":"127.0.0.1","ports":{{"http":{}}}}}"#,
                10_000 + round
            ),
        )
        .await;
    }
    // The reader converges on the newest state while the stalled stream still sits there.
    eventually(
        Duration::from_secs(10),
        "the reader ACKed the newest version",
        || reader_caught_up(&d),
    )
    .await;
    let superseded = d.metric("svcd_xds_pushes_superseded_total").await.unwrap();
    assert!(superseded > 0.0, "changes folded for the stalled stream");
    let grown = d.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 20 * 1024,
        "RSS grew {grown} KiB with a stalled client"
    );
    assert_eq!(d.metric("svcd_xds_streams").await, Some(2.0));
    drop(stalled);
    reading.abort();
}

/// `Some` once the `reader` stream ACKed the last endpoint version sent to it, and that is at
/// least as new as anything sent to the stalled stream.
async fn reader_caught_up(d: &Daemon) -> Option<()> {
    let clients = d.get("/v1/xds/clients").await.json();
    let find = |node: &str| {
        clients["clients"]
            .as_array()?
            .iter()
            .find(|c| c["node_id"] == node)
            .map(|c| c["types"]["endpoint"].clone())
    };
    let (reader, stalled) = (find("reader")?, find("stalled")?);
    let version = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<i64>().ok());
    let sent = version(&reader["sent_version"])?;
    (version(&reader["acked_version"]) == Some(sent) && sent >= version(&stalled["sent_version"])?)
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused_and_counted() {
    let (d, port) = daemon("max_streams = 3\n").await;
    let ch = channel(port).await;
    let mut open_streams = Vec::new();
    for i in 0..3 {
        let mut ads = open(ch.clone(), &format!("n{i}")).await.unwrap();
        ads.next().await;
        open_streams.push(ads);
    }
    let refused = match open(ch.clone(), "n3").await {
        Err(status) => status,
        Ok(mut ads) => ads.rx.message().await.expect_err("refused"),
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert_eq!(d.metric("svcd_xds_streams_refused_total").await, Some(1.0));
    // A stream that ends frees its slot.
    drop(open_streams.pop());
    eventually(Duration::from_secs(5), "a slot freed", || async {
        (d.metric("svcd_xds_streams").await == Some(2.0)).then_some(())
    })
    .await;
    let mut again = open(ch, "n4").await.unwrap();
    again.next().await;
    // Connections too: the channel holds one of three; of three more that never open a
    // stream, the last is closed at accept and counted.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    eventually(Duration::from_secs(5), "a connection refused", || async {
        (d.metric("svcd_xds_connections_refused_total").await == Some(1.0)).then_some(())
    })
    .await;
    let mut closed = idle.pop().unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut closed, &mut byte),
    )
    .await
    .expect("closed by svcd");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

async fn next_of(rx: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a response within 10 s")
        .expect("stream open")
        .expect("a response")
}

/// `curl --http2-prior-knowledge` against `path` with `body` (gRPC-framed or not): the response
/// head and trailers as curl dumps them.
async fn raw_http2(port: u16, method: &str, path: &str, body: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-X",
            method,
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", file.path().display()))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_cds_and_eds_streams_and_what_svcd_does_not_serve() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
    use prost::Message;

    let (d, port) = daemon("").await;
    put(&d, "web", "w1", 8001).await;
    let ch = channel(port).await;

    // CDS on its own stream; the type URL may be left out there.
    let (cds_tx, requests) = mpsc::channel(4);
    cds_tx.send(request("", &[], "", "")).await.unwrap();
    let mut cds = ClusterDiscoveryServiceClient::new(ch.clone())
        .stream_clusters(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let r = next_of(&mut cds).await;
    assert_eq!(r.type_url, CDS);
    let clusters: Vec<String> = r
        .resources
        .iter()
        .map(|a| Cluster::decode(&a.value[..]).unwrap().name)
        .collect();
    assert_eq!(clusters, ["web.default:http"]);

    // EDS on its own stream, by name; a change is pushed after the ACK.
    let (eds_tx, requests) = mpsc::channel(4);
    eds_tx
        .send(request("", &["web.default:http"], "", ""))
        .await
        .unwrap();
    let mut eds = EndpointDiscoveryServiceClient::new(ch.clone())
        .stream_endpoints(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let ports = |r: &DiscoveryResponse| -> Vec<u32> {
        assert_eq!(r.type_url, EDS);
        let cla = ClusterLoadAssignment::decode(&r.resources[0].value[..]).unwrap();
        let mut ports: Vec<u32> = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
                use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!()
                };
                let Some(address::Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    panic!()
                };
                let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                    panic!()
                };
                p
            })
            .collect();
        ports.sort_unstable();
        ports
    };
    let first = next_of(&mut eds).await;
    assert_eq!(ports(&first), [8001]);
    eds_tx
        .send(request(
            EDS,
            &["web.default:http"],
            &first.version_info,
            &first.nonce,
        ))
        .await
        .unwrap();
    put(&d, "web", "w2", 8002).await;
    assert_eq!(ports(&next_of(&mut eds).await), [8001, 8002]);

    // Delta xDS and REST-style fetch are not served.
    let (_delta_tx, requests) = mpsc::channel(1);
    let delta = AggregatedDiscoveryServiceClient::new(ch.clone())
        .delta_aggregated_resources(ReceiverStream::new(requests))
        .await;
    let code = match delta {
        Err(status) => status.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, tonic::Code::Unimplemented);
    let fetch = ClusterDiscoveryServiceClient::new(ch)
        .fetch_clusters(request(CDS, &[], "", ""))
        .await
        .unwrap_err();
    assert_eq!(fetch.code(), tonic::Code::Unimplemented);

    // Not gRPC, and not a DiscoveryRequest: told why, counted; the other streams go on.
    let ads_path =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    let head = raw_http2(port, "GET", ads_path, b"").await;
    assert!(head.starts_with("http/2 415"), "{head}");
    let garbage = [0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
    let reply = raw_http2(port, "POST", ads_path, &garbage).await;
    assert!(reply.contains("grpc-status: 3"), "{reply}");
    assert!(reply.contains("malformed%20discoveryrequest"), "{reply}");
    assert_eq!(
        d.metric("svcd_xds_requests_rejected_total{reason=\"malformed\"}")
            .await,
        Some(1.0)
    );
    put(&d, "web", "w3", 8003).await;
    let r = next_of(&mut eds).await;
    assert_eq!(ports(&r), [8001, 8002, 8003]);
    drop(cds_tx);
}
