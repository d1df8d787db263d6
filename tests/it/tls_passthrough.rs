//! SNI passthrough on a TCP listener: TLS instances terminate their own TLS, svcd reads only
//! the ClientHello's server name (exact, then `*.`), replays it, and splices the rest. Clients
//! naming nothing routed, and clients that are not TLS, too slow or too big, are closed and
//! counted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::daemon::Daemon;
use crate::support::eventually;
use crate::support::free_port;
use crate::support::proxy::register;
use crate::support::tls::{tls_backend, TestCa};

/// The passthrough listener's config: routes for a, b and *.wild, plus `more` routes.
fn listener_config(port: u16, own: &str, more: &str) -> String {
    format!(
        "[[proxy.tcp]]\nlisten = \"127.0.0.1:{port}\"\n{own}\
         [[proxy.tcp.sni]]\nname = \"a.example.test\"\nservice = \"a\"\n\
         [[proxy.tcp.sni]]\nname = \"b.example.test\"\nservice = \"b\"\n\
         [[proxy.tcp.sni]]\nname = \"*.wild.test\"\nservice = \"c\"\n{more}"
    )
}

struct Passthrough {
    d: Daemon,
    port: u16,
    _dir: tempfile::TempDir,
    ca_file: std::path::PathBuf,
}

impl Passthrough {
    /// TLS instances `a` (a.example.test), `b` (b.example.test) and `c` (*.wild.test); a TCP
    /// listener routing by SNI to them, with `own` as its own service line (or none).
    async fn start(own: &str) -> Passthrough {
        let ca = TestCa::new("passthrough ca");
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let port = free_port();
        let d = Daemon::start(&listener_config(port, own, "")).await;
        for (svc, name) in [
            ("a", "a.example.test"),
            ("b", "b.example.test"),
            ("c", "*.wild.test"),
        ] {
            let issued = ca.issue_sans(svc, &[name], None, false);
            let leaked: &'static str = Box::leak(svc.to_string().into_boxed_str());
            let addr = tls_backend(leaked, &issued).await;
            register(&d, svc, &format!("{svc}1"), addr, "tcp").await;
        }
        for svc in ["a", "b", "c"] {
            d.wait_instances(
                "default",
                svc,
                &[&format!("{svc}1")],
                Duration::from_secs(5),
            )
            .await;
        }
        Passthrough {
            d,
            port,
            _dir: dir,
            ca_file,
        }
    }

