//! The Azure LLM inference trace of 2023 (`server/data/azure-llm-trace-2023/`,
//! CC-BY-4.0, attribution in its README): one hour of real requests with their
//! arrival times and token counts, embedded in the binary so that `tollgate replay`
//! works wherever the binary is.

use std::time::Duration;

use chrono::NaiveDateTime;
use serde::Deserialize;

const CODE_CSV: &str = include_str!("../../data/azure-llm-trace-2023/code.csv");
const CONVERSATION_CSV: &str = include_str!("../../data/azure-llm-trace-2023/conv.csv");

/// Which of the trace's two services a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// The coding assistant (`code.csv`).
    Code,
    /// The conversation service (`conv.csv`).
    Conversation,
}

impl Service {
    /// `code` or `conversation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Code => "code",
            Service::Conversation => "conversation",
        }
    }
}

/// One request of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRequest {
    /// Time since the trace's first request (of either service).
    pub offset: Duration,
    /// Its service.
    pub service: Service,
    /// Prompt tokens (`ContextTokens`).
    pub prompt_tokens: u64,
    /// Completion tokens (`GeneratedTokens`).
    pub completion_tokens: u64,
}

/// A row as the CSV files spell it.
#[derive(Debug, Deserialize)]
struct Row {
    #[serde(rename = "TIMESTAMP")]
    timestamp: String,
    #[serde(rename = "ContextTokens")]
    context_tokens: u64,
    #[serde(rename = "GeneratedTokens")]
    generated_tokens: u64,
}

/// Why the trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A row is not `TIMESTAMP,ContextTokens,GeneratedTokens`.
    #[error("{service} trace, row {row}: {problem}")]
    Row {
        /// `code` or `conversation`.
        service: &'static str,
        /// 1-based data row.
        row: usize,
        /// What is wrong.
        problem: String,
    },
}

/// The embedded trace, both services merged in arrival order (ties: code first).
///
/// Errors: [`TraceError::Row`] if an embedded file does not parse (a broken build).
pub fn embedded() -> Result<Vec<TraceRequest>, TraceError> {
    merge(
        parse(Service::Code, CODE_CSV)?,
        parse(Service::Conversation, CONVERSATION_CSV)?,
    )
}

/// The rows of one service's CSV text, with their absolute timestamps (UTC).
///
/// Errors: [`TraceError::Row`] naming the first row that is not
/// `YYYY-MM-DD HH:MM:SS.fffffff,<prompt tokens>,<completion tokens>`.
pub fn parse(service: Service, text: &str) -> Result<Vec<(NaiveDateTime, u64, u64)>, TraceError> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    reader
        .deserialize::<Row>()
        .enumerate()
        .map(|(index, row)| {
            let fail = |problem: String| TraceError::Row {
                service: service.as_str(),
                row: index + 1,
                problem,
            };
            let row = row.map_err(|e| fail(e.to_string()))?;
            let at = NaiveDateTime::parse_from_str(&row.timestamp, "%Y-%m-%d %H:%M:%S%.f")
                .map_err(|e| fail(format!("TIMESTAMP {:?}: {e}", row.timestamp)))?;
            Ok((at, row.context_tokens, row.generated_tokens))
        })
        .collect()
}

fn merge(
    code: Vec<(NaiveDateTime, u64, u64)>,
    conversation: Vec<(NaiveDateTime, u64, u64)>,
) -> Result<Vec<TraceRequest>, TraceError> {
    let mut rows: Vec<(NaiveDateTime, Service, u64, u64)> = code
        .into_iter()
        .map(|(at, p, c)| (at, Service::Code, p, c))
        .chain(
            conversation
                .into_iter()
                .map(|(at, p, c)| (at, Service::Conversation, p, c)),
        )
        .collect();
    rows.sort_by_key(|&(at, service, ..)| (at, service));
    let Some(&(start, ..)) = rows.first() else {
        return Ok(Vec::new());
    };
    Ok(rows
        .into_iter()
        .map(
            |(at, service, prompt_tokens, completion_tokens)| TraceRequest {
                // Sorted, so never negative.
                offset: (at - start).to_std().unwrap_or_default(),
                service,
                prompt_tokens,
                completion_tokens,
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_trace_is_the_published_hour() {
        let trace = embedded().unwrap();
        let count = |s| trace.iter().filter(|r| r.service == s).count();
        let sum = |s, f: fn(&TraceRequest) -> u64| -> u64 {
            trace.iter().filter(|r| r.service == s).map(f).sum()
        };
        // The figures of the data's README.
        assert_eq!(count(Service::Code), 8_819);
        assert_eq!(count(Service::Conversation), 19_366);
        assert_eq!(sum(Service::Code, |r| r.prompt_tokens), 18_059_974);
        assert_eq!(sum(Service::Code, |r| r.completion_tokens), 245_896);
        assert_eq!(sum(Service::Conversation, |r| r.prompt_tokens), 22_361_870);
        assert_eq!(
            sum(Service::Conversation, |r| r.completion_tokens),
            4_088_665
        );
        assert!(trace.windows(2).all(|w| w[0].offset <= w[1].offset));
        assert_eq!(trace[0].offset, Duration::ZERO);
        let last = trace.last().unwrap().offset;
        assert!(last > Duration::from_secs(58 * 60) && last < Duration::from_secs(61 * 60));
    }

    #[test]
    fn a_bad_row_is_named() {
        let error = parse(
            Service::Code,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,1,2\nyesterday,1,2\n",
        )
        .unwrap_err();
        assert!(error
            .to_string()
            .starts_with("code trace, row 2: TIMESTAMP"));
    }
}
