//! Consul-style DNS names through `dig`, as users query them: services, tags, RFC 2782 SRV with
//! glue, nodes, the datacenter and namespace forms, TC on a cut UDP answer, the configured
//! domain, and a reload that moves it.

use std::net::SocketAddr;
use std::process::Command;

use super::{consul, with_consul};
use crate::support::daemon::Daemon;
use crate::support::free_port;

/// `dig @svcd -p PORT <args>`, its stdout.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(crate::deploy::tool("dig"))
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=5", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (scripts/setup installs it)");
    crate::support::assert_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

fn lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[tokio::test]
async fn dig_resolves_consul_names_tags_srv_and_nodes() {
    let (d, _) = with_consul("", "").await;
    d.put_instance(
        "web",
        "web-1",
        r#"{"ip":"10.0.0.1","ports":{"http":8080},"tags":["v1"],"node":"n1"}"#,
    )
    .await;
    d.put_instance(
        "web",
        "web-2",
        r#"{"ip":"10.0.0.2","ports":{"http":8081},"tags":["v2"],"node":"n2"}"#,
    )
    .await;
    d.put_instance(
        "web",
        "web-3",
        r#"{"ip":"10.0.0.3","ports":{"http":8082},"tags":["v1"],"state":"draining"}"#,
    )
    .await;
    let dns = d.dns;
    let short = |name: &str, t: &str| lines(&dig(dns, &[name, t, "+short"]));
    assert_eq!(short("web.service.consul", "A"), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(
        short("WEB.service.dc1.consul", "A"),
        ["10.0.0.1", "10.0.0.2"]
    );
    assert_eq!(short("v1.web.service.consul", "A"), ["10.0.0.1"]);
    assert_eq!(
        short("web.service.default.ns.dc1.dc.consul", "A"),
        ["10.0.0.1", "10.0.0.2"]
    );
    assert_eq!(short("n2.node.consul", "A"), ["10.0.0.2"]);
    assert_eq!(
        short("_web._tcp.service.consul", "SRV"),
        [
            "1 1 8080 web-1.web.default.svc.cluster.local.",
            "1 1 8081 web-2.web.default.svc.cluster.local."
        ]
    );
    assert_eq!(
        short("_web._v2.service.consul", "SRV"),
        ["1 1 8081 web-2.web.default.svc.cluster.local."]
    );
    // SRV carries the targets' addresses as glue.
    let srv = dig(
        dns,
        &["_web._v1.service.consul", "SRV", "+noall", "+additional"],
    )
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ");
    assert!(
        srv.contains("web-1.web.default.svc.cluster.local. 5 IN A 10.0.0.1"),
        "{srv}"
    );
    for name in [
        "web.service.eu1.consul",
        "v3.web.service.consul",
        "n9.node.consul",
    ] {
        let out = dig(dns, &[name, "A"]);
        assert!(out.contains("status: NXDOMAIN"), "{name}: {out}");
    }
}

#[tokio::test]
async fn a_consul_answer_cut_to_max_answers_sets_tc_and_tcp_gets_all() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start_with_dns(
        &[],
        "max_answers = 2\n",
        &format!("[consul]\nlisten = \"{addr}\"\ndns_domain = \"discovery\"\n"),
    )
    .await;
    for i in 1..=5 {
        d.put_instance(
            "web",
            &format!("web-{i}"),
            &format!(r#"{{"ip":"10.0.0.{i}"}}"#),
        )
        .await;
    }
    let udp = dig(d.dns, &["web.service.discovery", "A", "+notcp", "+ignore"]);
    let flags = udp
        .lines()
        .find(|l| l.contains(";; flags:"))
        .unwrap_or_else(|| panic!("{udp}"));
    assert!(flags.contains(" tc"), "{udp}");
    // dig retries over TCP on TC, as resolvers do: every instance.
    let all = lines(&dig(d.dns, &["web.service.discovery", "A", "+short"]));
    assert_eq!(all.len(), 5, "{all:?}");
    // The configured domain only: `consul` is not served.
    let other = dig(d.dns, &["web.service.consul", "A"]);
    assert!(other.contains("status: REFUSED"), "{other}");
}

#[tokio::test]
async fn without_consul_its_dns_names_are_not_served() {
    let d = Daemon::start("").await;
    d.put_instance("web", "web-1", r#"{"ip":"10.0.0.1"}"#).await;
    let out = dig(d.dns, &["web.service.consul", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}

#[tokio::test]
async fn a_reload_moves_the_consul_dns_domain_and_keeps_the_listener_until_restart() {
    let (d, addr) = with_consul("", "").await;
    d.put_instance("web", "web-1", r#"{"ip":"10.0.0.1"}"#).await;
    assert_eq!(
        lines(&dig(d.dns, &["web.service.consul", "A", "+short"])),
        ["10.0.0.1"]
    );
    d.reload_with(&format!(
        "[consul]\nlisten = \"127.0.0.1:{}\"\ndns_domain = \"disco\"\n",
        free_port()
    ))
    .await;
    assert_eq!(
        lines(&dig(d.dns, &["web.service.disco", "A", "+short"])),
        ["10.0.0.1"]
    );
    let old = dig(d.dns, &["web.service.consul", "A"]);
    assert!(old.contains("status: REFUSED"), "{old}");
    // The listen address waits for a restart, and says so; the running one still answers.
    let config = d.get("/v1/config").await.json();
    let pending: Vec<&str> = config["pending_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["consul.listen"]);
    let leader = consul(addr, "GET", "/v1/status/leader", "", None).await;
    assert_eq!(leader.status, 200);
}
