//! Consul-style names through the responder: the general path answers them, the fast path
//! declines them, an answer cut to `max_answers` over UDP sets TC (the cluster zone's does
//! not), and negative answers carry the Consul zone's SOA.

use super::*;

fn consul_responder(max_answers: usize) -> Arc<DnsResponder> {
    let config = svcd_config::parse(&format!(
        "[dns]\nmax_answers = {max_answers}\n[consul]\nlisten = \"127.0.0.1:8500\"\n"
    ))
    .unwrap();
    let r = responder_with(&config.dns);
    r.set_consul(&config.consul);
    r
}

#[test]
fn consul_names_take_the_general_path_with_healthy_instances() {
    let r = consul_responder(20);
    let packet = query("web.service.consul.", RecordType::A, Some(1232));
    assert!(
        fast(&r, &packet).is_none(),
        "the fast path is for <svc>.<ns>.svc only"
    );
    let m = slow(&r, &packet).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert!(!m.metadata.truncation);

    let srv = slow(
        &r,
        &query("_web._tcp.service.consul.", RecordType::SRV, Some(1232)),
    )
    .unwrap();
    assert_eq!(srv.answers.len(), 4, "w1, w2, w3 and w6 have ports");
    assert_eq!(srv.additionals.len(), 4, "one address per target");

    let missing = slow(&r, &query("nope.service.consul.", RecordType::A, None)).unwrap();
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(missing.authorities[0].name.to_string(), "consul.");
    let apex = slow(&r, &query("consul.", RecordType::SOA, None)).unwrap();
    assert_eq!(apex.answers[0].name.to_string(), "consul.");
}

#[test]
fn a_consul_answer_cut_by_max_answers_sets_tc() {
    let r = consul_responder(2);
    let cut = slow(&r, &query("web.service.consul.", RecordType::A, Some(1232))).unwrap();
    assert_eq!(cut.answers.len(), 2);
    assert!(cut.metadata.truncation, "the client learns there is more");
    // The cluster zone keeps its rotated subset without TC (as Kubernetes DNS).
    let zone = slow(
        &r,
        &query("web.default.svc.cluster.local.", RecordType::A, Some(1232)),
    );
    assert!(!zone.unwrap().metadata.truncation);
}

#[test]
fn without_consul_its_names_are_out_of_zone() {
    let r = responder();
    let m = slow(&r, &query("web.service.consul.", RecordType::A, None)).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}
