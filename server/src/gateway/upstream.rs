//! Talking to the model providers: where each upstream is, its key, sending a
//! request with its timeout, reading usage from answers, and turning an upstream
//! failure into an error that is safe to show (DESIGN.md §4: upstream keys never
//! appear in logs, errors or responses).

use std::time::Duration;

use app::domain::{Usage, UsageError};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::GatewayError;
use super::json::RawObject;

/// An upstream key, read from the environment at start, with the `Authorization`
/// header that carries it, built once and marked sensitive. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret {
    key: String,
    authorization: HeaderValue,
}

impl Secret {
    /// Wraps `key`; `None` when no HTTP header can carry it (a line break or another
    /// control character inside it).
    pub fn new(key: String) -> Option<Secret> {
        let mut authorization = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
        authorization.set_sensitive(true);
        Some(Secret { key, authorization })
    }

    /// True when `haystack` contains the key: as it is, or, when `haystack` is
    /// JSON, in one of its strings once decoded (a key written with escapes,
    /// `\/` or `\u0073`, is the key to whoever decodes it). JSON is decoded only
    /// when it holds an escape that could hide one of the key's characters.
    fn appears_in(&self, haystack: &[u8]) -> bool {
        use memchr::memmem;
        let needle = self.key.as_bytes();
        if needle.is_empty() {
            return false;
        }
        if memmem::find(haystack, needle).is_some() {
            return true;
        }
        let may_hide = memmem::find(haystack, b"\\u").is_some()
            || memmem::find(haystack, b"\\/").is_some()
            || (needle.iter().any(|&b| b == b'\\' || b == b'"')
                && memchr::memchr(b'\\', haystack).is_some());
        may_hide
            && serde_json::from_slice::<serde_json::Value>(haystack)
                .is_ok_and(|json| json_mentions(&json, &self.key))
    }
}

