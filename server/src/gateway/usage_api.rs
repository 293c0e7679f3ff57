//! The usage API under `/api/v1/` (DESIGN.md §4), for platforms that call model
//! providers themselves: the same admission decision (R6) and settlement (R7) as
//! the gateway, without proxying. API key auth; every amount is an exact decimal
//! string in EUR (R2), never a JSON number.
//!
//! - `POST /api/v1/admissions`
//!   `{"model", "prompt_tokens", "max_completion_tokens"?, "max_tokens"?, "n"?, "lease_seconds"?}`
//!   → `{"reservation_id", "requested_model", "served_model", "fallback", "reserved_eur", "lease_until"}`,
//!   or 429 as the gateway answers it.
//! - `POST /api/v1/admissions/{id}/settle` `{"usage": {...} | null}` → the ledger
//!   event: `{"reservation_id", "event_id", "requested_model", "served_model", "cost_eur",
//!   "estimated", "over_reservation", "newly_recorded"}`. `usage: null` bills the
//!   reservation (flagged as estimated). Settling again with the same usage (a
//!   retry) returns the same event; with other usage, 409 `already_settled`, and
//!   nothing changes.
//! - `POST /api/v1/admissions/{id}/release` → `{"reservation_id", "released": true}`.
//! - `POST /api/v1/admissions/{id}/renew` `{"lease_seconds"?}` → `{"reservation_id", "lease_until"}`:
//!   the lease ends `lease_seconds` from now, or later if it already did (a
//!   renewal never shortens a lease).
//! - `POST /api/v1/usage` `{"records": [{"idempotency_key", "model", "usage"}]}` →
//!   `{"results": [{"idempotency_key", "outcome": "recorded"|"duplicate"|"conflict"|"blocked", ...}]}`,
//!   each item admitted (no fallback: the usage already happened) and counted at
//!   most once per idempotency key (scoped to the key's owner). A key seen before
//!   with the same model (as resolved now, or as named: the name may have become
//!   an alias since) and token counts is a `duplicate` (a retry); with other
//!   usage, a `conflict` (`code` `idempotency_key_reused`): nothing is recorded
//!   and the event recorded under it is returned.
//!
//! A hold whose lease has ended is gone for settle, release and renew: 404
//! `reservation_not_found`, even before the sweep releases it. So is a hold
//! the gateway took for a chat completion (its id shows in `tollgate
//! reservation list` and the logs): its exchange alone ends it, billing what
//! the upstream reported (R7).
//!
//! Reservation ids are time-ordered UUIDs (version 7) with 74 random bits, too many
//! to guess: whoever holds one may settle or release it.
//! `usage` objects take OpenAI's shape (`prompt_tokens`, `completion_tokens`,
//! `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`)
//! or the two details flat (`cached_tokens`, `reasoning_tokens`).

use std::sync::Arc;

use app::domain::{Nanos, TokenEstimate, Usage};
use app::store::{RecordOutcome, ReservationId, StoreError, UsageEventRecord, UsageRecord};
use axum::{
    body::Body,
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Json,
};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

use super::error::{shown_text, GatewayError};
use super::hold::settlement_key;
use super::json::{is_null, optional_token_count, optional_u64, required_string, RawObject};
use super::upstream::parse_usage;
use super::{
    caller::{authenticate, authenticate_to_spend, Caller},
    read_body, Gateway,
};

/// Default lease of a usage API admission, seconds: the caller settles or releases
/// it before then, or renews it.
pub const DEFAULT_LEASE_SECONDS: u64 = 300;
/// Longest lease a usage API caller may ask for, seconds.
pub const MAX_LEASE_SECONDS: u64 = 3_600;
/// Most records one `POST /api/v1/usage` may carry (one transaction).
pub const MAX_RECORDS: usize = 1_000;
/// Longest idempotency key, characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;

/// The ledger's idempotency key of a bulk record that user `user_id` sent
/// under `key`: scoped to the user, so two platforms' keys cannot collide.
pub fn ledger_key(user_id: i64, key: &str) -> String {
    format!("usage:{user_id}:{key}")
}

