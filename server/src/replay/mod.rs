//! Replaying real traffic (DESIGN.md §8): the Azure LLM trace of 2023 sent through
//! a running gateway, compressed in time, with one model per service, to the
//! [`mock`] upstream that answers each request with the trace's token counts.
//!
//! [`send`] drives the requests and keeps each one's outcome; [`Summary::new`] adds
//! the books (spend by model from the counters, and whether the ledger's sum
//! equals them to the nano-euro) and prices the admitted requests from the trace,
//! as a cross-check of the books.

pub mod mock;
pub mod trace;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use app::domain::{cost, format_eur, Catalog, Nanos, Usage};
use app::store::SharedStore;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

pub use trace::{Service, TraceRequest};

use crate::gateway::SERVED_MODEL_HEADER;

/// How to replay; also the flags of `tollgate replay run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// The gateway's base URL (requests go to `{gateway}/v1/chat/completions`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// The API key to send (from `tollgate key create`).
    #[arg(long)]
    pub key: String,
    /// Time compression: 60 plays the hour in about a minute (1–3600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub speedup: u32,
    /// The model the code service's requests ask for.
    #[arg(long, default_value = "gpt-5")]
    pub code_model: String,
    /// The model the conversation service's requests ask for.
    #[arg(long, default_value = "claude-sonnet-4-5")]
    pub conversation_model: String,
    /// Percentage of requests streamed (0–100): in every 100 consecutive
    /// requests, the first this many.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub stream_percent: u8,
    /// Replay only the trace's first MINUTES (1–60, trace time); default: the
    /// whole hour.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub minutes: Option<u32>,
    /// Requests in flight at most (1–4096); later ones wait and fall behind
    /// schedule.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub max_in_flight: u16,
}

impl ReplayOptions {
    /// The model `service`'s requests ask for.
    pub fn model_for(&self, service: Service) -> &str {
        match service {
            Service::Code => &self.code_model,
            Service::Conversation => &self.conversation_model,
        }
    }

    /// The requests of `trace` this replay sends: its first [`Self::minutes`].
    pub fn select<'t>(&self, trace: &'t [TraceRequest]) -> &'t [TraceRequest] {
        match self.minutes {
            None => trace,
            Some(minutes) => {
                let end = Duration::from_secs(u64::from(minutes) * 60);
                let count = trace.partition_point(|r| r.offset < end);
                &trace[..count]
            }
        }
    }
}

/// What the gateway did with one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Answered 200 by `served` (from `x-tollgate-model`).
    Served {
        /// The served model.
        served: String,
        /// Whether it differs from the requested model (R6 fallback).
        fallback: bool,
    },
    /// Answered with an error: `code` is the OpenAI-shaped body's `error.code`
    /// (`plan_limit_reached`, `model_limit_reached`, …) or `http_<status>`.
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
    },
    /// No HTTP answer, or a stream that broke off.
    Failed {
        /// What happened.
        message: String,
    },
}

/// One replayed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sent {
    /// Position in the replayed part of the trace.
    pub index: usize,
    /// Its service.
    #[serde(serialize_with = "service_name")]
    pub service: Service,
    /// The model asked for.
    pub requested: String,
    /// The trace's prompt tokens (what the mock reports).
    pub prompt_tokens: u64,
    /// The trace's completion tokens (asked for, and what the mock reports).
    pub completion_tokens: u64,
    /// Whether it was streamed.
    pub stream: bool,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Time from sending to the answer's last byte, microseconds.
    pub latency_us: u64,
    /// The gateway's own time (its total minus the upstream's, from its
    /// `Server-Timing` header), microseconds; non-streamed answers only.
    pub gateway_us: Option<u64>,
}

fn service_name<S: serde::Serializer>(service: &Service, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(service.as_str())
}

/// Every request's outcome, and the replay's wall time.
#[derive(Debug, Clone)]
pub struct Report {
    /// In trace order.
    pub sent: Vec<Sent>,
    /// From the first request sent to the last answer.
    pub wall: Duration,
}

