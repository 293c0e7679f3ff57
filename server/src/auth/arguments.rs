//! Which argument of a server function call could not be read.
//!
//! server_fn decodes a call's form-encoded arguments with serde_qs and reports
//! a failure in serde's words without the field (`invalid type: map, expected
//! a string`), sometimes in serde_qs's own type names. The access middleware
//! keeps the body of a call that takes arguments, and when the call is refused
//! as malformed, decodes it again the same way here, following the path to the
//! field at fault.

use serde::de::DeserializeOwned;

/// Largest body of a server function call the middleware keeps (bytes): a
/// Model limits form is some 100 bytes a model.
pub const MAX_CALL_BYTES: usize = 1024 * 1024;

/// Reads a call's body and says what is wrong with it ([`problem`]).
type Check = fn(&str) -> Option<String>;

/// The check of the arguments of the server function at `path`; `None` for one
/// that takes none (or no server function).
fn check(path: &str) -> Option<Check> {
    match path {
        "/fn/login" => Some(problem::<app::api::Login>),
        "/fn/save_model_limits" => Some(problem::<app::api::SaveModelLimits>),
        "/fn/save_automatic_fallback" => Some(problem::<app::api::SaveAutomaticFallback>),
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
    check(path)?(body)
}

/// `body` decoded as server_fn decodes a form (`PostUrl`: serde_qs, five levels
/// of brackets, not strict), or what is wrong with it.
fn problem<T: DeserializeOwned>(body: &str) -> Option<String> {
    let config = serde_qs::Config::new(5, false);
    let deserializer = match serde_qs::Deserializer::with_config(&config, body.as_bytes()) {
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
            argument_problem(limits, "rows[0][model]=gpt-5&rows[0][version]=3"),
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
        ] {
            let problem = argument_problem(path, body).expect(body);
            assert!(problem.contains(named), "{body}: {problem}");
            assert!(!problem.contains("QsDeserializer"), "{body}: {problem}");
        }
        assert_eq!(argument_problem("/fn/me", "anything"), None);
    }
}