/// The key a bulk record was sent with, read back from its ledger key
/// ([`ledger_key`]); `None` for a ledger key of another kind (a settlement's,
/// `hold::settlement_key`).
pub fn sent_key(ledger_key: &str) -> Option<&str> {
    let (user, key) = ledger_key.strip_prefix("usage:")?.split_once(':')?;
    user.parse::<i64>().is_ok().then_some(key)
}

/// A bulk record's `idempotency_key`: a string of 1 to
/// [`MAX_IDEMPOTENCY_KEY_CHARS`] Unicode characters, none a control character
/// (PostgreSQL cannot store NUL in text, and keys are shown back in answers,
/// logs and `tollgate usage list`).
///
/// Errors: [`GatewayError::InvalidField`] saying which part of that rule the
/// key breaks, and stating the rule.
fn idempotency_key(record: &RawObject) -> Result<String, GatewayError> {
    const PARAM: &str = "idempotency_key";
    let rule = format!(
        "a string of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} Unicode characters, none of them a \
         control character"
    );
    let invalid = |problem: String| {
        GatewayError::invalid_field(PARAM, format!("{problem}; it must be {rule}"))
    };
    let Some(raw) = record.get(PARAM) else {
        return Err(GatewayError::invalid_field(
            PARAM,
            format!("you must provide `{PARAM}` ({rule})"),
        ));
    };
    if super::json::is_null(raw) {
        return Err(invalid(format!("`{PARAM}` is null")));
    }
    let key: String = serde_json::from_str(raw.get())
        .map_err(|_| invalid(format!("`{PARAM}` {}", super::json::not_a_string(raw))))?;
    let length = key.chars().count();
    if length == 0 {
        return Err(invalid(format!("`{PARAM}` is empty")));
    }
    if length > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(invalid(format!("`{PARAM}` is {length} characters long")));
    }
    if let Some((at, c)) = key.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(invalid(format!(
            "`{PARAM}` holds a control character, {}, at character {}",
            app::text::code_point(c),
            at + 1
        )));
    }
    Ok(key)
}

fn eur(nanos: Nanos) -> String {
    nanos.to_money().to_string()
}

/// Refuses keys of `object` outside `allowed`, naming the first (typos would
/// otherwise be silently ignored), in the message and as `param`, as
/// [`shown_text`] shows a caller's text.
fn only_fields(object: &RawObject, allowed: &[&str]) -> Result<(), GatewayError> {
    match object.keys().find(|key| !allowed.contains(key)) {
        Some(key) => {
            let key = shown_text(key);
            let message = format!(
                "unknown field `{key}`; expected one of: {}",
                allowed.join(", ")
            );
            Err(GatewayError::invalid_field(key, message))
        }
        None => Ok(()),
    }
}

/// `lease_seconds`, [`DEFAULT_LEASE_SECONDS`] when absent or null.
///
/// Errors: [`GatewayError::InvalidField`] stating the rule when it is not an
/// integer from 1 to [`MAX_LEASE_SECONDS`], whatever its type.
fn lease_seconds(object: &RawObject) -> Result<u64, GatewayError> {
    let seconds = optional_u64(object, "lease_seconds").map(|s| s.unwrap_or(DEFAULT_LEASE_SECONDS));
    match seconds {
        Ok(seconds) if (1..=MAX_LEASE_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err(GatewayError::invalid_field(
            "lease_seconds",
            format!("`lease_seconds` must be an integer from 1 to {MAX_LEASE_SECONDS} (seconds)"),
        )),
    }
}

fn lease_until(seconds: u64) -> DateTime<Utc> {
    Utc::now() + TimeDelta::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 1_000))
}

fn parse_object(bytes: &[u8]) -> Result<RawObject, GatewayError> {
    RawObject::parse(bytes).map_err(|e| GatewayError::invalid_json(bytes, &e))
}

