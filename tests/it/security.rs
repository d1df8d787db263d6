//! etcd over TLS with client certificates, etcd users, and read-only nodes, against a real etcd:
//! the right credentials work; a wrong CA, an expired certificate or a read-only user give an
//! error naming the endpoint; a running daemon whose etcd became unreachable keeps serving and
//! says so; SIGHUP re-reads rotated certificates.

use std::time::Duration;

use etcd_client::{Certificate, Identity, Permission, TlsOptions};
use nix::sys::signal::Signal;

use crate::support::daemon::Daemon;
use crate::support::etcd::Etcd;
use crate::support::eventually;
use crate::support::tls::{TestCa, TlsFiles};

const WAIT: Duration = Duration::from_secs(10);

fn body(ip: &str) -> String {
    format!(r#"{{"ip":"{ip}","ports":{{"http":8080}}}}"#)
}

fn etcd_at(endpoint: &str) -> String {
    format!("[registry]\nlease_ttl = \"2s\"\n[registry.etcd]\nendpoints = [\"{endpoint}\"]\n")
}

/// What the test's own etcd client presents: `ca` trusted, a client certificate from it.
fn client_tls(ca: &TestCa, name: &str) -> TlsOptions {
    let issued = ca.issue(name, false);
    TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(Identity::from_pem(issued.cert, issued.key))
}

/// An etcd serving TLS with a certificate from `ca` and requiring client certificates from it.
async fn tls_etcd(ca: &TestCa, dir: &std::path::Path) -> Etcd {
    let server = TlsFiles::write(&dir.join("etcd"), ca, &ca.issue("etcd", false));
    Etcd::start_tls(server, client_tls(ca, "root")).await
}

/// `/readyz` of a daemon that cannot reach its store: 503 with a reason, once it has one.
async fn unready_reason(d: &Daemon, contains: &str) -> String {
    eventually(WAIT, "readyz to give the store's error", || async {
        let r = crate::support::daemon::http(d.admin, "GET", "/readyz", None)
            .await
            .ok()?;
        (r.status == 503 && r.body.contains(contains)).then_some(r.body)
    })
    .await
}

#[tokio::test]
async fn etcd_over_tls_needs_the_right_ca_and_a_valid_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("etcd CA");
    let etcd = tls_etcd(&ca, dir.path()).await;
    let endpoint = etcd.endpoint();

    // The right CA and a valid client certificate: synced, registrations work.
    let good = TlsFiles::write(&dir.path().join("good"), &ca, &ca.issue("node-1", false));
    let d = Daemon::start(&format!("{}{}", etcd_at(&endpoint), good.svcd_config())).await;
    d.put_instance("web", "w1", &body("10.0.0.1")).await;
    assert_eq!(d.instance_ids("default", "web").await, vec!["w1"]);

    // etcd's certificate from a CA this node does not trust.
    let other = TestCa::new("another CA");
    let wrong_ca = TlsFiles::write(
        &dir.path().join("wrong-ca"),
        &other,
        &ca.issue("node-2", false),
    );
    let d2 = Daemon::spawn(
        &format!("{}{}", etcd_at(&endpoint), wrong_ca.svcd_config()),
        &[],
    );
    let reason = unready_reason(&d2, &endpoint).await;
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    assert!(d2.log().contains(&endpoint), "{}", d2.log());

    // An expired client certificate: etcd refuses the handshake. Under TLS 1.3 the client
    // certificate is checked after the client's side of the handshake is done, so the client
    // sees etcd's alert or, when etcd closes first, only the broken connection; it never syncs.
    let expired = TlsFiles::write(&dir.path().join("expired"), &ca, &ca.issue("node-3", true));
    let d3 = Daemon::spawn(
        &format!("{}{}", etcd_at(&endpoint), expired.svcd_config()),
        &[],
    );
    let reason = unready_reason(&d3, &endpoint).await;
    assert!(reason.contains("transport error"), "{reason}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = crate::support::daemon::http(d3.admin, "GET", "/readyz", None)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "never synced: {}", r.body);
    eprintln!("wrong CA and expired certificate refused; expired: {reason}");

    // A certificate file that does not exist: a clear start-up error naming key and path.
    let missing = format!(
        "{}[registry.etcd.tls]\nca = \"/nonexistent/ca.pem\"\n",
        etcd_at(&endpoint)
    );
    let mut d4 = Daemon::spawn(&missing, &[]);
    let status = d4.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(
        d4.log()
            .contains("registry.etcd.tls.ca: /nonexistent/ca.pem"),
        "{}",
        d4.log()
    );
}

#[tokio::test]
async fn rotated_etcd_certificates_keep_the_daemon_serving_until_sighup_reads_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = TestCa::new("CA 1");
    let mut etcd = tls_etcd(&ca1, dir.path()).await;
    let endpoint = etcd.endpoint();
    let node_dir = dir.path().join("node");
    let files = TlsFiles::write(&node_dir, &ca1, &ca1.issue("node-1", false));
    let d = Daemon::start(&format!("{}{}", etcd_at(&endpoint), files.svcd_config())).await;
    etcd.put_endpoint("web", "w1", &body("10.0.0.1")).await;
    d.wait_instances("default", "web", &["w1"], WAIT).await;

    // etcd restarts with certificates from a new CA the node does not know yet.
    let ca2 = TestCa::new("CA 2");
    etcd.stop();
    TlsFiles::write(&dir.path().join("etcd"), &ca2, &ca2.issue("etcd", false));
    etcd.set_client_tls(client_tls(&ca2, "root"));
    etcd.resume().await;
    eventually(WAIT, "the broken store noticed", || async {
        (d.metric("svcd_registry_connected").await == Some(0.0)).then_some(())
    })
    .await;
    // Still serving its last snapshot, and saying why it is stale.
    let ready = eventually(WAIT, "readyz to say why", || async {
        let r = d.get("/readyz").await;
        (r.status == 200 && r.body.contains("UnknownIssuer")).then_some(r.body)
    })
    .await;
    assert!(ready.contains(&endpoint), "{ready}");
    let answer = crate::support::dns::udp(
        d.dns,
        "web.default.svc.cluster.local.",
        hickory_proto::rr::RecordType::A,
        None,
    )
    .await;
    assert_eq!(crate::support::dns::addrs(&answer), vec!["10.0.0.1"]);

    // The operator rotates the node's files and sends SIGHUP: connected again.
    TlsFiles::write(&node_dir, &ca2, &ca2.issue("node-1", false));
    d.signal(Signal::SIGHUP);
    etcd.put_endpoint("web", "w2", &body("10.0.0.2")).await;
    d.wait_instances("default", "web", &["w1", "w2"], WAIT)
        .await;
    assert_eq!(d.metric("svcd_registry_connected").await, Some(1.0));
    assert_eq!(d.get("/readyz").await.body, "ready\n");
}

