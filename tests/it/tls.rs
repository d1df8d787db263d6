//! HTTPS on the HTTP proxy and the admin API with the clients users run: curl (HTTP/1.1 and
//! HTTP/2 over ALPN), openssl s_client (SNI and ALPN), client certificates (mTLS, `allow`,
//! `x-forwarded-client-cert`), hostile clients (plaintext, silence, a dribbled ClientHello),
//! and certificate rotation (file watch and SIGHUP, a bad file keeping the old one).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::backend::Backend;
use crate::support::daemon::Daemon;
use crate::support::proxy::{register, wait_routable};
use crate::support::tls::toml_path;
use crate::support::tls::TestCa;
use crate::support::{eventually, free_port};

/// A daemon with an HTTPS listener for `web` (certificates `web` and `*.example.test`, both
/// from `ca`), plus `tls_extra` keys in its `tls` table, and one backend.
struct Https {
    d: Daemon,
    port: u16,
    dir: tempfile::TempDir,
    ca: TestCa,
    _backend: Backend,
}

impl Https {
    async fn start(tls_extra: &str, extra: &str) -> Https {
        let ca = TestCa::new("svcd test ca");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let (web_cert, web_key) = ca
            .issue_sans("web", &["web", "127.0.0.1"], None, false)
            .write(dir.path(), "web");
        let (wild_cert, wild_key) = ca
            .issue_sans("wild", &["*.example.test"], None, false)
            .write(dir.path(), "wild");
        let port = free_port();
        let d = Daemon::start(&format!(
            "{extra}[[proxy.http]]\nlisten = \"127.0.0.1:{port}\"\n[proxy.http.tls]\n\
             certs = [{{ cert = {}, key = {} }}, {{ cert = {}, key = {} }}]\n{tls_extra}",
            toml_path(&web_cert),
            toml_path(&web_key),
            toml_path(&wild_cert),
            toml_path(&wild_key),
        ))
        .await;
        let backend = Backend::start("b1").await;
        register(&d, "web", "w1", backend.addr, "http").await;
        wait_routable(&d, "web", 1).await;
        Https {
            d,
            port,
            dir,
            ca,
            _backend: backend,
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// curl against `https://web:PORT{path}` (resolved to loopback) with `args`; returns
    /// (exit code, stdout).
    async fn curl(&self, path: &str, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(self.ca_file())
            .args(["--resolve", &format!("web:{}:127.0.0.1", self.port)])
            .args(args)
            .arg(format!("https://web:{}{path}", self.port))
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("curl (installed by scripts/setup)");
        let code = out.status.code().unwrap_or(-1);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if code != 0 {
            // What curl said, for the assertion's message.
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        (code, text)
    }

    async fn metric(&self, selector: &str) -> f64 {
        self.d.metric(selector).await.unwrap_or(0.0)
    }
}

/// `openssl s_client` with `args`, no input; returns its output.
fn s_client(port: u16, args: &[&str]) -> String {
    s_client_sending(port, args, "")
}

/// `openssl s_client` with `args`, sending `input` and reading until the server closes.
fn s_client_sending(port: u16, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .args(if input.is_empty() {
            &[][..]
        } else {
            &["-ign_eof"][..]
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (installed by scripts/setup)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn curl_speaks_http1_and_http2_over_tls_chosen_by_alpn() {
    let h = Https::start("", "").await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, out) = h.curl("/", &[flag, "-w", "\n%{http_version}"]).await;
        assert_eq!(code, 0, "{flag}: {out}");
        assert_eq!(out, format!("b1\n{version}"), "{flag}");
    }
    // The instance learns the client came over TLS.
    let (_, headers) = h.curl("/headers", &["--http1.1"]).await;
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    assert!(
        h.metric(r#"svcd_tls_handshakes_total{result="ok",version="1.3"}"#)
            .await
            >= 3.0
    );
    // TLS 1.2 too.
    let (code, out) = h
        .curl("/", &["--http1.1", "--tlsv1.2", "--tls-max", "1.2"])
        .await;
    assert_eq!((code, out.as_str()), (0, "b1"));
    assert_eq!(
        h.metric(r#"svcd_tls_handshakes_total{result="ok",version="1.2"}"#)
            .await,
        1.0
    );
    // Expiry of each certificate served, by name.
    let m = h.d.get("/metrics").await.body;
    assert!(
        m.contains("svcd_tls_certificate_expiry_timestamp_seconds{listener=\"http/127.0.0.1:")
            && m.contains("name=\"*.example.test\"")
            && m.contains("name=\"web\""),
        "{m}"
    );
}

#[tokio::test]
async fn s_client_sees_the_certificate_its_sni_names_and_the_alpn_it_offered() {
    let h = Https::start("", "").await;
    let wild = s_client(h.port, &["-servername", "api.example.test", "-alpn", "h2"]);
    assert!(
        wild.contains("CN=wild") || wild.contains("CN = wild"),
        "{wild}"
    );
    assert!(wild.contains("ALPN protocol: h2"), "{wild}");
    let web = s_client(h.port, &["-servername", "web", "-alpn", "http/1.1"]);
    assert!(web.contains("CN=web") || web.contains("CN = web"), "{web}");
    assert!(web.contains("ALPN protocol: http/1.1"), "{web}");
    // No SNI, or a name no certificate covers: the first certificate.
    let none = s_client(h.port, &["-noservername"]);
    assert!(
        none.contains("CN=web") || none.contains("CN = web"),
        "{none}"
    );
    let other = s_client(h.port, &["-servername", "nothing.else"]);
    assert!(
        other.contains("CN=web") || other.contains("CN = web"),
        "{other}"
    );
    // Resumption, TLS 1.3 (tickets: read after the handshake, so the client sends a request
    // svcd answers itself and reads to the close) and TLS 1.2 (session ids).
    let request = "GET / HTTP/1.1\r\nHost: nothing.test\r\nConnection: close\r\n\r\n";
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = h.dir.path().join(format!("sess{version}.pem"));
        let sess = sess.to_str().unwrap();
        let args = ["-servername", "web", version, "-sess_out", sess];
        let first = s_client_sending(h.port, &args, request);
        assert!(first.contains("New,"), "{version}: {first}");
        let args = ["-servername", "web", version, "-sess_in", sess];
        let again = s_client_sending(h.port, &args, request);
        assert!(again.contains("Reused,"), "{version}: {again}");
    }
}

/// Client certificates: `client_ca` refuses clients without one (or with one from another CA,
/// or expired) in the handshake; `allow` answers 403 to identities it does not list; the
/// instance gets the verified identity in `x-forwarded-client-cert`, never a client's own.
#[tokio::test]
async fn client_certificates_are_verified_allowed_and_forwarded() {
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca_dir.path().join("clients.pem");
    let clients = TestCa::new("clients ca");
    std::fs::write(&ca_path, clients.pem()).unwrap();
    let h = Https::start(
        &format!(
            "client_ca = {}\nallow = [\"spiffe://td/ns/default/svc/client\"]\n",
            toml_path(&ca_path)
        ),
        "",
    )
    .await;
    let write = |issued: crate::support::tls::Issued, name: &str| issued.write(ca_dir.path(), name);
    let (good_c, good_k) = write(
        clients.issue_sans(
            "client",
            &["client.test"],
            Some("spiffe://td/ns/default/svc/client"),
            false,
        ),
        "good",
    );
    let (other_c, other_k) = write(
        clients.issue_sans(
            "intruder",
            &["intruder.test"],
            Some("spiffe://td/ns/default/svc/intruder"),
            false,
        ),
        "other",
    );
    let (old_c, old_k) = write(
        clients.issue_sans(
            "client",
            &["client.test"],
            Some("spiffe://td/ns/default/svc/client"),
            true,
        ),
        "expired",
    );
    let stranger_ca = TestCa::new("another ca");
    let (str_c, str_k) = write(
        stranger_ca.issue_sans(
            "client",
            &["client.test"],
            Some("spiffe://td/ns/default/svc/client"),
            false,
        ),
        "stranger",
    );
    let with = |c: &PathBuf, k: &PathBuf| {
        vec![
            "--cert".to_string(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]
    };

    let args = with(&good_c, &good_k);
    let mut a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    a.extend([
        "-H",
        "x-forwarded-client-cert: By=forged;URI=spiffe://td/ns/default/svc/admin",
    ]);
    let (code, headers) = h.curl("/headers", &a).await;
    assert_eq!(code, 0, "{headers}");
    let xfcc: Vec<&str> = headers
        .lines()
        .filter(|l| l.starts_with("x-forwarded-client-cert:"))
        .collect();
    assert_eq!(xfcc.len(), 1, "{headers}");
    assert!(
        xfcc[0].contains("URI=spiffe://td/ns/default/svc/client"),
        "{headers}"
    );
    assert!(xfcc[0].contains("Hash="), "{headers}");
    assert!(!xfcc[0].contains("forged"), "{headers}");

    let args = with(&other_c, &other_k);
    let mut a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    a.extend(["-w", "%{http_code}"]);
    let (code, body) = h.curl("/", &a).await;
    assert_eq!(code, 0);
    assert!(body.ends_with("403"), "{body}");

    let failures_before = h
        .metric(r#"svcd_tls_handshake_failures_total{reason="bad_certificate"}"#)
        .await;
    for (c, k) in [(&old_c, &old_k), (&str_c, &str_k)] {
        let args = with(c, k);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (code, out) = h.curl("/", &a).await;
        assert_ne!(code, 0, "refused in the handshake: {out}");
    }
    let (code, _) = h.curl("/", &[]).await;
    assert_ne!(code, 0, "no certificate, refused");
    eventually(
        Duration::from_secs(5),
        "three bad_certificate failures",
        || async {
            (h.metric(r#"svcd_tls_handshake_failures_total{reason="bad_certificate"}"#)
                .await
                >= failures_before + 3.0)
                .then_some(())
        },
    )
    .await;
}

/// Plaintext HTTP, random bytes, a client that says nothing and one that dribbles its
/// ClientHello are each closed and counted, and a good client is served meanwhile.
#[tokio::test]
async fn hostile_clients_are_closed_counted_and_harm_no_one() {
    let h = Https::start("handshake_timeout = \"1s\"\n", "").await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.port));

    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(
        !String::from_utf8_lossy(&buf).contains("b1"),
        "no plaintext answer"
    );

    let mut noise = TcpStream::connect(addr).await.unwrap();
    noise
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0xff, 0xee])
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(3), noise.read_to_end(&mut Vec::new()))
        .await
        .expect("closed");

    // Silent, and dribbling: both held only for handshake_timeout.
    let silent = TcpStream::connect(addr).await.unwrap();
    let dribble = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The start of a ClientHello record, a byte every 300 ms.
        for b in [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0,
        ] {
            if s.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let started = Instant::now();
        let _ = s.read_to_end(&mut Vec::new()).await;
        started
    });
    // Served meanwhile.
    let (code, out) = h.curl("/", &["--http2"]).await;
    assert_eq!((code, out.as_str()), (0, "b1"));
    let _ = dribble.await.unwrap();
    eventually(Duration::from_secs(5), "timeouts counted", || async {
        (h.metric(r#"svcd_tls_handshake_failures_total{reason="timeout"}"#)
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
    let mut silent = silent;
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut [0u8; 16]))
        .await
        .expect("silent client closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        h.metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
            .await
            >= 2.0
    );
    // A ClientHello announcing 128 KiB (past what a handshake message may be): closed at
    // once, not at the handshake timeout.
    let protocol_before = h
        .metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
        .await;
    let started = Instant::now();
    let mut big = TcpStream::connect(addr).await.unwrap();
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x02, 0x00, 0x00];
    record.resize(5 + 0x4000, 0x41);
    let _ = big.write_all(&record).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), big.read_to_end(&mut Vec::new()))
        .await
        .expect("oversized ClientHello closed");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(5),
        "the oversized ClientHello counted",
        || async {
            (h.metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
                .await
                > protocol_before)
                .then_some(())
        },
    )
    .await;

