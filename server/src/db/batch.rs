//! Group commit for the gateway's hot path (DESIGN.md R6, R7).
//!
//! Every request writes twice: a reservation at admission and a settlement (or a
//! release) at the end. Run one by one, each write is a transaction of its own
//! that re-reads the plan, the limits and the counters, and most of its time goes
//! to statements that every request repeats. Here one task per store, the
//! *batcher*, takes the writes waiting in its queue (up to [`MAX_BATCH`]) and
//! applies them in arrival order inside one write transaction:
//!
//! - the plan, the settings and the limits are read once per batch, and each
//!   cycle's counters once, into [`BatchBooks`], and only when the batch holds an
//!   admission: settlements and releases read nothing but their reservation;
//! - the API keys the batch's admissions spend on are checked live (not revoked)
//!   with one statement, so a revoked key admits nothing (DESIGN.md §4);
//! - each admission is decided by the domain's `admit` on those books as the
//!   operations before it in the batch left them, exactly as if they had been
//!   committed one by one (the write lock is held throughout: SQLite `BEGIN
//!   IMMEDIATE`, PostgreSQL the plan row `FOR UPDATE`);
//! - the counters' changes are summed per model and written at the end, all
//!   models by one statement (`books::HotSql`);
//! - callers get their answers only after the commit.
//!
//! The batcher keeps its write connection between batches, and on SQLite the
//! books as well (see [`BatchBooks`]): a batch whose books nobody else has
//! touched reads nothing but the reservations it ends. It starts a batch only
//! after the callers just answered have had a turn to queue their next write, so
//! writers that follow each other closely share batches instead of alternating
//! in two half-full ones. What a batch asks of the database is [`HotPath`], which
//! each backend implements.
//!
//! If anything in a batch fails, it is rolled back whole and its operations run
//! again one per transaction, so one bad operation fails alone and the others are
//! unaffected. A reservation whose caller went away before the answer (a client
//! that disconnected) is released at once instead of waiting for its lease.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use app::{
    domain::{admit, Admission, Counter, ModelId, ModelState, Nanos, Snapshot},
    store::{
        PlanRecord, Reservation, ReservationId, ReserveOutcome, ReserveRequest, Settlement,
        StoreError, UsageEventRecord,
    },
};
use tokio::sync::{mpsc, oneshot};

use super::books::{
    all_distinct, counter_changes, cycle_key, millis, settlement_cost, usage_exceeds_reservation,
    CounterChange, CounterRow, EventRow, LedgerRow, LimitRow, NewEvent, NewEventRow,
    NewReservationRow, Opened, PlanRow, ReadBooks, ReservationRow,
};

/// Most operations applied in one transaction. Every operation of a batch waits
/// for the whole batch, so this bounds the latency a burst adds.
pub(crate) const MAX_BATCH: usize = 64;

/// Operations waiting for the batcher; callers wait when it is full.
const QUEUE: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write of the hot path, with where its answer goes.
pub(crate) enum Op {
    /// Admission (R6) and the hold (R7).
    Reserve(Box<ReserveRequest>, Reply<ReserveOutcome>),
    /// The hold replaced by the actual cost, and a ledger row (R7).
    Settle(Box<Settlement>, Reply<UsageEventRecord>),
    /// The hold dropped; `None` when nobody waits for the answer.
    Release(ReservationId, Option<Reply<()>>),
}

impl Op {
    /// A reservation whose caller is gone need not be made.
    fn abandoned(&self) -> bool {
        match self {
            Op::Reserve(_, reply) => reply.is_closed(),
            // The usage happened: it is booked whether or not anyone waits.
            Op::Settle(..) | Op::Release(..) => false,
        }
    }

    /// Answer with `result`; returns the reservation to release when the caller of
    /// an admitted reservation is gone.
    fn answer(self, result: Answer) -> Option<ReservationId> {
        match (self, result) {
            (Op::Reserve(_, reply), Answer::Reserve(outcome)) => match reply.send(outcome) {
                Err(Ok(ReserveOutcome::Admitted(reservation))) => Some(reservation.id),
                _ => None,
            },
            (Op::Settle(_, reply), Answer::Settle(event)) => {
                let _ = reply.send(event);
                None
            }
            (Op::Release(_, reply), Answer::Release(done)) => {
                if let Some(reply) = reply {
                    let _ = reply.send(done);
                }
                None
            }
            (op, Answer::Failed(error)) => op.fail(error),
            (op, _) => op.fail(StoreError::Database("batch answer of another kind".into())),
        }
    }

    fn fail(self, error: StoreError) -> Option<ReservationId> {
        match self {
            Op::Reserve(_, reply) => {
                let _ = reply.send(Err(error));
            }
            Op::Settle(_, reply) => {
                let _ = reply.send(Err(error));
            }
            Op::Release(_, reply) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
        }
        None
    }
}

/// The answer to one [`Op`], held until its batch commits.
pub(crate) enum Answer {
    Reserve(Result<ReserveOutcome, StoreError>),
    Settle(Result<UsageEventRecord, StoreError>),
    Release(Result<(), StoreError>),
    /// The operation could not run (its batch failed before reaching it).
    Failed(StoreError),
}

/// The handle through which a store hands its hot-path writes to its batcher.
///
/// The batcher keeps one write connection `C` for as long as it works: giving a
/// pooled connection back after every batch costs a round trip (sqlx checks a
/// connection on its return) that the next batch would wait for. Other writes of
/// the store borrow that same connection between batches ([`Batcher::lend`]), so
/// on SQLite every write of the process still takes its turn in one queue instead
/// of contending for the file lock.
#[derive(Debug)]
pub(crate) struct Batcher<C> {
    queue: mpsc::Sender<Op>,
    loans: mpsc::Sender<Borrower<C>>,
    busy: Busy,
    unwritable: Arc<AtomicBool>,
}

/// When the batcher took up the work it is on (a batch or a loan), or `None`
/// while it waits for work: how long writes have been held up, for `/healthz`.
#[derive(Debug, Clone, Default)]
struct Busy(Arc<Mutex<Option<Instant>>>);

impl Busy {
    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = since;
    }

    fn elapsed(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|since| since.elapsed())
    }
}