/// Sends the selected part of `trace` through the gateway on the trace's schedule,
/// divided by `options.speedup`, and waits for every answer.
///
/// Errors: only when the HTTP client cannot be built; each request's failure is
/// an [`Outcome`].
pub async fn send(trace: &[TraceRequest], options: &ReplayOptions) -> anyhow::Result<Report> {
    let requests = options.select(trace);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::from(options.max_in_flight))
        .build()?;
    let url = format!(
        "{}/v1/chat/completions",
        options.gateway.trim_end_matches('/')
    );
    let longest = requests.iter().map(|r| r.prompt_tokens).max().unwrap_or(0);
    // One prompt text for all: its first `prompt_tokens` bytes are each request's
    // message, so the gateway's byte bound covers the trace's count (R7).
    let filler = "x".repeat(usize::try_from(longest).unwrap_or(0));
    let in_flight = Arc::new(Semaphore::new(usize::from(options.max_in_flight.max(1))));
    let speedup = options.speedup.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let wall = Instant::now();
    for (index, request) in requests.iter().copied().enumerate() {
        tokio::time::sleep_until(start + request.offset / speedup).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let stream = index % 100 < usize::from(options.stream_percent);
        let model = options.model_for(request.service).to_owned();
        let body = json!({
            "model": model,
            "messages": [{
                "role": "user",
                "content": &filler[..usize::try_from(request.prompt_tokens).unwrap_or(0)],
            }],
            "max_completion_tokens": request.completion_tokens,
            "stream": stream,
            "metadata": {
                mock::PROMPT_TOKENS_KEY: request.prompt_tokens.to_string(),
                mock::COMPLETION_TOKENS_KEY: request.completion_tokens.to_string(),
            },
        });
        let call = client
            .post(&url)
            .bearer_auth(&options.key)
            .header("content-type", "application/json")
            .body(body.to_string());
        tasks.spawn(async move {
            let sent = Instant::now();
            let (outcome, gateway_time) = exchange(call, &model).await;
            drop(permit);
            Sent {
                index,
                service: request.service,
                requested: model,
                prompt_tokens: request.prompt_tokens,
                completion_tokens: request.completion_tokens,
                stream,
                outcome,
                latency_us: micros(sent.elapsed()),
                gateway_us: gateway_time.map(micros),
            }
        });
    }
    let mut sent: Vec<Sent> = tasks.join_all().await;
    let wall = wall.elapsed();
    sent.sort_by_key(|s| s.index);
    Ok(Report { sent, wall })
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// One request and its answer, read to the last byte: the outcome, and the
/// gateway's own time from its `Server-Timing` header (non-streamed answers).
pub async fn exchange(
    call: reqwest::RequestBuilder,
    requested: &str,
) -> (Outcome, Option<Duration>) {
    let failed = |e: reqwest::Error| {
        let message = e.without_url().to_string();
        (Outcome::Failed { message }, None)
    };
    let response = match call.send().await {
        Ok(response) => response,
        Err(e) => return failed(e),
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return failed(e),
    };
    if !status.is_success() {
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("http_{}", status.as_u16()));
        return (
            Outcome::Refused {
                status: status.as_u16(),
                code,
            },
            None,
        );
    }
    let is_stream = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_stream && !body.ends_with(b"data: [DONE]\n\n") {
        return (
            Outcome::Failed {
                message: "the stream ended without [DONE]".into(),
            },
            None,
        );
    }
    let served = headers
        .get(SERVED_MODEL_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let gateway_time = headers
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| server_timing(v, "gateway"));
    (
        Outcome::Served {
            fallback: served != requested,
            served,
        },
        gateway_time,
    )
}

/// The `dur` (milliseconds, decimal) of metric `name` in a `Server-Timing` value.
fn server_timing(value: &str, name: &str) -> Option<Duration> {
    value.split(',').find_map(|metric| {
        let mut parts = metric.trim().split(';');
        (parts.next()? == name).then_some(())?;
        let millis = parts.find_map(|p| p.trim().strip_prefix("dur="))?;
        let nanos = millis.parse::<Decimal>().ok()? * Decimal::from(1_000_000);
        Some(Duration::from_nanos(u64::try_from(nanos.trunc()).ok()?))
    })
}

/// One model's line of the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSpend {
    /// The model.
    pub model: String,
    /// What the replay added to its spend in the counters, nano-euros.
    pub books_nanos: i64,
    /// Its admitted requests priced from the trace's tokens, nano-euros.
    pub priced_nanos: i64,
    /// Requests served by it.
    pub requests: u64,
}

