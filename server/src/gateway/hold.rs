//! A reservation held for one proxied request (DESIGN.md R7), ended exactly once.
//!
//! [`Hold`] owns the reservation from admission to its end: a background task
//! renews its lease while the request runs; [`Hold::settle`] or [`Hold::release`]
//! consume the hold, so a second end does not compile. Should the owning task die
//! without ending it (a panic), `Drop` settles it with no usage, i.e. bills the
//! estimate and flags the event: a spend control errs on the side of counting.
//! Should the whole process die, the lease runs out and any replica releases it.

use std::{sync::Arc, time::Duration};

use app::domain::Usage;
use app::store::{Reservation, ReservationId, Settlement, StoreError, UsageEventRecord};
use chrono::Utc;
use tokio::task::JoinHandle;

use super::Gateway;

/// How long a reservation is held without renewal. A crashed process's holds
/// are released at most this long (plus a sweep interval) after its last renewal.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often a live request renews its lease: three chances before it ends.
pub const RENEW_EVERY: Duration = Duration::from_secs(20);
/// Store calls that end a hold are tried this often when the database fails.
const END_ATTEMPTS: u32 = 3;

/// The idempotency key of the settlement of `reservation`: a retried settle (here
/// or through the usage API) finds the event instead of counting twice.
pub fn settlement_key(reservation: &ReservationId) -> String {
    format!("settle:{reservation}")
}

/// The end of a lease renewed now: `now + LEASE`.
pub fn lease_until_from_now() -> chrono::DateTime<Utc> {
    Utc::now() + chrono::TimeDelta::from_std(LEASE).unwrap_or(chrono::TimeDelta::MAX)
}

/// A live reservation of the gateway (see the module doc).
#[must_use = "a hold must be settled or released"]
pub struct Hold {
    gateway: Arc<Gateway>,
    reservation: Reservation,
    keeper: Option<JoinHandle<()>>,
    ended: bool,
}

impl Hold {
    /// Takes over `reservation` (just admitted) and starts renewing its lease every
    /// [`RENEW_EVERY`]; must be called inside a Tokio runtime.
    pub fn new(gateway: Arc<Gateway>, reservation: Reservation) -> Hold {
        let store = gateway.store.clone();
        let id = reservation.id.clone();
        let keeper = tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + RENEW_EVERY, RENEW_EVERY);
            loop {
                tick.tick().await;
                match store
                    .renew_lease(&id, lease_until_from_now(), Utc::now())
                    .await
                {
                    Ok(_) => {}
                    Err(StoreError::NotFound { .. }) => {
                        tracing::warn!(reservation = %id, "a live request's reservation is gone (lease expired?)");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(reservation = %id, error = %e, "could not renew a lease")
                    }
                }
            }
        });
        Hold {
            gateway,
            reservation,
            keeper: Some(keeper),
            ended: false,
        }
    }

    /// The reservation held.
    pub fn reservation(&self) -> &Reservation {
        &self.reservation
    }

    /// Replaces the reservation with the cost of `usage`, or with the estimate (the
    /// reserved amount, flagged) when `usage` is `None` (R7, DESIGN.md §4). Usage
    /// the store refuses as inconsistent is billed as the estimate instead.
    ///
    /// Returns the ledger event, or `None` when the store could not record it (then
    /// logged, counted as `failed`, and the lease will release the hold).
    pub async fn settle(mut self, usage: Option<Usage>) -> Option<UsageEventRecord> {
        self.end();
        settle(&self.gateway, &self.reservation, usage).await
    }

    /// Releases the reservation unbilled (upstream error before any usage, R7).
    pub async fn release(mut self) {
        self.end();
        release(&self.gateway, &self.reservation).await;
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.end();
        let gateway = self.gateway.clone();
        let reservation = self.reservation.clone();
        tracing::error!(reservation = %reservation.id, "a request ended without settling its reservation: billing the estimate");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Tracked with the exchanges, so a shutdown waits for it too.
            let exchanges = gateway.exchanges.clone();
            exchanges.spawn_on(
                async move {
                    settle(&gateway, &reservation, None).await;
                },
                &runtime,
            );
        }
    }
}

async fn settle(
    gateway: &Gateway,
    reservation: &Reservation,
    usage: Option<Usage>,
) -> Option<UsageEventRecord> {
    let served = reservation.served.as_str();
    let mut usage = usage;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = gateway
            .store
            .settle(Settlement {
                reservation: reservation.id.clone(),
                usage,
                idempotency_key: Some(settlement_key(&reservation.id)),
                within_reservation: false,
                now: Utc::now(),
            })
            .await;
        match result {
            Ok(event) => {
                if event.newly_recorded {
                    gateway.metrics.spend(served, event.cost.get());
                    gateway
                        .metrics
                        .settlement(served, if event.estimated { "estimate" } else { "usage" });
                }
                if event.over_reservation {
                    tracing::warn!(reservation = %reservation.id, model = served, "the upstream billed more than was reserved");
                }
                return Some(event);
            }
            Err(StoreError::Invalid { message, .. }) if usage.is_some() => {
                tracing::warn!(reservation = %reservation.id, model = served, problem = %message,
                    "the upstream reported inconsistent usage: billing the estimate");
                usage = None;
            }
            Err(StoreError::Database(detail) | StoreError::Busy(detail))
                if attempt < END_ATTEMPTS =>
            {
                tracing::warn!(reservation = %reservation.id, error = %detail, attempt, "settlement failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(e) => {
                tracing::error!(reservation = %reservation.id, model = served, error = %e,
                    "could not settle a reservation: its lease will release it unbilled");
                gateway.metrics.settlement(served, "failed");
                return None;
            }
        }
    }
}

async fn release(gateway: &Gateway, reservation: &Reservation) {
    let served = reservation.served.as_str();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match gateway.store.release(&reservation.id).await {
            Ok(()) => {
                gateway.metrics.settlement(served, "released");
                return;
            }
            Err(StoreError::Database(detail) | StoreError::Busy(detail))
                if attempt < END_ATTEMPTS =>
            {
                tracing::warn!(reservation = %reservation.id, error = %detail, attempt, "release failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(e) => {
                tracing::error!(reservation = %reservation.id, model = served, error = %e,
                    "could not release a reservation: its lease will");
                gateway.metrics.settlement(served, "failed");
                return;
            }
        }
    }
}
