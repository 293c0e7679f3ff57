//! Prometheus metrics of the gateway and the usage API (DESIGN.md §7), served as
//! text on `GET /metrics`.
//!
//! One registry per [`super::Gateway`] (not the process-global one), so that
//! several gateways in one process, as in the tests, count apart. Money is counted
//! in whole nano-euros (integers, DESIGN.md R2); durations in seconds, the
//! Prometheus convention.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The gateway's counters and histograms.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    admissions: IntCounterVec,
    spend: IntCounterVec,
    settlements: IntCounterVec,
    upstream_seconds: HistogramVec,
    overhead_seconds: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero:
    ///
    /// - `tollgate_requests_total{endpoint, model, outcome}`: requests answered, by
    ///   endpoint (`chat_completions`, `models`, `admissions`, `usage`, ...), requested
    ///   model (catalog id, `""` before it is known) and outcome (`ok` or the error
    ///   code, e.g. `plan_limit_reached`, `invalid_value`, `upstream_timeout`);
    /// - `tollgate_admissions_total{requested_model, served_model, outcome}`:
    ///   admission decisions (R6): `admitted`, `fallback`, `plan_limit_reached`,
    ///   `model_limit_reached`;
    /// - `tollgate_spend_nanoeuros_total{model}`: settled cost, nano-euros, by served
    ///   model (R2: integers, so it adds up exactly);
    /// - `tollgate_settlements_total{model, kind}`: how holds ended: `usage` (billed
    ///   the reported usage), `estimate` (no usage reported: billed the reservation),
    ///   `released`, `failed` (the store refused or failed; the lease will expire),
    ///   and `spooled`: a settlement the database could not take before its
    ///   answer, written to the settlement spool (counted again as `usage` or
    ///   `estimate` once billed; a rate above zero means a database held up),
    ///   and `lease_expired`: one billed after the sweep had released its hold
    ///   (counted also as `usage` or `estimate`; the ledger row is flagged so,
    ///   R7: the hold's room was free for other requests meanwhile);
    /// - `tollgate_upstream_duration_seconds{model, stream}`: from sending the
    ///   upstream request to its last byte;
    /// - `tollgate_gateway_overhead_seconds{endpoint, stream}`: the request's time in
    ///   the gateway minus the time waiting for the upstream (auth, parsing,
    ///   admission, settlement).
    pub fn new() -> Metrics {
        // The definitions are constants: only a typo in them can fail, and the
        // unit test below would catch it before any release.
        Metrics::build().expect("the gateway metric definitions are valid")
    }

    /// [`Metrics::new`] with the spend series of each of `models` (catalog ids)
    /// present at 0: `/metrics` lists every model before its first request, and
    /// a rate over spend starts from zero instead of from the first settlement.
    pub fn for_models<'a>(models: impl IntoIterator<Item = &'a str>) -> Metrics {
        let metrics = Metrics::new();
        for model in models {
            metrics.spend.with_label_values(&[model]);
        }
        metrics
    }

    fn build() -> Result<Metrics, prometheus::Error> {
        let metrics = Metrics::build_unregistered()?;
        let registry = &metrics.registry;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.admissions.clone()))?;
        registry.register(Box::new(metrics.spend.clone()))?;
        registry.register(Box::new(metrics.settlements.clone()))?;
        registry.register(Box::new(metrics.upstream_seconds.clone()))?;
        registry.register(Box::new(metrics.overhead_seconds.clone()))?;
        Ok(metrics)
    }

    fn build_unregistered() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests answered by the gateway and the usage API, by endpoint, requested model and outcome.",
            ),
            &["endpoint", "model", "outcome"],
        )?;
        let admissions = IntCounterVec::new(
            Opts::new(
                "tollgate_admissions_total",
                "Admission decisions (DESIGN.md R6) by requested model, served model and outcome.",
            ),
            &["requested_model", "served_model", "outcome"],
        )?;
        let spend = IntCounterVec::new(
            Opts::new(
                "tollgate_spend_nanoeuros_total",
                "Settled cost in nano-euros (1e-9 EUR), by served model.",
            ),
            &["model"],
        )?;
        let settlements = IntCounterVec::new(
            Opts::new(
                "tollgate_settlements_total",
                "How reservations ended: usage, estimate, released or failed, by served model.",
            ),
            &["model", "kind"],
        )?;
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_duration_seconds",
                "Time from sending a request upstream to its last byte, seconds.",
            )
            // Seconds, 5 ms to 10 minutes (durations, not money: no Decimal needed).
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0,
            ]),
            &["model", "stream"],
        )?;
        let overhead_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_gateway_overhead_seconds",
                "Time a request spends in the gateway itself (total minus upstream), seconds.",
            )
            // Seconds, 100 µs to 5 s.
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 5.0,
            ]),
            &["endpoint", "stream"],
        )?;
        Ok(Metrics {
            registry,
            requests,
            admissions,
            spend,
            settlements,
            upstream_seconds,
            overhead_seconds,
        })
    }

    /// Counts one answered request.
    pub fn request(&self, endpoint: &str, model: &str, outcome: &str) {
        self.requests
            .with_label_values(&[endpoint, model, outcome])
            .inc();
    }

    /// Counts one admission decision (`admitted`, `fallback` or a block code).
    pub fn admission(&self, requested: &str, served: &str, outcome: &str) {
        self.admissions
            .with_label_values(&[requested, served, outcome])
            .inc();
    }

    /// Adds `nanos` nano-euros of settled cost on `model`; negative amounts (never
    /// produced by the store) are ignored.
    pub fn spend(&self, model: &str, nanos: i64) {
        if let Ok(nanos) = u64::try_from(nanos) {
            self.spend.with_label_values(&[model]).inc_by(nanos);
        }
    }

    /// Counts how one hold on `model` ended (`usage`, `estimate`, `released`,
    /// `failed`).
    pub fn settlement(&self, model: &str, kind: &str) {
        self.settlements.with_label_values(&[model, kind]).inc();
    }

    /// Records one upstream exchange's duration.
    pub fn upstream(&self, model: &str, stream: bool, elapsed: Duration) {
        self.upstream_seconds
            .with_label_values(&[model, if stream { "true" } else { "false" }])
            .observe(elapsed.as_secs_f64());
    }

    /// Records the gateway's own time for one request.
    pub fn overhead(&self, endpoint: &str, stream: bool, elapsed: Duration) {
        self.overhead_seconds
            .with_label_values(&[endpoint, if stream { "true" } else { "false" }])
            .observe(elapsed.as_secs_f64());
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_family() {
        let metrics = Metrics::new();
        metrics.request("chat_completions", "m", "ok");
        metrics.admission("m", "m", "admitted");
        metrics.spend("m", 4_400_000);
        metrics.settlement("m", "usage");
        metrics.upstream("m", false, Duration::from_millis(20));
        metrics.overhead("chat_completions", false, Duration::from_micros(300));
        let text = metrics.render();
        for line in [
            "tollgate_requests_total{endpoint=\"chat_completions\",model=\"m\",outcome=\"ok\"} 1",
            "tollgate_admissions_total{outcome=\"admitted\",requested_model=\"m\",served_model=\"m\"} 1",
            "tollgate_spend_nanoeuros_total{model=\"m\"} 4400000",
            "tollgate_settlements_total{kind=\"usage\",model=\"m\"} 1",
            "tollgate_upstream_duration_seconds_count{model=\"m\",stream=\"false\"} 1",
            "tollgate_gateway_overhead_seconds_count{endpoint=\"chat_completions\",stream=\"false\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn each_model_s_spend_is_listed_at_zero_from_the_start() {
        let text = Metrics::for_models(["big", "small"]).render();
        for line in [
            "tollgate_spend_nanoeuros_total{model=\"big\"} 0",
            "tollgate_spend_nanoeuros_total{model=\"small\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!Metrics::new()
            .render()
            .contains("tollgate_spend_nanoeuros_total{"));
    }
}