/// Whether a string of `json`, or one of its objects' keys, contains `needle`.
fn json_mentions(json: &serde_json::Value, needle: &str) -> bool {
    use serde_json::Value;
    match json {
        Value::String(text) => text.contains(needle),
        Value::Array(items) => items.iter().any(|item| json_mentions(item, needle)),
        Value::Object(fields) => fields
            .iter()
            .any(|(name, value)| name.contains(needle) || json_mentions(value, needle)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One configured upstream, ready to call.
#[derive(Debug, Clone)]
pub struct Target {
    /// The upstream's name (config `[[upstreams]] name`), for logs.
    pub name: String,
    /// `{base_url}/chat/completions`.
    pub chat_url: reqwest::Url,
    /// The key from the environment variable `api_key_env`, if set.
    pub key: Option<Secret>,
    /// Wait at most this long for the answer's headers, a non-streamed body, or the
    /// next piece of a stream.
    pub timeout: Duration,
}

impl Target {
    /// Whether `bytes` contain this upstream's key: such an answer is never
    /// passed on (DESIGN.md §4).
    pub fn mentions_key(&self, bytes: &[u8]) -> bool {
        self.key.as_ref().is_some_and(|k| k.appears_in(bytes))
    }

    /// Sends `body` (JSON) to the chat completions endpoint, with the key as bearer
    /// token (marked sensitive, so no `Debug` of the request shows it).
    ///
    /// Errors: [`GatewayError::UpstreamTimeout`] past [`Target::timeout`],
    /// [`GatewayError::UpstreamFailed`] when the upstream cannot be reached.
    pub async fn send(
        &self,
        client: &reqwest::Client,
        body: Vec<u8>,
        stream: bool,
    ) -> Result<reqwest::Response, GatewayError> {
        let mut request = client
            .post(self.chat_url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            // Without it, any coding is acceptable (RFC 9110 §12.5.3); the
            // gateway reads answers as they are sent, uncompressed.
            .header(header::ACCEPT_ENCODING, "identity")
            .body(body);
        if let Some(key) = &self.key {
            request = request.header(header::AUTHORIZATION, key.authorization.clone());
        }
        match tokio::time::timeout(self.timeout, request.send()).await {
            Err(_) => Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) if e.is_timeout() => Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) => {
                // `without_url`: a URL may carry a query-string key on some providers.
                tracing::warn!(upstream = %self.name, error = %e.without_url(), "could not reach the upstream");
                Err(GatewayError::UpstreamFailed(
                    "The gateway could not reach the model provider.".into(),
                ))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Reads an unsuccessful answer and maps it (DESIGN.md §4): the upstream's own 4xx
    /// JSON error is passed on with its status, unless it mentions the key; a
    /// 401/403 means the gateway's credentials are wrong, and a redirect (never
    /// followed, [`is_redirect`]) that its address is, both the operator's
    /// problem (502); 5xx and anything else is a 502 with the upstream's retry
    /// headers. Returns the error and the usage the answer reported, if any
    /// (billed instead of released, R7), except for a 3xx, which is no answer,
    /// and a 401/403, a refusal before any work: their bodies are not read, and
    /// nothing is billed, whatever they claim.
    pub async fn failure(&self, response: reqwest::Response) -> (GatewayError, Option<Usage>) {
        let status = response.status();
        let retry = retry_headers(response.headers());
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::error!(upstream = %self.name, status = status.as_u16(),
                    "the upstream refused the gateway's credentials: check the variable named by its api_key_env");
                let error = GatewayError::UpstreamFailed(
                    "The model provider refused the gateway's credentials; the operator has to fix them.".into(),
                );
                (error, None)
            }
            s if is_redirect(s) => {
                tracing::error!(upstream = %self.name, status = s.as_u16(),
                    "the upstream answered with a redirect, which the gateway does not follow: check its base_url");
                let error = GatewayError::UpstreamFailed(format!(
                    "The model provider answered with a redirect (HTTP {}), which the gateway does not follow; the operator has to check the upstream's address.",
                    s.as_u16()
                ));
                (error, None)
            }
            s if s.is_client_error() => {
                let (body, object, usage) = self.read_unrelayed(response).await;
                let mentions_key = self.mentions_key(&body);
                let passable = !mentions_key
                    && object
                        .as_ref()
                        .is_some_and(|o| o.get_present("error").is_some());
                if mentions_key {
                    tracing::warn!(upstream = %self.name, status = s.as_u16(), "an upstream error mentioned the key: not passed on");
                }
                let error = GatewayError::UpstreamRejected {
                    status: s,
                    body: passable.then_some(body),
                    retry,
                };
                (error, usage)
            }
            s => {
                tracing::warn!(upstream = %self.name, status = s.as_u16(), "the upstream failed");
                // A 304 or 305 is no answer either.
                let usage = match s.is_redirection() {
                    true => None,
                    false => self.read_unrelayed(response).await.2,
                };
                (GatewayError::UpstreamStatus { status: s, retry }, usage)
            }
        }
    }

    /// Reads a successful answer to a streamed request that is not an event
    /// stream (an upstream that ignored `stream`): nothing of it can be relayed,
    /// so it is a 502, and the usage it reported, if any, is billed (R7).
    pub async fn unstreamed(&self, response: reqwest::Response) -> (GatewayError, Option<Usage>) {
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        tracing::warn!(upstream = %self.name, content_type, "the upstream answered a streamed request without a stream");
        let (_, _, usage) = self.read_unrelayed(response).await;
        (
            GatewayError::UpstreamFailed(
                "The model provider answered a streamed request without a stream.".into(),
            ),
            usage,
        )
    }

    /// The body of an answer that is not relayed (empty if it cannot be read in
    /// time), as a JSON object when it is one, and the usage it reported.
    async fn read_unrelayed(
        &self,
        response: reqwest::Response,
    ) -> (Bytes, Option<RawObject>, Option<Usage>) {
        let body = read_whole(response, self.timeout).await.unwrap_or_default();
        let object = RawObject::parse(&body).ok();
        let usage = object
            .as_ref()
            .and_then(|o| o.get_present("usage"))
            .and_then(|raw| usage_from_upstream(raw, &self.name));
        (body, object, usage)
    }
}

/// The largest body of a non-streamed answer the gateway reads, in bytes (16
/// MiB): a chat completion is a few kilobytes, and a model's longest answer
/// is far shorter. Past it the answer is not read on, so that an upstream
/// cannot fill the gateway's memory (streams are bounded per line:
/// [`super::sse::MAX_LINE_BYTES`]).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Why the whole body of an upstream's answer could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Not all of it came within the upstream's `timeout_secs`.
    TimedOut,
    /// The connection failed or closed before its end; the detail is safe to
    /// log (no URL).
    Broken(String),
    /// It is longer than [`MAX_ANSWER_BYTES`].
    TooLarge,
}

/// Reads the whole body of `response`, at most [`MAX_ANSWER_BYTES`] of it,
/// within `timeout`.
///
/// Errors: [`BodyError`]; an answer whose `Content-Length` is past the limit
/// is refused before any of it is read.
pub async fn read_whole(
    response: reqwest::Response,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    if response
        .content_length()
        .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let body = Limited::new(reqwest::Body::from(response), MAX_ANSWER_BYTES);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(error)) => Err(BodyError::Broken(
            match error.downcast::<reqwest::Error>() {
                // A URL may carry a query-string key on some providers.
                Ok(error) => error.without_url().to_string(),
                Err(error) => error.to_string(),
            },
        )),
    }
}