    /// curl https://NAME:PORT/ (NAME resolved to loopback, verified against the CA); returns
    /// (exit code, body).
    async fn curl(&self, name: &str) -> (i32, String) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&self.ca_file)
            .args(["--resolve", &format!("{name}:{}:127.0.0.1", self.port)])
            .arg(format!("https://{name}:{}/", self.port))
            .output()
            .await
            .expect("curl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// curl to the listener by address: a ClientHello without SNI (curl sends none for an IP).
    /// The certificate is not checked (whichever instance answers, its name is not the IP).
    async fn curl_without_sni(&self) -> (i32, String) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-k", "--max-time", "5"])
            .arg(format!("https://127.0.0.1:{}/", self.port))
            .output()
            .await
            .expect("curl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    async fn failures(&self, reason: &str) -> f64 {
        self.d
            .metric(&format!(
                "svcd_tls_handshake_failures_total{{reason=\"{reason}\"}}"
            ))
            .await
            .unwrap_or(0.0)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

#[tokio::test]
async fn clients_reach_the_instance_their_sni_names_and_others_are_closed() {
    let p = Passthrough::start("").await;
    assert_eq!(p.curl("a.example.test").await, (0, "a".to_string()));
    assert_eq!(p.curl("b.example.test").await, (0, "b".to_string()));
    // The wildcard, one label deep; the instance's own certificate verifies end to end.
    assert_eq!(p.curl("api.wild.test").await, (0, "c".to_string()));
    // No route for the name and no service of the listener's own: closed, counted.
    let (code, _) = p.curl("other.example.test").await;
    assert_ne!(code, 0);
    let (code, _) = p.curl("x.y.wild.test").await;
    assert_ne!(code, 0, "a wildcard covers one label");
    eventually(Duration::from_secs(5), "no_sni_match counted", || async {
        (p.failures("no_sni_match").await >= 2.0).then_some(())
    })
    .await;
    assert!(
        p.d.metric(r#"svcd_tls_handshakes_total{result="passed_through"}"#)
            .await
            >= Some(3.0)
    );
}

#[tokio::test]
async fn a_listener_with_its_own_service_takes_clients_no_route_names() {
    let p = Passthrough::start("service = \"b\"\n").await;
    let (code, body) = p.curl("a.example.test").await;
    assert_eq!((code, body.as_str()), (0, "a"));
    // Unmatched: the listener's own service (b's certificate does not name it, so curl
    // refuses it; the connection reached b, which is what is checked).
    let before =
        p.d.metric(r#"svcd_tcp_connections_total{service="b.default"}"#)
            .await
            .unwrap_or(0.0);
    let _ = p.curl("unrouted.test").await;
    let after =
        p.d.metric(r#"svcd_tcp_connections_total{service="b.default"}"#)
            .await
            .unwrap_or(0.0);
    assert_eq!(after, before + 1.0);
    // No SNI at all: the listener's own service too.
    assert_eq!(p.curl_without_sni().await, (0, "b".to_string()));
}

/// Without a service of its own, a listener closes clients that send no SNI, and counts them.
#[tokio::test]
async fn a_client_without_sni_is_closed_where_the_listener_has_no_service() {
    let p = Passthrough::start("").await;
    let before = p.failures("no_sni_match").await;
    let (code, body) = p.curl_without_sni().await;
    assert_ne!(code, 0, "{body}");
    assert!(body.is_empty());
    eventually(Duration::from_secs(5), "counted", || async {
        (p.failures("no_sni_match").await > before).then_some(())
    })
    .await;
    assert_eq!(p.curl("a.example.test").await, (0, "a".to_string()));
}

/// Not TLS, too big, or too slow: closed within the bounds and counted, while a good client is
/// served.
#[tokio::test]
async fn hostile_client_hellos_are_bounded_and_counted() {
    let p = Passthrough::start("").await;
    let addr = p.addr();
    // Plaintext HTTP.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut out))
        .await
        .expect("closed")
        .ok();
    assert!(out.is_empty());
    // A ClientHello announcing 20,000 bytes, its first record (16 KiB, well-formed) sent and
    // the rest held back: TLS allows it, rustls would wait for the rest until the 5 s timeout;
    // the 16 KiB bound closes it at once.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x4e, 0x20];
    record.resize(5 + 0x4000, 0x41);
    let started = std::time::Instant::now();
    let _ = big.write_all(&record).await;
    tokio::time::timeout(Duration::from_secs(3), big.read_to_end(&mut Vec::new()))
        .await
        .expect("closed at once, not at the timeout")
        .ok();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Dribbled: a byte a second never makes a ClientHello within 5 s.
    let dribble = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        for b in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc] {
            if s.write_all(&[b]).await.is_err() {
                break;
            }
            let mut one = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut one)).await
            {
                return started.elapsed();
            }
        }
        let _ = s.read(&mut [0u8; 1]).await;
        started.elapsed()
    });
    assert_eq!(p.curl("a.example.test").await, (0, "a".to_string()));
    let held = dribble.await.unwrap();
    assert!(
        held >= Duration::from_secs(4) && held < Duration::from_secs(8),
        "{held:?}"
    );
    eventually(Duration::from_secs(5), "each counted", || async {
        (p.failures("protocol").await >= 2.0 && p.failures("timeout").await >= 1.0).then_some(())
    })
    .await;
}

/// A reload that adds an SNI route applies to the next connection and keeps the listener's
/// own series (its balancer table is kept; only the routes' keys change).
#[tokio::test]
async fn a_reload_adds_an_sni_route_and_keeps_the_listeners_series() {
    let p = Passthrough::start("service = \"b\"\n").await;
    let _ = p.curl("unrouted.test").await; // to b, the listener's own service
    let b_series = r#"svcd_tcp_connections_total{service="b.default"}"#;
    assert_eq!(p.d.metric(b_series).await, Some(1.0));
    p.d.reload_with(&listener_config(
        p.port,
        "service = \"b\"\n",
        "[[proxy.tcp.sni]]\nname = \"extra.test\"\nservice = \"a\"\n",
    ))
    .await;
    let a_series = r#"svcd_tcp_connections_total{service="a.default"}"#;
    let before = p.d.metric(a_series).await.unwrap_or(0.0);
    let _ = p.curl("extra.test").await; // a's certificate does not name it; it reached a
    assert_eq!(p.d.metric(a_series).await, Some(before + 1.0));
    let _ = p.curl("unrouted.test").await;
    assert_eq!(
        p.d.metric(b_series).await,
        Some(2.0),
        "b's series kept across the reload"
    );
}
