//! The gateway and the usage API over real HTTP on loopback (DESIGN.md §4, R3, R6,
//! R7): the real router on a random port, a store on SQLite (and PostgreSQL when
//! `TEST_DATABASE_URL` is set), and a mock upstream on another port.

#![allow(
    clippy::unwrap_used,
    reason = "a broken fixture should stop the test at once"
)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::{
    collections::HashMap,
    future::Future,
    io::Write as _,
    sync::{Arc, OnceLock},
    time::Duration,
};

use app::{
    domain::{cost, reservation, Counter, ModelId, ModelLimit, Nanos, TokenEstimate, Usage},
    store::{Actor, LimitChange, SharedStore, StoreError},
};
use chrono::Utc;
use common::{lock::WriteLockHolder, Logs, TestDb};
use serde_json::{json, Value};
use server::{
    config::{Config, Overrides},
    db::sqlite::Durability,
    gateway::{upstream::MAX_ANSWER_BYTES, SharedGateway},
};
use tokio::sync::Notify;
use upstream::{MockUpstream, MockUsage};

/// The environment variable the test config names for the upstream key; it is
/// never set in the process: each gateway gets the value through its own lookup.
const KEY_VAR: &str = "TOLLGATE_TEST_UPSTREAM_KEY";

// ---------------------------------------------------------------------------
// Logs: one global subscriber writing into memory, so tests can read every line.

fn captured_logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,server=trace,reqwest=trace,hyper=trace,hyper_util=trace",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    })
    .clone()
}

// ---------------------------------------------------------------------------
// The harness: config, store, key, mock upstream and the real router.

struct Options {
    budget_eur: &'static str,
    timeout_secs: u64,
    max_request_bytes: usize,
    request_body_timeout_secs: u64,
    /// The upstream key's variable ends in a line break, as read from a file.
    upstream_key_line_break: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            budget_eur: "100",
            timeout_secs: 30,
            max_request_bytes: 65_536,
            request_body_timeout_secs: 30,
            upstream_key_line_break: false,
        }
    }
}

/// A counter with `spent` settled and nothing held: the books once every
/// request has ended.
fn settled(spent: Nanos) -> Counter {
    Counter {
        spent,
        reserved: Nanos::ZERO,
    }
}

struct Harness {
    /// `http://127.0.0.1:PORT` of the gateway.
    url: String,
    /// A member's API key.
    key: String,
    /// The upstream key the gateway sends (from its environment lookup).
    upstream_key: String,
    store: SharedStore,
    config: Arc<Config>,
    gateway: SharedGateway,
    mock: MockUpstream,
    client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
    _config_dir: tempfile::TempDir,
}

fn config_text(
    db: &TestDb,
    mock: &MockUpstream,
    options: &Options,
    spool: &std::path::Path,
) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
database_url = "{db}"
settlement_spool = "{spool}"
max_request_bytes = {max}
request_body_timeout_secs = {body_timeout}

[workspace]
name = "Gateway tests"
timezone = "UTC"

[plan]
budget_eur = "{budget}"
overage_eur = "0"
start = "2026-01-01"

[[upstreams]]
name = "mock"
base_url = "{base}"
api_key_env = "{KEY_VAR}"
timeout_secs = {timeout}

[[models]]
id = "big"
display_name = "Big"
upstream = "mock"
upstream_model = "provider-big-2026"
aliases = ["test/big"]
input_eur_per_mtok = "2"
cached_input_eur_per_mtok = "0.5"
output_eur_per_mtok = "10"
max_output_tokens = 1000

[[models]]
id = "mid"
upstream = "mock"
upstream_model = "provider-mid"
input_eur_per_mtok = "0.5"
cached_input_eur_per_mtok = "0.05"
output_eur_per_mtok = "2"
max_output_tokens = 1000

[[models]]
id = "flat"
upstream = "mock"
input_eur_per_mtok = "0"
output_eur_per_mtok = "1"
max_output_tokens = 1000

[[models]]
id = "small"
upstream = "mock"
input_eur_per_mtok = "0.1"
output_eur_per_mtok = "0.5"
max_output_tokens = 1000
"#,
        db = db.url,
        spool = spool.display(),
        max = options.max_request_bytes,
        budget = options.budget_eur,
        base = mock.base_url,
        timeout = options.timeout_secs,
        body_timeout = options.request_body_timeout_secs,
    )
}

async fn start(db: &TestDb, options: Options) -> Harness {
    let _ = captured_logs();
    let mock = MockUpstream::start().await;
    let config_dir = tempfile::tempdir().unwrap();
    let path = config_dir.path().join("tollgate.toml");
    let spool = config_dir.path().join("settlements");
    std::fs::write(&path, config_text(db, &mock, &options, &spool)).unwrap();
    let config = Arc::new(Config::load(Some(&path), &Overrides::default()).unwrap());
    let upstream_key = format!("sk-upstream-{}-DO-NOT-LEAK", uuid::Uuid::new_v4().simple());
    let lookup_key = match options.upstream_key_line_break {
        true => format!("{upstream_key}\r\n"),
        false => upstream_key.clone(),
    };
    let stack = common::Stack::start(config.clone(), move |name| {
        (name == KEY_VAR).then(|| lookup_key.clone())
    })
    .await;
    Harness {
        url: stack.url,
        key: stack.key,
        upstream_key,
        store: stack.store,
        config,
        gateway: stack.gateway,
        mock,
        client: reqwest::Client::new(),
        server: stack.server,
        _config_dir: config_dir,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Harness {
    /// `GET /healthz`: its status and text.
    async fn health(&self) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}/healthz", self.url))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
    }

    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn api(&self, path: &str, body: &Value) -> (u16, Value) {
        self.api_text(path, body.to_string()).await
    }

    /// A streamed chat completion on `big` with `messages` (JSON text) and
    /// `max_tokens` 100, sent exactly so (see [`big_estimate`]): its events'
    /// payloads.
    async fn stream_big(&self, messages: &str) -> Vec<String> {
        let response = self
            .post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"big","messages":{messages},"max_tokens":100,"stream":true}}"#
            ))
            .send()
            .await
            .unwrap();
        sse_payloads(response).await
    }

    /// `POST /api/v1/admissions` with `body`, which must be admitted (200): the
    /// admission.
    async fn admit(&self, body: &Value) -> Value {
        let (status, admission) = self.api("/api/v1/admissions", body).await;
        assert_eq!(status, 200, "{admission}");
        admission
    }

    /// `POST /api/v1/admissions/{id}/{action}` (`settle`, `release`, `renew`)
    /// with `body`, through [`Harness::api`].
    async fn on_admission(&self, id: &str, action: &str, body: &Value) -> (u16, Value) {
        self.api(&format!("/api/v1/admissions/{id}/{action}"), body)
            .await
    }

    /// [`Harness::api`] with a body of any text, valid JSON or not.
    async fn api_text(&self, path: &str, body: String) -> (u16, Value) {
        let response = self
            .post(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The workspace counter and the per-model counters of the current cycle.
    async fn books(&self) -> (Counter, HashMap<String, Counter>) {
        let snapshot = self.store.spend_snapshot(Utc::now()).await.unwrap();
        let models = snapshot
            .models
            .iter()
            .map(|m| (m.id.to_string(), m.counter))
            .collect();
        (snapshot.workspace, models)
    }

    async fn workspace(&self) -> Counter {
        self.books().await.0
    }

    /// Serves one request for `model` and returns the books after it: the
    /// spend of one request, for a test to compare with later.
    async fn serve_one(&self, model: &str) -> Counter {
        let served = self.chat(&chat_body(model)).await;
        assert_eq!(served.status(), 200);
        let _ = served.bytes().await.unwrap();
        let one = self.workspace().await;
        assert!(one.spent > Nanos::ZERO);
        one
    }

    /// The workspace's books once nothing is reserved, waiting up to `within`
    /// for the holds still ending in the background; fails the test if one
    /// is left.
    async fn workspace_once_nothing_is_reserved(&self, within: Duration) -> Counter {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let now = self.workspace().await;
            if now.reserved == Nanos::ZERO {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a hold was left after {within:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Each of `answers` is 503 `database_unavailable`, and none went upstream,
    /// which has seen only the one request served before the outage.
    async fn refused_as_unavailable(&self, answers: Vec<reqwest::Response>) {
        for refused in answers {
            assert_error(refused, 503, "api_error", "database_unavailable", None).await;
        }
        assert_eq!(
            self.mock.received().len(),
            1,
            "the refused requests went nowhere"
        );
    }

    /// Once the database is back after an outage in which every request was
    /// refused, `/healthz` turns `ok` and a request is served; the books then
    /// hold twice `one` (a request's spend before the outage): the refused
    /// requests spent nothing.
    async fn serves_again_spending_only_what_it_served(&self, one: Counter) {
        eventually("/healthz ok once the database is back", || async {
            self.health().await.0 == 200
        })
        .await;
        let served = self.chat(&chat_body("test/big")).await;
        assert_eq!(served.status(), 200);
        let _ = served.bytes().await.unwrap();
        assert_eq!(self.workspace().await, settled(one.spent + one.spent));
    }

    async fn model_counter(&self, id: &str) -> Counter {
        self.books().await.1.get(id).copied().unwrap_or_default()
    }

    /// The cost of `usage` on `model`, nano-euros (R3, rounded once: R2).
    fn cost_of(&self, model: &str, usage: MockUsage) -> Nanos {
        let model = self.config.setup.catalog.resolve(model).unwrap();
        cost(
            &model.prices,
            &Usage {
                prompt_tokens: usage.prompt,
                cached_tokens: usage.cached,
                completion_tokens: usage.completion,
                reasoning_tokens: usage.reasoning,
            },
        )
        .unwrap()
        .to_nanos_rounded()
        .unwrap()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn set_limit(&self, model: &str, eur_nanos: i64) {
        let snapshot = self.store.spend_snapshot(Utc::now()).await.unwrap();
        let version = snapshot
            .models
            .iter()
            .find(|m| m.id.as_str() == model)
            .map_or(0, |m| m.limit.version);
        self.store
            .update_model_limits(
                &Actor::Cli,
                &[LimitChange {
                    model: ModelId::new(model),
                    expected_version: Some(version),
                    limit: ModelLimit {
                        limit: Some(Nanos::new(eur_nanos)),
                        enabled: true,
                    },
                }],
                Utc::now(),
            )
            .await
            .unwrap();
    }

    async fn set_fallback(&self, on: bool) {
        let settings = self
            .store
            .spend_snapshot(Utc::now())
            .await
            .unwrap()
            .settings;
        self.store
            .update_settings(&Actor::Cli, Some(settings.version), on, Utc::now())
            .await
            .unwrap();
    }
}

/// Polls `check` every 20 ms until it holds, failing after 10 s: for effects that
/// land after the response (a settlement after a client left).
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chat_body(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 100,
    })
}

/// Reads an SSE response to its end: the data payloads, in order.
async fn sse_payloads(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    assert!(text.ends_with("\n\n"), "unterminated stream: {text:?}");
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

/// Checks an OpenAI-shaped error answer field by field.
async fn assert_error(
    response: reqwest::Response,
    status: u16,
    kind: &str,
    code: &str,
    param: Option<&str>,
) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON, never HTML"
    );
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(
        error["param"],
        param.map_or(Value::Null, |p| json!(p)),
        "{body}"
    );
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Each route on one usage-API reservation, with a body it accepts: settle
/// (billing the hold), release and renew.
fn admission_actions() -> [(&'static str, Value); 3] {
    [
        ("settle", json!({"usage": null})),
        ("release", json!({})),
        ("renew", json!({})),
    ]
}

/// A 401 for a missing, unknown or revoked API key, OpenAI-shaped.
async fn assert_invalid_api_key(response: reqwest::Response) -> Value {
    assert_error(
        response,
        401,
        "invalid_request_error",
        "invalid_api_key",
        None,
    )
    .await
}

// ---------------------------------------------------------------------------
// Stories, each run on SQLite and (when configured) PostgreSQL.

/// Non-streamed: answered by the served model's upstream under its upstream name,
/// every other field passed through byte for byte, `model` and the header naming
/// the served model, settled before the answer.
async fn non_streaming_round_trip(db: &TestDb) {
    let h = start(db, Options::default()).await;
    // Numbers an f64 would change, in the request and (`score`) in the answer.
    let body = r#"{"model":"test/big","messages":[{"role":"user","content":"Say hello."}],"max_tokens":100,"temperature":0.30000000000000004,"metadata":{"n":123456789012345678901234567890}}"#;
    let response = h
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-model"], "big");
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#""score":0.1000000000000000055511151231257827"#),
        "{text}"
    );
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["model"], "big");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from the mock."
    );

    let received = h.mock.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].body,
        body.replace(r#""model":"test/big""#, r#""model":"provider-big-2026""#),
        "only `model` changes on the way up"
    );

    // Settled before the answer: no polling needed.
    let expected = h.cost_of(
        "big",
        MockUsage {
            prompt: 12,
            completion: 5,
            ..MockUsage::default()
        },
    );
    assert_eq!(expected, Nanos::new(74_000));
    assert_eq!(h.workspace().await, settled(expected));
    assert_eq!(h.model_counter("big").await.spent, expected);

    // The catalog, OpenAI-shaped, behind the same key.
    let models: Value = h
        .client
        .get(format!("{}/v1/models", h.url))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["big", "mid", "flat", "small"]);
    assert_eq!(models["data"][0]["object"], "model");
    let one: Value = h
        .client
        .get(format!("{}/v1/models/test/big", h.url))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "big");
}