/// What the replay prints at the end (and writes as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Requests sent.
    pub sent: u64,
    /// Answered by the requested model.
    pub served_requested: u64,
    /// Answered by a fallback model (R6).
    pub served_fallback: u64,
    /// Refused, by error code.
    pub refused: BTreeMap<String, u64>,
    /// No answer or a broken stream.
    pub failed: u64,
    /// Spend by model, dearest spend first.
    pub models: Vec<ModelSpend>,
    /// What the replay added to the workspace's spend in the counters, nano-euros.
    pub total_books_nanos: i64,
    /// The workspace's spend in the cycle, replay and earlier usage, nano-euros.
    pub cycle_spent_nanos: i64,
    /// All admitted requests priced from the trace, nano-euros.
    pub total_priced_nanos: i64,
    /// The ledger's sum for the whole cycle, nano-euros.
    pub ledger_nanos: i64,
    /// Whether the ledger equals the counters, for the workspace and every model.
    pub ledger_equals_counters: bool,
    /// Reserved in the counters after the replay, nano-euros (0 when all settled).
    pub reserved_nanos: i64,
    /// The status line of the cycle (R4), as the tab shows it, after the replay.
    pub status: String,
    /// Wall time, milliseconds.
    pub wall_ms: u64,
    /// Answers per second of wall time.
    pub requests_per_second: String,
    /// Latency seen by the replay, p50 and p99, microseconds: of every request
    /// sent, refused and streamed ones included (so not comparable with the
    /// added latency, which is measured on non-streamed answers only).
    pub latency_p50_us: u64,
    /// See `latency_p50_us`.
    pub latency_p99_us: u64,
    /// The gateway's added latency (non-streamed answers), p50, microseconds.
    pub added_p50_us: u64,
    /// See `added_p50_us`.
    pub added_p99_us: u64,
}