/// A [`Batcher`] handle that does not keep the batcher running.
#[derive(Debug)]
pub(crate) struct WeakBatcher<C> {
    queue: mpsc::WeakSender<Op>,
    loans: mpsc::WeakSender<Borrower<C>>,
    busy: Busy,
    unwritable: Arc<AtomicBool>,
}

impl<C> WeakBatcher<C> {
    /// The batcher, unless its store is gone.
    pub(crate) fn upgrade(&self) -> Option<Batcher<C>> {
        Some(Batcher {
            queue: self.queue.upgrade()?,
            loans: self.loans.upgrade()?,
            busy: self.busy.clone(),
            unwritable: self.unwritable.clone(),
        })
    }
}

impl<C> Batcher<C> {
    /// A handle for a background task that must stop with the store.
    pub(crate) fn downgrade(&self) -> WeakBatcher<C> {
        WeakBatcher {
            queue: self.queue.downgrade(),
            loans: self.loans.downgrade(),
            busy: self.busy.clone(),
            unwritable: self.unwritable.clone(),
        }
    }

    /// How long the write the batcher is on (a batch of the hot path, or a
    /// connection lent for another write) has been running, waiting for the
    /// database's write lock included; `None` while no write is under way.
    pub(crate) fn busy_for(&self) -> Option<Duration> {
        self.busy.elapsed()
    }

    /// Whether the last write of the hot path found the database out of reach or
    /// unable to write ([`StoreError::Unavailable`]) and none has gone through
    /// since, nor [`Batcher::writable_again`] said otherwise: `/healthz` then
    /// checks the database takes writes.
    pub(crate) fn unwritable(&self) -> bool {
        self.unwritable.load(Ordering::Relaxed)
    }

    /// A write went through outside the hot path: the database takes writes.
    pub(crate) fn writable_again(&self) {
        self.unwritable.store(false, Ordering::Relaxed);
    }
}

impl<C> Clone for Batcher<C> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            loans: self.loans.clone(),
            busy: self.busy.clone(),
            unwritable: self.unwritable.clone(),
        }
    }
}

/// The batcher's write connection and the books it last committed on it.
pub(crate) struct Writer<C> {
    pub conn: C,
    /// The books as the last batch committed them, for a backend that can tell
    /// whether anyone else wrote since ([`BatchBooks::carry_over`]); `None` when
    /// they must be read again.
    pub books: Option<BatchBooks>,
}

/// What a batch hands back: its writer, unless its connection must be replaced
/// (after a database error or a panic), and the reservations whose callers were
/// gone or were answered an error though the database may have committed them.
pub(crate) type BatchEnd<C> = (Option<Writer<C>>, Vec<ReservationId>);

impl<C: Send + 'static> Batcher<C> {
    /// Start the batcher task. `connect` gives it a write connection, when it has
    /// none; `execute` applies one batch on it and answers each of its operations
    /// (see [`answer_all`]). The reservations whose callers were gone are then
    /// released; if the batch lost its connection, with the next batch, on the
    /// next connection (once: if that fails too, their leases end them). The
    /// task ends when the last handle is dropped.
    pub(crate) fn spawn<A, AF, F, Fut>(connect: A, mut execute: F) -> Batcher<C>
    where
        A: Fn() -> AF + Send + 'static,
        AF: Future<Output = Result<C, StoreError>> + Send,
        F: FnMut(Writer<C>, Vec<Op>) -> Fut + Send + 'static,
        Fut: Future<Output = BatchEnd<C>> + Send + 'static,
    {
        let (queue, mut inbox) = mpsc::channel::<Op>(QUEUE);
        let (loans, mut borrowers) = mpsc::channel::<Borrower<C>>(QUEUE);
        let busy = Busy::default();
        let working = busy.clone();
        tokio::spawn(async move {
            let mut writer: Option<Writer<C>> = None;
            let mut ops: Vec<Op> = Vec::with_capacity(MAX_BATCH);
            // Reservations to release with the next batch.
            let mut unreleased: Vec<ReservationId> = Vec::new();
            let mut last_batch = 0;
            loop {
                working.set(None);
                // Let the callers of the last batch queue their next write first.
                // Only after a batch of several: a yield wakes the runtime's
                // other worker to look for work, which a lone writer pays for
                // with a thread's wake-up per batch and nobody gains from
                // (measured: about 2.5 fewer context switches a request, and
                // 10-15% more requests/s through the gateway at one connection).
                if last_batch > 1 {
                    tokio::task::yield_now().await;
                }
                // Batches and loans take turns (`select!` picks fairly), so neither
                // can starve the other.
                let work = tokio::select! {
                    received = inbox.recv_many(&mut ops, MAX_BATCH) => match received {
                        0 => break,
                        _ => Work::Batch(ops.drain(..).filter(|op| !op.abandoned()).collect()),
                    },
                    Some(borrower) = borrowers.recv() => Work::Loan(borrower),
                };
                working.set(Some(Instant::now()));
                let current = match writer.take() {
                    Some(current) => current,
                    None => match connect().await {
                        Ok(conn) => Writer { conn, books: None },
                        Err(error) => {
                            tracing::error!(%error, "the store's writer has no connection");
                            // The database out of reach: every write queued
                            // meanwhile would wait as long again for a connection
                            // in its turn, so they are refused with this one.
                            if matches!(error, StoreError::Unavailable(_)) {
                                while let Ok(op) = inbox.try_recv() {
                                    op.fail(error.clone());
                                }
                            }
                            work.fail(error);
                            continue;
                        }
                    },
                };
                writer = match work {
                    Work::Batch(mut batch) => {
                        last_batch = batch.len();
                        if !unreleased.is_empty() {
                            batch
                                .splice(0..0, unreleased.drain(..).map(|id| Op::Release(id, None)));
                        }
                        let (after, orphans) = run(execute(current, batch)).await;
                        match after {
                            _ if orphans.is_empty() => after,
                            Some(after) => {
                                tracing::info!(
                                    released = orphans.len(),
                                    "released reservations whose callers went away"
                                );
                                let releases = orphans
                                    .into_iter()
                                    .map(|id| Op::Release(id, None))
                                    .collect();
                                run(execute(after, releases)).await.0
                            }
                            None => {
                                tracing::warn!(
                                    reservations = orphans.len(),
                                    "a batch lost its connection: reservations no one will \
                                     use (their callers went away, or were answered an error \
                                     though the database may have kept them) are released \
                                     with the next batch"
                                );
                                unreleased = orphans;
                                None
                            }
                        }
                    }
                    // The borrower may change anything: the books are read again,
                    // unless it said it changed nothing they hold.
                    Work::Loan(borrower) => {
                        lend(current.conn, borrower)
                            .await
                            .map(|(conn, books_kept)| Writer {
                                conn,
                                books: current.books.filter(|_| books_kept),
                            })
                    }
                };
            }
        });
        Batcher {
            queue,
            loans,
            busy,
            unwritable: Arc::default(),
        }
    }

    /// The write connection, for a write outside the hot path; batches wait until
    /// the [`Lent`] guard is dropped.
    ///
    /// Errors: [`StoreError::Database`] when the batcher has stopped or has no
    /// connection.
    pub(crate) async fn lend(&self) -> Result<Lent<C>, StoreError> {
        let (borrower, loan) = oneshot::channel();
        self.loans
            .send(borrower)
            .await
            .map_err(|_| StoreError::Database("the store's writer has stopped".into()))?;
        loan.await
            .map_err(|_| StoreError::Database("the store's writer has no connection".into()))?
    }

    async fn submit<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Database("the store's writer has stopped".into()))?;
        let answer = answer
            .await
            .map_err(|_| StoreError::Database("the batch holding this write failed".into()))?;
        match &answer {
            Ok(_) => self.writable_again(),
            Err(StoreError::Unavailable(_)) => self.unwritable.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        answer
    }

    /// See `Store::reserve`.
    pub(crate) async fn reserve(
        &self,
        request: ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        self.submit(|reply| Op::Reserve(Box::new(request), reply))
            .await
    }

    /// See `Store::settle`.
    pub(crate) async fn settle(
        &self,
        settlement: Settlement,
    ) -> Result<UsageEventRecord, StoreError> {
        self.submit(|reply| Op::Settle(Box::new(settlement), reply))
            .await
    }

    /// See `Store::release`.
    pub(crate) async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.submit(|reply| Op::Release(id, Some(reply))).await
    }
}