/// Streamed: chunks carry the served model, the forced usage chunk reaches only
/// clients that asked for it, `[DONE]` comes last, after settlement.
async fn streaming_round_trip(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let mut body = chat_body("test/big");
    body["stream"] = json!(true);
    let response = h.chat(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-model"], "big");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let payloads = sse_payloads(response).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks.len(), 5, "role, three pieces, finish: {payloads:?}");
    for chunk in &chunks {
        assert_eq!(chunk["model"], "big");
        assert!(
            chunk.get("usage").is_none(),
            "usage was not asked for: {chunk}"
        );
    }
    let upstream_body = h.mock.received()[0].json();
    assert_eq!(upstream_body["model"], "provider-big-2026");
    assert_eq!(upstream_body["stream_options"]["include_usage"], true);
    let one = h.cost_of(
        "big",
        MockUsage {
            prompt: 12,
            completion: 5,
            ..MockUsage::default()
        },
    );
    // `[DONE]` was read, so the settlement is in the books already.
    assert_eq!(h.workspace().await, settled(one));

    // A client that asks for usage gets the usage chunk, with the served model.
    body["stream_options"] = json!({"include_usage": true});
    let payloads = sse_payloads(h.chat(&body).await).await;
    let usage_chunk: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 12);
    assert_eq!(usage_chunk["model"], "big");
    assert_eq!(h.workspace().await, settled(Nanos::new(2 * one.get())));
}

/// The same request costs the same streamed and not, to the nano-euro (§4), here
/// with cached and reasoning tokens priced per R3 (checked in the counters, the
/// ledger and the metrics).
async fn streamed_and_not_streamed_cost_the_same(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let usage = MockUsage {
        prompt: 1_000,
        cached: 400,
        completion: 300,
        reasoning: 200,
    };
    h.mock.set(|b| b.usage = usage);
    // (1000 − 400) × 2 + 400 × 0.5 + 300 × 10 = 4400 EUR per 1M tokens; the 200
    // reasoning tokens are inside the 300 output tokens and are not billed twice.
    let one = Nanos::new(4_400_000);
    assert_eq!(h.cost_of("big", usage), one);
    // Listed before any request, at zero.
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("tollgate_spend_nanoeuros_total{model=\"big\"} 0\n"),
        "{metrics}"
    );

    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    let after_plain = h.workspace().await.spent;

    let mut body = chat_body("big");
    body["stream"] = json!(true);
    let _ = sse_payloads(h.chat(&body).await).await;
    let after_stream = h.workspace().await.spent;

    assert_eq!(after_plain, one);
    assert_eq!(Nanos::new(after_stream.get() - after_plain.get()), one);
    let snapshot = h.store.spend_snapshot(Utc::now()).await.unwrap();
    let ledger = h.store.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!(ledger.events, 2);
    assert_eq!(ledger.total, Nanos::new(2 * one.get()));
    assert_eq!(snapshot.workspace.reserved, Nanos::ZERO);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("tollgate_spend_nanoeuros_total{model=\"big\"} 8800000"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_settlements_total{kind=\"usage\",model=\"big\"} 2"),
        "{metrics}"
    );
}

/// 50 concurrent requests against a plan that admits exactly 10 (R6, R7): 10 are
/// served, 40 get 429 `plan_limit_reached` with `x-should-retry: false`, and the
/// spend is exactly 10 requests' cost.
async fn fifty_concurrent_requests_against_a_plan_for_ten(db: &TestDb) {
    // On `flat` (input free, 1 EUR per 1M output tokens) a request capped at 1000
    // output tokens reserves 0.001 EUR and, using all 1000, costs exactly that: the
    // allowance of 0.01 EUR admits exactly 10 whatever the timing.
    let h = start(
        db,
        Options {
            budget_eur: "0.01",
            ..Options::default()
        },
    )
    .await;
    h.mock.set(|b| {
        b.usage = MockUsage {
            prompt: 9,
            completion: 1_000,
            ..MockUsage::default()
        }
    });
    let mut body = chat_body("flat");
    body["max_tokens"] = json!(1_000);
    let body = Arc::new(body);
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let client = h.client.clone();
            let url = format!("{}/v1/chat/completions", h.url);
            let key = h.key.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let response = client
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let retry = response
                    .headers()
                    .get("x-should-retry")
                    .map(|v| v.to_str().unwrap().to_owned());
                let answer: Value = response.json().await.unwrap();
                (status, retry, answer)
            })
        })
        .collect();
    let mut served = 0;
    let mut blocked = 0;
    for request in requests {
        let (status, retry, answer) = request.await.unwrap();
        match status {
            200 => {
                served += 1;
                assert_eq!(answer["model"], "flat");
            }
            429 => {
                blocked += 1;
                assert_eq!(retry.as_deref(), Some("false"));
                assert_eq!(answer["error"]["type"], "insufficient_quota");
                assert_eq!(answer["error"]["code"], "plan_limit_reached");
                assert_eq!(answer["error"]["param"], Value::Null);
            }
            other => panic!("unexpected status {other}: {answer}"),
        }
    }
    assert_eq!((served, blocked), (10, 40));
    assert_eq!(h.mock.received().len(), 10);
    assert_eq!(h.workspace().await, settled(Nanos::new(10_000_000)));
    let metrics = h.metrics().await;
    for line in [
        "tollgate_requests_total{endpoint=\"chat_completions\",model=\"flat\",outcome=\"ok\"} 10",
        "tollgate_requests_total{endpoint=\"chat_completions\",model=\"flat\",outcome=\"plan_limit_reached\"} 40",
        "tollgate_admissions_total{outcome=\"admitted\",requested_model=\"flat\",served_model=\"flat\"} 10",
        "tollgate_admissions_total{outcome=\"plan_limit_reached\",requested_model=\"flat\",served_model=\"\"} 40",
        "tollgate_spend_nanoeuros_total{model=\"flat\"} 10000000",
        "tollgate_upstream_duration_seconds_count{model=\"flat\",stream=\"false\"} 10",
        "tollgate_gateway_overhead_seconds_count{endpoint=\"chat_completions\",stream=\"false\"} 10",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

/// A model cap reached with fallback on: the most expensive strictly cheaper model
/// with room serves it, says so, and is charged (R6).
async fn model_cap_falls_back_to_the_dearest_cheaper_model_with_room(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.set_limit("big", 0).await;
    let response = h.chat(&chat_body("test/big")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-model"], "mid");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "mid");
    assert_eq!(h.mock.received()[0].json()["model"], "provider-mid");
    let on_mid = h.cost_of(
        "mid",
        MockUsage {
            prompt: 12,
            completion: 5,
            ..MockUsage::default()
        },
    );
    assert_eq!(h.model_counter("mid").await.spent, on_mid);
    assert_eq!(h.model_counter("big").await, Counter::default());

    // With `mid` capped too, `flat` (output 1) serves, not the cheaper `small`.
    h.set_limit("mid", 0).await;
    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.headers()["x-tollgate-model"], "flat");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "flat");
    assert!(h.model_counter("flat").await.spent > Nanos::ZERO);
    assert_eq!(h.model_counter("small").await, Counter::default());
    assert!(h.metrics().await.contains(
        "tollgate_admissions_total{outcome=\"fallback\",requested_model=\"big\",served_model=\"flat\"} 1"
    ));
}

/// The same cap with fallback off: 429 `model_limit_reached`, nothing held.
async fn model_cap_without_fallback_blocks(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.set_limit("big", 0).await;
    h.set_fallback(false).await;
    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_error(
        response,
        429,
        "insufficient_quota",
        "model_limit_reached",
        None,
    )
    .await;
    assert!(h.mock.received().is_empty());
    assert_eq!(h.workspace().await, Counter::default());
}

