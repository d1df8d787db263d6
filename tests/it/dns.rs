//! The DNS responder through the real daemon: real packets over UDP and TCP.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use nix::sys::signal::Signal;

use crate::support::daemon::Daemon;
use crate::support::dns::{addrs, query, strict, tcp, udp, udp_raw};
use crate::support::eventually;

const STATIC: &str = r#"
[[registry.static]]
service = "web"
id = "w1"
ip = "10.0.0.1"
ports = { http = 8080 }
[[registry.static]]
service = "web"
id = "w2"
ip = "10.0.0.2"
ports = { http = 8080 }
[[registry.static]]
service = "web"
id = "w3"
ip = "10.0.0.3"
ports = { http = 8080 }
[[registry.static]]
service = "web"
id = "w6"
ip = "fd00::6"
[[registry.static]]
service = "web"
id = "sick"
ip = "10.0.0.99"
state = "unhealthy"
"#;

const WEB: &str = "web.default.svc.cluster.local.";

/// A daemon serving the `STATIC` instances, all in its snapshot.
async fn start_web() -> Daemon {
    let d = Daemon::start(STATIC).await;
    let all = ["sick", "w1", "w2", "w3", "w6"];
    d.wait_instances("default", "web", &all, Duration::from_secs(5))
        .await;
    d
}

