//! A request body left unread is read to its end in the background, so that its
//! connection can carry the client's next request.
//!
//! Some answers come before the body is read, on purpose: a caller without a
//! valid key gets 401 at once, whatever its body (`gateway::chat`), and a path or
//! method the router refuses is answered without a look at it. HTTP/1.1 sends a
//! connection's next request after the body of this one, so hyper closes a
//! connection whose request body was dropped half-read; a client that reuses
//! the connection (Python's `http.client`, say) then meets a broken pipe or a
//! reset instead of its next answer. Here the body a handler drops before its
//! end goes on being read and thrown away once the answer is ready, at most
//! [`Limits`]' bytes and time; past those it is dropped and the connection
//! closed, as before ([`drain_unread`]).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{header, HeaderValue},
    middleware::Next,
    response::Response,
};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

/// How much of an unread body is read and thrown away, and for how long: the
/// gateway's own limits for a body it reads (`max_request_bytes`,
/// `request_body_timeout_secs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Bytes, counted from the start of the body.
    bytes: usize,
    /// From the moment the body is dropped.
    time: Duration,
}

impl Limits {
    /// The limits of `config`.
    pub(crate) fn of(config: &crate::config::Config) -> Limits {
        Limits {
            bytes: config.max_request_bytes,
            time: config.request_body_timeout,
        }
    }
}

/// Middleware: gives the handler a body that, dropped before its end, comes
/// back here ([`Unread`]). Once the answer is ready, what is left of it is read
/// and thrown away in the background, within [`Limits`], unless the answer
/// closes the connection anyway (`Connection: close`: a body too large, or too
/// slow, for the gateway). A body that says it is larger than the bytes left to
/// read (`Content-Length`) is not read, nor is the body of a request that
/// expects `100 Continue` (its client may never send it): the answer gets
/// `Connection: close`, so the client knows not to send another request on
/// it.
pub(crate) async fn drain_unread(
    State(limits): State<Limits>,
    request: Request,
    next: Next,
) -> Response {
    // A request without a body (a page, `/v1/models`) leaves nothing to drain.
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    // A client that waits for `100 Continue` may send its next request
    // instead of the body once it has a final answer (RFC 9110 §10.1.1).
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let left = Left::default();
    let request = request.map(|body| Body::new(Unread::new(body, left.clone())));
    let mut response = next.run(request).await;
    let unread = left.lock().unwrap_or_else(PoisonError::into_inner).take();
    let Some((body, read)) = unread else {
        return response;
    };
    let closing = response
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
    if closing {
        return response;
    }
    let room = limits.bytes.saturating_sub(read);
    if expects_continue || body.size_hint().lower() > u64::try_from(room).unwrap_or(u64::MAX) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    tokio::spawn(async move {
        // Dropped at the end of either: the connection closes, as it would
        // have without this.
        let _ = tokio::time::timeout(limits.time, discard(body, room)).await;
    });
    response
}

/// Where an [`Unread`] dropped before its end leaves its body, with the data
/// bytes read of it.
type Left = Arc<Mutex<Option<(Body, usize)>>>;

/// A request body that counts the bytes read of it, and leaves what is left of
/// it in [`Left`] when dropped before its end.
struct Unread {
    /// `None` once read to its end.
    body: Option<Body>,
    /// Data bytes read so far.
    read: usize,
    left: Left,
}

impl Unread {
    fn new(body: Body, left: Left) -> Unread {
        Unread {
            body: Some(body),
            read: 0,
            left,
        }
    }
}

impl http_body::Body for Unread {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
        match &frame {
            // Read to its end: nothing is left to drain.
            None => self.body = None,
            Some(frame) => {
                if let Some(data) = frame.as_ref().ok().and_then(Frame::data_ref) {
                    self.read = self.read.saturating_add(data.len());
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if let Some(body) = self.body.take().filter(|body| !body.is_end_stream()) {
            *self.left.lock().unwrap_or_else(PoisonError::into_inner) = Some((body, self.read));
        }
    }
}

/// Reads `body` to its end, throwing it away; stops past `room` bytes or at the
/// first error.
async fn discard(mut body: Body, room: usize) {
    let mut left = room;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            match left.checked_sub(data.len()) {
                Some(rest) => left = rest,
                None => return,
            }
        }
    }
}
