//! TLS from svcd to instances (`[[proxy.upstream_tls]]`): the HTTP proxy (both HTTP/1.1 paths
//! hand such services to hyper's TLS pools) and the L4 proxy verify the instance's chain and
//! name; a second svcd terminating with client certificates makes the mesh case, the first
//! presenting this node's SPIFFE identity.

use std::path::Path;
use std::time::Duration;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::free_port;
use crate::support::proxy::get_close;
use crate::support::proxy::{register, wait_routable, FAST_PATH, HYPER_PATH};
use crate::support::tls::toml_path;
use crate::support::tls::{tls_backend, TestCa};

#[tokio::test]
async fn http_and_l4_reach_tls_instances_and_refuse_ones_the_ca_does_not_vouch_for() {
    let ca = TestCa::new("instances ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let good = tls_backend(
        "secure",
        &ca.issue_sans("secure", &["secure.default.svc.cluster.local"], None, false),
    )
    .await;
    // Right CA, wrong name; and a stranger's certificate with the right name.
    let misnamed = tls_backend(
        "misnamed",
        &ca.issue_sans("x", &["other.example"], None, false),
    )
    .await;
    let stranger = TestCa::new("stranger");
    let forged = tls_backend(
        "forged",
        &stranger.issue_sans("secure", &["secure.default.svc.cluster.local"], None, false),
    )
    .await;
    for path in [FAST_PATH, HYPER_PATH] {
        let l4 = free_port();
        let d = Daemon::start(&format!(
            "[[proxy.tcp]]\nlisten = \"127.0.0.1:{l4}\"\nservice = \"secure\"\n\
             [[proxy.upstream_tls]]\nservice = \"secure\"\nca = {}\n\
             [[proxy.upstream_tls]]\nservice = \"bad\"\nca = {}\n{path}",
            toml_path(&ca_file),
            toml_path(&ca_file),
        ))
        .await;
        register(&d, "secure", "s1", good, "http").await;
        d.wait_instances("default", "secure", &["s1"], Duration::from_secs(5))
            .await;
        wait_routable(&d, "secure", 1).await;
        for _ in 0..3 {
            assert_eq!(
                get_close(d.http, "secure", "/").await,
                (200, "secure".into()),
                "{path:?}"
            );
        }
        // L4: the client speaks plaintext to svcd, svcd TLS to the instance.
        let l4_addr = std::net::SocketAddr::from(([127, 0, 0, 1], l4));
        assert_eq!(
            get_close(l4_addr, "secure", "/").await,
            (200, "secure".into())
        );
        assert!(
            d.metric(
                r#"svcd_tls_handshakes_total{listener="upstream/secure.default",result="ok"}"#
            )
            .await
                >= Some(2.0)
        );

        register(&d, "bad", "b1", misnamed, "http").await;
        register(&d, "bad", "b2", forged, "http").await;
        d.wait_instances("default", "bad", &["b1", "b2"], Duration::from_secs(5))
            .await;
        let (status, _) = get_close(d.http, "bad", "/").await;
        assert_eq!(status, 502, "{path:?}: neither instance is verified");
        assert!(
            d.metric(r#"svcd_tls_handshake_failures_total{listener="upstream/bad.default",reason="bad_certificate"}"#)
                .await
                >= Some(2.0),
            "{}",
            d.get("/metrics").await.body
        );
    }
}

/// Mesh mode: svcd `a` reaches service `web` behind svcd `b` over TLS with this node's
/// certificate (`spiffe://td/ns/default/svc/a`); `b` verifies it against its client CA, lets
/// only the listed identity in, and tells its instance who called.
#[tokio::test]
async fn two_svcds_speak_mtls_and_the_instance_sees_the_callers_identity() {
    let ca = TestCa::new("mesh ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (b_cert, b_key) = ca
        .issue_sans(
            "b",
            &["web.default.svc.cluster.local"],
            Some("spiffe://td/ns/default/svc/b"),
            false,
        )
        .write(dir.path(), "b");
    let (a_cert, a_key) = ca
        .issue_sans(
            "a",
            &["a.node"],
            Some("spiffe://td/ns/default/svc/a"),
            false,
        )
        .write(dir.path(), "a");
    let (z_cert, z_key) = ca
        .issue_sans(
            "z",
            &["z.node"],
            Some("spiffe://td/ns/default/svc/z"),
            false,
        )
        .write(dir.path(), "z");

    let inbound = free_port();
    let b = Daemon::start(&format!(
        "[[proxy.http]]\nlisten = \"127.0.0.1:{inbound}\"\n[proxy.http.tls]\ncert = {}\nkey = {}\n\
         client_ca = {}\nallow = [\"spiffe://td/ns/default/svc/a\"]\n",
        toml_path(&b_cert),
        toml_path(&b_key),
        toml_path(&ca_file),
    ))
    .await;
    let backend = Backend::start("web-1").await;
    register(&b, "web", "w1", backend.addr, "http").await;
    wait_routable(&b, "web", 1).await;

    let outbound = |cert: &Path, key: &Path| {
        format!(
            "[[proxy.upstream_tls]]\nservice = \"web\"\nca = {}\ncert = {}\nkey = {}\n",
            toml_path(&ca_file),
            toml_path(cert),
            toml_path(key)
        )
    };
    let a = Daemon::start(&outbound(&a_cert, &a_key)).await;
    let z = Daemon::start(&outbound(&z_cert, &z_key)).await;
    let at_b = std::net::SocketAddr::from(([127, 0, 0, 1], inbound));
    for d in [&a, &z] {
        register(d, "web", "via-b", at_b, "http").await;
        d.wait_instances("default", "web", &["via-b"], Duration::from_secs(5))
            .await;
    }
    let (status, headers) = get_close(a.http, "web", "/headers").await;
    assert_eq!(status, 200, "{headers}");
    let xfcc = headers
        .lines()
        .find(|l| l.starts_with("x-forwarded-client-cert:"))
        .unwrap_or_else(|| panic!("{headers}"));
    assert!(xfcc.contains("URI=spiffe://td/ns/default/svc/a"), "{xfcc}");
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    // Another identity from the same CA: verified, but not allowed.
    let (status, _) = get_close(z.http, "web", "/").await;
    assert_eq!(status, 403);
}
