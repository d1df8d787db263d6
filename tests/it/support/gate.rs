//! A TCP forwarder the test can cut or point elsewhere: a network partition between svcd and
//! etcd, or etcd replaced behind the same address, on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Gate {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// Cancelling it drops every forwarded connection; replaced on each cut.
    epoch: Arc<Mutex<CancellationToken>>,
    /// Where new connections go; `redirect` changes it.
    upstream: Arc<Mutex<SocketAddr>>,
    stop: CancellationToken,
}

impl Gate {
    pub async fn start(upstream: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let epoch = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let upstream = Arc::new(Mutex::new(upstream));
        let (open2, epoch2, stop2) = (open.clone(), epoch.clone(), stop.clone());
        let upstream2 = upstream.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                if !open2.load(Ordering::SeqCst) {
                    drop(client); // refused while cut
                    continue;
                }
                let token = epoch2.lock().unwrap().clone();
                let upstream = *upstream2.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Gate {
            addr,
            open,
            epoch,
            upstream,
            stop,
        }
    }

    /// Drops every connection; new ones go to `upstream`.
    pub fn redirect(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
        self.cut();
        self.restore();
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut epoch = self.epoch.lock().unwrap();
        epoch.cancel();
        *epoch = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.cancel();
        self.epoch.lock().unwrap().cancel();
    }
}
