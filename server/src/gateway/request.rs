//! Reading a chat completion request: validation of the fields the gateway relies
//! on, the token estimate its reservation is priced from (DESIGN.md R7), and the
//! body sent upstream (DESIGN.md §4: unchanged but for `model` and
//! `stream_options.include_usage`).

use app::domain::{prompt_token_bound_from_bytes, TokenEstimate};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::GatewayError;
use super::json::{
    is_null, is_object, optional_bool, output_cap, raw_bool, raw_string, required_string,
    OutputCap, RawObject,
};

/// Request fields whose text reaches the model as prompt: their raw JSON byte
/// counts bound the prompt tokens (R7). `messages` is required; the others are
/// function and schema definitions that providers render into the prompt.
const PROMPT_FIELDS: [&str; 4] = ["messages", "tools", "functions", "response_format"];

/// Tokens held for each content part that is not text (an image, audio, a file):
/// its bytes do not bound its tokens. 2,000 covers OpenAI's high-detail image
/// cost on GPT-4o/4.1-class models (at most 1,445 tokens: 85 + 170 × 8 tiles) and
/// a few seconds of audio; models that bill images at a multiple of that (e.g.
/// GPT-4o mini) can exceed it, in which case the event is flagged as over its
/// reservation at settlement (R7) and the actual cost is billed anyway.
pub const NON_TEXT_PART_TOKENS: u64 = 2_000;

/// A validated chat completion request.
#[derive(Debug)]
pub struct ChatRequest {
    body: RawObject,
    /// The `model` field as sent (an id or an alias).
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    /// What the request may consume (R7).
    pub estimate: TokenEstimate,
    /// The field that set `estimate.output_cap`, when one did.
    output_cap_param: &'static str,
}

#[derive(Deserialize)]
struct MessageShape<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PartShape {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

impl ChatRequest {
    /// Parses and validates `bytes`.
    ///
    /// Errors (HTTP 400): [`GatewayError::InvalidJson`] unless it is one JSON object
    /// without duplicate keys; [`GatewayError::InvalidField`] naming the field when
    /// `model` is not a string, `messages` not a non-empty array of objects,
    /// `max_tokens`/`max_completion_tokens` not positive integers, `n` not a
    /// positive integer, `stream` not a boolean, or `stream_options` not an object
    /// (with a boolean `include_usage`).
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
        let body = RawObject::parse(bytes).map_err(|e| GatewayError::invalid_json(bytes, &e))?;
        let model = required_string(&body, "model")?;
        let messages = body.get_present("messages").ok_or_else(|| {
            GatewayError::invalid_field("messages", "you must provide `messages` (an array)")
        })?;
        let non_text_parts = count_non_text_parts(messages)?;
        let output_cap = output_cap(&body)?;
        let n = super::json::choice_count(&body)?;
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let client_wants_usage = match body.get_present("stream_options") {
            None => false,
            Some(raw) => {
                let options = RawObject::parse(raw.get().as_bytes()).map_err(|_| {
                    GatewayError::invalid_field(
                        "stream_options",
                        "`stream_options` must be an object",
                    )
                })?;
                optional_bool(&options, "include_usage")
                    .map_err(|_| {
                        GatewayError::invalid_field(
                            "stream_options.include_usage",
                            "`stream_options.include_usage` must be true or false",
                        )
                    })?
                    .unwrap_or(false)
            }
        };
        let prompt_bytes: usize = PROMPT_FIELDS
            .iter()
            .filter_map(|field| body.get_present(field))
            .map(|raw| raw.get().len())
            .sum();
        let prompt_tokens = prompt_token_bound_from_bytes(prompt_bytes)
            .saturating_add(non_text_parts.saturating_mul(NON_TEXT_PART_TOKENS));
        Ok(ChatRequest {
            model,
            stream,
            client_wants_usage,
            estimate: TokenEstimate {
                prompt_tokens,
                output_cap: output_cap.map(|cap| cap.tokens),
                n,
            },
            output_cap_param: output_cap.map_or("max_tokens", |cap| cap.param),
            body,
        })
    }

