//! The operator's command line (DESIGN.md §7), a public contract: commands, flags
//! and environment variables are extended, never renamed.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use app::{
    domain::{format_eur, parse_eur_input, ModelLimit, Nanos},
    report::{SpendReport, TabView},
    store::{Actor, LimitChange, Role, SharedStore},
};
use chrono::Utc;
use clap::{Parser, Subcommand};
use tower_sessions::session_store::ExpiredDeletion;

use crate::{assets, auth, config, db, gateway, http, replay};

/// `println!` for a command's output on stdout: when the reader has gone away
/// (`tollgate user list | head -1`), the command ends with [`OutputClosed`]
/// instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        write_output(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// `eprintln!` that cannot panic: a line for the operator on stderr, dropped
/// when stderr cannot be written (its reader went away). A log pipeline that
/// fails must not stop the command, nor a server (DESIGN.md §7).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The reader of the command's output went away before it was all written.
///
/// `main` ends the process quietly with status 141 (128 + SIGPIPE), what a shell
/// reports for a command stopped by a closed pipe.
#[derive(Debug, thiserror::Error)]
#[error("the reader of the output went away")]
pub struct OutputClosed;

/// Writes `text` to stdout.
///
/// Errors: [`OutputClosed`] when the pipe's reader has gone away; the I/O error
/// for any other failure (a full disk behind a redirection, say).
fn write_output(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("could not write the output")),
    }
}

/// `--config`/`TOLLGATE_CONFIG` as a path, an empty one included: clap reads
/// the variable again where `--config` overrides it, so refusing it here would
/// refuse an explicit `--config` too. [`run`] refuses an empty path that is
/// left in force.
fn config_path(text: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(text))
}

/// Spend control for an organisation's use of large language models.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version)]
pub struct Cli {
    // Help names the environment variables without their values: a database
    // URL may hold a password.
    /// The TOML config file (default: the embedded demo configuration).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_CONFIG",
        hide_env_values = true,
        value_parser = config_path
    )]
    pub config: Option<PathBuf>,
    /// sqlite://FILE or postgres://USER@HOST/DB (overrides the config file).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_DATABASE_URL",
        hide_env_values = true
    )]
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
        #[arg(long, env = "TOLLGATE_LISTEN", hide_env_values = true)]
        listen: Option<String>,
    },
    /// Manage users (administrators see the Token Limits tab; members use the gateway).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Manage API keys for the gateway and the usage API.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Look at the holds of requests in flight (DESIGN.md R7).
    Reservation {
        #[command(subcommand)]
        action: ReservationAction,
    },
    /// Look at the usage ledger: what each request was billed (DESIGN.md §6).
    Usage {
        #[command(subcommand)]
        action: UsageAction,
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
    /// Print the current billing cycle's books as the Token Limits tab shows
    /// them: period, status, spent and reserved against the plan, automatic
    /// fallback, then each model's spend, share and limit (exact EUR, tab
    /// separated). Read from the database, so the catalog is the one the server
    /// applied, whatever config this command is given.
    Spend {
        /// Print the report of `GET /api/v1/spend` instead, as the same JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the audit log, newest first.
    Audit {
        #[command(flatten)]
        rows: RowLimit,
    },
    /// Fill the database with demo data: an administrator and a member (password
    /// from TOLLGATE_PASSWORD), and some usage in the current cycle. Safe to repeat:
    /// existing demo accounts are kept (given TOLLGATE_PASSWORD if theirs differs;
    /// a disabled one stays disabled) and the usage is recorded only in a cycle
    /// without spend yet.
    Demo,
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Replay an hour of real production traffic (the Azure LLM trace of 2023)
    /// through a running gateway, to a mock upstream (DESIGN.md §8).
    Replay {
        #[command(subcommand)]
        action: ReplayAction,
    },
}

/// `--limit N` of the commands that print the last rows of a log.
#[derive(Debug, clap::Args)]
pub struct RowLimit {
    /// How many rows at most (1 or more).
    // A negative number is read as a value, to be refused as one rather
    // than as an unknown flag.
    #[arg(
        long,
        default_value_t = 50,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub limit: u32,
}

/// `tollgate usage ...`
#[derive(Debug, Subcommand)]
pub enum UsageAction {
    /// List the ledger's last rows, newest first, whatever their cycle: id,
    /// when, user, key id, requested and served model, prompt, cached,
    /// completion and reasoning tokens (`-` for a row billed its estimate),
    /// cost in EUR (exact), flags (`estimated`, `over_reservation`,
    /// `lease_expired`, or `-`) and the usage API's idempotency key.
    List {
        #[command(flatten)]
        rows: RowLimit,
        /// Only the rows flagged: billed the estimate, over their reservation,
        /// or billed after their lease (R7).
        #[arg(long)]
        flagged: bool,
    },
}

/// `tollgate replay ...`
#[derive(Debug, Subcommand)]
pub enum ReplayAction {
    /// Serve the mock upstream the replay's gateway forwards to: it answers every
    /// chat completion at once with the trace's token counts, streamed or not.
    MockUpstream {
        /// Address to listen on; the config's upstream `base_url` points here.
        #[arg(long, default_value = "127.0.0.1:9009")]
        listen: String,
    },
    /// Send the trace through the gateway, wait for every answer, then print what
    /// happened and the books of the cycle (read from the config's database).
    Run {
        #[command(flatten)]
        options: replay::ReplayOptions,
        /// Also write the summary and every request's outcome as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// `tollgate user ...`
#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Create a user; the password comes from TOLLGATE_PASSWORD or, when unset,
    /// the first line of standard input.
    Create {
        /// Login email.
        #[arg(long)]
        email: String,
        /// `admin` or `member`.
        #[arg(long, value_parser = ["admin", "member"])]
        role: String,
    },
    /// List users: id, email, role, created, status and live keys (never a
    /// password).
    List,
    /// Disable the user with EMAIL: they sign in no more, their panel sessions
    /// end, their keys are revoked. Their usage stays in the ledger.
    Disable {
        /// The user's email.
        #[arg(long)]
        email: String,
    },
    /// Enable the disabled user with EMAIL again: they can sign in and be given
    /// new keys (`tollgate key create`); their old keys stay revoked.
    Enable {
        /// The user's email.
        #[arg(long)]
        email: String,
    },
    /// Set a new password for the user with EMAIL, from TOLLGATE_PASSWORD or, when
    /// unset, the first line of standard input: their panel sessions end, their
    /// keys stay.
    Password {
        /// The user's email.
        #[arg(long)]
        email: String,
    },
}

/// `tollgate reservation ...`
#[derive(Debug, Subcommand)]
pub enum ReservationAction {
    /// List the holds in the books, oldest first: id, requested and served model,
    /// EUR held (exact), user, key id (a usage-API hold's caller), owner (the
    /// replica that admitted it), created, lease end, and `expired` once the
    /// lease has ended (any replica releases it at its next sweep).
    List,
}

/// `tollgate key ...`
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Create a key for the user with EMAIL and print it, alone, once.
    Create {
        /// The owner's email.
        #[arg(long)]
        email: String,
        /// A label for the key.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List keys: id, name, owner, created, last used (never the key).
    List {
        /// Only the keys of this user.
        #[arg(long)]
        email: Option<String>,
    },
    /// Revoke a key by its id (from `key list`).
    Revoke {
        /// The key's id (1 or more).
        // A negative number is read as a value, to be refused as one rather
        // than as an unknown flag.
        #[arg(
            allow_negative_numbers = true,
            value_parser = clap::value_parser!(i64).range(1..)
        )]
        key_id: i64,
    },
}

