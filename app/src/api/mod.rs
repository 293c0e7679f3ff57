//! Server functions and the views they return. Each body is a few lines: check who
//! is calling, call the store or a service, map the result (STYLE.md). Every
//! endpoint is named and lives under `/fn/`, where the server's middleware
//! authenticates the session before any of them runs.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{auth::CurrentUser, error::ApiError, report::TabView};

/// One row of the Model limits form as submitted (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitInput {
    /// The model's id.
    pub model: String,
    /// The Limit field as typed (EUR; empty = shared pool). Required: a form
    /// sends its text fields even when empty, so a row without one is a
    /// hand-made call, refused (400 `bad_request` naming the field) rather than
    /// read as clearing the limit.
    pub limit: String,
    /// The Enabled toggle: on when sent as an HTML checkbox sends it (`on`; a
    /// script may send `true`), off when absent, empty, `off` or `false`. Any
    /// other value refuses the save (`invalid_enabled`) rather than be read as on.
    #[serde(default)]
    pub enabled: Option<String>,
    /// The limit's version when the form was loaded: a whole number as the page
    /// wrote it (0: no limit saved yet). Text that is not one refuses the save
    /// (`invalid_version`). Required, as `limit` is: the page always writes it,
    /// so a row without one is a hand-made call (400 `bad_request`), not a
    /// change made on a stale page.
    pub version: String,
}

/// A checkbox's value as a form sends it: on (`Some(true)`) for `on` (a
/// script may send `true`), off when absent, empty, `off` or `false`; `None`
/// for any other value, which a save refuses (`invalid_enabled`) rather than
/// read as on.
pub fn checkbox_state(value: Option<&str>) -> Option<bool> {
    match value.map(str::trim) {
        None | Some("" | "off" | "false") => Some(false),
        Some("on" | "true") => Some(true),
        Some(_) => None,
    }
}

/// The signed-in user, or `None`.
#[server(prefix = "/fn", endpoint = "me")]
pub async fn me() -> Result<Option<CurrentUser>, ApiError> {
    Ok(crate::auth::current_user().await)
}

/// Sign in with email and password, then go to `next` when the user may open
/// it, or to their start page ([`crate::auth::landing`]).
#[server(prefix = "/fn", endpoint = "login")]
pub async fn login(email: String, password: String, next: Option<String>) -> Result<(), ApiError> {
    server::login(email, password, next).await
}

/// Sign out and go to the login page.
#[server(prefix = "/fn", endpoint = "logout")]
pub async fn logout() -> Result<(), ApiError> {
    server::logout().await
}

/// The Token Limits tab's numbers for the current cycle (administrators only).
#[server(prefix = "/fn", endpoint = "token_limits")]
pub async fn token_limits() -> Result<TabView, ApiError> {
    let admin = crate::auth::require_admin().await?;
    server::token_limits(&admin).await
}

/// Save the automatic fallback toggle, based on `settings_version` (administrators
/// only). `automatic_fallback` is read as a checkbox sends it: on for `on` (a
/// script may send `true`), off when absent, empty, `off` or `false`; any other
/// value refuses the save (`invalid_enabled`) rather than be read as on.
#[server(prefix = "/fn", endpoint = "save_automatic_fallback")]
pub async fn save_automatic_fallback(
    automatic_fallback: Option<String>,
    settings_version: String,
) -> Result<(), ApiError> {
    let admin = crate::auth::require_admin().await?;
    server::save_automatic_fallback(&admin, automatic_fallback.as_deref(), &settings_version).await
}

/// Save every model limit of the form, all or nothing (administrators only).
#[server(prefix = "/fn", endpoint = "save_model_limits")]
pub async fn save_model_limits(rows: Vec<LimitInput>) -> Result<(), ApiError> {
    let admin = crate::auth::require_admin().await?;
    server::save_model_limits(&admin, rows).await
}

#[cfg(feature = "ssr")]
mod server {
    use std::sync::Arc;

    use chrono::Utc;
    use leptos::{prelude::expect_context, server_fn::ServerFn};