/// Reads a `usage` field for the usage API.
///
/// Errors: [`GatewayError::InvalidField`] naming `{param}.{field}`.
fn usage_field(raw: &RawValue, param: &str) -> Result<Usage, GatewayError> {
    parse_usage(raw).map_err(|e| {
        let param = if e.field.is_empty() {
            param.to_owned()
        } else {
            format!("{param}.{}", e.field)
        };
        GatewayError::invalid_field(param, format!("`usage` cannot be billed: {e}"))
    })
}

#[derive(Serialize)]
struct AdmissionView {
    reservation_id: String,
    requested_model: String,
    served_model: String,
    fallback: bool,
    reserved_eur: String,
    lease_until: String,
}

/// Admit (or refuse) a request the caller will make itself, holding its estimate.
pub async fn admit(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut model_label = String::new();
    let result = async {
        let caller = authenticate_to_spend(&gateway, &headers).await?;
        let bytes = read_body(&gateway, &headers, body).await?;
        let object = parse_object(&bytes)?;
        only_fields(
            &object,
            &[
                "model",
                "prompt_tokens",
                "max_completion_tokens",
                "max_tokens",
                "n",
                "lease_seconds",
            ],
        )?;
        let name = required_string(&object, "model")?;
        let prompt_tokens = optional_token_count(&object, "prompt_tokens")?.ok_or_else(|| {
            GatewayError::invalid_field(
                "prompt_tokens",
                "you must provide `prompt_tokens` (an upper bound, a non-negative integer)",
            )
        })?;
        let output_cap = super::json::output_cap(&object)?;
        let n = super::json::choice_count(&object)?;
        let lease = lease_seconds(&object)?;
        let catalog = gateway.catalog.clone();
        let model = catalog
            .resolve(&name)
            .ok_or_else(|| GatewayError::model_not_found(&name))?;
        model_label.push_str(model.id.as_str());
        super::json::within_max_output(model, output_cap)?;
        // The lease as stored is the lease as answered.
        let until = lease_until(lease);
        let reservation = gateway
            .reserve(
                model,
                TokenEstimate {
                    prompt_tokens,
                    output_cap: output_cap.map(|cap| cap.tokens),
                    n,
                },
                caller.spender(),
                until,
                super::Taker::UsageApi,
            )
            .await?;
        let view = AdmissionView {
            reservation_id: reservation.id.0.clone(),
            requested_model: reservation.requested.to_string(),
            served_model: reservation.served.to_string(),
            fallback: reservation.served != reservation.requested,
            reserved_eur: eur(reservation.amount),
            lease_until: app::text::shown_time(until),
        };
        Ok(Json(view).into_response())
    }
    .await;
    gateway.answer("admissions", &model_label, result)
}

#[derive(Serialize)]
struct EventView {
    reservation_id: Option<String>,
    event_id: i64,
    requested_model: String,
    served_model: String,
    cost_eur: String,
    estimated: bool,
    over_reservation: bool,
    newly_recorded: bool,
}

impl EventView {
    fn new(reservation: Option<&ReservationId>, event: &UsageEventRecord) -> EventView {
        EventView {
            reservation_id: reservation.map(|r| r.0.clone()),
            event_id: event.id,
            requested_model: event.requested.to_string(),
            served_model: event.served.to_string(),
            cost_eur: eur(event.cost),
            estimated: event.estimated,
            over_reservation: event.over_reservation,
            newly_recorded: event.newly_recorded,
        }
    }
}

