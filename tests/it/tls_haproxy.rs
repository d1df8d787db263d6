//! HAProxy (OpenSSL) on both sides of svcd's TLS: as a TLS client of an HTTPS listener (with a
//! client certificate, ALPN h2 and http/1.1) and as a TLS instance behind `[[proxy.upstream_tls]]`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::get_close;
use crate::support::proxy::{register, wait_routable};
use crate::support::tls::toml_path;
use crate::support::tls::TestCa;
use crate::support::{eventually, free_port};

/// HAProxy running `config` in the foreground; killed when dropped.
struct Haproxy(Child);

impl Haproxy {
    fn start(dir: &Path, config: &str) -> Haproxy {
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (installed by scripts/setup)");
        Haproxy(child)
    }
}

/// Waits until something listens on `port` (HAProxy binds after parsing its config).
async fn listening(port: u16) {
    eventually(Duration::from_secs(10), "HAProxy listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A certificate and its key in one PEM file, as HAProxy's `crt` takes them.
fn combined(dir: &Path, name: &str, issued: &crate::support::tls::Issued) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, format!("{}{}", issued.cert, issued.key)).unwrap();
    path
}

#[tokio::test]
async fn haproxy_as_a_tls_client_of_svcd_with_a_client_certificate() {
    let ca = TestCa::new("haproxy test ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca
        .issue_sans("web", &["web.default.svc.cluster.local"], None, false)
        .write(dir.path(), "svcd");
    let client = combined(
        dir.path(),
        "haproxy-client",
        &ca.issue_sans(
            "hap",
            &["hap.test"],
            Some("spiffe://td/ns/default/svc/haproxy"),
            false,
        ),
    );
    let https = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.http]]\nlisten = \"127.0.0.1:{https}\"\n[proxy.http.tls]\ncert = {}\nkey = {}\n\
         client_ca = {}\nallow = [\"spiffe://td/ns/default/svc/haproxy\"]\n",
        toml_path(&cert),
        toml_path(&key),
        toml_path(&ca_file)
    ))
    .await;
    let backend = Backend::start("b1").await;
    register(&d, "web", "w1", backend.addr, "http").await;
    wait_routable(&d, "web", 1).await;

    let (h1_port, h2_port) = (free_port(), free_port());
    let server = |alpn: &str| {
        format!(
            "server svcd 127.0.0.1:{https} ssl verify required ca-file {} crt {} sni str(web.default.svc.cluster.local) alpn {alpn}",
            ca_file.display(),
            client.display()
        )
    };
    let _haproxy = Haproxy::start(
        dir.path(),
        &format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
             listen h1\n  bind 127.0.0.1:{h1_port}\n  {}\n\
             listen h2\n  bind 127.0.0.1:{h2_port}\n  {}\n",
            server("http/1.1"),
            server("h2"),
        ),
    );
    for (port, via) in [(h1_port, "1.1 svcd"), (h2_port, "2 svcd")] {
        listening(port).await;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let got = eventually(
            Duration::from_secs(10),
            "HAProxy relays to svcd",
            || async {
                let (status, body) = get_close(addr, "web", "/headers").await;
                (status == 200).then_some(body)
            },
        )
        .await;
        assert!(
            got.contains("uri=spiffe://td/ns/default/svc/haproxy")
                || got.contains("URI=spiffe://td/ns/default/svc/haproxy"),
            "{got}"
        );
        // The HTTP version HAProxy spoke to svcd, as svcd's Via tells the instance: the h2
        // listener's ALPN really chose HTTP/2.
        assert!(
            got.to_ascii_lowercase().contains(&format!("via: {via}")),
            "{got}"
        );
    }
    assert!(
        d.metric(r#"svcd_tls_handshakes_total{result="ok"}"#).await >= Some(2.0),
        "{}",
        d.get("/metrics").await.body
    );
}

#[tokio::test]
async fn haproxy_as_a_tls_instance_behind_svcd() {
    let ca = TestCa::new("haproxy instance ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server_pem = combined(
        dir.path(),
        "instance",
        &ca.issue_sans("hapi", &["hapi.default.svc.cluster.local"], None, false),
    );
    let port = free_port();
    let _haproxy = Haproxy::start(
        dir.path(),
        &format!(
            "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
             frontend tls\n  bind 127.0.0.1:{port} ssl crt {} alpn h2,http/1.1\n  \
             http-request return status 200 content-type text/plain lf-string \"haproxy-instance %HV\"\n",
            server_pem.display()
        ),
    );
    let d = Daemon::start(&format!(
        "[[proxy.upstream_tls]]\nservice = \"hapi\"\nca = {}\n",
        toml_path(&ca_file)
    ))
    .await;
    listening(port).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    register(&d, "hapi", "h1", addr, "http").await;
    let body = eventually(
        Duration::from_secs(10),
        "svcd reaches HAProxy over TLS",
        || async {
            let (status, body) = get_close(d.http, "hapi", "/").await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(body, "haproxy-instance HTTP/1.1");
    // An h2 instance: ALPN h2 on the same service's TLS pools.
    register(&d, "hapi", "h1", addr, "h2").await;
    eventually(Duration::from_secs(10), "over HTTP/2", || async {
        (get_close(d.http, "hapi", "/").await == (200, "haproxy-instance HTTP/2.0".into()))
            .then_some(())
    })
    .await;
}
