//! JSON objects kept as raw text, field by field, so that the gateway passes every
//! field it does not own through byte for byte (DESIGN.md §4): numbers are never
//! read into a float and back (R2), key order is kept, unknown fields survive.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::GatewayError;

/// A JSON object as its keys, in order, and each value's raw JSON text.
///
/// Duplicate keys are refused when parsing: a body with two `model` keys could
/// otherwise be admitted on one model and served on the other.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawObject {
    fields: Vec<(String, Box<RawValue>)>,
}

impl RawObject {
    /// Parses `bytes` as one JSON object.
    ///
    /// Errors: serde_json's error (with line and column) for invalid JSON, a value
    /// that is not an object, or a duplicate key.
    pub(crate) fn parse(bytes: &[u8]) -> Result<RawObject, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The keys, in order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(k, _)| k.as_str())
    }

    /// The raw value of `key`, if present (`null` included).
    pub(crate) fn get(&self, key: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// The raw value of `key`, treating `null` as absent (OpenAI's convention for
    /// optional request fields).
    pub(crate) fn get_present(&self, key: &str) -> Option<&RawValue> {
        self.get(key).filter(|v| !is_null(v))
    }

    /// Sets `key` to `value`, in place when it exists (keeping the order), else at
    /// the end.
    pub(crate) fn set(&mut self, key: &str, value: Box<RawValue>) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = value,
            None => self.fields.push((key.to_owned(), value)),
        }
    }

    /// Removes `key`, returning its value if it was there.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        let index = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(index).1)
    }

    /// The object as compact JSON text: each value exactly as it was read or set.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let size = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>();
        let mut out = Vec::with_capacity(size + 2);
        out.push(b'{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        out
    }

    /// The object as one raw JSON value, to nest it in another object.
    pub(crate) fn to_raw(&self) -> Result<Box<RawValue>, GatewayError> {
        let text = String::from_utf8(self.to_vec())
            .map_err(|e| GatewayError::Internal(format!("non-UTF-8 JSON object: {e}")))?;
        RawValue::from_string(text)
            .map_err(|e| GatewayError::Internal(format!("rebuilt object is not JSON: {e}")))
    }
}

/// True when `value` is the JSON literal `null`.
pub(crate) fn is_null(value: &RawValue) -> bool {
    value.get() == "null"
}

/// True when `value` is a JSON object. Asked before reading a struct from it:
/// serde would also read one from an array of its fields in order.
pub(crate) fn is_object(value: &RawValue) -> bool {
    value.get().trim_start().starts_with('{')
}

/// serde_json's message for `e` without where in the text it stopped (" at
/// line 1 column 60"), which in a value cut out of a request body names no
/// place its caller wrote.
pub(crate) fn message_without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&at) {
        Some(message) => message.to_owned(),
        None => message,
    }
}

/// `text` as a raw JSON string value (quoted and escaped).
pub(crate) fn raw_string(text: &str) -> Box<RawValue> {
    let mut out = Vec::with_capacity(text.len() + 2);
    write_json_string(&mut out, text);
    // Escaped by serde_json itself, so always valid JSON; the fallback is never taken.
    String::from_utf8(out)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(raw_null)
}

/// The raw JSON literal `true` or `false`.
pub(crate) fn raw_bool(value: bool) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).unwrap_or_else(|_| raw_null())
}