/// `tollgate limit ...`
#[derive(Debug, Subcommand)]
pub enum LimitAction {
    /// Set MODEL's limit to AMOUNT euros, enabled unless --disabled; with
    /// --disabled alone, turn the limit off and keep its amount.
    Set {
        /// Model id or alias.
        model: String,
        /// Amount in EUR, e.g. 12.50 (the tab's input rules apply). Required
        /// unless --disabled is given.
        // Hyphen values too, so that `--eur -1` gets the tab's message about
        // negative amounts rather than clap's "unexpected argument".
        #[arg(long, allow_hyphen_values = true, required_unless_present = "disabled")]
        eur: Option<String>,
        /// Save the amount without enabling it (without --eur: the amount
        /// saved stays, as when the tab's Enabled toggle is turned off).
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
        write_output(config::EXAMPLE)?;
        return Ok(());
    }
    if let Command::Replay {
        action: ReplayAction::MockUpstream { listen },
    } = &cli.command
    {
        return mock_upstream(listen).await;
    }
    let listen = match &cli.command {
        Command::Serve { listen } => listen.clone(),
        _ => None,
    };
    // An empty path is refused, not read as "no config": a script whose
    // variable came out empty would otherwise run on the embedded demo
    // configuration, and `serve` would apply its plan and catalog to the books.
    if cli
        .config
        .as_ref()
        .is_some_and(|path| path.as_os_str().is_empty())
    {
        anyhow::bail!(
            "--config: an empty path names no file (is TOLLGATE_CONFIG set to nothing?): \
             name the config file, or leave both unset for the embedded default"
        );
    }
    let explicit_config = cli.config.is_some();
    let config = config::Config::load(
        cli.config.as_deref(),
        &config::Overrides {
            listen,
            database_url: cli.database_url.clone(),
        },
    )?;
    // Every command opens the database: before `serve` prepares the spool,
    // whose default folder sits beside the SQLite file and would be made with
    // its parents.
    config.check_sqlite_folder()?;
    if let Command::Serve { .. } = cli.command {
        // A server that cannot listen (the address is taken: another server
        // runs there) must change nothing, so it binds before it applies its
        // config to the database that server may be billing against.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("could not listen on {}", config.listen))?;
        // Settlements the database holds up are kept there: a folder that cannot
        // take them stops the start, before the database is touched.
        let spool = &config.settlement_spool;
        // The folders `prepare` makes, deepest first.
        let missing: Vec<PathBuf> = spool
            .ancestors()
            .take_while(|folder| !folder.as_os_str().is_empty() && !folder.exists())
            .map(std::path::Path::to_path_buf)
            .collect();
        // A start that failed leaves no trace: the folders made for the spool
        // go, unless something was put in them meanwhile (another server's
        // settlements), which `remove_dir` leaves alone.
        let unmake = |e: anyhow::Error| {
            for folder in &missing {
                let _ = std::fs::remove_dir(folder);
            }
            e
        };
        gateway::spool::Spool::new(spool.clone())
            .prepare()
            .await
            .map_err(|e| {
                unmake(
                    config::ConfigError::Invalid {
                        key: "settlement_spool".into(),
                        problem: format!(
                            "cannot keep settlements in {}: {}",
                            app::text::shown_path(spool.display()),
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                "it is a file, not a folder".to_owned()
                            } else {
                                e.to_string()
                            }
                        ),
                    }
                    .into(),
                )
            })?;
        let database = open(&config, Apply::Always).await.map_err(unmake)?;
        return serve(config, database, listener).await;
    }
    // The config's workspace, plan and catalog are the server's to apply: another
    // command, maybe run with another config (or none), must not change what a
    // running server bills against. It applies them only to a new database.
    let apply = match cli.command {
        Command::Demo | Command::Replay { .. } => Apply::Always,
        _ => Apply::IfNew,
    };
    // Checked before the database is opened: a refused command changes
    // nothing, not even by creating the SQLite file (and `demo` applies its
    // config there).
    let checked = check_arguments(&cli.command, &config).await?;
    let database = open(&config, apply).await?;
    let outcome = run_command(
        cli.command,
        &config,
        explicit_config,
        &database.store,
        checked,
    )
    .await;
    // Every connection closed: SQLite then writes its WAL back into the file
    // and deletes it, so the file alone holds what the command did.
    database.close(CLOSE_WAIT).await;
    outcome
}

/// How long a command waits for its database's connections to close once it
/// is done: they close at once unless a write is still in flight.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What a command reads and checks before the database is opened, by
/// [`check_arguments`].
#[derive(Default)]
struct Checked {
    /// `demo`: the demo accounts' password.
    demo_password: Option<DemoPassword>,
    /// `user create`: the new user's password, hashed.
    password_hash: Option<String>,
}

/// The checks of `command`'s arguments that need no database, so that a command
/// refused for them changes nothing, not even by creating the SQLite file; and
/// the passwords, read (from TOLLGATE_PASSWORD or standard input) once the rest
/// holds: nobody types a password for a command that cannot run. The commands
/// take their checked values from the same functions again.
///
/// Errors: the first argument refused, with the flag that gave it.
async fn check_arguments(command: &Command, config: &config::Config) -> anyhow::Result<Checked> {
    let mut checked = Checked::default();
    match command {
        Command::User {
            action: UserAction::Create { email, .. },
        } => {
            new_user_email(email)?;
            checked.password_hash = Some(auth::hash_password(&given_password()?)?);
        }
        Command::Key {
            action: KeyAction::Create { name, email },
        } => {
            key_name(name)?;
            user_email(email)?;
        }
        Command::Key {
            action: KeyAction::List { email: Some(email) },
        }
        | Command::User {
            action:
                UserAction::Disable { email }
                | UserAction::Enable { email }
                | UserAction::Password { email },
        } => {
            user_email(email)?;
        }
        Command::Limit { action } => {
            requested_limit(action)?;
        }
        Command::Demo => checked.demo_password = Some(demo_password()?),
        Command::Replay {
            action: ReplayAction::Run { options, json },
        } => replay_ready(config, options, json.as_deref()).await?,
        _ => {}
    }
    Ok(checked)
}

