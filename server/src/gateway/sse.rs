//! Relaying an upstream's server-sent events (DESIGN.md §4): each event is passed
//! on unchanged but for `model` (set to the served model), and for the usage chunk
//! the gateway forced on, which is kept from clients that did not ask for it. The
//! usage it carries is what the stream is settled with (R7).
//!
//! The byte stream is parsed by `eventsource-stream` (the WHATWG event stream
//! format: `\n`, `\r\n` or `\r` line ends, multi-line data, `event:` and `id:`).
//! Comments (keep-alives) are not relayed, and an event cut off by the end of the
//! stream, without its closing blank line, is dropped, as the format requires.
//! Before that, the bytes are decoded as the format says ([`decoded`]): a byte
//! sequence that is not UTF-8 becomes U+FFFD, and the stream goes on past it.
//! Then they are cut into lines ([`one_line_each`]), so that the parser, which
//! reads its whole buffer again for every piece it is given, reads each byte
//! once; a line longer than [`MAX_LINE_BYTES`] ends the stream ([`events`]).

use std::collections::VecDeque;

use app::domain::Usage;
use bytes::{Bytes, BytesMut};
use eventsource_stream::Eventsource;
pub use eventsource_stream::{Event, EventStreamError};
use serde_json::value::RawValue;

use super::json::RawObject;
use super::upstream::usage_from_upstream;

/// `bytes` decoded as UTF-8 the way the event stream format requires (WHATWG
/// HTML, "Parsing an event stream": UTF-8 decode, a leading byte order mark
/// dropped, every sequence that is not UTF-8 replaced with U+FFFD), by
/// `encoding_rs`'s streaming decoder, so that a character split across two
/// chunks is kept whole. The chunks are re-encoded as UTF-8 bytes for
/// [`Eventsource`], which would otherwise stop at the first bad byte, losing the
/// rest of the answer and its usage. Transport errors pass through unchanged.
pub fn decoded<S, E>(bytes: S) -> impl futures_util::Stream<Item = Result<Bytes, E>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    use futures_util::StreamExt;
    let decoder = encoding_rs::UTF_8.new_decoder();
    futures_util::stream::unfold(Some((Box::pin(bytes), decoder)), |state| async move {
        let (mut bytes, mut decoder) = state?;
        match bytes.next().await {
            Some(Ok(chunk)) => {
                let text = decode(&mut decoder, &chunk, false);
                Some((Ok(text), Some((bytes, decoder))))
            }
            Some(Err(e)) => Some((Err(e), Some((bytes, decoder)))),
            // What is left of a sequence cut off by the end becomes U+FFFD.
            None => Some((Ok(decode(&mut decoder, &[], true)), None)),
        }
    })
}

/// The longest line of an event stream read from an upstream, in bytes (8 MiB):
/// an event of chat completion chunks is a few hundred bytes, and the
/// longest answer a model gives is far shorter. A longer line is not waited
/// for: memory per stream stays bounded, and the stream ends as broken.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// Why the bytes of an upstream's event stream stopped.
#[derive(Debug)]
pub enum ReadError<E> {
    /// The transport failed.
    Transport(E),
    /// A line is longer than [`MAX_LINE_BYTES`].
    LineTooLong,
}

impl<E: std::fmt::Display> std::fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Transport(e) => e.fmt(f),
            ReadError::LineTooLong => write!(
                f,
                "a line of the event stream is longer than {MAX_LINE_BYTES} bytes"
            ),
        }
    }
}

/// The events of an upstream's event stream `bytes`: decoded ([`decoded`]), cut
/// into lines ([`one_line_each`]) and parsed by `eventsource-stream`.
pub fn events<S, E>(
    bytes: S,
) -> impl futures_util::Stream<Item = Result<Event, EventStreamError<ReadError<E>>>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    one_line_each(decoded(bytes)).eventsource()
}

