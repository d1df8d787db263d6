//! The registration API as clients use it: read your writes (a `svcd register` followed at once
//! by `svcd list` sees it), blocking queries and `svcd watch`, and no empty listing from a daemon
//! that has not synced yet. Against a real etcd, where the watch is the slower path.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::support::daemon::Daemon;
use crate::support::etcd::Etcd;
use crate::support::{eventually, free_port, svcd_bin};

fn etcd_config(endpoint: &str) -> String {
    format!("[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_write_is_visible_here_when_the_api_answers() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    for i in 0..30 {
        let id = format!("w{i}");
        let port = format!("http={}", 9000 + i);
        stdout(&d.cli(&["register", "web", &id, "--ip", "127.0.0.1", "--port", &port]));
        let listing = stdout(&d.cli(&["list", "web"]));
        assert!(
            listing.lines().any(|l| l.starts_with(&id)),
            "try {i}: registered but not listed:\n{listing}"
        );
        stdout(&d.cli(&["deregister", &format!("web/{id}")]));
        let after = d.get("/v1/services/default/web").await;
        assert!(
            after.status == 404 || !after.body.contains(&format!("\"id\":\"{id}\"")),
            "try {i}: deregistered but still served"
        );
    }
}

#[tokio::test]
async fn blocking_queries_answer_on_change_or_when_the_wait_is_over() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    d.put_instance("web", "a", r#"{"ip":"10.0.0.1"}"#).await;
    let first = d.get("/v1/services/default/web").await.json();
    let index = first["index"].as_i64().unwrap();
    assert!(index > 0);
    // No change: the query holds for its wait, then answers with the same index.
    let started = Instant::now();
    let same = d
        .get(&format!(
            "/v1/services/default/web?index={index}&wait=700ms"
        ))
        .await
        .json();
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(650) && held < Duration::from_secs(3),
        "{held:?}"
    );
    assert_eq!(same["index"].as_i64(), Some(index));
    // A change while it waits: the answer comes with it, not at the end of the wait.
    let admin = d.admin;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = crate::support::daemon::http(
            admin,
            "GET",
            &format!("/v1/services/default/web?index={index}&wait=30s"),
            None,
        )
        .await
        .unwrap();
        (started.elapsed(), r.json())
    });
    // The query is parked before the change is made, so the answer proves the wake-up.
    eventually(
        Duration::from_secs(5),
        "the blocking query is parked",
        || async { (d.metric("svcd_admin_blocking_queries").await == Some(1.0)).then_some(()) },
    )
    .await;
    d.put_instance("web", "b", r#"{"ip":"10.0.0.2"}"#).await;
    let (took, changed) = waiting.await.unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(changed["index"].as_i64().unwrap() > index);
    assert_eq!(changed["instances"].as_array().unwrap().len(), 2);
    // Bad parameters are named.
    let bad = d.get("/v1/services/default/web?index=x").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("index"), "{}", bad.body);
}