/// The reservation `id`, unless it was admitted for another key than the
/// caller's: that one is answered 404 `reservation_not_found`, as if it did not
/// exist, so a key can neither settle, release nor renew the holds of another,
/// nor read their settlements, nor learn that they exist. The same for a hold
/// of a chat completion ([`super::Taker::Exchange`]), whichever key it spends
/// for: its exchange ends it (R7). A hold whose lease has
/// ended is answered 404 too, before the sweep releases it as after, and is
/// released on the spot (R7). One
/// that never existed or was released is left to the store to answer.
///
/// Errors: [`GatewayError::ReservationNotFound`], [`GatewayError::Internal`] when
/// the store fails.
async fn callers_reservation(
    gateway: &Gateway,
    caller: &Caller,
    id: String,
) -> Result<ReservationId, GatewayError> {
    // No reservation id has a NUL (PostgreSQL could not even look one up).
    if id.contains('\0') {
        return Err(GatewayError::ReservationNotFound(id));
    }
    let reservation = ReservationId(id);
    let settled_as = settlement_key(&reservation);
    let access = gateway
        .store
        .reservation_spender(&reservation, &settled_as)
        .await?;
    let Some(access) = access else {
        return Ok(reservation);
    };
    if access.spender.api_key_id != Some(caller.key.id) {
        return Err(GatewayError::ReservationNotFound(reservation.0));
    }
    match access.held {
        // A chat completion's hold: its exchange alone ends it, on the usage
        // its upstream reports. Settled, released or renewed from here, a
        // request served in full could be billed nothing, or hold the room
        // it no longer needs long after its gateway is gone.
        Some(held) if super::Taker::of_owner(&held.owner) != super::Taker::UsageApi => {
            Err(GatewayError::ReservationNotFound(reservation.0))
        }
        // Ended, though the sweep has not released it yet: gone for settle,
        // release and renew alike, whichever runs first. Released here, as the
        // sweep would, so that its hold stops counting against the limits now.
        Some(held) if held.lease_until < Utc::now() => {
            match gateway.store.release(&reservation).await {
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            Err(GatewayError::ReservationNotFound(reservation.0))
        }
        _ => Ok(reservation),
    }
}

/// Replace a reservation with the cost of the usage its request reported.
pub async fn settle(
    State(gateway): State<Arc<Gateway>>,
    super::PathParam(id): super::PathParam,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let caller = authenticate(&gateway, &headers).await?;
        let bytes = read_body(&gateway, &headers, body).await?;
        let object = parse_object(&bytes)?;
        only_fields(&object, &["usage"])?;
        let raw = object.get("usage").ok_or_else(|| {
            GatewayError::invalid_field(
                "usage",
                "you must provide `usage` (an object, or null to bill the reservation)",
            )
        })?;
        let usage = if is_null(raw) {
            None
        } else {
            Some(usage_field(raw, "usage")?)
        };
        let reservation = callers_reservation(&gateway, &caller, id).await?;
        let event = gateway
            .store
            .settle(app::store::Settlement {
                reservation: reservation.clone(),
                usage,
                idempotency_key: Some(settlement_key(&reservation)),
                within_reservation: true,
                bill_if_lapsed: false,
                now: Utc::now(),
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    GatewayError::ReservationNotFound(reservation.0.clone())
                }
                StoreError::Invalid { message, .. } => {
                    GatewayError::invalid_field("usage", message)
                }
                other => other.into(),
            })?;
        if event.newly_recorded {
            let served = event.served.as_str();
            gateway.metrics.spend(served, event.cost.get());
            gateway
                .metrics
                .settlement(served, if event.estimated { "estimate" } else { "usage" });
        } else {
            // A retry repeats what it reports; other usage for a settled
            // reservation is a mistake its caller must hear of, as with the bulk
            // recording's idempotency keys.
            let recorded = gateway
                .store
                .recorded_usage(&settlement_key(&reservation))
                .await?;
            if recorded.is_some_and(|recorded| !recorded.repeats(usage.as_ref())) {
                return Err(GatewayError::AlreadySettled {
                    served: event.served.to_string(),
                    cost: app::domain::format_eur_exact(event.cost.to_money()),
                });
            }
        }
        Ok(Json(EventView::new(Some(&reservation), &event)).into_response())
    }
    .await;
    gateway.answer("admissions_settle", "", result)
}

/// Release a reservation unbilled (the caller's request failed before any usage).
pub async fn release(
    State(gateway): State<Arc<Gateway>>,
    super::PathParam(id): super::PathParam,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let caller = authenticate(&gateway, &headers).await?;
        let reservation = callers_reservation(&gateway, &caller, id).await?;
        gateway
            .store
            .release(&reservation)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    GatewayError::ReservationNotFound(reservation.0.clone())
                }
                other => other.into(),
            })?;
        Ok(
            Json(serde_json::json!({"reservation_id": reservation.0, "released": true}))
                .into_response(),
        )
    }
    .await;
    gateway.answer("admissions_release", "", result)
}

