//! The clients fleets already run, against svcd: a real Prometheus (`http_sd_configs`),
//! py-consul and the npm `consul` package's watch. scripts/setup --with-etcd installs all three
//! under target/tools; a missing one fails the test with the hint.
//!
//! Debian's Prometheus is built without Consul service discovery ("Disable Consul SD until its
//! Debian package is back in shape", in its changelog): `consul_sd_configs` is a config error
//! there. The requests that discovery sends are replayed in
//! `prometheus_consul_sd_requests_are_answered` instead.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::with_consul;
use crate::support::daemon::{http, Daemon};
use crate::support::{assert_success, eventually, free_port};

fn tools() -> String {
    format!("{}/target/tools", env!("CARGO_MANIFEST_DIR"))
}

/// A tool under target/tools, or the hint to install it.
fn tool_path(rel: &str) -> String {
    let path = format!("{}/{rel}", tools());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} missing: run scripts/setup --with-etcd, which installs it"
    );
    path
}

/// Kills the child (Prometheus, node) when the test ends, however it ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `scrapePool` → the discovered labels of each active target, from Prometheus's API.
async fn discovered(prometheus: SocketAddr) -> Option<Vec<(String, serde_json::Value)>> {
    let r = http(prometheus, "GET", "/api/v1/targets?state=active", None)
        .await
        .ok()?;
    if r.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    Some(
        v["data"]["activeTargets"]
            .as_array()?
            .iter()
            .map(|t| {
                (
                    t["scrapePool"].as_str().unwrap_or("").to_string(),
                    t["discoveredLabels"].clone(),
                )
            })
            .collect(),
    )
}

