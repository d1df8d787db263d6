//! SNI passthrough: the ClientHello a TCP listener reads (without decrypting anything) to learn
//! which server the client names, and keeps to replay to the instance it picks.
//!
//! Bounded as a remote party's input must be: at most [`MAX_CLIENT_HELLO`] bytes within
//! [`CLIENT_HELLO_TIMEOUT`]; past either the connection is closed and counted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::warn;

use crate::log_budget::LogBudget;
use crate::metrics::{Failure, TlsMetrics};

/// The most of a ClientHello read before giving up (HAProxy's `tune.bufsize` default is 16 KiB
/// too; real ClientHellos are under 2 KiB, post-quantum key shares included).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// How long a client has to send its whole ClientHello.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The start of a TLS connection, read.
pub struct ClientHello {
    /// Every byte read: replayed to the instance before the rest is relayed.
    pub bytes: Vec<u8>,
    /// The SNI server name, lowercase (`None`: the client sent none).
    pub server_name: Option<String>,
}

/// A passthrough listener's reading of ClientHellos, with its failure accounting.
pub struct Passthrough {
    /// The listener's name in metrics and logs (`tcp/IP:PORT`).
    listener: String,
    metrics: TlsMetrics,
    log: LogBudget,
}

impl Passthrough {
    pub fn new(listener: impl Into<String>, metrics: &TlsMetrics) -> Passthrough {
        Passthrough {
            listener: listener.into(),
            metrics: metrics.clone(),
            log: LogBudget::default(),
        }
    }

    /// Reads the ClientHello off `stream`. `None`: not a parsable ClientHello within the
    /// bounds; counted, logged within budget, and the caller closes the connection.
    pub async fn read_client_hello(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Option<ClientHello> {
        let result = tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read(stream)).await;
        let failure = match result {
            Ok(Ok(hello)) => {
                self.metrics
                    .handshakes
                    .with_label_values(&[self.listener.as_str(), "passed_through", "none"])
                    .inc();
                return Some(hello);
            }
            Ok(Err(f)) => f,
            Err(_) => (Failure::Timeout, "no whole ClientHello in time".to_string()),
        };
        self.failed(failure.0, peer, &failure.1);
        None
    }

    /// A ClientHello that named no route, on a listener without a service of its own.
    pub fn no_match(&self, peer: SocketAddr, name: Option<&str>) {
        self.failed(
            Failure::NoSniMatch,
            peer,
            &format!("no [[proxy.tcp.sni]] entry for {name:?}"),
        );
    }

    fn failed(&self, reason: Failure, peer: SocketAddr, detail: &str) {
        self.metrics.handshake_failed(&self.listener, reason);
        if self.log.allow() {
            warn!(listener = %self.listener, %peer, reason = reason.label(), detail, "TLS passthrough refused a client");
        }
    }

    /// The listener's series go with it.
    pub fn forget(&self) {
        self.metrics.forget(&self.listener);
    }
}

async fn read(stream: &mut TcpStream) -> Result<ClientHello, (Failure, String)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| (Failure::Closed, e.to_string()))?;
        if n == 0 {
            return Err((Failure::Closed, "closed before its ClientHello".into()));
        }
        if bytes.len() + n > MAX_CLIENT_HELLO {
            return Err((
                Failure::Protocol,
                format!("ClientHello over {MAX_CLIENT_HELLO} bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor
                .read_tls(&mut fresh)
                .map_err(|e| (Failure::Protocol, e.to_string()))?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let server_name = accepted
                    .client_hello()
                    .server_name()
                    .map(|n| n.to_ascii_lowercase());
                return Ok(ClientHello { bytes, server_name });
            }
            Err((e, _)) => return Err((Failure::Protocol, format!("not a TLS ClientHello: {e}"))),
        }
    }
}