/// Extend a reservation's lease while the caller's request still runs.
pub async fn renew(
    State(gateway): State<Arc<Gateway>>,
    super::PathParam(id): super::PathParam,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let caller = authenticate(&gateway, &headers).await?;
        let bytes = read_body(&gateway, &headers, body).await?;
        let object = if bytes.iter().all(u8::is_ascii_whitespace) {
            RawObject::default()
        } else {
            let object = parse_object(&bytes)?;
            only_fields(&object, &["lease_seconds"])?;
            object
        };
        let until = lease_until(lease_seconds(&object)?);
        let reservation = callers_reservation(&gateway, &caller, id).await?;
        let until = gateway
            .store
            .renew_lease(&reservation, until, Utc::now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    GatewayError::ReservationNotFound(reservation.0.clone())
                }
                other => other.into(),
            })?;
        Ok(Json(
            serde_json::json!({"reservation_id": reservation.0, "lease_until": app::text::shown_time(until)}),
        )
        .into_response())
    }
    .await;
    gateway.answer("admissions_renew", "", result)
}

#[derive(Serialize)]
struct RecordView {
    idempotency_key: String,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// One item of a bulk record, read and checked: the idempotency key and the model
/// as the caller sent them, the model they name, and the token counts.
struct RecordItem<'a> {
    key: String,
    name: String,
    model: &'a app::domain::Model,
    usage: Usage,
}