/// The `__address__`es Prometheus found in `pool`, sorted.
fn addresses(targets: &[(String, serde_json::Value)], pool: &str) -> Vec<String> {
    let mut v: Vec<String> = targets
        .iter()
        .filter(|(p, _)| p == pool)
        .map(|(_, l)| l["__address__"].as_str().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_real_prometheus_finds_every_instance_through_http_sd() {
    let scrape: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start_with_admin(&format!("metrics_listen = \"{scrape}\"\n"), "").await;
    for (id, ip, tag) in [("web-1", "10.0.0.1", "v1"), ("web-2", "10.0.0.2", "v2")] {
        d.put_instance(
            "web",
            id,
            &format!(
                r#"{{"ip":"{ip}","ports":{{"metrics":9100,"http":8080}},"tags":["{tag}"],"meta":{{"team":"a"}},"node":"n-{id}"}}"#
            ),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1h\n  scrape_timeout: 1s\n\
             scrape_configs:\n\
             - job_name: svcd-http-sd\n  http_sd_configs:\n  - url: http://{scrape}/v1/prometheus/sd\n    refresh_interval: 1s\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Reap(
        Command::new(tool_path("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus"),
    );
    let prom_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    let found = eventually(
        Duration::from_secs(30),
        "Prometheus finds both instances",
        || async {
            let t = discovered(web).await?;
            (addresses(&t, "svcd-http-sd") == ["10.0.0.1:9100", "10.0.0.2:9100"]).then_some(t)
        },
    )
    .await;
    let label = |pool: &str, address: &str, key: &str| -> String {
        found
            .iter()
            .find(|(p, l)| p == pool && l["__address__"] == address)
            .map(|(_, l)| l[key].as_str().unwrap_or("<none>").to_string())
            .unwrap_or_else(|| panic!("{pool} {address}: {found:?}\n{}", prom_log()))
    };
    for (k, v) in [
        ("__meta_svcd_service", "web"),
        ("__meta_svcd_namespace", "default"),
        ("__meta_svcd_instance", "web-1"),
        ("__meta_svcd_node", "n-web-1"),
        ("__meta_svcd_state", "healthy"),
        ("__meta_svcd_tag_v1", "true"),
        ("__meta_svcd_meta_team", "a"),
    ] {
        assert_eq!(label("svcd-http-sd", "10.0.0.1:9100", k), v, "{k}");
    }
    // Deregistered: gone within the refresh interval (1s) plus the discovery manager's own
    // batching of updates (5s in Prometheus).
    let r = d
        .request("DELETE", "/v1/services/default/web/instances/web-2", None)
        .await;
    assert_eq!(r.status, 200);
    let gone = Instant::now();
    eventually(Duration::from_secs(20), "web-2 dropped", || async {
        let t = discovered(web).await?;
        (addresses(&t, "svcd-http-sd") == ["10.0.0.1:9100"]).then_some(())
    })
    .await;
    let took = gone.elapsed();
    eprintln!("Prometheus dropped the deregistered instance after {took:?}");
    assert!(took < Duration::from_secs(7), "dropped after {took:?}");
    assert!(
        !prom_log().contains("level=error"),
        "Prometheus logged errors:\n{}",
        prom_log()
    );
}

/// What Prometheus's `consul_sd_configs` asks (through hashicorp/consul/api): the agent's
/// datacenter, then the catalog and each service's health as blocking queries with `stale` and
/// a wait in milliseconds; it needs `X-Consul-Index` on each and reads the labels' fields.
#[tokio::test]
async fn prometheus_consul_sd_requests_are_answered() {
    let (d, consul) = with_consul("", "").await;
    d.put_instance(
        "web",
        "web-1",
        r#"{"ip":"10.0.0.1","ports":{"http":8080},"tags":["v1"],"meta":{"team":"a"},"node":"n1"}"#,
    )
    .await;
    let me = super::consul(consul, "GET", "/v1/agent/self", "", None).await;
    assert_eq!(me.json()["Config"]["Datacenter"], "dc1");
    let services = super::consul(
        consul,
        "GET",
        "/v1/catalog/services?dc=dc1&stale=&wait=120000ms",
        "",
        None,
    )
    .await;
    assert_eq!(services.status, 200, "{}", services.body);
    assert_eq!(services.json(), serde_json::json!({"web": ["v1"]}));
    let health = super::consul(
        consul,
        "GET",
        "/v1/health/service/web?dc=dc1&stale=&wait=120000ms",
        "",
        None,
    )
    .await;
    assert_eq!(health.status, 200, "{}", health.body);
    let e = &health.json()[0];
    // The fields its labels come from.
    for (field, want) in [
        (&e["Node"]["Node"], "n1"),
        (&e["Node"]["Address"], "10.0.0.1"),
        (&e["Node"]["Datacenter"], "dc1"),
        (&e["Service"]["ID"], "web-1"),
        (&e["Service"]["Service"], "web"),
        (&e["Service"]["Address"], "10.0.0.1"),
        (&e["Service"]["Meta"]["team"], "a"),
        (&e["Checks"][0]["Status"], "passing"),
    ] {
        assert_eq!(field, want, "{e}");
    }
    assert_eq!(e["Service"]["Port"], 8080);
    // The next round blocks on that index and answers at the change.
    let index = health.index();
    let waiting = tokio::spawn(async move {
        super::consul(
            consul,
            "GET",
            &format!("/v1/health/service/web?dc=dc1&stale=&wait=120000ms&index={index}"),
            "",
            None,
        )
        .await
    });
    eventually(Duration::from_secs(10), "the query parks", || async {
        (d.metric("svcd_consul_blocking_queries").await? == 1.0).then_some(())
    })
    .await;
    let r = d
        .request("DELETE", "/v1/services/default/web/instances/web-1", None)
        .await;
    assert_eq!(r.status, 200);
    let after = waiting.await.unwrap();
    assert!(after.index() > index);
    assert_eq!(after.json(), serde_json::json!([]));
}

/// The py-consul session: registration, a passing query, a blocking query woken by its own
/// service and not by another, deregistration. Prints one JSON object.
const PY_CONSUL: &str = r#"
import json, sys, threading, time, urllib.request
import consul

host, port, admin = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = consul.Consul(host=host, port=port)
out = {}
assert c.agent.service.register("web", service_id="web-1", address="10.0.0.1", port=8080,
                                tags=["v1"], meta={"team": "a"})
index, nodes = c.health.service("web", passing=True)
out["passing"] = [n["Service"]["ID"] for n in nodes]
out["status"] = nodes[0]["Checks"][0]["Status"]
out["port"] = nodes[0]["Service"]["Port"]
out["index"] = int(index)

def parked():
    body = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
    for line in body.splitlines():
        if line.startswith("svcd_consul_blocking_queries "):
            return float(line.split()[1])
    return 0.0

result = {}
def blocking():
    i, n = c.health.service("web", index=index, wait="30s")
    result["at"] = time.monotonic()
    result["index"] = int(i)
    result["ids"] = sorted(x["Service"]["ID"] for x in n)

t = threading.Thread(target=blocking)
t.start()
deadline = time.monotonic() + 10
while parked() < 1:
    assert time.monotonic() < deadline, "the blocking query never parked"
    time.sleep(0.01)
# Another service changes: web's query must sleep through it (it answers with web-2 below,
# which is registered only after db is visible).
assert c.agent.service.register("db", service_id="db-1", address="10.0.0.3", port=5432)
started = time.monotonic()
assert c.agent.service.register("web", service_id="web-2", address="10.0.0.2", port=8081)
t.join(10)
out["woken_ids"] = result["ids"]
out["woken_after"] = result["at"] - started
out["woken_index"] = result["index"]
out["agent_services"] = sorted(c.agent.services().keys())
assert c.agent.service.deregister("web-2")
_, nodes = c.health.service("web")
out["after_deregister"] = sorted(n["Service"]["ID"] for n in nodes)
try:
    c.agent.service.register("web", service_id="web-9", port=1, check={"TTL": "10s"})
    out["ttl_check"] = "accepted"
except Exception as e:
    out["ttl_check"] = str(e)
# A registration with a Consul TCP check: svcd's active check, warning (pending) until it passes.
admin_port = int(admin.rsplit(":", 1)[1])
assert c.agent.service.register("chk", service_id="chk-1", address="127.0.0.1", port=admin_port,
                                check=consul.Check.tcp("127.0.0.1", admin_port, "1s"))
_, nodes = c.health.service("chk")
out["check_first"] = nodes[0]["Checks"][0]["Status"]
deadline = time.monotonic() + 15
while not c.health.service("chk", passing=True)[1]:
    assert time.monotonic() < deadline, "the check never passed"
    time.sleep(0.05)
out["check_passed"] = True
print(json.dumps(out))
"#;

#[tokio::test]
async fn py_consul_registers_queries_and_blocks_on_its_own_service() {
    let (d, consul) = with_consul("", "").await;
    let out = tokio::task::spawn_blocking({
        let admin = d.admin.to_string();
        move || {
            Command::new(tool_path("venv/bin/python3"))
                .args([
                    "-c",
                    PY_CONSUL,
                    "127.0.0.1",
                    &consul.port().to_string(),
                    &admin,
                ])
                .output()
                .expect("python3")
        }
    })
    .await
    .unwrap();
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passing"], serde_json::json!(["web-1"]), "{v}");
    assert_eq!(v["status"], "passing");
    assert_eq!(v["port"], 8080);
    assert_eq!(v["woken_ids"], serde_json::json!(["web-1", "web-2"]), "{v}");
    let after = v["woken_after"].as_f64().unwrap();
    assert!(after < 1.0, "woken {after}s after the registration");
    assert!(v["woken_index"].as_i64() > v["index"].as_i64());
    assert_eq!(
        v["agent_services"],
        serde_json::json!(["db-1", "web-1", "web-2"])
    );
    assert_eq!(v["after_deregister"], serde_json::json!(["web-1"]));
    let ttl = v["ttl_check"].as_str().unwrap();
    assert!(ttl.contains("400") && ttl.contains("ttl"), "{ttl}");
    assert_eq!(
        v["check_first"], "warning",
        "pending until the check passes: {v}"
    );
    assert_eq!(v["check_passed"], true);
    let chk = d
        .get("/v1/services/default/chk/instances/chk-1")
        .await
        .json();
    assert_eq!(chk["ports"]["http"], d.admin.port());
    // Held by this daemon's lease, as any registration through its admin API.
    let web1 = d.get("/v1/services/default/web/instances/web-1").await;
    assert_eq!(web1.status, 200, "{}", web1.body);
    assert_eq!(web1.json()["ports"]["http"], 8080);
    assert_eq!(web1.json()["tags"], serde_json::json!(["v1"]));
}

/// Follows `health.service("web", passing)` and prints each change as `{"ids": [...]}` and each
/// error as `{"error": "..."}`.
const NODE_WATCH: &str = r#"
const Consul = require(process.argv[1] + "/node_modules/consul");
const consul = new Consul({ host: "127.0.0.1", port: Number(process.argv[2]) });
const watch = consul.watch({
  method: consul.health.service,
  options: { service: "web", passing: true, wait: "5s" },
});
watch.on("change", (data) => {
  console.log(JSON.stringify({ ids: data.map((e) => e.Service.ID).sort() }));
});
watch.on("error", (err) => console.log(JSON.stringify({ error: String(err) })));
"#;

/// The next watch event's instance ids; an error event fails the test.
async fn next(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("a watch event within 15s")
        .unwrap()
        .expect("the watch runs");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v.get("error").is_none(), "watch error: {v}");
    v["ids"].clone()
}

#[tokio::test]
async fn npm_consul_watch_follows_health_changes_without_errors() {
    let (d, consul) = with_consul("", "").await;
    d.put_instance("web", "web-1", r#"{"ip":"10.0.0.1","ports":{"http":80}}"#)
        .await;
    let mut child = tokio::process::Command::new("node")
        .args([
            "-e",
            NODE_WATCH,
            &tool_path("node"),
            &consul.port().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node (scripts/setup installs nodejs)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next(&mut lines).await, serde_json::json!(["web-1"]));
    // A change elsewhere is no change here: the next event is web's own.
    d.put_instance("db", "db-1", r#"{"ip":"10.0.0.3"}"#).await;
    d.put_instance("web", "web-2", r#"{"ip":"10.0.0.2","ports":{"http":80}}"#)
        .await;
    assert_eq!(
        next(&mut lines).await,
        serde_json::json!(["web-1", "web-2"])
    );
    let r = d
        .request(
            "POST",
            "/v1/services/default/web/instances/web-1/drain",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(next(&mut lines).await, serde_json::json!(["web-2"]));
    let r = d
        .request("DELETE", "/v1/services/default/web/instances/web-2", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(next(&mut lines).await, serde_json::json!([]));
}
