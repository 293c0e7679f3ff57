//! Who calls the gateway and the usage API: the owner of the API key sent as
//! `Authorization: Bearer <key>` (DESIGN.md §4). Keys are looked up by their hash
//! (`crate::auth::hash_api_key`); the key itself is never logged.
//!
//! The routes that spend (chat completions, usage-API admissions) remember a key
//! found live for [`REMEMBER_FOR`] instead of reading it for every request: their
//! admission checks the key again, in the store's atomic step, so a revoked key
//! still spends nothing from the moment its revocation commits. Every other route
//! reads the key each time.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use app::store::{ApiKeyRecord, Spender, UserRecord};
use axum::http::{header, HeaderMap};
use chrono::Utc;

use super::{error::GatewayError, Gateway};

/// An authenticated caller: the live API key and its owner.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's record (never the key).
    pub key: ApiKeyRecord,
    /// The key's owner.
    pub user: UserRecord,
}

impl Caller {
    /// The spender recorded on reservations and ledger rows (DESIGN.md §6).
    pub fn spender(&self) -> Spender {
        Spender {
            user_id: Some(self.user.id),
            api_key_id: Some(self.key.id),
        }
    }
}

/// The bearer token of `headers`, if the request sent one.
///
/// Errors: [`GatewayError::MissingApiKey`] without an `Authorization: Bearer`
/// header, [`GatewayError::SeveralApiKeys`] with more than one `Authorization`
/// header, [`GatewayError::InvalidApiKey`] when it is not readable text.
fn bearer(headers: &HeaderMap) -> Result<&str, GatewayError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(GatewayError::MissingApiKey)?;
    let more = values.count();
    if more > 0 {
        return Err(GatewayError::SeveralApiKeys(more + 1));
    }
    let text = value.to_str().map_err(|_| GatewayError::InvalidApiKey)?;
    let (scheme, token) = text.split_once(' ').ok_or(GatewayError::MissingApiKey)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(GatewayError::MissingApiKey);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(GatewayError::MissingApiKey);
    }
    Ok(token)
}

/// Authenticates the request's API key against the store, marking it used.
///
/// Errors: [`GatewayError::MissingApiKey`], [`GatewayError::InvalidApiKey`] for an
/// unknown or revoked key (HTTP 401), [`GatewayError::Internal`] when the store fails.
pub async fn authenticate(gateway: &Gateway, headers: &HeaderMap) -> Result<Caller, GatewayError> {
    look_up(gateway, &crate::auth::hash_api_key(bearer(headers)?)).await
}

/// The live key whose hash is `hash`, with its owner, read from the store (which
/// marks it used).
async fn look_up(gateway: &Gateway, hash: &str) -> Result<Caller, GatewayError> {
    match gateway.store.authenticate_api_key(hash, Utc::now()).await? {
        Some((key, user)) => Ok(Caller { key, user }),
        None => Err(GatewayError::InvalidApiKey),
    }
}

/// How long a key found live is taken on trust by the routes that spend, before
/// it is read again (which also keeps its "last used" time to the minute).
pub const REMEMBER_FOR: Duration = Duration::from_secs(30);
/// Most keys remembered at once; past it, the oldest are forgotten.
const REMEMBERED_KEYS: usize = 10_000;

/// Callers of the routes that spend, by key hash, with when they were read.
#[derive(Debug, Default)]
pub struct CallerCache {
    callers: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl CallerCache {
    fn get(&self, hash: &str) -> Option<Caller> {
        let callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        callers
            .get(hash)
            .filter(|(_, read)| read.elapsed() < REMEMBER_FOR)
            .map(|(caller, _)| caller.clone())
    }

    fn remember(&self, hash: String, caller: Caller) {
        let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        if callers.len() >= REMEMBERED_KEYS {
            callers.retain(|_, (_, read)| read.elapsed() < REMEMBER_FOR);
            if callers.len() >= REMEMBERED_KEYS {
                callers.clear();
            }
        }
        callers.insert(hash, (caller, Instant::now()));
    }

    /// Forget the key `id`, found revoked.
    pub fn forget(&self, id: i64) {
        let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        callers.retain(|_, (caller, _)| caller.key.id != id);
    }
}

/// [`authenticate`] for a route whose every spend is admitted by the store, which
/// checks the key again (see the module doc): a key found live less than
/// [`REMEMBER_FOR`] ago is not read again.
///
/// Errors: as [`authenticate`].
pub async fn authenticate_to_spend(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Caller, GatewayError> {
    let hash = crate::auth::hash_api_key(bearer(headers)?);
    if let Some(caller) = gateway.callers.get(&hash) {
        return Ok(caller);
    }
    let caller = look_up(gateway, &hash).await?;
    gateway.callers.remember(hash, caller.clone());
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn reads_bearer_tokens_only() {
        assert_eq!(bearer(&headers("Bearer tg_abc")).unwrap(), "tg_abc");
        assert_eq!(bearer(&headers("bearer  tg_abc ")).unwrap(), "tg_abc");
        assert!(matches!(
            bearer(&headers("Basic dXNlcjpwYXNz")),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            bearer(&headers("Bearer ")),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            bearer(&HeaderMap::new()),
            Err(GatewayError::MissingApiKey)
        ));
        let mut two = headers("Bearer tg_abc");
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tg_def"),
        );
        assert!(matches!(bearer(&two), Err(GatewayError::SeveralApiKeys(2))));
    }
}