/// `bytes` cut so that each piece is one whole line ending in `\n`, whichever
/// of `\n`, `\r\n` or `\r` ended it, the last piece what follows the last line
/// end. Each byte is looked at once, whatever the pieces it came in. A `\r` ends
/// its line at once (a `\n` right after it is dropped as part of that end), so
/// that a stream whose lines end in `\r` alone is not held up waiting to see
/// whether one follows, and the parser never sees a `\r` it would wait on.
///
/// Errors: [`ReadError::LineTooLong`] once a line is longer than [`MAX_LINE_BYTES`]
/// (nothing follows it); a transport error passes through as
/// [`ReadError::Transport`].
pub fn one_line_each<S, E>(
    bytes: S,
) -> impl futures_util::Stream<Item = Result<Bytes, ReadError<E>>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
{
    use futures_util::StreamExt;
    struct Lines<S> {
        bytes: std::pin::Pin<Box<S>>,
        /// The line being read; bytes before `scanned` hold no line end.
        partial: BytesMut,
        scanned: usize,
        /// The last line ended with `\r`: a `\n` coming next belongs to it.
        after_cr: bool,
        whole: VecDeque<Bytes>,
        /// A line was too long: the lines before it are still to be given.
        too_long: bool,
    }
    impl<S> Lines<S> {
        /// Moves every whole line of `partial` to `whole`; false when a line,
        /// whole or not, is longer than [`MAX_LINE_BYTES`].
        fn cut(&mut self) -> bool {
            let mut i = self.scanned;
            while i < self.partial.len() {
                // A line was just taken (`i` is 0): the `\n` of its `\r\n`.
                if std::mem::take(&mut self.after_cr) && self.partial[i] == b'\n' {
                    let _ = self.partial.split_to(1);
                    continue;
                }
                match self.partial[i] {
                    b'\n' => {}
                    b'\r' => self.after_cr = true,
                    _ => {
                        i += 1;
                        continue;
                    }
                }
                let end = i + 1;
                if end > MAX_LINE_BYTES {
                    return false;
                }
                let mut line = self.partial.split_to(end);
                line[i] = b'\n';
                self.whole.push_back(line.freeze());
                i = 0;
            }
            self.scanned = i;
            self.partial.len() <= MAX_LINE_BYTES
        }
    }
    let lines = Lines {
        bytes: Box::pin(bytes),
        partial: BytesMut::new(),
        scanned: 0,
        after_cr: false,
        whole: VecDeque::new(),
        too_long: false,
    };
    futures_util::stream::unfold(Some(lines), |state| async move {
        let mut lines = state?;
        loop {
            if let Some(line) = lines.whole.pop_front() {
                return Some((Ok(line), Some(lines)));
            }
            if lines.too_long {
                return Some((Err(ReadError::LineTooLong), None));
            }
            match lines.bytes.next().await {
                Some(Ok(chunk)) => {
                    lines.partial.extend_from_slice(&chunk);
                    lines.too_long = !lines.cut();
                }
                Some(Err(e)) => return Some((Err(ReadError::Transport(e)), Some(lines))),
                None if lines.partial.is_empty() => return None,
                None => {
                    let rest = lines.partial.split().freeze();
                    return Some((Ok(rest), None));
                }
            }
        }
    })
}

/// Decodes `chunk` (the last one when `last`) with `decoder`, replacing what is
/// not UTF-8 with U+FFFD.
fn decode(decoder: &mut encoding_rs::Decoder, chunk: &[u8], last: bool) -> Bytes {
    // Room for the worst case, so that one call decodes the whole chunk.
    let room = decoder
        .max_utf8_buffer_length(chunk.len())
        .unwrap_or(chunk.len().saturating_mul(3).saturating_add(4));
    let mut text = String::with_capacity(room);
    let (_, read, _) = decoder.decode_to_string(chunk, &mut text, last);
    debug_assert_eq!(read, chunk.len());
    Bytes::from(text)
}

/// What the relay made of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// Send these bytes to the client.
    Forward(Bytes),
    /// `data: [DONE]`: settle, then send [`DONE_FRAME`].
    Done,
    /// Nothing for the client (the forced usage chunk of a client that did not
    /// ask, or data that is not JSON, which no OpenAI client can read).
    Nothing,
    /// The upstream's error event (`{"error": ...}`, or `event: error`), as
    /// sent: the stream ends there. Whether it can be passed on is the
    /// caller's to decide (it may quote the upstream's key).
    Error {
        /// The event.
        event: Event,
        /// Its data is an OpenAI error (an object with an `error`), which
        /// OpenAI's clients raise.
        openai_error: bool,
    },
}