/// Runs `command` (all but `serve`, `config` and `replay mock-upstream`) on the
/// open database's books.
async fn run_command(
    command: Command,
    config: &config::Config,
    explicit_config: bool,
    store: &SharedStore,
    checked: Checked,
) -> anyhow::Result<()> {
    match command {
        // Answered by `run`.
        Command::Serve { .. } | Command::Config { .. } => Ok(()),
        Command::User {
            action: UserAction::Create { email, role },
        } => {
            let role: Role = role.parse()?;
            let email = new_user_email(&email)?;
            let hash = checked
                .password_hash
                .context("the password is read before the database is opened")?;
            let user = store
                .create_user(&Actor::Cli, email, &hash, role, Utc::now())
                .await?;
            outln!(
                "created {} {} (id {})",
                user.role.as_str(),
                user.email,
                user.id
            );
            Ok(())
        }
        Command::User {
            action: UserAction::List,
        } => {
            outln!("id\temail\trole\tcreated\tstatus\tlive keys");
            for user in store.list_users().await? {
                let status = match user.disabled_at {
                    Some(at) => format!("disabled {}", app::text::shown_time(at)),
                    None => "enabled".to_owned(),
                };
                outln!(
                    "{}\t{}\t{}\t{}\t{status}\t{}",
                    user.id,
                    user.email,
                    user.role.as_str(),
                    app::text::shown_time(user.created_at),
                    user.live_keys
                );
            }
            Ok(())
        }
        Command::User {
            action: UserAction::Disable { email },
        } => match store
            .disable_user(&Actor::Cli, email.trim(), Utc::now())
            .await
        {
            Ok(done) => {
                outln!(
                    "disabled {} {} (id {}); revoked {} key(s)",
                    done.user.role.as_str(),
                    done.user.email,
                    done.user.id,
                    done.keys_revoked
                );
                // Allowed (an operator may mean it), but said: nobody can open
                // the tab until an administrator is enabled or created.
                let admin_left = store.list_users().await.map(|users| {
                    users
                        .iter()
                        .any(|u| u.role == app::store::Role::Admin && u.disabled_at.is_none())
                });
                if done.user.role == app::store::Role::Admin && admin_left.is_ok_and(|left| !left) {
                    say!(
                        "warning: no enabled administrator is left to open the Token Limits tab; \
                         `tollgate user enable --email {}` or `tollgate user create --role admin` \
                         gives it one again",
                        done.user.email
                    );
                }
                Ok(())
            }
            Err(app::store::StoreError::NotFound { .. }) => {
                let user = listed_user(store, &email).await?;
                match user.disabled_at {
                    // Disabling twice is not an error (a script may run again).
                    Some(at) => {
                        outln!(
                            "{} was already disabled on {}",
                            user.email,
                            app::text::shown_time(at)
                        );
                        Ok(())
                    }
                    None => anyhow::bail!("{} could not be disabled; try again", email.trim()),
                }
            }
            Err(e) => Err(e.into()),
        },
        Command::User {
            action: UserAction::Enable { email },
        } => match store
            .enable_user(&Actor::Cli, email.trim(), Utc::now())
            .await
        {
            Ok(user) => {
                outln!(
                    "enabled {} {} (id {}); their old keys stay revoked: \
                     `tollgate key create --email {}` gives a new one",
                    user.role.as_str(),
                    user.email,
                    user.id,
                    user.email
                );
                Ok(())
            }
            Err(app::store::StoreError::NotFound { .. }) => {
                // Enabling twice is not an error (a script may run again).
                let user = listed_user(store, &email).await?;
                if user.disabled_at.is_none() {
                    outln!("{} is already enabled", user.email);
                    Ok(())
                } else {
                    anyhow::bail!("{} could not be enabled; try again", email.trim())
                }
            }
            Err(e) => Err(e.into()),
        },
        Command::User {
            action: UserAction::Password { email },
        } => {
            // Asked for only once the user is known: nobody types a password
            // for a command that cannot run.
            listed_user(store, &email).await?;
            let hash = auth::hash_password(&given_password()?)?;
            match store
                .set_password(&Actor::Cli, email.trim(), &hash, Utc::now())
                .await
            {
                Ok(user) => {
                    outln!(
                        "set a new password for {} {} (id {}); their panel sessions ended",
                        user.role.as_str(),
                        user.email,
                        user.id
                    );
                    Ok(())
                }
                Err(app::store::StoreError::NotFound { .. }) => anyhow::bail!(
                    "no user has the email {}: see `tollgate user list`",
                    quoted(email.trim())
                ),
                Err(e) => Err(e.into()),
            }
        }
        Command::Key { action } => key(store, action).await,
        Command::Limit { action } => limit(config, explicit_config, store, action).await,
        Command::Fallback { state } => {
            let on = state == "on";
            // The operator names the state, not a version: whatever another
            // writer left is written over (the tab refuses stale saves).
            let saved = store
                .update_settings(&Actor::Cli, None, on, Utc::now())
                .await?;
            outln!(
                "automatic fallback: {}",
                if saved.automatic_fallback {
                    "on"
                } else {
                    "off"
                }
            );
            Ok(())
        }
        Command::Spend { json } => spend(store, json).await,
        Command::Audit {
            rows: RowLimit { limit },
        } => {
            for row in store.audit_log(limit).await? {
                outln!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    app::text::shown_time(row.at),
                    row.actor,
                    row.action,
                    row.subject,
                    row.old_value,
                    row.new_value
                );
            }
            Ok(())
        }
        Command::Reservation {
            action: ReservationAction::List,
        } => {
            let now = Utc::now();
            outln!("id\trequested\tserved\treserved EUR\tuser\tkey\towner\tcreated\tlease until\tstatus");
            for hold in store.list_reservations().await? {
                outln!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    hold.id,
                    hold.requested,
                    hold.served,
                    hold.amount.to_money().amount().normalize(),
                    hold.user_email.as_deref().unwrap_or("-"),
                    hold.api_key_id
                        .map_or_else(|| "-".to_owned(), |id| id.to_string()),
                    hold.owner,
                    app::text::shown_time(hold.created_at),
                    app::text::shown_time(hold.lease_until),
                    if hold.lease_until < now {
                        "expired"
                    } else {
                        "held"
                    }
                );
            }
            Ok(())
        }
        Command::Usage {
            action:
                UsageAction::List {
                    rows: RowLimit { limit },
                    flagged,
                },
        } => {
            outln!("id\tat\tuser\tkey\trequested\tserved\tprompt\tcached\tcompletion\treasoning\tcost EUR\tflags\tidempotency key\tcycle start");
            for row in store.usage_events(limit, flagged).await? {
                let count = |count: fn(&app::domain::Usage) -> u64| {
                    row.usage
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |usage| count(usage).to_string())
                };
                let flags: Vec<&str> = [
                    (row.estimated, "estimated"),
                    (row.over_reservation, "over_reservation"),
                    (row.lease_expired, "lease_expired"),
                ]
                .into_iter()
                .filter_map(|(set, flag)| set.then_some(flag))
                .collect();
                outln!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    row.id,
                    app::text::shown_time(row.occurred_at),
                    row.user_email.as_deref().unwrap_or("-"),
                    row.api_key_id
                        .map_or_else(|| "-".to_owned(), |id| id.to_string()),
                    row.requested,
                    row.served,
                    count(|u| u.prompt_tokens),
                    count(|u| u.cached_tokens),
                    count(|u| u.completion_tokens),
                    count(|u| u.reasoning_tokens),
                    row.cost.to_money().amount().normalize(),
                    if flags.is_empty() {
                        "-".to_owned()
                    } else {
                        flags.join(",")
                    },
                    row.idempotency_key
                        .as_deref()
                        .and_then(gateway::usage_api::sent_key)
                        // `-` says "no key": a key of `-` is told from it.
                        .map_or_else(
                            || "-".into(),
                            |key| match key {
                                "-" => "\\-".into(),
                                key => shown(key),
                            },
                        ),
                    app::text::shown_time(row.cycle_start),
                );
            }
            Ok(())
        }
        Command::Demo => {
            let password = checked
                .demo_password
                .context("the demo password is read before the database is opened")?;
            demo(config, store, password).await
        }
        Command::Replay { action } => replay(config, store, action).await,
    }
}

