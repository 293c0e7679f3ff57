//! A reservation held for one proxied request (DESIGN.md R7), ended exactly once.
//!
//! [`Hold`] owns the reservation from admission to its end: a background task
//! renews its lease while the request runs; [`Hold::settle`] or [`Hold::release`]
//! consume the hold, so a second end does not compile. Should the owning task die
//! without ending it (a panic), `Drop` settles it with no usage, i.e. bills the
//! estimate and flags the event: a spend control errs on the side of counting.
//! Should the whole process die, the lease runs out and any replica releases it.
//! A settlement that the database held up is written to the settlement spool
//! before the answer goes out ([`super::spool`]), so a process stopped before
//! the database answers loses none ([`replay_spool`]); it is billed even past its
//! lease, from the lapsed hold the sweep keeps (`Settlement::bill_if_lapsed`).

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};

use app::domain::Usage;
use app::store::{Reservation, ReservationId, Settlement, StoreError, UsageEventRecord};
use chrono::Utc;
use tokio::task::JoinHandle;

use super::spool::PendingSettlement;
use super::Gateway;

/// How long a reservation is held without renewal. A crashed process's holds
/// are released at most this long (plus a sweep interval) after its last renewal.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often a live request renews its lease: three chances before it ends.
pub const RENEW_EVERY: Duration = Duration::from_secs(20);
/// How soon a renewal that failed (the database held up) is tried again, so
/// that the lease is renewed as soon as the database answers, before a sweep
/// can release the hold of a request still running (see `cli`'s sweeper).
pub const RENEW_RETRY: Duration = Duration::from_secs(2);
/// Store calls that end a hold are tried this often while the request waits,
/// when the database fails.
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
            let mut wait = RENEW_EVERY;
            loop {
                tokio::time::sleep(wait).await;
                match store
                    .renew_lease(&id, lease_until_from_now(), Utc::now())
                    .await
                {
                    Ok(_) => wait = RENEW_EVERY,
                    Err(StoreError::NotFound { .. }) => {
                        tracing::warn!(reservation = %id, "a live request's reservation is gone (lease expired?)");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(reservation = %id, error = %e, "could not renew a lease; trying again shortly");
                        wait = RENEW_RETRY;
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
    /// Returns the ledger event, or `None` when the store could not record it in
    /// the tries made while the request waits (one, when the database was held
    /// up past its own wait): then, if the database was only held up, the
    /// settlement is spooled to disk and goes on after the answer
    /// (some 13 minutes of tries, then the lease sweeps' replays; billed even
    /// once the lease has run out); otherwise it is logged with its usage and
    /// counted as `failed`.
    pub async fn settle(mut self, usage: Option<Usage>) -> Option<UsageEventRecord> {
        self.end();
        settle(&self.gateway, &self.reservation, usage).await
    }

    /// Releases the reservation unbilled (upstream error before any usage, R7);
    /// after the answer when the database is held up.
    pub async fn release(mut self) {
        self.end();
        release(&self.gateway, &self.reservation).await;
    }

    /// Ends the hold of an answer that failed: billed the usage the upstream
    /// reported with it, if any (R7), else released.
    pub async fn bill_reported(self, usage: Option<Usage>) {
        match usage {
            Some(usage) => drop(self.settle(Some(usage)).await),
            None => self.release().await,
        }
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

/// The store's failures worth trying again: the database held up or gone for a
/// moment ([`StoreError::Busy`], [`StoreError::Unavailable`],
/// [`StoreError::Database`]).
fn transient(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Busy(_) | StoreError::Unavailable(_) | StoreError::Database(_)
    )
}

/// Failures that have already waited as long as the store lets a write wait
/// (SQLite's lock timeout, 10 s; PostgreSQL's wait for an answer or a
/// connection, 10 to 15 s): tried again only after the answer has gone out, since
/// each try while the request waits would put its answer off as long again.
fn held_up(error: &StoreError) -> bool {
    matches!(error, StoreError::Busy(_) | StoreError::Unavailable(_))
}

/// Retries while the request waits: [`END_ATTEMPTS`] tries in all, 50 then 100 ms
/// apart, of a failure that did not wait ([`held_up`]).
fn while_answering() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_times(END_ATTEMPTS as usize - 1)
}

/// Retries of a settlement after the answer has gone out: from 1 s apart up to
/// 30 s apart, 30 tries in all (some 13 minutes, plus the tries' own waits).
fn after_answering() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(LATE_ATTEMPTS)
        .with_jitter()
}

/// How often a settlement is tried after the answer has gone out (see
/// [`after_answering`]).
const LATE_ATTEMPTS: usize = 30;

/// Settles `reservation` (see [`Hold::settle`]). When the database is held up
/// past the tries made while the request waits, the settlement is written to
/// the spool ([`super::spool`]) before the answer goes out, then goes on in the
/// background, tracked with the exchanges (a shutdown waits for the try under
/// way); one still unsettled is left in the spool for the lease sweep, or the
/// next start, to replay. Either way it is billed even if the sweep released
/// the hold meanwhile (`Settlement::bill_if_lapsed`): the provider served the
/// request (R7).
async fn settle(
    gateway: &Arc<Gateway>,
    reservation: &Reservation,
    usage: Option<Usage>,
) -> Option<UsageEventRecord> {
    let mut pending = PendingSettlement {
        reservation: reservation.id.clone(),
        served: reservation.served.as_str().to_owned(),
        usage,
        finished_at: Utc::now(),
    };
    match settle_or_estimate(gateway, &mut pending, Tries::WhileAnswering).await {
        Ok(event) => Some(settled(gateway, &pending, event)),
        Err(e) if transient(&e) => {
            tracing::warn!(reservation = %pending.reservation, model = %pending.served, usage = ?pending.usage,
                error = %e, "could not settle yet: settling after the answer");
            let spooled = match gateway.spool.put(&pending).await {
                Ok(()) => {
                    gateway.metrics.settlement(&pending.served, "spooled");
                    true
                }
                Err(e) => {
                    tracing::error!(reservation = %pending.reservation, spool = %gateway.spool.dir().display(),
                        error = %e, "could not write the settlement to the spool: \
                         it is lost if the process stops before the database answers");
                    false
                }
            };
            let gateway = gateway.clone();
            let exchanges = gateway.exchanges.clone();
            exchanges.spawn(async move {
                let mut pending = pending;
                let result = settle_or_estimate(&gateway, &mut pending, Tries::AfterAnswering).await;
                match result {
                    Ok(event) => {
                        tracing::info!(reservation = %pending.reservation, "settled after the answer");
                        settled(&gateway, &pending, event);
                    }
                    Err(e) if spooled && transient(&e) => {
                        tracing::warn!(reservation = %pending.reservation, error = %e,
                            "could not settle after the answer: left in the settlement spool \
                             for the next lease sweep or start");
                        gateway.spool.unclaim(&pending.reservation);
                        return;
                    }
                    Err(e) => unsettled(&gateway, &pending, &e),
                }
                if spooled {
                    gateway.spool.remove(&pending.reservation).await;
                }
            });
            None
        }
        Err(e) => {
            unsettled(gateway, &pending, &e);
            None
        }
    }
}

/// What a replay of the settlement spool did ([`replay_spool`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Settlements written to the ledger now.
    pub billed: usize,
    /// Settlements found already recorded (by this process's background tries
    /// or another process); nothing counted again.
    pub already_recorded: usize,
    /// Settlements the store refused for good (their hold is gone: released
    /// more than a week ago); logged as errors with their usage, not billed.
    pub refused: usize,
    /// Settlements left in the spool: the database is still held up.
    pub left: usize,
}

