//! Showing text a person or a caller chose (a name, an email, an idempotency
//! key, a model name sent to the gateway) on one line, as it reads: what would
//! not show as itself is written as its escape. For the operator's commands,
//! the gateway's error messages and the panel's answers alike. Server only.

/// True for a character that does not show as itself: a control character (a
/// tab, a line break, an escape that drives a terminal), a Unicode line or
/// paragraph separator, a space other than U+0020 (a no-break space), a
/// private-use or unassigned code point, a format character (a right-to-left
/// override that shows `gpj.exe` as `exe.jpg`, a zero-width space),
/// any other character Unicode says to draw as nothing (its
/// Default_Ignorable_Code_Point property: variation selectors, the combining
/// grapheme joiner, Hangul fillers), or the Braille pattern without dots, which
/// draws as a blank. Names and emails holding one would print in `user list`,
/// `key list` and `audit` like others that they are not, and a model's display
/// name holding one would show on the tab as another model's.
pub fn is_hidden(c: char) -> bool {
    use icu_properties::{
        props::{DefaultIgnorableCodePoint, GeneralCategory},
        CodePointMapData, CodePointSetData,
    };
    let category = CodePointMapData::<GeneralCategory>::new().get(c);
    c.is_control()
        || matches!(
            category,
            GeneralCategory::Format
                // U+2028 and U+2029 end a line as \n does.
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                // Drawn as a terminal's font pleases, often as nothing.
                | GeneralCategory::PrivateUse
                | GeneralCategory::Unassigned
        )
        // Spaces other than the plain one (a no-break space prints as one).
        || (category == GeneralCategory::SpaceSeparator && c != ' ')
        || CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
        || c == '\u{2800}'
}

/// `text` with each character [`is_hidden`] written as its escape (`\u{2028}`),
/// and each backslash doubled so that an escape cannot be faked: for text a
/// caller chose and an operator reads (the usage API's idempotency keys, which
/// may hold such characters, and names echoed in the gateway's error messages),
/// so that one line of output stays one row and two texts that differ print
/// differently. For the same reason these are escaped too:
/// - a combining mark (an accent drawn over the character before it, so that
///   `e` + U+0301 would print as `é` does);
/// - a character that Unicode's canonical composition (NFC) would change or
///   join to the one before it: a singleton such as U+212B ANGSTROM SIGN,
///   drawn as `Å` (U+00C5) is, or the Hangul vowel U+1161 after U+1100, the
///   two drawn as the one syllable U+AC00;
/// - a space that begins or ends the text.
pub fn shown(text: &str) -> String {
    use icu_properties::{props::GeneralCategory, CodePointMapData};
    let categories = CodePointMapData::<GeneralCategory>::new();
    let last = text.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(text.len());
    let mut previous = None;
    for (i, c) in text.chars().enumerate() {
        let combining = matches!(
            categories.get(c),
            GeneralCategory::NonspacingMark | GeneralCategory::EnclosingMark
        );
        let composes = !unicode_normalization::is_nfc(c.encode_utf8(&mut [0; 4]))
            || previous
                .is_some_and(|before| unicode_normalization::char::compose(before, c).is_some());
        let edge_space = c == ' ' && (i == 0 || i == last);
        match c {
            '\\' => out.push_str("\\\\"),
            c if is_hidden(c) || combining || composes || edge_space => {
                out.extend(c.escape_unicode())
            }
            c => out.push(c),
        }
        previous = Some(c);
    }
    out
}

/// Most characters of a name or id sent by a caller that an error message
/// repeats: reservation ids have 36, and a longer text is cut, not echoed whole.
pub const SHOWN_ID_CHARS: usize = 64;

/// `text`, sent by a caller, as an error message repeats it: at most
/// [`SHOWN_ID_CHARS`] characters, then `…`, each character that would not show
/// as itself (a line break, a right-to-left override, a NUL) written as its
/// escape (`\u{202e}`), as `tollgate usage list` prints keys, so that a message
/// stays one line that reads as sent.
pub fn shown_text(text: &str) -> String {
    shown_up_to(text, SHOWN_ID_CHARS)
}

/// Most characters of a path or a database URL that a message repeats: more
/// than an id, since the end of a path tells which file it is.
pub const SHOWN_PATH_CHARS: usize = 200;

/// `path` (a file or folder, as `Path::display` writes it, or a database URL)
/// as a message or a log line repeats
/// it: as [`shown_text`] shows a caller's text (each character that would not
/// show as itself escaped), cut after [`SHOWN_PATH_CHARS`] characters with `…`.
pub fn shown_path(path: impl std::fmt::Display) -> String {
    shown_up_to(&path.to_string(), SHOWN_PATH_CHARS)
}

/// `text` shown as [`shown_text`] shows it, cut after `chars` characters
/// instead: for a message of a library that repeats what was typed among
/// what the reader needs (a parser's list of the keys it knows).
pub fn shown_up_to(text: &str, chars: usize) -> String {
    let (kept, cut) = cut(text, chars);
    format!("{}{cut}", shown(kept))
}

/// `text`, from the operator's command line or config file, as its error
/// message quotes it: in double quotes with Rust's escapes (`"a\tb"`,
/// `"\u{202e}"`), its first [`SHOWN_ID_CHARS`] characters only, then `…`
/// after the closing quote, so that a long value does not fill the terminal.
pub fn quoted(text: &str) -> String {
    let (kept, cut) = cut(text, SHOWN_ID_CHARS);
    format!("{kept:?}{cut}")
}

/// A character as a message names it, by its code point: `U+00A0`.
pub fn code_point(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// `at` as the operator's commands and the usage API write a time: RFC 3339 in
/// UTC to the millisecond, with `Z` (`2026-12-07T14:05:09.120Z`), so that a
/// script reads the times of `tollgate audit`, `key list` and the API alike.
pub fn shown_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `text`'s first `chars` characters, and `…` when that is not all.
fn cut(text: &str, chars: usize) -> (&str, &'static str) {
    match text.char_indices().nth(chars) {
        Some((end, _)) => (&text[..end], "…"),
        None => (text, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_utc_to_the_millisecond() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T15:05:09.120456789+01:00")
            .unwrap()
            .to_utc();
        assert_eq!(shown_time(at), "2026-12-07T14:05:09.120Z");
    }

    #[test]
    fn quoted_values_are_escaped_and_cut() {
        assert_eq!(quoted("Europe/Berlin"), "\"Europe/Berlin\"");
        assert_eq!(quoted("a\tb\"c"), "\"a\\tb\\\"c\"");
        assert_eq!(quoted("\u{202e}gpj"), "\"\\u{202e}gpj\"");
        let exactly = "é".repeat(SHOWN_ID_CHARS);
        assert_eq!(quoted(&exactly), format!("\"{exactly}\""));
        let long = format!("{exactly}tail");
        assert_eq!(quoted(&long), format!("\"{exactly}\"…"));
        assert_eq!(shown_text(&long), format!("{exactly}…"));
        let path = format!("/tmp/\u{1b}[2J{}", "x".repeat(SHOWN_PATH_CHARS));
        let shown = shown_path(&path);
        assert!(shown.starts_with("/tmp/\\u{1b}[2Jxxx"), "{shown}");
        assert!(shown.ends_with("x…"), "{shown}");
        assert_eq!(shown.chars().count(), SHOWN_PATH_CHARS + "\\u{1b}".len());
        assert_eq!(shown_path("sqlite://tollgate.db"), "sqlite://tollgate.db");
    }
}