impl Summary {
    /// The summary of `report`: what the replay added to the books of the cycle
    /// containing `now` (spend now minus `before`, from [`books_before`]), and
    /// whether the cycle's ledger equals its counters.
    ///
    /// Errors: the store's, or a served model outside `catalog`.
    pub async fn new(
        report: &Report,
        before: &Books,
        store: &SharedStore,
        catalog: &Catalog,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Summary> {
        let mut refused = BTreeMap::new();
        let (mut served_requested, mut served_fallback, mut failed) = (0, 0, 0);
        let mut priced: BTreeMap<String, (Nanos, u64)> = BTreeMap::new();
        for sent in &report.sent {
            match &sent.outcome {
                Outcome::Served { served, fallback } => {
                    if *fallback {
                        served_fallback += 1;
                    } else {
                        served_requested += 1;
                    }
                    let model = catalog.resolve(served).ok_or_else(|| {
                        anyhow::anyhow!(
                            "the gateway served {served:?}, which is not in the catalog"
                        )
                    })?;
                    let usage = Usage {
                        prompt_tokens: sent.prompt_tokens,
                        completion_tokens: sent.completion_tokens,
                        ..Usage::default()
                    };
                    let nanos = cost(&model.prices, &usage)?.to_nanos_rounded()?;
                    let line = priced.entry(model.id.to_string()).or_default();
                    line.0 = line
                        .0
                        .checked_add(nanos)
                        .ok_or_else(|| anyhow::anyhow!("spend overflow"))?;
                    line.1 += 1;
                }
                Outcome::Refused { code, .. } => *refused.entry(code.clone()).or_insert(0) += 1,
                Outcome::Failed { .. } => failed += 1,
            }
        }

        let snapshot = store.spend_snapshot(now).await?;
        let ledger = store.ledger_totals(snapshot.cycle.start).await?;
        let counters = spent_by_model(&snapshot);
        if before.cycle_start != snapshot.cycle.start {
            anyhow::bail!(
                "a new billing cycle began during the replay: its spend cannot be compared"
            );
        }
        let books: BTreeMap<String, i64> = counters
            .iter()
            .map(|(id, spent)| {
                (
                    id.clone(),
                    spent - before.spent.get(id).copied().unwrap_or(0),
                )
            })
            .filter(|(_, added)| *added != 0)
            .collect();
        let ledger_by_model: BTreeMap<String, i64> = ledger
            .by_model
            .iter()
            .filter(|(_, n)| n.get() != 0)
            .map(|(id, n)| (id.to_string(), n.get()))
            .collect();
        let ledger_equals_counters =
            ledger.total == snapshot.workspace.spent && ledger_by_model == counters;

        let mut names: Vec<&String> = books.keys().chain(priced.keys()).collect();
        names.sort();
        names.dedup();
        let mut models: Vec<ModelSpend> = names
            .into_iter()
            .map(|name| {
                let (priced, requests) = priced.get(name).copied().unwrap_or_default();
                ModelSpend {
                    model: name.clone(),
                    books_nanos: books.get(name).copied().unwrap_or(0),
                    priced_nanos: priced.get(),
                    requests,
                }
            })
            .collect();
        models.sort_by(|a, b| {
            b.books_nanos
                .cmp(&a.books_nanos)
                .then(a.model.cmp(&b.model))
        });
        let total_priced_nanos = models.iter().map(|m| m.priced_nanos).sum();
        let status = app::domain::Status::of(&snapshot.plan.amounts, snapshot.workspace.spent);

        let mut latencies: Vec<u64> = report.sent.iter().map(|s| s.latency_us).collect();
        let mut added: Vec<u64> = report.sent.iter().filter_map(|s| s.gateway_us).collect();
        latencies.sort_unstable();
        added.sort_unstable();
        let answered = report
            .sent
            .iter()
            .filter(|s| !matches!(s.outcome, Outcome::Failed { .. }))
            .count();
        Ok(Summary {
            sent: report.sent.len() as u64,
            served_requested,
            served_fallback,
            refused,
            failed,
            models,
            total_books_nanos: snapshot.workspace.spent.get() - before.total,
            cycle_spent_nanos: snapshot.workspace.spent.get(),
            total_priced_nanos,
            ledger_nanos: ledger.total.get(),
            ledger_equals_counters,
            reserved_nanos: snapshot.workspace.reserved.get(),
            status: status.label().to_owned(),
            wall_ms: u64::try_from(report.wall.as_millis()).unwrap_or(u64::MAX),
            requests_per_second: per_second(answered, report.wall),
            latency_p50_us: percentile(&latencies, 50),
            latency_p99_us: percentile(&latencies, 99),
            added_p50_us: percentile(&added, 50),
            added_p99_us: percentile(&added, 99),
        })
    }

    /// Whether the books agree with themselves and with the trace: ledger equals
    /// counters, nothing is left reserved, and every model's spend equals its
    /// admitted requests priced from the trace.
    pub fn books_agree(&self) -> bool {
        self.ledger_equals_counters && self.reserved_nanos == 0 && self.counters_equal_priced()
    }

    /// Whether what the replay added to the counters equals its admitted
    /// requests priced from the trace, in total and for every model.
    pub fn counters_equal_priced(&self) -> bool {
        self.total_books_nanos == self.total_priced_nanos
            && self.models.iter().all(|m| m.books_nanos == m.priced_nanos)
    }

    /// Requests that did not go through as the scenario allows: no answer, or
    /// refused for anything but a limit (a bad key, a wrong URL, an upstream error).
    pub fn unexpected(&self) -> u64 {
        self.failed
            + self
                .refused
                .iter()
                .filter(|(code, _)| !LIMIT_CODES.contains(&code.as_str()))
                .map(|(_, count)| count)
                .sum::<u64>()
    }

    /// The summary as the replay prints it.
    pub fn render(&self, options: &ReplayOptions) -> String {
        let eur = |nanos: i64| {
            let money = Nanos::new(nanos).to_money();
            format!("{} ({} EUR)", format_eur(money), money.amount())
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Replay of the Azure LLM trace (2023), {}× faster than real time",
            options.speedup
        );
        let _ = writeln!(
            out,
            "  code → {}, conversation → {}, {}% streamed",
            options.code_model, options.conversation_model, options.stream_percent
        );
        let _ = writeln!(out, "requests sent                 {}", self.sent);
        let _ = writeln!(
            out,
            "  admitted, requested model   {}",
            self.served_requested
        );
        let _ = writeln!(
            out,
            "  admitted, fallback model    {}",
            self.served_fallback
        );
        for (code, count) in &self.refused {
            let _ = writeln!(out, "  blocked, {code:<20} {count}");
        }
        if self.failed > 0 {
            let _ = writeln!(out, "  failed (no answer)          {}", self.failed);
        }
        if self.unexpected() > 0 {
            let _ = writeln!(
                out,
                "  UNEXPECTED: {} requests failed or were refused for another reason than a limit",
                self.unexpected()
            );
        }
        let _ = writeln!(out, "spend by model (added to the counters by this replay)");
        for model in &self.models {
            let _ = writeln!(
                out,
                "  {:<24} {:>7} requests  {}",
                model.model,
                model.requests,
                eur(model.books_nanos)
            );
        }
        let _ = writeln!(
            out,
            "  {:<24} {:>7} requests  {}",
            "total",
            self.served_requested + self.served_fallback,
            eur(self.total_books_nanos)
        );
        if self.cycle_spent_nanos != self.total_books_nanos {
            let _ = writeln!(
                out,
                "  cycle total, earlier usage included       {}",
                eur(self.cycle_spent_nanos)
            );
        }
        let _ = writeln!(out, "status                        {}", self.status);
        let yes = |b: bool| if b { "yes" } else { "NO" };
        let _ = writeln!(
            out,
            "ledger sum = counters         {} (this cycle: ledger {} nano-euros, counters {})",
            yes(self.ledger_equals_counters),
            self.ledger_nanos,
            self.cycle_spent_nanos
        );
        let _ = writeln!(
            out,
            "counters = trace × prices    {} (added {} nano-euros, priced {})",
            yes(self.counters_equal_priced()),
            self.total_books_nanos,
            self.total_priced_nanos
        );
        let _ = writeln!(
            out,
            "left reserved                 {} nano-euros",
            self.reserved_nanos
        );
        let _ = writeln!(
            out,
            "wall time                     {} s, {} requests/s",
            (Decimal::from(self.wall_ms) / Decimal::from(1000)).round_dp(1),
            self.requests_per_second
        );
        let _ = writeln!(
            out,
            "latency seen by the client    p50 {} µs, p99 {} µs (every request, refused ones included)",
            self.latency_p50_us, self.latency_p99_us
        );
        if self.served_requested + self.served_fallback > 0 && self.added_p99_us > 0 {
            let _ = writeln!(
                out,
                "added by the gateway          p50 {} µs, p99 {} µs (non-streamed answers)",
                self.added_p50_us, self.added_p99_us
            );
        } else {
            let _ = writeln!(
                out,
                "added by the gateway          n/a (no non-streamed answer)"
            );
        }
        out
    }
}

/// Error codes of refusals the scenario expects: the limits doing their work (R6).
pub const LIMIT_CODES: [&str; 2] = ["plan_limit_reached", "model_limit_reached"];

/// The counters before a replay, so that its summary shows what it added.
#[derive(Debug, Clone, Default)]
pub struct Books {
    /// The cycle they belong to (its start).
    pub cycle_start: DateTime<Utc>,
    /// Spend per model, nano-euros.
    pub spent: BTreeMap<String, i64>,
    /// The workspace's spend, nano-euros.
    pub total: i64,
}

/// The books of the cycle containing `now`, before a replay.
///
/// Errors: the store's.
pub async fn books_before(store: &SharedStore, now: DateTime<Utc>) -> anyhow::Result<Books> {
    let snapshot = store.spend_snapshot(now).await?;
    Ok(Books {
        cycle_start: snapshot.cycle.start,
        spent: spent_by_model(&snapshot),
        total: snapshot.workspace.spent.get(),
    })
}

fn spent_by_model(snapshot: &app::store::SpendSnapshot) -> BTreeMap<String, i64> {
    snapshot
        .models
        .iter()
        .filter(|m| m.counter.spent.get() != 0)
        .map(|m| (m.id.to_string(), m.counter.spent.get()))
        .collect()
}

/// Checks, before any traffic, that the gateway answers and takes the key
/// (`GET /v1/models`).
///
/// Errors: no answer, or anything but 200, with what the gateway said.
pub async fn probe(options: &ReplayOptions) -> anyhow::Result<()> {
    let url = format!("{}/v1/models", options.gateway.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&options.key)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the gateway at {} does not answer: {}",
                options.gateway,
                e.without_url()
            )
        })?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!(
            "GET {url} answered {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    Ok(())
}