    // A flood of bad clients: each counted, the log bounded (5 lines a second).
    let logged = |log: &str| log.matches("TLS handshake failed").count();
    let (lines_before, flood_started) = (logged(&h.d.log()), Instant::now());
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"not tls at all\r\n\r\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut Vec::new())).await;
    }
    let seconds = flood_started.elapsed().as_secs() + 1;
    eventually(Duration::from_secs(5), "the flood counted", || async {
        (h.metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
            .await
            >= protocol_before + 201.0)
            .then_some(())
    })
    .await;
    let lines = logged(&h.d.log()) - lines_before;
    assert!(
        lines <= 2 * 5 * seconds as usize,
        "{lines} log lines for 200 bad clients in {seconds} s"
    );
    let (code, out) = h.curl("/", &[]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "b1"),
        "a good client still served"
    );

    // TLS 1.0 only: refused in the handshake (an alert), counted as a protocol failure.
    let before = h
        .metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
        .await;
    let old = s_client(h.port, &["-tls1", "-servername", "web"]);
    assert!(
        old.contains("Cipher is (NONE)") && old.contains("alert handshake failure"),
        "{old}"
    );
    eventually(
        Duration::from_secs(5),
        "the TLS 1.0 client counted",
        || async {
            (h.metric(r#"svcd_tls_handshake_failures_total{reason="protocol"}"#)
                .await
                > before)
                .then_some(())
        },
    )
    .await;
}