/// Which holds [`HotPath::take_reservations`] takes (DESIGN.md R7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holds {
    /// Reservations in force (`reservations`): counted as reserved.
    Live,
    /// Reservations the sweep released when their lease ran out
    /// (`lapsed_reservations`): kept to bill a late settlement, counted nowhere.
    Lapsed,
}

/// What a batch asks of the database, on a backend's writer connection. Every
/// call but [`HotPath::begin`] runs inside the transaction it opens, which
/// [`HotPath::write`] commits and [`HotPath::rollback`] ends with nothing kept.
pub(crate) trait HotPath: Send {
    /// Opens the batch's write transaction, holding the write lock (SQLite
    /// `BEGIN IMMEDIATE`; on PostgreSQL [`HotPath::read_plan`] takes it). Returns
    /// the books' version where the backend has one: a number that changes
    /// whenever another connection commits (SQLite `data_version`), so that
    /// books carried over from the last batch can be trusted while it holds.
    /// When it fails, no transaction is left open.
    fn begin(&mut self) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Deletes the `holds` of `ids` that exist, returning them.
    fn take_reservations(
        &mut self,
        ids: &[&str],
        holds: Holds,
    ) -> impl Future<Output = Result<Vec<ReservationRow>, StoreError>> + Send;

    /// What the batch reads before deciding, in one call where the backend can:
    /// deletes and returns the live holds of `ids` (as
    /// [`HotPath::take_reservations`]), and when `spenders` is given (the batch
    /// admits), reads the plan as [`HotPath::read_plan`] does (locking it), then
    /// the books as [`HotPath::read_books`] does for those API key ids and the
    /// latest cycle with counters. `None` where the backend has no such call
    /// (SQLite, whose calls cost no round trip): the batch asks step by step.
    ///
    /// Errors: as the calls it stands for.
    fn open(
        &mut self,
        ids: &[&str],
        spenders: Option<&[i64]>,
    ) -> impl Future<Output = Result<Option<Opened>, StoreError>> + Send {
        let _ = (ids, spenders);
        std::future::ready(Ok(None))
    }