async fn mock_upstream(listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    outln!(
        "mock upstream for the replay on http://{}/v1",
        listener.local_addr()?
    );
    axum::serve(listener, replay::mock::router())
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// What `replay run` checks before the database is opened: both models are in
/// the config's catalog, the JSON report's path can be written, and the gateway
/// answers and takes the key.
///
/// Errors: the first of these that fails, with the flag that gave it.
async fn replay_ready(
    config: &config::Config,
    options: &replay::ReplayOptions,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    for (flag, model) in [
        ("--code-model", &options.code_model),
        ("--conversation-model", &options.conversation_model),
    ] {
        if config.setup.catalog.resolve(model).is_none() {
            anyhow::bail!(
                "{flag} {} is not a model of the config's catalog",
                quoted(model)
            );
        }
    }
    if let Some(path) = json {
        std::fs::write(path, b"{}")
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    replay::probe(options).await
}

async fn replay(
    config: &config::Config,
    store: &SharedStore,
    action: ReplayAction,
) -> anyhow::Result<()> {
    let ReplayAction::Run { options, json } = action else {
        return Ok(());
    };
    let trace = replay::trace::embedded()?;
    let selected = options.select(&trace);
    crate::say!(
        "replaying {} requests to {} at {}× (about {} s)…",
        selected.len(),
        options.gateway,
        options.speedup,
        selected
            .last()
            .map_or(0, |r| r.offset.as_secs() / u64::from(options.speedup))
    );
    let before = replay::books_before(store, Utc::now()).await?;
    let report = replay::send(&trace, &options).await?;
    let summary =
        replay::Summary::new(&report, &before, store, &config.setup.catalog, Utc::now()).await?;
    write_output(&summary.render(&options))?;
    if let Some(path) = json {
        let document = serde_json::json!({"summary": &summary, "requests": &report.sent});
        std::fs::write(&path, serde_json::to_vec_pretty(&document)?)
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    if summary.unexpected() > 0 {
        anyhow::bail!(
            "{} requests failed or were refused for another reason than a limit (see above; --json lists each)",
            summary.unexpected()
        );
    }
    if !summary.books_agree() {
        anyhow::bail!("the books do not agree with the replayed traffic (see above)");
    }
    Ok(())
}

/// The longest key name `tollgate key create --name` takes, in characters: a
/// label that fits on a line of `tollgate key list`.
const MAX_KEY_NAME_CHARS: usize = 100;

pub(crate) use app::text::{is_hidden, quoted, shown};

/// Whether two texts are drawn alike: the same skeleton by Unicode's
/// confusable detection (UTS #39), which catches one text in two normal forms
/// (NFC and NFD) and letters of another script drawn alike (Cyrillic `е` for
/// Latin `e`). Models' display names (config) and users' emails (store) are
/// compared with it.
pub(crate) fn looks_alike(a: &str, b: &str) -> bool {
    unicode_security::skeleton(a).eq(unicode_security::skeleton(b))
}

/// Why `email` (as typed, or as it will be stored) cannot be an address at
/// all, before its syntax is read ([`email_syntax_error`]): a name or angle
/// brackets around it, a character that does not show as itself, a space, not
/// one `@` between two parts, or a quoted part before the `@`. `None` when
/// none of these.
fn email_problem(email: &str) -> Option<&'static str> {
    if email.contains(['<', '>']) {
        return Some("give the address alone, without a name or angle brackets (ada@example.com)");
    }
    // Hidden characters would reach operators' terminals through `user list`
    // and `audit`.
    if email.contains(is_hidden) {
        return Some(
            "it holds a character that does not show as itself (a tab, a line break, a \
             no-break or zero-width space, a direction override, a variation selector, a \
             private-use or unassigned character): `tollgate user list` would print it \
             like another address",
        );
    }
    if email.contains(char::is_whitespace) {
        return Some("it holds a space");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Some("it has no @ between the mailbox and the domain");
    };
    if domain.contains('@') {
        return Some("it has more than one @");
    }
    if local.is_empty() {
        return Some("nothing comes before the @");
    }
    if domain.is_empty() {
        return Some("no domain comes after the @");
    }
    // RFC 5321 §4.1.2 advises against mailboxes that need quotes, and a
    // quoted name can be the same mailbox as the bare one ("ada" and ada).
    if local.starts_with('"') {
        return Some(
            "the part before the @ is in quotes: give an address that needs none \
             (RFC 5321 advises mail systems against them)",
        );
    }
    None
}

/// `key create --name`, with plain spaces (U+0020) around it trimmed; any
/// other space there is refused, as anywhere in the name.
///
/// Errors: when it is empty, longer than [`MAX_KEY_NAME_CHARS`], or holds a
/// character that does not show as itself ([`is_hidden`]).
fn key_name(name: &str) -> anyhow::Result<&str> {
    let name = name.trim_matches(' ');
    anyhow::ensure!(
        !name.is_empty(),
        "--name must not be empty: `tollgate key list` shows it beside the key's id, to say what the key is for"
    );
    // `key list` prints one key per line, its columns split by tabs.
    anyhow::ensure!(
        !name.contains(is_hidden),
        "--name must not hold a tab, a line break, another control character, \
         a space other than the plain one (a no-break space), a private-use or \
         unassigned character, or an invisible one (a zero-width space, a \
         direction override): `tollgate key list` prints one key per line as it reads"
    );
    anyhow::ensure!(
        name.chars().count() <= MAX_KEY_NAME_CHARS,
        "--name must have at most {MAX_KEY_NAME_CHARS} characters"
    );
    Ok(name)
}

/// Most bytes in an email address, and in the part before its `@` (RFC 5321's
/// limits on a path and a local part).
const MAX_EMAIL_BYTES: usize = 254;
const MAX_LOCAL_PART_BYTES: usize = 64;

/// `user create --email`, trimmed.
///
/// Errors: when it does not look like an email address, as written or as it
/// will be stored (lower case can be longer: `İ`), is longer, as stored,
/// than RFC 5321 allows ([`MAX_EMAIL_BYTES`], [`MAX_LOCAL_PART_BYTES`]), or
/// breaks its syntax ([`email_syntax_error`]).
fn new_user_email(email: &str) -> anyhow::Result<&str> {
    let email = email.trim();
    let stored = app::store::normalized_email(email);
    if let Some(why) = email_problem(email).or_else(|| email_problem(&stored)) {
        anyhow::bail!("--email {} is not an email address: {why}", quoted(email));
    }
    // As mail is addressed: the part before the @ as stored, the domain as
    // DNS writes it (IDNA's ASCII form, `xn--…`), whose labels RFC 1035's 63
    // bytes bound.
    let (local, domain) = stored.rsplit_once('@').unwrap_or_default();
    let ascii_domain = idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_owned());
    let addressed = format!("{local}@{ascii_domain}");
    anyhow::ensure!(
        addressed.len() <= MAX_EMAIL_BYTES,
        "--email {} is {} bytes long{}; an email address has at most {MAX_EMAIL_BYTES} (RFC 5321)",
        quoted(email),
        addressed.len(),
        if addressed == email {
            ""
        } else {
            " as mail is addressed to it (lower case, its domain in IDNA's ASCII form)"
        }
    );
    anyhow::ensure!(
        local.len() <= MAX_LOCAL_PART_BYTES,
        "--email {}: the part before the @ is {} bytes long{}; it has at most \
         {MAX_LOCAL_PART_BYTES} (RFC 5321)",
        quoted(email),
        local.len(),
        if email.starts_with(&format!("{local}@")) {
            ""
        } else {
            " in lower case, as it is stored"
        }
    );
    if let Some(why) = email_syntax_error(local, domain, &addressed) {
        anyhow::bail!("--email {} is not an email address: {why}", quoted(email));
    }
    Ok(email)
}

/// Why the address of `local` and `domain` (as stored, past
/// [`email_problem`]; `addressed` is the two joined by `@`, the domain in
/// IDNA's ASCII form) is no address a mail system delivers to, or `None`. Its
/// syntax is read by the `email_address` crate (RFC 5321, with RFC 6531's
/// Unicode) on the ASCII domain, so that a label's 63 bytes are counted as DNS counts them, and the
/// domain by IDNA's strict rules (UTS #46 with STD3's letters, digits and
/// hyphens); the message says which rule fails. A domain needs a dot and may
/// not be an IP address, bracketed or not: no workspace's users sign in with
/// one.
fn email_syntax_error(local: &str, domain: &str, addressed: &str) -> Option<String> {
    use email_address::{EmailAddress, Error, Options};
    let options = Options::default()
        .with_required_tld()
        .without_domain_literal()
        .without_display_text();
    let labels = || domain.split('.');
    let why = match EmailAddress::parse_with_options(addressed, options).err() {
        None => None,
        Some(Error::SubDomainEmpty | Error::DomainInvalidSeparator) => {
            Some("its domain has two dots in a row, or a dot at an end".to_owned())
        }
        Some(Error::SubDomainTooLong) => {
            let (_, ascii_domain) = addressed.rsplit_once('@').unwrap_or_default();
            let longest = ascii_domain
                .split('.')
                .map(str::len)
                .max()
                .unwrap_or_default();
            Some(format!(
                "a label of its domain (the text between two dots) is {longest} bytes long \
                 as DNS writes it (in IDNA's ASCII form, xn--…); it has at most 63 (RFC 1035)"
            ))
        }
        Some(Error::DomainTooFew) => Some("its domain has no dot".to_owned()),
        Some(Error::UnsupportedDomainLiteral) => {
            Some("its domain is an address in brackets; give the mail server's name".to_owned())
        }
        Some(_) if local.starts_with('.') || local.ends_with('.') || local.contains("..") => {
            Some("the part before the @ starts or ends with a dot, or has two in a row".to_owned())
        }
        Some(_) if !EmailAddress::is_valid_local_part(local) => {
            Some(match local.chars().find(|c| "(),:;[]\\\"".contains(*c)) {
                Some(c) => format!(
                    "the part before the @ holds {c:?}, which an address has only in quotes"
                ),
                None => "the part before the @ holds a character no address has there".to_owned(),
            })
        }
        Some(_) if labels().any(|label| label.starts_with('-') || label.ends_with('-')) => {
            Some("a label of its domain starts or ends with a hyphen".to_owned())
        }
        Some(_) => Some(
            "its domain holds a character other than letters, digits, hyphens and dots".to_owned(),
        ),
    };
    why.or_else(|| {
        if idna::domain_to_ascii_strict(domain).is_ok() {
            None
        } else if labels().any(|label| label.starts_with("xn--")) {
            Some("a label of its domain starts with xn-- but is no name encoded by IDNA".to_owned())
        } else if labels().any(|label| label.get(2..4) == Some("--")) {
            Some(
                "a label of its domain has hyphens in its third and fourth places, which \
                 IDNA keeps for encoded names (xn--)"
                    .to_owned(),
            )
        } else {
            Some(
                "its domain holds a character no domain name has (IDNA, UTS #46: letters, \
                 digits and hyphens)"
                    .to_owned(),
            )
        }
    })
    .or_else(|| {
        labels()
            .next_back()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
            .then(|| {
                "its last label is a number, as in an IP address: give the mail server's name"
                    .to_owned()
            })
    })
}

/// The `--email` of a command on an existing user, checked before the
/// database is opened: an email without a local part, `@` and a domain names
/// no user (`user create` refuses it), so a typo (`--email bad`) is told at
/// once and creates no database file.
///
/// Errors: when it has no `@` between two non-empty parts.
fn user_email(email: &str) -> anyhow::Result<()> {
    match email.trim().split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok(()),
        _ => anyhow::bail!("--email {} is not an email address", quoted(email.trim())),
    }
}