    use super::LimitInput;
    use crate::{
        auth::{set_status, Admin, SESSION_EPOCH, SESSION_USER_ID},
        domain::{parse_eur_input, Catalog, ModelLimit},
        error::{ApiError, FieldError},
        report::{SpendReport, TabView},
        store::{Actor, LimitChange, SharedStore},
    };

    /// A failure of the session store as the caller is answered (and logged):
    /// see [`ApiError::from_session_store`].
    fn session_failed(e: tower_sessions::session::Error) -> ApiError {
        let error = ApiError::from_session_store(&e);
        leptos::logging::error!("session store: {e}");
        set_status(&error);
        error
    }

    fn fail<T>(e: ApiError) -> Result<T, ApiError> {
        set_status(&e);
        Err(e)
    }

    pub async fn login(
        email: String,
        password: String,
        next: Option<String>,
    ) -> Result<(), ApiError> {
        let store = expect_context::<SharedStore>();
        let session: tower_sessions::Session = leptos_axum::extract()
            .await
            .map_err(|_| ApiError::Internal)?;
        let user = match store.user_by_email(email.trim()).await {
            Ok(user) => user,
            Err(e) => return fail(e.into()),
        };
        // Verify against a dummy hash for unknown emails so both take as long.
        let hash = user
            .as_ref()
            .map(|u| u.password_hash.as_str())
            .unwrap_or(crate::auth::dummy_password_hash());
        let verified = crate::auth::verify_password(&password, hash);
        let Some(user) = user.filter(|_| verified) else {
            return fail(ApiError::InvalidCredentials);
        };
        // A new session id at sign-in defeats session fixation.
        session.cycle_id().await.map_err(session_failed)?;
        session
            .insert(SESSION_USER_ID, user.id)
            .await
            .map_err(session_failed)?;
        session
            .insert(SESSION_EPOCH, user.session_epoch)
            .await
            .map_err(session_failed)?;
        // Stored here rather than by the session layer after the answer, which
        // would turn a failure into a bare 500 (it does not store again for an
        // answer that is an error).
        if let Err(e) = session.save().await {
            // Nothing of this sign-in is kept: the layer stores no empty session.
            session.clear().await;
            return Err(session_failed(e));
        }
        leptos_axum::redirect(&crate::auth::landing(next.as_deref(), user.role));
        Ok(())
    }

    pub async fn logout() -> Result<(), ApiError> {
        let session: tower_sessions::Session = leptos_axum::extract()
            .await
            .map_err(|_| ApiError::Internal)?;
        session.flush().await.map_err(session_failed)?;
        leptos_axum::redirect("/login");
        Ok(())
    }

    pub async fn token_limits(_admin: &Admin) -> Result<TabView, ApiError> {
        let store = expect_context::<SharedStore>();
        match store.spend_snapshot(Utc::now()).await {
            Ok(snapshot) => {
                let mut view = TabView::from(&SpendReport::build(&snapshot));
                view.refused_limits = take_refused_limits().await;
                view.saved_form = take_saved().await;
                Ok(view)
            }
            Err(e) => fail(e.into()),
        }
    }

    /// Session key of the rows of a Model limits form refused without
    /// JavaScript ([`keep_refused_limits`]).
    const REFUSED_LIMITS: &str = "refused_limits";

    /// Session key of the server function whose form was saved without
    /// JavaScript ([`keep_saved`]).
    const SAVED_FORM: &str = "saved_form";

    /// Keeps `rows`, a Model limits form refused without JavaScript (invalid,
    /// or changed meanwhile), in the session, for the page the browser is sent
    /// back to: its fields show what was typed, not the saved values
    /// ([`take_refused_limits`]). The session is not the page's address: no
    /// link can fill another administrator's form.
    async fn keep_refused_limits(rows: Vec<LimitInput>) {
        keep_for_page(REFUSED_LIMITS, rows).await;
    }

