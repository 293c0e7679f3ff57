//! The one error type of the server functions: a stable snake_case `code` the UI
//! matches on (never the message), a sentence for a person, and the HTTP status
//! each variant is answered with.

use serde::{Deserialize, Serialize};
use server_fn::{
    codec::JsonEncoding,
    error::{FromServerFnError, ServerFnErrorErr},
};

/// Seconds between two sign-in attempts from one address once its burst of 10
/// is spent (the server's limiter): the longest wait a refusal names.
pub const SIGN_IN_INTERVAL_SECONDS: u64 = 6;

/// A form field's error, shown next to the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Which field (e.g. the model id of a limit row, or `email`).
    pub field: String,
    /// Stable code (e.g. `ambiguous_separator`).
    pub code: String,
    /// A sentence for a person.
    pub message: String,
}

impl FieldError {
    /// The error `code` of `field` with the fixed sentence of its code, one that
    /// repeats nothing the form held: what the page shows for an error read from
    /// its URL (see [`ApiError::with_fixed_text`]), and the server's own text for
    /// the codes whose sentence never depends on the input. An unknown code gets
    /// a general sentence.
    pub fn fixed(field: impl Into<String>, code: &str) -> FieldError {
        use crate::domain::euro_input::EuroInputError;
        let message = if let Some(error) = EuroInputError::of_code(code) {
            error.message()
        } else {
            match code {
                "negative_limit" => EuroInputError::Negative.message(),
                "ambiguous_separator" => {
                    "This amount is ambiguous: a lone point or comma before three \
                     digits could group thousands or mark decimals. Write it with \
                     its cents, for example 1500.00 or 1500,00."
                        .to_owned()
                }
                "enabled_without_amount" => {
                    "Enter a limit in euros before enabling it, or leave it \
                     off to use the shared pool."
                        .to_owned()
                }
                "invalid_version" => "This form was not sent as the page made it: reload \
                                      the page and make the change again."
                    .to_owned(),
                "invalid_enabled" => "This form was not sent as the page made it (a toggle \
                                      is neither on nor off): reload the page and make the \
                                      change again."
                    .to_owned(),
                "missing_model" => "Each limit row must name a model of the catalog.".to_owned(),
                "unknown_model" => "This is not a model of the catalog.".to_owned(),
                "duplicate_model" => {
                    "This model is named twice: give each model one limit per save.".to_owned()
                }
                "conflict" => "Changed by someone else since this page showed it: load \
                               the current values to see it."
                    .to_owned(),
                "too_many_rows" => {
                    "This save has more rows than the catalog has models.".to_owned()
                }
                _ => "This value was refused.".to_owned(),
            }
        };
        FieldError {
            field: field.into(),
            code: code.to_owned(),
            message,
        }
    }
}

/// The sentence of every conflict (409), the same with and without
/// JavaScript: the server's, and the one an error read from the page's URL
/// gets ([`ApiError::with_fixed_text`]).
pub const CONFLICT_MESSAGE: &str = "Nothing was saved: these settings were changed since this \
    page showed them (by another administrator, in another tab or with the CLI). Load the \
    current values, then make your change again.";

