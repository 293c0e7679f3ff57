//! The replay's mock upstream: an OpenAI-compatible `POST /v1/chat/completions`
//! that answers at once with exactly the token counts the replay put in the
//! request's `metadata` (the trace's prompt and completion tokens; output never
//! above the request's `max_completion_tokens`), streamed or not, so the gateway
//! settles each request on the trace's real usage.

use std::collections::HashMap;

use axum::{
    body::{Body, Bytes},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// `metadata` key carrying the trace's prompt tokens (a decimal string, as
/// OpenAI's `metadata` values are strings).
pub const PROMPT_TOKENS_KEY: &str = "replay_prompt_tokens";
/// `metadata` key carrying the trace's completion tokens.
pub const COMPLETION_TOKENS_KEY: &str = "replay_completion_tokens";

/// The mock's routes: `POST /v1/chat/completions`.
pub fn router() -> Router {
    Router::new().route("/v1/chat/completions", post(chat_completions))
}

#[derive(Debug, Deserialize)]
struct Ask {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn chat_completions(body: Bytes) -> Response {
    let ask: Ask = match serde_json::from_slice(&body) {
        Ok(ask) => ask,
        Err(e) => return refuse(&format!("The body is not a chat completion request: {e}")),
    };
    let count = |key: &str| -> Result<u64, String> {
        let text = ask.metadata.get(key).ok_or_else(|| {
            format!("This mock answers replayed requests only: metadata.{key} is missing.")
        })?;
        text.parse()
            .map_err(|_| format!("metadata.{key} must be a whole number, not {text:?}."))
    };
    let (prompt, completion) = match (count(PROMPT_TOKENS_KEY), count(COMPLETION_TOKENS_KEY)) {
        (Ok(prompt), Ok(completion)) => (prompt, completion),
        (Err(problem), _) | (_, Err(problem)) => return refuse(&problem),
    };
    // Like a provider, never more output than the request allows.
    let completion = match ask.max_completion_tokens.or(ask.max_tokens) {
        Some(cap) => completion.min(cap),
        None => completion,
    };
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    });
    let id = format!("chatcmpl-replay-{}", uuid::Uuid::new_v4().simple());
    let created = chrono::Utc::now().timestamp();
    let content = format!("A replayed answer of {completion} tokens.");
    if !ask.stream {
        let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": ask.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        return (StatusCode::OK, axum::Json(answer)).into_response();
    }
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ask.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage.clone();
        }
        format!("data: {chunk}\n\n")
    };
    let mut events = String::new();
    events.push_str(&chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]),
        None,
    ));
    events.push_str(&chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        None,
    ));
    if ask.stream_options.unwrap_or_default().include_usage {
        events.push_str(&chunk(json!([]), Some(&usage)));
    }
    events.push_str("data: [DONE]\n\n");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// An OpenAI-shaped 400.
fn refuse(message: &str) -> Response {
    let body = json!({
        "error": {"message": message, "type": "invalid_request_error", "param": "metadata", "code": null}
    });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(body: Value) -> (StatusCode, String) {
        let response = router()
            .oneshot(
                axum::http::Request::post("/v1/chat/completions")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn ask(stream: bool) -> Value {
        json!({
            "model": "m",
            "stream": stream,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "x"}],
            "metadata": {PROMPT_TOKENS_KEY: "4808", COMPLETION_TOKENS_KEY: "10"},
        })
    }

    #[tokio::test]
    async fn answers_with_the_trace_counts() {
        let (status, body) = call(ask(false)).await;
        assert_eq!(status, StatusCode::OK);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["usage"]["prompt_tokens"], 4808);
        assert_eq!(body["usage"]["completion_tokens"], 10);
        assert_eq!(body["model"], "m");
    }

    #[tokio::test]
    async fn streams_end_with_usage_then_done() {
        let (status, body) = call(ask(true)).await;
        assert_eq!(status, StatusCode::OK);
        let frames: Vec<&str> = body.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.last(), Some(&"data: [DONE]"));
        let usage: Value =
            serde_json::from_str(frames[frames.len() - 2].trim_start_matches("data: ")).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 4808);
        assert_eq!(usage["choices"], json!([]));
    }

    #[tokio::test]
    async fn output_stays_within_the_requested_cap() {
        let mut body = ask(false);
        body["max_completion_tokens"] = json!(4);
        let (_, text) = call(body).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 4);
    }

    #[tokio::test]
    async fn a_request_without_counts_is_refused() {
        let mut body = ask(false);
        body["metadata"] = json!({PROMPT_TOKENS_KEY: "many"});
        let (status, text) = call(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            text.contains("replay_prompt_tokens must be a whole number"),
            "{text}"
        );
    }
}
