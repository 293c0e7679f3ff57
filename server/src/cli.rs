//! The operator's command line (DESIGN.md §7), a public contract: commands, flags
//! and environment variables are extended, never renamed.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use app::{
    domain::{format_eur, parse_eur_input, ModelLimit},
    store::{Actor, LimitChange, SharedStore},
};
use chrono::Utc;
use clap::{Parser, Subcommand};

use crate::{assets, config, db, http};

/// Spend control for an organisation's use of large language models.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version)]
pub struct Cli {
    /// The TOML config file (default: the embedded demo configuration).
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// sqlite://FILE or postgres://USER@HOST/DB (overrides the config file).
    #[arg(long, global = true, env = "TOLLGATE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admin panel, the gateway and the usage API.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8080 (overrides the config file).
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<String>,
    },
    /// Set a model's limit per billing cycle (same rules and audit as the tab).
    Limit {
        #[command(subcommand)]
        action: LimitAction,
    },
    /// Turn automatic fallback to a cheaper model on or off.
    Fallback {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Print the audit log, newest first.
    Audit {
        /// How many rows at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `tollgate limit ...`
#[derive(Debug, Subcommand)]
pub enum LimitAction {
    /// Set MODEL's limit to AMOUNT euros, enabled unless --disabled.
    Set {
        /// Model id or alias.
        model: String,
        /// Amount in EUR, e.g. 12.50 (the tab's input rules apply).
        #[arg(long)]
        eur: String,
        /// Save the amount without enabling it.
        #[arg(long)]
        disabled: bool,
    },
    /// Remove MODEL's limit: it draws on the shared pool only.
    Clear {
        /// Model id or alias.
        model: String,
    },
}

/// `tollgate config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print a documented example config.
    Example,
}

/// Run a parsed command line.
///
/// Errors: any failure, already phrased for the operator.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config {
        action: ConfigAction::Example,
    } = &cli.command
    {
        print!("{}", config::EXAMPLE);
        return Ok(());
    }
    let listen = match &cli.command {
        Command::Serve { listen } => listen.clone(),
        _ => None,
    };
    let config = config::Config::load(
        cli.config.as_deref(),
        &config::Overrides {
            listen,
            database_url: cli.database_url.clone(),
        },
    )?;
    let store = open(&config).await?;
    match cli.command {
        Command::Serve { .. } => serve(config, store).await,
        Command::Limit { action } => limit(&config, &store, action).await,
        Command::Fallback { state } => {
            let on = state == "on";
            let now = Utc::now();
            let current = store.spend_snapshot(now).await?.settings;
            let saved = store
                .update_settings(&Actor::Cli, current.version, on, now)
                .await?;
            println!(
                "automatic fallback: {}",
                if saved.automatic_fallback {
                    "on"
                } else {
                    "off"
                }
            );
            Ok(())
        }
        Command::Audit { limit } => {
            for row in store.audit_log(limit).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    row.at.to_rfc3339(),
                    row.actor,
                    row.action,
                    row.subject,
                    row.old_value,
                    row.new_value
                );
            }
            Ok(())
        }
        Command::Config { .. } => Ok(()),
    }
}

/// Open the database, migrate it and apply the config's workspace, plan and catalog.
async fn open(config: &config::Config) -> anyhow::Result<SharedStore> {
    let store = db::connect(&config.database_url, config.durability).await?;
    store
        .apply_setup(&config.setup)
        .await
        .context("could not apply the config to the database")?;
    Ok(store)
}

async fn limit(
    config: &config::Config,
    store: &SharedStore,
    action: LimitAction,
) -> anyhow::Result<()> {
    let (name, limit) = match &action {
        LimitAction::Set {
            model,
            eur,
            disabled,
        } => {
            let amount = parse_eur_input(eur)
                .map_err(|e| anyhow::anyhow!("--eur {eur:?}: {}", e.message()))?;
            let nanos = amount
                .to_nanos_rounded()
                .map_err(|e| anyhow::anyhow!("--eur {eur:?}: {e}"))?;
            (
                model,
                ModelLimit {
                    limit: Some(nanos),
                    enabled: !disabled,
                },
            )
        }
        LimitAction::Clear { model } => (model, ModelLimit::default()),
    };
    let model = config
        .setup
        .catalog
        .resolve(name)
        .with_context(|| format!("{name:?} is not a model of the catalog"))?;
    let now = Utc::now();
    let snapshot = store.spend_snapshot(now).await?;
    let expected_version = snapshot
        .models
        .iter()
        .find(|m| m.id == model.id)
        .map(|m| m.limit.version)
        .unwrap_or(0);
    store
        .update_model_limits(
            &Actor::Cli,
            &[LimitChange {
                model: model.id.clone(),
                expected_version,
                limit,
            }],
            now,
        )
        .await?;
    match limit.limit {
        Some(cap) => println!(
            "{}: limit {} per cycle, {}",
            model.id,
            format_eur(cap.to_money()),
            if limit.enabled { "enabled" } else { "disabled" }
        ),
        None => println!("{}: no limit (shared pool)", model.id),
    }
    Ok(())
}

/// How often any replica looks for reservations whose lease ended (R7).
const LEASE_SWEEP_INTERVAL: Duration = Duration::from_secs(15);

async fn serve(config: config::Config, store: SharedStore) -> anyhow::Result<()> {
    let released = store.release_expired(Utc::now()).await?;
    if released > 0 {
        tracing::info!(released, "released reservations left by a stopped process");
    }
    let sweeper = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEASE_SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                if let Err(e) = store.release_expired(Utc::now()).await {
                    tracing::warn!(error = %e, "could not release expired reservations");
                }
            }
        })
    };
    if !assets::has_frontend() {
        tracing::warn!("this binary was built without the frontend: pages will not hydrate (build with ./dev build)");
    }
    let state = http::AppState {
        leptos_options: assets::leptos_options(config.listen),
        store,
        config: Arc::new(config.clone()),
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
    sweeper.abort();
    Ok(())
}