/// Settles what waits in `gateway`'s settlement spool ([`super::spool`]) and is
/// not being settled by a task of this process: at start-up and at each lease
/// sweep. Each is tried once; at the first that the database cannot take yet
/// ([`StoreError::Busy`], [`StoreError::Unavailable`], [`StoreError::Database`])
/// the replay stops, and the rest waits for the next. A settlement already recorded counts nothing twice
/// (its idempotency key), so processes sharing the spool may replay it at once.
///
/// Errors: the I/O error when the spool's folder cannot be listed.
pub async fn replay_spool(gateway: &Gateway) -> std::io::Result<Replayed> {
    let mut replayed = Replayed::default();
    let entries = gateway.spool.entries().await?;
    let mut waiting = entries.into_iter();
    while let Some(mut pending) = waiting.next() {
        if !gateway.spool.claim(&pending.reservation) {
            continue;
        }
        match settle_or_estimate(gateway, &mut pending, Tries::Once).await {
            Ok(event) => {
                match event.newly_recorded {
                    true => replayed.billed += 1,
                    false => replayed.already_recorded += 1,
                }
                settled(gateway, &pending, event);
            }
            Err(e) if transient(&e) => {
                gateway.spool.unclaim(&pending.reservation);
                replayed.left = 1 + waiting.len();
                break;
            }
            Err(e) => {
                replayed.refused += 1;
                unsettled(gateway, &pending, &e);
            }
        }
        gateway.spool.remove(&pending.reservation).await;
    }
    if replayed.billed + replayed.refused > 0 {
        tracing::info!(
            billed = replayed.billed,
            refused = replayed.refused,
            left = replayed.left,
            "replayed the settlement spool"
        );
    }
    Ok(replayed)
}

/// When to stop trying a settlement or a release again.
#[derive(Clone, Copy)]
enum Tries {
    /// While the request waits: [`while_answering`].
    WhileAnswering,
    /// After the answer: [`after_answering`], and once a shutdown has begun
    /// ([`Gateway::finish_exchanges`]) a failed try is the last, so the process
    /// waits for the try under way, not for the whole schedule.
    AfterAnswering,
    /// One try: a replay of the spool, which the next sweep repeats.
    Once,
}

