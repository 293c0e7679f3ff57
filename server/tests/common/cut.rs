//! A TCP link between the store and its PostgreSQL server that a test can cut,
//! freeze and mend, for the tests of a database out of reach.
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
    io::{AsyncReadExt, AsyncWriteExt},
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
    /// Armed by [`Link::lose_answer_to_next_commit`].
    lose_commit_answer: Arc<AtomicBool>,
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
            lose_commit_answer: Arc::default(),
            carried: Arc::default(),
            acceptor: Mutex::new(None),
        };
        link.listen(listener);
        link
    }

    fn listen(&self, listener: TcpListener) {
        let (server, carried) = (self.server.clone(), self.carried.clone());
        let frozen = self.frozen.clone();
        let lose_commit_answer = self.lose_commit_answer.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let server = server.clone();
                let mut frozen = frozen.subscribe();
                let lose_commit_answer = lose_commit_answer.clone();
                let forward = tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(server).await else {
                        return;
                    };
                    if !*frozen.borrow_and_update() {
                        tokio::select! {
                            _ = carry(&mut client, &mut upstream, lose_commit_answer) => return,
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

    /// The next `COMMIT` a client sends (as a simple query, or the first time it
    /// prepares one) reaches the server, but its answer does not: the link
    /// closes that connection once the server has had time to commit, as when
    /// a connection is killed between the commit and its answer.
    pub fn lose_answer_to_next_commit(&self) {
        self.lose_commit_answer.store(true, Ordering::SeqCst);
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

/// Carries bytes both ways between `client` and `server` until either closes.
/// When `lose_commit_answer` is set, the first `COMMIT` the client has the
/// server run clears it and is sent on, and from then on the server's answers
/// are dropped and the connection is closed shortly after: a `COMMIT` sent as
/// a simple Query message, or prepared (a Parse message with its text) and
/// then executed (the Execute message that follows).
async fn carry(
    client: &mut TcpStream,
    server: &mut TcpStream,
    lose_commit_answer: Arc<AtomicBool>,
) {
    let (mut client_reads, mut client_writes) = client.split();
    let (mut server_reads, mut server_writes) = server.split();
    let answers_lost = Arc::new(AtomicBool::new(false));
    let to_server = {
        let answers_lost = answers_lost.clone();
        async move {
            let mut buf = vec![0; 64 * 1024];
            // A COMMIT prepared, not yet executed.
            let mut prepared = false;
            loop {
                let n = match client_reads.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut commits = false;
                for (kind, body) in messages(&buf[..n]) {
                    let is_commit = body.windows(7).any(|w| w == b"COMMIT\0");
                    match kind {
                        b'Q' if is_commit => commits = true,
                        b'P' if is_commit => prepared = true,
                        b'E' if prepared => commits = true,
                        _ => {}
                    }
                }
                if commits && lose_commit_answer.swap(false, Ordering::SeqCst) {
                    answers_lost.store(true, Ordering::SeqCst);
                    let _ = server_writes.write_all(&buf[..n]).await;
                    // Long enough for the server to commit.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    return;
                }
                prepared &= !commits;
                if server_writes.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match server_reads.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if answers_lost.load(Ordering::SeqCst) {
                continue;
            }
            if client_writes.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either way ending ends both: the caller drops the streams, closing them.
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
    }
}

/// The whole frontend messages at the start of `bytes` (type byte, then a
/// 4-byte big-endian length that counts itself): each message's type and body.
/// The start-up messages have no type byte and read as nothing useful here.
fn messages(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut found = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len < 4 || bytes.len() < 1 + len {
            break;
        }
        found.push((bytes[0], &bytes[5..1 + len]));
        bytes = &bytes[1 + len..];
    }
    found
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}