/// The serial number openssl sees, for spotting a new certificate.
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername web </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Rotation: a certificate replaced on disk is served to the next handshake (the file watch,
/// no signal), a broken one keeps the old and is counted, SIGHUP re-reads too; an established
/// connection keeps working through all of it.
#[tokio::test]
async fn rotated_certificates_are_served_next_and_a_bad_file_keeps_the_old() {
    let h = Https::start("", "").await;
    let first = served_serial(h.port);
    assert!(first.starts_with("serial="), "{first}");
    // A keep-alive connection made with the first certificate, used again after each change.
    let config = crate::support::tls::client_config(&h.ca.pem(), None, &[b"http/1.1"]);
    let held = crate::support::tls::tls_connect(h.port, config, "web")
        .await
        .unwrap();
    let mut held = crate::support::proxy::H1::over(held).await.unwrap();
    assert_eq!(held.get("web", "/").await.1, "b1");

    let renewed = h.ca.issue_sans("web", &["web", "127.0.0.1"], None, false);
    renewed.write(h.dir.path(), "web");
    let second = eventually(
        Duration::from_secs(5),
        "the renewed certificate served",
        || async {
            let s = served_serial(h.port);
            (s != first && s.starts_with("serial=")).then_some(s)
        },
    )
    .await;
    assert_eq!(
        h.metric(r#"svcd_tls_reloads_total{result="ok"}"#).await,
        1.0,
        "one reload for one change"
    );
    assert!(
        h.d.log().contains("TLS certificates reloaded"),
        "{}",
        h.d.log()
    );
    assert_eq!(held.get("web", "/").await.1, "b1", "established, kept");

    // A broken key: the old material stays.
    std::fs::write(
        h.dir.path().join("web.key"),
        "-----BEGIN PRIVATE KEY-----\nbroken\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the failed reload counted",
        || async {
            (h.metric(r#"svcd_tls_reloads_total{result="failed"}"#).await >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(served_serial(h.port), second);
    let (code, out) = h.curl("/", &[]).await;
    assert_eq!((code, out.as_str()), (0, "b1"));
    assert!(
        h.d.log()
            .contains("TLS reload failed; the certificates in use stay"),
        "{}",
        h.d.log()
    );

    // Fixed again, and SIGHUP (also) re-reads it.
    let third = h.ca.issue_sans("web", &["web", "127.0.0.1"], None, false);
    third.write(h.dir.path(), "web");
    h.d.signal(Signal::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "the third certificate served",
        || async {
            let s = served_serial(h.port);
            (s != second && s.starts_with("serial=")).then_some(())
        },
    )
    .await;
    assert_eq!(
        held.get("web", "/").await.1,
        "b1",
        "still the first connection"
    );
    assert!(!held.is_closed());
}

/// The admin listeners' tests: a CA, a server certificate for localhost from it, and svcd
/// started by hand with `[admin]` on two ports (`Daemon` waits through a plaintext admin API).
struct AdminTls {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    /// The listeners' certificate and key (`localhost`, `127.0.0.1`).
    cert: PathBuf,
    key: PathBuf,
    admin_port: u16,
    metrics_port: u16,
    daemon: Option<KillOnDrop>,
}

impl AdminTls {
    fn new(ca_name: &str) -> AdminTls {
        let ca = TestCa::new(ca_name);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let (cert, key) = ca
            .issue_sans("admin", &["127.0.0.1", "localhost"], None, false)
            .write(dir.path(), "admin");
        AdminTls {
            dir,
            ca,
            ca_file,
            cert,
            key,
            admin_port: free_port(),
            metrics_port: free_port(),
            daemon: None,
        }
    }

    /// A client certificate from this CA for `uri` (or from `ca`), written as `file`.
    fn client(&self, ca: Option<&TestCa>, file: &str, uri: &str) -> (PathBuf, PathBuf) {
        ca.unwrap_or(&self.ca)
            .issue_sans(file, &[], Some(uri), false)
            .write(self.dir.path(), file)
    }

    /// `cert = …, key = …` of the listeners' certificate, plus `extra`, as a `tls` table body.
    fn table(&self, extra: &str) -> String {
        format!(
            "cert = {}\nkey = {}\n{extra}",
            toml_path(&self.cert),
            toml_path(&self.key)
        )
    }

    /// Starts svcd with `tables` after `[admin]`'s two listen lines.
    fn run(&mut self, tables: &str) {
        let config = self.dir.path().join("svcd.toml");
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{tables}\n\
                 [dns]\nlisten = \"127.0.0.1:{}\"\n[[proxy.http]]\nlisten = \"127.0.0.1:{}\"\n",
                self.admin_port,
                self.metrics_port,
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        self.daemon = Some(KillOnDrop(
            Command::new(crate::support::svcd_bin())
                .args(["run", "--config"])
                .arg(&config)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }

    /// curl `url` trusting the CA, with a client certificate if given: (exit code, body, then
    /// a line with the HTTP status).
    fn get(&self, url: &str, client: Option<&(PathBuf, PathBuf)>) -> (i32, String) {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca_file);
        if let Some((cert, key)) = client {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = c.arg(url).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `https://localhost:{port}{path}`.
    fn https(port: u16, path: &str) -> String {
        format!("https://localhost:{port}{path}")
    }

    async fn wait_ready(&self, url: &str, client: Option<&(PathBuf, PathBuf)>) {
        eventually(Duration::from_secs(10), "svcd ready", || async {
            let (code, out) = self.get(url, client);
            (code == 0 && out == "ready\n\n200").then_some(())
        })
        .await;
    }

    /// `openssl s_client -cert/-key` (or none) asking the metrics listener for `/readyz` over
    /// HTTP/1.0: its whole output.
    fn s_client_readyz(&self, client: Option<&(PathBuf, PathBuf)>) -> String {
        let mut args = vec![
            "-servername".to_string(),
            "localhost".into(),
            "-CAfile".into(),
            self.ca_file.display().to_string(),
        ];
        if let Some((cert, key)) = client {
            args.extend([
                "-cert".into(),
                cert.display().to_string(),
                "-key".into(),
                key.display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s_client_sending(
            self.metrics_port,
            &args,
            "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n",
        )
    }
}

/// The admin API and the metrics listener over HTTPS from `admin.tls`; plaintext is refused.
#[tokio::test]
async fn admin_and_metrics_listeners_serve_https() {
    let mut a = AdminTls::new("admin ca");
    a.run(&format!("[admin.tls]\n{}", a.table("")));
    a.wait_ready(&AdminTls::https(a.admin_port, "/readyz"), None)
        .await;
    let (_, out) = a.get(&AdminTls::https(a.metrics_port, "/metrics"), None);
    assert!(
        out.contains("svcd_tls_handshakes_total{listener=\"admin\""),
        "{out}"
    );
    let (code, _) = a.get(
        &format!("http://127.0.0.1:{}/metrics", a.metrics_port),
        None,
    );
    assert_ne!(code, 0, "plaintext on a TLS port");
}

/// The admin API and metrics listener with client certificates: a client without one fails
/// the handshake, one from another CA too, an identity `allow` does not list gets 403, the
/// listed one gets its answer; with curl and with `openssl s_client -cert`.
#[tokio::test]
async fn admin_and_metrics_listeners_take_client_certificates_and_an_allow_list() {
    let mut a = AdminTls::new("admin mtls ca");
    let ops = a.client(None, "ops", "spiffe://td/ns/ops/svc/prometheus");
    let dev = a.client(None, "dev", "spiffe://td/ns/dev/svc/laptop");
    let stranger = TestCa::new("stranger");
    let odd = a.client(Some(&stranger), "odd", "spiffe://td/ns/ops/svc/prometheus");
    a.run(&format!(
        "[admin.tls]\n{}",
        a.table(&format!(
            "client_ca = {}\nallow = [\"spiffe://td/ns/ops/svc/prometheus\"]\n",
            toml_path(&a.ca_file)
        ))
    ));
    a.wait_ready(&AdminTls::https(a.admin_port, "/readyz"), Some(&ops))
        .await;
    for port in [a.admin_port, a.metrics_port] {
        let url = AdminTls::https(port, "/readyz");
        assert_eq!(
            a.get(&url, Some(&ops)),
            (0, "ready\n\n200".to_string()),
            "{port}: the allowed identity"
        );
        let (_, denied) = a.get(&url, Some(&dev));
        assert!(
            denied.ends_with("403"),
            "{port}: another identity: {denied}"
        );
        let (code, _) = a.get(&url, None);
        assert_ne!(code, 0, "{port}: no client certificate");
        let (code, _) = a.get(&url, Some(&odd));
        assert_ne!(code, 0, "{port}: a certificate from another CA");
    }
    // openssl s_client: accepted with the listed certificate, refused with an alert without one
    // or with another CA's.
    let accepted = a.s_client_readyz(Some(&ops));
    assert!(
        accepted.contains("HTTP/1.0 200") && accepted.contains("ready"),
        "{accepted}"
    );
    for (what, client) in [("none", None), ("another CA's", Some(&odd))] {
        let refused = a.s_client_readyz(client);
        assert!(
            refused.contains("alert") && !refused.contains("HTTP/1.0 200"),
            "{what}: {refused}"
        );
    }
}

/// `admin.metrics_tls`: the metrics listener serves HTTPS with its own certificate and client
/// CA (Prometheus') while the API stays plaintext on loopback; the API's clients' CA does not
/// get in there.
#[tokio::test]
async fn the_metrics_listener_serves_its_own_tls_table() {
    let mut a = AdminTls::new("scrape ca");
    let prometheus = a.client(
        None,
        "prometheus",
        "spiffe://td/ns/monitoring/svc/prometheus",
    );
    let elsewhere = TestCa::new("api clients ca");
    let other = a.client(Some(&elsewhere), "other", "spiffe://td/ns/ops/svc/cli");
    a.run(&format!(
        "[admin.metrics_tls]\n{}",
        a.table(&format!("client_ca = {}\n", toml_path(&a.ca_file)))
    ));
    a.wait_ready(&format!("http://127.0.0.1:{}/readyz", a.admin_port), None)
        .await;
    let (code, out) = a.get(
        &AdminTls::https(a.metrics_port, "/metrics"),
        Some(&prometheus),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("svcd_tls_handshakes_total{listener=\"metrics\",result=\"ok\""),
        "{out}"
    );
    assert!(
        !out.contains("listener=\"admin\""),
        "the API has no TLS: {out}"
    );
    let (code, _) = a.get(&AdminTls::https(a.metrics_port, "/metrics"), Some(&other));
    assert_ne!(code, 0, "another CA's certificate");
    let (code, _) = a.get(
        &format!("http://127.0.0.1:{}/metrics", a.metrics_port),
        None,
    );
    assert_ne!(code, 0, "plaintext on the metrics listener");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client's own `x-forwarded-client-cert` never reaches an instance, whichever HTTP/1 path
/// serves it (the fast path for HTTP/1.1, hyper for HTTP/1.0) and with or without TLS.
#[tokio::test]
async fn a_clients_own_forwarded_client_cert_is_removed_on_every_path() {
    let (d, _b) = crate::support::proxy::web_service("", &["b1"]).await;
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let request = format!(
            "GET /headers {version}\r\nHost: web\r\nConnection: close\r\n\
             X-Forwarded-Client-Cert: By=forged;URI=spiffe://td/ns/default/svc/admin\r\n\r\n"
        );
        let reply = crate::support::proxy::raw_exchange(d.http, request.as_bytes()).await;
        assert!(reply.contains(" 200 "), "{version}: {reply}");
        assert!(
            !reply.to_ascii_lowercase().contains("forwarded-client-cert"),
            "{version}: {reply}"
        );
        assert!(
            reply.lines().any(|l| l == "x-forwarded-proto: http"),
            "{version}: {reply}"
        );
    }
}

/// A route's `allow`: only the identities it lists reach it; other verified clients still reach
/// the rest of the listener, and plaintext clients (no certificate) never reach it.
#[tokio::test]
async fn a_routes_allow_list_admits_only_its_identities() {
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca_dir.path().join("clients.pem");
    let clients = TestCa::new("clients ca");
    std::fs::write(&ca_path, clients.pem()).unwrap();
    let h = Https::start(
        &format!("client_ca = {}\n", toml_path(&ca_path)),
        "[[proxy.routes]]\nhost = \"web\"\npath_prefix = \"/private\"\nservice = \"web\"\n\
         allow = [\"spiffe://td/ns/default/svc/client\"]\n",
    )
    .await;
    let (ok_c, ok_k) = clients
        .issue_sans(
            "c",
            &["c.test"],
            Some("spiffe://td/ns/default/svc/client"),
            false,
        )
        .write(ca_dir.path(), "ok");
    let (no_c, no_k) = clients
        .issue_sans(
            "o",
            &["o.test"],
            Some("spiffe://td/ns/default/svc/other"),
            false,
        )
        .write(ca_dir.path(), "other");
    let code = |c: &PathBuf, k: &PathBuf, path: &'static str| {
        let args = [
            "--cert".to_string(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        let h = &h;
        async move {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            h.curl(path, &a).await.1
        }
    };
    assert_eq!(code(&ok_c, &ok_k, "/private").await, "200");
    assert_eq!(code(&no_c, &no_k, "/private").await, "403");
    assert_eq!(code(&no_c, &no_k, "/").await, "200");
    let plain = crate::support::proxy::raw_exchange(
        h.d.http,
        b"GET /private HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 403"), "{plain}");
}

/// A gRPC client (tonic) over TLS, ALPN h2, through the HTTPS listener to a gRPC instance.
#[tokio::test]
async fn a_grpc_client_over_tls_reaches_a_grpc_instance() {
    let h = Https::start("", "").await;
    let grpc = Backend::start("g1").await;
    register(&h.d, "grpcsvc", "g1", grpc.addr, "grpc").await;
    h.d.wait_instances("default", "grpcsvc", &["g1"], Duration::from_secs(5))
        .await;
    let config = crate::support::tls::client_config(&h.ca.pem(), None, &[b"h2"]);
    let port = h.port;
    let channel = tonic::transport::Endpoint::from_static("http://grpcsvc")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let config = config.clone();
            async move {
                let tls = crate::support::tls::tls_connect(port, config, "web").await?;
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..3 {
        let reply = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(
            reply.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    assert!(grpc.count() >= 3);
}

/// Certificates mounted as Kubernetes mounts a secret: `tls.crt` → `..data/tls.crt`, `..data` →
/// a timestamped directory, rotated by swapping the `..data` symlink (a rename, which a watch on
/// the file itself never sees). The next handshake gets the new certificate, with no signal.
#[tokio::test]
async fn a_secret_volume_style_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let ca = TestCa::new("secret ca");
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("mount");
    std::fs::create_dir_all(&mount).unwrap();
    let publish = |generation: u32| {
        let data = mount.join(format!("..2026_12_03_{generation}"));
        ca.issue_sans("web", &["web", "127.0.0.1"], None, false)
            .write(&data, "tls");
        let tmp = mount.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(data.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, mount.join("..data")).unwrap();
    };
    publish(1);
    for name in ["tls.crt", "tls.key"] {
        symlink(format!("..data/{name}"), mount.join(name)).unwrap();
    }
    let port = free_port();
    let d = Daemon::start(&format!(
        "[[proxy.http]]\nlisten = \"127.0.0.1:{port}\"\n[proxy.http.tls]\ncert = {}\nkey = {}\n",
        toml_path(&mount.join("tls.crt")),
        toml_path(&mount.join("tls.key"))
    ))
    .await;
    let first = served_serial(port);
    assert!(first.starts_with("serial="), "{first}");
    publish(2);
    eventually(
        Duration::from_secs(5),
        "the swapped certificate served",
        || async {
            let s = served_serial(port);
            (s != first && s.starts_with("serial=")).then_some(())
        },
    )
    .await;
    assert_eq!(
        d.metric(r#"svcd_tls_reloads_total{result="ok"}"#).await,
        Some(1.0)
    );
}
