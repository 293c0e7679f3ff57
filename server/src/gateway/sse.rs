//! Relaying an upstream's server-sent events (DESIGN.md §4): each event is passed
//! on unchanged but for `model` (set to the served model), and for the usage chunk
//! the gateway forced on, which is kept from clients that did not ask for it. The
//! usage it carries is what the stream is settled with (R7).

use app::domain::Usage;
use bytes::Bytes;
use serde_json::value::RawValue;

use super::json::RawObject;
use super::upstream::usage_from_upstream;

/// Longest line the decoder buffers, bytes; a longer one ends the stream as broken.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One server-sent event: its `data` (lines joined by `\n`) and its other lines
/// (`event:`, `id:`, comments), kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Lines that are not `data:`, in order, without line ends.
    pub other_lines: Vec<String>,
    /// The data, `None` when the event had no `data:` line.
    pub data: Option<String>,
}

/// Splits a byte stream into [`Event`]s. Lines end with `\n` or `\r\n`; a blank
/// line ends an event.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    scanned: usize,
    event: Event,
    has_lines: bool,
}

/// The stream broke the decoder's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an upstream event line is longer than {MAX_LINE_BYTES} bytes")]
pub struct LineTooLong;

impl Decoder {
    /// Feeds `chunk`; returns the events it completed.
    ///
    /// Errors: [`LineTooLong`] when a line grows past [`MAX_LINE_BYTES`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Event>, LineTooLong> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        // Bytes before `scanned` were searched for a line end by an earlier push.
        let mut search_from = self.scanned;
        while let Some(offset) = self.buffer[search_from..].iter().position(|&b| b == b'\n') {
            let end = search_from + offset;
            let line = &self.buffer[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            if let Some(event) = self.line(line) {
                events.push(event);
            }
            start = end + 1;
            search_from = start;
        }
        self.buffer.drain(..start);
        self.scanned = self.buffer.len();
        if self.buffer.len() > MAX_LINE_BYTES {
            return Err(LineTooLong);
        }
        Ok(events)
    }

    /// The last event when the stream ends without a blank line after it.
    pub fn finish(mut self) -> Option<Event> {
        if !self.buffer.is_empty() {
            let line = String::from_utf8_lossy(&self.buffer).into_owned();
            let line = line.strip_suffix('\r').map(str::to_owned).unwrap_or(line);
            self.buffer.clear();
            if let Some(event) = self.line(line) {
                return Some(event);
            }
        }
        self.has_lines.then_some(self.event)
    }

    fn line(&mut self, line: String) -> Option<Event> {
        if line.is_empty() {
            if !self.has_lines {
                return None;
            }
            self.has_lines = false;
            return Some(std::mem::take(&mut self.event));
        }
        self.has_lines = true;
        if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.event.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.event.data = Some(value.to_owned()),
            }
        } else {
            self.event.other_lines.push(line);
        }
        None
    }
}

/// What the relay made of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// Send these bytes to the client.
    Forward(Bytes),
    /// `data: [DONE]`: settle, then send [`DONE_FRAME`].
    Done,
    /// Nothing for the client (the forced usage chunk of a client that did not ask).
    Nothing,
}

/// The stream's terminator, sent only after settlement (R7).
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// Rewrites one stream's events for the client and collects its usage.
#[derive(Debug)]
pub struct Relay {
    served_model: Box<RawValue>,
    client_wants_usage: bool,
    upstream: String,
    /// The last usage the stream reported.
    pub usage: Option<Usage>,
    /// True once any event with data was relayed: content reached the client.
    pub relayed_content: bool,
}

impl Relay {
    /// A relay for a stream served by `served_model` from `upstream` (its name, for
    /// logs).
    pub fn new(served_model: &str, client_wants_usage: bool, upstream: &str) -> Relay {
        Relay {
            served_model: super::json::raw_string(served_model),
            client_wants_usage,
            upstream: upstream.to_owned(),
            usage: None,
            relayed_content: false,
        }
    }

    /// Relays one event.
    pub fn relay(&mut self, event: Event) -> Relayed {
        let Some(data) = &event.data else {
            // A comment or keep-alive: pass it on as it came.
            return Relayed::Forward(frame(&event.other_lines, None));
        };
        if data.trim() == "[DONE]" {
            return Relayed::Done;
        }
        let Ok(mut chunk) = RawObject::parse(data.as_bytes()) else {
            self.relayed_content = true;
            return Relayed::Forward(frame(&event.other_lines, Some(data.as_bytes())));
        };
        let usage_present = match chunk.get_present("usage") {
            Some(raw) => {
                if let Some(usage) = usage_from_upstream(raw, &self.upstream) {
                    self.usage = Some(usage);
                }
                true
            }
            None => false,
        };
        if !self.client_wants_usage {
            let no_choices = chunk
                .get_present("choices")
                .is_none_or(|choices| is_empty_array(choices.get()));
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
        self.relayed_content = true;
        Relayed::Forward(frame(&event.other_lines, Some(&chunk.to_vec())))
    }
}

fn is_empty_array(text: &str) -> bool {
    text.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inside| inside.trim().is_empty())
}

/// One event as SSE text: its other lines, then `data: ...`, then a blank line.
pub fn frame(other_lines: &[String], data: Option<&[u8]>) -> Bytes {
    let mut out = Vec::with_capacity(data.map_or(0, <[u8]>::len) + 16);
    for line in other_lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    if let Some(data) = data {
        // A payload with line breaks (not JSON from OpenAI, but possible) keeps
        // one `data:` line per line, as SSE requires.
        for line in data.split(|&b| b == b'\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(decoder.push(chunk).unwrap());
        }
        events.extend(decoder.finish());
        events
    }

    #[test]
    fn decodes_events_split_anywhere() {
        let text = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: l1\r\ndata: l2\r\n\r\ndata: [DONE]\n\n";
        let whole = decode_all(&[text]);
        for split in 1..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(decode_all(&[a, b]), whole, "split at {split}");
        }
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[0].data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(whole[1].other_lines, [": keep-alive"]);
        assert_eq!(whole[2].data.as_deref(), Some("l1\nl2"));
        assert_eq!(whole[2].other_lines, ["event: x"]);
        assert_eq!(whole[3].data.as_deref(), Some("[DONE]"));
        assert_eq!(
            decode_all(&[b"data: tail"])[0].data.as_deref(),
            Some("tail")
        );
    }

    fn event(data: &str) -> Event {
        Event {
            other_lines: vec![],
            data: Some(data.to_owned()),
        }
    }

    #[test]
    fn rewrites_model_and_hides_the_forced_usage_chunk() {
        let mut relay = Relay::new("served", false, "mock");
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

        let mut asked = Relay::new("served", true, "mock");
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
