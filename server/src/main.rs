//! `tollgate`: the operator's command line (DESIGN.md §7).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use server::{assets, config, db, http};
use tracing_subscriber::EnvFilter;

/// Spend control for an organisation's use of large language models.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admin panel, the gateway and the usage API.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// sqlite://FILE or postgres://USER@HOST/DB.
        #[arg(long, env = "TOLLGATE_DATABASE_URL")]
        database_url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            database_url,
        } => {
            let config = config::Config {
                listen: match listen {
                    Some(addr) => addr,
                    None => config::DEFAULT_LISTEN
                        .parse()
                        .context("default listen address")?,
                },
                database_url: database_url.unwrap_or_else(|| config::DEFAULT_DATABASE_URL.into()),
                workspace_name: config::DEFAULT_WORKSPACE_NAME.into(),
            };
            serve(config).await
        }
    }
}

async fn serve(config: config::Config) -> anyhow::Result<()> {
    let store = db::connect(&config.database_url).await?;
    store.ensure_workspace(&config.workspace_name).await?;
    if !assets::has_frontend() {
        tracing::warn!("this binary was built without the frontend: pages will not hydrate (build with ./dev build)");
    }
    let state = http::AppState {
        leptos_options: assets::leptos_options(config.listen),
        store,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(database = %db::redact_url(&config.database_url), "Tollgate is serving on http://{local}");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
