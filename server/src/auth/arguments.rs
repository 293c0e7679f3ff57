//! Which argument of a server function call could not be read, or is not one.
//!
//! server_fn decodes a call's form-encoded arguments with serde_qs and reports
//! a failure in serde's words without the field (`invalid type: map, expected
//! a string`), sometimes in serde_qs's own type names. The access middleware
//! keeps the body of a call that takes arguments, and when the call is refused
//! as malformed, decodes it again the same way here, following the path to the
//! field at fault.
//!
//! server_fn also ignores fields its arguments do not take, so a call with a
//! misspelt or stray field (`settings_version` sent to `save_model_limits`)
//! would save as if it had not been sent. The middleware asks
//! [`unknown_argument`] first and refuses such a call before it runs, as the
//! JSON API refuses unknown fields.

use serde::de::DeserializeOwned;

/// Largest body of a server function call the middleware keeps (bytes): a
/// Model limits form is some 100 bytes a model.
pub const MAX_CALL_BYTES: usize = 1024 * 1024;

/// The checks of one server function's arguments, each reading a call's body:
/// what is wrong with it ([`problem`]), and the first field it holds that the
/// arguments do not take ([`unknown`]).
struct Check {
    problem: fn(&str) -> Option<String>,
    unknown: fn(&str) -> Option<String>,
}

impl Check {
    fn of<T: DeserializeOwned>() -> Check {
        Check {
            problem: problem::<T>,
            unknown: unknown::<T>,
        }
    }
}

/// The checks of the arguments of the server function at `path`; `None` for
/// one that takes none (or no server function).
fn check(path: &str) -> Option<Check> {
    match path {
        "/fn/login" => Some(Check::of::<app::api::Login>()),
        "/fn/save_model_limits" => Some(Check::of::<app::api::SaveModelLimits>()),
        "/fn/save_automatic_fallback" => Some(Check::of::<app::api::SaveAutomaticFallback>()),
        _ => None,
    }
}

/// Whether a call to the server function at `path` takes arguments that
/// [`argument_problem`] can name.
pub fn takes_arguments(path: &str) -> bool {
    check(path).is_some()
}

/// What is wrong with the arguments `body` of a call to the server function at
/// `path`, naming the field (`` `rows[0].model`: invalid type: map, expected a
/// string ``); `None` when they decode, or the function takes none.
pub fn argument_problem(path: &str, body: &str) -> Option<String> {
    (check(path)?.problem)(body)
}

/// The first field of `body`, a call to the server function at `path`, that
/// its arguments do not take, named as a form names it (`settings_version`,
/// `rows[0][colour]`); `None` when there is none, when the function takes no
/// arguments, or when the arguments do not decode (server_fn then refuses the
/// call, and [`argument_problem`] names what is wrong).
pub fn unknown_argument(path: &str, body: &str) -> Option<String> {
    (check(path)?.unknown)(body)
}

/// serde_qs as server_fn configures it for a form (`PostUrl`): five levels of
/// brackets, not strict.
fn form_deserializer(body: &str) -> Result<serde_qs::Deserializer<'_>, serde_qs::Error> {
    serde_qs::Deserializer::with_config(&serde_qs::Config::new(5, false), body.as_bytes())
}

/// The first field of `body` that `T` does not take, if `body` decodes as `T`.
fn unknown<T: DeserializeOwned>(body: &str) -> Option<String> {
    let mut first = None;
    serde_ignored::deserialize::<_, _, T>(form_deserializer(body).ok()?, |path| {
        first.get_or_insert_with(|| form_name(&path));
    })
    .ok()?;
    first
}

/// `path` written as a form writes the field's name: `rows[0][colour]`.
fn form_name(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", form_name(parent)),
        Path::Map { parent, key } => match form_name(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}[{key}]"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => form_name(parent),
    }
}

/// `body` decoded as server_fn decodes a form (`PostUrl`: serde_qs, five levels
/// of brackets, not strict), or what is wrong with it.
fn problem<T: DeserializeOwned>(body: &str) -> Option<String> {
    let deserializer = match form_deserializer(body) {
        Ok(deserializer) => deserializer,
        Err(e) => return Some(e.to_string()),
    };
    let e = serde_path_to_error::deserialize::<_, T>(deserializer).err()?;
    let inner = e.inner().to_string();
    // serde_qs words a field of the wrong shape in its own types' names.
    let problem = match inner.contains("QsDeserializer") {
        true => "not of the shape the page's form sends".to_owned(),
        false => inner,
    };
    Some(match e.path().to_string().as_str() {
        "." => problem,
        field => format!("`{field}`: {problem}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_that_cannot_be_read_is_named() {
        let limits = "/fn/save_model_limits";
        assert_eq!(
            argument_problem(
                limits,
                "rows[0][model]=gpt-5&rows[0][limit]=&rows[0][version]=3"
            ),
            None
        );
        for (path, body, named) in [
            (limits, "rows[0][model][a]=gpt-5", "`rows[0].model`"),
            (limits, "rows=1", "`rows`"),
            (limits, "rows[0]=x", "`rows[0]`"),
            (
                "/fn/save_automatic_fallback",
                "settings_version[a]=5",
                "`settings_version`",
            ),
            ("/fn/login", "email[a]=x&password=p", "`email`"),
            ("/fn/login", "email=x", "missing field `password`"),
            (
                limits,
                "rows[0][model]=gpt-5&rows[0][version]=3",
                "`rows[0]`: missing field `limit`",
            ),
        ] {
            let problem = argument_problem(path, body).expect(body);
            assert!(problem.contains(named), "{body}: {problem}");
            assert!(!problem.contains("QsDeserializer"), "{body}: {problem}");
        }
        assert_eq!(argument_problem("/fn/me", "anything"), None);
    }

    #[test]
    fn a_field_the_arguments_do_not_take_is_named_as_the_form_names_it() {
        let limits = "/fn/save_model_limits";
        let row = "rows[0][model]=gpt-5&rows[0][limit]=1&rows[0][enabled]=on&rows[0][version]=3";
        assert_eq!(unknown_argument(limits, row), None);
        for (path, body, named) in [
            (
                limits,
                format!("{row}&settings_version=2"),
                "settings_version",
            ),
            (
                limits,
                format!("{row}&rows[0][colour]=red"),
                "rows[0][colour]",
            ),
            (
                "/fn/save_automatic_fallback",
                "automatic_fallback=on&settings_version=1&limit=5".to_owned(),
                "limit",
            ),
            (
                "/fn/login",
                "email=a@example.com&password=p&pasword=q".to_owned(),
                "pasword",
            ),
        ] {
            assert_eq!(
                unknown_argument(path, &body).as_deref(),
                Some(named),
                "{body}"
            );
        }
        // Arguments that do not decode are server_fn's to refuse.
        assert_eq!(unknown_argument("/fn/login", "email=x&extra=1"), None);
        assert_eq!(unknown_argument("/fn/me", "anything=1"), None);
    }
}
