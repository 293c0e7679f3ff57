//! A TCP link between the store and its PostgreSQL server that a test can cut,
//! freeze and mend, for the tests of a database out of reach.
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

/// Forwards every connection made to [`Link::addr`] to the server. Cut, it
/// closes the connections it carried and stops listening, so that new ones are
/// refused, as when the server is down. Frozen, it keeps every connection open
/// and accepts new ones but carries nothing either way, as a network that drops
/// packets without a word.
pub struct Link {
    /// Where the store connects instead of the server.
    pub addr: SocketAddr,
    server: String,
    frozen: watch::Sender<bool>,
    carried: Arc<Mutex<Vec<AbortHandle>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// A link to the server of `url` (a `postgres://` URL) on a free loopback
    /// port.
    pub async fn to_server_of(url: &str) -> Link {
        let url = url::Url::parse(url).unwrap();
        Link::start(format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port().unwrap_or(5432)
        ))
        .await
    }

    /// A link to `server` (`host:port`) on a free loopback port.
    pub async fn start(server: String) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = Link {
            addr: listener.local_addr().unwrap(),
            server,
            frozen: watch::Sender::new(false),
            carried: Arc::default(),
            acceptor: Mutex::new(None),
        };
        link.listen(listener);
        link
    }

    fn listen(&self, listener: TcpListener) {
        let (server, carried) = (self.server.clone(), self.carried.clone());
        let frozen = self.frozen.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let server = server.clone();
                let mut frozen = frozen.subscribe();
                let forward = tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(server).await else {
                        return;
                    };
                    if !*frozen.borrow_and_update() {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => return,
                            _ = frozen.wait_for(|frozen| *frozen) => {}
                        }
                    }
                    // Frozen: both ends stay open, and nothing goes through.
                    std::future::pending::<()>().await;
                });
                carried
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(forward.abort_handle());
            }
        });
        *self.acceptor.lock().unwrap_or_else(PoisonError::into_inner) = Some(acceptor);
    }

    /// `url` (a `postgres://` URL) sent through the link.
    pub fn url_through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }

    /// Carries nothing more, on the connections it has and on new ones, and
    /// closes none.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Closes every connection carried so far and refuses new ones.
    pub fn cut(&self) {
        if let Some(acceptor) = self
            .acceptor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            acceptor.abort();
        }
        for forward in self
            .carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            forward.abort();
        }
    }

    /// After [`Link::cut`]: listens again on the same address and carries new
    /// connections (a frozen link is cut first).
    pub async fn mend(&self) {
        self.cut();
        self.frozen.send_replace(false);
        // The aborted acceptor lets its listener go once it has stopped.
        for _ in 0..500 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                return self.listen(listener);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("could not listen on {} again", self.addr);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}
