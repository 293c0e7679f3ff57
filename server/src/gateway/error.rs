//! The gateway's one error type and its OpenAI-shaped answers (DESIGN.md §4).
//!
//! Every variant names its HTTP status. The body is always
//! `{"error":{"message":..,"type":..,"param":..,"code":..}}`, the shape the official
//! SDKs parse. Internal failures are logged with their detail and answered with a
//! generic message; bad input is never a 500.

use app::domain::Blocked;
use app::store::StoreError;
use axum::{
    http::{header, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Serialize;

/// Why the gateway or the usage API refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The body is larger than `max_request_bytes` (HTTP 413). Nothing was read
    /// past the limit, reserved or spent.
    #[error("the request body is larger than the {limit} bytes this gateway accepts")]
    PayloadTooLarge {
        /// The configured limit, bytes.
        limit: usize,
    },
    /// The body is sent compressed (`Content-Encoding` other than `identity`),
    /// which this gateway does not read (HTTP 415, code
    /// `unsupported_content_encoding`). Nothing was reserved or spent.
    /// The message shows the value as [`shown_text`] does.
    #[error("the request body is sent with `Content-Encoding: {}`, which this gateway does not read; send it uncompressed", shown_text(.0))]
    UnsupportedContentEncoding(String),
    /// The body could not be read from the client (HTTP 400).
    #[error("the request body could not be read")]
    UnreadableBody,
    /// The body did not fully arrive within `request_body_timeout_secs` (HTTP
    /// 408, code `request_timeout`). Nothing was reserved or spent.
    #[error("the request body did not arrive within {seconds} s; nothing was spent: send the request again")]
    RequestTimeout {
        /// The configured limit, seconds.
        seconds: u64,
    },
    /// The body is not one JSON object (HTTP 400, code `invalid_json`); the text
    /// says what it is instead ([`GatewayError::invalid_json`]).
    #[error("{0}")]
    InvalidJson(String),
    /// A field is missing or has an invalid value (HTTP 400, code `invalid_value`);
    /// `param` names it as OpenAI does (`max_tokens`, `records[2].model`).
    #[error("{message}")]
    InvalidField {
        /// The field, as a path.
        param: String,
        /// A sentence for a person.
        message: String,
    },
    /// No `Authorization: Bearer` header (HTTP 401, code `invalid_api_key`).
    #[error("you didn't provide an API key: send it as `Authorization: Bearer <key>`")]
    MissingApiKey,
    /// More than one `Authorization` header (HTTP 401, code `invalid_api_key`):
    /// which key should spend is not guessed.
    #[error(
        "the request sends {0} `Authorization` headers; send one: `Authorization: Bearer <key>`"
    )]
    SeveralApiKeys(usize),
    /// The key is unknown or revoked (HTTP 401, code `invalid_api_key`).
    #[error("incorrect API key provided")]
    InvalidApiKey,
    /// A member's key on a route for administrators' keys (HTTP 403, type
    /// `permission_error`, code `forbidden`); the text says what it may not do.
    #[error("only administrators' API keys can {0}")]
    Forbidden(&'static str),
    /// The model name is neither an id nor an alias of the catalog (HTTP 404, code
    /// `model_not_found`, param `model`, or the field that named it, such as
    /// `records[2].model` in a bulk usage body).
    ///
    /// The message shows the name as [`shown_text`] does, and says so when it
    /// is empty.
    #[error("{}", model_not_found_message(.name))]
    ModelNotFound {
        /// The name as sent.
        name: String,
        /// The field that sent it.
        param: String,
    },
    /// An endpoint this gateway does not serve (HTTP 404, code `unknown_url`).
    /// The message shows the method and path as [`shown_text`] does.
    #[error(
        "unknown URL ({} {}): this server answers /v1/chat/completions, /v1/models and the usage API under /api/v1",
        shown_text(.method),
        shown_text(.path)
    )]
    UnknownEndpoint {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// A served path with the wrong method (HTTP 405, code `method_not_allowed`).
    /// The message shows the method as [`shown_text`] does.
    #[error("method {} is not allowed on this path", shown_text(.0))]
    MethodNotAllowed(String),
    /// The usage API names a reservation that is not held (any more) (HTTP 404,
    /// code `reservation_not_found`): settled, released, expired or never made.
    /// The message shows the id as [`shown_text`] does.
    #[error("{}", reservation_not_found_message(.0))]
    ReservationNotFound(String),
    /// The usage API settles a reservation that was settled before with other
    /// usage (HTTP 409, code `already_settled`): nothing was recorded. A retry
    /// reports what the first settlement did and gets its event back.
    #[error(
        "this reservation was already settled with other usage (on {served}, costing {cost}); \
         nothing was recorded: a retried settlement must report the same usage"
    )]
    AlreadySettled {
        /// The model the first settlement charged.
        served: String,
        /// What it cost, in EUR, exact and with its sign (`€0.00235`).
        cost: String,
    },
    /// Admission refused the request (HTTP 429, type `insufficient_quota`, code
    /// `plan_limit_reached` or `model_limit_reached`, header `x-should-retry: false`;
    /// DESIGN.md R6, §4).
    #[error("{}", .0.message)]
    Blocked(Blocked),
    /// The upstream refused the request with a 4xx status, passed on with that status
    /// (HTTP 4xx). `body` is the upstream's own JSON error, when it is one and does
    /// not contain the upstream key; otherwise a generic message is sent. The
    /// upstream's `Retry-After` and `Retry-After-Ms` (seconds, milliseconds) go
    /// with it, so that a client rate-limited by the provider waits as told.
    #[error("the model provider refused the request (HTTP {status})")]
    UpstreamRejected {
        /// The upstream's status (4xx).
        status: StatusCode,
        /// The upstream's JSON error body, safe to pass on.
        body: Option<Bytes>,
        /// The upstream's retry headers, by name, as it sent them.
        retry: Vec<(HeaderName, HeaderValue)>,
    },
    /// The upstream failed, was unreachable, answered garbage, or refused the
    /// gateway's own credentials (HTTP 502, code `upstream_error`). The message is
    /// safe to show; details are logged.
    #[error("{0}")]
    UpstreamFailed(String),
    /// The upstream answered with a server error or another status that is
    /// neither success nor a client error (HTTP 502, code `upstream_error`). Its
    /// `Retry-After` and `Retry-After-Ms` go with it, as with
    /// [`GatewayError::UpstreamRejected`], so that a client told by the provider
    /// to wait (a 503 while it is overloaded, say) waits as told.
    #[error("The model provider failed (HTTP {}).", .status.as_u16())]
    UpstreamStatus {
        /// The upstream's status.
        status: StatusCode,
        /// The upstream's retry headers, by name, as it sent them.
        retry: Vec<(HeaderName, HeaderValue)>,
    },
    /// The upstream did not answer within its `timeout_secs` (HTTP 504, code
    /// `upstream_timeout`).
    #[error("the model provider did not answer in time")]
    UpstreamTimeout,
    /// Another program kept the database's write lock past the store's wait
    /// (HTTP 503, code `database_busy`, header `retry-after`); nothing was reserved
    /// or spent, and the same request may succeed a moment later. The detail is
    /// logged, never sent.
    #[error("the gateway's database is busy with another program's write; nothing was spent: try again in a moment")]
    DatabaseBusy(String),
    /// The gateway's database cannot be reached or cannot write (a PostgreSQL
    /// server down, a full disk: `StoreError::Unavailable`; HTTP 503, code
    /// `database_unavailable`, header `retry-after`); nothing was reserved or
    /// spent. The detail is logged, never sent.
    #[error("the gateway cannot reach or write to its database just now; nothing was spent: try again later")]
    DatabaseUnavailable(String),
    /// A bug or a database failure (HTTP 500, code `internal_error`). The detail is
    /// logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