/// [`try_settle`], and when the store refuses the usage as inconsistent (a
/// count past what the ledger holds, say), the estimate instead: the request
/// was served, and a spend control errs on the side of counting (R7).
/// `pending.usage` is then `None`.
async fn settle_or_estimate(
    gateway: &Gateway,
    pending: &mut PendingSettlement,
    tries: Tries,
) -> Result<UsageEventRecord, StoreError> {
    let result = try_settle(gateway, pending, tries).await;
    match (&result, pending.usage) {
        (Err(StoreError::Invalid { message, .. }), Some(_)) => {
            tracing::warn!(reservation = %pending.reservation, model = %pending.served, problem = %message,
                "the upstream reported inconsistent usage: billing the estimate");
            pending.usage = None;
            try_settle(gateway, pending, tries).await
        }
        _ => result,
    }
}

/// One settlement, tried again on transient failures as `tries` says.
async fn try_settle(
    gateway: &Gateway,
    pending: &PendingSettlement,
    tries: Tries,
) -> Result<UsageEventRecord, StoreError> {
    let attempt = || {
        gateway.store.settle(Settlement {
            reservation: pending.reservation.clone(),
            usage: pending.usage,
            idempotency_key: Some(settlement_key(&pending.reservation)),
            within_reservation: false,
            bill_if_lapsed: true,
            now: pending.finished_at,
        })
    };
    attempt
        .retry(tries.schedule())
        .when(|e| tries.again(gateway, e))
        .notify(|e, _| {
            tracing::warn!(reservation = %pending.reservation, error = %e, "settlement failed; retrying")
        })
        .await
}

impl Tries {
    /// How far apart the tries are, and how many.
    fn schedule(self) -> ExponentialBuilder {
        match self {
            Tries::WhileAnswering => while_answering(),
            Tries::AfterAnswering => after_answering(),
            Tries::Once => ExponentialBuilder::default().with_max_times(0),
        }
    }

    /// Whether a try that failed with `error` is made again: a transient
    /// failure, while the request waits only one that did not already wait
    /// ([`held_up`]), after the answer only until a shutdown has begun.
    fn again(self, gateway: &Gateway, error: &StoreError) -> bool {
        transient(error)
            && match self {
                Tries::WhileAnswering => !held_up(error),
                Tries::AfterAnswering | Tries::Once => !gateway.exchanges.is_closed(),
            }
    }
}

/// Counts a settlement recorded; returns its event.
fn settled(
    gateway: &Gateway,
    pending: &PendingSettlement,
    event: UsageEventRecord,
) -> UsageEventRecord {
    let served = pending.served.as_str();
    if event.newly_recorded {
        gateway.metrics.spend(served, event.cost.get());
        gateway
            .metrics
            .settlement(served, if event.estimated { "estimate" } else { "usage" });
        if event.lease_expired {
            gateway.metrics.settlement(served, "lease_expired");
        }
    }
    if event.over_reservation {
        tracing::warn!(reservation = %pending.reservation, model = served, "the upstream billed more than was reserved");
    }
    event
}

/// Reports a settlement given up: the usage is not billed.
fn unsettled(gateway: &Gateway, pending: &PendingSettlement, error: &StoreError) {
    let served = pending.served.as_str();
    tracing::error!(reservation = %pending.reservation, model = served, usage = ?pending.usage, error = %error,
        "could not settle a reservation: this usage is not billed");
    gateway.metrics.settlement(served, "failed");
}

/// Releases `reservation` (see [`Hold::release`]). When the database is held up
/// ([`held_up`]), the answer goes out at once and the release is tried again
/// after it, tracked with the exchanges; if those tries fail too, the lease
/// ends the hold (R7).
async fn release(gateway: &Arc<Gateway>, reservation: &Reservation) {
    match try_release(gateway, reservation, Tries::WhileAnswering).await {
        Err(e) if held_up(&e) => {
            tracing::warn!(reservation = %reservation.id, model = reservation.served.as_str(), error = %e,
                "could not release yet: releasing after the answer");
            let gateway = gateway.clone();
            let reservation = reservation.clone();
            let exchanges = gateway.exchanges.clone();
            exchanges.spawn(async move {
                let result = match try_release(&gateway, &reservation, Tries::AfterAnswering).await
                {
                    // Its lease ran out meanwhile, and a sweep released it.
                    Err(StoreError::NotFound { .. }) => Ok(()),
                    result => result,
                };
                released(&gateway, &reservation, result);
            });
        }
        result => released(gateway, reservation, result),
    }
}

/// One release, tried again on transient failures as `tries` says.
async fn try_release(
    gateway: &Gateway,
    reservation: &Reservation,
    tries: Tries,
) -> Result<(), StoreError> {
    let attempt = || gateway.store.release(&reservation.id);
    attempt
        .retry(tries.schedule())
        .when(|e| tries.again(gateway, e))
        .notify(|e, _| {
            tracing::warn!(reservation = %reservation.id, error = %e, "release failed; retrying")
        })
        .await
}

/// Counts a release done, or reports one given up (the lease ends the hold).
fn released(gateway: &Gateway, reservation: &Reservation, result: Result<(), StoreError>) {
    let served = reservation.served.as_str();
    match result {
        Ok(()) => gateway.metrics.settlement(served, "released"),
        Err(e) => {
            tracing::error!(reservation = %reservation.id, model = served, error = %e,
                "could not release a reservation: its lease will");
            gateway.metrics.settlement(served, "failed");
        }
    }
}