/// The stream's terminator, sent only after settlement (R7).
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// Rewrites one stream's events for the client and collects its usage.
#[derive(Debug)]
pub struct Relay {
    served_model: Box<RawValue>,
    client_wants_usage: bool,
    upstream: String,
    /// The last event id relayed (`id:`), empty before any.
    last_id: String,
    /// The last usage the stream reported.
    pub usage: Option<Usage>,
    /// Where [`Relay::usage`] stands in the stream.
    standing: Standing,
    /// How many choices the answer has (the request's `n`, 1 to 128).
    choices: u32,
    /// The choices (by `index`, bit `i` for choice `i`) that have sent their
    /// finish reason.
    finished: u128,
    /// True once an event of the answer came (relayed, or dropped as
    /// unreadable): the upstream worked on it. An error event is not one.
    pub answered: bool,
}

impl Relay {
    /// A relay for a stream of `choices` choices (the request's `n`) served by
    /// `served_model` from `upstream` (its name, for logs).
    pub fn new(
        served_model: &str,
        client_wants_usage: bool,
        upstream: &str,
        choices: u32,
    ) -> Relay {
        Relay {
            served_model: super::json::raw_string(served_model),
            client_wants_usage,
            upstream: upstream.to_owned(),
            last_id: String::new(),
            usage: None,
            standing: Standing::Running,
            choices,
            finished: 0,
            answered: false,
        }
    }

    /// The usage to bill the stream with: [`Relay::usage`] when it was the
    /// whole answer's ([`Relay::answer_is_whole`]), else `None` (the estimate,
    /// R7): a running count the answer went on past, or cut short, or a count
    /// given before every choice finished, bills less than was generated.
    pub fn final_usage(&self) -> Option<Usage> {
        self.usage.filter(|_| self.answer_is_whole())
    }

    /// Whether the whole answer is in: its usage alone in the last chunk, or
    /// beside a finish reason once every choice has finished. Nothing but
    /// `[DONE]` is to follow.
    pub fn answer_is_whole(&self) -> bool {
        match self.standing {
            Standing::Alone => true,
            Standing::Finished => self.all_finished(),
            Standing::Running | Standing::Disputed => false,
        }
    }

    fn all_finished(&self) -> bool {
        let all = match self.choices {
            n @ 0..128 => (1u128 << n) - 1,
            _ => u128::MAX,
        };
        self.finished & all == all
    }

    /// Relays one event.
    pub fn relay(&mut self, mut event: Event) -> Relayed {
        if event.data.trim() == "[DONE]" {
            return Relayed::Done;
        }
        // The parser gives every event the last id the stream set (the format
        // keeps it until another comes): relayed once, when it is set.
        if event.id == self.last_id {
            event.id.clear();
        } else {
            self.last_id.clone_from(&event.id);
        }
        let data = event.data.as_str();
        let parsed = RawObject::parse(data.as_bytes());
        let openai_error = parsed
            .as_ref()
            .is_ok_and(|o| o.get_present("error").is_some());
        if openai_error || event.event == "error" {
            return Relayed::Error {
                event,
                openai_error,
            };
        }
        self.answered = true;
        let Ok(mut chunk) = parsed else {
            tracing::warn!(upstream = %self.upstream, bytes = data.len(),
                "the upstream sent an event whose data is not JSON: not relayed");
            return Relayed::Nothing;
        };
        let choices = chunk.get_present("choices");
        let no_choices = choices.is_none_or(|choices| is_empty_array(choices.get()));
        let shapes = choices.and_then(choice_shapes);
        let finishing = shapes.as_deref().map_or(0, finished_mask);
        let was_whole = self.answer_is_whole();
        self.finished |= finishing;
        let usage_field = chunk.get_present("usage");
        let usage_present = usage_field.is_some();
        match usage_field.and_then(|raw| usage_from_upstream(raw, &self.upstream)) {
            Some(usage) => {
                let standing = match choices {
                    _ if no_choices => Standing::Alone,
                    Some(_) if finishing != 0 => Standing::Finished,
                    _ => Standing::Running,
                };
                // Two counts each given as the whole answer's, and not the same:
                // neither is trusted, whichever came last. Nor is a count below
                // one before it: counts only grow.
                let shrinks = self.usage.is_some_and(|before| {
                    usage.prompt_tokens < before.prompt_tokens
                        || usage.completion_tokens < before.completion_tokens
                });
                let disputed = self.standing == Standing::Disputed
                    || shrinks
                    || (was_whole && self.usage != Some(usage));
                self.standing = if disputed {
                    Standing::Disputed
                } else {
                    standing
                };
                self.usage = Some(usage);
            }
            // Content after the count: the count was not the last. (A choice's
            // empty delta beside its finish reason is no content.)
            None => {
                if self.standing.given_as_whole() && choices.is_some() && carries_content(&shapes) {
                    self.standing = Standing::Running;
                }
            }
        }
        if !self.client_wants_usage {
            if usage_present && no_choices {
                return Relayed::Nothing;
            }
            // The `usage: null` of every other chunk is there because the gateway
            // asked for usage: a client that did not sees the chunk as it would be.
            chunk.remove("usage");
        }
        if chunk.get("model").is_some() {
            chunk.set("model", self.served_model.clone());
        }
        Relayed::Forward(frame(&event, &chunk.to_vec()))
    }
}

