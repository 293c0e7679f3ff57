//! `GET /api/v1/spend` (DESIGN.md §4): the Token Limits tab as JSON for dashboards
//! and scripts, for administrators' API keys. EUR amounts are exact decimal strings,
//! instants RFC 3339 UTC, every catalog model listed in R8 order.

use app::{auth::Role, report::SpendReport};
use axum::{
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Json,
};
use chrono::Utc;

use super::AppState;
use crate::gateway::{caller::authenticate, error::GatewayError};

/// Answer the spend report of the current cycle to an administrator's key.
///
/// Errors (OpenAI-shaped bodies): 401 without a valid key, 403 `forbidden` for
/// a member's key, 503 `database_busy` / `database_unavailable` when the
/// database cannot answer, 500 when it fails otherwise.
pub async fn spend(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&state.gateway, &headers).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if caller.user.role != Role::Admin {
        return GatewayError::Forbidden("read the workspace's spend").into_response();
    }
    match state.store.spend_snapshot(Utc::now()).await {
        Ok(snapshot) => Json(SpendReport::build(&snapshot)).into_response(),
        Err(e) => GatewayError::from(e).into_response(),
    }
}
