//! The HTTP server loop: accepts TCP connections and serves the router on each,
//! with the limits a server open to many clients needs and `axum::serve` does not
//! set.
//!
//! - A connection with no request in flight for
//!   [`ServeOptions::header_read_timeout`] is closed: one that connects and sends nothing, one that trickles a request head
//!   a byte at a time, one kept alive after its last answer. Enough such clients
//!   would otherwise exhaust the process's file descriptors and lock everyone out
//!   of the gateway and the panel. A request is in flight from its head until
//!   hyper has taken the last byte of its answer, so a long non-streamed
//!   completion or a quiet stream is never cut. Closing is graceful: what hyper
//!   has taken but not yet written (a large answer to a client that reads it
//!   slowly) is still written, as long as the client keeps taking some of it
//!   within [`ServeOptions::response_write_timeout`].
//! - A request body must arrive within [`ServeOptions::request_body_timeout`]
//!   of its head: the gateway answers 408 then, and on any route (the panel's
//!   server functions too) a connection still receiving a body [`BODY_GRACE`]
//!   later is closed.
//! - A client that takes none of an answer for
//!   [`ServeOptions::response_write_timeout`] (it stopped reading, and the
//!   server's buffers for it are full) is disconnected: otherwise it would hold
//!   its connection and its request forever. An answer that is only waiting for
//!   its next piece (a quiet stream) is not the client's doing and is never cut.
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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
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
    /// The longest a request body may take to arrive, counted from its head
    /// (config `request_body_timeout_secs`): the gateway answers 408 then; on any
    /// route, a connection whose body is still arriving [`BODY_GRACE`] later is
    /// closed.
    pub request_body_timeout: Duration,
    /// The longest a client may go without taking any of an answer it is sent
    /// (config `response_write_timeout_secs`): the connection is closed then.
    pub response_write_timeout: Duration,
}

