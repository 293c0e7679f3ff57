//! `POST /v1/chat/completions` (DESIGN.md §4): size check, key, validation, model,
//! estimate, admission (R6), forwarding, and settlement before the last byte (R7).
//!
//! The upstream exchange runs in its own task that owns the [`Hold`]: a client
//! that goes away, streamed or not, does not stop it, so every admitted request is
//! settled on the usage its upstream reports, exactly once.

use std::{convert::Infallible, sync::Arc, time::Duration};

use app::domain::ModelId;
use app::store::{ReserveOutcome, Spender};
use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::error::GatewayError;
use super::hold::{lease_until_from_now, Hold};
use super::json::RawObject;
use super::request::ChatRequest;
use super::sse::{self, Relay, Relayed, DONE_FRAME};
use super::upstream::{
    is_event_stream, read_whole, usage_from_upstream, BodyError, Target, MAX_ANSWER_BYTES,
};
use super::{read_body, Gateway, SERVED_MODEL_HEADER};

const ENDPOINT: &str = "chat_completions";
/// What a client is told of an answer that quoted the upstream's key.
const QUOTED_KEY: &str =
    "The model provider's answer quoted the gateway's credentials, so it was not passed on.";
/// Frames buffered between the upstream reader and a slow client.
const STREAM_BUFFER: usize = 32;
/// How long a stream whose whole answer and usage have come
/// (`Relay::answer_is_whole`) is waited on for its `[DONE]` before it is ended
/// as if it had come.
const AFTER_FINAL_USAGE: Duration = Duration::from_secs(2);

/// Answer a chat completion through the served model's upstream.
pub async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut model_label = String::new();
    match handle(&gateway, &headers, body, started, &mut model_label).await {
        Ok(response) => {
            gateway.metrics.request(ENDPOINT, &model_label, "ok");
            response
        }
        Err(error) => {
            gateway
                .metrics
                .request(ENDPOINT, &model_label, error.code());
            error.into_response()
        }
    }
}

async fn handle(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    model_label: &mut String,
) -> Result<Response, GatewayError> {
    // The key first: a caller without one gets 401 before any of its body is read.
    let caller = super::caller::authenticate_to_spend(gateway, headers).await?;
    let bytes = read_body(gateway, headers, body).await?;
    let request = ChatRequest::parse(&bytes)?;
    let catalog = gateway.catalog.clone();
    let model = catalog
        .resolve(&request.model)
        .ok_or_else(|| GatewayError::model_not_found(&request.model))?;
    model_label.push_str(model.id.as_str());
    super::json::within_max_output(model, request.output_cap())?;
    // From admission on, the work runs in its own task: a client that goes away
    // while its reservation is being written must not leave the hold without an
    // owner (it would only be released by its lease).
    let (reply, answer) = oneshot::channel();
    gateway.exchanges.spawn(admit_and_exchange(
        gateway.clone(),
        model.id.clone(),
        request,
        caller.spender(),
        started,
        reply,
    ));
    answer.await.unwrap_or_else(|_| {
        Err(GatewayError::Internal(
            "the upstream exchange ended without an answer".into(),
        ))
    })
}

/// Admission, then the exchange; every answer goes to `reply`.
async fn admit_and_exchange(
    gateway: Arc<Gateway>,
    model: ModelId,
    request: ChatRequest,
    spender: Spender,
    started: Instant,
    reply: Reply,
) {
    let catalog = gateway.catalog.clone();
    let Some(model) = catalog.get(&model) else {
        let _ = reply.send(Err(GatewayError::Internal(format!(
            "model {model} left the catalog"
        ))));
        return;
    };
    let reservation = match gateway
        .reserve(
            model,
            request.estimate,
            spender,
            lease_until_from_now(),
            super::Taker::Exchange,
        )
        .await
    {
        Ok(reservation) => reservation,
        Err(error) => {
            let _ = reply.send(Err(error));
            return;
        }
    };
    let hold = Hold::new(gateway.clone(), reservation);
    let prepared = catalog
        .get(&hold.reservation().served)
        .ok_or_else(|| {
            GatewayError::Internal("admission served a model outside the catalog".into())
        })
        .and_then(|served| {
            let target = gateway
                .upstreams
                .get(&served.upstream)
                .cloned()
                .ok_or_else(|| {
                    GatewayError::Internal(format!(
                        "model {} names no configured upstream",
                        served.id
                    ))
                })?;
            Ok((served, target))
        });
    let (served, target) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            hold.release().await;
            let _ = reply.send(Err(error));
            return;
        }
    };
    let exchange = Exchange {
        gateway: gateway.clone(),
        target,
        served: served.id.to_string(),
        stream: request.stream,
        client_wants_usage: request.client_wants_usage,
        choices: request.estimate.n,
        started,
    };
    match request.into_upstream_body(&served.upstream_model) {
        Ok(body) => exchange.run(hold, body, reply).await,
        Err(error) => {
            hold.release().await;
            let _ = reply.send(Err(error));
        }
    }
}

