//! Open-loop load at a fixed rate, for `server/benches/gateway.sh`: requests leave
//! on a fixed schedule whether or not earlier ones were answered (closed-loop
//! tools like wrk slow down with the server and hide queueing), each one the
//! benchmark's chat completion.
//!
//! Usage: `gateway_rate URL KEY RATE SECONDS`, URL up to `/v1`. Prints one line:
//! requests sent, achieved requests/s, answers other than 200, client latency
//! p50/p99 and, when the target is the gateway, its added time p50/p99 (its
//! `Server-Timing` `gateway` metric: total minus upstream time), microseconds.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark with bad arguments should stop at once"
)]

use std::time::{Duration, Instant};

use server::replay::{exchange, percentile, Outcome};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, key, rate, seconds] = args.as_slice() else {
        eprintln!("usage: gateway_rate URL KEY RATE SECONDS");
        std::process::exit(2);
    };
    let rate: u32 = rate.parse().unwrap();
    let seconds: u32 = seconds.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(url, key, rate, seconds));
}

async fn run(url: &str, key: &str, rate: u32, seconds: u32) {
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", url.trim_end_matches('/'));
    let body = r#"{"model":"bench","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}"#;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..u64::from(rate) * u64::from(seconds) {
        tick.tick().await;
        let call = client
            .post(&url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body);
        tasks.spawn(async move {
            let sent = Instant::now();
            let (outcome, gateway) = exchange(call, "bench").await;
            (outcome, sent.elapsed(), gateway)
        });
    }
    let results = tasks.join_all().await;
    let wall = start.elapsed();
    let refused = results
        .iter()
        .filter(|(outcome, ..)| !matches!(outcome, Outcome::Served { .. }))
        .count();
    let micros = |d: &Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut latency: Vec<u64> = results.iter().map(|(_, l, _)| micros(l)).collect();
    let mut added: Vec<u64> = results
        .iter()
        .filter_map(|(_, _, g)| g.as_ref().map(micros))
        .collect();
    latency.sort_unstable();
    added.sort_unstable();
    let achieved = results.len() as u128 * 1_000_000 / wall.as_micros().max(1);
    let added = if added.is_empty() {
        "-".to_owned()
    } else {
        format!("{}/{}", percentile(&added, 50), percentile(&added, 99))
    };
    println!(
        "{:>7} {:>7} {:>6} {:>9}/{:<9} {:>13}",
        results.len(),
        achieved,
        refused,
        percentile(&latency, 50),
        percentile(&latency, 99),
        added,
    );
}