/// Upstream failures release the hold: a 500 is a 502, an upstream 4xx is passed
/// on, and nothing is spent (R7).
async fn upstream_errors_release_the_reservation(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| b.status = 500);
    let response = h.chat(&chat_body("big")).await;
    assert!(response.headers().get("retry-after").is_none());
    assert_error(response, 502, "api_error", "upstream_error", None).await;
    // An overloaded provider's wait is passed on with the 502.
    h.mock.set(|b| {
        b.status = 503;
        b.retry_after = Some(("7", "7000"));
    });
    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.headers()["retry-after-ms"], "7000");
    let body = assert_error(response, 502, "api_error", "upstream_error", None).await;
    assert_eq!(
        body["error"]["message"],
        "The model provider failed (HTTP 503)."
    );
    h.mock.set(|b| {
        b.status = 500;
        b.retry_after = None;
    });
    let mut body = chat_body("big");
    body["stream"] = json!(true);
    let response = h.chat(&body).await;
    assert_error(response, 502, "api_error", "upstream_error", None).await;

    let upstream_error = json!({"error": {"message": "Invalid value for 'temperature'.",
        "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}});
    h.mock.set(|b| {
        b.status = 400;
        b.error_body = upstream_error.to_string();
    });
    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap(), upstream_error);

    // The provider's own rate limit: its 429 and when to try again, passed on.
    let rate_limited = json!({"error": {"message": "Rate limit reached.",
        "type": "requests", "param": null, "code": "rate_limit_exceeded"}});
    h.mock.set(|b| {
        b.status = 429;
        b.error_body = rate_limited.to_string();
        b.retry_after = Some(("3", "2500"));
    });
    let response = h.chat(&chat_body("big")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(response.headers()["retry-after-ms"], "2500");
    assert!(response.headers().get("x-should-retry").is_none());
    assert_eq!(response.json::<Value>().await.unwrap(), rate_limited);
    // An HTTP date is a Retry-After too; values a client cannot read are dropped.
    for (seconds, millis, kept) in [
        ("Fri, 04 Dec 2026 16:00:00 GMT", "-5", true),
        ("1.5", "abc", false),
        ("-5", "99999999999999999999", false),
    ] {
        h.mock.set(|b| b.retry_after = Some((seconds, millis)));
        let response = h.chat(&chat_body("big")).await;
        assert_eq!(response.status(), 429);
        let headers = response.headers();
        assert_eq!(headers.get("retry-after").is_some(), kept, "{seconds}");
        assert!(headers.get("retry-after-ms").is_none(), "{millis}");
    }

    // The gateway's own key refused: no work was done, whatever usage the body
    // claims.
    h.mock.set(|b| {
        b.status = 401;
        b.retry_after = None;
        b.error_body = r#"{"error":{"message":"bad key"},"usage":{"prompt_tokens":1000,"completion_tokens":500}}"#.into();
    });
    let response = h.chat(&chat_body("big")).await;
    assert_error(response, 502, "api_error", "upstream_error", None).await;

    assert_eq!(h.mock.received().len(), 9);
    assert_eq!(h.workspace().await, Counter::default());
    assert!(h
        .metrics()
        .await
        .contains("tollgate_settlements_total{kind=\"released\",model=\"big\"} 9"));

    // A 200 that is no chat completion (an error object, say): nothing a
    // client could use, and no usage to bill.
    h.mock.set(|b| {
        b.status = 200;
        b.retry_after = None;
        b.answer_body = Some(r#"{"error":{"message":"oops","type":"server_error"}}"#.into());
    });
    let response = h.chat(&chat_body("big")).await;
    assert_error(response, 502, "api_error", "upstream_error", None).await;
    assert_eq!(h.workspace().await, Counter::default());
}

/// An upstream that answers with a redirect (a `base_url` that moved, or
/// `http://` to a provider that wants `https://`) gets a 502 that says so: the
/// gateway does not follow it, since a 301 or 302 followed turns the completion
/// into a GET, and the key would go to an address nobody configured.
async fn an_upstream_redirect_is_not_followed(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let elsewhere = MockUpstream::start().await;
    for status in [301, 307, 308] {
        h.mock.set(|b| {
            b.status = status;
            // A body that reports usage: a redirect is no answer, so it is not billed.
            b.error_body = r#"{"usage":{"prompt_tokens":1000,"completion_tokens":500}}"#.into();
            b.location = Some(format!("{}/chat/completions", elsewhere.base_url));
        });
        let response = h.chat(&chat_body("big")).await;
        let body = assert_error(response, 502, "api_error", "upstream_error", None).await;
        assert_eq!(
            body["error"]["message"],
            format!(
                "The model provider answered with a redirect (HTTP {status}), which the gateway \
                 does not follow; the operator has to check the upstream's address."
            )
        );
    }
    assert!(elsewhere.received().is_empty());
    assert_eq!(h.mock.received().len(), 3);
    assert_eq!(h.workspace().await, Counter::default());
    // 304 and 305 move nothing: failures like any other status, and no answer
    // either, so the usage a body claims is not billed.
    h.mock.set(|b| {
        b.status = 305;
        b.location = None;
    });
    let response = h.chat(&chat_body("big")).await;
    let body = assert_error(response, 502, "api_error", "upstream_error", None).await;
    assert_eq!(
        body["error"]["message"],
        "The model provider failed (HTTP 305)."
    );
    assert_eq!(h.workspace().await, Counter::default());
}

/// An answer larger than the gateway reads (`MAX_ANSWER_BYTES`) is not read on,
/// so that an upstream cannot fill the gateway's memory: the client gets a 502
/// that says so, and the request, served upstream, is billed its estimate. An
/// error that large is released, its body unread.
async fn an_answer_larger_than_the_gateway_reads_is_not_read_on(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| {
        b.content = "x".repeat(MAX_ANSWER_BYTES);
        b.record_requests = false;
    });
    let response = h.chat(&chat_body("big")).await;
    let body = assert_error(response, 502, "api_error", "upstream_error", None).await;
    assert_eq!(
        body["error"]["message"],
        "The model provider's answer is larger than the 16 MiB the gateway reads."
    );
    let estimate = big_estimate(&h, r#"[{"role":"user","content":"Say hello."}]"#);
    assert_eq!(h.workspace().await, settled(estimate));
    h.mock.set(|b| {
        b.status = 500;
        b.error_body = format!(
            r#"{{"usage":{{"prompt_tokens":10,"completion_tokens":5}},"pad":"{}"}}"#,
            "x".repeat(MAX_ANSWER_BYTES)
        );
    });
    let response = h.chat(&chat_body("big")).await;
    assert_error(response, 502, "api_error", "upstream_error", None).await;
    assert_eq!(h.workspace().await, settled(estimate));
    // An answer of the usual size after them: served.
    h.mock.set(|b| {
        b.status = 200;
        b.content = "Hello.".into();
    });
    assert_eq!(h.chat(&chat_body("big")).await.status(), 200);
}

/// An upstream slower than its timeout: 504, the hold released, nothing spent.
async fn upstream_timeout_releases_the_reservation(db: &TestDb) {
    let h = start(
        db,
        Options {
            timeout_secs: 1,
            ..Options::default()
        },
    )
    .await;
    h.mock.set(|b| b.delay = Duration::from_secs(5));
    let started = std::time::Instant::now();
    let response = h.chat(&chat_body("big")).await;
    assert_error(response, 504, "api_error", "upstream_timeout", None).await;
    let mut body = chat_body("big");
    body["stream"] = json!(true);
    let response = h.chat(&body).await;
    assert_error(response, 504, "api_error", "upstream_timeout", None).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout applied"
    );
    assert_eq!(h.workspace().await, Counter::default());
}

/// A stream on "big" whose client leaves after the first event, while the
/// upstream is paused: returns the gate that lets the upstream finish, and the
/// usage it will report.
async fn abandon_a_paused_stream(h: &Harness) -> (Arc<Notify>, MockUsage) {
    let gate = Arc::new(Notify::new());
    let usage = MockUsage {
        prompt: 40,
        completion: 30,
        ..MockUsage::default()
    };
    h.mock.set(|b| {
        b.usage = usage;
        b.pause_after_first_piece = Some(gate.clone());
    });
    let mut body = chat_body("big");
    body["stream"] = json!(true);
    let response = h.chat(&body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    use futures::StreamExt as _;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream);
    (gate, usage)
}

/// A client that leaves mid-stream: the gateway reads the upstream to its end and
/// settles the actual usage (R7).
async fn client_disconnect_mid_stream_still_settles(db: &TestDb) {
    let h = start(db, Options::default()).await;
    // The client leaves while the upstream is paused; then the upstream finishes.
    let (gate, usage) = abandon_a_paused_stream(&h).await;
    let reserved = h.workspace().await.reserved;
    assert!(reserved > Nanos::ZERO, "held while the stream runs");
    gate.notify_one();
    let expected = h.cost_of("big", usage);
    eventually("the abandoned stream is settled on its usage", || async {
        h.workspace().await == settled(expected)
    })
    .await;
}

/// A chat completion's hold cannot be settled, released or renewed through the
/// usage API, even with the key it spends for: a request served in full would
/// be billed what the caller says (nothing), or hold its room for as long as
/// the caller asks. Its exchange ends it, on the upstream's usage (R7).
async fn the_usage_api_leaves_the_gateway_s_holds_alone(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let (gate, usage) = abandon_a_paused_stream(&h).await;
    let holds = h.store.list_reservations().await.unwrap();
    assert_eq!(holds.len(), 1, "{holds:?}");
    let hold = &holds[0];
    assert!(hold.owner.starts_with("gateway-"), "{}", hold.owner);
    let held = h.workspace().await;
    for (action, body) in [
        (
            "settle",
            json!({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}),
        ),
        ("settle", json!({"usage": null})),
        ("release", json!({})),
        ("renew", json!({"lease_seconds": 3600})),
    ] {
        let (status, answer) = h.on_admission(&hold.id.0, action, &body).await;
        assert_eq!(status, 404, "{action}: {answer}");
        assert_eq!(answer["error"]["code"], "reservation_not_found", "{action}");
    }
    assert_eq!(h.workspace().await, held);
    let after = h.store.list_reservations().await.unwrap();
    assert_eq!(after[0].lease_until, hold.lease_until, "not renewed");
    // The exchange still bills what the upstream reported.
    gate.notify_one();
    let expected = h.cost_of("big", usage);
    eventually("the stream is settled on its usage", || async {
        h.workspace().await == settled(expected)
    })
    .await;
}

/// A shutdown waits for the exchange of a client that went away, and the
/// exchange is settled on its usage before the shutdown ends (R7): stopping the
/// process must not leave tokens the provider bills uncounted.
async fn shutdown_waits_for_abandoned_exchanges_to_settle(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let (gate, usage) = abandon_a_paused_stream(&h).await;
    let gateway = h.gateway.clone();
    let mut shutdown = tokio::spawn(async move { gateway.finish_exchanges().await });
    // The upstream is paused: the shutdown cannot have finished.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut shutdown)
            .await
            .is_err(),
        "the shutdown ended with an exchange in flight"
    );
    gate.notify_one();
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the shutdown waits no longer than the exchange")
        .unwrap();
    assert_eq!(
        h.workspace().await,
        settled(h.cost_of("big", usage)),
        "settled before the shutdown ended"
    );
}

/// What a request of `messages` (JSON) asking for 100 output tokens of `big`
/// reserves (R7): the messages' bytes plus the template margin as prompt tokens.
fn big_estimate(h: &Harness, messages: &str) -> Nanos {
    let big = h.config.setup.catalog.resolve("big").unwrap();
    reservation(
        big,
        &TokenEstimate {
            prompt_tokens: messages.len() as u64 + 16,
            output_cap: Some(100),
            n: 1,
        },
    )
    .unwrap()
}

/// An upstream stream with a line past `MAX_LINE_BYTES` is not waited for: the
/// client is told the stream broke off, and the request is billed its estimate
/// (the upstream had answered), as a stream without usage is.
async fn a_stream_line_past_the_limit_breaks_the_stream_off(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| {
        b.stream_pieces = 1;
        b.piece_content = Some("x".repeat(server::gateway::sse::MAX_LINE_BYTES + 1));
    });
    let messages = r#"[{"role":"user","content":"Say hello."}]"#;
    let payloads = h.stream_big(messages).await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{last}");
    assert_eq!(
        last["error"]["message"],
        "The model provider's stream broke off."
    );
    assert!(
        payloads.iter().all(|p| p.len() < 1000),
        "nothing of the long line was relayed"
    );
    let estimate = big_estimate(&h, messages);
    assert_eq!(h.workspace().await, settled(estimate));
}

/// An upstream that reports its running count in every chunk (vLLM's
/// continuous usage) is billed its last count when that count is the whole
/// answer's, and its estimate when the stream is cut short or the answer went
/// on past its last count: the count so far is less than what was generated
/// (R7, DESIGN.md §4).
async fn a_running_usage_count_cut_short_is_billed_the_estimate(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let messages = r#"[{"role":"user","content":"Say hello."}]"#;
    let send = || h.stream_big(messages);
    // Whole, with the last count alone at the end: that count (12 prompt
    // tokens at 2 EUR per 1M, 5 output tokens at 10).
    h.mock.set(|b| b.running_usage = true);
    let payloads = send().await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let whole = Nanos::new(12 * 2_000 + 5 * 10_000);
    assert_eq!(h.workspace().await, settled(whole));
    // Cut after the third piece's count (3 output tokens): the estimate, and
    // the client learns the answer was cut.
    h.mock.set(|b| b.cut_before_finish = true);
    let payloads = send().await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    let estimate = big_estimate(&h, messages);
    assert_eq!(h.workspace().await, settled(whole + estimate));
    assert!(h
        .metrics()
        .await
        .contains("tollgate_settlements_total{kind=\"estimate\",model=\"big\"} 1"));
    // Whole and ended with `[DONE]`, but the finish came after the last count
    // and no count after it: the estimate too.
    h.mock.set(|b| {
        b.cut_before_finish = false;
        b.usage_in_stream = false;
    });
    let payloads = send().await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(h.workspace().await, settled(whole + estimate + estimate));
}

/// An upstream silent after the whole answer and its usage, neither sending
/// `[DONE]` nor closing: the client gets `[DONE]` a moment later, not the
/// upstream's whole timeout later, and the usage is billed.
async fn a_stream_silent_after_its_usage_is_ended_soon(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| {
        b.done_in_stream = false;
        b.silent_at_end = true;
    });
    let mut body = chat_body("big");
    body["stream"] = json!(true);
    // Waited on for the upstream's timeout (30 s here), it would end with an
    // `upstream_timeout` event instead.
    let payloads = sse_payloads(h.chat(&body).await).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let one = Nanos::new(12 * 2_000 + 5 * 10_000);
    assert_eq!(h.workspace().await, settled(one));
    // The usage beside the finish reason of the one choice is as whole an answer.
    h.mock.set(|b| b.usage_beside_finish = true);
    let payloads = sse_payloads(h.chat(&body).await).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(h.workspace().await, settled(one.checked_add(one).unwrap()));
}

/// An upstream's error event reaches the client as the upstream sent it, and
/// ends the stream there, without another event from the gateway and without
/// waiting for the upstream to close; the hold is released when nothing else
/// came (an upstream error), else the estimate is billed. An event whose data
/// is not JSON, which would stop any OpenAI client, is not relayed; a stream
/// without any event is released.
async fn an_upstream_error_event_ends_the_stream_as_sent(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let upstream_error = json!({"error": {"message": "The server is overloaded.",
        "type": "server_error", "param": null, "code": null}});
    h.mock.set(|b| {
        b.error_event_after = Some(0);
        b.error_body = upstream_error.to_string();
    });
    let messages = r#"[{"role":"user","content":"Say hello."}]"#;
    let payloads = h.stream_big(messages).await;
    // The upstream's error, and nothing after it.
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    let last: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(last, upstream_error);
    assert_eq!(h.workspace().await, Counter::default());

    // Midway, from an upstream that then stays open: waited on, the stream
    // would end with an `upstream_timeout` event of the gateway's.
    h.mock.set(|b| {
        b.error_event_after = Some(2);
        b.silent_at_end = true;
    });
    let payloads = h.stream_big(messages).await;
    assert_eq!(payloads.len(), 4, "{payloads:?}");
    let last: Value = serde_json::from_str(&payloads[3]).unwrap();
    assert_eq!(last, upstream_error);
    let estimate = big_estimate(&h, messages);
    assert_eq!(h.workspace().await, settled(estimate));

    // An error event of another shape (an OpenAI client would take it for a
    // chunk) is told to the client as the gateway's own error.
    h.mock.set(|b| {
        b.silent_at_end = false;
        b.error_event_named = true;
        b.error_body = r#"{"message":"oops"}"#.into();
    });
    let payloads = h.stream_big(messages).await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    let twice = estimate.checked_add(estimate).unwrap();
    assert_eq!(h.workspace().await, settled(twice));

    // No event at all: nothing was answered, nothing is billed.
    h.mock.set(|b| {
        b.error_event_after = None;
        b.empty_stream = true;
    });
    let payloads = h.stream_big(messages).await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    assert_eq!(h.workspace().await, settled(twice));
    // `[DONE]` alone: no answer either, told as such rather than as an empty one.
    h.mock.set(|b| {
        b.empty_stream = false;
        b.done_only = true;
    });
    let payloads = h.stream_big(messages).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    let last: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    assert_eq!(
        last["error"]["message"],
        "The model provider's stream ended without an answer."
    );
    assert_eq!(h.workspace().await, settled(twice));

    h.mock.set(|b| {
        b.done_only = false;
        b.not_json_after_first = true;
    });
    let payloads = h.stream_big(messages).await;
    assert!(
        !payloads.iter().any(|p| p.contains("not json")),
        "{payloads:?}"
    );
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    // Read on to its usage: 12 prompt tokens at 2 EUR per 1M, 5 output at 10.
    assert_eq!(
        h.workspace().await,
        settled(
            twice
                .checked_add(Nanos::new(12 * 2_000 + 5 * 10_000))
                .unwrap()
        )
    );
    // Every request asked for an answer that is not compressed.
    assert!(h
        .mock
        .received()
        .iter()
        .all(|r| r.accept_encoding.as_deref() == Some("identity")));
}

