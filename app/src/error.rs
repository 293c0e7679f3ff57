//! The one error type of the server functions: a stable snake_case `code` the UI
//! matches on (never the message), a sentence for a person, and the HTTP status
//! each variant is answered with.

use serde::{Deserialize, Serialize};
use server_fn::{
    codec::JsonEncoding,
    error::{FromServerFnError, ServerFnErrorErr},
};

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

/// Errors of server functions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
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
    /// Too many sign-in attempts (429); the next is allowed in `seconds`.
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
        /// What to do about it.
        message: String,
    },
    /// Something failed on the server (500); the detail is in the server log.
    #[error("Something went wrong on the server; nothing was changed.")]
    Internal,
    /// The request could not be carried or decoded (a malformed body, a network
    /// failure); from the server-function layer (400 when the server answers it).
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
            ApiError::Internal => 500,
            ApiError::Transport { .. } => 400,
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
            ApiError::Internal => "internal",
            ApiError::Transport { .. } => "transport",
        }
    }

    /// The error of one field.
    pub fn field(&self, field: &str) -> Option<&FieldError> {
        match self {
            ApiError::Invalid { fields, .. } => fields.iter().find(|f| f.field == field),
            _ => None,
        }
    }
}

impl FromServerFnError for ApiError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        ApiError::Transport {
            message: value.to_string(),
        }
    }
}

#[cfg(feature = "ssr")]
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Conflict { .. } => ApiError::Conflict {
                message: "Another administrator changed these settings while you were editing. \
                          Reload the page to see the current values, then make your change again."
                    .into(),
            },
            StoreError::Invalid { code, message } => ApiError::Invalid {
                message: message.clone(),
                fields: vec![FieldError {
                    field: String::new(),
                    code: code.into(),
                    message,
                }],
            },
            StoreError::NotFound { .. } | StoreError::Database(_) => {
                // Already logged where it happened; the browser learns nothing internal.
                ApiError::Internal
            }
        }
    }
}