pub(crate) use app::text::shown_text;
pub use app::text::SHOWN_ID_CHARS;

/// The sentence of [`GatewayError::ReservationNotFound`] for the id `id`.
fn reservation_not_found_message(id: &str) -> String {
    if id.is_empty() {
        "the reservation id in the path is empty: send the `reservation_id` the admission returned"
            .to_owned()
    } else {
        format!(
            "reservation {} is not held: it was settled, released or expired, or never existed",
            shown_text(id)
        )
    }
}

/// The sentence of [`GatewayError::ModelNotFound`] for the name `name`.
fn model_not_found_message(name: &str) -> String {
    if name.is_empty() {
        "the model name is empty: name one of the models `GET /v1/models` lists, by its id or an alias"
            .to_owned()
    } else {
        format!(
            "the model `{}` does not exist or you do not have access to it",
            shown_text(name)
        )
    }
}

impl GatewayError {
    /// [`GatewayError::InvalidJson`] for a request body `body` that serde_json
    /// could not read as one object (`error`), saying what the body is: empty,
    /// begun with a byte order mark, a JSON value of another type (`[]`), or
    /// text that is not JSON, with serde_json's account of where it stopped.
    pub fn invalid_json(body: &[u8], error: &serde_json::Error) -> Self {
        let text = body.trim_ascii_start();
        let what = if text.is_empty() {
            "the request body is empty: send one JSON object".to_owned()
        } else if text.starts_with("\u{feff}".as_bytes()) {
            "the request body begins with a byte order mark (U+FEFF): send the JSON object without it"
                .to_owned()
        } else if error.classify() == serde_json::error::Category::Data && text[0] != b'{' {
            format!(
                "the request body is {}, not a JSON object: send one JSON object",
                super::json::kind_of(text)
            )
        } else {
            format!("the request body is not a valid JSON object: {error}")
        };
        GatewayError::InvalidJson(what)
    }