/// How long after `request_body_timeout` a connection still receiving a body is
/// closed: time for the gateway's own 408 to go out first.
pub const BODY_GRACE: Duration = Duration::from_secs(1);

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
            stream,
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
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    router: Router,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Metered {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        tower::service_fn(move |request: axum::http::Request<Incoming>| {
            let in_flight = activity.start();
            let mut request = request.map(|body| {
                if body.is_end_stream() {
                    Body::new(body)
                } else {
                    Guarded::body(body, activity.body_started())
                }
            });
            request.extensions_mut().insert(ConnectInfo(client));
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                let answer = Answering {
                    in_flight,
                    waiting: None,
                };
                Ok::<_, Infallible>(response.map(|body| Guarded::body(body, answer)))
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    // Since when the connection has been closing: hyper writes out what it has.
    let mut closing: Option<Instant> = None;
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
            expired = activity.expired(options), if closing.is_none() => match expired {
                // Nothing in flight: hyper writes out what it has taken of the
                // last answer, if anything, then closes.
                Expired::Idle => {
                    if !stopping {
                        connection.as_mut().graceful_shutdown();
                    }
                    closing = Some(Instant::now());
                }
                // A body still arriving past its deadline (its request has failed
                // already), or an answer the client has stopped taking.
                Expired::Stuck => {
                    tracing::debug!(%client, "closing a connection sending or reading too slowly");
                    return;
                }
            },
            // Closing, and the client has taken nothing of what is left for the
            // write timeout.
            () = activity.stalled(closing.unwrap_or_else(Instant::now), options), if closing.is_some() => {
                tracing::debug!(%client, "closing a connection idle or reading too slowly");
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

/// A connection's requests in flight, since when it has had none, when the
/// request bodies still arriving began, and since when answers have waited for
/// the client to take a piece.
#[derive(Debug)]
struct Activity {
    state: Mutex<State>,
    /// When the connection opened; [`Activity::last_write`] counts from it.
    opened: Instant,
    /// Nanoseconds after `opened` at which a write to the socket last took
    /// some bytes.
    last_write: AtomicU64,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// When the last request ended, or the connection opened.
    idle_since: Instant,
    /// Bodies still arriving: (number, when its head arrived).
    arriving: Vec<(u64, Instant)>,
    /// Answers whose last piece the client has yet to take: (number, since when).
    waiting: Vec<(u64, Instant)>,
    next_body: u64,
}

/// Why a connection's time is up ([`Activity::expired`]).
enum Expired {
    /// No request in flight for the header read timeout.
    Idle,
    /// A body arriving, or an answer waiting for the client, past its deadline.
    Stuck,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
                arriving: Vec::new(),
                waiting: Vec::new(),
                next_body: 0,
            }),
            opened: Instant::now(),
            last_write: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request begins; it is in flight until the guard is dropped.
    fn start(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        InFlight(self.clone())
    }

    /// A request body begins to arrive; it has until the guard is dropped.
    fn body_started(self: &Arc<Self>) -> BodyArriving {
        let mut state = self.lock();
        let number = Self::number(&mut state);
        state.arriving.push((number, Instant::now()));
        BodyArriving(self.clone(), number)
    }

    /// A number for a body, unique on this connection.
    fn number(state: &mut State) -> u64 {
        let number = state.next_body;
        state.next_body += 1;
        number
    }

    /// Resolves once no request has been in flight for the header read timeout,
    /// a body has been arriving for longer than its timeout and [`BODY_GRACE`],
    /// or an answer has waited for the client longer than the write timeout
    /// (each seen within twice its length: state is looked at, not watched).
    async fn expired(&self, options: ServeOptions) -> Expired {
        loop {
            let now = Instant::now();
            let deadline = {
                let state = self.lock();
                let idle =
                    (state.in_flight == 0).then(|| state.idle_since + options.header_read_timeout);
                let body = state
                    .arriving
                    .iter()
                    .map(|(_, since)| *since + options.request_body_timeout + BODY_GRACE)
                    .min();
                let answer = state
                    .waiting
                    .iter()
                    .map(|(_, since)| *since + options.response_write_timeout)
                    .min();
                let idle = idle.map(|at| (at, Expired::Idle));
                let stuck = body.into_iter().chain(answer).min();
                idle.into_iter()
                    .chain(stuck.map(|at| (at, Expired::Stuck)))
                    .min_by_key(|(at, _)| *at)
            };
            // What a request or a frame starts after this look is seen at the
            // next, so each limit is enforced within twice its length.
            let recheck = options
                .header_read_timeout
                .min(options.request_body_timeout + BODY_GRACE)
                .min(options.response_write_timeout);
            match deadline {
                Some((deadline, why)) if now >= deadline => return why,
                Some((deadline, _)) => tokio::time::sleep_until(deadline.min(now + recheck)).await,
                None => tokio::time::sleep(recheck).await,
            }
        }
    }

    /// Resolves once no write to the socket has taken a byte for the write
    /// timeout, counted from `since` at the earliest.
    async fn stalled(&self, since: Instant, options: ServeOptions) {
        loop {
            let nanos = self.last_write.load(Ordering::Relaxed);
            let last_write = self.opened + Duration::from_nanos(nanos);
            let deadline = last_write.max(since) + options.response_write_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// A write took some bytes. Called on every write of the socket, so it
    /// takes no lock.
    fn wrote(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_write.store(nanos, Ordering::Relaxed);
    }
}

/// A connection's socket, telling its [`Activity`] when a write takes bytes.
struct Metered {
    stream: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl Metered {
    fn note(&self, written: &Poll<std::io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.wrote();
        }
    }
}

impl tokio::io::AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One request in flight on its connection (see [`Activity`]).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.idle_since = Instant::now();
    }
}

/// An answer being sent: its request stays in flight, and each piece handed to
/// hyper waits for the client until hyper asks for the next one (which it does
/// as soon as it has room, so only a client that stopped reading keeps it
/// waiting).
struct Answering {
    in_flight: InFlight,
    waiting: Option<u64>,
}

impl Answering {
    fn taken(&mut self) {
        if let Some(number) = self.waiting.take() {
            self.in_flight
                .0
                .lock()
                .waiting
                .retain(|(waiting, _)| *waiting != number);
        }
    }
}

impl Watch for Answering {
    fn polled(&mut self) {
        self.taken();
    }

    fn handed(&mut self) {
        let mut state = self.in_flight.0.lock();
        let number = Activity::number(&mut state);
        state.waiting.push((number, Instant::now()));
        self.waiting = Some(number);
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        // `in_flight` ends the request after this, as fields drop last.
        self.taken();
    }
}

/// What a [`Guarded`] body tells its connection as hyper polls it.
trait Watch {
    /// Hyper asks for the next piece: it has taken the ones before.
    fn polled(&mut self) {}
    /// A piece was handed to hyper.
    fn handed(&mut self) {}
}

impl Watch for BodyArriving {}

/// One request body still arriving (see [`Activity`]).
#[derive(Debug)]
struct BodyArriving(Arc<Activity>, u64);

impl Drop for BodyArriving {
    fn drop(&mut self) {
        self.0
            .lock()
            .arriving
            .retain(|(number, _)| *number != self.1);
    }
}

/// A body holding `guard` until its last frame, an error, or its drop, and
/// telling it when it is polled and hands out a frame ([`Watch`]): a request body
/// counts as arriving ([`BodyArriving`]), a response keeps its request in flight
/// and says whether the client takes it ([`Answering`]).
struct Guarded<B, G> {
    body: B,
    guard: Option<G>,
}

impl<B, G> Guarded<B, G> {
    fn body(body: B, guard: G) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<axum::BoxError>,
        G: Watch + Send + Unpin + 'static,
    {
        Body::new(Guarded {
            body,
            guard: Some(guard),
        })
    }
}

impl<B, G> HttpBody for Guarded<B, G>
where
    B: HttpBody<Data = Bytes> + Unpin,
    G: Watch + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(guard) = &mut self.guard {
            guard.polled();
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.body.is_end_stream() {
            self.guard = None;
        } else if let (Poll::Ready(Some(Ok(_))), Some(guard)) = (&polled, &mut self.guard) {
            guard.handed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