    /// The rows [`keep_refused_limits`] kept, taken out of the session: shown
    /// once. None when there are none, or the session store fails (logged).
    async fn take_refused_limits() -> Vec<LimitInput> {
        take_for_page(REFUSED_LIMITS).await.unwrap_or_default()
    }

    /// Notes that the form of the server function at `path` was saved by a
    /// post without JavaScript, for the page the browser is sent back to,
    /// which says so beside that form ([`take_saved`]). Told through the
    /// session rather than the page's address, so that a reload does not say
    /// it again.
    async fn keep_saved(path: &'static str) {
        keep_for_page(SAVED_FORM, path).await;
    }

    /// The path [`keep_saved`] kept, taken out of the session: said once.
    async fn take_saved() -> Option<String> {
        take_for_page(SAVED_FORM).await
    }

    /// Keeps `value` under `key` in the session for the next read of the tab,
    /// when the call is a form posted without JavaScript. A call that does
    /// not ask for HTML (the page's own script, or any other) reads its own
    /// answer and keeps nothing. If the session store fails, the call is
    /// answered all the same, and the failure logged.
    async fn keep_for_page(key: &str, value: impl serde::Serialize) {
        if !crate::auth::is_plain_form_post() {
            return;
        }
        let Ok(session) = leptos_axum::extract::<tower_sessions::Session>().await else {
            return;
        };
        let kept = match session.insert(key, value).await {
            Ok(()) => session.save().await,
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            leptos::logging::error!("session store: {key} was not kept: {e}");
        }
    }