    /// The ledger rows recorded under the idempotency keys `keys`, by key.
    fn find_events(
        &mut self,
        keys: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, EventRow>, StoreError>> + Send;

    /// The plan and settings; on PostgreSQL locks the plan row, which orders the
    /// writers of every replica (DESIGN.md R6).
    ///
    /// Errors: [`StoreError::NotFound`] when the workspace has no plan.
    fn read_plan(&mut self) -> impl Future<Output = Result<PlanRow, StoreError>> + Send;

    /// What an admission reads after the plan (`books::HotSql::read_books`):
    /// every model limit, the counters of the cycle keyed `cycle_start`, and
    /// which of the API keys `ids` exist and are not revoked.
    fn read_books(
        &mut self,
        cycle_start: i64,
        ids: &[i64],
    ) -> impl Future<Output = Result<ReadBooks, StoreError>> + Send;

    /// Writes the batch's new reservations, ledger rows and counter changes, and
    /// commits; returns the ledger rows as written, in no particular order.
    fn write(
        &mut self,
        reservations: &[NewReservationRow<'_>],
        events: &[NewEventRow<'_>],
        counters: &[CounterChange<'_>],
    ) -> impl Future<Output = Result<Vec<LedgerRow>, StoreError>> + Send;

    /// Ends the open transaction, keeping nothing of it.
    fn rollback(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks the connection as broken: it is closed when dropped, not reused.
    fn discard(&mut self);
}

/// Apply one batch of hot-path writes on the batcher's writer, answer each
/// operation, and return the writer (none when its connection failed and should
/// be replaced) with the admitted reservations nobody waits for.
///
/// The batch is one transaction; if it fails, it is rolled back whole and its
/// operations run again one per transaction, so one bad operation fails alone.
pub(crate) async fn execute_batch<C: HotPath>(writer: Writer<C>, ops: Vec<Op>) -> BatchEnd<C> {
    let Writer {
        mut conn,
        mut books,
    } = writer;
    // Holds whose commit went unanswered: released by the batcher.
    let mut unanswered = Vec::new();
    if ops.len() > 1 {
        match try_batch(&mut conn, books.take(), &ops, &mut unanswered).await {
            Ok((answers, books)) => {
                return (Some(Writer { conn, books }), answer_all(ops, answers))
            }
            // Another connection's lock, not one operation's fault: one by one,
            // each would wait the whole busy timeout again, and the writes queued
            // behind them longer still. All are answered busy at once.
            Err(error @ StoreError::Busy(_)) => {
                tracing::warn!(
                    %error,
                    operations = ops.len(),
                    "the database stayed locked by another connection: a batch of writes was refused"
                );
                fail_all(ops, &error);
                // Nothing was admitted, so no reservation is left without a caller.
                return (Some(Writer { conn, books: None }), Vec::new());
            }
            // The database out of reach (or unable to write) fails every
            // operation alike: all are answered at once, and the connection,
            // which may be broken, is replaced.
            Err(error @ StoreError::Unavailable(_)) => {
                fail_all(ops, &error);
                conn.discard();
                return (None, unanswered);
            }
            Err(e) => tracing::warn!(
                error = %e,
                operations = ops.len(),
                "a batch of writes failed and was rolled back; applying them one by one"
            ),
        }
    }
    let mut healthy = true;
    let mut orphans = Vec::new();
    let mut out_of_reach: Option<StoreError> = None;
    for op in ops {
        // Once the database is out of reach, on a connection whose transaction
        // may still be open, nothing more is tried on it.
        if let Some(error) = &out_of_reach {
            op.fail(error.clone());
            continue;
        }
        let answers = match try_batch(
            &mut conn,
            books.take(),
            std::slice::from_ref(&op),
            &mut unanswered,
        )
        .await
        {
            Ok((answers, after)) => {
                books = after;
                answers
            }
            Err(e) => {
                healthy &= !matches!(e, StoreError::Database(_) | StoreError::Unavailable(_));
                if matches!(e, StoreError::Unavailable(_)) {
                    out_of_reach = Some(e.clone());
                }
                vec![Answer::Failed(e)]
            }
        };
        orphans.extend(answer_all(vec![op], answers));
    }
    orphans.append(&mut unanswered);
    // A database error may have broken the connection (or left a transaction
    // open): it is closed, and the batcher connects anew.
    if !healthy {
        conn.discard();
    }
    (healthy.then_some(Writer { conn, books }), orphans)
}

/// A batch's answers, in the order of its operations, and the books to carry to
/// the next batch.
type BatchDone = (Vec<Answer>, Option<BatchBooks>);

/// One transaction over `ops`, in order; any error rolls back all of them. Blocks
/// and unknown reservations are answers, not errors: they write nothing.
///
/// When the database went out of reach while the transaction was being
/// written or committed ([`StoreError::Unavailable`] from `HotPath::write`), it
/// may have committed all the same: the holds it was taking are then put in
/// `unanswered_holds`, for the caller to release (their admissions were
/// answered with the error, so no one will use them).
async fn try_batch<C: HotPath>(
    conn: &mut C,
    carried: Option<BatchBooks>,
    ops: &[Op],
    unanswered_holds: &mut Vec<ReservationId>,
) -> Result<BatchDone, StoreError> {
    let keys: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Settle(settlement, _) => settlement.idempotency_key.as_deref(),
            _ => None,
        })
        .collect();
    if ops.len() > 1 && !all_distinct(&keys) {
        // A retried settlement racing its original: one per transaction.
        return Err(StoreError::Database(
            "one idempotency key twice in a batch".into(),
        ));
    }
    let mut in_transaction = false;
    let mut writing = Vec::new();
    let result = batch_in_transaction(conn, carried, ops, &mut in_transaction, &mut writing).await;
    if let Err(StoreError::Unavailable(_)) = &result {
        unanswered_holds.append(&mut writing);
    }
    match &result {
        // Nothing of the batch is kept. A connection that cannot even roll back is
        // replaced (a database error does that).
        Err(e) if in_transaction && !matches!(e, StoreError::Unavailable(_)) => {
            conn.rollback().await?;
        }
        // The database out of reach: a rollback would wait as long again. The
        // connection is replaced ([`execute_batch`]), and closing it ends the
        // transaction with nothing kept.
        _ => {}
    }
    result
}

/// The body of [`try_batch`]: opens the transaction and, unless it fails,
/// commits it. Keeps `in_transaction` telling whether a transaction is open,
/// which the caller rolls back on an error, and puts in `writing` the holds it
/// takes once it writes them.
async fn batch_in_transaction<C: HotPath>(
    conn: &mut C,
    carried: Option<BatchBooks>,
    ops: &[Op],
    in_transaction: &mut bool,
    writing: &mut Vec<ReservationId>,
) -> Result<BatchDone, StoreError> {
    let ending: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Settle(settlement, _) => Some(settlement.reservation.0.as_str()),
            Op::Release(id, _) => Some(id.0.as_str()),
            Op::Reserve(..) => None,
        })
        .collect();
    let version = conn.begin().await?;
    // Only now: a `begin` that failed (SQLite busy) left no transaction to end.
    *in_transaction = true;
    // Only a backend with a books version carries books (see the end).
    let mut books = carried.filter(|_| version.is_some()).unwrap_or_default();
    if let Some(version) = version {
        books.check(version);
    }
    // The API keys admissions spend on, each checked live under the lock.
    let spenders: Vec<i64> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Reserve(request, _) => Some(request.spender.api_key_id),
            _ => None,
        })
        .flatten()
        .collect();
    // Where the backend can, the holds ended and what the admissions read are
    // read in one call; what it did not read is read below as it is needed.
    let admits = ops.iter().any(|op| matches!(op, Op::Reserve(..))) && books.needs_rules();
    let (mut ended, mut opened) = match conn
        .open(&ending, admits.then_some(spenders.as_slice()))
        .await?
    {
        Some(opened) => (by_id(opened.ended), opened.admitting),
        None => (take_by_id(conn, &ending, Holds::Live).await?, None),
    };
    // A settlement deletes its reservation in the transaction that records it, so
    // only a settlement whose reservation is gone can be a retry of one already
    // recorded: only those keys are looked up.
    let retried: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Settle(settlement, _) if !ended.contains_key(settlement.reservation.0.as_str()) => {
                settlement.idempotency_key.as_deref()
            }
            _ => None,
        })
        .collect();
    let mut recorded = if retried.is_empty() {
        HashMap::new()
    } else {
        conn.find_events(&retried).await?
    };
    // Neither held nor recorded: a gateway's settlement may come after the sweep
    // released its hold (its lease ran out while the database was held up); it is
    // billed from the lapsed hold. Looked up only then, so almost never.
    let late: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Settle(settlement, _)
                if settlement.bill_if_lapsed
                    && !ended.contains_key(settlement.reservation.0.as_str())
                    && !settlement
                        .idempotency_key
                        .as_deref()
                        .is_some_and(|key| recorded.contains_key(key)) =>
            {
                Some(settlement.reservation.0.as_str())
            }
            _ => None,
        })
        .collect();
    let mut lapsed = take_by_id(conn, &late, Holds::Lapsed).await?;

    // Checked with what the first admission that reads has to read.
    let mut keys_to_check = books.unknown_keys(&spenders);
    let mut answers = Vec::with_capacity(ops.len());
    let mut reservations = Vec::new();
    let mut events = Vec::new();
    for op in ops {
        answers.push(match op {
            Op::Reserve(request, _) => 'reserve: {
                // The plan first: on PostgreSQL its lock orders the writers, and
                // what is read after it is current (READ COMMITTED).
                let plan_row = match books.needs_rules() {
                    true => match opened.as_mut().and_then(|books| books.plan.take()) {
                        Some(row) => Some(row),
                        None => Some(conn.read_plan().await?),
                    },
                    false => None,
                };
                let key = match &plan_row {
                    Some(row) => cycle_key(row.plan()?.cycle_at(request.now)?.start),
                    None => books.cycle_of(request.now)?,
                };
                if plan_row.is_some() || books.needs(key) || !keys_to_check.is_empty() {
                    let keys = std::mem::take(&mut keys_to_check);
                    let read = match opened.take().and_then(|books| books.of_cycle(key)) {
                        Some(read) => read,
                        None => conn.read_books(key, &keys).await?,
                    };
                    if let Some(row) = &plan_row {
                        books.set_rules(row, read.limits)?;
                    }
                    if books.needs(key) {
                        books.load(key, &read.counters)?;
                    }
                    books.know_live_keys(read.live_keys);
                }
                if let Some(key) = request.spender.api_key_id {
                    if !books.key_is_live(key) {
                        break 'reserve Some(Answer::Reserve(Err(StoreError::NotFound {
                            what: "api key",
                        })));
                    }
                }
                match books.reserve(request)? {
                    Decision::Block(blocked) => {
                        Some(Answer::Reserve(Ok(ReserveOutcome::Blocked(blocked))))
                    }
                    Decision::Admit(new) => {
                        let reservation = new.reservation.clone();
                        reservations.push((&**request, *new));
                        Some(Answer::Reserve(Ok(ReserveOutcome::Admitted(reservation))))
                    }
                }
            }
            Op::Settle(settlement, _) => 'settle: {
                let id = settlement.reservation.0.as_str();
                // What the hold still counts as reserved: nothing once it lapsed.
                let (row, held, lease_expired) = match (ended.remove(id), lapsed.remove(id)) {
                    (Some(row), _) => {
                        let held = row.amount_nanos;
                        (row, held, false)
                    }
                    (None, Some(row)) => {
                        tracing::warn!(reservation = id, model = %row.served_model,
                            "billing a request whose reservation's lease had run out");
                        (row, 0, true)
                    }
                    (None, None) => {
                        let retry = settlement
                            .idempotency_key
                            .as_deref()
                            .and_then(|key| recorded.remove(key));
                        break 'settle Some(Answer::Settle(match retry {
                            Some(event) => Ok(event.record(false)),
                            None => Err(StoreError::NotFound {
                                what: "reservation",
                            }),
                        }));
                    }
                };
                let (cost, estimated, over) = settlement_cost(&row, settlement.usage.as_ref())?;
                if over && settlement.within_reservation {
                    // An error, not an answer: the batch is rolled back, so the
                    // reservation just deleted is kept.
                    return Err(usage_exceeds_reservation(cost, &row));
                }
                books.change(row.cycle_start, &row.served_model, cost.get(), -held);
                events.push(NewEvent {
                    row,
                    usage: settlement.usage.unwrap_or_default(),
                    cost,
                    estimated,
                    over_reservation: over,
                    lease_expired,
                    idempotency_key: settlement.idempotency_key.clone(),
                    now: settlement.now,
                });
                // Answered once its ledger row has an id.
                None
            }
            Op::Release(id, _) => match ended.remove(id.0.as_str()) {
                None => Some(Answer::Release(Err(StoreError::NotFound {
                    what: "reservation",
                }))),
                Some(row) => {
                    books.change(row.cycle_start, &row.served_model, 0, -row.amount_nanos);
                    Some(Answer::Release(Ok(())))
                }
            },
        });
    }
    let reservations: Vec<NewReservationRow<'_>> = reservations
        .iter()
        .map(|(request, new)| NewReservationRow {
            row: ReservationRow {
                id: new.reservation.id.0.clone(),
                cycle_start: new.cycle_start,
                requested_model: new.reservation.requested.to_string(),
                served_model: new.reservation.served.to_string(),
                amount_nanos: new.reservation.amount.get(),
                input_eur_per_mtok: new.prices.input.to_string(),
                cached_input_eur_per_mtok: new.prices.cached_input.to_string(),
                output_eur_per_mtok: new.prices.output.to_string(),
                user_id: request.spender.user_id,
                api_key_id: request.spender.api_key_id,
                created_at: Some(request.now.to_rfc3339()),
            },
            owner: &request.owner,
            lease_until: millis(request.lease_until),
        })
        .collect();
    let events = events
        .iter()
        .map(NewEvent::json_row)
        .collect::<Result<Vec<_>, _>>()?;
    let changes = books.changes();
    let counters = counter_changes(&changes);
    *writing = reservations
        .iter()
        .map(|new| ReservationId(new.row.id.clone()))
        .collect();
    let written = conn.write(&reservations, &events, &counters).await?;
    // Committed.
    *in_transaction = false;
    let mut inserted: HashMap<String, EventRow> = written
        .into_iter()
        .filter_map(|row| Some((row.reservation_id?, row.event)))
        .collect();
    // Committed: from here on nothing may fail the batch as a whole, or its
    // operations would be applied again one by one.
    let answers = ops
        .iter()
        .zip(answers)
        .map(|(op, answer)| match (op, answer) {
            (_, Some(answer)) => answer,
            (Op::Settle(settlement, _), None) => match inserted.remove(&settlement.reservation.0) {
                Some(event) => Answer::Settle(Ok(event.record(true))),
                None => Answer::Failed(StoreError::Database("a ledger row was not written".into())),
            },
            _ => Answer::Failed(StoreError::Database("an operation was not answered".into())),
        })
        .collect();
    Ok((answers, version.map(|_| books.carry_over())))
}