impl Gateway {
    /// Admission (R6) for `model`, holding the reservation until `lease_until`
    /// under the owner id of `taker`; counts the decision.
    ///
    /// Errors: [`GatewayError::Blocked`] (429) when refused,
    /// [`GatewayError::InvalidApiKey`] (401) when the spender's key was revoked since
    /// it authenticated, [`GatewayError::Internal`] when the store fails.
    pub(crate) async fn reserve(
        &self,
        model: &app::domain::Model,
        estimate: app::domain::TokenEstimate,
        spender: app::store::Spender,
        lease_until: chrono::DateTime<chrono::Utc>,
        taker: super::Taker,
    ) -> Result<app::store::Reservation, GatewayError> {
        let outcome = match self
            .store
            .reserve(app::store::ReserveRequest {
                catalog: self.catalog.clone(),
                model: model.id.clone(),
                estimate,
                spender,
                owner: self.owner_for(taker).to_owned(),
                lease_until,
                now: chrono::Utc::now(),
            })
            .await
        {
            Ok(outcome) => outcome,
            Err(app::store::StoreError::NotFound { what: "api key" }) => {
                // Revoked since it authenticated.
                if let Some(key) = spender.api_key_id {
                    self.callers.forget(key);
                }
                return Err(GatewayError::InvalidApiKey);
            }
            Err(e) => return Err(e.into()),
        };
        match outcome {
            ReserveOutcome::Admitted(reservation) => {
                let outcome = if reservation.served == reservation.requested {
                    "admitted"
                } else {
                    "fallback"
                };
                self.metrics.admission(
                    reservation.requested.as_str(),
                    reservation.served.as_str(),
                    outcome,
                );
                Ok(reservation)
            }
            ReserveOutcome::Blocked(blocked) => {
                self.metrics
                    .admission(model.id.as_str(), "", blocked.code.as_str());
                Err(GatewayError::Blocked(blocked))
            }
        }
    }
}

/// One admitted request's trip upstream and back.
struct Exchange {
    gateway: Arc<Gateway>,
    target: Target,
    served: String,
    stream: bool,
    client_wants_usage: bool,
    /// The request's `n`: how many choices a stream's answer has.
    choices: u32,
    started: Instant,
}

type Reply = oneshot::Sender<Result<Response, GatewayError>>;