    /// The output cap (R7), with the field that set it, for an error naming it.
    pub(crate) fn output_cap(&self) -> Option<OutputCap> {
        self.estimate.output_cap.map(|tokens| OutputCap {
            tokens,
            param: self.output_cap_param,
        })
    }

    /// The body to send upstream: the client's, with `model` set to
    /// `upstream_model` and, for streams, `stream_options.include_usage` forced on
    /// (other `stream_options` kept), so that every stream can be settled on its
    /// actual usage (R7).
    ///
    /// Errors: [`GatewayError::Internal`] only if the rebuilt JSON is invalid (a bug).
    pub fn into_upstream_body(mut self, upstream_model: &str) -> Result<Vec<u8>, GatewayError> {
        self.body.set("model", raw_string(upstream_model));
        if self.stream {
            let mut options = match self.body.get_present("stream_options") {
                Some(raw) => RawObject::parse(raw.get().as_bytes())
                    .map_err(|e| GatewayError::Internal(format!("stream_options: {e}")))?,
                None => RawObject::default(),
            };
            options.set("include_usage", raw_bool(true));
            self.body.set("stream_options", options.to_raw()?);
        }
        Ok(self.body.to_vec())
    }
}

/// Counts the content parts of `messages` that are not text (R7: their bytes do
/// not bound their tokens).
///
/// Errors: [`GatewayError::InvalidField`] `messages` unless it is an array of at
/// least one object (OpenAI refuses an empty one).
fn count_non_text_parts(messages: &RawValue) -> Result<u64, GatewayError> {
    let not_objects = || {
        GatewayError::invalid_field("messages", "`messages` must be an array of message objects")
    };
    let items: Vec<&RawValue> = serde_json::from_str(messages.get()).map_err(|_| not_objects())?;
    // Read one by one: an array (`[[]]`) is no message.
    let messages = items
        .iter()
        .map(|item| {
            is_object(item)
                .then(|| serde_json::from_str::<MessageShape<'_>>(item.get()).ok())
                .flatten()
                .ok_or_else(not_objects)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if messages.is_empty() {
        return Err(GatewayError::invalid_field(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut count: u64 = 0;
    for content in messages.iter().filter_map(|m| m.content) {
        if is_null(content) || !content.get().starts_with('[') {
            continue;
        }
        // A part counts as text only when it plainly is one: a part whose shape
        // cannot be read (a duplicated `type`, say) is held as a non-text part,
        // so that no upstream's reading of it can exceed the reservation.
        if let Ok(parts) = serde_json::from_str::<Vec<&RawValue>>(content.get()) {
            count += parts
                .iter()
                .filter(|part| {
                    !matches!(
                        serde_json::from_str::<PartShape>(part.get()),
                        Ok(PartShape { kind: Some(kind) }) if kind == "text" || kind == "refusal"
                    )
                })
                .count() as u64;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_param(body: &str) -> String {
        match ChatRequest::parse(body.as_bytes()) {
            Err(GatewayError::InvalidField { param, .. }) => param,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn estimates_from_the_messages_bytes_and_the_caps() {
        let messages = r#"[{"role":"user","content":"héllo"}]"#;
        let body = format!(r#"{{"model":"m","messages":{messages},"max_tokens":50,"n":3}}"#);
        let request = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(
            request.estimate,
            TokenEstimate {
                prompt_tokens: prompt_token_bound_from_bytes(messages.len()),
                output_cap: Some(50),
                n: 3
            }
        );
        let both = r#"{"model":"m","messages":[{}],"max_tokens":50,"max_completion_tokens":70}"#;
        assert_eq!(
            ChatRequest::parse(both.as_bytes())
                .unwrap()
                .estimate
                .output_cap,
            Some(70)
        );
        let none = r#"{"model":"m","messages":[{}],"max_tokens":null}"#;
        let none = ChatRequest::parse(none.as_bytes()).unwrap();
        assert_eq!((none.estimate.output_cap, none.estimate.n), (None, 1));
    }

    #[test]
    fn both_caps_hold_the_larger_and_unreadable_parts_are_not_text() {
        let body = r#"{"model":"m","messages":[{}],"max_completion_tokens":1,"max_tokens":10000}"#;
        let request = ChatRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(request.estimate.output_cap, Some(10_000));
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#;
        let request = ChatRequest::parse(body.as_bytes()).unwrap();
        assert!(request.estimate.prompt_tokens >= NON_TEXT_PART_TOKENS);
        let text =
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        let request = ChatRequest::parse(text.as_bytes()).unwrap();
        assert!(request.estimate.prompt_tokens < NON_TEXT_PART_TOKENS);
    }

    #[test]
    fn images_add_their_bound() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#;
        let request = ChatRequest::parse(body.as_bytes()).unwrap();
        assert!(request.estimate.prompt_tokens >= NON_TEXT_PART_TOKENS);
    }

    #[test]
    fn invalid_fields_are_named() {
        assert_eq!(error_param(r#"{"messages":[{}]}"#), "model");
        assert_eq!(error_param(r#"{"model":1,"messages":[{}]}"#), "model");
        assert_eq!(error_param(r#"{"model":"m"}"#), "messages");
        assert_eq!(error_param(r#"{"model":"m","messages":{}}"#), "messages");
        assert_eq!(error_param(r#"{"model":"m","messages":[1]}"#), "messages");
        // Arrays, which serde would read as a message's fields by position.
        for items in ["[[]]", "[[1]]", r#"[{}, ["user", "hi"]]"#, "[[[[]]]]"] {
            let body = format!(r#"{{"model":"m","messages":{items}}}"#);
            assert_eq!(error_param(&body), "messages", "{body}");
        }
        assert_eq!(error_param(r#"{"model":"m","messages":[]}"#), "messages");
        assert_eq!(
            error_param(r#"{"model":"m","messages":[{}],"max_tokens":0}"#),
            "max_tokens"
        );
        assert_eq!(
            error_param(
                r#"{"model":"m","messages":[{}],"max_tokens":9,"max_completion_tokens":0}"#
            ),
            "max_completion_tokens"
        );
        assert_eq!(
            error_param(r#"{"model":"m","messages":[{}],"max_tokens":-1}"#),
            "max_tokens"
        );
        assert_eq!(
            error_param(r#"{"model":"m","messages":[{}],"max_completion_tokens":1.5}"#),
            "max_completion_tokens"
        );
        assert_eq!(error_param(r#"{"model":"m","messages":[{}],"n":0}"#), "n");
        assert_eq!(
            error_param(r#"{"model":"m","messages":[{}],"stream":"yes"}"#),
            "stream"
        );
        assert_eq!(
            error_param(r#"{"model":"m","messages":[{}],"stream_options":true}"#),
            "stream_options"
        );
        assert!(matches!(
            ChatRequest::parse(b"{\"model\":"),
            Err(GatewayError::InvalidJson(_))
        ));
    }

    #[test]
    fn the_upstream_body_changes_model_and_forces_usage_only() {
        let body = r#"{"model":"alias","messages":[{"role":"user","content":"x"}],"temperature":0.30000000000000004,"stream":true,"stream_options":{"other":1}}"#;
        let request = ChatRequest::parse(body.as_bytes()).unwrap();
        assert!(request.stream && !request.client_wants_usage);
        let out = String::from_utf8(request.into_upstream_body("real-model").unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"real-model","messages":[{"role":"user","content":"x"}],"temperature":0.30000000000000004,"stream":true,"stream_options":{"other":1,"include_usage":true}}"#
        );
        let plain = r#"{"model":"a","messages":[{}]}"#;
        let out = ChatRequest::parse(plain.as_bytes())
            .unwrap()
            .into_upstream_body("b")
            .unwrap();
        assert_eq!(out, br#"{"model":"b","messages":[{}]}"#);
    }
}