/// [`HotPath::take_reservations`] by id, asking nothing when `ids` is empty.
async fn take_by_id<C: HotPath>(
    conn: &mut C,
    ids: &[&str],
    holds: Holds,
) -> Result<HashMap<String, ReservationRow>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(by_id(conn.take_reservations(ids, holds).await?))
}

/// Holds by id.
fn by_id(rows: Vec<ReservationRow>) -> HashMap<String, ReservationRow> {
    rows.into_iter().map(|row| (row.id.clone(), row)).collect()
}

/// What the batcher does next.
enum Work<C> {
    Batch(Vec<Op>),
    Loan(Borrower<C>),
}

impl<C> Work<C> {
    /// Answer whoever waits with `error`.
    fn fail(self, error: StoreError) {
        match self {
            Work::Batch(ops) => fail_all(ops, &error),
            Work::Loan(borrower) => {
                let _ = borrower.send(Err(error));
            }
        }
    }
}

/// Run one batch; if it panicked, its callers get an error (their answers are
/// dropped), its connection is replaced and the batcher goes on with the next
/// batch. It runs in the batcher's own task: a task of its own would add a hand
/// over between threads to every batch.
async fn run<C: Send + 'static>(
    batch: impl Future<Output = BatchEnd<C>> + Send + 'static,
) -> BatchEnd<C> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(batch)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!("a batch of writes panicked; its callers were answered with an error");
            (None, Vec::new())
        })
}

