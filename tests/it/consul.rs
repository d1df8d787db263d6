//! Discovery for the clients fleets already run: `GET /v1/prometheus/sd`, the Consul-compatible
//! API on `consul.listen` and Consul-style DNS names. Real clients (Prometheus, py-consul, the
//! npm `consul` package) are in [`clients`]; `dig` on the DNS names in [`dns`].

mod clients;
mod dns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::daemon::{http, Daemon};
use crate::support::{eventually, free_port};

/// A Consul-API answer: status, lower-cased headers, body.
#[derive(Debug)]
pub struct ConsulReply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl ConsulReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn index(&self) -> i64 {
        self.headers["x-consul-index"]
            .parse()
            .expect("X-Consul-Index")
    }
}

/// One HTTP/1.1 request with extra header lines (`"X-Consul-Token: t\r\n"`), answer with headers.
pub async fn consul(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
) -> ConsulReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("answered within 60s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    ConsulReply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A daemon with the Consul API on a free port (plus `extra` TOML after `[consul]`'s keys).
pub async fn with_consul(consul_keys: &str, extra: &str) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(&format!(
        "[consul]\nlisten = \"{addr}\"\n{consul_keys}{extra}"
    ))
    .await;
    (d, addr)
}

#[tokio::test]
async fn prometheus_sd_lists_served_instances_with_their_labels() {
    let scrape: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start_with_admin(&format!("metrics_listen = \"{scrape}\"\n"), "").await;
    d.put_instance(
        "web",
        "web-1",
        r#"{"ip":"10.0.0.1","ports":{"metrics":9100,"http":80},"tags":["v1","canary.x"],"meta":{"team":"a-b"},"node":"n1"}"#,
    )
    .await;
    d.put_instance(
        "web",
        "web-2",
        r#"{"ip":"10.0.0.2","ports":{"metrics":9100},"state":"draining"}"#,
    )
    .await;
    d.put_instance("db", "db-1", r#"{"ip":"fd00::3","ports":{"metrics":9187}}"#)
        .await;
    d.put_instance("db", "db-2", r#"{"ip":"10.0.0.4","ports":{"pg":5432}}"#)
        .await;

    // Where Prometheus reaches it: the metrics listener; the same answer on the admin API.
    let sd = http(scrape, "GET", "/v1/prometheus/sd", None)
        .await
        .unwrap();
    assert_eq!(sd.status, 200, "{}", sd.body);
    assert_eq!(sd.json(), d.get("/v1/prometheus/sd").await.json());
    let groups = sd.json();
    let targets: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["targets"][0].as_str().unwrap())
        .collect();
    // Served instances with a metrics port, by namespace and service: not the draining web-2,
    // not db-2 (no metrics port).
    assert_eq!(targets, ["[fd00::3]:9187", "10.0.0.1:9100"]);
    let labels = &groups[1]["labels"];
    for (k, v) in [
        ("__meta_svcd_service", "web"),
        ("__meta_svcd_namespace", "default"),
        ("__meta_svcd_instance", "web-1"),
        ("__meta_svcd_node", "n1"),
        ("__meta_svcd_state", "healthy"),
        ("__meta_svcd_tags", ",v1,canary.x,"),
        ("__meta_svcd_tag_v1", "true"),
        ("__meta_svcd_tag_canary_x", "true"),
        ("__meta_svcd_meta_team", "a-b"),
    ] {
        assert_eq!(labels[k], v, "{k} in {labels}");
    }

    let targets_of = |query: &'static str| {
        let d = &d;
        async move {
            let r = d.get(&format!("/v1/prometheus/sd{query}")).await;
            assert_eq!(r.status, 200, "{query}: {}", r.body);
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["targets"][0].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(targets_of("?state=draining").await, ["10.0.0.2:9100"]);
    assert_eq!(
        targets_of("?state=healthy,draining&service=web").await,
        ["10.0.0.1:9100", "10.0.0.2:9100"]
    );
    assert_eq!(targets_of("?port=pg").await, ["10.0.0.4:5432"]);
    assert_eq!(targets_of("?port=http").await, ["10.0.0.1:80"]);
    assert!(targets_of("?namespace=other").await.is_empty());
    let bad = d.get("/v1/prometheus/sd?state=dead").await;
    assert_eq!(
        (bad.status, bad.json()["field"].as_str()),
        (400, Some("state"))
    );
    // The metrics listener still serves no other part of the API.
    let api = http(scrape, "GET", "/v1/services", None).await.unwrap();
    assert_eq!(api.status, 404);
}

#[tokio::test]
async fn consul_api_answers_in_consuls_shapes_with_a_per_service_index() {
    let (d, addr) = with_consul("", "").await;
    d.put_instance(
        "web",
        "web-1",
        r#"{"ip":"10.0.0.1","ports":{"http":8080,"admin":9000},"tags":["v1"],"meta":{"team":"a"},"node":"n1","weight":3}"#,
    )
    .await;
    d.put_instance(
        "web",
        "web-2",
        r#"{"ip":"10.0.0.2","ports":{"grpc":9090},"tags":["v2"],"state":"draining"}"#,
    )
    .await;
    d.put_instance("db", "db-1", r#"{"ip":"10.0.0.3","ports":{"pg":5432}}"#)
        .await;

    let all = consul(addr, "GET", "/v1/health/service/web", "", None).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(all.headers["x-consul-knownleader"], "true");
    assert!(all.headers["x-consul-lastcontact"].parse::<u64>().is_ok());
    // The service's own index, the admin API's blocking index.
    let admin_index = d.get("/v1/services/default/web").await.json()["index"]
        .as_i64()
        .unwrap();
    assert_eq!(all.index(), admin_index);
    let entries = all.json();
    assert_eq!(entries.as_array().unwrap().len(), 2);
    let e = &entries[0];
    assert_eq!(e["Node"]["Node"], "n1");
    assert_eq!(e["Node"]["Address"], "10.0.0.1");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Service"]["ID"], "web-1");
    assert_eq!(e["Service"]["Service"], "web");
    assert_eq!(e["Service"]["Port"], 8080, "consul.port_name = http");
    assert_eq!(e["Service"]["Tags"], serde_json::json!(["v1"]));
    assert_eq!(e["Service"]["Meta"]["team"], "a");
    assert_eq!(e["Service"]["Weights"]["Passing"], 3);
    assert_eq!(e["Checks"][0]["Status"], "passing");
    assert_eq!(e["Checks"][0]["ServiceID"], "web-1");
    // Draining is critical; without an `http` port the first port by name is the Port.
    assert_eq!(entries[1]["Checks"][0]["Status"], "critical");
    assert_eq!(entries[1]["Service"]["Port"], 9090);

    let passing = consul(addr, "GET", "/v1/health/service/web?passing=1", "", None).await;
    let ids: Vec<String> = passing
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["web-1"]);
    let tagged = consul(addr, "GET", "/v1/health/service/web?tag=v2", "", None).await;
    assert_eq!(tagged.json()[0]["Service"]["ID"], "web-2");

    let catalog = consul(
        addr,
        "GET",
        "/v1/catalog/service/web?dc=dc1&stale",
        "",
        None,
    )
    .await;
    assert_eq!(catalog.status, 200, "{}", catalog.body);
    assert_eq!(catalog.json()[0]["ServiceAddress"], "10.0.0.1");
    assert_eq!(catalog.json()[0]["ServicePort"], 8080);
    assert_eq!(catalog.index(), admin_index);
    let services = consul(addr, "GET", "/v1/catalog/services", "", None).await;
    assert_eq!(
        services.json(),
        serde_json::json!({"db": [], "web": ["v1", "v2"]})
    );
    assert!(services.index() >= admin_index);

    // Another service's change leaves web's index where it was; web leaving moves it forward.
    d.put_instance("db", "db-2", r#"{"ip":"10.0.0.4"}"#).await;
    let again = consul(addr, "GET", "/v1/health/service/web", "", None).await;
    assert_eq!(again.index(), admin_index);
    for id in ["web-1", "web-2"] {
        let r = d
            .request(
                "DELETE",
                &format!("/v1/services/default/web/instances/{id}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let gone = consul(addr, "GET", "/v1/health/service/web", "", None).await;
    assert_eq!(gone.json(), serde_json::json!([]));
    assert!(gone.index() > admin_index, "never backwards");
    let never = consul(addr, "GET", "/v1/health/service/nothing", "", None).await;
    assert!(never.index() > 0);

    let me = consul(addr, "GET", "/v1/agent/self", "", None).await;
    assert_eq!(me.json()["Config"]["Datacenter"], "dc1");
    let leader = consul(addr, "GET", "/v1/status/leader", "", None).await;
    assert!(leader
        .json()
        .as_str()
        .unwrap()
        .ends_with(&format!(":{}", addr.port())));

    // What would change the answer and is not supported is refused, by name.
    let filter = consul(addr, "GET", "/v1/health/service/web?filter=x", "", None).await;
    assert_eq!(filter.status, 400);
    assert!(filter.body.contains("filter"), "{}", filter.body);
    let other_dc = consul(addr, "GET", "/v1/catalog/services?dc=eu1", "", None).await;
    assert_eq!(other_dc.status, 400);
    let kv = consul(addr, "GET", "/v1/kv/x", "", None).await;
    assert_eq!(kv.status, 404);
    assert!(kv.body.contains("docs/consul.md"), "{}", kv.body);
}

#[tokio::test]
async fn consul_api_takes_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start_with_admin(
        &format!("token_file = \"{}\"\n", token.display()),
        &format!("[consul]\nlisten = \"{addr}\"\n"),
    )
    .await;
    let none = consul(addr, "GET", "/v1/catalog/services", "", None).await;
    assert_eq!(none.status, 403);
    let wrong = consul(
        addr,
        "GET",
        "/v1/catalog/services",
        "X-Consul-Token: nope\r\n",
        None,
    )
    .await;
    assert_eq!(wrong.status, 403);
    for (headers, query) in [
        ("X-Consul-Token: s3cret\r\n", ""),
        ("Authorization: Bearer s3cret\r\n", ""),
        ("", "?token=s3cret"),
    ] {
        let ok = consul(
            addr,
            "GET",
            &format!("/v1/catalog/services{query}"),
            headers,
            None,
        )
        .await;
        assert_eq!(ok.status, 200, "{headers}{query}: {}", ok.body);
    }
    drop(d);
}

#[tokio::test]
async fn parked_blocking_queries_are_bounded_counted_and_woken_by_their_service() {
    let (d, addr) = with_consul("max_blocking_queries = 8\n", "").await;
    d.put_instance("web", "web-1", r#"{"ip":"10.0.0.1"}"#).await;
    let index = consul(addr, "GET", "/v1/health/service/web", "", None)
        .await
        .index();
    // A flood of 40 blocking queries: 8 park, 32 are refused at once.
    let path = format!("/v1/health/service/web?index={index}&wait=60s");
    let mut parked = Vec::new();
    for _ in 0..40 {
        let path = path.clone();
        parked.push(tokio::spawn(async move {
            consul(addr, "GET", &path, "", None).await
        }));
    }
    eventually(Duration::from_secs(10), "8 parked, 32 refused", || async {
        let waiting = d.metric("svcd_consul_blocking_queries").await?;
        let refused = d.metric("svcd_consul_blocking_refused_total").await?;
        (waiting == 8.0 && refused == 32.0).then_some(())
    })
    .await;
    // Another service's change wakes none of them.
    d.put_instance("db", "db-1", r#"{"ip":"10.0.0.3"}"#).await;
    assert_eq!(d.metric("svcd_consul_blocking_queries").await, Some(8.0));
    // Their own service's change answers every parked one, with the new instance.
    d.put_instance("web", "web-2", r#"{"ip":"10.0.0.2"}"#).await;
    let (mut woken, mut refused) = (0, 0);
    for task in parked {
        let r = task.await.unwrap();
        match r.status {
            200 => {
                assert!(r.index() > index);
                assert_eq!(r.json().as_array().unwrap().len(), 2, "{}", r.body);
                woken += 1;
            }
            429 => {
                assert!(r.body.contains("consul.max_blocking_queries"), "{}", r.body);
                refused += 1;
            }
            other => panic!("status {other}: {}", r.body),
        }
    }
    assert_eq!((woken, refused), (8, 32));
    assert_eq!(d.metric("svcd_consul_blocking_queries").await, Some(0.0));

    // A client that gives up frees its slot at once, not at the end of its wait.
    let index = consul(addr, "GET", "/v1/health/service/web", "", None)
        .await
        .index();
    let mut gone = TcpStream::connect(addr).await.unwrap();
    gone.write_all(
        format!("GET /v1/health/service/web?index={index}&wait=10m HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the query parks", || async {
        (d.metric("svcd_consul_blocking_queries").await? == 1.0).then_some(())
    })
    .await;
    drop(gone);
    eventually(
        Duration::from_secs(10),
        "its slot is given back",
        || async { (d.metric("svcd_consul_blocking_queries").await? == 0.0).then_some(()) },
    )
    .await;
}
