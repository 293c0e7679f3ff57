//! `tollgate`: the operator's command line (DESIGN.md §7).
#![forbid(unsafe_code)]

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let default_filter = || EnvFilter::new("info,sqlx::postgres::notice=warn");
    let filter = match std::env::var("TOLLGATE_LOG") {
        Err(_) => default_filter(),
        Ok(text) => EnvFilter::try_new(&text).unwrap_or_else(|e| {
            server::say!(
                "tollgate: TOLLGATE_LOG={} is not a tracing filter ({e}); using the default",
                app::text::quoted(&text)
            );
            default_filter()
        }),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a file or a log shipper gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written is dropped: tracing's own report of
        // it goes through `eprintln!`, which panics when stderr is a closed pipe.
        .log_internal_errors(false)
        .init();
    let cli = server::cli::Cli::try_parse().unwrap_or_else(|e| exit_with(&e));
    match server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of the output went away (`tollgate user list | head -1`):
        // nothing to tell it, and the shell's status for a closed pipe.
        Err(e) if e.downcast_ref::<server::cli::OutputClosed>().is_some() => {
            std::process::ExitCode::from(141)
        }
        Err(e) => {
            server::say!("tollgate: {}", causes(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ends the process as clap ends it on `error` (help and version on stdout,
/// a usage error on stderr, with clap's exit status), except that a value the
/// error repeats as typed (an invalid value, an unknown argument) is shown as
/// every other error shows what was typed ([`shown_values`]).
fn exit_with(error: &clap::Error) -> ! {
    // With its styles: its plain text would drop a typed escape sequence
    // whole, and the value could no longer be found in it.
    let rendered = error.render().ansi().to_string();
    let shown = shown_values(error, &rendered);
    if !error.use_stderr() || shown == rendered {
        // Nothing to change: clap writes it, in colour on a terminal.
        error.exit()
    }
    server::say!("{}", anstream::adapter::strip_str(shown.trim_end()));
    std::process::exit(error.exit_code())
}

/// `rendered` (clap's message for `error`) with each value the user typed
/// that it quotes, wherever it quotes it, written as `app::text::shown_text`
/// writes a caller's text: escaped, and cut after its first 64 characters. A
/// value of 3,000 characters otherwise fills the screen, up to three times.
fn shown_values(error: &clap::Error, rendered: &str) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut shown = rendered.to_owned();
    for kind in [
        ContextKind::InvalidValue,
        ContextKind::InvalidArg,
        ContextKind::InvalidSubcommand,
    ] {
        if let Some(ContextValue::String(value)) = error.get(kind) {
            let cut = app::text::shown_text(value);
            if !value.is_empty() && cut != *value {
                shown = shown.replace(value.as_str(), &cut);
            }
        }
    }
    shown
}

/// The error and its causes, `: `-separated, each said once: libraries often
/// repeat their source's text in their own (sqlx: "error returned from
/// database: X", then X).
fn causes(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_clap_repeats_are_escaped_and_cut() {
        let long = "x".repeat(3_000);
        for args in [
            vec!["tollgate", "fallback", long.as_str()],
            vec!["tollgate", "key", "revoke", "1\u{1b}]0;TITLE\u{7}"],
            vec![
                "tollgate",
                "user",
                "create",
                "--email",
                "a@b.c",
                "--role",
                "sup\u{1b}[31mer",
            ],
            vec!["tollgate", "audit", "--limit", long.as_str()],
            vec!["tollgate", &format!("--bogus{long}")],
            vec!["tollgate", "fallback", "on\u{202e}"],
        ] {
            let error = server::cli::Cli::try_parse_from(&args).unwrap_err();
            let rendered = error.render().ansi().to_string();
            let shown = anstream::adapter::strip_str(&shown_values(&error, &rendered)).to_string();
            assert!(shown.len() < 600, "{} bytes: {shown}", shown.len());
            assert!(
                !shown.contains(['\u{202e}', '\u{1b}', '\u{7}']),
                "{shown:?}"
            );
            assert!(
                shown.contains('…') || shown.contains("\\u{202e}") || shown.contains("\\u{1b}"),
                "{shown}"
            );
        }
        let error =
            server::cli::Cli::try_parse_from(["tollgate", "fallback", "maybe"]).unwrap_err();
        let rendered = error.render().ansi().to_string();
        assert_eq!(
            shown_values(&error, &rendered),
            rendered,
            "short values stay as clap wrote them"
        );
    }

    #[test]
    fn each_cause_is_said_once() {
        let inner = anyhow::anyhow!("database \"x\" does not exist");
        let error = inner
            .context("error returned from database: database \"x\" does not exist")
            .context("could not open the database");
        assert_eq!(
            causes(&error),
            "could not open the database: error returned from database: database \"x\" does not exist"
        );
    }
}
