//! Who calls the gateway and the usage API: the owner of the API key sent as
//! `Authorization: Bearer <key>` (DESIGN.md §4). Keys are looked up by their hash
//! (`crate::auth::hash_api_key`); the key itself is never logged.

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
/// header, [`GatewayError::InvalidApiKey`] when it is not readable text.
fn bearer(headers: &HeaderMap) -> Result<&str, GatewayError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(GatewayError::MissingApiKey)?;
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
    let key = bearer(headers)?;
    let hash = crate::auth::hash_api_key(key);
    match gateway
        .store
        .authenticate_api_key(&hash, Utc::now())
        .await?
    {
        Some((key, user)) => Ok(Caller { key, user }),
        None => Err(GatewayError::InvalidApiKey),
    }
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
    }
}