/// A stream that ends without usage is billed its estimate, flagged (§4, R7).
async fn stream_without_usage_is_billed_its_estimate(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| b.usage_in_stream = false);
    let messages = r#"[{"role":"user","content":"Say hello."}]"#;
    let payloads = h.stream_big(messages).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    // The estimate (R7): the messages' bytes plus the template margin as prompt
    // tokens at 2 EUR per 1M, plus 100 output tokens at 10.
    let estimate = big_estimate(&h, messages);
    assert_eq!(
        estimate,
        Nanos::new((messages.len() as i64 + 16) * 2_000 + 1_000_000)
    );
    assert_eq!(h.workspace().await, settled(estimate));
    assert!(h
        .metrics()
        .await
        .contains("tollgate_settlements_total{kind=\"estimate\",model=\"big\"} 1"));

    // Closed without usage and without `[DONE]`: the client learns that the
    // answer was cut (an error event), and the estimate is billed again.
    h.mock.set(|b| b.done_in_stream = false);
    let send = || h.stream_big(messages);
    let payloads = send().await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    assert_eq!(h.workspace().await.spent, estimate + estimate);

    // With its usage but without `[DONE]`: a whole answer, ended as one and
    // billed its usage (12 prompt tokens at 2, 5 output tokens at 10 per 1M).
    h.mock.set(|b| b.usage_in_stream = true);
    let payloads = send().await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        h.workspace().await.spent,
        estimate + estimate + Nanos::new(12 * 2_000 + 5 * 10_000)
    );

    // A first event with bytes that are not UTF-8: decoded as the event stream
    // format says (U+FFFD for each), it is relayed and the stream read on to its
    // usage, which is billed (it once broke the stream, billed the estimate).
    h.mock.set(|b| b.invalid_utf8_first = true);
    let payloads = send().await;
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(
        first["choices"][0]["delta"]["content"], "\u{fffd}\u{fffd}",
        "{payloads:?}"
    );
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        h.workspace().await,
        settled(estimate + estimate + Nanos::new(2 * (12 * 2_000 + 5 * 10_000)))
    );
}

/// An upstream that answers a streamed request with plain JSON (it ignored
/// `stream`): the client gets a 502 saying so, not an empty stream, and the usage
/// the JSON reported is billed (R7), not the estimate.
async fn a_stream_answered_without_a_stream_is_a_502_billed_its_usage(db: &TestDb) {
    let h = start(db, Options::default()).await;
    h.mock.set(|b| b.ignore_stream = true);
    let response = h
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(r#"{"model":"big","messages":[{"role":"user","content":"Hi"}],"max_tokens":100,"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    assert_eq!(
        error["error"]["message"],
        "The model provider answered a streamed request without a stream."
    );
    assert_eq!(h.mock.received().len(), 1, "one call upstream");
    assert_eq!(
        h.workspace().await,
        settled(h.cost_of("big", upstream::Behaviour::default().usage))
    );
}

