//! A mock OpenAI-compatible upstream on a random loopback port, for the gateway
//! tests and the benchmark: `POST /v1/chat/completions` answers OpenAI-shaped
//! bodies or SSE streams with configurable usage, delay, status and pauses, and
//! records what it received (raw body, `Authorization` header).
#![allow(dead_code)]
#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use tokio::sync::{mpsc, Notify};

/// Token counts the mock reports (OpenAI `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockUsage {
    /// `prompt_tokens`.
    pub prompt: u64,
    /// `prompt_tokens_details.cached_tokens`.
    pub cached: u64,
    /// `completion_tokens`.
    pub completion: u64,
    /// `completion_tokens_details.reasoning_tokens`.
    pub reasoning: u64,
}

/// How the mock answers; change it between requests with [`MockUpstream::set`].
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// HTTP status; anything but 200 answers `error_body`.
    pub status: u16,
    /// The body of a non-200 answer; `{auth}` is replaced with the `Authorization`
    /// header received (to play an upstream that echoes credentials), and
    /// `{auth_escaped}` with the same written as JSON escapes (`\u0042…`).
    pub error_body: String,
    /// The usage reported (non-streamed always; streamed when asked for).
    pub usage: MockUsage,
    /// Whether a stream asked for usage gets its usage chunk.
    pub usage_in_stream: bool,
    /// Wait this long before answering (a slow upstream).
    pub delay: Duration,
    /// Content pieces of a stream.
    pub stream_pieces: usize,
    /// The content of each piece of a stream (JSON-safe text); `None`:
    /// `piece {i} `.
    pub piece_content: Option<String>,
    /// The content of a non-streamed answer (JSON-safe text).
    pub content: String,
    /// When set, a stream stops after its first piece until this is notified.
    pub pause_after_first_piece: Option<Arc<Notify>>,
    /// Keep what was received, for [`MockUpstream::received`] (off in benchmarks).
    pub record_requests: bool,
    /// Answer a streamed request with the non-streamed JSON, as an upstream that
    /// ignores `stream` does.
    pub ignore_stream: bool,
    /// Whether a stream ends with `data: [DONE]` (else the connection just closes).
    pub done_in_stream: bool,
    /// Each content piece of a stream asked for usage carries the count so far
    /// (`usage.prompt`, and one completion token a piece), as vLLM's continuous
    /// usage does, instead of `usage: null`.
    pub running_usage: bool,
    /// A stream closes after its content pieces: no finish reason, no usage
    /// chunk, no `[DONE]` (an upstream cut off mid-answer).
    pub cut_before_finish: bool,
    /// A stream keeps its connection open, silent, after its last event, until
    /// the gateway closes it (an upstream that never sends `[DONE]` nor closes).
    pub silent_at_end: bool,
    /// The stream's first event carries bytes that are not UTF-8 (a broken
    /// upstream): the rest follows as usual.
    pub invalid_utf8_first: bool,
    /// A stream asked for usage carries it in its finish chunk, beside the
    /// finish reason, and sends no usage chunk of its own.
    pub usage_beside_finish: bool,
    /// A stream sends, after this many content pieces, an error event (its data
    /// `error_body`, `{auth}` replaced as there) and closes (or falls silent,
    /// with `silent_at_end`); after none, the error event is all it sends.
    pub error_event_after: Option<usize>,
    /// That error event is named (`event: error`).
    pub error_event_named: bool,
    /// A stream sends no event at all and closes.
    pub empty_stream: bool,
    /// A stream sends `[DONE]` alone and closes.
    pub done_only: bool,
    /// A stream sends an event whose data is not JSON after its first piece.
    pub not_json_after_first: bool,
    /// A stream's first content piece carries an `id:` field of the
    /// `Authorization` header received (an upstream that echoes credentials).
    pub auth_as_event_id: bool,
    /// A non-streamed answer of 200 sends this body instead of a completion.
    pub answer_body: Option<String>,
    /// `Retry-After` and `Retry-After-Ms` of a non-200 answer, as a rate-limited
    /// provider sends them.
    pub retry_after: Option<(&'static str, &'static str)>,
    /// The `Location` of a non-200 answer, as a provider that moved sends it.
    pub location: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            status: 200,
            error_body: r#"{"error":{"message":"mock failure","type":"server_error","param":null,"code":null}}"#.into(),
            usage: MockUsage {
                prompt: 12,
                cached: 0,
                completion: 5,
                reasoning: 0,
            },
            usage_in_stream: true,
            delay: Duration::ZERO,
            stream_pieces: 3,
            piece_content: None,
            content: "Hello from the mock.".into(),
            pause_after_first_piece: None,
            record_requests: true,
            ignore_stream: false,
            done_in_stream: true,
            running_usage: false,
            cut_before_finish: false,
            silent_at_end: false,
            invalid_utf8_first: false,
            usage_beside_finish: false,
            error_event_after: None,
            error_event_named: false,
            empty_stream: false,
            done_only: false,
            not_json_after_first: false,
            auth_as_event_id: false,
            answer_body: None,
            retry_after: None,
            location: None,
        }
    }
}

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Accept-Encoding` header, if any.
    pub accept_encoding: Option<String>,
    /// The raw body.
    pub body: String,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

#[derive(Default)]
struct MockState {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
}

/// The running mock.
pub struct MockUpstream {
    /// `http://127.0.0.1:PORT/v1`, the `base_url` to configure.
    pub base_url: String,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Starts the mock with the default behaviour.
    pub async fn start() -> MockUpstream {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        MockUpstream {
            base_url,
            state,
            task,
        }
    }

    /// Changes the behaviour for the next requests.
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.state.behaviour.lock().unwrap());
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn usage_json(usage: MockUsage) -> String {
    format!(
        r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":{},"audio_tokens":0}}}}"#,
        usage.prompt,
        usage.completion,
        usage.prompt + usage.completion,
        usage.cached,
        usage.reasoning
    )
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8(body.to_vec()).unwrap();
    let behaviour = state.behaviour.lock().unwrap().clone();
    if behaviour.record_requests {
        state.received.lock().unwrap().push(Received {
            authorization: authorization.clone(),
            accept_encoding: headers
                .get(header::ACCEPT_ENCODING)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: body.clone(),
        });
    }
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let error_text = |behaviour: &Behaviour| {
        let auth = authorization.as_deref().unwrap_or("");
        let escaped: String = auth
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        behaviour
            .error_body
            .replace("{auth_escaped}", &escaped)
            .replace("{auth}", auth)
    };
    if behaviour.status != 200 {
        let text = error_text(&behaviour);
        let mut answer = (
            StatusCode::from_u16(behaviour.status).unwrap(),
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response();
        if let Some((seconds, millis)) = behaviour.retry_after {
            let headers = answer.headers_mut();
            headers.insert(header::RETRY_AFTER, seconds.parse().unwrap());
            headers.insert("retry-after-ms", millis.parse().unwrap());
        }
        if let Some(location) = &behaviour.location {
            answer
                .headers_mut()
                .insert(header::LOCATION, location.parse().unwrap());
        }
        return answer;
    }
    let request: serde_json::Value = serde_json::from_str(&body).unwrap();
    let model = request["model"].as_str().unwrap_or("").to_owned();
    let stream = request["stream"].as_bool().unwrap_or(false) && !behaviour.ignore_stream;
    if let (false, Some(body)) = (stream, &behaviour.answer_body) {
        return ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response();
    }
    if !stream {
        // `score` carries more digits than an f64 holds: the gateway must pass it on
        // as it is.
        let text = format!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":1767225600,"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"score":0.1000000000000000055511151231257827,"system_fingerprint":null}}"#,
            behaviour.content,
            usage_json(behaviour.usage)
        );
        return ([(header::CONTENT_TYPE, "application/json")], text).into_response();
    }
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let error_event = behaviour.error_event_after.map(|_| {
        let name = match behaviour.error_event_named {
            true => "event: error\n",
            false => "",
        };
        format!("{name}data: {}\n\n", error_text(&behaviour))
    });
    let (frames, mut receiver) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let usage_field = if include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let chunk_with = |delta: &str, finish: &str, usage_field: &str| {
            format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{usage_field}}}\n\n"
            )
        };
        let chunk = |delta: &str, finish: &str| chunk_with(delta, finish, usage_field);
        let mut out = match behaviour.error_event_after {
            Some(0) => vec![],
            _ => vec![chunk(r#"{"role":"assistant","content":""}"#, "null")],
        };
        for i in 0..behaviour.stream_pieces {
            if behaviour.error_event_after == Some(i) {
                break;
            }
            if i == 1 && behaviour.not_json_after_first {
                out.push("data: not json\n\n".to_owned());
            }
            let content = match &behaviour.piece_content {
                Some(content) => content.clone(),
                None => format!("piece {i} "),
            };
            let delta = format!(r#"{{"content":"{content}"}}"#);
            if i == 0 && behaviour.auth_as_event_id {
                out.push(format!("id: {}\n", authorization.as_deref().unwrap_or("")));
            }
            out.push(match include_usage && behaviour.running_usage {
                true => {
                    let so_far = MockUsage {
                        completion: i as u64 + 1,
                        ..behaviour.usage
                    };
                    chunk_with(
                        &delta,
                        "null",
                        &format!(",\"usage\":{}", usage_json(so_far)),
                    )
                }
                false => chunk(&delta, "null"),
            });
        }
        let usage_at_end =
            include_usage && behaviour.usage_in_stream && !behaviour.cut_before_finish;
        if let Some(error_event) = error_event {
            out.push(error_event);
        } else if usage_at_end && behaviour.usage_beside_finish {
            let usage_field = format!(",\"usage\":{}", usage_json(behaviour.usage));
            out.push(chunk_with("{}", r#""stop""#, &usage_field));
        } else if !behaviour.cut_before_finish {
            out.push(chunk("{}", r#""stop""#));
        }
        if behaviour.error_event_after.is_some() || behaviour.usage_beside_finish {
            // Nothing after the error event, nor after a usage beside the finish.
        } else if usage_at_end {
            out.push(format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"{model}\",\"choices\":[],\"usage\":{}}}\n\n",
                usage_json(behaviour.usage)
            ));
        }
        if behaviour.done_in_stream
            && !behaviour.cut_before_finish
            && behaviour.error_event_after.is_none()
        {
            out.push("data: [DONE]\n\n".to_owned());
        }
        if behaviour.empty_stream {
            out.clear();
        }
        if behaviour.done_only {
            out = vec!["data: [DONE]\n\n".to_owned()];
        }
        for (i, frame) in out.into_iter().enumerate() {
            let frame = match i == 0 && behaviour.invalid_utf8_first {
                true => Bytes::from_static(
                    b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n",
                ),
                false => Bytes::from(frame),
            };
            // The mock keeps writing after the client left: a real upstream does.
            let _ = frames.send(frame).await;
            if i == 1 {
                if let Some(gate) = &behaviour.pause_after_first_piece {
                    gate.notified().await;
                }
            }
        }
        if behaviour.silent_at_end {
            frames.closed().await;
        }
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        receiver
            .poll_recv(cx)
            .map(|frame| frame.map(Ok::<Bytes, Infallible>))
    }));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