    /// What [`keep_for_page`] kept under `key`, taken out of the session, so
    /// that the page shows it once. None when there is none, or the session
    /// store fails (logged).
    async fn take_for_page<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
        let session = leptos_axum::extract::<tower_sessions::Session>()
            .await
            .ok()?;
        let taken = match session.remove::<T>(key).await {
            Ok(Some(value)) => session.save().await.map(|()| value),
            Ok(None) => return None,
            Err(e) => Err(e),
        };
        taken
            .map_err(|e| leptos::logging::error!("session store: {key} was not read: {e}"))
            .ok()
    }

    /// A form's version field as the page wrote it: a whole number of zero or
    /// more (versions start at 0), or the field error `invalid_version` naming
    /// `field` (a form not made by the page).
    fn parse_version(field: &str, text: &str) -> Result<i64, FieldError> {
        let digits = text.trim();
        // Digits only: `parse` would also take a sign, which the page never writes.
        Some(digits)
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<i64>().ok())
            .ok_or_else(|| FieldError::fixed(field, "invalid_version"))
    }

    /// A toggle as a form sends it (a checkbox: `on` when ticked, nothing when
    /// not): on for `on` or `true`, off when absent (the form parser reads an
    /// empty value as absent), `off` or `false`, and the field error
    /// `invalid_enabled` naming `field` for anything else.
    fn parse_toggle(field: &str, value: Option<&str>) -> Result<bool, FieldError> {
        super::checkbox_state(value).ok_or_else(|| FieldError::fixed(field, "invalid_enabled"))
    }

    pub async fn save_automatic_fallback(
        admin: &Admin,
        automatic_fallback: Option<&str>,
        version: &str,
    ) -> Result<(), ApiError> {
        let parsed = parse_toggle("automatic_fallback", automatic_fallback)
            .and_then(|on| parse_version("settings_version", version).map(|version| (on, version)));
        let (on, version) = match parsed {
            Ok(parsed) => parsed,
            Err(field) => {
                return fail(ApiError::Invalid {
                    message: "Nothing was saved: reload the page and make the change again.".into(),
                    fields: vec![field],
                })
            }
        };
        let store = expect_context::<SharedStore>();
        match store
            .update_settings(&Actor::from(admin), Some(version), on, Utc::now())
            .await
        {
            Ok(_) => {
                keep_saved(<super::SaveAutomaticFallback as ServerFn>::PATH).await;
                Ok(())
            }
            Err(e) => fail(e.into()),
        }
    }

    /// Parse every row first: any invalid field refuses the whole save (DESIGN.md §3).
    /// A model named by two rows is refused too (`duplicate_model`): the tab
    /// sends each once, and the second row's version would otherwise look stale.
    /// A save of more rows than the catalog has models is refused whole, with one
    /// error (`too_many_rows`), before any row is read.
    pub async fn save_model_limits(admin: &Admin, rows: Vec<LimitInput>) -> Result<(), ApiError> {
        let store = expect_context::<SharedStore>();
        let catalog = expect_context::<Arc<Catalog>>();
        let models = catalog.models().len();
        if rows.len() > models {
            return fail(ApiError::Invalid {
                message: "Nothing was saved: the tab sends one row per model.".into(),
                fields: vec![FieldError {
                    field: "rows".into(),
                    code: "too_many_rows".into(),
                    message: format!(
                        "This save has {} rows; the catalog has {models} models, one row each.",
                        rows.len()
                    ),
                }],
            });
        }
        let typed = rows.clone();
        let mut changes = Vec::with_capacity(rows.len());
        let mut fields = Vec::new();
        let mut named = std::collections::HashSet::new();
        for row in rows {
            if row.model.trim().is_empty() {
                fields.push(FieldError::fixed("model", "missing_model"));
                continue;
            }
            let Some(model) = catalog.get(&row.model.as_str().into()) else {
                // A name no row of the tab sends (so no row shows its error):
                // named as any caller's text is, on one line and cut.
                let shown = crate::text::shown_text(&row.model);
                fields.push(FieldError {
                    message: format!("{shown} is not a model of the catalog."),
                    field: shown,
                    code: "unknown_model".into(),
                });
                continue;
            };
            if !named.insert(model.id.clone()) {
                fields.push(FieldError {
                    field: row.model.clone(),
                    code: "duplicate_model".into(),
                    message: format!(
                        "{} is named twice: give each model one limit per save.",
                        row.model
                    ),
                });
                continue;
            }
            let enabled = match parse_toggle(&row.model, row.enabled.as_deref()) {
                Ok(enabled) => enabled,
                Err(field) => {
                    fields.push(field);
                    continue;
                }
            };
            let text = row.limit.trim();
            let limit = if text.is_empty() {
                None
            } else {
                match parse_eur_input(text).map(|m| m.to_nanos_rounded()) {
                    Ok(Ok(nanos)) => Some(nanos),
                    Ok(Err(_)) => {
                        fields.push(FieldError::fixed(row.model.clone(), "too_large"));
                        continue;
                    }
                    Err(e) => {
                        fields.push(FieldError {
                            field: row.model.clone(),
                            code: e.code().into(),
                            message: e.message(),
                        });
                        continue;
                    }
                }
            };
            let limit = ModelLimit { limit, enabled };
            if let Err(e) = limit.validate() {
                fields.push(FieldError::fixed(row.model.clone(), e.code()));
                continue;
            }
            let version = match parse_version(&row.model, &row.version) {
                Ok(version) => version,
                Err(field) => {
                    fields.push(field);
                    continue;
                }
            };
            changes.push(LimitChange {
                model: model.id.clone(),
                expected_version: Some(version),
                limit,
            });
        }
        if !fields.is_empty() {
            keep_refused_limits(typed).await;
            return fail(ApiError::Invalid {
                message: "Nothing was saved: correct the highlighted limits and save again.".into(),
                fields,
            });
        }
        match store
            .update_model_limits(&Actor::from(admin), &changes, Utc::now())
            .await
        {
            Ok(()) => {
                keep_saved(<super::SaveModelLimits as ServerFn>::PATH).await;
                Ok(())
            }
            Err(e) => {
                let e = ApiError::from(e);
                // Refused as changed meanwhile: the form comes back as typed,
                // as it stays with JavaScript, on the versions it was typed
                // on; its line offers the current values.
                if matches!(e, ApiError::Conflict { .. }) {
                    keep_refused_limits(typed).await;
                }
                fail(e)
            }
        }
    }
}