/// Errors of server functions.
///
/// On the wire, every error is one JSON object with its `code` and a `message`
/// for a person, plus `seconds` (`rate_limited`) or `fields` (`invalid`):
/// `{"code": "forbidden", "message": "Only administrators can see and change
/// token limits."}`. Written by [`ApiError`]'s `Serialize`, read back by the
/// derived `Deserialize`, which ignores the message of a variant that carries
/// none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum ApiError {
    /// Not signed in (401; pages redirect to the login).
    #[error("Sign in to continue.")]
    Unauthorized,
    /// Signed in without the administrator role (403).
    #[error("Only administrators can see and change token limits.")]
    Forbidden,
    /// Wrong email or password (401); says nothing about which.
    #[error("The email or password is not correct.")]
    InvalidCredentials,
    /// Too many sign-in attempts (429); the next is allowed in `seconds`, at
    /// most [`SIGN_IN_INTERVAL_SECONDS`].
    #[error("Too many attempts: try again in {seconds} s.")]
    RateLimited {
        /// Whole seconds until the next attempt is allowed.
        seconds: u64,
    },
    /// Input refused (422); nothing was saved. `fields` says which and why.
    #[error("{message}")]
    Invalid {
        /// A sentence for the whole form.
        message: String,
        /// Per-field errors.
        fields: Vec<FieldError>,
    },
    /// Someone else saved first (409); nothing was saved.
    #[error("{message}")]
    Conflict {
        /// What to do about it: [`CONFLICT_MESSAGE`] from the server.
        message: String,
        /// The limit row changed meanwhile, by model id, with the code
        /// `conflict`; none when it was the settings. Absent on the wire
        /// before this field existed, so it defaults to none.
        #[serde(default)]
        fields: Vec<FieldError>,
    },
    /// Another program kept the database busy past the server's wait (503);
    /// nothing was changed, and the same request may succeed a moment later.
    #[error("The database is busy with another program's write; nothing was changed. Try again in a moment.")]
    Unavailable,
    /// The server cannot reach its database, or the database cannot write (a
    /// PostgreSQL server down, a full disk), 503; nothing was changed, and the
    /// same request may succeed once an operator has it working again.
    #[error("The server cannot reach or write to its database just now; nothing was changed. Try again later.")]
    DatabaseUnavailable,
    /// Something failed on the server (500); the detail is in the server log.
    #[error("Something went wrong on the server; nothing was changed.")]
    Internal,
    /// The call's arguments could not be read (400): a field missing, of the
    /// wrong type, or a body that is not UTF-8. Nothing ran, so nothing changed;
    /// `message` names what is wrong.
    #[error("{message}")]
    BadRequest {
        /// What is wrong with the arguments, naming the field at fault.
        message: String,
    },
    /// The request could not be carried or its answer read (a network failure,
    /// an answer that is not JSON); from the server-function layer, on the side
    /// that found it.
    #[error("The request could not be processed: {message}")]
    Transport {
        /// What went wrong.
        message: String,
    },
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Unauthorized | ApiError::InvalidCredentials => 401,
            ApiError::Forbidden => 403,
            ApiError::RateLimited { .. } => 429,
            ApiError::Invalid { .. } => 422,
            ApiError::Conflict { .. } => 409,
            ApiError::Unavailable | ApiError::DatabaseUnavailable => 503,
            ApiError::Internal => 500,
            ApiError::BadRequest { .. } | ApiError::Transport { .. } => 400,
        }
    }

    /// The stable code (`unauthorized`, `forbidden`, `invalid`, `conflict`...).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Invalid { .. } => "invalid",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Unavailable => "unavailable",
            ApiError::DatabaseUnavailable => "database_unavailable",
            ApiError::Internal => "internal",
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Transport { .. } => "transport",
        }
    }

    /// This error with a fixed sentence for each code in place of the sentences
    /// it carries: for an error read from the page's URL, where a form posted
    /// without JavaScript gets its answer back (`__err`) and where anyone can
    /// write a link with any text. Codes and field names (they only pick the row
    /// an error is shown on) are kept, and a sign-in's wait up to the longest
    /// the server asks ([`SIGN_IN_INTERVAL_SECONDS`]).
    pub fn with_fixed_text(self) -> ApiError {
        match self {
            ApiError::RateLimited { seconds } => ApiError::RateLimited {
                seconds: seconds.min(SIGN_IN_INTERVAL_SECONDS),
            },
            ApiError::Invalid { fields, .. } => ApiError::Invalid {
                message: "Nothing was saved: correct the marked fields, or reload the page \
                          and make the change again."
                    .into(),
                fields: fields
                    .into_iter()
                    .map(|f| FieldError::fixed(f.field, &f.code))
                    .collect(),
            },
            ApiError::Conflict { fields, .. } => ApiError::Conflict {
                message: CONFLICT_MESSAGE.into(),
                fields: fields
                    .into_iter()
                    .map(|f| FieldError::fixed(f.field, "conflict"))
                    .collect(),
            },
            ApiError::BadRequest { .. } => ApiError::BadRequest {
                message: "The form could not be read; nothing was changed.".into(),
            },
            ApiError::Transport { .. } => ApiError::Transport {
                message: "the answer could not be read".into(),
            },
            // The others' sentences are their variant's own.
            other => other,
        }
    }

    /// The error of one field: refused (`invalid`), or changed by someone else
    /// meanwhile (`conflict`).
    pub fn field(&self, field: &str) -> Option<&FieldError> {
        match self {
            ApiError::Invalid { fields, .. } | ApiError::Conflict { fields, .. } => {
                fields.iter().find(|f| f.field == field)
            }
            _ => None,
        }
    }
}