/// Record finished usage in bulk, each item admitted and counted once per key.
pub async fn record(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let caller = authenticate(&gateway, &headers).await?;
        let bytes = read_body(&gateway, &headers, body).await?;
        let object = parse_object(&bytes)?;
        only_fields(&object, &["records"])?;
        let raw = object.get_present("records").ok_or_else(|| {
            GatewayError::invalid_field("records", "you must provide `records` (an array)")
        })?;
        let items: Vec<Box<RawValue>> = serde_json::from_str(raw.get()).map_err(|_| {
            GatewayError::invalid_field("records", "`records` must be an array of objects")
        })?;
        if items.is_empty() || items.len() > MAX_RECORDS {
            return Err(GatewayError::invalid_field(
                "records",
                format!("`records` must hold between 1 and {MAX_RECORDS} items"),
            ));
        }
        let catalog = gateway.catalog.clone();
        let mut parsed: Vec<RecordItem<'_>> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |e: GatewayError| match e {
                GatewayError::InvalidField { param, message } => GatewayError::InvalidField {
                    param: format!("records[{i}].{param}"),
                    message,
                },
                GatewayError::ModelNotFound { name, param } => GatewayError::ModelNotFound {
                    name,
                    param: format!("records[{i}].{param}"),
                },
                other => other,
            };
            // A record that is an object but cannot be read (a field given
            // twice) is told why.
            let record = RawObject::parse(item.get().as_bytes()).map_err(|e| {
                GatewayError::invalid_field(
                    format!("records[{i}]"),
                    match super::json::is_object(item) {
                        true => format!(
                            "this record cannot be read: {}",
                            super::json::message_without_position(&e)
                        ),
                        false => "each record must be an object".to_owned(),
                    },
                )
            })?;
            only_fields(&record, &["idempotency_key", "model", "usage"]).map_err(at)?;
            let key = idempotency_key(&record).map_err(at)?;
            let name = required_string(&record, "model").map_err(at)?;
            let model = catalog
                .resolve(&name)
                .ok_or_else(|| at(GatewayError::model_not_found(&name)))?;
            let usage_raw = record.get_present("usage").ok_or_else(|| {
                at(GatewayError::invalid_field(
                    "usage",
                    "you must provide `usage` (an object)",
                ))
            })?;
            let usage = usage_field(usage_raw, "usage").map_err(at)?;
            // Priced here too, so usage too costly to book names its record.
            crate::db::usage_cost(&model.prices, &usage).map_err(|e| {
                at(match e {
                    StoreError::Invalid { message, .. } => {
                        GatewayError::invalid_field("usage", message)
                    }
                    other => other.into(),
                })
            })?;
            parsed.push(RecordItem {
                key,
                name,
                model,
                usage,
            });
        }
        let records: Vec<UsageRecord<'_>> = parsed
            .iter()
            .map(|item| UsageRecord {
                idempotency_key: ledger_key(caller.user.id, &item.key),
                model: item.model,
                model_as_sent: &item.name,
                usage: item.usage,
            })
            .collect();
        let outcomes = gateway
            .store
            .record_usage(&records, caller.spender(), Utc::now())
            .await
            .map_err(|e| match e {
                StoreError::Invalid { message, .. } => {
                    GatewayError::invalid_field("records", message)
                }
                other => other.into(),
            })?;
        let results: Vec<RecordView> = parsed
            .iter()
            .zip(outcomes)
            .map(|(RecordItem { key, model, .. }, outcome)| match outcome {
                RecordOutcome::Recorded(event) => {
                    let served = event.served.as_str();
                    gateway.metrics.spend(served, event.cost.get());
                    gateway
                        .metrics
                        .admission(model.id.as_str(), served, "admitted");
                    gateway.metrics.settlement(served, "usage");
                    RecordView {
                        idempotency_key: key.clone(),
                        outcome: "recorded",
                        event: Some(EventView::new(None, &event)),
                        code: None,
                        message: None,
                    }
                }
                RecordOutcome::Duplicate(event) => RecordView {
                    idempotency_key: key.clone(),
                    outcome: "duplicate",
                    event: Some(EventView::new(None, &event)),
                    code: None,
                    message: None,
                },
                RecordOutcome::Conflict(event) => RecordView {
                    idempotency_key: key.clone(),
                    outcome: "conflict",
                    code: Some("idempotency_key_reused"),
                    message: Some(format!(
                        "This idempotency key was already used for other usage (on {}, \
                         costing {}); nothing was recorded: use a new key for new usage.",
                        event.served,
                        app::domain::format_eur_exact(event.cost.to_money())
                    )),
                    event: Some(EventView::new(None, &event)),
                },
                RecordOutcome::Blocked(blocked) => {
                    gateway
                        .metrics
                        .admission(model.id.as_str(), "", blocked.code.as_str());
                    RecordView {
                        idempotency_key: key.clone(),
                        outcome: "blocked",
                        event: None,
                        code: Some(blocked.code.as_str()),
                        message: Some(blocked.message),
                    }
                }
            })
            .collect();
        Ok(Json(serde_json::json!({ "results": results })).into_response())
    }
    .await;
    gateway.answer("usage", "", result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `error` object of `error`'s body.
    fn error_json(error: &GatewayError) -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&error.body()).unwrap()["error"].clone()
    }

    #[test]
    fn an_unknown_field_is_named_on_one_line_and_cut() {
        let allowed = ["model", "n"];
        let object = RawObject::parse(br#"{"model":"m","n":1}"#).unwrap();
        assert!(only_fields(&object, &allowed).is_ok());

        let object = RawObject::parse(br#"{"model":"m","a\u001b[2J\nb":1}"#).unwrap();
        let error = error_json(&only_fields(&object, &allowed).unwrap_err());
        assert_eq!(error["param"], r"a\u{1b}[2J\u{a}b");
        assert_eq!(
            error["message"],
            r"Unknown field `a\u{1b}[2J\u{a}b`; expected one of: model, n."
        );

        let long = format!(r#"{{"{}\u202e":1}}"#, "k".repeat(200));
        let error = error_json(
            &only_fields(&RawObject::parse(long.as_bytes()).unwrap(), &allowed).unwrap_err(),
        );
        let param = error["param"].as_str().unwrap();
        assert_eq!(param, format!("{}…", "k".repeat(64)));
        assert!(error["message"].as_str().unwrap().contains(param));
    }
}