/// Hand `conn` to `borrower` and wait for it to come back; with it, whether the
/// borrower left the books alone ([`Lent::books_unchanged`]).
async fn lend<C>(conn: C, borrower: Borrower<C>) -> Option<(C, bool)> {
    let (give_back, returned) = oneshot::channel();
    let loan = Lent {
        conn: Some(conn),
        give_back: Some(give_back),
        books_unchanged: false,
    };
    match borrower.send(Ok(loan)) {
        // Only a forgotten guard never comes back: then a new connection is made.
        Ok(()) => returned.await.ok(),
        // The borrower stopped waiting: the loan comes back as it was sent.
        Err(unsent) => unsent.ok().and_then(|mut loan| {
            loan.give_back = None;
            loan.conn.take().map(|conn| (conn, true))
        }),
    }
}

/// Who waits for the write connection ([`Batcher::lend`]), and is told why not
/// when there is none.
type Borrower<C> = oneshot::Sender<Result<Lent<C>, StoreError>>;

/// The batcher's write connection, lent out; it goes back when this is dropped.
#[derive(Debug)]
pub(crate) struct Lent<C> {
    conn: Option<C>,
    give_back: Option<oneshot::Sender<(C, bool)>>,
    books_unchanged: bool,
}

impl<C> Lent<C> {
    /// Say that the borrower changed nothing the books hold (a WAL checkpoint,
    /// say), so the batcher keeps them instead of reading them again.
    pub(crate) fn books_unchanged(&mut self) {
        self.books_unchanged = true;
    }
}

impl<C> std::ops::Deref for Lent<C> {
    type Target = C;

    fn deref(&self) -> &C {
        // Present until drop.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("a lent connection is held until drop"))
    }
}

impl<C> std::ops::DerefMut for Lent<C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("a lent connection is held until drop"))
    }
}

impl<C> Drop for Lent<C> {
    fn drop(&mut self) {
        if let (Some(conn), Some(give_back)) = (self.conn.take(), self.give_back.take()) {
            let _ = give_back.send((conn, self.books_unchanged));
        }
    }
}

/// Answer every operation of a batch that could not run with `error`.
fn fail_all(ops: Vec<Op>, error: &StoreError) {
    for op in ops {
        op.fail(error.clone());
    }
}

/// Answer every operation of a committed batch; returns the admitted reservations
/// nobody waits for any more.
pub(crate) fn answer_all(ops: Vec<Op>, answers: Vec<Answer>) -> Vec<ReservationId> {
    ops.into_iter()
        .zip(answers)
        .filter_map(|(op, answer)| op.answer(answer))
        .collect()
}

/// A reservation decided in a batch, to be inserted.
pub(crate) struct NewReservation {
    pub reservation: Reservation,
    pub cycle_start: i64,
    /// The served model's prices, recorded with the hold (R3).
    pub prices: app::domain::Prices,
}

/// What admission decided for one request against the batch's books.
pub(crate) enum Decision {
    Admit(Box<NewReservation>),
    Block(app::domain::Blocked),
}

/// One cycle's counters as the batch has changed them so far.
struct CycleBooks {
    workspace: Counter,
    /// Counters with each model's limit, as `admit` reads them.
    models: HashMap<ModelId, ModelState>,
}

impl CycleBooks {
    fn add(&mut self, model: &str, spent: i64, reserved: i64) {
        let add = |counter: &mut Counter| {
            counter.spent = Nanos::new(counter.spent.get().saturating_add(spent));
            counter.reserved = Nanos::new(counter.reserved.get().saturating_add(reserved));
        };
        add(&mut self.workspace);
        add(&mut self.models.entry(ModelId::new(model)).or_default().counter);
    }
}