fn raw_null() -> Box<RawValue> {
    // `RawValue::NULL` is a `&'static RawValue`; boxing it copies three bytes.
    RawValue::NULL.to_owned()
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serialising a &str into a Vec cannot fail (no I/O, no non-string keys).
    let _ = serde_json::to_writer(&mut *out, text);
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawObject, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut fields: Vec<(String, Box<RawValue>)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<String>()? {
                    if fields.iter().any(|(k, _)| *k == key) {
                        // Repeated as any caller's text is: on one line, cut.
                        return Err(de::Error::custom(format!(
                            "duplicate key \"{}\"",
                            super::error::shown_text(&key)
                        )));
                    }
                    let value: Box<RawValue> = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(RawObject { fields })
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// The request field `param` as a non-negative integer, `None` when absent or
/// `null`.
///
/// Errors: [`GatewayError::InvalidField`] naming `param` for anything else
/// (negative, fractional, exponent, string, or past `u64`).
pub(crate) fn optional_u64(object: &RawObject, param: &str) -> Result<Option<u64>, GatewayError> {
    object
        .get_present(param)
        .map(|raw| {
            serde_json::from_str::<u64>(raw.get()).map_err(|_| {
                GatewayError::invalid_field(
                    param,
                    format!("`{param}` must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

/// The request field `param` as a count of tokens the books can hold (0 to
/// `i64::MAX`: they store `BIGINT`), `None` when absent or `null`.
///
/// Errors: [`GatewayError::InvalidField`] naming `param`, as [`optional_u64`],
/// and for a count past `i64::MAX` (past `u64` included).
pub(crate) fn optional_token_count(
    object: &RawObject,
    param: &str,
) -> Result<Option<u64>, GatewayError> {
    let too_many = || {
        GatewayError::invalid_field(
            param,
            format!("`{param}` must be at most {} tokens", i64::MAX),
        )
    };
    // Digits past `u64` too: the same problem, not another.
    let digits = object
        .get_present(param)
        .is_some_and(|raw| raw.get().bytes().all(|b| b.is_ascii_digit()));
    match optional_u64(object, param) {
        Ok(Some(count)) if i64::try_from(count).is_err() => Err(too_many()),
        Err(_) if digits => Err(too_many()),
        count => count,
    }
}

/// An output cap a request sets (R7): how many tokens, and the field that said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutputCap {
    /// Output tokens.
    pub tokens: u64,
    /// `max_completion_tokens` or `max_tokens`.
    pub param: &'static str,
}

/// The output cap a request sets (R7): `max_completion_tokens`, which
/// supersedes the deprecated `max_tokens`, else `max_tokens`; the larger of the
/// two when both are set, since both are forwarded and an upstream may honour
/// either (servers that read only `max_tokens` exist), and the reservation must
/// not undercount. `None` when neither is set (absent or `null`).
///
/// Errors: [`GatewayError::InvalidField`] naming the field when either is present
/// and not an integer of at least 1 (OpenAI refuses a cap of 0 too, and the
/// gateway does not forward a request bound to be refused).
pub(crate) fn output_cap(object: &RawObject) -> Result<Option<OutputCap>, GatewayError> {
    let positive = |param: &'static str| -> Result<Option<OutputCap>, GatewayError> {
        match optional_u64(object, param) {
            Ok(Some(0)) | Err(_) => Err(GatewayError::invalid_field(
                param,
                format!(
                    "`{param}` must be a whole number of at least 1, and at most the model's \
                     maximum output tokens"
                ),
            )),
            Ok(cap) => Ok(cap.map(|tokens| OutputCap { tokens, param })),
        }
    };
    let max_tokens = positive("max_tokens")?;
    let max_completion_tokens = positive("max_completion_tokens")?;
    Ok(match (max_completion_tokens, max_tokens) {
        (Some(newer), Some(older)) if older.tokens > newer.tokens => Some(older),
        (newer, older) => newer.or(older),
    })
}

/// Refuses an output cap (R7) above `model`'s `max_output_tokens`: the model
/// cannot produce that many tokens, its provider would refuse the request, and
/// held as asked it would be answered as a quota error (429) instead of a bad
/// request.
///
/// Errors: [`GatewayError::InvalidField`] naming the field that set the cap.
pub(crate) fn within_max_output(
    model: &app::domain::Model,
    cap: Option<OutputCap>,
) -> Result<(), GatewayError> {
    match cap {
        Some(OutputCap { tokens, param }) if tokens > u64::from(model.max_output_tokens) => {
            Err(GatewayError::invalid_field(
                param,
                format!(
                    "`{param}` is {tokens}, more than the {} output tokens {} can produce",
                    model.max_output_tokens,
                    model.label()
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// The most choices a request may ask for: OpenAI's own bound on `n`.
pub(crate) const MAX_CHOICES: u32 = 128;

/// The choice count `n` (OpenAI's field): 1 when absent or `null`.
///
/// Errors: [`GatewayError::InvalidField`] naming `n` for anything but an integer
/// from 1 to [`MAX_CHOICES`], negative numbers and zero included: a request the
/// provider would refuse is refused before anything is reserved for it.
pub(crate) fn choice_count(object: &RawObject) -> Result<u32, GatewayError> {
    match object.get_present("n") {
        None => Ok(1),
        Some(raw) => serde_json::from_str::<u32>(raw.get())
            .ok()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| {
                GatewayError::invalid_field(
                    "n",
                    format!("`n` must be a whole number from 1 to {MAX_CHOICES}"),
                )
            }),
    }
}

/// The request field `param` as a boolean, `None` when absent or `null`.
///
/// Errors: [`GatewayError::InvalidField`] naming `param` for anything else.
pub(crate) fn optional_bool(object: &RawObject, param: &str) -> Result<Option<bool>, GatewayError> {
    object
        .get_present(param)
        .map(|raw| {
            serde_json::from_str::<bool>(raw.get()).map_err(|_| {
                GatewayError::invalid_field(param, format!("`{param}` must be true or false"))
            })
        })
        .transpose()
}

/// The request field `param` as a string, `None` when absent or `null`.
///
/// Errors: [`GatewayError::InvalidField`] naming `param` for any other type.
pub(crate) fn optional_string(
    object: &RawObject,
    param: &str,
) -> Result<Option<String>, GatewayError> {
    object
        .get_present(param)
        .map(|raw| {
            serde_json::from_str::<String>(raw.get()).map_err(|_| {
                let found = not_a_string(raw);
                GatewayError::invalid_field(
                    param,
                    if raw.get().starts_with('"') {
                        format!("`{param}` {found}")
                    } else {
                        format!("`{param}` must be a string: it {found}")
                    },
                )
            })
        })
        .transpose()
}

/// What the JSON value `raw`, which could not be read as a string, is instead,
/// said of it: `is a number`, `is an array`, … A string that could not be read
/// holds a lone surrogate escape (`"\ud800"`), the one JSON string that is no
/// Unicode text.
pub(crate) fn not_a_string(raw: &RawValue) -> String {
    match kind_of(raw.get().as_bytes()) {
        "a string" => "is not Unicode text (it holds a lone surrogate escape)".to_owned(),
        kind => format!("is {kind}"),
    }
}

/// The type of the JSON value that the text `json` (valid JSON, or at least
/// begun as JSON, with no leading whitespace) holds, as a person names it: `an
/// object`, `an array`, `a string`, `a boolean`, `null` or `a number`.
pub(crate) fn kind_of(json: &[u8]) -> &'static str {
    match json.first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The required request field `param` as a string.
///
/// Errors: [`GatewayError::InvalidField`] naming `param` when it is missing, `null`
/// or not a string.
pub(crate) fn required_string(object: &RawObject, param: &str) -> Result<String, GatewayError> {
    optional_string(object, param)?.ok_or_else(|| {
        GatewayError::invalid_field(param, format!("you must provide `{param}` (a string)"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_counts_are_positive_integers_with_one_message() {
        let n = |text: &str| choice_count(&RawObject::parse(text.as_bytes()).unwrap());
        assert_eq!(n("{}").unwrap(), 1);
        assert_eq!(n(r#"{"n":null}"#).unwrap(), 1);
        assert_eq!(n(r#"{"n":3}"#).unwrap(), 3);
        assert_eq!(n(r#"{"n":128}"#).unwrap(), 128);
        for bad in [
            "0",
            "-1",
            "1.5",
            "\"2\"",
            "129",
            "4294967296",
            "100000000000",
        ] {
            let error = n(&format!(r#"{{"n":{bad}}}"#)).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("`n` must be a whole number from 1 to 128"),
                "n = {bad}: {error}"
            );
        }
    }

    #[test]
    fn the_output_cap_is_the_larger_field_and_says_which() {
        let cap = |text: &str| output_cap(&RawObject::parse(text.as_bytes()).unwrap()).unwrap();
        let said = |tokens, param| Some(OutputCap { tokens, param });
        assert_eq!(cap("{}"), None);
        assert_eq!(cap(r#"{"max_tokens":7}"#), said(7, "max_tokens"));
        assert_eq!(
            cap(r#"{"max_completion_tokens":7,"max_tokens":null}"#),
            said(7, "max_completion_tokens")
        );
        assert_eq!(
            cap(r#"{"max_completion_tokens":7,"max_tokens":9}"#),
            said(9, "max_tokens")
        );
        assert_eq!(
            cap(r#"{"max_completion_tokens":9,"max_tokens":9}"#),
            said(9, "max_completion_tokens")
        );
    }

    #[test]
    fn passes_fields_through_byte_for_byte() {
        let text = br#"{"model":"a","temperature":0.1000000000000000055511151231257827,"big":123456789012345678901234567890,"nested":{"x": [1, 2.50]}}"#;
        let mut object = RawObject::parse(text).unwrap();
        object.set("model", raw_string("b\"c"));
        let out = String::from_utf8(object.to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"b\"c","temperature":0.1000000000000000055511151231257827,"big":123456789012345678901234567890,"nested":{"x": [1, 2.50]}}"#
        );
    }

    #[test]
    fn refuses_duplicates_and_non_objects() {
        assert!(RawObject::parse(br#"{"model":"a","model":"b"}"#).is_err());
        assert!(RawObject::parse(b"[1]").is_err());
        assert!(RawObject::parse(b"{").is_err());
    }

    #[test]
    fn integers_are_strict() {
        let object =
            RawObject::parse(br#"{"a":-1,"b":1.0,"c":1e3,"d":"1","e":null,"f":7}"#).unwrap();
        for bad in ["a", "b", "c", "d"] {
            assert!(optional_u64(&object, bad).is_err(), "{bad}");
        }
        assert_eq!(optional_u64(&object, "e").unwrap(), None);
        assert_eq!(optional_u64(&object, "f").unwrap(), Some(7));
        assert_eq!(optional_u64(&object, "missing").unwrap(), None);
    }

    #[test]
    fn set_keeps_order_and_remove_removes() {
        let mut object = RawObject::parse(br#"{"a":1,"b":2}"#).unwrap();
        object.set("a", raw_bool(true));
        object.set("c", raw_bool(false));
        assert_eq!(
            object.remove("b").map(|v| v.get().to_owned()),
            Some("2".into())
        );
        assert_eq!(object.to_vec(), br#"{"a":true,"c":false}"#);
    }

    #[test]
    fn a_string_field_says_what_it_holds_instead() {
        let model = |body: &str| {
            let body = RawObject::parse(body.as_bytes()).unwrap();
            match required_string(&body, "model") {
                Err(GatewayError::InvalidField { param, message }) => {
                    assert_eq!(param, "model");
                    message
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            model(r#"{"model":5}"#),
            "`model` must be a string: it is a number"
        );
        assert_eq!(
            model(r#"{"model":["a"]}"#),
            "`model` must be a string: it is an array"
        );
        assert_eq!(
            model(r#"{"model":"\ud800"}"#),
            "`model` is not Unicode text (it holds a lone surrogate escape)"
        );
        assert_eq!(model("{}"), "you must provide `model` (a string)");
    }
}