/// Where a stream's last usage stands: whether it is given as the whole
/// answer's ([`Relay::answer_is_whole`] tells whether it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Beside content, or followed by content: a running count (vLLM's
    /// continuous usage), only what was generated so far.
    Running,
    /// Beside a choice's finish reason, with no content after it: the whole
    /// answer's once every choice has finished.
    Finished,
    /// Alone in a chunk without choices, with nothing after it: OpenAI's last
    /// chunk, after which only `[DONE]` comes.
    Alone,
    /// Given as the whole answer's twice (beside a finish reason, or alone)
    /// with different counts, or below an earlier count: not final, whatever
    /// comes after.
    Disputed,
}

impl Standing {
    /// Whether the usage was given as the whole answer's.
    fn given_as_whole(self) -> bool {
        matches!(self, Standing::Finished | Standing::Alone)
    }
}

/// One choice of a stream's chunk, as far as billing reads it.
#[derive(serde::Deserialize)]
struct ChoiceShape {
    /// Which choice (0 to `n` - 1); none reads as the first.
    #[serde(default)]
    index: u32,
    /// `null` reads as none.
    #[serde(default)]
    finish_reason: Option<serde::de::IgnoredAny>,
    /// What the choice adds to the answer; `{}` (or none) adds nothing.
    #[serde(default)]
    delta: Option<std::collections::HashMap<String, serde::de::IgnoredAny>>,
}

/// The choices of `choices` (a chunk's array), `None` when they cannot be read.
fn choice_shapes(choices: &RawValue) -> Option<Vec<ChoiceShape>> {
    serde_json::from_str(choices.get()).ok()
}

/// The choices of `choices` that carry a finish reason, bit `i` for index `i`
/// (an index past 127, beyond any `n`, sets none).
fn finished_mask(choices: &[ChoiceShape]) -> u128 {
    choices
        .iter()
        .filter(|choice| choice.finish_reason.is_some())
        .filter_map(|choice| 1u128.checked_shl(choice.index))
        .fold(0, |mask, bit| mask | bit)
}

/// Whether `choices` adds anything to the answer: a choice whose delta is not
/// empty, or choices that cannot be read (`None`: taken as content, so that a
/// count before them is not trusted).
fn carries_content(choices: &Option<Vec<ChoiceShape>>) -> bool {
    choices.as_ref().is_none_or(|choices| {
        choices
            .iter()
            .any(|choice| choice.delta.as_ref().is_some_and(|delta| !delta.is_empty()))
    })
}

fn is_empty_array(text: &str) -> bool {
    text.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inside| inside.trim().is_empty())
}

