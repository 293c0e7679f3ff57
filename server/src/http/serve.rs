//! The HTTP server loop: accepts TCP connections and serves the router on each,
//! with the limits a server open to many clients needs and `axum::serve` does not
//! set.
//!
//! - A connection with no request in flight for
//!   [`ServeOptions::header_read_timeout`] is closed: one that connects and sends nothing, one that trickles a request head
//!   a byte at a time, one kept alive after its last answer. Enough such clients
//!   would otherwise exhaust the process's file descriptors and lock everyone out
//!   of the gateway and the panel. A request is in flight from its head until the
//!   last byte of its answer, so a long non-streamed completion or a quiet stream
//!   is never cut. Bodies have their own deadline (the gateway's
//!   `request_body_timeout_secs`).
//! - Sockets are `TCP_NODELAY`: an answer, or a piece of a stream, leaves as soon
//!   as it is written instead of waiting for the previous one's acknowledgement.
//! - Handlers see the client's address (`ConnectInfo<SocketAddr>`), which the
//!   sign-in rate limit keys on.
//! - On `shutdown` the server stops accepting, lets the requests in flight finish
//!   (idle connections close at once) and returns when the last one has.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::ConnectInfo,
    Router,
};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

/// How the server treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The longest a connection may stay without a request in flight before it
    /// is closed: the time a client has to send a whole request head after it
    /// connects or after its previous answer (config `header_read_timeout_secs`).
    pub header_read_timeout: Duration,
}

/// How long to wait before accepting again after `accept` failed for want of
/// resources (file descriptors, memory): the failure would repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the
/// requests in flight to finish.
///
/// Errors: none once listening; a failed `accept` is logged and retried, and a
/// failed connection (a client that went away, a timeout) ends that connection
/// only.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own head timeout, once the first byte of a head has arrived.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        tracing::error!(error = %e, "could not accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        connections.spawn(serve_connection(
            builder.clone(),
            TokioIo::new(stream),
            client,
            router.clone(),
            options,
            stop.clone(),
        ));
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one connection until the client closes it, it stays idle too long, or
/// the server stops (then its requests in flight finish first).
async fn serve_connection(
    builder: auto::Builder<TokioExecutor>,
    io: TokioIo<tokio::net::TcpStream>,
    client: SocketAddr,
    router: Router,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        tower::service_fn(move |request: axum::http::Request<Incoming>| {
            let in_flight = activity.start();
            let router = router.clone();
            async move {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(client));
                let response = router.oneshot(request).await?;
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%client, error = %e, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                connection.as_mut().graceful_shutdown();
                stopping = true;
            }
            // Nothing in flight: nothing is lost by closing it.
            () = activity.idle_for(options.header_read_timeout) => {
                tracing::debug!(%client, "closing a connection idle too long");
                return;
            }
        }
    }
}

/// Errors of one connection that `accept` reports (the client gave up before it
/// was accepted): nothing to wait for.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A connection's requests in flight, and since when it has had none.
#[derive(Debug)]
struct Activity {
    /// (requests in flight, when the last one ended or the connection opened)
    state: Mutex<(usize, Instant)>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request begins; it is in flight until the guard is dropped.
    fn start(self: &Arc<Self>) -> InFlight {
        self.lock().0 += 1;
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let (in_flight, idle_since) = *self.lock();
            let wake = if in_flight == 0 {
                let deadline = idle_since + timeout;
                if Instant::now() >= deadline {
                    return;
                }
                deadline
            } else {
                Instant::now() + timeout
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// One request in flight on its connection (see [`Activity`]).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