async fn key(store: &SharedStore, action: KeyAction) -> anyhow::Result<()> {
    match action {
        KeyAction::Create { email, name } => {
            let name = key_name(&name)?;
            let user = listed_user(store, &email).await?;
            if let Some(at) = user.disabled_at {
                anyhow::bail!(
                    "{} was disabled on {} and gets no new key",
                    user.email,
                    app::text::shown_time(at)
                );
            }
            let (key, hash) = auth::new_api_key();
            let created = store
                .create_api_key(&Actor::Cli, user.id, name, &hash, Utc::now())
                .await?;
            // The key alone on stdout, so scripts can capture it. It is shown
            // this once: a key nobody could read is revoked at once rather than
            // left live with a secret that is lost.
            if let Err(error) = write_output(&format!("{key}\n")) {
                store
                    .revoke_api_key(&Actor::Cli, created.id, Utc::now())
                    .await
                    .with_context(|| {
                        format!(
                            "key {} was created but could not be shown ({error}), \
                             and revoking it failed: revoke it with `tollgate key revoke {}`",
                            created.id, created.id
                        )
                    })?;
                crate::say!(
                    "key {} could not be shown ({error}) and was revoked: create another",
                    created.id
                );
                return Err(error);
            }
            // Beside it, for the operator: the id that lists and revokes it.
            crate::say!(
                "created key {} ({}) for {}: it is shown this once",
                created.id,
                created.name,
                user.email
            );
        }
        KeyAction::List { email } => {
            if let Some(email) = &email {
                listed_user(store, email).await?;
            }
            outln!("id\tname\towner\tcreated\tlast used\tstatus");
            for key in store.list_api_keys(email.as_deref()).await? {
                outln!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    key.id,
                    key.name,
                    key.owner_email,
                    app::text::shown_time(key.created_at),
                    key.last_used_at
                        .map(app::text::shown_time)
                        .unwrap_or_else(|| "never".into()),
                    if key.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
        KeyAction::Revoke { key_id } => {
            match store.revoke_api_key(&Actor::Cli, key_id, Utc::now()).await {
                Ok(()) => outln!("revoked key {key_id}"),
                Err(app::store::StoreError::NotFound { .. }) => {
                    // Revoking twice is not an error (a script may run again), but
                    // the operator learns it, and an unknown id is one.
                    let key = store
                        .list_api_keys(None)
                        .await?
                        .into_iter()
                        .find(|key| key.id == key_id)
                        .with_context(|| {
                            format!("no API key has the id {key_id}: see `tollgate key list`")
                        })?;
                    match key.revoked_at {
                        Some(at) => outln!(
                            "key {key_id} was already revoked on {}",
                            app::text::shown_time(at)
                        ),
                        None => anyhow::bail!("key {key_id} could not be revoked; try again"),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The password of `user create` and `user password`: TOLLGATE_PASSWORD or, when
/// it is unset, the first line of standard input.
///
/// Errors: when none is given, it is only spaces, or standard input cannot be read
/// (its length is checked when it is hashed).
fn given_password() -> anyhow::Result<String> {
    let password = match std::env::var("TOLLGATE_PASSWORD") {
        Ok(password) => password,
        Err(_) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("could not read the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        anyhow::bail!("no password given: set TOLLGATE_PASSWORD or type it on standard input");
    }
    if password.trim().is_empty() {
        anyhow::bail!("the password must not be only spaces");
    }
    Ok(password)
}

/// The user with `email` (compared as the store compares it,
/// [`app::store::normalized_email`]), enabled or disabled.
///
/// Errors: when no user has it.
async fn listed_user(store: &SharedStore, email: &str) -> anyhow::Result<app::store::UserListing> {
    let email = email.trim();
    let wanted = app::store::normalized_email(email);
    store
        .list_users()
        .await?
        .into_iter()
        .find(|user| user.email == wanted)
        .with_context(|| {
            format!(
                "no user has the email {}: see `tollgate user list`",
                quoted(email)
            )
        })
}

/// The demo's accounts.
pub const DEMO_ADMIN: &str = "admin@example.com";
/// The demo's member account.
pub const DEMO_MEMBER: &str = "member@example.com";

/// Demo usage in the current cycle: `(model, prompt tokens, completion tokens)`.
/// Recorded through admission like any usage (DESIGN.md §4), and only in a cycle
/// without spend yet: once per cycle, and never on top of real usage.
const DEMO_USAGE: [(&str, u64, u64); 3] = [
    ("claude-sonnet-4-5", 2_000_000, 200_000),
    ("gpt-5-mini", 4_000_000, 1_000_000),
    ("gpt-5", 1_000_000, 100_000),
];

/// The demo accounts' password (TOLLGATE_PASSWORD) and its hash.
///
/// Errors: without TOLLGATE_PASSWORD, or with a password too short.
fn demo_password() -> anyhow::Result<DemoPassword> {
    let password = match std::env::var("TOLLGATE_PASSWORD") {
        Ok(password) => password,
        Err(std::env::VarError::NotPresent) => {
            anyhow::bail!("set TOLLGATE_PASSWORD to the demo accounts' password")
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("TOLLGATE_PASSWORD is not valid UTF-8 text")
        }
    };
    let hash = auth::hash_password(&password)?;
    Ok(DemoPassword { password, hash })
}

/// What [`demo_password`] read, checked.
struct DemoPassword {
    password: String,
    hash: String,
}

/// `tollgate demo`: see [`Command::Demo`].
///
/// Errors: when the config's plan has no cycle now, or when the store fails.
async fn demo(
    config: &config::Config,
    store: &SharedStore,
    DemoPassword { password, hash }: DemoPassword,
) -> anyhow::Result<()> {
    let now = Utc::now();
    for (email, role) in [(DEMO_ADMIN, Role::Admin), (DEMO_MEMBER, Role::Member)] {
        match store.user_by_email(email).await? {
            // Their sessions go on.
            Some(user) if auth::verify_password(&password, &user.password_hash) => {}
            // The password was changed, or the file that kept it was lost: the
            // demo accounts get the one the operator is told.
            Some(_) => {
                store.set_password(&Actor::Cli, email, &hash, now).await?;
                outln!("set the password of {email} to TOLLGATE_PASSWORD");
            }
            None => match store.create_user(&Actor::Cli, email, &hash, role, now).await {
                Ok(_) => outln!("created {} {email}", role.as_str()),
                Err(app::store::StoreError::Invalid {
                    code: "email_taken",
                    ..
                }) => outln!(
                    "{email} is disabled: `tollgate user enable --email {email}` lets it sign in again"
                ),
                Err(e) => return Err(e.into()),
            },
        }
    }
    let cycle = config.setup.plan.cycle_at(now)?;
    // Keyed by cycle, the usage would be booked again in a cycle whose start a
    // new plan date moved (R1), on top of the usage it already holds.
    if store.spend_snapshot(now).await?.workspace.spent != Nanos::ZERO {
        outln!(
            "the cycle starting {} already has spend: no demo usage added",
            cycle.first_day
        );
        return Ok(());
    }
    let mut records = Vec::new();
    for (model, prompt, completion) in DEMO_USAGE {
        let Some(model) = config.setup.catalog.resolve(model) else {
            continue;
        };
        records.push(app::store::UsageRecord {
            idempotency_key: format!("demo-{}-{}", cycle.start.timestamp(), model.id),
            model,
            model_as_sent: model.id.as_str(),
            usage: app::domain::Usage {
                prompt_tokens: prompt,
                cached_tokens: 0,
                completion_tokens: completion,
                reasoning_tokens: 0,
            },
        });
    }
    let outcomes = store
        .record_usage(&records, app::store::Spender::default(), now)
        .await?;
    let recorded = outcomes
        .iter()
        .filter(|o| matches!(o, app::store::RecordOutcome::Recorded(_)))
        .count();
    outln!(
        "recorded {recorded} demo usage events in the cycle starting {}",
        cycle.first_day
    );
    Ok(())
}

/// `tollgate spend`: the current cycle's [`SpendReport`] (DESIGN.md §3, R4, R8),
/// as the JSON of `GET /api/v1/spend` or as lines for the operator: one
/// `name<TAB>value` line per figure, a blank line, then a table of the models in
/// R8 order. Amounts are exact EUR (the tab rounds them to cents).
///
/// Errors: the store's, or an output that cannot be written.
async fn spend(store: &SharedStore, json: bool) -> anyhow::Result<()> {
    let report = SpendReport::build(&store.spend_snapshot(Utc::now()).await?);
    if json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        return write_output(&text);
    }
    let tab = TabView::from(&report);
    let on_off = |on: bool| if on { "on" } else { "off" };
    outln!("billing period\t{} – {}", tab.first_day, tab.last_day);
    outln!("resets on\t{}", tab.resets_on);
    outln!("status\t{}", report.status.label());
    outln!("spent EUR\t{}", report.spent);
    outln!("reserved EUR\t{}", report.reserved);
    outln!("plan budget EUR\t{}", report.plan_budget);
    outln!("overage limit EUR\t{}", report.overage_limit);
    outln!("allowance EUR\t{}", report.allowance());
    outln!("used\t{}%", tab.used_percent);
    outln!("automatic fallback\t{}", on_off(report.automatic_fallback));
    outln!("");
    outln!("model\tname\tspent EUR\tshare %\tlimit EUR\tlimit");
    // The tab's rows are the report's, in the same order.
    for (model, row) in report.models.iter().zip(&tab.models) {
        let limit = match (model.in_catalog, model.limit) {
            (false, _) => "not in the catalog",
            (true, None) => "none",
            (true, Some(_)) if row.limit_reached => "enabled, reached",
            (true, Some(_)) if model.limit_enabled => "enabled",
            (true, Some(_)) => "disabled",
        };
        outln!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            model.id,
            model.display_name,
            model.spent,
            model.share_percent,
            model.limit.map(|cap| cap.to_string()).unwrap_or_default(),
            limit
        );
    }
    Ok(())
}

/// When a command applies the config's workspace, plan and catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Apply {
    /// Every time (`serve`, `demo`, `replay`): the config is the deployment's.
    Always,
    /// Only to a database without a workspace yet, so that `user create` works
    /// before the first `serve`.
    IfNew,
}

/// Open the database, migrate it and, as `apply` says, apply the config's
/// workspace, plan and catalog.
async fn open(config: &config::Config, apply: Apply) -> anyhow::Result<db::Database> {
    let database = db::open(&config.database_url, config.durability)
        .await
        .with_context(|| {
            format!(
                "`{}` ({})",
                config.database_url_key,
                db::redact_url(&config.database_url)
            )
        })?;
    let new = match database.store.workspace().await {
        Ok(_) => false,
        Err(app::store::StoreError::NotFound { .. }) => true,
        Err(e) => return Err(e.into()),
    };
    if new {
        // An operator in the wrong directory would otherwise get an empty
        // database of the same name without a word (the default URL is
        // relative), whichever command made it: `demo` and `serve` too.
        say!(
            "{} held no workspace: set up a new one from the config (the built-in default \
             when no config file is given). \
             Not the database you meant? Give --config, --database-url or TOLLGATE_DATABASE_URL.",
            db::redact_url(&config.database_url)
        );
    }
    if apply == Apply::Always || new {
        use backon::Retryable;
        // Another process holding the SQLite file's write lock (a backup, a
        // shell in a transaction) holds up the start, rather than end it: each
        // try waits 10 s for the lock, then the start tries again, for some
        // five minutes.
        let apply = || {
            database
                .store
                .apply_setup(&config.setup, chrono::Utc::now())
        };
        apply
            .retry(
                backon::ConstantBuilder::default()
                    .with_delay(Duration::from_secs(1))
                    .with_max_times(APPLY_TRIES),
            )
            .when(|e| matches!(e, app::store::StoreError::Busy(_)))
            .notify(|_, _| {
                tracing::warn!(
                    "another process holds the database's write lock: \
                     waiting to apply the config"
                )
            })
            .await
            .context("could not apply the config to the database")?;
    }
    Ok(database)
}

/// How often the config is tried again on a database another process holds
/// locked (see [`open`]).
const APPLY_TRIES: usize = 27;

/// The model named by `limit set` or `limit clear`, and the limit asked for:
/// `None` for `limit set --disabled` without `--eur`, which turns the limit
/// off and keeps the amount saved.
///
/// Errors: when `--eur` is not an amount in euros the tab would take
/// (`parse_eur_input`), or cannot be counted in nano-euros.
fn requested_limit(action: &LimitAction) -> anyhow::Result<(&String, Option<ModelLimit>)> {
    let (LimitAction::Set { model, .. } | LimitAction::Clear { model }) = action;
    // Checked before the database is opened: a name no catalog can hold is
    // refused without making a file.
    if model.is_empty() || !app::domain::writable(model) {
        anyhow::bail!(
            "{} cannot be a model's id or alias: they hold no spaces, control characters \
             or invisible characters",
            quoted(model)
        );
    }
    if let Err(e) = app::domain::check_name(model) {
        anyhow::bail!("{e}: no catalog holds it");
    }
    Ok(match action {
        LimitAction::Set {
            model, eur: None, ..
        } => (model, None),
        LimitAction::Set {
            model,
            eur: Some(eur),
            disabled,
        } => {
            let amount = parse_eur_input(eur)
                .map_err(|e| anyhow::anyhow!("--eur {}: {}", quoted(eur), e.message()))?;
            let nanos = amount
                .to_nanos_rounded()
                .map_err(|e| anyhow::anyhow!("--eur {}: {e}", quoted(eur)))?;
            (
                model,
                Some(ModelLimit {
                    limit: Some(nanos),
                    enabled: !disabled,
                }),
            )
        }
        LimitAction::Clear { model } => (model, Some(ModelLimit::default())),
    })
}

async fn limit(
    config: &config::Config,
    explicit_config: bool,
    store: &SharedStore,
    action: LimitAction,
) -> anyhow::Result<()> {
    let (name, limit) = requested_limit(&action)?;
    // The catalog is the one the server applied to the database, which the store
    // checks the model against: this command's config file only resolves
    // aliases. Without a file there is none to read them from: the embedded
    // demo catalog's aliases (`openai/gpt-5` → `gpt-5`) would name models of
    // another catalog, so the name is taken as an id.
    let now = Utc::now();
    let id = match config.setup.catalog.resolve(name) {
        Some(model) if explicit_config => model.id.clone(),
        _ => app::domain::ModelId::new(name.as_str()),
    };
    // The operator names the limit, not a version: whatever another writer left
    // is written over, as `limit set` a moment later would (the tab refuses stale
    // saves). Turning a limit off keeps its amount: the amount read is written
    // back only if nobody changed the limit since (its version).
    let (limit, expected_version) = match limit {
        Some(limit) => (limit, None),
        None => {
            let snapshot = store.spend_snapshot(now).await?;
            let stored = snapshot
                .models
                .iter()
                .find(|model| model.id == id)
                .map(|model| model.limit)
                .unwrap_or_default();
            let limit = ModelLimit {
                limit: stored.limit.limit,
                enabled: false,
            };
            (limit, Some(stored.version))
        }
    };
    let saved = store
        .update_model_limits(
            &Actor::Cli,
            &[LimitChange {
                model: id.clone(),
                expected_version,
                limit,
            }],
            now,
        )
        .await;
    match saved {
        Ok(_) => {}
        Err(app::store::StoreError::Invalid {
            code: "unknown_model",
            message,
        }) => {
            // A model the catalog dropped that still has books this cycle: it
            // was named by its id, and no alias would help.
            let dropped = store
                .spend_snapshot(now)
                .await
                .is_ok_and(|snapshot| snapshot.models.iter().any(|model| model.id == id));
            anyhow::bail!(match (dropped, explicit_config) {
                (true, _) => format!(
                    "{message}: the server's catalog no longer lists it, and a limit \
                     applies to the catalog's models only"
                ),
                // Aliases live in the config, not in the database.
                (false, true) => message,
                (false, false) => format!(
                    "{message}: name the model by its id, or pass the server's --config \
                     to name it by an alias"
                ),
            });
        }
        Err(other) => return Err(other.into()),
    }
    match limit.limit {
        Some(cap) => outln!(
            "{}: limit {} per cycle, {}",
            id,
            format_eur(cap.to_money()),
            if limit.enabled { "enabled" } else { "disabled" }
        ),
        None => outln!("{id}: no limit (shared pool)"),
    }
    // The word the tab shows beside a limit that does something other than it
    // may seem to (€0.00, or above the allowance). The limit is saved either way;
    // books that cannot be read now only cost the note.
    if limit.enabled && limit.limit.is_some() {
        if let Ok(snapshot) = store.spend_snapshot(now).await {
            let report = SpendReport::build(&snapshot);
            let note = report
                .models
                .iter()
                .find(|model| model.id == id)
                .and_then(|model| app::report::limit_note(model, report.allowance()));
            if let Some(note) = note {
                say!("note: {note}");
            }
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what service managers and containers send), so
/// requests in flight finish and settle before the process exits. A second Ctrl-C
/// or SIGTERM while they do ends the process at once, with status 130: what an
/// operator who will not wait asks for. The reservations of the requests cut off
/// are then released by their leases (R7).
async fn shutdown_signal() {
    stop_signal().await;
    tracing::info!(
        "shutting down: finishing requests in flight (a second Ctrl-C or SIGTERM stops at once)"
    );
    tokio::spawn(async {
        stop_signal().await;
        tracing::warn!(
            "stopping at once: requests still in flight are cut off, and their \
             reservations released when their leases end"
        );
        std::process::exit(130);
    });
}

/// Resolves on the next Ctrl-C or SIGTERM.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Settles what waits in the settlement spool, logging what is left (the
/// database is still held up) and a folder that cannot be read.
async fn replay_spool(gateway: &gateway::Gateway) {
    match gateway.replay_spool().await {
        Ok(replayed) if replayed.left > 0 => {
            tracing::warn!(left = replayed.left, spool = %gateway.spool_dir().display(),
                "settlements wait in the spool: the database is busy; trying again at the next sweep")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(spool = %gateway.spool_dir().display(), error = %e,
            "cannot read the settlement spool"),
    }
}

/// How often any replica looks for reservations whose lease ended (R7), and
/// replays the settlement spool.
const LEASE_SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// How long after a sweep found the database held up (another process's lock on
/// the SQLite file, PostgreSQL away) the sweeps release nothing. Requests still
/// running could not renew their leases meanwhile; released, their holds would
/// free room that other requests then take, and spend would pass the allowance
/// when the running ones are billed (R6, R7). Their keepers renew within
/// `RENEW_RETRY` of the database answering again, well within this.
const SWEEP_GRACE: Duration = Duration::from_secs(30);

/// When the lease sweeper may release expired holds again (see [`SWEEP_GRACE`]).
#[derive(Debug, Default)]
struct SweepGrace {
    until: Option<tokio::time::Instant>,
}

impl SweepGrace {
    /// Whether a sweep at `now` may release holds.
    fn may_release(&self, now: tokio::time::Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    /// A sweep at `now` found the database held up.
    fn held_up(&mut self, now: tokio::time::Instant) {
        self.until = Some(now + SWEEP_GRACE);
    }
}

async fn serve(
    config: config::Config,
    database: db::Database,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let store = database.store.clone();
    match store.release_expired(Utc::now()).await {
        Ok(0) => {}
        Ok(released) => {
            tracing::info!(released, "released reservations left by a stopped process")
        }
        // Another process has the SQLite file's write lock this moment: the
        // sweeper below tries again.
        Err(app::store::StoreError::Busy(detail)) => {
            tracing::warn!(error = %detail, "could not release expired reservations yet: the database is busy")
        }
        Err(e) => return Err(e.into()),
    }
    if !assets::has_frontend() {
        tracing::warn!("this binary was built without the frontend: pages will not hydrate (build with ./dev build)");
    }
    let state = http::AppState::new(Arc::new(config.clone()), store.clone());
    let gateway = state.gateway.clone();
    // Settlements a stopped process could not write: billed before new requests.
    replay_spool(&gateway).await;
    let sweeper = {
        let (store, gateway) = (store.clone(), gateway.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEASE_SWEEP_INTERVAL);
            tick.tick().await;
            let mut grace = SweepGrace::default();
            loop {
                tick.tick().await;
                // Settled first: a spooled settlement's hold is then not released
                // (and its room given to another request) before it is billed.
                replay_spool(&gateway).await;
                if !grace.may_release(tokio::time::Instant::now()) {
                    continue;
                }
                if let Err(e) = store.release_expired(Utc::now()).await {
                    grace.held_up(tokio::time::Instant::now());
                    tracing::warn!(error = %e, "could not release expired reservations");
                }
            }
        })
    };
    let local = listener.local_addr()?;
    tracing::info!(database = %db::redact_url(&config.database_url), "Tollgate is serving on http://{local}");
    let sessions = database.sessions.clone();
    tokio::spawn(
        sessions
            .clone()
            .continuously_delete_expired(Duration::from_secs(3600)),
    );
    let options = http::ServeOptions {
        header_read_timeout: config.header_read_timeout,
        response_write_timeout: config.response_write_timeout,
        request_body_timeout: config.request_body_timeout,
    };
    http::serve(
        listener,
        http::router(state, sessions),
        options,
        shutdown_signal(),
    )
    .await;
    // A request whose client went away still has its exchange running: it is
    // settled before the process ends, or its usage would go unbilled.
    gateway.finish_exchanges().await;
    sweeper.abort();
    let _ = sweeper.await;
    drop((gateway, store));
    if !database.close(CLOSE_WAIT).await {
        tracing::warn!(
            "the database's connections did not close in time: a SQLite file's WAL \
             stays beside it until the next start"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_release_nothing_for_a_while_after_the_database_was_held_up() {
        let start = tokio::time::Instant::now();
        let mut grace = SweepGrace::default();
        assert!(grace.may_release(start));
        grace.held_up(start);
        assert!(!grace.may_release(start + Duration::from_secs(29)));
        assert!(grace.may_release(start + SWEEP_GRACE));
        // A keeper's next try, plus the 10 s a write may wait for the lock,
        // comes within the grace.
        assert!(gateway::hold::RENEW_RETRY + Duration::from_secs(10) < SWEEP_GRACE);
    }

    #[test]
    fn text_a_caller_chose_prints_on_one_line_as_it_reads() {
        assert_eq!(shown("batch-7/ü é"), "batch-7/ü é");
        assert_eq!(shown("a\u{2028}b\tc"), "a\\u{2028}b\\u{9}c");
        // A backslash sent is doubled, so it cannot pass for an escape.
        assert_eq!(shown("a\\u{2028}"), "a\\\\u{2028}");
        assert_eq!(shown("\u{202e}gpj.exe"), "\\u{202e}gpj.exe");
        // Two keys that a terminal draws alike print differently.
        assert_eq!(shown("caf\u{e9}"), "caf\u{e9}");
        assert_eq!(shown("cafe\u{301}"), "cafe\\u{301}");
        assert_eq!(shown(" key "), "\\u{20}key\\u{20}");
        assert_eq!(shown("a key"), "a key");
        assert_eq!(shown(" "), "\\u{20}");
        // Text that Unicode composition changes or joins prints as sent.
        assert_eq!(shown("\u{212b}"), "\\u{212b}");
        assert_eq!(shown("\u{c5}"), "\u{c5}");
        assert_eq!(shown("k\u{37e}"), "k\\u{37e}");
        assert_eq!(shown("\u{1100}\u{1161}"), "\u{1100}\\u{1161}");
        assert_eq!(shown("\u{ac00}"), "\u{ac00}");
        assert_eq!(shown("\u{f900}"), "\\u{f900}");
    }
}