/// etcd with authentication: a node's user has read-write on `/svcd/v1/`, a consumer's user
/// read only.
async fn etcd_with_users() -> Etcd {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.user_add("root", "root-pw", None).await.unwrap();
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    for (role, permission) in [
        (
            "svcd-node",
            Permission::read_write("/svcd/v1/").with_prefix(),
        ),
        ("svcd-reader", Permission::read("/svcd/v1/").with_prefix()),
    ] {
        c.role_add(role).await.unwrap();
        c.role_grant_permission(role, permission).await.unwrap();
    }
    for (user, role) in [("node", "svcd-node"), ("reader", "svcd-reader")] {
        c.user_add(user, format!("{user}-pw"), None).await.unwrap();
        c.user_grant_role(user, role).await.unwrap();
    }
    c.auth_enable().await.unwrap();
    etcd
}

#[tokio::test]
async fn etcd_users_from_a_password_file_or_the_environment_and_read_only_nodes() {
    let etcd = etcd_with_users().await;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let reader_pw = dir.path().join("reader-pw");
    std::fs::write(&reader_pw, "reader-pw\n").unwrap();

    // A node user, its password from the environment: registrations work.
    let node = Daemon::start_with(
        &format!("{}username = \"node\"\n", etcd_at(&endpoint)),
        &[("SVCD_ETCD_PASSWORD", "node-pw")],
    )
    .await;
    node.put_instance("web", "w1", &body("10.0.0.1")).await;

    // A read-only user, its password from a file: it syncs and serves what the node wrote ...
    let reader = Daemon::start(&format!(
        "{}username = \"reader\"\npassword_file = {reader_pw:?}\n",
        etcd_at(&endpoint)
    ))
    .await;
    reader.wait_instances("default", "web", &["w1"], WAIT).await;
    // ... and a write through it fails with etcd's reason, naming the endpoint.
    let r = reader
        .request(
            "PUT",
            "/v1/services/default/web/instances/r1",
            Some(&body("10.0.0.9")),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("permission denied"), "{}", r.body);
    assert!(r.body.contains(&endpoint), "{}", r.body);

    // With read_only set, the node refuses writes itself: 403 with a reason, nothing written.
    let consumer = Daemon::start(&format!(
        "[registry]\nread_only = true\n[registry.etcd]\nendpoints = [\"{endpoint}\"]\n\
         username = \"reader\"\npassword_file = {reader_pw:?}\n"
    ))
    .await;
    for (method, path) in [
        ("PUT", "/v1/services/default/web/instances/c1"),
        ("DELETE", "/v1/services/default/web/instances/w1"),
        ("POST", "/v1/services/default/web/instances/w1/drain"),
    ] {
        let r = consumer
            .request(method, path, Some(&body("10.0.0.9")))
            .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains("read-only"));
    }
    assert_eq!(consumer.instance_ids("default", "web").await, vec!["w1"]);

    // A wrong password: not ready, and the reason says so.
    let wrong = Daemon::spawn(
        &format!(
            "{}username = \"node\"\npassword = \"nope\"\n",
            etcd_at(&endpoint)
        ),
        &[],
    );
    let reason = unready_reason(&wrong, "authentication failed").await;
    assert!(reason.contains(&endpoint), "{reason}");
}
