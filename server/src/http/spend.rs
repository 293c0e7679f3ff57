//! `GET /api/v1/spend` (DESIGN.md §4): the Token Limits tab as JSON for dashboards
//! and scripts, for administrators' API keys. EUR amounts are exact decimal strings,
//! instants RFC 3339 UTC, every catalog model listed in R8 order.

use app::{auth::Role, report::SpendReport};
use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use chrono::Utc;

use super::AppState;
use crate::gateway::caller::authenticate;

/// Answer the spend report of the current cycle to an administrator's key.
///
/// Errors: 401 without a valid key, 403 for a member's key (OpenAI-shaped bodies),
/// 500 when the database fails.
pub async fn spend(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&state.gateway, &headers).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if caller.user.role != Role::Admin {
        return error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "forbidden",
            "only administrators' API keys can read the workspace's spend",
        );
    }
    match state.store.spend_snapshot(Utc::now()).await {
        Ok(snapshot) => Json(SpendReport::build(&snapshot)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not read the spend");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "the spend could not be read",
            )
        }
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, Json(body)).into_response()
}
