//! Certificates made by the test (rcgen): a CA, server certificates for 127.0.0.1, client
//! certificates (valid or expired), written as PEM files where etcd and svcd read them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `127.0.0.1` and `localhost` (servers), or for `name` (clients; etcd
    /// takes the common name as the user).
    pub fn issue(&self, name: &str, expired: bool) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// `ca.pem`, `cert.pem`, `key.pem` in `dir` (overwritten: a rotation).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn write(dir: &Path, ca: &TestCa, issued: &Issued) -> TlsFiles {
        std::fs::create_dir_all(dir).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, &issued.cert).unwrap();
        std::fs::write(&files.key, &issued.key).unwrap();
        files
    }

    /// The `[registry.etcd.tls]` table naming these files.
    pub fn svcd_config(&self) -> String {
        format!(
            "[registry.etcd.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.ca, self.cert, self.key
        )
    }
}

impl TestCa {
    /// A certificate for the DNS names `dns` (IP addresses among them become IP SANs) and, when
    /// given, the URI SAN `uri` (a SPIFFE ID), valid for 90 days or already expired.
    pub fn issue_sans(&self, cn: &str, dns: &[&str], uri: Option<&str>, expired: bool) -> Issued {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

impl Issued {
    /// Writes `name.crt` and `name.key` in `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert).unwrap();
        std::fs::write(&key, &self.key).unwrap();
        (cert, key)
    }
}

/// A TLS instance: terminates TLS with `issued` (ALPN http/1.1) and answers every request on a
/// connection with `200` and its `name`, keeping the connection open as real servers do (a
/// client's `connection: close` closes it). It counts its handshakes and records the server name
/// (SNI) each client sent. Runs until the test's runtime ends.
pub struct TlsBackend {
    pub addr: std::net::SocketAddr,
    handshakes: Arc<AtomicUsize>,
    server_names: Arc<Mutex<Vec<Option<String>>>>,
}

impl TlsBackend {
    pub async fn start(name: &'static str, issued: &Issued) -> TlsBackend {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(issued.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = TlsBackend {
            addr: listener.local_addr().unwrap(),
            handshakes: Arc::default(),
            server_names: Arc::default(),
        };
        let (handshakes, server_names) = (backend.handshakes.clone(), backend.server_names.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (handshakes, server_names) = (handshakes.clone(), server_names.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    server_names.lock().unwrap().push(sni);
                    serve_requests(tls, name).await;
                });
            }
        });
        backend
    }

    /// TLS handshakes completed so far (one per connection).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// The server name each connection's ClientHello carried, in order.
    pub fn server_names(&self) -> Vec<Option<String>> {
        self.server_names.lock().unwrap().clone()
    }
}

/// Answers each request head on `stream` (a request body is skipped by its content-length)
/// with `200` and `name`, until the client closes or asks to.
async fn serve_requests<S>(mut stream: S, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let body: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + body {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + body);
        let close = head.lines().any(|l| l == "connection: close");
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{name}",
            name.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if stream.write_all(reply.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A [`TlsBackend`]'s address, for tests that need no more of it.
pub async fn tls_backend(name: &'static str, issued: &Issued) -> std::net::SocketAddr {
    TlsBackend::start(name, issued).await.addr
}

/// A client config trusting `ca_pem`, offering `alpn`, presenting `client` if given.
pub fn client_config(
    ca_pem: &str,
    client: Option<&Issued>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some(issued) => {
            let chain = CertificateDer::pem_slice_iter(issued.cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `127.0.0.1:port` with `config`, SNI `server_name`.
pub async fn tls_connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// `p` as a TOML string.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}