/// Whether `status` sends the client elsewhere (300-303, 307, 308), which the
/// gateway never follows. The other 3xx (304, 305) are no answer to a
/// completion either, but they move nothing: failures like any other status
/// (both unbilled, [`Target::failure`]).
fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 300..=303 | 307 | 308)
}

/// Whether `headers` say the body is an event stream (SSE).
pub fn is_event_stream(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The usage object as providers and usage API clients send it: OpenAI's nested
/// details, or flat `cached_tokens`/`reasoning_tokens`.
#[derive(Deserialize)]
#[serde(expecting = "a usage object with token counts")]
struct UsageWire {
    prompt_tokens: Option<TokenCount>,
    completion_tokens: Option<TokenCount>,
    cached_tokens: Option<TokenCount>,
    reasoning_tokens: Option<TokenCount>,
    prompt_tokens_details: Option<ObjectOnly<PromptDetails>>,
    completion_tokens_details: Option<ObjectOnly<CompletionDetails>>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct PromptDetails {
    cached_tokens: Option<TokenCount>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct CompletionDetails {
    reasoning_tokens: Option<TokenCount>,
}

/// A count of tokens the books can hold: 0 to `i64::MAX` (they store `BIGINT`).
/// Refused here, where the field is known, rather than by the store, which
/// could only name the whole request.
#[derive(Clone, Copy)]
struct TokenCount(u64);

impl<'de> Deserialize<'de> for TokenCount {
    /// Errors in the product's words, each saying what was found instead
    /// ("must be a whole number of tokens from 0 to 9223372036854775807, not
    /// 1e+20"): serde's own ("invalid type: floating point `1e20`, expected
    /// u64") are read by API callers.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        let not = |found: &dyn std::fmt::Display| {
            <D::Error as serde::de::Error>::custom(format_args!(
                "must be a whole number of tokens from 0 to {}, not {found}",
                i64::MAX
            ))
        };
        match Value::deserialize(deserializer)? {
            Value::Number(number) => match number.as_u64() {
                Some(count) if i64::try_from(count).is_ok() => Ok(TokenCount(count)),
                _ => Err(not(&number)),
            },
            Value::Bool(value) => Err(not(&value)),
            Value::String(_) => Err(not(&"a string")),
            Value::Array(_) => Err(not(&"an array")),
            Value::Object(_) => Err(not(&"an object")),
            Value::Null => Err(not(&"null")),
        }
    }
}

/// The count inside an optional [`TokenCount`].
fn count(value: Option<TokenCount>) -> Option<u64> {
    value.map(|TokenCount(count)| count)
}

/// `T` read from a JSON object only. serde's derive also reads a struct from an
/// array of its fields in order (`"prompt_tokens_details": [4]` would be 4 cached
/// tokens): this takes the object alone and hands it to `T`'s derive.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
            type Value = T;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
            // Anything else is refused in the product's words, as `TokenCount`
            // refuses, not serde's ("invalid type: string "x", expected an object").
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<T, E> {
                Err(not_an_object("a boolean"))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<T, E> {
                Err(not_an_object("a number"))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<T, E> {
                Err(not_an_object("a number"))
            }
            // The trait's signature, for a value only named, never used.
            #[allow(clippy::disallowed_types)]
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<T, E> {
                Err(not_an_object("a number"))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<T, E> {
                Err(not_an_object("a string"))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<T, E> {
                Err(not_an_object("null"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
                Err(not_an_object("an array"))
            }
        }
        fn not_an_object<E: serde::de::Error>(found: &str) -> E {
            E::custom(format_args!(
                "must be an object of token counts, not {found}"
            ))
        }
        // `any`, not `map`: serde_json refuses a value that is no object for
        // `deserialize_map` before the visitor can say what it is.
        deserializer
            .deserialize_any(Object(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// Why a usage object cannot be billed; the text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", if field.is_empty() { String::new() } else { format!("`{field}` ") })]
pub struct UsageParseError {
    /// Where in the usage object, as the caller wrote it: `prompt_tokens`,
    /// `prompt_tokens_details.cached_tokens`, or empty for the object itself.
    pub field: String,
    /// What is wrong with it, said of the field (`is missing`).
    pub problem: String,
}

/// Reads an OpenAI `usage` object: `prompt_tokens`, `completion_tokens`, and
/// `prompt_tokens_details.cached_tokens` / `completion_tokens_details.reasoning_tokens`
/// (or the same two flat), token counts as integers from 0 to `i64::MAX` (R3).
///
/// Errors: [`UsageParseError`] naming the field when a count is missing, not a
/// non-negative integer or past `i64::MAX`, when a flat and a nested count
/// disagree, or when cached exceeds prompt or reasoning exceeds completion tokens.
pub fn parse_usage(raw: &RawValue) -> Result<Usage, UsageParseError> {
    if !super::json::is_object(raw) {
        return Err(UsageParseError {
            field: String::new(),
            problem: "must be an object of token counts (`prompt_tokens`, `completion_tokens`, …)"
                .into(),
        });
    }
    let wire: UsageWire =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(raw.get()))
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.inner();
                let message = super::json::message_without_position(inner);
                UsageParseError {
                    // The library writes the object itself as ".".
                    field: if path == "." { String::new() } else { path },
                    problem: if inner.is_data() && message.starts_with("must be") {
                        message
                    } else {
                        format!(
                            "cannot be read: {message} (token counts are whole numbers, their details objects)"
                        )
                    },
                }
            })?;
    let missing = |field: &str| UsageParseError {
        field: field.to_owned(),
        problem: "is missing".into(),
    };
    // A detail count given flat, nested, or both (then equal); the field it was
    // read from, for the errors.
    let detail = |flat_name: &'static str,
                  nested_name: &'static str,
                  flat: Option<u64>,
                  nested: Option<u64>| match (flat, nested) {
        (Some(a), Some(b)) if a != b => Err(UsageParseError {
            field: flat_name.to_owned(),
            problem: format!(
                "is given twice with different values ({a}, and {b} in `{nested_name}`)"
            ),
        }),
        (None, Some(b)) => Ok((b, nested_name)),
        (a, _) => Ok((a.unwrap_or(0), flat_name)),
    };
    let (cached_tokens, cached_field) = detail(
        "cached_tokens",
        "prompt_tokens_details.cached_tokens",
        count(wire.cached_tokens),
        count(wire.prompt_tokens_details.and_then(|d| d.0.cached_tokens)),
    )?;
    let (reasoning_tokens, reasoning_field) = detail(
        "reasoning_tokens",
        "completion_tokens_details.reasoning_tokens",
        count(wire.reasoning_tokens),
        count(
            wire.completion_tokens_details
                .and_then(|d| d.0.reasoning_tokens),
        ),
    )?;
    let usage = Usage {
        prompt_tokens: count(wire.prompt_tokens).ok_or_else(|| missing("prompt_tokens"))?,
        completion_tokens: count(wire.completion_tokens)
            .ok_or_else(|| missing("completion_tokens"))?,
        cached_tokens,
        reasoning_tokens,
    };
    usage.validate().map_err(|e| match e {
        UsageError::CachedExceedsPrompt { cached, prompt } => UsageParseError {
            field: cached_field.to_owned(),
            problem: format!("({cached}) is more than `prompt_tokens` ({prompt})"),
        },
        UsageError::ReasoningExceedsCompletion {
            reasoning,
            completion,
        } => UsageParseError {
            field: reasoning_field.to_owned(),
            problem: format!("({reasoning}) is more than `completion_tokens` ({completion})"),
        },
    })?;
    Ok(usage)
}

/// [`parse_usage`] for an upstream's answer: a usage the gateway cannot read is
/// logged and treated as missing (the estimate is billed, flagged).
pub fn usage_from_upstream(raw: &RawValue, upstream: &str) -> Option<Usage> {
    match parse_usage(raw) {
        Ok(usage) => Some(usage),
        Err(e) => {
            tracing::warn!(upstream, problem = %e, "unreadable usage from the upstream: billing the estimate");
            None
        }
    }
}

/// The retry headers of an upstream's refusal that a client can act on, to pass
/// on with it: `Retry-After` as whole seconds or an HTTP date (RFC 9110), and
/// `Retry-After-Ms` (OpenAI's) as whole milliseconds. Other values are dropped:
/// a client would read them as it pleases, or fail on them.
fn retry_headers(headers: &axum::http::HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    fn whole(text: &str) -> bool {
        !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit())
    }
    fn seconds_or_date(text: &str) -> bool {
        whole(text) || httpdate::parse_http_date(text).is_ok()
    }
    /// A header and whether a value of it can be read.
    type Readable = (HeaderName, fn(&str) -> bool);
    let headers_read: [Readable; 2] = [
        (header::RETRY_AFTER, seconds_or_date),
        (HeaderName::from_static("retry-after-ms"), whole),
    ];
    headers_read
        .into_iter()
        .filter_map(|(name, readable)| {
            let value = headers.get(&name)?;
            value
                .to_str()
                .is_ok_and(readable)
                .then(|| (name, value.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer of `chunks` sent without a `Content-Length`, as a chunked one is.
    fn chunked(chunks: Vec<Vec<u8>>) -> reqwest::Response {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))),
        );
        reqwest::Response::from(axum::http::Response::new(reqwest::Body::wrap_stream(
            stream,
        )))
    }

    #[tokio::test]
    async fn an_answer_is_read_up_to_its_limit_and_no_further() {
        let wait = Duration::from_secs(5);
        let half = MAX_ANSWER_BYTES / 2;
        let whole = read_whole(chunked(vec![vec![b'a'; half], vec![b'b'; half]]), wait).await;
        assert_eq!(whole.map(|body| body.len()).ok(), Some(MAX_ANSWER_BYTES));
        let past = read_whole(chunked(vec![vec![b'a'; half], vec![b'b'; half + 1]]), wait).await;
        assert!(matches!(past, Err(BodyError::TooLarge)), "{past:?}");
    }

    fn parse(text: &str) -> Result<Usage, UsageParseError> {
        parse_usage(&RawValue::from_string(text.to_owned()).unwrap())
    }

    #[test]
    fn reads_nested_and_flat_details() {
        let nested = parse(
            r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
               "prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},
               "completion_tokens_details":{"reasoning_tokens":3}}"#,
        )
        .unwrap();
        let flat = parse(
            r#"{"prompt_tokens":10,"completion_tokens":5,"cached_tokens":4,"reasoning_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(nested, flat);
        assert_eq!(
            nested,
            Usage {
                prompt_tokens: 10,
                cached_tokens: 4,
                completion_tokens: 5,
                reasoning_tokens: 3
            }
        );
        let plain =
            parse(r#"{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":null}"#)
                .unwrap();
        assert_eq!(plain.cached_tokens, 0);
    }

    #[test]
    fn refuses_what_cannot_be_billed() {
        assert_eq!(
            parse(r#"{"completion_tokens":1}"#).unwrap_err().field,
            "prompt_tokens"
        );
        // Each message says its field's fault as a clause of a sentence.
        for (usage, message) in [
            (r#"{"completion_tokens":1}"#, "`prompt_tokens` is missing"),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"cached_tokens":5}"#,
                "`cached_tokens` (5) is more than `prompt_tokens` (3)",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":2}}"#,
                "`completion_tokens_details.reasoning_tokens` (2) is more than `completion_tokens` (1)",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"cached_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}"#,
                "`cached_tokens` is given twice with different values (1, and 2 in `prompt_tokens_details.cached_tokens`)",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":5}"#,
                "`prompt_tokens_details` must be an object of token counts, not a number",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":1.5}"#,
                "`prompt_tokens_details` must be an object of token counts, not a number",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":"x"}"#,
                "`prompt_tokens_details` must be an object of token counts, not a string",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"completion_tokens_details":[1]}"#,
                "`completion_tokens_details` must be an object of token counts, not an array",
            ),
            (
                r#"{"prompt_tokens":3,"completion_tokens":1,"completion_tokens_details":true}"#,
                "`completion_tokens_details` must be an object of token counts, not a boolean",
            ),
        ] {
            assert_eq!(parse(usage).unwrap_err().to_string(), message, "{usage}");
        }
        assert_eq!(
            parse(r#"{"prompt_tokens":-1,"completion_tokens":1}"#)
                .unwrap_err()
                .field,
            "prompt_tokens"
        );
        // Each error names the field where the caller wrote the count.
        assert_eq!(
            parse(r#"{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":"2"}}"#)
                .unwrap_err()
                .field,
            "prompt_tokens_details.cached_tokens"
        );
        assert_eq!(
            parse(r#"{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}"#)
                .unwrap_err()
                .field,
            "prompt_tokens_details.cached_tokens"
        );
        assert_eq!(
            parse(r#"{"prompt_tokens":1,"completion_tokens":1,"reasoning_tokens":2}"#)
                .unwrap_err()
                .field,
            "reasoning_tokens"
        );
        assert_eq!(
            parse(r#"{"prompt_tokens":1,"completion_tokens":1,"cached_tokens":2}"#)
                .unwrap_err()
                .field,
            "cached_tokens"
        );
        assert_eq!(
            parse(r#"{"prompt_tokens":5,"completion_tokens":1,"cached_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}"#)
                .unwrap_err()
                .field,
            "cached_tokens"
        );
        // A count past what the books hold is named, nested or flat, one past
        // the largest count and at the largest count serde reads.
        for (usage, field) in [
            (
                r#"{"prompt_tokens":9223372036854775808,"completion_tokens":1}"#,
                "prompt_tokens",
            ),
            (
                r#"{"prompt_tokens":1,"completion_tokens":18446744073709551615}"#,
                "completion_tokens",
            ),
            (
                r#"{"prompt_tokens":1,"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":9223372036854775808}}"#,
                "completion_tokens_details.reasoning_tokens",
            ),
        ] {
            let error = parse(usage).unwrap_err();
            assert_eq!(error.field, field, "{usage}");
            assert!(
                error.problem.starts_with(
                    "must be a whole number of tokens from 0 to 9223372036854775807, not"
                ),
                "{error}"
            );
        }
        // Each count that is not one is refused in the product's words, saying
        // what was found, without serde's or the parser's position.
        for (count, found) in [
            ("1e20", "not 1e+20"),
            ("2.5", "not 2.5"),
            ("-3", "not -3"),
            (r#""12""#, "not a string"),
            ("true", "not true"),
            ("[1]", "not an array"),
            (r#"{"n":1}"#, "not an object"),
        ] {
            let error = parse(&format!(
                r#"{{"prompt_tokens":{count},"completion_tokens":1}}"#
            ))
            .unwrap_err();
            assert_eq!(error.field, "prompt_tokens", "{count}");
            assert_eq!(
                error.problem,
                format!("must be a whole number of tokens from 0 to 9223372036854775807, {found}"),
                "{count}"
            );
        }
        assert_eq!(
            parse(r#"{"prompt_tokens":9223372036854775807,"completion_tokens":0}"#)
                .unwrap()
                .prompt_tokens,
            9_223_372_036_854_775_807,
            "the largest count the books hold is read"
        );
        // Details given as an array are refused, not read as their fields.
        for details in [
            r#""prompt_tokens_details":[4]"#,
            r#""completion_tokens_details":[1]"#,
        ] {
            let error = parse(&format!(
                r#"{{"prompt_tokens":9,"completion_tokens":9,{details}}}"#
            ))
            .unwrap_err();
            assert!(error.field.ends_with("_details"), "{details}: {error}");
        }
        // Anything but an object is refused, an array of counts too.
        for not_an_object in [r#""lots""#, "[100, 10]", "12"] {
            let error = parse(not_an_object).unwrap_err();
            assert_eq!(error.field, "", "the object itself");
            assert!(
                error.to_string().starts_with("must be an object"),
                "{not_an_object}: {error}"
            );
        }
        // Named for the caller, not after a type of this crate.
        let error =
            parse(r#"{"prompt_tokens":1,"completion_tokens":1,"prompt_tokens_details":"x"}"#)
                .unwrap_err();
        assert_eq!(error.field, "prompt_tokens_details");
        let text = error.to_string();
        assert!(
            text.contains("must be an object") && !text.contains("Details"),
            "{text}"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("sk-very-secret".into()).unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert!(secret.appears_in(b"xx sk-very-secret yy"));
        assert!(!secret.appears_in(b"sk-very-secre"));
        // Escaped in JSON, it is the key all the same once decoded.
        let slashed = Secret::new("sk-proj/abc".into()).unwrap();
        assert!(slashed.appears_in(br#"{"error":{"message":"bad key sk-proj\/abc"}}"#));
        assert!(secret.appears_in(br#"["\u0073k-very-secret"]"#));
        assert!(secret.appears_in(br#"{"sk-very-secret":1}"#));
        assert!(!secret.appears_in(br#"{"message":"sk-very-secre\u0021"}"#));
    }
}