impl Exchange {
    async fn run(self, hold: Hold, body: Vec<u8>, reply: Reply) {
        let before_upstream = self.started.elapsed();
        let sent = Instant::now();
        let response = match self
            .target
            .send(&self.gateway.http, body, self.stream)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                hold.release().await;
                self.gateway
                    .metrics
                    .upstream(&self.served, self.stream, sent.elapsed());
                let _ = reply.send(Err(error));
                return;
            }
        };
        let (error, usage) = if !response.status().is_success() {
            self.target.failure(response).await
        } else if !self.stream {
            return self
                .complete(hold, response, reply, before_upstream, sent)
                .await;
        } else if is_event_stream(response.headers()) {
            return self
                .relay_stream(hold, response, reply, before_upstream, sent)
                .await;
        } else {
            self.target.unstreamed(response).await
        };
        let upstream_time = sent.elapsed();
        hold.bill_reported(usage).await;
        self.finish_metrics(before_upstream, sent, upstream_time);
        let _ = reply.send(Err(error));
    }

    fn finish_metrics(&self, before_upstream: Duration, sent: Instant, upstream_time: Duration) {
        let metrics = &self.gateway.metrics;
        metrics.upstream(&self.served, self.stream, upstream_time);
        let after_upstream = sent.elapsed().saturating_sub(upstream_time);
        metrics.overhead(ENDPOINT, self.stream, before_upstream + after_upstream);
    }

    /// The frame that tells the client of the upstream's error event `event`
    /// (one that does not quote the upstream's key: see `relay_stream`): the
    /// event as sent when its data is an OpenAI error (`openai_error`, which
    /// OpenAI's clients raise), else the gateway's own `upstream_error` event.
    fn upstream_error_frame(&self, event: &sse::Event, openai_error: bool) -> Bytes {
        let upstream = &self.target.name;
        if openai_error {
            tracing::warn!(%upstream, "the upstream ended its stream with an error event");
            return sse::frame(event, event.data.as_bytes());
        }
        tracing::warn!(%upstream, "the upstream ended its stream with an error event of its own shape");
        error_frame(&GatewayError::UpstreamFailed(
            "The model provider reported an error and ended the answer.".into(),
        ))
    }

    fn served_header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.served).unwrap_or(HeaderValue::from_static("unknown"))
    }

    /// A non-streamed answer: read it whole, settle, then answer (R7).
    async fn complete(
        self,
        hold: Hold,
        response: reqwest::Response,
        reply: Reply,
        before_upstream: Duration,
        sent: Instant,
    ) {
        let status = response.status();
        let body = read_whole(response, self.target.timeout).await;
        let upstream_time = sent.elapsed();
        let body = match body {
            Ok(body) => body,
            Err(failure) => {
                // Billed: an answer too large to read, served upstream (most
                // likely in full) with usage the gateway did not read, bills its
                // estimate, as a stream cut off does. Released: the others.
                let (error, billed) = match failure {
                    BodyError::Broken(error) => {
                        tracing::warn!(upstream = %self.target.name, %error, "the upstream's answer broke off");
                        let error = GatewayError::UpstreamFailed(
                            "The model provider's answer broke off.".into(),
                        );
                        (error, false)
                    }
                    BodyError::TimedOut => (GatewayError::UpstreamTimeout, false),
                    BodyError::TooLarge => {
                        tracing::warn!(upstream = %self.target.name, limit = MAX_ANSWER_BYTES,
                            "the upstream's answer is larger than the gateway reads: not passed on");
                        let error = GatewayError::UpstreamFailed(format!(
                            "The model provider's answer is larger than the {} MiB the gateway reads.",
                            MAX_ANSWER_BYTES >> 20
                        ));
                        (error, true)
                    }
                };
                match billed {
                    true => drop(hold.settle(None).await),
                    false => hold.release().await,
                }
                self.finish_metrics(before_upstream, sent, upstream_time);
                let _ = reply.send(Err(error));
                return;
            }
        };
        let Ok(mut object) = RawObject::parse(&body) else {
            tracing::warn!(upstream = %self.target.name, "the upstream answered something that is not a JSON object");
            hold.release().await;
            self.finish_metrics(before_upstream, sent, upstream_time);
            let _ = reply.send(Err(GatewayError::UpstreamFailed(
                "The model provider's answer was not valid JSON.".into(),
            )));
            return;
        };
        let usage = object
            .get_present("usage")
            .and_then(|raw| usage_from_upstream(raw, &self.target.name));
        if object.get_present("choices").is_none() {
            // An error object sent with 200, or anything else that is no
            // chat completion: nothing a client could use, billed only for the
            // usage it reports.
            tracing::warn!(upstream = %self.target.name, "the upstream answered 200 with a JSON object that is no chat completion (no `choices`)");
            hold.bill_reported(usage).await;
            self.finish_metrics(before_upstream, sent, upstream_time);
            let _ = reply.send(Err(GatewayError::UpstreamFailed(
                "The model provider's answer was not a chat completion.".into(),
            )));
            return;
        }
        if self.target.mentions_key(&body) {
            // Served (and billed) upstream, but nothing of it may reach the client.
            tracing::warn!(upstream = %self.target.name, "the upstream's answer quoted its key: not passed on");
            hold.settle(usage).await;
            self.finish_metrics(before_upstream, sent, upstream_time);
            let _ = reply.send(Err(GatewayError::UpstreamFailed(QUOTED_KEY.into())));
            return;
        }
        object.set("model", super::json::raw_string(&self.served));
        // Settled before the answer leaves, so a client that reads its spend right
        // after sees this request in it (R7).
        hold.settle(usage).await;
        let mut answer = (status, object.to_vec()).into_response();
        let headers = answer.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(SERVED_MODEL_HEADER, self.served_header());
        let own_time = before_upstream + sent.elapsed().saturating_sub(upstream_time);
        if let Ok(timing) = HeaderValue::from_str(&server_timing(own_time, upstream_time)) {
            headers.insert("server-timing", timing);
        }
        self.finish_metrics(before_upstream, sent, upstream_time);
        let _ = reply.send(Ok(answer));
    }

    /// A streamed answer: relay events as they come, settle when the upstream is
    /// done, then send `[DONE]` (R7). A client that goes away stops receiving, but
    /// the upstream is read to its end, so the stream is settled on its usage.
    async fn relay_stream(
        self,
        hold: Hold,
        response: reqwest::Response,
        reply: Reply,
        before_upstream: Duration,
        sent: Instant,
    ) {
        let (frames, mut receiver) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|frame| frame.map(Ok::<Bytes, Infallible>))
        }));
        let mut answer = Response::new(body);
        *answer.status_mut() = StatusCode::OK;
        let headers = answer.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(SERVED_MODEL_HEADER, self.served_header());
        let mut client = reply.send(Ok(answer)).is_ok().then_some(frames);

        let timeout = self.target.timeout;
        let mut relay = Relay::new(
            &self.served,
            self.client_wants_usage,
            &self.target.name,
            self.choices,
        );
        let mut upstream = Box::pin(sse::events(response.bytes_stream()));
        // Whether the upstream sent something it had to work for, even if it
        // could not be relayed (lines the event stream parser refuses, say).
        let mut upstream_answered = false;
        let end = 'read: loop {
            // Once the whole answer and its usage are in, only `[DONE]` is to
            // come, at once from any working upstream: one that stays silent
            // instead is not waited for as long as an answer is.
            let wait = match relay.answer_is_whole() {
                true => timeout.min(AFTER_FINAL_USAGE),
                false => timeout,
            };
            let event = match tokio::time::timeout(wait, upstream.next()).await {
                Err(_) if wait < timeout => {
                    tracing::warn!(upstream = %self.target.name,
                        "the upstream stream went silent after its whole answer: ended without its [DONE]");
                    break 'read StreamEnd::Eof;
                }
                Err(_) => {
                    tracing::warn!(upstream = %self.target.name, timeout_secs = timeout.as_secs(),
                        "no whole event came from the upstream stream within its timeout: ended");
                    break 'read StreamEnd::TimedOut;
                }
                Ok(None) => break 'read StreamEnd::Eof,
                Ok(Some(Err(e))) => {
                    let error = match e {
                        sse::EventStreamError::Transport(sse::ReadError::Transport(e)) => {
                            e.without_url().to_string()
                        }
                        other => {
                            upstream_answered = true;
                            other.to_string()
                        }
                    };
                    tracing::warn!(upstream = %self.target.name, %error, "the upstream stream broke off");
                    break 'read StreamEnd::Broken;
                }
                Ok(Some(Ok(event))) => event,
            };
            // Whatever the event, the upstream's key in it reaches no client:
            // the stream ends there, billed as the relay counted the event (an
            // error event is no answer).
            let quotes_key = [&event.data, &event.event, &event.id]
                .iter()
                .any(|field| self.target.mentions_key(field.as_bytes()));
            match relay.relay(event) {
                Relayed::Done => break 'read StreamEnd::Done,
                _ if quotes_key => {
                    tracing::warn!(upstream = %self.target.name, "the upstream's stream quoted its key: ended there");
                    let error = GatewayError::UpstreamFailed(QUOTED_KEY.into());
                    forward(&mut client, error_frame(&error), timeout).await;
                    break 'read StreamEnd::UpstreamError;
                }
                Relayed::Forward(frame) => forward(&mut client, frame, timeout).await,
                Relayed::Error {
                    event,
                    openai_error,
                } => {
                    let frame = self.upstream_error_frame(&event, openai_error);
                    forward(&mut client, frame, timeout).await;
                    break 'read StreamEnd::UpstreamError;
                }
                Relayed::Nothing => {}
            }
        };
        drop(upstream);
        let upstream_time = sent.elapsed();
        // Settle before the last byte (R7). A stream that ended without usage is
        // billed its estimate, flagged (§4). One that sent no event of its
        // answer (it closed, broke off, or sent only an error event: an
        // upstream error) is released; one that broke midway had content
        // delivered, and one that sent an event it could not be read past had
        // answered: both are billed like a stream without usage.
        let bill = relay.answered || upstream_answered;
        // Billed its usage only if that was the whole answer's, not a running
        // count the answer went on past, `[DONE]` or not.
        let usage = relay.final_usage();
        if usage.is_none() && relay.usage.is_some() {
            tracing::warn!(upstream = %self.target.name,
                "the upstream's last usage was not the whole answer's (content came after it, or the stream was cut): billed its estimate");
        }
        if bill {
            hold.settle(usage).await;
        } else {
            hold.release().await;
        }
        let last = match end {
            // `[DONE]` before any event of an answer: the provider answered
            // nothing, and the client must not take that for an empty answer.
            StreamEnd::Done if !bill => {
                tracing::warn!(upstream = %self.target.name, "the upstream stream ended with [DONE] before any answer");
                Some(error_frame(&GatewayError::UpstreamFailed(
                    "The model provider's stream ended without an answer.".into(),
                )))
            }
            StreamEnd::Done => Some(Bytes::from_static(DONE_FRAME)),
            // The client was told why the stream ends, by the upstream's error
            // event or by the gateway's.
            StreamEnd::UpstreamError => None,
            // Usage comes last (the gateway asked for it): the answer was whole,
            // and only `[DONE]` is missing.
            StreamEnd::Eof if usage.is_some() => Some(Bytes::from_static(DONE_FRAME)),
            // Closed before its usage: the client must not take a cut answer for
            // a whole one.
            StreamEnd::Eof => {
                tracing::warn!(upstream = %self.target.name, "the upstream stream ended without its usage or [DONE]");
                Some(error_frame(&GatewayError::UpstreamFailed(
                    "The model provider's stream ended before it finished.".into(),
                )))
            }
            StreamEnd::TimedOut => Some(error_frame(&GatewayError::UpstreamTimeout)),
            StreamEnd::Broken => Some(error_frame(&GatewayError::UpstreamFailed(
                "The model provider's stream broke off.".into(),
            ))),
        };
        if let Some(last) = last {
            forward(&mut client, last, timeout).await;
        }
        drop(client);
        self.finish_metrics(before_upstream, sent, upstream_time);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// `data: [DONE]`.
    Done,
    /// The upstream closed the stream without `[DONE]`, or went silent for
    /// [`AFTER_FINAL_USAGE`] after its whole answer and usage.
    Eof,
    /// No piece within the upstream's timeout.
    TimedOut,
    /// A transport error or an unusable stream.
    Broken,
    /// An error event (the upstream gave up on the answer), or an event that
    /// quoted the upstream's key: the client has been sent why.
    UpstreamError,
}

/// A `Server-Timing` header value (milliseconds, three decimals): `gateway` is the
/// time Tollgate added to the request (authentication, admission, settlement,
/// relaying), `upstream` the model provider's.
fn server_timing(gateway: Duration, upstream: Duration) -> String {
    let ms = |d: Duration| {
        let micros = d.as_micros();
        format!("{}.{:03}", micros / 1000, micros % 1000)
    };
    format!("gateway;dur={}, upstream;dur={}", ms(gateway), ms(upstream))
}

/// An error as a stream event, so a client that already has a 200 learns why the
/// stream ends early.
fn error_frame(error: &GatewayError) -> Bytes {
    sse::data_frame(&error.body())
}

/// Sends `frame` to the client unless it has gone away; a client that takes no
/// frame for `timeout` is treated as gone.
async fn forward(client: &mut Option<mpsc::Sender<Bytes>>, frame: Bytes, timeout: Duration) {
    if let Some(sender) = client {
        if sender.send_timeout(frame, timeout).await.is_err() {
            tracing::debug!("the client went away: reading the upstream to its end to settle");
            *client = None;
        }
    }
}
