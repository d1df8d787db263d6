//! TLS from svcd to instances (`[[proxy.upstream_tls]]`): the HTTP proxy (both HTTP/1.1 paths
//! hand such services to hyper's TLS pools) and the L4 proxy verify the instance's chain and
//! name; a second svcd terminating with client certificates makes the mesh case, the first
//! presenting this node's SPIFFE identity.

use std::path::Path;
use std::time::Duration;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::get_close;
use crate::support::proxy::{register, wait_routable, FAST_PATH, HYPER_PATH};
use crate::support::tls::toml_path;
use crate::support::tls::{tls_backend, TestCa, TlsBackend};
use crate::support::{eventually, free_port};

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
    // The certificate `a` presents is watched for expiry as served ones are.
    let not_after = a
        .metric(r#"svcd_tls_certificate_expiry_timestamp_seconds{listener="upstream/web.default",name="a.node"}"#)
        .await
        .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        not_after > now + 80.0 * 86400.0,
        "a 90-day certificate: {not_after}"
    );
    // Another identity from the same CA: verified, but not allowed.
    let (status, _) = get_close(z.http, "web", "/").await;
    assert_eq!(status, 403);
}

/// Pooled TLS connections to an instance are reused, on both HTTP/1.1 paths: a run of requests
/// makes one handshake (one proxy worker: each worker has its pools), and it carried the
/// service's DNS name as SNI (the default `server_name`).
#[tokio::test]
async fn pooled_tls_connections_to_an_instance_are_reused() {
    let ca = TestCa::new("pool ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let issued = ca.issue_sans("secure", &["secure.default.svc.cluster.local"], None, false);
    for path in [FAST_PATH, HYPER_PATH] {
        let backend = TlsBackend::start("secure", &issued).await;
        let d = Daemon::start(&format!(
            "[proxy]\nworkers = 1\n[[proxy.upstream_tls]]\nservice = \"secure\"\nca = {}\n{path}",
            toml_path(&ca_file),
        ))
        .await;
        register(&d, "secure", "s1", backend.addr, "http").await;
        wait_routable(&d, "secure", 1).await;
        for _ in 0..5 {
            assert_eq!(
                get_close(d.http, "secure", "/").await,
                (200, "secure".into()),
                "{path:?}"
            );
        }
        assert_eq!(backend.handshakes(), 1, "{path:?}: one pooled connection");
        assert_eq!(
            backend.server_names(),
            [Some("secure.default.svc.cluster.local".to_string())],
            "{path:?}"
        );
        assert_eq!(
            d.metric(
                r#"svcd_tls_handshakes_total{listener="upstream/secure.default",result="ok"}"#
            )
            .await,
            Some(1.0),
            "{path:?}"
        );
    }
}

/// An explicit `server_name` is what svcd sends as SNI and what the instance's certificate must
/// carry, on the HTTP and the L4 proxy.
#[tokio::test]
async fn an_explicit_server_name_is_sent_and_verified() {
    let ca = TestCa::new("names ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let backend = TlsBackend::start(
        "db",
        &ca.issue_sans("db", &["db.internal.example"], None, false),
    )
    .await;
    let l4 = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:{l4}\"\nservice = \"db\"\n\
         [[proxy.upstream_tls]]\nservice = \"db\"\nca = {}\nserver_name = \"db.internal.example\"\n",
        toml_path(&ca_file),
    ))
    .await;
    register(&d, "db", "d1", backend.addr, "http").await;
    wait_routable(&d, "db", 1).await;
    assert_eq!(get_close(d.http, "db", "/").await, (200, "db".into()));
    let l4_addr = std::net::SocketAddr::from(([127, 0, 0, 1], l4));
    assert_eq!(get_close(l4_addr, "db", "/").await, (200, "db".into()));
    let names = backend.server_names();
    assert!(names.len() >= 2, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.as_deref() == Some("db.internal.example")),
        "{names:?}"
    );
}

/// `[[proxy.upstream_tls]]` files are watched as a listener's are: a CA replaced on disk is
/// used by the next handshake, a broken one keeps the CA in use (counted, logged), and each
/// reload is logged. The L4 proxy shows it: every connection is a new handshake.
#[tokio::test]
async fn upstream_tls_files_are_reread_and_a_bad_one_keeps_the_old() {
    let (old_ca, new_ca) = (TestCa::new("old ca"), TestCa::new("new ca"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, old_ca.pem()).unwrap();
    // The instance's certificate is from the new CA: not trusted until the file changes.
    let backend = TlsBackend::start(
        "secure",
        &new_ca.issue_sans("secure", &["secure.default.svc.cluster.local"], None, false),
    )
    .await;
    let l4 = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:{l4}\"\nservice = \"secure\"\n\
         [[proxy.upstream_tls]]\nservice = \"secure\"\nca = {}\n",
        toml_path(&ca_file),
    ))
    .await;
    register(&d, "secure", "s1", backend.addr, "tcp").await;
    d.wait_instances("default", "secure", &["s1"], Duration::from_secs(5))
        .await;
    let l4_addr = std::net::SocketAddr::from(([127, 0, 0, 1], l4));
    assert_ne!(get_close(l4_addr, "secure", "/").await.0, 200);
    let reloads = |result: &'static str| {
        let d = &d;
        async move {
            d.metric(&format!(
                r#"svcd_tls_reloads_total{{listener="upstream/secure.default",result="{result}"}}"#
            ))
            .await
            .unwrap_or(0.0)
        }
    };

    std::fs::write(&ca_file, new_ca.pem()).unwrap();
    eventually(Duration::from_secs(10), "the new CA used", || async {
        (get_close(l4_addr, "secure", "/").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(reloads("ok").await, 1.0, "one reload for one change");
    assert!(
        d.log().contains("upstream TLS files reloaded"),
        "{}",
        d.log()
    );

    std::fs::write(&ca_file, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    eventually(Duration::from_secs(10), "the failed reload", || async {
        (reloads("failed").await >= 1.0).then_some(())
    })
    .await;
    assert!(
        d.log()
            .contains("upstream TLS reload failed; the files in use stay"),
        "{}",
        d.log()
    );
    let before = backend.handshakes();
    assert_eq!(
        get_close(l4_addr, "secure", "/").await,
        (200, "secure".into()),
        "a new handshake with the CA in use"
    );
    assert_eq!(backend.handshakes(), before + 1);
}