/// The `p`-th percentile (nearest rank) of sorted `values`; 0 when empty.
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// `count / wall` with one decimal, computed exactly.
fn per_second(count: usize, wall: Duration) -> String {
    let micros = Decimal::from(wall.as_micros().max(1) as u64);
    let rate = Decimal::from(count as u64) * Decimal::from(1_000_000) / micros;
    rate.round_dp(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_durations_are_read_exactly() {
        let value = "upstream;dur=12.5, gateway;dur=0.347";
        assert_eq!(
            server_timing(value, "gateway"),
            Some(Duration::from_micros(347))
        );
        assert_eq!(
            server_timing(value, "upstream"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(server_timing(value, "db"), None);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<u64> = (1..=200).collect();
        assert_eq!(percentile(&values, 50), 100);
        assert_eq!(percentile(&values, 99), 198);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn minutes_select_a_prefix_of_the_trace() {
        let trace = trace::embedded().unwrap();
        let options = ReplayOptions {
            gateway: String::new(),
            key: String::new(),
            speedup: 60,
            code_model: "a".into(),
            conversation_model: "b".into(),
            stream_percent: 0,
            minutes: Some(5),
            max_in_flight: 1,
        };
        let selected = options.select(&trace);
        assert!(!selected.is_empty() && selected.len() < trace.len());
        assert!(selected.iter().all(|r| r.offset < Duration::from_secs(300)));
        assert!(trace[selected.len()].offset >= Duration::from_secs(300));
    }
}