impl Serialize for ApiError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("code", self.code())?;
        match self {
            // Their message is their own field: written as it is, so that it
            // reads back unchanged.
            ApiError::Invalid { message, .. }
            | ApiError::Conflict { message, .. }
            | ApiError::BadRequest { message }
            | ApiError::Transport { message } => map.serialize_entry("message", message)?,
            other => map.serialize_entry("message", &other.to_string())?,
        }
        match self {
            ApiError::RateLimited { seconds } => map.serialize_entry("seconds", seconds)?,
            ApiError::Invalid { fields, .. } | ApiError::Conflict { fields, .. } => {
                map.serialize_entry("fields", fields)?
            }
            _ => {}
        }
        map.end()
    }
}

impl FromServerFnError for ApiError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        match value {
            // The server decodes only a call's arguments, but some of server_fn's
            // codecs report that failure with the client's wording ("results").
            #[cfg(feature = "ssr")]
            ServerFnErrorErr::Args(detail) | ServerFnErrorErr::Deserialization(detail) => {
                ApiError::bad_arguments(&detail)
            }
            #[cfg(feature = "ssr")]
            ServerFnErrorErr::MissingArg(name) => {
                ApiError::bad_arguments(&format!("missing field `{name}`"))
            }
            // The browser could not carry the call (the server stopped, the
            // network down): fetch's own words ("TypeError: Failed to fetch")
            // tell an administrator nothing. The call may have been carried and
            // its answer lost, so the sentence does not say nothing was saved.
            ServerFnErrorErr::Request(_) => ApiError::Transport {
                message: "the server could not be reached. Check the connection and try \
                          again; reload the page to see what was saved."
                    .into(),
            },
            // In the browser: an answer that is not the server's JSON (a proxy's
            // error page, say).
            #[cfg(not(feature = "ssr"))]
            ServerFnErrorErr::Deserialization(_) => ApiError::Transport {
                message: "the server's answer could not be read. Reload the page to see \
                          what was saved."
                    .into(),
            },
            other => ApiError::Transport {
                message: other.to_string(),
            },
        }
    }
}

#[cfg(feature = "ssr")]
impl ApiError {
    /// [`ApiError::BadRequest`] for arguments the server could not decode, as
    /// serde described the fault (`missing field `password``).
    pub fn bad_arguments(detail: &str) -> ApiError {
        ApiError::BadRequest {
            message: format!("The call's arguments are not valid ({detail}); nothing was changed."),
        }
    }

    /// Where a form posted without JavaScript to the server function at `path` is
    /// sent back with this error: `referer` (the page it was posted from) with
    /// the function's path and the error in its query (`__path`, `__err`), as
    /// server_fn sends back the functions' own errors, which the page reads
    /// ([`crate::ui`]). `None` when `referer` is not an absolute URL.
    pub fn back_to_form(&self, path: &str, referer: &str) -> Option<String> {
        server_fn::error::ServerFnUrlError::new(path, self.clone())
            .to_url(referer)
            .ok()
            .map(String::from)
    }

    /// `encoded`, an error as server_fn writes it into a page's address
    /// (`__err`), written again with a fixed sentence for each code
    /// ([`ApiError::with_fixed_text`]): the page shows only those, and what
    /// was typed (an amount quoted in a message) must not go into the
    /// browser's history or a proxy's log.
    pub fn fixed_in_address(encoded: &str) -> Option<String> {
        use server_fn::error::ServerFnUrlError;
        let fixed = ServerFnUrlError::<ApiError>::decode_err(encoded).with_fixed_text();
        let url = ServerFnUrlError::new("", fixed)
            .to_url("http://panel.invalid/")
            .ok()?;
        url.query_pairs()
            .find(|(name, _)| name == "__err")
            .map(|(_, value)| value.into_owned())
    }