/// Consul-style clients reset a blocking query whose index goes backwards: a service's index
/// never does, and a service without instances (its last one left, or none yet) is an empty
/// list with an index, not a 404 with index 0.
#[tokio::test]
async fn a_service_whose_last_instance_leaves_answers_empty_with_a_later_index() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let path = "/v1/services/default/web";
    let answer = |r: crate::support::daemon::Reply| {
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let index = v["index"].as_i64().expect("an index");
        let ids: Vec<String> = v["instances"]
            .as_array()
            .expect("an instance list")
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        (index, ids)
    };
    // Never seen: empty, and an index above 0.
    let (never, ids) = answer(d.get(path).await);
    assert!(never > 0, "{never}");
    assert!(ids.is_empty());
    d.put_instance("web", "a", r#"{"ip":"10.0.0.1"}"#).await;
    let (present, ids) = answer(d.get(path).await);
    assert!(present > never, "{present} > {never}");
    assert_eq!(ids, ["a"]);
    // Blocked on the present index, the last instance leaves: the query wakes with a later
    // index and an empty list.
    let admin = d.admin;
    let blocked = tokio::spawn(async move {
        let started = Instant::now();
        let r = crate::support::daemon::http(
            admin,
            "GET",
            &format!("/v1/services/default/web?index={present}&wait=30s"),
            None,
        )
        .await
        .unwrap();
        (started.elapsed(), r)
    });
    let r = d
        .request("DELETE", "/v1/services/default/web/instances/a", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (took, r) = blocked.await.unwrap();
    assert!(
        took < Duration::from_secs(10),
        "woken by the change: {took:?}"
    );
    let (gone, ids) = answer(r);
    assert!(gone > present, "{gone} > {present}");
    assert!(ids.is_empty(), "{ids:?}");
    // Nothing changes: a query on that index holds, then answers the same index again.
    let (same, ids) = answer(d.get(&format!("{path}?index={gone}&wait=500ms")).await);
    assert_eq!((same, ids.len()), (gone, 0));
    // Another service coming and going never moves it back.
    d.put_instance("db", "x", r#"{"ip":"10.0.0.9"}"#).await;
    let r = d
        .request("DELETE", "/v1/services/default/db/instances/x", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (after_db, _) = answer(d.get(path).await);
    assert!(after_db >= gone, "{after_db} >= {gone}");
    // It returns: later still.
    d.put_instance("web", "b", r#"{"ip":"10.0.0.2"}"#).await;
    let (back, ids) = answer(d.get(&format!("{path}?index={after_db}&wait=30s")).await);
    assert!(back > after_db, "{back} > {after_db}");
    assert_eq!(ids, ["b"]);
    // A name no service can have is an error, not an empty service.
    let bad = d.get("/v1/services/default/Web_1").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.json()["field"], "service");
}

#[tokio::test]
async fn svcd_watch_prints_each_change() {
    let d = Daemon::start("").await;
    let mut watch = tokio::process::Command::new(svcd_bin())
        .args(["watch", "web"])
        .env("SVCD_ADMIN_LISTEN", d.admin.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // What `svcd watch` printed so far, read as it comes.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let printed = printed.clone();
        let mut stdout = watch.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                printed
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        })
    };
    // Each change is made once the answer before it has been printed, so each is its own.
    let sections = |printed: &str| -> Vec<String> {
        printed
            .split("--- ")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let printed_sections = |n: usize| {
        let printed = printed.clone();
        async move {
            crate::support::eventually(Duration::from_secs(10), "svcd watch's answer", || {
                let text = printed.lock().unwrap().clone();
                let got = sections(&text);
                async move { (got.len() >= n && got[n - 1].contains('\n')).then_some(()) }
            })
            .await
        }
    };
    printed_sections(1).await;
    d.put_instance("web", "a", r#"{"ip":"10.0.0.1"}"#).await;
    printed_sections(2).await;
    d.put_instance("web", "b", r#"{"ip":"10.0.0.2"}"#).await;
    printed_sections(3).await;
    assert_eq!(
        d.request("DELETE", "/v1/services/default/web/instances/a", None)
            .await
            .status,
        200
    );
    printed_sections(4).await;
    watch.start_kill().unwrap();
    let _ = reader.await;
    let out = printed.lock().unwrap().clone();
    let sections = sections(&out);
    assert_eq!(sections.len(), 4, "{out}");
    assert!(sections[0].contains("no instances"), "{out}");
    assert!(
        sections[1].contains("10.0.0.1") && !sections[1].contains("10.0.0.2"),
        "{out}"
    );
    assert!(
        sections[2].contains("10.0.0.1") && sections[2].contains("10.0.0.2"),
        "{out}"
    );
    assert!(
        !sections[3].contains("10.0.0.1") && sections[3].contains("10.0.0.2"),
        "{out}"
    );
}

#[tokio::test]
async fn svcd_list_says_so_while_not_synced() {
    // etcd configured but nobody listening: the daemon starts and waits.
    let d = Daemon::spawn(
        &etcd_config(&format!("http://127.0.0.1:{}", free_port())),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::support::daemon::http(d.admin, "GET", "/healthz", None)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "admin API never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = d.cli(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not synced"),
        "{out:?}"
    );
    let out = d.cli(&["list", "web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not synced"),
        "{out:?}"
    );
}

#[tokio::test]
async fn list_and_resolve_print_aligned_columns_or_json_and_version_names_the_revision() {
    let d = Daemon::start("").await;
    d.put_instance("web", "w1", r#"{"ip":"10.0.0.1","ports":{"http":80}}"#)
        .await;
    d.put_instance(
        "web",
        "a-much-longer-instance-id",
        r#"{"ip":"10.0.0.22","ports":{"http":8080}}"#,
    )
    .await;
    // Columns line up: every row's STATE starts where the header's does.
    let table = stdout(&d.cli(&["list", "web"]));
    let lines: Vec<&str> = table.lines().collect();
    let column = lines[0].find("STATE").unwrap();
    for row in &lines[1..] {
        assert_eq!(&row[column..column + 7], "healthy", "{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&d.cli(&["list", "web", "-o", "json"]))).unwrap();
    assert_eq!(json["instances"].as_array().unwrap().len(), 2);
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&d.cli(&["list", "-o", "json"]))).unwrap();
    assert_eq!(json[0]["service"], "web");
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &d.cli(&["resolve", "web", "--port", "http", "--output", "json"]),
    ))
    .unwrap();
    let mut ports: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["port"].as_u64().unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, vec![80, 8080]);
    let version = stdout(&d.cli(&["version"]));
    assert!(
        version.starts_with(&format!("svcd {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(!version.contains("()"), "a revision is named: {version}");
}

#[tokio::test]
async fn register_without_an_ip_publishes_the_advertised_address_and_warns_on_loopback() {
    let d = Daemon::start("[registry]\nadvertise_ip = \"10.1.2.3\"\n").await;
    let out = d.cli(&["register", "web", "w1", "--port", "http=80"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w1 = d.get("/v1/services/default/web/instances/w1").await.json();
    assert_eq!(w1["ip"], "10.1.2.3");
    let out = d.cli(&["register", "web", "w2", "--ip", "127.0.0.1"]);
    assert!(out.status.success());
    assert!(
        d.log()
            .contains("registration publishes a loopback address"),
        "{}",
        d.log()
    );
    // With the embedded store (one node) loopback is the default, and no warning.
    let local = Daemon::start("").await;
    let out = local.cli(&["register", "web", "w1"]);
    assert!(out.status.success());
    let w1 = local
        .get("/v1/services/default/web/instances/w1")
        .await
        .json();
    assert_eq!(w1["ip"], "127.0.0.1");
    assert!(!local.log().contains("loopback address"));
}

#[tokio::test]
async fn drain_all_marks_every_own_registration_and_health_is_an_exit_code() {
    let d = Daemon::start("").await;
    for id in ["w1", "w2"] {
        d.put_instance("web", id, r#"{"ip":"10.0.0.1"}"#).await;
    }
    assert!(d.cli(&["health"]).status.success());
    assert!(d.cli(&["health", "--ready"]).status.success());
    let out = d.cli(&["drain", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("draining 2 registration(s)"),
        "{}",
        stdout(&out)
    );
    for id in ["w1", "w2"] {
        let path = format!("/v1/services/default/web/instances/{id}");
        crate::support::eventually(Duration::from_secs(3), "draining", || async {
            (d.get(&path).await.json()["state"] == "draining").then_some(())
        })
        .await;
    }
    assert_eq!(d.request("GET", "/v1/drain", None).await.status, 405);
    // Nothing listening: health fails.
    let out = std::process::Command::new(crate::support::svcd_bin())
        .args(["health", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// `svcd drain --all` answers once this daemon's snapshot shows every registration draining,
/// as a single drain does: a listing right after it never shows one still healthy.
#[tokio::test]
async fn drain_all_is_visible_here_when_it_answers() {
    let etcd = Etcd::start().await;
    let d = Daemon::start(&etcd_config(&etcd.endpoint())).await;
    let ids = ["w1", "w2", "w3"];
    for round in 0..10 {
        for id in ids {
            d.put_instance("web", id, r#"{"ip":"10.0.0.1","state":"healthy"}"#)
                .await;
        }
        let r = d.request("POST", "/v1/drain", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["drained"], 3, "{}", r.body);
        assert_eq!(r.json()["visible"], true, "{}", r.body);
        let listing = d.get("/v1/services/default/web").await.json();
        let states: Vec<&str> = listing["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["served_state"].as_str().expect("served_state"))
            .collect();
        assert_eq!(states, ["draining"; 3], "round {round}: {listing}");
    }
    // And through the CLI, as a preStop hook runs it.
    for id in ids {
        d.put_instance("web", id, r#"{"ip":"10.0.0.1","state":"healthy"}"#)
            .await;
    }
    let out = stdout(&d.cli(&["drain", "--all"]));
    assert!(out.contains("draining 3 registration(s)"), "{out}");
    let listing = stdout(&d.cli(&["list", "web"]));
    assert_eq!(listing.matches("draining").count(), 3, "{listing}");
}

/// `/v1/services` answers a page at a time in name order, with a cursor to the next; `svcd list`
/// follows the pages (1,001 services are two default pages).
#[tokio::test]
async fn service_listing_is_paged_and_the_cli_follows_the_pages() {
    let mut statics = String::new();
    for i in 0..1001 {
        statics.push_str(&format!(
            "[[registry.static]]\nservice = \"s{i:04}\"\nid = \"i\"\nip = \"10.0.0.1\"\n"
        ));
    }
    let d = Daemon::start(&statics).await;
    eventually(
        Duration::from_secs(10),
        "all 1,001 services listed",
        || async {
            let all = d.get("/v1/services?limit=10000").await.json();
            (all["services"].as_array().map(Vec::len) == Some(1001)).then_some(())
        },
    )
    .await;
    let page = d.get("/v1/services?limit=400").await.json();
    let names: Vec<&str> = page["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 400);
    assert_eq!((names[0], names[399]), ("s0000", "s0399"));
    assert_eq!(page["next"], "default/s0399");
    let last = d
        .get("/v1/services?limit=400&after=default%2Fs0799")
        .await
        .json();
    assert_eq!(last["services"].as_array().unwrap().len(), 201);
    assert!(last.get("next").is_none(), "{last}");
    assert_eq!(
        d.get("/v1/services").await.json()["services"]
            .as_array()
            .unwrap()
            .len(),
        1000
    );
    for bad in ["limit=0", "limit=10001", "limit=x", "after=nocursor"] {
        let r = d.get(&format!("/v1/services?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let listed: Vec<serde_json::Value> = serde_json::from_str(&String::from_utf8_lossy(
        &d.cli(&["list", "-o", "json"]).stdout,
    ))
    .unwrap();
    assert_eq!(listed.len(), 1001);
}