    /// [`GatewayError::ModelNotFound`] for the name `name` sent in `model`.
    pub fn model_not_found(name: &str) -> Self {
        GatewayError::ModelNotFound {
            name: name.to_owned(),
            param: "model".to_owned(),
        }
    }

    /// An invalid request field `param` with `message`.
    pub fn invalid_field(param: impl Into<String>, message: impl Into<String>) -> GatewayError {
        GatewayError::InvalidField {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UnsupportedContentEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::UnreadableBody
            | GatewayError::InvalidJson(_)
            | GatewayError::InvalidField { .. } => StatusCode::BAD_REQUEST,
            GatewayError::MissingApiKey
            | GatewayError::SeveralApiKeys(_)
            | GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::ModelNotFound { .. }
            | GatewayError::UnknownEndpoint { .. }
            | GatewayError::ReservationNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::AlreadySettled { .. } => StatusCode::CONFLICT,
            GatewayError::Blocked(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamRejected { status, .. } => *status,
            GatewayError::UpstreamFailed(_) | GatewayError::UpstreamStatus { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::DatabaseBusy(_) | GatewayError::DatabaseUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type`.
    fn kind(&self) -> &'static str {
        match self {
            GatewayError::Blocked(_) => "insufficient_quota",
            GatewayError::UpstreamFailed(_)
            | GatewayError::UpstreamStatus { .. }
            | GatewayError::UpstreamTimeout
            | GatewayError::DatabaseBusy(_)
            | GatewayError::DatabaseUnavailable(_)
            | GatewayError::Internal(_) => "api_error",
            GatewayError::Forbidden(_) => "permission_error",
            _ => "invalid_request_error",
        }
    }

    /// Stable snake_case code of the error (the OpenAI `code`), which clients and
    /// the metrics match on.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::UnreadableBody => "unreadable_body",
            GatewayError::UnsupportedContentEncoding(_) => "unsupported_content_encoding",
            GatewayError::RequestTimeout { .. } => "request_timeout",
            GatewayError::InvalidJson(_) => "invalid_json",
            GatewayError::InvalidField { .. } => "invalid_value",
            GatewayError::MissingApiKey
            | GatewayError::SeveralApiKeys(_)
            | GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::ModelNotFound { .. } => "model_not_found",
            GatewayError::UnknownEndpoint { .. } => "unknown_url",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::ReservationNotFound(_) => "reservation_not_found",
            GatewayError::AlreadySettled { .. } => "already_settled",
            GatewayError::Blocked(blocked) => blocked.code.as_str(),
            GatewayError::UpstreamRejected { .. } => "upstream_rejected",
            GatewayError::UpstreamFailed(_) | GatewayError::UpstreamStatus { .. } => {
                "upstream_error"
            }
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::DatabaseBusy(_) => "database_busy",
            GatewayError::DatabaseUnavailable(_) => "database_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidField { param, .. } => Some(param),
            GatewayError::ModelNotFound { param, .. } => Some(param),
            _ => None,
        }
    }

    /// The message a caller reads: a sentence, as OpenAI's are, beginning with
    /// a capital and ending with a full stop (or the `?` or `!` it ends with).
    fn public_message(&self) -> String {
        match self {
            GatewayError::Internal(_) => {
                "The gateway failed to handle this request; its operator finds the details in the server log."
                    .to_owned()
            }
            other => {
                let mut message = other.to_string();
                if let Some(first) = message.get(..1) {
                    let upper = first.to_uppercase();
                    message.replace_range(..1, &upper);
                }
                message.truncate(message.trim_end().len());
                if !message.ends_with(['.', '?', '!']) {
                    message.push('.');
                }
                message
            }
        }
    }

    /// The error as the OpenAI body `{"error": {...}}`, JSON text.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: String,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        let body = Body {
            error: Inner {
                message: self.public_message(),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
    }
}

impl From<StoreError> for GatewayError {
    fn from(error: StoreError) -> GatewayError {
        match error {
            StoreError::Busy(detail) => GatewayError::DatabaseBusy(detail),
            StoreError::Unavailable(detail) => GatewayError::DatabaseUnavailable(detail),
            other => GatewayError::Internal(format!("store: {other}")),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        match &self {
            GatewayError::Internal(detail) => {
                tracing::error!(detail = %detail, "gateway request failed");
            }
            GatewayError::DatabaseBusy(detail) => {
                tracing::warn!(detail = %detail, "gateway request refused: the database is busy");
            }
            GatewayError::DatabaseUnavailable(detail) => {
                tracing::error!(detail = %detail, "gateway request refused: the database is out of reach");
            }
            _ => {}
        }
        let status = self.status();
        let body = match &self {
            GatewayError::UpstreamRejected {
                body: Some(body), ..
            } => body.to_vec(),
            _ => self.body(),
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        if let GatewayError::UpstreamRejected { retry, .. }
        | GatewayError::UpstreamStatus { retry, .. } = &self
        {
            for (name, value) in retry {
                headers.insert(name.clone(), value.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(
            self,
            GatewayError::PayloadTooLarge { .. }
                | GatewayError::RequestTimeout { .. }
                | GatewayError::UnreadableBody
        ) {
            // The body was not read to its end, and will not be: the next
            // request on this connection could not be told from its rest
            // (`http::drain`).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, GatewayError::Blocked(_)) {
            // Official SDKs retry a 429 unless told not to; this one cannot succeed
            // until the cycle resets or the operator raises a limit (DESIGN.md §4).
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        match self {
            GatewayError::DatabaseBusy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // Not a lock that ends in a moment: an operator may have to act.
            GatewayError::DatabaseUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::domain::BlockCode;
    use chrono::{TimeZone, Utc};

    fn json(error: &GatewayError) -> serde_json::Value {
        serde_json::from_slice(&error.body()).unwrap()
    }

    #[test]
    fn blocked_is_insufficient_quota_with_its_code() {
        let error = GatewayError::Blocked(Blocked {
            code: BlockCode::ModelLimitReached,
            message: "The limit of GPT-5 is reached.".into(),
            resets_at: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        });
        assert_eq!(error.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            json(&error),
            serde_json::json!({"error": {"message": "The limit of GPT-5 is reached.",
                "type": "insufficient_quota", "param": null, "code": "model_limit_reached"}})
        );
        let response = error.into_response();
        assert_eq!(response.headers()["x-should-retry"], "false");
    }

    #[test]
    fn internal_details_are_not_sent() {
        let error = GatewayError::Internal("secret table name".into());
        let body = String::from_utf8(error.body()).unwrap();
        assert!(!body.contains("secret"), "{body}");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_database_out_of_reach_is_a_503_to_retry_without_its_detail() {
        let error = GatewayError::from(StoreError::Unavailable(
            "error communicating with database: 10.0.0.7:5432 refused".into(),
        ));
        assert_eq!(
            json(&error)["error"]["code"],
            "database_unavailable",
            "{}",
            json(&error)
        );
        let body = String::from_utf8(error.body()).unwrap();
        assert!(!body.contains("10.0.0.7"), "{body}");
        assert!(body.contains("nothing was spent"), "{body}");
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "5");
    }

    #[test]
    fn invalid_fields_name_the_param() {
        let error = GatewayError::invalid_field(
            "max_tokens",
            "`max_tokens` must be a non-negative integer",
        );
        assert_eq!(json(&error)["error"]["param"], "max_tokens");
        assert_eq!(json(&error)["error"]["type"], "invalid_request_error");
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn every_message_is_a_sentence() {
        let message = |error: GatewayError| json(&error)["error"]["message"].clone();
        assert_eq!(
            message(GatewayError::UpstreamTimeout),
            "The model provider did not answer in time."
        );
        assert_eq!(
            message(GatewayError::invalid_field("n", "`n` must be 1 ")),
            "`n` must be 1."
        );
        // A message that ends a sentence already keeps its own ending.
        assert_eq!(
            message(GatewayError::UpstreamStatus {
                status: StatusCode::BAD_GATEWAY,
                retry: Vec::new()
            }),
            "The model provider failed (HTTP 502)."
        );
        assert_eq!(
            message(GatewayError::invalid_field("model", "Which model?")),
            "Which model?"
        );
    }

    #[test]
    fn text_a_caller_sent_is_echoed_on_one_line_and_cut() {
        let message = |error: GatewayError| json(&error)["error"]["message"].clone();
        assert_eq!(
            message(GatewayError::model_not_found("big\u{202e}\nx")),
            "The model `big\\u{202e}\\u{a}x` does not exist or you do not have access to it."
        );
        let long = message(GatewayError::model_not_found(&"m".repeat(5_000)));
        assert!(
            long.as_str()
                .unwrap()
                .contains(&format!("`{}…`", "m".repeat(SHOWN_ID_CHARS))),
            "{long}"
        );
        assert_eq!(
            message(GatewayError::model_not_found("")),
            "The model name is empty: name one of the models `GET /v1/models` lists, by its id or an alias."
        );
        assert_eq!(
            message(GatewayError::ReservationNotFound(String::new())),
            "The reservation id in the path is empty: send the `reservation_id` the admission returned."
        );
        assert_eq!(
            message(GatewayError::UnsupportedContentEncoding(
                "\u{202e}gzip".into()
            )),
            "The request body is sent with `Content-Encoding: \\u{202e}gzip`, which this gateway \
             does not read; send it uncompressed."
        );
        let long = message(GatewayError::UnknownEndpoint {
            method: "GET".into(),
            path: format!("/v1/{}", "z".repeat(5_000)),
        });
        assert!(long.as_str().unwrap().len() < 200, "{long}");
        let long = message(GatewayError::MethodNotAllowed("M".repeat(3_000)));
        assert!(long.as_str().unwrap().len() < 200, "{long}");
        assert_eq!(
            message(GatewayError::ReservationNotFound("\n\u{202e}\0x".into())),
            "Reservation \\u{a}\\u{202e}\\u{0}x is not held: it was settled, released or expired, or never existed."
        );
    }

    #[test]
    fn a_body_that_is_no_object_is_told_what_it_is() {
        let message = |body: &str| {
            let error = crate::gateway::json::RawObject::parse(body.as_bytes()).unwrap_err();
            let error = GatewayError::invalid_json(body.as_bytes(), &error);
            assert_eq!(json(&error)["error"]["code"], "invalid_json");
            json(&error)["error"]["message"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            message(""),
            "The request body is empty: send one JSON object."
        );
        assert_eq!(
            message(" \n"),
            "The request body is empty: send one JSON object."
        );
        assert_eq!(
            message("\u{feff}{}"),
            "The request body begins with a byte order mark (U+FEFF): send the JSON object without it."
        );
        for (body, kind) in [
            ("[]", "an array"),
            ("\n  [1]", "an array"),
            ("\"hi\"", "a string"),
            ("-1", "a number"),
            ("true", "a boolean"),
            ("null", "null"),
        ] {
            assert_eq!(
                message(body),
                format!("The request body is {kind}, not a JSON object: send one JSON object."),
                "{body}"
            );
        }
        assert_eq!(
            message("not json"),
            "The request body is not a valid JSON object: expected ident at line 1 column 2."
        );
        assert!(
            message(r#"{"a": 1, "a": 2}"#).contains("duplicate key \"a\""),
            "a fault inside the object is serde_json's"
        );
        // A repeated key is shown as any caller's text: escaped, and cut.
        let long = format!("\\n\\u202e{}", "K".repeat(5_000));
        let repeated = message(&format!(r#"{{"{long}": 1, "{long}": 2}}"#));
        assert!(
            repeated.contains(&format!(
                "duplicate key \"\\u{{a}}\\u{{202e}}{}…\"",
                "K".repeat(62)
            )),
            "{repeated}"
        );
    }
}