/// What admission reads besides the counters: the plan, the fallback setting and
/// every model limit.
struct Rules {
    plan: PlanRecord,
    automatic_fallback: bool,
    limits: Vec<LimitRow>,
}

/// The books a batch works on, read under the write lock only as far as its
/// operations need them, and changed in memory as each operation applies
/// (DESIGN.md R6). Settlements and releases read nothing: they only add to the
/// counters' changes. An admission needs the rules ([`BatchBooks::set_rules`]) and
/// its cycle's counters ([`BatchBooks::load`]), which then include the changes of
/// the operations before it.
///
/// On a backend whose connection can tell whether anyone else has written since
/// it last looked (SQLite's `data_version`), the books a batch committed are
/// carried over to the next batch ([`BatchBooks::carry_over`]), which then reads
/// nothing unless someone else wrote in between ([`BatchBooks::check`]): every
/// write of this process goes through the batcher's connection, and a write that
/// borrows it drops the carried books.
#[derive(Default)]
pub(crate) struct BatchBooks {
    rules: Option<Rules>,
    cycles: HashMap<i64, CycleBooks>,
    /// Changes to write, per cycle and model id: `(spent, reserved)` nano-euros.
    changes: HashMap<(i64, String), (i64, i64)>,
    /// The database's version (as the backend counts other writers' commits) that
    /// `rules` and `cycles` were read at or checked against.
    version: Option<i64>,
    /// API keys known to be live (not revoked) at `version`.
    live_keys: HashSet<i64>,
}

impl BatchBooks {
    /// The books after their batch committed, for the next batch: the rules and
    /// the counters read so far, with the batch's changes in them.
    pub(crate) fn carry_over(mut self) -> BatchBooks {
        self.changes.clear();
        self
    }

    /// Compare the database's `version`, read under the write lock, with the one
    /// the books were read at: when someone else has written since, forget the
    /// rules and counters (this batch's own changes are kept, and added again to
    /// counters read anew).
    pub(crate) fn check(&mut self, version: i64) {
        if self.version != Some(version) {
            self.rules = None;
            self.cycles.clear();
            self.live_keys.clear();
            self.version = Some(version);
        }
    }

    /// Of the API keys `ids`, those not yet known to be live: they must be looked
    /// up ([`BatchBooks::know_live_keys`]) before an admission spends on them.
    pub(crate) fn unknown_keys(&self, ids: &[i64]) -> Vec<i64> {
        let mut unknown: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !self.live_keys.contains(id))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        unknown
    }

    /// Take in API keys found live under the write lock.
    pub(crate) fn know_live_keys(&mut self, ids: impl IntoIterator<Item = i64>) {
        self.live_keys.extend(ids);
    }

    /// Whether the API key `id` was found live (DESIGN.md §4: a revoked key spends
    /// nothing, not even with a request already past authentication).
    pub(crate) fn key_is_live(&self, id: i64) -> bool {
        self.live_keys.contains(&id)
    }

    /// Whether [`BatchBooks::set_rules`] must be called before an admission.
    pub(crate) fn needs_rules(&self) -> bool {
        self.rules.is_none()
    }

    /// Take in the plan row and every model limit.
    ///
    /// Errors: [`StoreError::Database`] when the stored plan is unreadable.
    pub(crate) fn set_rules(
        &mut self,
        plan: &PlanRow,
        limits: Vec<LimitRow>,
    ) -> Result<(), StoreError> {
        self.rules = Some(Rules {
            plan: plan.plan()?,
            automatic_fallback: plan.automatic_fallback,
            limits,
        });
        Ok(())
    }

    fn rules(&self) -> Result<&Rules, StoreError> {
        self.rules.as_ref().ok_or_else(not_loaded)
    }

    /// The counters' key of the cycle containing `at` (R1).
    ///
    /// Errors: [`StoreError::Invalid`] when `at` is outside the calendar.
    pub(crate) fn cycle_of(&self, at: chrono::DateTime<chrono::Utc>) -> Result<i64, StoreError> {
        Ok(cycle_key(self.rules()?.plan.cycle_at(at)?.start))
    }

    /// Whether the counters of the cycle keyed `cycle_start` must be loaded with
    /// [`BatchBooks::load`] before an admission in it.
    pub(crate) fn needs(&self, cycle_start: i64) -> bool {
        !self.cycles.contains_key(&cycle_start)
    }

    /// Take in the stored counters of the cycle keyed `cycle_start`, plus the
    /// changes the batch has made to them so far. Needs the rules.
    ///
    /// Errors: [`StoreError::Database`] when the rules were not loaded.
    pub(crate) fn load(
        &mut self,
        cycle_start: i64,
        counters: &[CounterRow],
    ) -> Result<(), StoreError> {
        let (workspace, models) = super::books::model_states(counters, &self.rules()?.limits);
        let mut books = CycleBooks { workspace, models };
        for ((cycle, model), (spent, reserved)) in &self.changes {
            if *cycle == cycle_start {
                books.add(model, *spent, *reserved);
            }
        }
        self.cycles.insert(cycle_start, books);
        Ok(())
    }

    /// Decide `request` (R6) and, when admitted, hold its reservation in the books.
    /// The cycle of `request.now` must be loaded.
    ///
    /// Errors: [`StoreError::NotFound`] when the model left the catalog.
    pub(crate) fn reserve(&mut self, request: &ReserveRequest) -> Result<Decision, StoreError> {
        let cycle = self.rules()?.plan.cycle_at(request.now)?;
        let key = cycle_key(cycle.start);
        let requested = request
            .catalog
            .get(&request.model)
            .ok_or(StoreError::NotFound { what: "model" })?;
        let snapshot = self.snapshot(key, cycle.end)?;
        let (served, amount) =
            match admit(&snapshot, &request.catalog, requested, &request.estimate) {
                Admission::Admit { model, reservation } => (model, reservation),
                Admission::Fallback {
                    to, reservation, ..
                } => (to, reservation),
                Admission::Block(blocked) => return Ok(Decision::Block(blocked)),
            };
        let prices = request
            .catalog
            .get(&served)
            .ok_or(StoreError::NotFound { what: "model" })?
            .prices;
        self.change(key, served.as_str(), 0, amount.get());
        Ok(Decision::Admit(Box::new(NewReservation {
            reservation: Reservation {
                // Time-ordered (version 7), so new ids go to the end of the
                // reservations' and the ledger's key indexes instead of a random
                // page each; 74 random bits keep them unguessable.
                id: ReservationId(uuid::Uuid::now_v7().to_string()),
                requested: request.model.clone(),
                served,
                amount,
                cycle,
            },
            cycle_start: key,
            prices,
        })))
    }

    /// Whether finished usage of known `cost` on `model` fits the plan and the
    /// model's cap at `at` (R6 without fallback: the usage already happened). The
    /// cycle of `at` must be loaded.
    ///
    /// Errors: [`StoreError`] when `at` is outside the calendar or its cycle was
    /// not loaded; a refusal is the inner `Err`.
    pub(crate) fn admit_known_cost(
        &self,
        at: chrono::DateTime<chrono::Utc>,
        model: &app::domain::Model,
        cost: Nanos,
    ) -> Result<Result<(), app::domain::Blocked>, StoreError> {
        let cycle = self.rules()?.plan.cycle_at(at)?;
        let snapshot = self.snapshot(cycle_key(cycle.start), cycle.end)?;
        Ok(app::domain::admit_known_cost(&snapshot, model, cost))
    }

    /// Add `spent` and `reserved` (nano-euros, either sign) to `model`'s and the
    /// workspace's counters of the cycle keyed `cycle_start`.
    pub(crate) fn change(&mut self, cycle_start: i64, model: &str, spent: i64, reserved: i64) {
        if let Some(books) = self.cycles.get_mut(&cycle_start) {
            books.add(model, spent, reserved);
        }
        let total = self
            .changes
            .entry((cycle_start, model.to_owned()))
            .or_default();
        total.0 = total.0.saturating_add(spent);
        total.1 = total.1.saturating_add(reserved);
    }

    /// The counters' changes to write: `(cycle_start, model id, spent, reserved)`,
    /// nano-euros. The workspace's total row is changed along with each model's.
    pub(crate) fn changes(&self) -> Vec<(i64, &str, i64, i64)> {
        let mut changes: Vec<_> = self
            .changes
            .iter()
            .filter(|(_, (spent, reserved))| *spent != 0 || *reserved != 0)
            .map(|((cycle, model), (spent, reserved))| (*cycle, model.as_str(), *spent, *reserved))
            .collect();
        // A fixed order, so two writers touch rows in the same order.
        changes.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        changes
    }

    /// What admission reads, as the batch has left the loaded cycle `cycle_start`.
    fn snapshot(
        &self,
        cycle_start: i64,
        resets_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Snapshot<'_>, StoreError> {
        let rules = self.rules()?;
        let books = self.cycles.get(&cycle_start).ok_or_else(not_loaded)?;
        Ok(Snapshot {
            plan: rules.plan.amounts,
            automatic_fallback: rules.automatic_fallback,
            workspace: books.workspace,
            models: &books.models,
            resets_at,
            timezone: rules.plan.timezone,
        })
    }
}

