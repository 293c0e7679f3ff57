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
    let cli = server::cli::Cli::parse();
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
