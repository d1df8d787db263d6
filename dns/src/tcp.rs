//! DNS over TCP with connection limits: in total, per client address, and an idle timeout.
//! hickory's `Server` has none of these (one client could hold every socket), so the accept
//! loop is ours; each query still goes through hickory's request parsing and the same
//! responder as UDP. Messages are length-prefixed (RFC 1035 §4.2.2) and answered in order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use svcd_lifecycle::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::handler::DnsResponder;

/// Open connections per client address, and in total. A mutex: taken twice per connection (open
/// and close), never per query.
#[derive(Default)]
struct OpenConnections {
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its slot is given back when dropped.
struct Admission {
    open: Arc<OpenConnections>,
    client: IpAddr,
    responder: Arc<DnsResponder>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut by_client = self
            .open
            .by_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
        self.responder.metrics.tcp_open.dec();
    }
}

/// Which limit refused a connection.
enum Refused {
    Total,
    PerClient,
}

impl OpenConnections {
    fn admit(
        self: &Arc<Self>,
        client: IpAddr,
        responder: &Arc<DnsResponder>,
    ) -> Result<Admission, Refused> {
        let limits = responder.tcp_limits.load();
        let mut by_client = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if responder.metrics.tcp_open.get() >= limits.max_connections as i64 {
            return Err(Refused::Total);
        }
        let n = by_client.entry(client).or_insert(0);
        if *n >= limits.max_per_client {
            return Err(Refused::PerClient);
        }
        *n += 1;
        responder.metrics.tcp_open.inc();
        Ok(Admission {
            open: self.clone(),
            client,
            responder: responder.clone(),
        })
    }
}

/// Serves DNS over TCP on `listener` until `stop`; connections are tasks of `phase` and end
/// after their current query once `stop` fires.
pub async fn serve(
    listener: TcpListener,
    responder: Arc<DnsResponder>,
    stop: CancellationToken,
    phase: Phase,
) {
    let open = Arc::new(OpenConnections::default());
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let admission = match open.admit(peer.ip(), &responder) {
            Ok(a) => a,
            Err(limit) => {
                match limit {
                    Refused::Total => responder.metrics.tcp_refused_total.inc(),
                    Refused::PerClient => responder.metrics.tcp_refused_client.inc(),
                }
                debug!(%peer, "DNS TCP connection over the limit; closed");
                continue; // dropping the stream closes it
            }
        };
        let (responder, stop) = (responder.clone(), stop.clone());
        phase.spawn(async move {
            let _admission = admission;
            serve_connection(stream, peer, &responder, &stop).await;
        });
    }
}

/// Largest DNS message: the length prefix is 16 bits.
const MAX_MESSAGE: usize = u16::MAX as usize;

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    responder: &DnsResponder,
    stop: &CancellationToken,
) {
    let mut message = Vec::with_capacity(512);
    loop {
        let idle = responder.tcp_limits.load().idle_timeout;
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(idle, read_message(&mut stream, &mut message)) => r,
        };
        match read {
            Err(_) => {
                responder.metrics.tcp_idle_closed.inc();
                debug!(%peer, "DNS TCP connection idle; closed");
                return;
            }
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "DNS TCP connection ended");
                return;
            }
            Ok(Ok(())) => {}
        }
        let Some(answer) = responder
            .answer(std::mem::take(&mut message), peer, Protocol::Tcp)
            .await
        else {
            continue;
        };
        let len = (answer.len().min(MAX_MESSAGE) as u16).to_be_bytes();
        let written = async {
            stream.write_all(&len).await?;
            stream.write_all(&answer).await
        };
        if let Err(e) = written.await {
            debug!(%peer, error = %e, "DNS TCP write failed");
            return;
        }
    }
}

/// Reads one length-prefixed message into `into` (cleared first). A clean close before the
/// prefix is `UnexpectedEof` too: either way the connection is over.
async fn read_message(stream: &mut TcpStream, into: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    into.clear();
    into.resize(len, 0);
    stream.read_exact(into).await?;
    Ok(())
}