/// One event as SSE text: its `event:` line (unless the default `message`) and
/// `id:` line as the upstream sent them, `data: ...` with `data`, then a blank line.
pub fn frame(event: &Event, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 16);
    if !event.event.is_empty() && event.event != "message" {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.event.as_bytes());
        out.push(b'\n');
    }
    if !event.id.is_empty() {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(event.id.as_bytes());
        out.push(b'\n');
    }
    // A payload with line breaks (not JSON from OpenAI, but possible) keeps one
    // `data:` line per line, as SSE requires.
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// An event of the gateway's own carrying `data` (an error body).
pub fn data_frame(data: &[u8]) -> Bytes {
    frame(&Event::default(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode_all(chunks: &[&'static [u8]]) -> Vec<Event> {
        use futures_util::StreamExt;
        let pieces = chunks
            .iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from_static(c)));
        events(futures_util::stream::iter(pieces))
            .map(|event| event.unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn decodes_events_split_anywhere_and_frames_them_back() {
        let text: &'static [u8] = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\nid: 7\r\ndata: l1\r\ndata: l2\r\n\r\ndata: [DONE]\n\ndata: cut";
        let whole = decode_all(&[text]).await;
        for split in 1..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(decode_all(&[a, b]).await, whole, "split at {split}");
        }
        let data: Vec<&str> = whole.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["{\"a\":1}", "l1\nl2", "[DONE]"]);
        assert_eq!(
            frame(&whole[1], whole[1].data.as_bytes()),
            Bytes::from_static(b"event: x\nid: 7\ndata: l1\ndata: l2\n\n")
        );
        assert_eq!(data_frame(b"{}"), Bytes::from_static(b"data: {}\n\n"));
    }

    async fn lines_of(chunks: Vec<Vec<u8>>) -> Vec<Result<Bytes, String>> {
        use futures_util::StreamExt;
        let pieces = chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from(c)));
        one_line_each(futures_util::stream::iter(pieces))
            .map(|line| line.map_err(|e| e.to_string()))
            .collect()
            .await
    }

    #[tokio::test]
    async fn the_parser_is_given_one_whole_line_at_a_time() {
        let text: &[u8] = b"data: a\r\ndata: b\r\n\r\n: c\rdata: d\n\ndata: cut";
        let lines: Vec<Result<Bytes, String>> = [
            &b"data: a\n"[..],
            b"data: b\n",
            b"\n",
            b": c\n",
            b"data: d\n",
            b"\n",
            b"data: cut",
        ]
        .into_iter()
        .map(|line| Ok(Bytes::copy_from_slice(line)))
        .collect();
        assert_eq!(lines_of(vec![text.to_vec()]).await, lines);
        for split in 1..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(
                lines_of(vec![a.to_vec(), b.to_vec()]).await,
                lines,
                "split at {split}"
            );
        }
        // Byte by byte: each whole line comes once its end is known.
        let bytes = text.iter().map(|b| vec![*b]).collect();
        assert_eq!(lines_of(bytes).await, lines);
    }

    /// Lines ended by `\r` alone: the last event is given as soon as its blank
    /// line has come, not once more bytes (or the end) say no `\n` follows.
    #[tokio::test]
    async fn an_event_ended_by_a_lone_cr_is_given_at_once() {
        use futures_util::StreamExt;
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let pieces = futures_util::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|piece| piece.map(Ok::<Bytes, std::convert::Infallible>))
        });
        let mut events = Box::pin(events(pieces));
        sender
            .send(Bytes::from_static(b"data: one\r\rdata: two\r\r"))
            .unwrap();
        for expected in ["one", "two"] {
            let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
                .await
                .expect("the event was held back")
                .unwrap()
                .unwrap();
            assert_eq!(event.data, expected);
        }
        drop(sender);
        assert!(events.next().await.is_none());
    }

    #[tokio::test]
    async fn a_line_past_the_limit_ends_the_stream() {
        let long = vec![b'x'; MAX_LINE_BYTES / 2];
        let lines = lines_of(vec![
            b"data: {}\n\ndata: ".to_vec(),
            long.clone(),
            long,
            b"more\n\n".to_vec(),
        ])
        .await;
        assert_eq!(lines.len(), 3, "two whole lines, then the error");
        assert_eq!(lines[1], Ok(Bytes::from_static(b"\n")));
        assert_eq!(
            lines[2],
            Err(format!(
                "a line of the event stream is longer than {MAX_LINE_BYTES} bytes"
            ))
        );
        // A line of exactly the limit, with its end, is read; one byte more
        // is refused, even when its end comes in the same piece.
        let mut line = vec![b'x'; MAX_LINE_BYTES - 1];
        line.push(b'\n');
        let lines = lines_of(vec![line.clone()]).await;
        assert_eq!(lines, [Ok(Bytes::from(line.clone()))]);
        line.insert(0, b'x');
        line.splice(0..0, b"data: {}\n".iter().copied());
        let lines = lines_of(vec![line]).await;
        assert!(
            matches!(&lines[..], [Ok(first), Err(e)] if first == &b"data: {}\n"[..] && e.contains("longer than")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_become_replacement_characters() {
        // "é" (C3 A9) split between chunks stays whole; FF and a lone C3 do not
        // stop the stream; a sequence cut off by its end is replaced too.
        let events = decode_all(&[
            b"\xef\xbb\xbfdata: caf\xc3",
            b"\xa9 \xff\n\n: keep-alive \xc3\n\ndata: [DONE]\n\n",
            b"data: tail \xe2\x82",
        ])
        .await;
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["café \u{fffd}", "[DONE]"]);
        let whole: Vec<Vec<u8>> =
            futures_util::StreamExt::collect::<Vec<_>>(decoded(futures_util::stream::iter([
                Ok::<_, std::convert::Infallible>(Bytes::from_static(b"data: tail \xe2\x82")),
            ])))
            .await
            .into_iter()
            .map(|chunk| chunk.unwrap().to_vec())
            .collect();
        assert_eq!(whole.concat(), "data: tail \u{fffd}".as_bytes());
    }

    fn event(data: &str) -> Event {
        Event {
            data: data.to_owned(),
            ..Event::default()
        }
    }

    #[test]
    fn only_a_whole_answer_s_usage_is_final() {
        let content = |usage: &str| {
            format!(
                r#"{{"choices":[{{"delta":{{"content":"hi"}},"finish_reason":null}}],"usage":{usage}}}"#
            )
        };
        let count =
            |completion: u64| format!(r#"{{"prompt_tokens":3,"completion_tokens":{completion}}}"#);
        let relayed_n = |n: u32, chunks: &[String]| {
            let mut relay = Relay::new("served", true, "mock", n);
            for chunk in chunks {
                relay.relay(event(chunk));
            }
            (
                relay.usage.map(|u| u.completion_tokens),
                relay.final_usage().map(|u| u.completion_tokens),
                relay.answer_is_whole(),
            )
        };
        let relayed = |chunks: &[String]| relayed_n(1, chunks);
        // OpenAI: `usage: null` on content, the count alone in a last chunk.
        assert_eq!(
            relayed(&[
                content("null"),
                format!(r#"{{"choices":[],"usage":{}}}"#, count(2))
            ]),
            (Some(2), Some(2), true)
        );
        // The count beside the finish reason.
        assert_eq!(
            relayed(&[
                content("null"),
                format!(
                    r#"{{"choices":[{{"delta":{{}},"finish_reason":"stop"}}],"usage":{}}}"#,
                    count(2)
                )
            ]),
            (Some(2), Some(2), true)
        );
        // With `n` = 2, the answer is whole only once both choices finished,
        // whichever order they finish in: a count beside the first finish is
        // not final while the other choice may still be generating.
        let finish = |index: u32, usage: &str| {
            format!(
                r#"{{"choices":[{{"index":{index},"delta":{{}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            )
        };
        assert_eq!(
            relayed_n(2, &[content("null"), finish(0, &count(2))]),
            (Some(2), None, false)
        );
        assert_eq!(
            relayed_n(2, &[finish(1, "null"), finish(0, &count(2))]),
            (Some(2), Some(2), true)
        );
        // A count at each finish: the second, with both finished, is final.
        assert_eq!(
            relayed_n(2, &[finish(0, &count(2)), finish(1, &count(4))]),
            (Some(4), Some(4), true)
        );
        // Neither a finish sent twice nor an index no request can have
        // finishes the other choice.
        assert_eq!(
            relayed_n(2, &[finish(0, "null"), finish(0, &count(2))]),
            (Some(2), None, false)
        );
        assert_eq!(
            relayed_n(2, &[finish(200, "null"), finish(0, &count(2))]),
            (Some(2), None, false)
        );
        // A running count on every chunk (vLLM), cut before the finish: only so
        // far, not final.
        assert_eq!(
            relayed(&[content(&count(1)), content(&count(2))]),
            (Some(2), None, false)
        );
        // A last count followed by more content is not the last either.
        assert_eq!(
            relayed(&[
                format!(r#"{{"choices":[],"usage":{}}}"#, count(2)),
                content("null")
            ]),
            (Some(2), None, false)
        );
        // An empty finish chunk after it adds nothing.
        let finish = r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#.to_owned();
        assert_eq!(
            relayed(&[format!(r#"{{"choices":[],"usage":{}}}"#, count(2)), finish]),
            (Some(2), Some(2), true)
        );
        // Two counts given as the whole answer's: trusted when they agree,
        // neither when they do not (a later zero would bill nothing).
        let finished = |n| {
            format!(
                r#"{{"choices":[{{"delta":{{}},"finish_reason":"stop"}}],"usage":{}}}"#,
                count(n)
            )
        };
        let alone = |n| format!(r#"{{"choices":[],"usage":{}}}"#, count(n));
        assert_eq!(relayed(&[finished(5), alone(5)]), (Some(5), Some(5), true));
        assert_eq!(relayed(&[finished(5)]), (Some(5), Some(5), true));
        assert_eq!(relayed(&[finished(5), alone(0)]), (Some(0), None, false));
        assert_eq!(
            relayed(&[alone(5), alone(2), alone(2)]),
            (Some(2), None, false)
        );
        // A last count below a running count before it contradicts it.
        assert_eq!(
            relayed(&[content(&count(500)), alone(5)]),
            (Some(5), None, false)
        );
        assert_eq!(
            relayed(&[content(&count(4)), alone(5)]),
            (Some(5), Some(5), true)
        );
    }

    #[test]
    fn error_events_are_told_apart_and_unreadable_data_is_dropped() {
        let mut relay = Relay::new("served", true, "mock", 1);
        let error = event(r#"{"error":{"message":"overloaded","type":"server_error"}}"#);
        assert_eq!(
            relay.relay(error.clone()),
            Relayed::Error {
                event: error,
                openai_error: true
            }
        );
        let named = Event {
            event: "error".into(),
            data: "overloaded".into(),
            ..Event::default()
        };
        assert_eq!(
            relay.relay(named.clone()),
            Relayed::Error {
                event: named,
                openai_error: false
            }
        );
        assert!(!relay.answered);

        assert_eq!(relay.relay(event("not json")), Relayed::Nothing);
        assert!(relay.answered);
    }

    #[test]
    fn an_event_id_is_relayed_once_set() {
        let mut relay = Relay::new("served", true, "mock", 1);
        let chunk = |id: &str| Event {
            id: id.into(),
            data: r#"{"choices":[{"delta":{"content":"hi"}}]}"#.into(),
            ..Event::default()
        };
        let relayed = |relayed: Relayed| match relayed {
            Relayed::Forward(frame) => String::from_utf8(frame.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(relayed(relay.relay(chunk("7"))).starts_with("id: 7\ndata: "));
        // The parser repeats it on the next events: not relayed again.
        assert!(relayed(relay.relay(chunk("7"))).starts_with("data: "));
        assert!(relayed(relay.relay(chunk("8"))).starts_with("id: 8\ndata: "));
    }

    #[test]
    fn rewrites_model_and_hides_the_forced_usage_chunk() {
        let mut relay = Relay::new("served", false, "mock", 1);
        let chunk = r#"{"id":"c","model":"upstream-name","choices":[{"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(
            relay.relay(event(chunk)),
            Relayed::Forward(Bytes::from_static(
                b"data: {\"id\":\"c\",\"model\":\"served\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"
            ))
        );
        let usage = r#"{"id":"c","model":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        assert_eq!(relay.relay(event(usage)), Relayed::Nothing);
        assert_eq!(relay.usage.map(|u| u.prompt_tokens), Some(3));
        assert_eq!(relay.relay(event("[DONE]")), Relayed::Done);

        let mut asked = Relay::new("served", true, "mock", 1);
        match asked.relay(event(usage)) {
            Relayed::Forward(bytes) => {
                let text = String::from_utf8(bytes.to_vec()).unwrap();
                assert!(text.contains("\"usage\":{\"prompt_tokens\":3"), "{text}");
                assert!(text.contains("\"model\":\"served\""), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(asked.usage.map(|u| u.completion_tokens), Some(2));
    }
}