    /// A failure of the session store as callers are answered:
    /// [`ApiError::Unavailable`] (503) when another program held the database's
    /// write lock past the wait, so that a sign-in or sign-out under a long
    /// SQLite lock can be tried again; [`ApiError::DatabaseUnavailable`] (503)
    /// when the database could not be reached; else [`ApiError::Internal`]. The
    /// store (tower-sessions' sqlx store) reports its database's error as text
    /// only: SQLite's `SQLITE_BUSY` and `SQLITE_LOCKED` say "database is locked"
    /// and "database table is locked"; sqlx says "error communicating with
    /// database" for a connection that failed and "pool timed out" when none
    /// could be had.
    pub fn from_session_store(e: &tower_sessions::session::Error) -> ApiError {
        let text = e.to_string();
        if text.contains("is locked") {
            ApiError::Unavailable
        } else if text.contains("error communicating with database")
            || text.contains("pool timed out")
        {
            ApiError::DatabaseUnavailable
        } else {
            ApiError::Internal
        }
    }
}

#[cfg(feature = "ssr")]
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Conflict { what, .. } => ApiError::Conflict {
                message: CONFLICT_MESSAGE.into(),
                fields: if what == crate::store::SETTINGS {
                    Vec::new()
                } else {
                    vec![FieldError::fixed(what, "conflict")]
                },
            },
            StoreError::Invalid { code, message } => ApiError::Invalid {
                message: message.clone(),
                fields: vec![FieldError {
                    field: String::new(),
                    code: code.into(),
                    message,
                }],
            },
            StoreError::Busy(_) => ApiError::Unavailable,
            StoreError::Unavailable(_) => ApiError::DatabaseUnavailable,
            StoreError::NotFound { .. } | StoreError::Database(_) => {
                // Already logged where it happened; the browser learns nothing internal.
                ApiError::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_written_with_its_code_and_message_and_reads_back() {
        let errors = [
            ApiError::Unauthorized,
            ApiError::Forbidden,
            ApiError::InvalidCredentials,
            ApiError::RateLimited { seconds: 7 },
            ApiError::Invalid {
                message: "Nothing was saved.".into(),
                fields: vec![FieldError {
                    field: "gpt-5".into(),
                    code: "negative".into(),
                    message: "A limit cannot be negative.".into(),
                }],
            },
            ApiError::Conflict {
                message: "Reload.".into(),
                fields: vec![FieldError::fixed("gpt-5", "conflict")],
            },
            ApiError::Unavailable,
            ApiError::DatabaseUnavailable,
            ApiError::Internal,
            ApiError::BadRequest {
                message: "missing field `password`".into(),
            },
            ApiError::Transport {
                message: "bad body".into(),
            },
        ];
        for error in errors {
            let json = serde_json::to_value(&error).unwrap();
            assert_eq!(json["code"], error.code(), "{json}");
            let message = json["message"].as_str().unwrap();
            assert!(!message.is_empty(), "{json}");
            assert_eq!(
                serde_json::from_value::<ApiError>(json.clone()).unwrap(),
                error,
                "{json}"
            );
        }
        assert_eq!(
            serde_json::to_value(ApiError::Forbidden).unwrap(),
            serde_json::json!({"code": "forbidden",
                "message": "Only administrators can see and change token limits."})
        );
    }

    #[test]
    fn a_call_the_browser_could_not_carry_is_told_in_the_panels_words() {
        let error = ApiError::from_server_fn_error(ServerFnErrorErr::Request(
            "TypeError: Failed to fetch".into(),
        ));
        assert_eq!(error.code(), "transport");
        let sentence = error.to_string();
        assert!(sentence.contains("could not be reached"), "{sentence}");
        assert!(!sentence.contains("TypeError"), "{sentence}");
        assert!(!sentence.contains("server function"), "{sentence}");
    }

    #[cfg(feature = "ssr")]
    #[test]
    fn a_busy_or_unreachable_database_is_a_503_to_try_again_not_a_500() {
        use crate::store::StoreError;
        let busy = ApiError::from(StoreError::Busy("database is locked".into()));
        assert_eq!((busy.status(), busy.code()), (503, "unavailable"));
        assert!(busy.to_string().contains("nothing was changed"), "{busy}");
        let unreachable = ApiError::from(StoreError::Unavailable("connection refused".into()));
        assert_eq!(
            (unreachable.status(), unreachable.code()),
            (503, "database_unavailable")
        );
        assert!(
            unreachable.to_string().contains("nothing was changed"),
            "{unreachable}"
        );
        let failed = ApiError::from(StoreError::Database("no such column".into()));
        assert_eq!(failed.status(), 500);
    }

    #[test]
    fn an_error_read_from_a_url_shows_only_its_codes_sentences() {
        const FORGED: &str = "Your session expired: sign in again at https://evil.example";
        let forged = |code: &str| FieldError {
            field: "gpt-5".into(),
            code: code.into(),
            message: FORGED.into(),
        };
        let codes = [
            "empty",
            "not_a_number",
            "negative",
            "negative_limit",
            "ambiguous_separator",
            "too_many_decimals",
            "too_large",
            "misplaced_separator",
            "enabled_without_amount",
            "invalid_version",
            "invalid_enabled",
            "missing_model",
            "unknown_model",
            "duplicate_model",
            "too_many_rows",
            "made_up",
        ];
        let fixed = ApiError::Invalid {
            message: FORGED.into(),
            fields: codes.iter().map(|code| forged(code)).collect(),
        }
        .with_fixed_text();
        let ApiError::Invalid { message, fields } = &fixed else {
            panic!("{fixed:?}")
        };
        assert!(message.starts_with("Nothing was saved"), "{message}");
        for (field, code) in fields.iter().zip(codes) {
            assert_eq!((field.field.as_str(), field.code.as_str()), ("gpt-5", code));
            assert!(!field.message.contains("evil"), "{field:?}");
        }
        // Each code the server sends has a sentence of its own; an unknown code
        // the general one.
        let general = FieldError::fixed("x", "made_up").message;
        for field in &fields[..fields.len() - 1] {
            assert_ne!(field.message, general, "{field:?}");
        }
        for error in [
            ApiError::Conflict {
                message: FORGED.into(),
                fields: vec![FieldError {
                    field: "gpt-5".into(),
                    code: "conflict".into(),
                    message: FORGED.into(),
                }],
            },
            ApiError::BadRequest {
                message: FORGED.into(),
            },
            ApiError::Transport {
                message: FORGED.into(),
            },
        ] {
            let code = error.code();
            let fixed = error.with_fixed_text();
            assert_eq!(fixed.code(), code);
            assert!(!fixed.to_string().contains("evil"), "{fixed}");
        }
        let limited = ApiError::RateLimited { seconds: 5 };
        assert_eq!(limited.clone().with_fixed_text(), limited);
        // A link cannot make the page name a longer wait than the server asks.
        assert_eq!(
            ApiError::RateLimited { seconds: 99_999 }.with_fixed_text(),
            ApiError::RateLimited {
                seconds: SIGN_IN_INTERVAL_SECONDS
            }
        );
    }

    /// A conflict reads the same with and without JavaScript, and names the
    /// limit row changed meanwhile; a conflict on the settings names no row.
    #[cfg(feature = "ssr")]
    #[test]
    fn a_conflict_names_the_row_changed_meanwhile_in_one_sentence_everywhere() {
        use crate::store::{StoreError, SETTINGS};
        let conflict = |what: &str| {
            ApiError::from(StoreError::Conflict {
                what: what.into(),
                current_version: 3,
            })
        };
        let row = conflict("gpt-5");
        assert_eq!(row.status(), 409);
        assert_eq!(row.to_string(), CONFLICT_MESSAGE);
        assert_eq!(
            row.field("gpt-5").map(|f| f.code.as_str()),
            Some("conflict")
        );
        assert_eq!(row.field("gpt-4o"), None);
        assert_eq!(row.clone().with_fixed_text(), row);
        assert_eq!(
            conflict(SETTINGS),
            ApiError::Conflict {
                message: CONFLICT_MESSAGE.into(),
                fields: Vec::new(),
            }
        );
        // An answer of a server from before the field: no row named.
        let old: ApiError =
            serde_json::from_str(r#"{"code":"conflict","message":"Reload."}"#).unwrap();
        assert_eq!(old.field("gpt-5"), None);
    }
}