#[tokio::test]
async fn answers_every_kind_of_name_over_udp_and_tcp() {
    let d = start_web().await;

    for m in [
        udp(d.dns, WEB, RecordType::A, None).await,
        tcp(d.dns, WEB, RecordType::A).await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(
            addrs(&m),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            "healthy only"
        );
        assert_eq!(m.answers[0].ttl, 5);
    }
    assert_eq!(
        addrs(&udp(d.dns, WEB, RecordType::AAAA, Some(1232)).await),
        ["fd00::6"]
    );
    let m = udp(d.dns, "wEb.DeFaUlT.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(
        m.answers[0].name.to_string(),
        "wEb.DeFaUlT.svc.cluster.local.",
        "0x20 case preserved"
    );

    let srv = udp(
        d.dns,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
        None,
    )
    .await;
    assert_eq!(srv.answers.len(), 3);
    assert_eq!(
        srv.additionals
            .iter()
            .filter(|r| r.record_type() == RecordType::A)
            .count(),
        3,
        "glue"
    );
    assert_eq!(
        addrs(
            &udp(
                d.dns,
                "w2.web.default.svc.cluster.local.",
                RecordType::A,
                None
            )
            .await
        ),
        ["10.0.0.2"]
    );
    let ptr = udp(d.dns, "3.0.0.10.in-addr.arpa.", RecordType::PTR, None).await;
    assert_eq!(
        ptr.answers[0].data.to_string(),
        "w3.web.default.svc.cluster.local."
    );
    let txt = tcp(d.dns, "dns-version.cluster.local.", RecordType::TXT).await;
    assert!(matches!(&txt.answers[0].data, RData::TXT(_)));
    let soa = udp(d.dns, "cluster.local.", RecordType::SOA, None).await;
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);

    let nx = udp(
        d.dns,
        "nope.default.svc.cluster.local.",
        RecordType::A,
        None,
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
    let nodata = udp(d.dns, WEB, RecordType::MX, None).await;
    assert_eq!(
        (nodata.metadata.response_code, nodata.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
    let sick = udp(
        d.dns,
        "sick.web.default.svc.cluster.local.",
        RecordType::A,
        None,
    )
    .await;
    assert_eq!(
        sick.metadata.response_code,
        ResponseCode::NXDomain,
        "unhealthy instance never returned"
    );

    let refused = udp(d.dns, "example.com.", RecordType::A, None).await;
    assert_eq!(
        refused.metadata.response_code,
        ResponseCode::Refused,
        "never an open resolver"
    );
    assert!(
        d.metric("svcd_dns_requests_total{proto=\"udp\",qtype=\"A\",rcode=\"NOERROR\"}")
            .await
            .unwrap()
            >= 3.0
    );
    assert!(
        d.metric("svcd_dns_requests_total{proto=\"tcp\",qtype=\"A\",rcode=\"NOERROR\"}")
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn rotation_spreads_the_first_answer() {
    let d = start_web().await;
    let mut firsts = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let m = udp(d.dns, WEB, RecordType::A, None).await;
        *firsts.entry(m.answers[0].data.to_string()).or_insert(0) += 1;
    }
    assert_eq!(firsts.len(), 3, "{firsts:?}");
    assert!(
        firsts.values().all(|&n| n == 10),
        "exact round robin across sequential queries: {firsts:?}"
    );
}

#[tokio::test]
async fn truncated_over_udp_complete_over_tcp() {
    let mut entries = String::new();
    for i in 0..40 {
        entries.push_str(&format!(
            "[[registry.static]]\nservice = \"big\"\nid = \"b{i}\"\nip = \"fd00::{i:x}\"\n"
        ));
    }
    let d = Daemon::start(&entries).await;
    eventually(Duration::from_secs(5), "40 instances", || async {
        (d.instance_ids("default", "big").await.len() == 40).then_some(())
    })
    .await;
    // 20 AAAA answers (max_answers) are 560 bytes of records: over a 512-byte buffer.
    let m = udp(
        d.dns,
        "big.default.svc.cluster.local.",
        RecordType::AAAA,
        None,
    )
    .await;
    assert!(m.metadata.truncation, "TC set");
    let raw = udp_raw(
        d.dns,
        &query("big.default.svc.cluster.local.", RecordType::AAAA, None),
    )
    .await
    .unwrap();
    assert!(
        raw.len() <= 512,
        "UDP answer within 512 bytes, got {}",
        raw.len()
    );
    // Cut at a record boundary: a strict parser reads it whole (kdig: no "trailing data").
    let cut = strict(&raw);
    assert!(cut.metadata.truncation && !cut.answers.is_empty());
    let m = udp(
        d.dns,
        "big.default.svc.cluster.local.",
        RecordType::AAAA,
        Some(1232),
    )
    .await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 20, "max_answers per UDP answer");
    let m = tcp(d.dns, "big.default.svc.cluster.local.", RecordType::AAAA).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40, "complete over TCP");
}

#[tokio::test]
async fn registrations_appear_and_disappear_in_answers() {
    let d = Daemon::start("").await;
    let name = "api.prod.svc.cluster.local.";
    assert_eq!(
        udp(d.dns, name, RecordType::A, None)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    let r = d
        .request(
            "PUT",
            "/v1/services/prod/api/instances/a1",
            Some(r#"{"ip":"10.5.0.1"}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(2), "registration in DNS", || async {
        (addrs(&udp(d.dns, name, RecordType::A, None).await) == ["10.5.0.1"]).then_some(())
    })
    .await;
    let r = d
        .request(
            "PUT",
            "/v1/services/prod/api/instances/a1",
            Some(r#"{"ip":"10.5.0.1","state":"draining"}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    eventually(
        Duration::from_secs(2),
        "draining instance out of DNS",
        || async {
            (udp(d.dns, name, RecordType::A, None)
                .await
                .metadata
                .response_code
                == ResponseCode::NXDomain)
                .then_some(())
        },
    )
    .await;
    d.request(
        "PUT",
        "/v1/services/prod/api/instances/a1",
        Some(r#"{"ip":"10.5.0.1"}"#),
    )
    .await;
    d.request(
        "PUT",
        "/v1/services/prod/api/instances/a2",
        Some(r#"{"ip":"10.5.0.2"}"#),
    )
    .await;
    eventually(Duration::from_secs(2), "two instances", || async {
        (addrs(&udp(d.dns, name, RecordType::A, None).await) == ["10.5.0.1", "10.5.0.2"])
            .then_some(())
    })
    .await;
    assert_eq!(
        d.request("DELETE", "/v1/services/prod/api/instances/a1", None)
            .await
            .status,
        200
    );
    eventually(Duration::from_secs(2), "deregistration in DNS", || async {
        (addrs(&udp(d.dns, name, RecordType::A, None).await) == ["10.5.0.2"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn forwards_out_of_zone_names_to_a_local_upstream() {
    // The upstream is another svcd serving its own zone.
    let upstream = Daemon::start_with(
        "[[registry.static]]\nservice = \"db\"\nid = \"d1\"\nip = \"10.7.0.1\"\n",
        &[("SVCD_DNS_DOMAIN", "upstream.test")],
    )
    .await;
    let d = Daemon::start_with("", &[]).await;
    std::fs::write(
        &d.config_path,
        std::fs::read_to_string(&d.config_path).unwrap().replace(
            "[dns]\n",
            &format!("[dns]\nforward = [\"{}\"]\n", upstream.dns),
        ),
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    let name = "db.default.svc.upstream.test.";
    let m = eventually(Duration::from_secs(5), "forwarded answer", || async {
        let m = udp(d.dns, name, RecordType::A, None).await;
        (m.metadata.response_code == ResponseCode::NoError).then_some(m)
    })
    .await;
    assert_eq!(addrs(&m), ["10.7.0.1"]);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative, "forwarded answers are not ours");
    let nx = udp(
        d.dns,
        "nope.default.svc.upstream.test.",
        RecordType::A,
        None,
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    // Our own zone is still answered locally.
    assert_eq!(
        udp(d.dns, WEB, RecordType::A, None)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert!(
        d.metric("svcd_dns_forwarded_total{result=\"ok\"}")
            .await
            .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_silence_and_nothing_breaks() {
    let d = Daemon::start(STATIC).await;
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/dns/fuzz/seeds");
    let mut files: Vec<_> = std::fs::read_dir(corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut answered = 0;
    for path in &files {
        let packet = std::fs::read(path).unwrap();
        if let Some(reply) = udp_raw(d.dns, &packet).await {
            assert!(reply.len() >= 12, "{path:?}");
            assert!(reply.len() <= 1232, "{path:?}");
            assert_eq!(reply[..2], packet[..2], "{path:?}: response ID");
            answered += 1;
        }
    }
    assert!(answered > 0);
    let formerr = udp_raw(d.dns, &std::fs::read(format!("{corpus}/qd2")).unwrap())
        .await
        .unwrap();
    assert_eq!(formerr[3] & 0x0f, 1, "two questions: FORMERR");
    assert!(
        udp_raw(
            d.dns,
            &std::fs::read(format!("{corpus}/response_bit")).unwrap()
        )
        .await
        .is_none(),
        "responses are never answered"
    );
    assert!(udp_raw(d.dns, b"").await.is_none());
    // Still serving.
    assert_eq!(addrs(&udp(d.dns, WEB, RecordType::A, None).await).len(), 3);
    assert_eq!(d.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn dns_settings_reload_on_sighup() {
    let d = start_web().await;
    assert_eq!(udp(d.dns, WEB, RecordType::A, None).await.answers[0].ttl, 5);
    let text = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace("[dns]\n", "[dns]\nttl = \"30s\"\nmax_answers = 1\n");
    std::fs::write(&d.config_path, text).unwrap();
    d.signal(Signal::SIGHUP);
    let m = eventually(Duration::from_secs(5), "new TTL", || async {
        let m = udp(d.dns, WEB, RecordType::A, None).await;
        (m.answers[0].ttl == 30).then_some(m)
    })
    .await;
    assert_eq!(m.answers.len(), 1);
}

#[tokio::test]
async fn one_record_per_address_and_the_do_bit_over_real_udp() {
    let mut entries = String::new();
    for (id, ip) in [("a", "10.9.0.1"), ("b", "10.9.0.1"), ("c", "10.9.0.2")] {
        entries.push_str(&format!(
            "[[registry.static]]\nservice = \"dup\"\nid = \"{id}\"\nip = \"{ip}\"\n"
        ));
    }
    let d = Daemon::start(&entries).await;
    eventually(Duration::from_secs(5), "3 instances", || async {
        (d.instance_ids("default", "dup").await.len() == 3).then_some(())
    })
    .await;
    let m = udp(d.dns, "dup.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(
        addrs(&m),
        ["10.9.0.1", "10.9.0.2"],
        "RFC 2181 §5: no duplicate"
    );
    let m = tcp(d.dns, "dup.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(addrs(&m), ["10.9.0.1", "10.9.0.2"]);
    // DO set in the query's OPT: copied into the response's (RFC 3225).
    let mut packet = query("dup.default.svc.cluster.local.", RecordType::A, Some(1232));
    let flags_hi = packet.len() - 4; // OPT: … ttl(ext-rcode, version, flags hi, flags lo), rdlen
    packet[flags_hi] |= 0x80;
    let reply = strict(&udp_raw(d.dns, &packet).await.unwrap());
    assert!(reply.edns.unwrap().flags().dnssec_ok);
}
