//! A TCP link between the store and its PostgreSQL server that a test can cut
//! and mend, for the tests of a database out of reach.
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

/// Forwards every connection made to [`Link::addr`] to the server; while cut,
/// the connections it carried are closed and new ones are closed on arrival.
pub struct Link {
    /// Where the store connects instead of the server.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<AbortHandle>>>,
    acceptor: JoinHandle<()>,
}

impl Link {
    /// A link to `server` (`host:port`) on a free loopback port.
    pub async fn start(server: String) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let carried = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let acceptor = {
            let (cut, carried) = (cut.clone(), carried.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let server = server.clone();
                    let forward = tokio::spawn(async move {
                        if let Ok(mut upstream) = TcpStream::connect(server).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    });
                    carried
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(forward.abort_handle());
                }
            })
        };
        Link {
            addr,
            cut,
            carried,
            acceptor,
        }
    }

    /// `url` (a `postgres://` URL) sent through the link.
    pub fn url_through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }

    /// Closes every connection carried so far and every new one, as when the
    /// server goes down.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for forward in self
            .carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            forward.abort();
        }
    }

    /// Carries new connections again.
    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}