/// Refusals before admission (413, 400, 401, 404) are OpenAI-shaped JSON and
/// reserve and spend nothing; nothing reaches the upstream.
async fn refusals_reserve_and_spend_nothing(db: &TestDb) {
    use futures::StreamExt as _;
    let h = start(
        db,
        Options {
            max_request_bytes: 4_096,
            request_body_timeout_secs: 1,
            ..Options::default()
        },
    )
    .await;
    let chat = |body: String| {
        h.post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
    };

    // 413, declared and chunked.
    let mut big = chat_body("big");
    big["messages"][0]["content"] = json!("x".repeat(5_000));
    let response = chat(big.to_string()).send().await.unwrap();
    assert_error(
        response,
        413,
        "invalid_request_error",
        "request_too_large",
        None,
    )
    .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(big.to_string().into_bytes()[..3_000].to_vec()),
        Ok(big.to_string().into_bytes()[3_000..].to_vec()),
    ];
    let response = h
        .post("/v1/chat/completions")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_error(
        response,
        413,
        "invalid_request_error",
        "request_too_large",
        None,
    )
    .await;

    // An output cap the model cannot produce is a bad request, not a quota
    // error (big produces at most 1,000 tokens).
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "big", "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 1001}),
        ),
        (
            "/api/v1/admissions",
            json!({"model": "big", "prompt_tokens": 10, "max_tokens": 5000}),
        ),
    ] {
        let (status, answer) = h.api(path, &body).await;
        let param = ["max_completion_tokens", "max_tokens"]
            .into_iter()
            .find(|field| body.get(field).is_some())
            .unwrap();
        assert_eq!(
            (status, &answer["error"]["param"]),
            (400, &json!(param)),
            "{path}: {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!(
                    "`{param}` is {}, more than the 1000 output tokens",
                    body[param]
                )),
            "{answer}"
        );
    }

    // A compressed body is refused unread (415), on the gateway and the usage
    // API.
    for path in ["/v1/chat/completions", "/api/v1/usage"] {
        let response = h
            .post(path)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(vec![0x1f, 0x8b, 0x08, 0x00])
            .send()
            .await
            .unwrap();
        assert_error(
            response,
            415,
            "invalid_request_error",
            "unsupported_content_encoding",
            None,
        )
        .await;
    }

    // Two keys in one request: neither is guessed to be the one that spends.
    let response = h
        .post("/v1/chat/completions")
        .header("authorization", "Bearer tg_another-key")
        .body(chat_body("big").to_string())
        .send()
        .await
        .unwrap();
    let body = assert_invalid_api_key(response).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 `Authorization` headers"),
        "{body}"
    );

    // A caller without a valid key gets 401 before its body is read: here a body
    // that never ends.
    let endless = futures::stream::iter([Ok::<_, std::io::Error>(b"{\"model\"".to_vec())])
        .chain(futures::stream::pending());
    let unread = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth("tg_not-a-key")
        .body(reqwest::Body::wrap_stream(endless))
        .send();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), unread)
        .await
        .expect("the body was awaited before the key was checked")
        .unwrap();
    assert_invalid_api_key(response).await;

    // A member whose body stalls half-way gets 408 once the body's time is up,
    // on the gateway and on the usage API alike.
    for path in [
        "/v1/chat/completions",
        "/api/v1/admissions",
        "/api/v1/usage",
    ] {
        let stalled =
            futures::stream::iter([Ok::<_, std::io::Error>(b"{\"model\": \"big\"".to_vec())])
                .chain(futures::stream::pending());
        let response = h
            .post(path)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stalled))
            .send();
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
            .await
            .expect("a stalled body was waited for past its timeout")
            .unwrap();
        assert_error(
            response,
            408,
            "invalid_request_error",
            "request_timeout",
            None,
        )
        .await;
    }

    // 400, naming the field.
    let response = chat("{\"model\": \"big\", ".into()).send().await.unwrap();
    assert_error(response, 400, "invalid_request_error", "invalid_json", None).await;
    // A body that is no object is told what it is, in the product's words.
    for (body, message) in [
        ("", "The request body is empty: send one JSON object."),
        (
            "[{\"model\": \"big\"}]",
            "The request body is an array, not a JSON object: send one JSON object.",
        ),
    ] {
        let response = chat(body.into()).send().await.unwrap();
        let error =
            assert_error(response, 400, "invalid_request_error", "invalid_json", None).await;
        assert_eq!(error["error"]["message"], message, "{body}");
    }
    for (body, param) in [
        (
            json!({"model": "big", "messages": [{}], "max_tokens": -1}),
            "max_tokens",
        ),
        (
            json!({"model": "big", "messages": [{}], "max_completion_tokens": 1.5}),
            "max_completion_tokens",
        ),
        (json!({"model": "big", "messages": [{}], "n": 0}), "n"),
        (json!({"model": "big", "messages": [{}], "n": 129}), "n"),
        (
            json!({"model": "big", "messages": [{}], "stream": "yes"}),
            "stream",
        ),
        (json!({"model": "big", "messages": "hello"}), "messages"),
        (json!({"model": "big", "messages": []}), "messages"),
        (
            json!({"model": "big", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"messages": []}), "model"),
    ] {
        let response = chat(body.to_string()).send().await.unwrap();
        assert_error(
            response,
            400,
            "invalid_request_error",
            "invalid_value",
            Some(param),
        )
        .await;
    }

    // 401: no key, unknown key, revoked key.
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .body(chat_body("big").to_string())
        .send()
        .await
        .unwrap();
    assert_invalid_api_key(response).await;
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth("tg_not-a-key")
        .body(chat_body("big").to_string())
        .send()
        .await
        .unwrap();
    assert_invalid_api_key(response).await;
    let response = h
        .client
        .get(format!("{}/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_invalid_api_key(response).await;
    let key_id = h.store.list_api_keys(None).await.unwrap()[0].id;
    let user = h
        .store
        .user_by_email("member@example.com")
        .await
        .unwrap()
        .unwrap();
    let (revoked, hash) = server::auth::new_api_key();
    let record = h
        .store
        .create_api_key(&Actor::Cli, user.id, "old", &hash, Utc::now())
        .await
        .unwrap();
    h.store
        .revoke_api_key(&Actor::Cli, record.id, Utc::now())
        .await
        .unwrap();
    assert_ne!(record.id, key_id);
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(revoked)
        .body(chat_body("big").to_string())
        .send()
        .await
        .unwrap();
    assert_invalid_api_key(response).await;

    // 404: unknown model, unknown endpoint (JSON, never the HTML page). The
    // name is echoed on one line, its hidden characters escaped.
    for (name, shown) in [
        ("gpt-unknown", "gpt-unknown"),
        ("bi\u{202e}g\n", "bi\\u{202e}g\\u{a}"),
    ] {
        let response = chat(chat_body(name).to_string()).send().await.unwrap();
        let body = assert_error(
            response,
            404,
            "invalid_request_error",
            "model_not_found",
            Some("model"),
        )
        .await;
        assert_eq!(
            body["error"]["message"],
            format!("The model `{shown}` does not exist or you do not have access to it."),
            "{name}"
        );
    }
    let response = h
        .post("/v1/embeddings")
        .body(json!({"model": "big", "input": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "invalid_request_error", "unknown_url", None).await;
    let response = h
        .client
        .get(format!("{}/v1/responses/abc", h.url))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "invalid_request_error", "unknown_url", None).await;
    let response = h
        .client
        .get(format!("{}/v1/chat/completions", h.url))
        .send()
        .await
        .unwrap();
    assert_error(
        response,
        405,
        "invalid_request_error",
        "method_not_allowed",
        None,
    )
    .await;

    // A path parameter that is not UTF-8 gets the JSON error shape too.
    for request in [
        h.client
            .get(format!("{}/v1/models/%FF", h.url))
            .bearer_auth(&h.key),
        h.post("/api/v1/admissions/%FF/settle").json(&json!({})),
    ] {
        let response = request.send().await.unwrap();
        assert_error(
            response,
            400,
            "invalid_request_error",
            "invalid_value",
            Some("path"),
        )
        .await;
    }

    assert!(h.mock.received().is_empty(), "nothing reached the upstream");
    assert_eq!(h.workspace().await, Counter::default());
    assert!(h.books().await.1.values().all(|c| *c == Counter::default()));
}

/// The upstream key is sent upstream and appears in no answer and no log line,
/// even when the upstream echoes it in an error.
async fn the_upstream_key_never_leaks(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let mut bodies = Vec::new();
    let response = h.chat(&chat_body("big")).await;
    bodies.push(response.text().await.unwrap());
    assert_eq!(
        h.mock.received()[0].authorization.as_deref(),
        Some(format!("Bearer {}", h.upstream_key).as_str()),
        "the key from the environment is sent upstream"
    );
    let mut stream = chat_body("big");
    stream["stream"] = json!(true);
    bodies.push(h.chat(&stream).await.text().await.unwrap());

    // An upstream that refuses the key and quotes it back.
    h.mock.set(|b| {
        b.status = 401;
        b.error_body = r#"{"error":{"message":"Incorrect API key provided: {auth}","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#.into();
    });
    let response = h.chat(&chat_body("big")).await;
    bodies.push(
        assert_error(response, 502, "api_error", "upstream_error", None)
            .await
            .to_string(),
    );
    // An upstream 4xx that quotes the key is not passed on as it is, nor
    // written with JSON escapes, which are the key all the same to the client.
    h.mock.set(|b| b.status = 400);
    for (request, quoted) in [(&stream, "{auth}"), (&chat_body("big"), "{auth_escaped}")] {
        h.mock.set(|b| {
            b.error_body = format!(
                r#"{{"error":{{"message":"bad request from {quoted}","type":"invalid_request_error","param":null,"code":null}}}}"#
            );
        });
        let response = h.chat(request).await;
        let body = assert_error(
            response,
            400,
            "invalid_request_error",
            "upstream_rejected",
            None,
        )
        .await;
        assert!(!body.to_string().contains("bad request from"), "{body}");
        bodies.push(body.to_string());
    }
    // A stream's error event that quotes the key, as it is or escaped, is
    // replaced by the gateway's.
    for quoted in ["{auth}", "{auth_escaped}"] {
        h.mock.set(|b| {
            b.status = 200;
            b.error_event_after = Some(1);
            b.error_body = format!(r#"{{"error":{{"message":"bad key {quoted}"}}}}"#);
        });
        let payloads = sse_payloads(h.chat(&stream).await).await;
        let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
        assert!(
            !payloads.iter().any(|p| p.contains("bad key")),
            "{payloads:?}"
        );
        bodies.extend(payloads);
    }
    // Nor in an event of another shape, nor in an answer's content, streamed
    // or not: the answer stops there, and the usage it reported is billed.
    h.mock
        .set(|b| b.error_body = r#"{"detail":"bad key {auth}"}"#.into());
    let payloads = sse_payloads(h.chat(&stream).await).await;
    assert!(
        !payloads.iter().any(|p| p.contains("bad key")),
        "{payloads:?}"
    );
    bodies.extend(payloads);
    // Nor in an event's `id:` field.
    h.mock.set(|b| {
        b.error_event_after = None;
        b.auth_as_event_id = true;
    });
    let payloads = sse_payloads(h.chat(&stream).await).await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    bodies.extend(payloads);
    h.mock.set(|b| b.auth_as_event_id = false);
    let before = h.workspace().await.spent;
    let upstream_key = h.upstream_key.clone();
    h.mock.set(|b| {
        b.error_event_after = None;
        b.content = format!("the key is {upstream_key}");
        b.piece_content = Some(format!("the key is {upstream_key}"));
    });
    let response = h.chat(&chat_body("big")).await;
    let body = assert_error(response, 502, "api_error", "upstream_error", None).await;
    bodies.push(body.to_string());
    // 12 prompt tokens at 2 EUR per 1M, 5 output tokens at 10.
    let usage = Nanos::new(12 * 2_000 + 5 * 10_000);
    assert_eq!(
        h.workspace().await.spent,
        before.checked_add(usage).unwrap()
    );
    let payloads = sse_payloads(h.chat(&stream).await).await;
    let last: Value = serde_json::from_str(payloads.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{payloads:?}");
    bodies.extend(payloads);
    bodies.push(h.metrics().await);
    bodies.push(
        h.client
            .get(format!("{}/v1/models", h.url))
            .bearer_auth(&h.key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    bodies.push(format!("{:?}", h.gateway));
    for body in &bodies {
        assert!(!body.contains(&h.upstream_key), "leaked in {body}");
        assert!(!body.contains("DO-NOT-LEAK"), "leaked in {body}");
    }
    let logs = captured_logs().text();
    assert!(
        logs.contains("refused the gateway's credentials"),
        "the log capture works"
    );
    assert!(!logs.contains(&h.upstream_key), "the key is in the logs");
}

/// Idempotency keys of `POST /api/v1/usage` belong to the user whose API key
/// sends them: the same record again under another key of that user is a
/// duplicate (a platform may rotate its key between retries); under another
/// user's key it is a record of its own.
#[tokio::test]
async fn usage_records_are_told_apart_per_user_not_per_key() {
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let records = json!({"records": [{"idempotency_key": "run-1/a", "model": "big",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}]});
    let send = |key: String| {
        let (h, records) = (&h, &records);
        async move {
            let response = h
                .client
                .post(format!("{}/api/v1/usage", h.url))
                .bearer_auth(key)
                .json(records)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            body["results"][0]["outcome"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(send(h.key.clone()).await, "recorded");
    let one = h.workspace().await.spent;
    assert!(one > Nanos::ZERO);
    let rotated = common::another_key(&h.store, "member@example.com").await;
    assert_eq!(send(rotated).await, "duplicate");
    assert_eq!(h.workspace().await.spent, one);
    let elsewhere = common::member_key(&h.store, "platform-b@example.com").await;
    assert_eq!(send(elsewhere).await, "recorded");
    assert_eq!(h.workspace().await.spent, one.checked_add(one).unwrap());
}

/// The usage API: admission → settle (exact decimal strings), release, renew, a
/// retried bulk record counted once, and the 429 of admission.
async fn usage_api_admits_settles_releases_and_records_once(db: &TestDb) {
    let h = start(
        db,
        Options {
            budget_eur: "1",
            ..Options::default()
        },
    )
    .await;
    let admission = h
        .admit(&json!({"model": "test/big", "prompt_tokens": 1000, "max_completion_tokens": 500}))
        .await;
    // 1000 × 2 + 500 × 10 = 7000 EUR per 1M tokens.
    assert_eq!(admission["reserved_eur"], "0.007");
    assert_eq!(admission["served_model"], "big");
    assert_eq!(admission["requested_model"], "big");
    assert_eq!(admission["fallback"], false);
    assert!(admission["lease_until"].as_str().unwrap().ends_with('Z'));
    let id = admission["reservation_id"].as_str().unwrap().to_owned();
    // The lease answered is the lease stored, to the millisecond.
    let held = h.store.list_reservations().await.unwrap();
    let stored = held.iter().find(|r| r.id.0 == id).unwrap().lease_until;
    assert_eq!(
        admission["lease_until"],
        stored.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    assert_eq!(h.workspace().await.reserved, Nanos::new(7_000_000));

    // Usage costing more than the admission reserved is refused, and nothing
    // changes: the hold stays for a correct settlement.
    let (status, refused) = h
        .on_admission(
            &id,
            "settle",
            &json!({"usage": {"prompt_tokens": 100_000_000_000u64, "completion_tokens": 1}}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "usage");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than the €0.007 reserved"),
        "{refused}"
    );
    // Usage past what the ledger can count is told so, as in a bulk record.
    let (status, refused) = h
        .on_admission(
            &id,
            "settle",
            &json!({"usage": {"prompt_tokens": i64::MAX, "completion_tokens": i64::MAX}}),
        )
        .await;
    assert_eq!(
        (status, &refused["error"]["param"], &refused["error"]["message"]),
        (
            400,
            &json!("usage"),
            &json!("`usage` cannot be billed: its cost is more than the ledger can hold (about €9.2 billion).")
        ),
        "{refused}"
    );
    assert_eq!(
        h.workspace().await,
        Counter {
            spent: Nanos::ZERO,
            reserved: Nanos::new(7_000_000)
        }
    );

    let usage = json!({"prompt_tokens": 900, "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 300},
        "completion_tokens_details": {"reasoning_tokens": 60}});
    let (status, event) = h
        .on_admission(&id, "settle", &json!({"usage": usage}))
        .await;
    assert_eq!(status, 200, "{event}");
    // 600 × 2 + 300 × 0.5 + 100 × 10 = 2350 EUR per 1M tokens.
    assert_eq!(event["cost_eur"], "0.00235");
    assert_eq!(event["newly_recorded"], true);
    assert_eq!(event["estimated"], false);
    let (status, again) = h
        .on_admission(&id, "settle", &json!({"usage": usage}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["event_id"], event["event_id"]);
    assert_eq!(again["newly_recorded"], false);
    // Settling again with other usage, or with none, is refused: 409, and the
    // counters below show nothing more was recorded.
    let mut more = usage.clone();
    more["completion_tokens"] = json!(101);
    for other in [json!({"usage": more}), json!({"usage": null})] {
        let (status, conflict) = h.on_admission(&id, "settle", &other).await;
        assert_eq!(status, 409, "{conflict}");
        assert_eq!(conflict["error"]["code"], "already_settled");
        assert!(
            conflict["error"]["message"]
                .as_str()
                .unwrap()
                .contains("(on big, costing €0.00235)"),
            "{conflict}"
        );
    }
    // Another key cannot read that settlement by settling again.
    let stranger = common::member_key(&h.store, "stranger@example.com").await;
    let response = h
        .client
        .post(format!("{}/api/v1/admissions/{id}/settle", h.url))
        .bearer_auth(&stranger)
        .json(&json!({"usage": usage}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(h.workspace().await, settled(Nanos::new(2_350_000)));

    // Release, renew, and their 404 once gone.
    let (_, other) = h
        .api(
            "/api/v1/admissions",
            &json!({"model": "mid", "prompt_tokens": 10, "lease_seconds": 30}),
        )
        .await;
    let other_id = other["reservation_id"].as_str().unwrap().to_owned();
    // Another member's key can neither renew, settle nor release it: 404, as if
    // it did not exist, and the hold stays.
    let held = h.workspace().await;
    for (action, body) in admission_actions() {
        let response = h
            .client
            .post(format!("{}/api/v1/admissions/{other_id}/{action}", h.url))
            .bearer_auth(&stranger)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{action}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "reservation_not_found", "{action}");
    }
    assert_eq!(h.workspace().await, held);
    let (status, renewed) = h
        .on_admission(&other_id, "renew", &json!({"lease_seconds": 120}))
        .await;
    assert_eq!(status, 200, "{renewed}");
    // A shorter renewal keeps the longer lease.
    let (status, kept) = h
        .on_admission(&other_id, "renew", &json!({"lease_seconds": 10}))
        .await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["lease_until"], renewed["lease_until"]);
    let (status, released) = h.on_admission(&other_id, "release", &json!({})).await;
    assert_eq!((status, released["released"].clone()), (200, json!(true)));
    let (status, gone) = h.on_admission(&other_id, "release", &json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(gone["error"]["code"], "reservation_not_found");
    // An id PostgreSQL could not even compare is simply not found, and a long
    // one is not echoed whole.
    let long = "x".repeat(4000);
    for (action, body) in admission_actions() {
        for id in ["abc%00def", &long] {
            let (status, answer) = h.on_admission(id, action, &body).await;
            assert_eq!(status, 404, "{action}: {answer}");
            assert_eq!(answer["error"]["code"], "reservation_not_found", "{action}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.len() < 200, "{action}: {message}");
        }
    }
    assert_eq!(h.workspace().await.reserved, Nanos::ZERO);

    // A hold whose lease has ended is gone for settle, release and renew alike,
    // before the sweep releases it as after; it is never billed.
    let brief = h
        .admit(&json!({"model": "mid", "prompt_tokens": 10, "lease_seconds": 1}))
        .await;
    let brief_id = brief["reservation_id"].as_str().unwrap().to_owned();
    let spent = h.workspace().await.spent;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    for (action, body) in admission_actions() {
        let (status, answer) = h.on_admission(&brief_id, action, &body).await;
        assert_eq!(status, 404, "{action}: {answer}");
        assert_eq!(answer["error"]["code"], "reservation_not_found", "{action}");
    }
    // Released on sight, without waiting for the sweep.
    assert_eq!(h.workspace().await.spent, spent);
    assert_eq!(h.workspace().await.reserved, Nanos::ZERO);

    // Bad input names the field, and holds nothing.
    let (status, bad) = h
        .api(
            "/api/v1/admissions",
            &json!({"model": "big", "prompt_tokens": -5}),
        )
        .await;
    assert_eq!(
        (status, bad["error"]["param"].clone()),
        (400, json!("prompt_tokens"))
    );
    // More than the books can count, even on a model whose input is free.
    for (model, count) in [
        ("big", "9223372036854775808"),
        ("flat", "9223372036854775808"),
        ("big", "100000000000000000000000"),
    ] {
        let (status, bad) = h
            .api_text(
                "/api/v1/admissions",
                format!(r#"{{"model": "{model}", "prompt_tokens": {count}}}"#),
            )
            .await;
        assert_eq!(
            (status, &bad["error"]["param"], &bad["error"]["message"]),
            (
                400,
                &json!("prompt_tokens"),
                &json!("`prompt_tokens` must be at most 9223372036854775807 tokens.")
            ),
            "{model} {count}"
        );
    }
    let (status, bad) = h
        .api(
            "/api/v1/admissions",
            &json!({"model": "big", "prompt_tokns": 5}),
        )
        .await;
    assert_eq!(
        (status, bad["error"]["param"].clone()),
        (400, json!("prompt_tokns"))
    );
    for lease in ["0", "3601", "-1", "1.5", r#""60""#, "true"] {
        let (status, bad) = h
            .api_text(
                "/api/v1/admissions",
                format!(r#"{{"model": "big", "prompt_tokens": 5, "lease_seconds": {lease}}}"#),
            )
            .await;
        assert_eq!(status, 400, "{lease}: {bad}");
        assert_eq!(
            bad["error"]["message"], "`lease_seconds` must be an integer from 1 to 3600 (seconds).",
            "{lease}"
        );
    }

    // Bulk: three records, sent twice, counted once.
    let records = json!({"records": [
        {"idempotency_key": "run-1/a", "model": "mid", "usage": {"prompt_tokens": 1000, "completion_tokens": 500}},
        {"idempotency_key": "run-1/b", "model": "mid", "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 1000}},
        {"idempotency_key": "run-1/c", "model": "test/big", "usage": {"prompt_tokens": 0, "completion_tokens": 100}},
    ]});
    let (status, first) = h.api("/api/v1/usage", &records).await;
    assert_eq!(status, 200, "{first}");
    let outcomes: Vec<&str> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["recorded", "recorded", "recorded"]);
    // 1000 × 0.5 + 500 × 2 = 1500; 1000 × 0.05 + 500 × 2 = 1050; 100 × 10 = 1000.
    let costs: Vec<&str> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"]["cost_eur"].as_str().unwrap())
        .collect();
    assert_eq!(costs, ["0.0015", "0.00105", "0.001"]);
    let (_, second) = h.api("/api/v1/usage", &records).await;
    assert!(second["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["outcome"] == "duplicate"));
    assert_eq!(
        h.workspace().await.spent,
        Nanos::new(2_350_000 + 1_500_000 + 1_050_000 + 1_000_000)
    );
    // A key used again for other usage: a conflict, not a silent duplicate, and
    // nothing counted; the other items of the batch still count.
    let (status, reused) = h
        .api(
            "/api/v1/usage",
            &json!({"records": [
                {"idempotency_key": "run-1/a", "model": "mid", "usage": {"prompt_tokens": 1000, "completion_tokens": 501}},
                {"idempotency_key": "run-1/c", "model": "mid", "usage": {"prompt_tokens": 0, "completion_tokens": 100}},
                {"idempotency_key": "run-2/a", "model": "mid", "usage": {"prompt_tokens": 0, "completion_tokens": 100}},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{reused}");
    let results = reused["results"].as_array().unwrap();
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["conflict", "conflict", "recorded"]);
    assert_eq!(results[0]["code"], "idempotency_key_reused");
    assert_eq!(
        results[0]["event"]["cost_eur"], "0.0015",
        "the event recorded under the key"
    );
    assert!(
        results[1]["message"].as_str().unwrap().contains("big"),
        "{reused}"
    );
    assert_eq!(
        h.workspace().await.spent,
        Nanos::new(2_350_000 + 1_500_000 + 1_050_000 + 1_000_000 + 200_000)
    );
    let (status, bad) = h
        .api(
            "/api/v1/usage",
            &json!({"records": [{"idempotency_key": "k", "model": "nope",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}]}),
        )
        .await;
    // As an admission naming it would be, with the record's field.
    assert_eq!(
        (
            status,
            bad["error"]["param"].clone(),
            bad["error"]["code"].clone()
        ),
        (404, json!("records[0].model"), json!("model_not_found"))
    );
    let spent = h.workspace().await.spent;
    // Empty, NUL, newline, too long, a number, an array, a lone surrogate
    // (not Unicode), null: each is told what is wrong with it, and the rule.
    let long = format!("\"{}\"", "k".repeat(201));
    for (key, problem) in [
        (r#""""#, "`idempotency_key` is empty; "),
        (
            r#""run-3\u0000a""#,
            "`idempotency_key` holds a control character, U+0000, at character 6; ",
        ),
        (
            r#""run-3\na""#,
            "`idempotency_key` holds a control character, U+000A, at character 6; ",
        ),
        (&long, "`idempotency_key` is 201 characters long; "),
        ("5", "`idempotency_key` is a number; "),
        ("[]", "`idempotency_key` is an array; "),
        (
            r#""run-3\ud800""#,
            "`idempotency_key` is not Unicode text (it holds a lone surrogate escape); ",
        ),
        ("null", "`idempotency_key` is null; "),
    ] {
        let (status, bad) = h
            .api_text(
                "/api/v1/usage",
                format!(
                    r#"{{"records": [{{"idempotency_key": {key}, "model": "mid",
                    "usage": {{"prompt_tokens": 1, "completion_tokens": 1}}}}]}}"#
                ),
            )
            .await;
        assert_eq!(
            (status, bad["error"]["param"].clone()),
            (400, json!("records[0].idempotency_key")),
            "{key}: {bad}"
        );
        let message = bad["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(problem), "{key}: {bad}");
        assert!(
            message.contains(
                "a string of 1 to 200 Unicode characters, none of them a control character"
            ),
            "{key}: {bad}"
        );
    }
    let (status, bad) = h
        .api(
            "/api/v1/usage",
            &json!({"records": [{"model": "mid",
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}]}),
        )
        .await;
    assert_eq!(
        (status, &bad["error"]["param"], &bad["error"]["message"]),
        (
            400,
            &json!("records[0].idempotency_key"),
            &json!(
                "You must provide `idempotency_key` (a string of 1 to 200 Unicode characters, \
                 none of them a control character)."
            )
        ),
        "{bad}"
    );
    // A record with a field given twice is told so.
    let (status, bad) = h
        .api_text(
            "/api/v1/usage",
            r#"{"records": [{"idempotency_key": "b1", "idempotency_key": "b9", "model": "mid",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}]}"#
                .to_owned(),
        )
        .await;
    assert_eq!(
        (status, &bad["error"]["param"], &bad["error"]["message"]),
        (
            400,
            &json!("records[0]"),
            &json!("This record cannot be read: duplicate key \"idempotency_key\".")
        ),
        "{bad}"
    );
    // Usage too costly to book names its record, and the batch records nothing.
    let (status, bad) = h
        .api(
            "/api/v1/usage",
            &json!({"records": [
                {"idempotency_key": "fine", "model": "mid",
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
                {"idempotency_key": "huge", "model": "mid",
                 "usage": {"prompt_tokens": i64::MAX, "completion_tokens": 1}}]}),
        )
        .await;
    assert_eq!(
        (
            status,
            bad["error"]["param"].clone(),
            bad["error"]["message"].clone()
        ),
        (
            400,
            json!("records[1].usage"),
            json!("`usage` cannot be billed: its cost is more than the ledger can hold (about €9.2 billion).")
        ),
        "{bad}"
    );
    assert_eq!(h.workspace().await.spent, spent, "nothing counted");
    // A count that cannot be read is named where the caller wrote it; an array
    // of counts is not a usage object, whatever order it is in.
    for (usage, param) in [
        (
            json!({"prompt_tokens": 1, "completion_tokens": 1,
                   "prompt_tokens_details": {"cached_tokens": -1}}),
            "records[0].usage.prompt_tokens_details.cached_tokens",
        ),
        (json!([100, 10, null, null]), "records[0].usage"),
        // Past what the books hold (a BIGINT), named before it is priced.
        (
            json!({"prompt_tokens": 1, "completion_tokens": 9_223_372_036_854_775_808_u64}),
            "records[0].usage.completion_tokens",
        ),
    ] {
        let (status, bad) = h
            .api(
                "/api/v1/usage",
                &json!({"records": [{"idempotency_key": "unread", "model": "mid", "usage": usage}]}),
            )
            .await;
        assert_eq!(
            (status, bad["error"]["param"].clone()),
            (400, json!(param)),
            "{bad}"
        );
    }
    assert_eq!(h.workspace().await.spent, spent, "nothing counted");

    // A reservation billed its estimate (no usage) settles again only the same way.
    let (_, admission) = h
        .api(
            "/api/v1/admissions",
            &json!({"model": "mid", "prompt_tokens": 10, "max_completion_tokens": 10}),
        )
        .await;
    let id = admission["reservation_id"].as_str().unwrap().to_owned();
    let settle = format!("/api/v1/admissions/{id}/settle");
    let (status, estimated) = h.api(&settle, &json!({"usage": null})).await;
    assert_eq!((status, estimated["estimated"].clone()), (200, json!(true)));
    let spent = h.workspace().await.spent;
    let (status, again) = h.api(&settle, &json!({"usage": null})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["event_id"], estimated["event_id"]);
    let (status, conflict) = h
        .api(
            &settle,
            &json!({"usage": {"prompt_tokens": 10, "completion_tokens": 10}}),
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "already_settled");
    assert_eq!(h.workspace().await.spent, spent, "nothing counted");

    // Admission refuses what the plan cannot hold, as the gateway does.
    let (status, refused) = h
        .api(
            "/api/v1/admissions",
            &json!({"model": "big", "prompt_tokens": 1_000_000_000}),
        )
        .await;
    assert_eq!(status, 429);
    assert_eq!(refused["error"]["code"], "plan_limit_reached");
    assert_eq!(h.workspace().await.reserved, Nanos::ZERO);
}

/// A gateway that stops without settling leaves nothing held once its leases
/// have expired: a new instance releases them at start (R7).
async fn a_restarted_gateway_leaves_no_reservations(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let admission = h
        .admit(&json!({"model": "big", "prompt_tokens": 10, "lease_seconds": 60}))
        .await;
    let held = h.workspace().await.reserved;
    assert!(held > Nanos::ZERO);
    drop(admission);
    drop(h);

    // A new instance on the same database, as `tollgate serve` starts: it sweeps
    // leases that ended (here: pretend a minute and a second have passed).
    let restarted = server::db::open(&db.url, Durability::Normal)
        .await
        .unwrap()
        .store;
    let now = Utc::now();
    assert_eq!(
        restarted.release_expired(now).await.unwrap(),
        0,
        "the lease still runs"
    );
    let released = restarted
        .release_expired(now + chrono::TimeDelta::seconds(61))
        .await
        .unwrap();
    assert_eq!(released, 1);
    let snapshot = restarted.spend_snapshot(now).await.unwrap();
    assert_eq!(snapshot.workspace, Counter::default());
}

/// What waits in the settlement spool is billed by a replay exactly once
/// (DESIGN.md R7): a hold the sweep released meanwhile is billed from its
/// lapsed record, a settlement already recorded counts nothing again, and one
/// whose hold is unknown is refused; each leaves the spool.
async fn the_settlement_spool_is_replayed_exactly_once(db: &TestDb) {
    use server::gateway::{
        hold::Replayed,
        spool::{PendingSettlement, Spool},
    };
    let h = start(db, Options::default()).await;
    let admission = h
        .admit(&json!({"model": "test/big", "prompt_tokens": 1000, "max_completion_tokens": 500}))
        .await;
    let id = admission["reservation_id"].as_str().unwrap();
    let usage = MockUsage {
        prompt: 800,
        cached: 300,
        completion: 400,
        reasoning: 100,
    };
    let entry = PendingSettlement {
        reservation: app::store::ReservationId(id.to_owned()),
        served: "big".into(),
        usage: Some(Usage {
            prompt_tokens: usage.prompt,
            cached_tokens: usage.cached,
            completion_tokens: usage.completion,
            reasoning_tokens: usage.reasoning,
        }),
        finished_at: Utc::now(),
    };
    // What a process stopped under a held-up database leaves behind.
    let spool = Spool::new(h.config.settlement_spool.clone());
    spool.put(&entry).await.unwrap();
    let unknown = PendingSettlement {
        reservation: app::store::ReservationId(uuid::Uuid::now_v7().to_string()),
        ..entry.clone()
    };
    spool.put(&unknown).await.unwrap();
    // Usage the store refuses as inconsistent is billed as the estimate, as it
    // would have been before the answer.
    let second = h
        .admit(&json!({"model": "mid", "prompt_tokens": 1000, "max_completion_tokens": 500}))
        .await;
    assert_eq!(second["reserved_eur"], "0.0015");
    let inconsistent = PendingSettlement {
        reservation: app::store::ReservationId(
            second["reservation_id"].as_str().unwrap().to_owned(),
        ),
        served: "mid".into(),
        usage: Some(Usage {
            prompt_tokens: 1_000_000_000_000_000_000,
            ..Usage::default()
        }),
        finished_at: Utc::now(),
    };
    spool.put(&inconsistent).await.unwrap();
    // Their leases (the usage API's default, 5 minutes) ran out meanwhile and a
    // replica's sweep released the holds. A minute past them: 5 minutes from
    // now could fall on the millisecond the second lease ends, which is not yet
    // past it.
    assert_eq!(
        h.store
            .release_expired(Utc::now() + chrono::TimeDelta::minutes(6))
            .await
            .unwrap(),
        2
    );
    assert_eq!(h.workspace().await, Counter::default());

    // A replay by the gateway of this process: the entries were another's.
    let replayed = h.gateway.replay_spool().await.unwrap();
    assert_eq!(
        replayed,
        Replayed {
            billed: 2,
            already_recorded: 0,
            refused: 1,
            left: 0
        }
    );
    let billed = h.cost_of("big", usage);
    let estimate = Nanos::new(1_500_000);
    assert_eq!(h.workspace().await, settled(billed + estimate));
    assert_eq!(h.model_counter("big").await.spent, billed);
    assert_eq!(h.model_counter("mid").await.spent, estimate);
    assert_eq!(spool.entries().await.unwrap(), []);

    // The same entry again (its removal was lost, or another process replays a
    // copy): found recorded, counted once.
    spool.put(&entry).await.unwrap();
    spool.unclaim(&entry.reservation);
    let again = h.gateway.replay_spool().await.unwrap();
    assert_eq!(again.already_recorded, 1);
    assert_eq!(again.billed, 0);
    assert_eq!(h.workspace().await.spent, billed + estimate);
    assert_eq!(spool.entries().await.unwrap(), []);
    assert_eq!(h.gateway.replay_spool().await.unwrap(), Replayed::default());
}

/// `/healthz` answers `ok` while the database answers, and 503 once it is gone
/// (PostgreSQL: the database is dropped under the running server); requests
/// are then refused with 503 `database_unavailable`, not 500.
async fn health_follows_the_database(db: &TestDb) {
    let h = start(db, Options::default()).await;
    assert_eq!(h.health().await, (200, "ok".to_owned()));
    let served = h.chat(&chat_body("test/big")).await;
    assert_eq!(served.status(), 200);
    let _ = served.bytes().await.unwrap();
    if !db.url.starts_with("postgres") {
        return;
    }
    let admin_url = std::env::var("TEST_DATABASE_URL").unwrap();
    let name = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (status, text) = h.health().await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("database"), "{text}");
    // The first on the connection the drop ended, the next on a new one.
    for _ in 0..2 {
        let refused = h.chat(&chat_body("test/big")).await;
        assert_error(refused, 503, "api_error", "database_unavailable", None).await;
    }
}

/// While another process holds the write lock, a request waits for it; once it
/// has waited [`server::http::HEALTH_TIMEOUT`], `/healthz` says writes are held
/// up (503), although reads still answer; when the lock is let go, the request
/// is served and `/healthz` is `ok` again.
async fn health_reports_writes_held_up(db: &TestDb) {
    let h = start(db, Options::default()).await;
    assert_eq!(h.health().await, (200, "ok".to_owned()));
    let holder = WriteLockHolder::take(&db.url).await;
    let taken = tokio::time::Instant::now();
    let body = chat_body("test/big");
    let (answer, held_up) = tokio::join!(h.chat(&body), async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let held_up = loop {
            let (status, text) = h.health().await;
            if status != 200 {
                break (status, text);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/healthz stayed ok while writes waited 8 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Not before the request had waited that long.
        assert!(taken.elapsed() >= server::http::HEALTH_TIMEOUT);
        holder.release().await;
        held_up
    });
    assert_eq!(held_up.0, 503, "{}", held_up.1);
    assert!(
        held_up
            .1
            .starts_with("writes to the database have been held up for"),
        "{}",
        held_up.1
    );
    assert_eq!(answer.status(), 200);
    assert_eq!(h.health().await, (200, "ok".to_owned()));
}

/// Requests that wait for SQLite's write lock past the store's busy timeout
/// (another process holding it, 10 s) get 503 `database_busy` with
/// `retry-after`, an answer SDKs retry, and nothing is reserved or spent. However
/// long the lock is held, no request waits much more than twice that timeout:
/// the writes queued behind a refused one are refused with it, not tried one by
/// one, each waiting the whole timeout again. Once the lock is let go, requests
/// are served again. On PostgreSQL the same holds for another session holding
/// the plan row's lock (its `lock_timeout`, 10 s).
async fn a_lock_held_past_the_busy_timeout_gets_503_and_spends_nothing(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let served = h.chat(&chat_body("test/big")).await;
    assert_eq!(served.status(), 200);
    let _ = served.bytes().await.unwrap();
    let before = h.workspace().await;

    let holder = WriteLockHolder::take(&db.url).await;
    let taken = tokio::time::Instant::now();
    let held = Duration::from_secs(24);
    // One request, then three more while the first still waits.
    let send = |after: u64| {
        let h = &h;
        async move {
            tokio::time::sleep(Duration::from_secs(after)).await;
            let sent = tokio::time::Instant::now();
            let response = h.chat(&chat_body("test/big")).await;
            (response, sent.elapsed())
        }
    };
    let (answers, ()) = tokio::join!(
        futures::future::join_all([send(0), send(1), send(3), send(6)]),
        async {
            tokio::time::sleep_until(taken + held).await;
            holder.release().await;
        }
    );
    for (refused, waited) in answers {
        assert!(waited < Duration::from_secs(22), "waited {waited:?}");
        assert_eq!(refused.headers()["retry-after"], "1");
        let body = assert_error(refused, 503, "api_error", "database_busy", None).await;
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("nothing was spent"),
            "{body}"
        );
    }
    assert_eq!(h.workspace().await, before);
    assert_eq!(
        h.mock.received().len(),
        1,
        "the refused requests went nowhere"
    );

    let served = h.chat(&chat_body("test/big")).await;
    assert_eq!(served.status(), 200);
}

/// A gateway on `db` (PostgreSQL) reached through a [`common::cut::Link`], and
/// the books after one request served: the spend of one request.
async fn start_through_link(db: &TestDb) -> (Harness, common::cut::Link, Counter) {
    let link = common::cut::Link::to_server_of(&db.url).await;
    let h = start(
        &db.reached_at(link.url_through(&db.url)),
        Options::default(),
    )
    .await;
    let one = h.serve_one("test/big").await;
    (h, link, one)
}

/// When the network to PostgreSQL stops carrying anything without closing a
/// connection (a firewall dropping packets, a paused host; here the link is
/// frozen), a request is refused with 503 `database_unavailable` once the
/// database has not answered a statement for 15 s, instead of waiting for as
/// long as TCP takes to give up, and so are the requests behind it. The first
/// is answered then: the batch does not also wait for a new connection that
/// the network would leave waiting as well. Once the network carries again,
/// requests are served, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_stops_answering_gets_503_not_a_hang() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let (h, link, one) = start_through_link(&db).await;

    link.freeze();
    let send = |after: u64| {
        let h = &h;
        async move {
            tokio::time::sleep(Duration::from_secs(after)).await;
            let sent = tokio::time::Instant::now();
            let answer =
                tokio::time::timeout(Duration::from_secs(60), h.chat(&chat_body("test/big")))
                    .await
                    .expect("no answer within 60 s");
            (answer, sent.elapsed())
        }
    };
    let (answers, waits): (Vec<_>, Vec<_>) = futures::future::join_all([send(0), send(2), send(4)])
        .await
        .into_iter()
        .unzip();
    // 15 s for the unanswered statement (25 s when a new connection was tried).
    assert!(waits[0] < Duration::from_secs(20), "{waits:?}");
    h.refused_as_unavailable(answers).await;

    link.mend().await;
    h.serves_again_spending_only_what_it_served(one).await;
}

/// A request in flight when the network to PostgreSQL freezes gets its
/// provider's answer once its settlement has waited 15 s for the database (not
/// after three tries, some 45 to 60 s), and is billed exactly once when the
/// network carries again, with nothing left reserved (DESIGN.md R7).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_when_the_database_stops_answering_is_answered_then_billed() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let (h, link, one) = start_through_link(&db).await;

    h.mock.set(|b| b.delay = Duration::from_millis(1500));
    let (status, waited) = tokio::join!(
        async {
            let sent = tokio::time::Instant::now();
            let response = h.chat(&chat_body("test/big")).await;
            let status = response.status();
            let _ = response.bytes().await.unwrap();
            (status, sent.elapsed())
        },
        async {
            // Once the request is admitted, before its upstream answers.
            tokio::time::sleep(Duration::from_millis(500)).await;
            link.freeze();
        }
    )
    .0;
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_secs(25),
        "answered after {waited:?}"
    );

    link.mend().await;
    let after = h
        .workspace_once_nothing_is_reserved(Duration::from_secs(45))
        .await;
    assert_eq!(after.spent, one.spent.checked_add(one.spent).unwrap());
}

/// When the PostgreSQL server goes out of reach (here the link to it is cut,
/// closing the connections the store had and refusing new ones), a request is
/// answered 503 `database_unavailable` with `retry-after`, not 500, and sent
/// nowhere; `/healthz` says 503. Requests sent at once while no connection can
/// be made are all refused alike once the pool has waited its 10 s for one: the
/// writes queued behind the first refused do not each wait for another try.
/// Once the server can be reached again, requests are served without a
/// restart, and the books hold the served ones only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_out_of_reach_gets_503_and_serves_again_once_back() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let (h, link, one) = start_through_link(&db).await;

    link.cut();
    let refused = h.chat(&chat_body("test/big")).await;
    assert_eq!(refused.headers()["retry-after"], "5");
    let body = assert_error(refused, 503, "api_error", "database_unavailable", None).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("nothing was spent"), "{body}");
    assert!(!message.contains("127.0.0.1"), "{body}");
    let (status, text) = h.health().await;
    assert_eq!(status, 503, "{text}");

    let sent = tokio::time::Instant::now();
    let body = chat_body("test/big");
    let refused = futures::future::join_all((0..100).map(|_| h.chat(&body))).await;
    let waited = sent.elapsed();
    h.refused_as_unavailable(refused).await;
    assert!(waited < Duration::from_secs(18), "waited {waited:?}");

    link.mend().await;
    h.serves_again_spending_only_what_it_served(one).await;
}

/// A connection to the server of `TEST_DATABASE_URL`, outside the database
/// under test.
async fn admin_connection() -> sqlx::PgConnection {
    use sqlx::Connection as _;
    let admin_url = std::env::var("TEST_DATABASE_URL").unwrap();
    sqlx::PgConnection::connect(&admin_url).await.unwrap()
}

/// Ends every session on the PostgreSQL database `name`, as a restart of the
/// server does.
async fn end_sessions(name: &str) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .execute(&mut admin_connection().await)
    .await
    .unwrap();
}

/// When PostgreSQL ended the gateway's sessions (a restart of the server, an
/// operator's `pg_terminate_backend`), the next request is served, however soon
/// it comes: the hot path's connection, found lost when its batch begins, is
/// replaced and the batch begins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_ended_cost_no_request() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let h = start(&db, Options::default()).await;
    let name = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    for _ in 0..2 {
        let served = h.chat(&chat_body("test/big")).await;
        assert_eq!(served.status(), 200);
        let _ = served.bytes().await.unwrap();
        end_sessions(&name).await;
    }
    let served = h.chat(&chat_body("test/big")).await;
    assert_eq!(served.status(), 200);
    let _ = served.bytes().await.unwrap();
}

/// When the PostgreSQL database turns read-only (a standby after a failover,
/// say; here `default_transaction_read_only` and the sessions ended), requests
/// get 503 `database_unavailable`, and `/healthz`, whose reads still work,
/// answers 503 as long as the database refuses writes, from before any write
/// has failed, so that a load balancer stops sending requests that could only
/// fail; once it takes writes again, `/healthz` is `ok` and requests are
/// served, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_turns_read_only_is_reported_until_it_takes_writes() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let h = start(&db, Options::default()).await;
    let one = h.serve_one("test/big").await;

    let name = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    let set_read_only = |on: bool| {
        let name = name.clone();
        async move {
            let setting = match on {
                true => "SET default_transaction_read_only = on",
                false => "RESET default_transaction_read_only",
            };
            sqlx::query(&format!("ALTER DATABASE {name} {setting}"))
                .execute(&mut admin_connection().await)
                .await
                .unwrap();
            // Sessions take the setting when they start.
            end_sessions(&name).await;
        }
    };
    set_read_only(true).await;
    let unwritable = (
        503,
        "the database cannot be reached or cannot take writes".to_owned(),
    );
    assert_eq!(h.health().await, unwritable, "before any write failed");
    // The first request may meet a session that was ended, the next ones a
    // read-only one: all are refused alike.
    let mut refused = Vec::new();
    for _ in 0..3 {
        refused.push(h.chat(&chat_body("test/big")).await);
    }
    h.refused_as_unavailable(refused).await;
    assert_eq!(h.health().await, unwritable);

    set_read_only(false).await;
    h.serves_again_spending_only_what_it_served(one).await;
}

/// Once a batch of the hot path has waited its 10 s for another process's lock
/// on the SQLite file in vain, the process's other writes (here a usage-API
/// record) wait only a moment for it: refused with 503 `database_busy` at once,
/// nothing recorded, instead of holding every write of the process behind them
/// for another 10 s each; and `/healthz` answers 503 until the lock is free,
/// even with no write waiting. Once the lock is let go they are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_writes_do_not_wait_out_a_lock_the_hot_path_met() {
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let records = json!({"records": [
        {"idempotency_key": "held/1", "model": "mid", "usage": {"prompt_tokens": 1000, "completion_tokens": 500}},
    ]});
    let holder = WriteLockHolder::take(&db.url).await;
    let refused = h.chat(&chat_body("test/big")).await;
    assert_error(refused, 503, "api_error", "database_busy", None).await;

    let sent = tokio::time::Instant::now();
    let (status, body) = h.api("/api/v1/usage", &records).await;
    let waited = sent.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_busy", "{body}");
    // Not the 10 s a write waits for a lock not known to be held.
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    // No write of the process waits now, yet the replica is not ready.
    assert_eq!(
        h.health().await,
        (
            503,
            "another process holds the database's write lock".to_owned()
        )
    );

    holder.release().await;
    assert_eq!(h.health().await, (200, "ok".to_owned()));
    assert_eq!(h.workspace().await, Counter::default());
    let (status, body) = h.api("/api/v1/usage", &records).await;
    assert_eq!(status, 200, "{body}");
    // 1000 × 0.5 + 500 × 2 = 1500 EUR per 1M tokens.
    assert_eq!(h.workspace().await, settled(Nanos::new(1_500_000)));
    let served = h.chat(&chat_body("test/big")).await;
    assert_eq!(served.status(), 200);
}

/// A request served while the database was held up past its lock timeout
/// (SQLite's 10 s) gets its answer after that one wait, not after three tries
/// of it, and its settlement goes on after the answer until the lock is let go:
/// billed once, nothing left reserved (DESIGN.md R7). Without it, the usage
/// went unbilled. The lease sweeps of the same process meanwhile give up at once
/// instead of holding the writer for 10 s each, which put the answer off to
/// about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_held_up_past_the_answer_is_billed_after() {
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let one = h.serve_one("test/big").await;

    h.mock.set(|b| b.delay = Duration::from_millis(1500));
    let answered = Notify::new();
    let ((answer, waited), (holder, sweeps)) = tokio::join!(
        async {
            let sent = tokio::time::Instant::now();
            let response = h.chat(&chat_body("test/big")).await;
            let status = response.status();
            let body = response.bytes().await.unwrap();
            answered.notify_one();
            ((status, body), sent.elapsed())
        },
        async {
            // Taken once the request is admitted, before its upstream answers.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let holder = WriteLockHolder::take(&db.url).await;
            // This process's lease sweep, every 2 s until the answer.
            let mut sweeps = Vec::new();
            loop {
                tokio::select! {
                    () = answered.notified() => break,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                sweeps.push(h.store.release_expired(Utc::now()).await);
            }
            (holder, sweeps)
        }
    );
    assert_eq!(answer.0, 200, "{:?}", answer.1);
    // Each waited for the settlement's try under way, if any, then gave up.
    assert!(!sweeps.is_empty(), "{sweeps:?}");
    for swept in &sweeps {
        assert!(
            matches!(swept, Err(StoreError::Busy(_))),
            "a sweep under the lock: {swept:?}"
        );
    }
    // One try of 10 s (three, 31 s, before), not held up by the sweeps.
    assert!(
        waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    // Answered with the lock still held: the settlement has not landed.
    assert_eq!(h.workspace().await.spent, one.spent);
    holder.release().await;
    let settled = h
        .workspace_once_nothing_is_reserved(Duration::from_secs(20))
        .await;
    assert_eq!(settled.spent, one.spent.checked_add(one.spent).unwrap());
}

/// An upstream error while the database is held up past its lock timeout is
/// answered after that one wait (not after three tries of it), and the hold is
/// released once the lock is let go, not only when its lease ends (R7):
/// nothing billed, nothing left reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_held_up_past_the_answer_is_made_after() {
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let one = h.serve_one("test/big").await;

    h.mock.set(|b| {
        b.status = 500;
        b.delay = Duration::from_millis(1500);
    });
    let ((status, waited), holder) = tokio::join!(
        async {
            let sent = tokio::time::Instant::now();
            let response = h.chat(&chat_body("test/big")).await;
            (response.status(), sent.elapsed())
        },
        async {
            // Taken once the request is admitted, before its upstream answers.
            tokio::time::sleep(Duration::from_millis(500)).await;
            WriteLockHolder::take(&db.url).await
        }
    );
    assert_eq!(status, 502);
    assert!(
        waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    // Answered with the lock still held: the hold is still counted.
    assert!(h.workspace().await.reserved > Nanos::ZERO);
    holder.release().await;
    let after = h
        .workspace_once_nothing_is_reserved(Duration::from_secs(20))
        .await;
    assert_eq!(after, one, "released, and nothing billed");
}

/// A request whose hold was released by the sweep while its upstream answered
/// (its lease ran out; here another replica sweeps as if it had) is billed all
/// the same, from the lapsed hold: the provider served it (DESIGN.md R7).
async fn a_request_whose_lease_ran_out_is_billed_all_the_same(db: &TestDb) {
    let h = start(db, Options::default()).await;
    let one = h.serve_one("big").await;

    let elsewhere = server::db::open(&db.url, Durability::Normal)
        .await
        .unwrap()
        .store;
    h.mock.set(|b| b.delay = Duration::from_millis(1000));
    let body = chat_body("big");
    let (answer, swept) = tokio::join!(h.chat(&body), async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        elsewhere
            .release_expired(Utc::now() + chrono::TimeDelta::minutes(5))
            .await
            .unwrap()
    });
    assert_eq!(swept, 1, "the request's hold was not swept");
    assert_eq!(answer.status(), 200);
    let _ = answer.bytes().await.unwrap();
    let after = h.workspace().await;
    assert_eq!(after.reserved, Nanos::ZERO);
    assert_eq!(after.spent, one.spent.checked_add(one.spent).unwrap());
    let snapshot = elsewhere.spend_snapshot(Utc::now()).await.unwrap();
    let ledger = elsewhere.ledger_totals(snapshot.cycle.start).await.unwrap();
    assert_eq!((ledger.events, ledger.total), (2, after.spent));
    // Counted as usage, and as billed after its lease: once.
    let metrics = h.metrics().await;
    for line in [
        "tollgate_settlements_total{kind=\"usage\",model=\"big\"} 2",
        "tollgate_settlements_total{kind=\"lease_expired\",model=\"big\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

on_both_backends!(
    a_lock_held_past_the_busy_timeout_gets_503_and_spends_nothing,
    health_follows_the_database,
    health_reports_writes_held_up,
    non_streaming_round_trip,
    streaming_round_trip,
    streamed_and_not_streamed_cost_the_same,
    fifty_concurrent_requests_against_a_plan_for_ten,
    model_cap_falls_back_to_the_dearest_cheaper_model_with_room,
    model_cap_without_fallback_blocks,
    upstream_errors_release_the_reservation,
    an_upstream_redirect_is_not_followed,
    an_answer_larger_than_the_gateway_reads_is_not_read_on,
    upstream_timeout_releases_the_reservation,
    client_disconnect_mid_stream_still_settles,
    the_usage_api_leaves_the_gateway_s_holds_alone,
    shutdown_waits_for_abandoned_exchanges_to_settle,
    stream_without_usage_is_billed_its_estimate,
    a_running_usage_count_cut_short_is_billed_the_estimate,
    a_stream_silent_after_its_usage_is_ended_soon,
    an_upstream_error_event_ends_the_stream_as_sent,
    a_stream_line_past_the_limit_breaks_the_stream_off,
    a_stream_answered_without_a_stream_is_a_502_billed_its_usage,
    refusals_reserve_and_spend_nothing,
    the_upstream_key_never_leaks,
    an_upstream_key_read_from_a_file_loses_its_line_break,
    usage_api_admits_settles_releases_and_records_once,
    a_restarted_gateway_leaves_no_reservations,
    the_settlement_spool_is_replayed_exactly_once,
    a_request_whose_lease_ran_out_is_billed_all_the_same,
    a_key_revoked_elsewhere_spends_nothing_more,
);

/// An upstream key whose variable ends in a line break (a secret file's last
/// line) is sent without it: with it, no request could be built.
async fn an_upstream_key_read_from_a_file_loses_its_line_break(db: &TestDb) {
    let h = start(
        db,
        Options {
            upstream_key_line_break: true,
            ..Options::default()
        },
    )
    .await;
    assert_eq!(h.chat(&chat_body("big")).await.status(), 200);
    assert_eq!(
        h.mock.received()[0].authorization.as_deref(),
        Some(format!("Bearer {}", h.upstream_key).as_str())
    );
}

/// A key revoked by another process (the CLI) while the gateway still remembers
/// it as live spends nothing more: the admission checks it again, so its next
/// chat request and usage-API admission get 401 and the books do not move.
async fn a_key_revoked_elsewhere_spends_nothing_more(db: &TestDb) {
    let h = start(db, Options::default()).await;
    assert_eq!(h.chat(&chat_body("big")).await.status(), 200);
    let before = h.store.spend_snapshot(Utc::now()).await.unwrap().workspace;
    let cli = server::db::connect(&db.url, Durability::Normal)
        .await
        .unwrap();
    let keys = cli.list_api_keys(None).await.unwrap();
    assert_eq!(keys.len(), 1, "the member's key only");
    cli.revoke_api_key(&Actor::Cli, keys[0].id, Utc::now())
        .await
        .unwrap();

    assert_invalid_api_key(h.chat(&chat_body("big")).await).await;
    let response = h
        .post("/api/v1/admissions")
        .json(&json!({"model": "big", "prompt_tokens": 10}))
        .send()
        .await
        .unwrap();
    assert_invalid_api_key(response).await;
    let after = h.store.spend_snapshot(Utc::now()).await.unwrap().workspace;
    assert_eq!(after, before);
    assert_eq!(after.reserved, app::domain::Nanos::ZERO);
    assert_eq!(h.mock.received().len(), 1, "nothing more went upstream");
}

/// The official `openai` Python package against the gateway: non-streamed and
/// streamed calls, the served model, and a 429 it does not retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_python_sdk_works_unchanged() {
    let python = std::env::var("TOLLGATE_TEST_PYTHON").expect(
        "TOLLGATE_TEST_PYTHON is unset: run `./dev test`, which creates .venv with the pinned \
         `openai` package, or point it at a Python that has it",
    );
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    // `mid` falls back to `flat`; `small` has nothing cheaper, so it is blocked.
    h.set_limit("mid", 0).await;
    h.set_limit("small", 0).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk/check.py");
    let base_url = format!("{}/v1", h.url);
    let key = h.key.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("TOLLGATE_BASE_URL", base_url)
            .env("TOLLGATE_API_KEY", key)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    std::io::stderr()
        .write_all(format!("check.py stdout:\n{stdout}\ncheck.py stderr:\n{stderr}\n").as_bytes())
        .unwrap();
    assert!(
        output.status.success(),
        "check.py failed: {}",
        output.status
    );
    for line in [
        "non-streamed: served by big",
        "streamed: served by big",
        "streamed usage: prompt 12, completion 5",
        "capped: served by flat",
        "blocked: model_limit_reached",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?}");
    }
    // The SDK did not retry the 429 (x-should-retry: false).
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "tollgate_requests_total{endpoint=\"chat_completions\",model=\"small\",outcome=\"model_limit_reached\"} 1"
        ),
        "{metrics}"
    );
}

/// Answers given before the request's body is read (401 for a bad key, at once
/// whatever the body; 404 for an unknown URL; 415 for a compressed body) leave
/// the connection usable: the body is still read and thrown away, and the
/// client's next request on the same connection is answered. Here each body is
/// sent 20 ms after its head, as Python's `http.client` may, on one connection
/// without retries. A body declared larger than the gateway takes is not read:
/// its 413 says `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_given_before_the_body_is_read_keep_the_connection() {
    use http_body_util::BodyExt as _;
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let address = h.url.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let bad_key = "Bearer tg_not-a-key".to_owned();
    let good_key = format!("Bearer {}", h.key);
    let chat = bytes::Bytes::from(chat_body("big").to_string());
    let too_large = bytes::Bytes::from(vec![b' '; Options::default().max_request_bytes + 1]);
    for (path, authorization, encoding, body, status) in [
        ("/v1/chat/completions", &bad_key, "identity", &chat, 401),
        ("/api/v1/usage", &bad_key, "identity", &chat, 401),
        ("/v1/no-such-endpoint", &good_key, "identity", &chat, 404),
        ("/v1/chat/completions", &good_key, "gzip", &chat, 415),
        ("/v1/chat/completions", &bad_key, "identity", &chat, 401),
        ("/v1/chat/completions", &good_key, "identity", &chat, 200),
        (
            "/v1/chat/completions",
            &good_key,
            "identity",
            &too_large,
            413,
        ),
    ] {
        let body = body.clone();
        let length = body.len();
        let later = futures::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(body))
        });
        let request = axum::http::Request::post(path)
            .header("host", &address)
            .header("authorization", authorization)
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .header("content-length", length)
            .body(http_body_util::StreamBody::new(later))
            .unwrap();
        sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("the connection was closed before {path}: {e}"));
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("{path} got no answer: {e}"));
        assert_eq!(response.status().as_u16(), status, "{path}");
        let closes = response
            .headers()
            .get("connection")
            .is_some_and(|value| value == "close");
        assert_eq!(closes, status == 413, "{path}: {:?}", response.headers());
        let _ = response.into_body().collect().await;
    }
}

/// A request that waits for `100 Continue` and is answered 401 first may never
/// send its body (RFC 9110 §10.1.1): its answer closes the connection, so the
/// client does not send its next request where the server still waits for
/// that body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_a_request_expecting_continue_closes_the_connection() {
    let db = TestDb::sqlite();
    let h = start(&db, Options::default()).await;
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth("tg_not-a-key")
        .header("expect", "100-continue")
        .header("content-type", "application/json")
        .body(chat_body("big").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{:?}",
        response.headers()
    );
}