fn not_loaded() -> StoreError {
    StoreError::Database("the books were used before they were read".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::domain::{BillingCycle, Catalog, TokenEstimate};
    use chrono::{NaiveDate, Utc};
    use std::sync::Arc;

    fn request() -> ReserveRequest {
        ReserveRequest {
            catalog: Arc::new(Catalog::new(vec![]).unwrap()),
            model: ModelId::new("m"),
            estimate: TokenEstimate {
                prompt_tokens: 1,
                output_cap: Some(1),
                n: 1,
            },
            spender: app::store::Spender::default(),
            owner: "test".into(),
            lease_until: Utc::now(),
            now: Utc::now(),
        }
    }

    #[test]
    fn a_reservation_nobody_waits_for_is_skipped_or_released() {
        let (reply, answer) = oneshot::channel();
        let op = Op::Reserve(Box::new(request()), reply);
        assert!(!op.abandoned());
        drop(answer);
        // Gone before its batch ran: it is not made at all.
        assert!(op.abandoned());

        // Gone after it was admitted: the batcher must release it.
        let cycle = BillingCycle::containing(
            NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            chrono_tz::UTC,
            Utc::now(),
        )
        .unwrap();
        let admitted = Reservation {
            id: ReservationId("r1".into()),
            requested: ModelId::new("m"),
            served: ModelId::new("m"),
            amount: Nanos::new(5),
            cycle,
        };
        let orphans = answer_all(
            vec![op],
            vec![Answer::Reserve(Ok(ReserveOutcome::Admitted(admitted)))],
        );
        assert_eq!(orphans, [ReservationId("r1".into())]);

        // A caller still waiting gets its answer; nothing to release.
        let (reply, answer) = oneshot::channel();
        let blocked_or_not = answer_all(
            vec![Op::Release(ReservationId("r2".into()), Some(reply))],
            vec![Answer::Release(Ok(()))],
        );
        assert!(blocked_or_not.is_empty());
        assert!(matches!(answer.blocking_recv(), Ok(Ok(()))));
    }

    #[tokio::test]
    async fn a_loan_that_changed_nothing_keeps_the_books() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let batcher = {
            let seen = seen.clone();
            Batcher::spawn(
                || async { Ok(()) },
                move |writer: Writer<()>, ops: Vec<Op>| {
                    seen.lock().unwrap().push(writer.books.is_some());
                    let answers = ops.iter().map(|_| Answer::Release(Ok(()))).collect();
                    let orphans = answer_all(ops, answers);
                    let books = Some(BatchBooks::default());
                    async move { (Some(Writer { conn: (), books }), orphans) }
                },
            )
        };
        let id = ReservationId("r".into());
        // A new connection has no books; the next batch gets the first one's.
        batcher.release(id.clone()).await.unwrap();
        batcher.release(id.clone()).await.unwrap();
        let mut lent = batcher.lend().await.unwrap();
        lent.books_unchanged();
        drop(lent);
        batcher.release(id.clone()).await.unwrap();
        drop(batcher.lend().await.unwrap());
        batcher.release(id).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [false, true, true, false]);
    }
}
