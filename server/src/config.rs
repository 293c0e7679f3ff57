//! The operator's configuration (DESIGN.md §7): a TOML file, overridden by the
//! environment variables `TOLLGATE_LISTEN` and `TOLLGATE_DATABASE_URL` and by flags,
//! with a working embedded default when there is no file.
//!
//! Money in the file is written as strings (`"500.00"`) and read as exact decimals:
//! no float ever holds a price or a budget (R2). Unknown keys are errors, and every
//! error names the key and the problem.

use std::{net::SocketAddr, path::Path, sync::Arc};

use app::{
    domain::{Catalog, CatalogError, Model, ModelId, Money, PricePerMTok, Prices},
    store::{PlanRecord, WorkspaceSetup},
    text::quoted,
};
use chrono::NaiveDate;
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::db::sqlite::Durability;

/// Where the server listens when neither the file nor the environment says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The embedded default: one SQLite file in the working directory, created on
/// first start (DESIGN.md §6).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tollgate.db";
/// Gateway request bodies above this many bytes get 413 (DESIGN.md §4): 16 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// How long a client may take to send a gateway request's body, seconds.
pub const DEFAULT_REQUEST_BODY_TIMEOUT_SECS: u64 = 30;
/// How long a client may take to send a request's headers, seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 30;
/// How long a client may go without taking any of an answer sent to it, seconds.
pub const DEFAULT_RESPONSE_WRITE_TIMEOUT_SECS: u64 = 30;
/// The longest `request_body_timeout_secs`, `header_read_timeout_secs` and
/// `response_write_timeout_secs` accepted: an hour.
const MAX_TIMEOUT_SECS: u64 = 3600;
/// How long the gateway waits for an upstream's answer, and at most between two
/// whole events of a streamed answer, when `[[upstreams]] timeout_secs` is not set:
/// 10 minutes, since a non-streamed answer of a reasoning model arrives whole.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 600;
/// Largest plan amount accepted, EUR: keeps every total inside `i64` nano-euros.
const MAX_PLAN_EUR: i64 = 1_000_000_000;

/// Why a configuration cannot be used. Start-up stops with this message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type;
    /// the message names the key and the line.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value parsed but breaks a rule.
    #[error("invalid config: `{key}`: {problem}")]
    Invalid {
        /// The key, as a path (`plan.budget_eur`, `models[2].upstream`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The settlement spool's folder when the config names none: beside a SQLite
/// file (its path with `-settlements` appended, as SQLite names its `-wal`),
/// or `tollgate-settlements` in the working directory for PostgreSQL.
///
/// Errors: the problem, when a SQLite URL does not parse.
fn default_settlement_spool(database_url: &str) -> Result<std::path::PathBuf, String> {
    let Some(file) = sqlite_file(database_url)? else {
        return Ok(std::path::PathBuf::from("tollgate-settlements"));
    };
    let mut folder = file.into_os_string();
    folder.push("-settlements");
    Ok(folder.into())
}

/// The file a `sqlite:` URL names, as sqlx reads it; `None` for PostgreSQL.
///
/// Errors: the problem, when a SQLite URL does not parse.
fn sqlite_file(database_url: &str) -> Result<Option<std::path::PathBuf>, String> {
    if !database_url.starts_with("sqlite:") {
        return Ok(None);
    }
    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(database_url)
        .map_err(|e| format!("is not a SQLite URL: {e}"))?;
    Ok(Some(options.get_filename().to_owned()))
}

/// The file as written (every key optional; defaults fill the gaps).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    listen: Option<String>,
    database_url: Option<String>,
    max_request_bytes: Option<usize>,
    request_body_timeout_secs: Option<u64>,
    header_read_timeout_secs: Option<u64>,
    response_write_timeout_secs: Option<u64>,
    sqlite_synchronous: Option<String>,
    secure_cookies: Option<bool>,
    settlement_spool: Option<String>,
    workspace: Option<WorkspaceSection>,
    plan: Option<PlanSection>,
    upstreams: Option<Vec<UpstreamSection>>,
    models: Option<Vec<ModelSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceSection {
    name: Option<String>,
    timezone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanSection {
    budget_eur: Option<String>,
    overage_eur: Option<String>,
    /// A string (`"2026-01-31"`) or a TOML date (`2026-01-31`).
    start: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    name: String,
    base_url: String,
    api_key_env: Option<String>,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    id: String,
    display_name: Option<String>,
    upstream: String,
    upstream_model: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    input_eur_per_mtok: String,
    cached_input_eur_per_mtok: Option<String>,
    output_eur_per_mtok: String,
    max_output_tokens: u32,
}

/// An OpenAI-compatible provider the gateway forwards to.
#[derive(Clone)]
pub struct Upstream {
    /// Name models refer to.
    pub name: String,
    /// Base URL, e.g. `https://api.openai.com/v1` (no trailing slash).
    pub base_url: String,
    /// `{base_url}/chat/completions`, with the base URL's query (if any) after
    /// it, parsed once here rather than on every request forwarded to it.
    pub chat_completions_url: url::Url,
    /// The environment variable holding the key (the key never sits in the file).
    pub api_key_env: Option<String>,
    /// How long the gateway waits for the answer's headers (or, non-streamed, its
    /// whole body), and at most between two whole events of a stream
    /// (`timeout_secs`): bytes of an event not yet ended do not count.
    pub timeout: std::time::Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the variable's name: the key itself is never formatted.
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The merged, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket address of the HTTP server.
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`; the scheme picks the backend.
    pub database_url: String,
    /// Where `database_url` was set, as errors about it name it: `database_url`
    /// (the file, or the default) or `TOLLGATE_DATABASE_URL / --database-url`.
    pub database_url_key: &'static str,
    /// Gateway request bodies above this many bytes get 413.
    pub max_request_bytes: usize,
    /// A gateway request whose body has not fully arrived this long after its
    /// headers gets 408 (`request_body_timeout_secs`, default 30 s, 1 s to an
    /// hour), so a slow or stalled client cannot hold a connection forever.
    pub request_body_timeout: std::time::Duration,
    /// A client that has not sent a whole request head this long after
    /// connecting, or after its previous answer, is disconnected
    /// (`header_read_timeout_secs`, default 30 s, 1 s to an hour).
    pub header_read_timeout: std::time::Duration,
    /// A client that takes none of an answer sent to it for this long (it stopped
    /// reading) is disconnected, and its request settled as one whose client went
    /// away (`response_write_timeout_secs`, default 30 s, 1 s to an hour).
    pub response_write_timeout: std::time::Duration,
    /// SQLite durability (`sqlite_synchronous = "normal" | "full"`).
    pub durability: Durability,
    /// Mark the session cookie `Secure` (`secure_cookies`, default false): turn it on
    /// when the panel is served over TLS (DESIGN.md §5).
    pub secure_cookies: bool,
    /// The folder of the settlement spool (`settlement_spool`): settlements the
    /// database could not take before their answer went out, kept until it does
    /// (`gateway::spool`). By default the SQLite file's path with `-settlements`
    /// appended, or `tollgate-settlements` in the working directory on
    /// PostgreSQL.
    pub settlement_spool: std::path::PathBuf,
    /// Workspace name, plan and catalog, applied to the database at start.
    pub setup: WorkspaceSetup,
    /// Upstreams by name.
    pub upstreams: Vec<Upstream>,
}

/// Overrides from flags or environment variables (`TOLLGATE_LISTEN`,
/// `TOLLGATE_DATABASE_URL`), which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `TOLLGATE_LISTEN`.
    pub listen: Option<String>,
    /// `--database-url` / `TOLLGATE_DATABASE_URL`.
    pub database_url: Option<String>,
}

impl Config {
    /// Load `path` (or the embedded default when `None`) and apply `overrides`.
    ///
    /// Errors: [`ConfigError`] naming the key and the problem.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let shown = || app::text::shown_path(path.display());
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: shown(),
                    source,
                })?;
                parse_file(&text).map_err(|message| ConfigError::Parse {
                    path: shown(),
                    message,
                })?
            }
            None => ConfigFile::default(),
        };
        Config::from_file(file, overrides)
    }

    /// Validate a parsed file and apply `overrides`.
    ///
    /// Errors: [`ConfigError::Invalid`] naming the key.
    pub fn from_file(file: ConfigFile, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (listen_key, listen) = match &overrides.listen {
            Some(value) => ("TOLLGATE_LISTEN / --listen", value.clone()),
            None => (
                "listen",
                file.listen.unwrap_or_else(|| DEFAULT_LISTEN.into()),
            ),
        };
        let listen = listen_address(&listen).ok_or_else(|| {
            invalid(
                listen_key,
                format!(
                    "{} is not an address like 127.0.0.1:8080 or a host name and port \
                     like localhost:8080",
                    quoted(&listen)
                ),
            )
        })?;
        let (db_key, database_url) = match &overrides.database_url {
            Some(value) => ("TOLLGATE_DATABASE_URL / --database-url", value.clone()),
            None => (
                "database_url",
                file.database_url
                    .unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            ),
        };
        if !["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|s| database_url.starts_with(s))
        {
            return Err(invalid(
                db_key,
                "must start with sqlite:// (a file) or postgres:// (a server)",
            ));
        }
        // A SQLite URL's file and its query (`?mode=...`).
        let sqlite = database_url.strip_prefix("sqlite:").map(|rest| {
            let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
            (file.trim_start_matches('/'), query)
        });
        // SQLite's own URI form (`sqlite://file:books.db`) opens the file its
        // URI names, while Tollgate's checks, the file's owner-only mode and
        // the spool would apply to a file named `file:books.db`; and a `#`
        // would become part of the file's name.
        if sqlite.is_some_and(|(file, _)| file.starts_with("file:")) {
            return Err(invalid(
                db_key,
                "is in SQLite's URI form (file:…), which Tollgate does not take: write \
                 sqlite://books.db (relative) or sqlite:///var/lib/tollgate/books.db",
            ));
        }
        check_visible(db_key, &database_url, true)?;
        if database_url.starts_with("sqlite:") && database_url.contains('#') {
            return Err(invalid(
                db_key,
                "holds a #, which would become part of the file's name: name the file \
                 without one",
            ));
        }
        if sqlite.is_some_and(|(file, _)| file.is_empty()) {
            return Err(invalid(
                db_key,
                "names no file: write sqlite://tollgate.db (relative) or sqlite:///var/lib/tollgate.db",
            ));
        }
        // An in-memory database is thrown away when the process ends: a user
        // created by one command would be gone for the next.
        let in_memory = sqlite.is_some_and(|(file, query)| {
            file == ":memory:"
                || url::form_urlencoded::parse(query.as_bytes())
                    .any(|(key, value)| key == "mode" && value == "memory")
        });
        if in_memory {
            return Err(invalid(
                db_key,
                "is an in-memory database, gone when the process ends: name a file, \
                 like sqlite://tollgate.db",
            ));
        }
        // Every command writes (the migrations, if nothing else): a file opened
        // read-only would fail on its first write, after SQLite had made it.
        let read_only = sqlite.and_then(|(_, query)| {
            url::form_urlencoded::parse(query.as_bytes()).find_map(|(key, value)| {
                match (&*key, &*value) {
                    ("mode", "ro") => Some("mode=ro"),
                    ("immutable", "true" | "1") => Some("immutable"),
                    _ => None,
                }
            })
        });
        if let Some(option) = read_only {
            return Err(invalid(
                db_key,
                format!(
                    "opens the database read-only ({option}), and Tollgate writes its books \
                     there: leave {option} out"
                ),
            ));
        }
        let settlement_spool = match file.settlement_spool {
            Some(folder) if folder.trim().is_empty() => {
                return Err(invalid(
                    "settlement_spool",
                    "names no folder: write a path like /var/lib/tollgate/settlements",
                ))
            }
            Some(folder) if folder.starts_with('~') => {
                return Err(invalid(
                    "settlement_spool",
                    format!(
                        "{} starts with ~, which names a folder of that name here: \
                         no shell expands it in the config; write the whole path",
                        quoted(&folder)
                    ),
                ))
            }
            Some(folder) => {
                check_visible("settlement_spool", &folder, false)?;
                let folder = std::path::PathBuf::from(folder);
                // The spool made in the database file's place would keep
                // SQLite from opening it, and the error would name the URL.
                if let Ok(Some(file)) = sqlite_file(&database_url) {
                    let same = |a: &std::path::Path, b: &std::path::Path| {
                        std::path::absolute(a).ok() == std::path::absolute(b).ok()
                    };
                    let taken = ["", "-wal", "-shm", "-journal"].iter().any(|suffix| {
                        let mut beside = file.clone().into_os_string();
                        beside.push(suffix);
                        same(&folder, std::path::Path::new(&beside))
                    });
                    if taken {
                        return Err(invalid(
                            "settlement_spool",
                            format!(
                                "{} is the SQLite database's own file ({db_key}): name a folder \
                                 of its own, like {}-settlements",
                                app::text::shown_path(folder.display()),
                                app::text::shown_path(file.display())
                            ),
                        ));
                    }
                }
                folder
            }
            None => default_settlement_spool(&database_url)
                .map_err(|problem| invalid(db_key, problem))?,
        };
        let max_request_bytes = file.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if max_request_bytes == 0 {
            return Err(invalid("max_request_bytes", "must be at least 1"));
        }
        let body_seconds = timeout_secs(
            "request_body_timeout_secs",
            file.request_body_timeout_secs,
            DEFAULT_REQUEST_BODY_TIMEOUT_SECS,
        )?;
        let header_seconds = timeout_secs(
            "header_read_timeout_secs",
            file.header_read_timeout_secs,
            DEFAULT_HEADER_READ_TIMEOUT_SECS,
        )?;
        let write_seconds = timeout_secs(
            "response_write_timeout_secs",
            file.response_write_timeout_secs,
            DEFAULT_RESPONSE_WRITE_TIMEOUT_SECS,
        )?;
        let durability = match file.sqlite_synchronous.as_deref() {
            None | Some("normal") => Durability::Normal,
            Some("full") => Durability::Full,
            Some(other) => {
                return Err(invalid(
                    "sqlite_synchronous",
                    format!("{} is not one of \"normal\", \"full\"", quoted(other)),
                ))
            }
        };

        let workspace = file.workspace.unwrap_or_default();
        let name = workspace.name.unwrap_or_else(|| "Demo workspace".into());
        check_visible_line(&name).map_err(|problem| invalid("workspace.name", problem))?;
        let timezone: Tz = match workspace.timezone.as_deref() {
            None => Tz::UTC,
            Some(tz) => tz.parse().map_err(|_| {
                invalid(
                    "workspace.timezone",
                    format!(
                        "{} is not an IANA timezone name like Europe/Berlin",
                        quoted(tz)
                    ),
                )
            })?,
        };
        let plan = file.plan.unwrap_or_default();
        let budget = plan_amount(
            "plan.budget_eur",
            plan.budget_eur.as_deref().unwrap_or("500.00"),
        )?;
        let overage = plan_amount(
            "plan.overage_eur",
            plan.overage_eur.as_deref().unwrap_or("100.00"),
        )?;
        let start_text = match plan.start {
            None => "2026-01-01".to_owned(),
            Some(toml::Value::String(text)) => text,
            // A TOML date writes itself as `2026-01-31`; one with a time or
            // an offset does not parse below, and is refused.
            Some(toml::Value::Datetime(date)) => date.to_string(),
            Some(other) => {
                return Err(invalid(
                    "plan.start",
                    format!(
                        "must be a date like 2026-01-31 (a string or a TOML date); \
                         this is a TOML {}",
                        other.type_str()
                    ),
                ))
            }
        };
        let start = NaiveDate::parse_from_str(&start_text, "%Y-%m-%d").map_err(|_| {
            invalid(
                "plan.start",
                format!("{} is not a date like 2026-01-31", quoted(&start_text)),
            )
        })?;

        let (upstreams, models) = match (file.upstreams, file.models) {
            (None, None) => demo_catalog(),
            (Some(upstreams), Some(models)) => (upstreams, models),
            (None, Some(_)) => {
                return Err(invalid("upstreams", "models are declared but no upstream"))
            }
            (Some(_), None) => {
                return Err(invalid("models", "upstreams are declared but no model"))
            }
        };
        let upstreams = validate_upstreams(upstreams)?;
        let catalog = build_catalog(models, &upstreams)?;

        Ok(Config {
            listen,
            database_url,
            database_url_key: db_key,
            max_request_bytes,
            request_body_timeout: std::time::Duration::from_secs(body_seconds),
            header_read_timeout: std::time::Duration::from_secs(header_seconds),
            response_write_timeout: std::time::Duration::from_secs(write_seconds),
            durability,
            secure_cookies: file.secure_cookies.unwrap_or(false),
            settlement_spool,
            setup: WorkspaceSetup {
                name,
                plan: PlanRecord {
                    amounts: app::domain::PlanAmounts { budget, overage },
                    start,
                    timezone,
                },
                catalog: Arc::new(catalog),
            },
            upstreams,
        })
    }

    /// Refuses a SQLite file whose folder does not exist: the file is created
    /// where it is missing, but a missing folder is taken for a mistyped path
    /// rather than made, so that `serve` never bills into new, empty books
    /// somewhere unexpected. Also refuses a folder in the file's place, and a
    /// missing file when the URL says `mode=rw` (open, never create).
    ///
    /// Errors: [`ConfigError::Invalid`] naming [`Config::database_url_key`].
    pub fn check_sqlite_folder(&self) -> Result<(), ConfigError> {
        let Ok(Some(file)) = sqlite_file(&self.database_url) else {
            return Ok(());
        };
        let folder = match file.parent() {
            Some(folder) if !folder.as_os_str().is_empty() => folder,
            _ => std::path::Path::new("."),
        };
        if file.is_dir() {
            return Err(invalid(
                self.database_url_key,
                format!(
                    "{} is a folder, not a database file",
                    app::text::shown_path(file.display())
                ),
            ));
        }
        // `mode=rw` asks for a file that exists: SQLite would not create it.
        let existing_only = self.database_url.split_once('?').is_some_and(|(_, query)| {
            url::form_urlencoded::parse(query.as_bytes())
                .any(|(key, value)| key == "mode" && value == "rw")
        });
        if existing_only && !file.exists() {
            return Err(invalid(
                self.database_url_key,
                format!(
                    "{} does not exist, and mode=rw does not create it: name the existing \
                     file, or leave mode=rw out to create one",
                    app::text::shown_path(file.display())
                ),
            ));
        }
        let problem = match std::fs::metadata(folder) {
            Ok(found) if found.is_dir() => return Ok(()),
            Ok(_) => format!(
                "{} is a file, not a folder",
                app::text::shown_path(folder.display())
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "the folder {} does not exist: create it first (a missing SQLite file is \
                 created, its folder is not)",
                app::text::shown_path(folder.display())
            ),
            Err(e) => format!(
                "cannot reach the folder {}: {e}",
                app::text::shown_path(folder.display())
            ),
        };
        Err(invalid(self.database_url_key, problem))
    }

    /// The upstream a model is served by, and the name to send it.
    pub fn upstream_of(&self, model: &Model) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == model.upstream)
    }
}

fn parse_file(text: &str) -> Result<ConfigFile, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        // Not the error's own text: it quotes the line, which may hold a
        // password (in a `database_url` or a `base_url` written wrongly).
        // Shown escaped, as every message shows what was typed: an unknown key
        // is repeated in it as written. Cut only well past the list of the
        // keys the file may hold, which follows that key.
        let message = app::text::shown_up_to(e.message().trim_end(), 1_000);
        match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before
                    .rsplit('\n')
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .count()
                    + 1;
                // The key of that line, without its value.
                let key = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|line| line.split_once('='))
                    .map(|(key, _)| format!(" (`{} = …`)", app::text::shown_text(key.trim())))
                    .unwrap_or_default();
                format!("TOML parse error at line {line}, column {column}{key}: {message}")
            }
            None => format!("TOML parse error: {message}"),
        }
    })
}

/// Refuses `text`, the value of `key` (a database URL, a folder), when it
/// holds a character that does not show as itself (a line break, a tab, a
/// terminal's escape, a direction override), written as it is or, in a URL
/// (`url`), percent-encoded: it would become part of a file's or a database's
/// name, and print as something else in every message naming it.
fn check_visible(key: &str, text: &str, url: bool) -> Result<(), ConfigError> {
    let decoded = url.then(|| percent_encoding::percent_decode_str(text).decode_utf8_lossy());
    let hidden = text
        .chars()
        .chain(decoded.iter().flat_map(|decoded| decoded.chars()))
        .find(|c| crate::cli::is_hidden(*c));
    match hidden {
        None => Ok(()),
        Some(hidden) => Err(invalid(
            key,
            format!(
                "holds {}, a character that does not show as itself (a line break, a \
                 tab, a terminal's escape){}: write visible characters only",
                quoted(&hidden.to_string()),
                if url {
                    ", as it is or percent-encoded"
                } else {
                    ""
                }
            ),
        )),
    }
}

/// An amount (EUR) or a price (EUR per 1M tokens) as the file writes it, exactly.
///
/// Errors: [`ConfigError`] naming `key` for a sign, anything but digits and one
/// point, or more digits than a `Decimal` keeps without rounding.
fn decimal(key: &str, text: &str) -> Result<Decimal, ConfigError> {
    // Written out as the CLI and the tab take it: digits with at most one
    // point. rust_decimal's `FromStr` would also take an exponent ("1e3" =
    // 1000) and underscores ("1_000"), and a space around it would be a typo
    // the file keeps: refused, not guessed.
    let not_plain = || {
        invalid(
            key,
            format!(
                "{} is not a decimal number like \"12.50\" \
                 (digits and one point; no spaces, underscores or exponent)",
                quoted(text)
            ),
        )
    };
    // Amounts and prices are never negative; "-0" is refused with the rest, as
    // the CLI and the tab refuse any minus sign.
    if text.starts_with('-') {
        return Err(invalid(
            key,
            format!(
                "{} is negative: amounts and prices must not be negative",
                quoted(text)
            ),
        ));
    }
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1;
    if !plain {
        return Err(not_plain());
    }
    let value = text.parse::<Decimal>().map_err(|_| {
        if text.bytes().any(|b| b.is_ascii_digit()) {
            // Plain digits that do not parse are past what a `Decimal` holds.
            invalid(
                key,
                format!(
                    "{} is too large: at most {} can be kept",
                    quoted(text),
                    Decimal::MAX
                ),
            )
        } else {
            not_plain()
        }
    })?;
    // rust_decimal rounds digits past what it holds (28 to 29 in all) rather
    // than refuse them: a value it rounded is refused, not changed (R2).
    let written_scale = text
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.trim_end_matches('0').len());
    if usize::try_from(value.normalize().scale()).ok() != Some(written_scale) {
        return Err(invalid(
            key,
            format!(
                "{} has more digits than are kept exactly (28 digits at most): \
                 it would be rounded",
                quoted(text)
            ),
        ));
    }
    Ok(value)
}

/// A timeout key's value in seconds: `default` when absent, else 1 to an hour.
fn timeout_secs(key: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    let seconds = value.unwrap_or(default);
    if (1..=MAX_TIMEOUT_SECS).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(invalid(
            key,
            format!("must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECS}"),
        ))
    }
}

fn plan_amount(key: &str, text: &str) -> Result<app::domain::Nanos, ConfigError> {
    let value = decimal(key, text)?;
    if value > Decimal::from(MAX_PLAN_EUR) {
        return Err(invalid(key, format!("must not exceed {MAX_PLAN_EUR} EUR")));
    }
    if value.normalize().scale() > 9 {
        return Err(invalid(
            key,
            "has more than 9 decimals (nano-euros are the smallest unit)",
        ));
    }
    Money::new(value)
        .to_nanos_rounded()
        .map_err(|e| invalid(key, e.to_string()))
}

fn price(key: &str, text: &str) -> Result<PricePerMTok, ConfigError> {
    let value = decimal(key, text)?;
    if value > Decimal::from(1_000_000) {
        return Err(invalid(key, "must not exceed 1000000 EUR per 1M tokens"));
    }
    PricePerMTok::new(value).map_err(|e| invalid(key, e.to_string()))
}

fn validate_upstreams(upstreams: Vec<UpstreamSection>) -> Result<Vec<Upstream>, ConfigError> {
    let mut out: Vec<Upstream> = Vec::with_capacity(upstreams.len());
    for (i, u) in upstreams.into_iter().enumerate() {
        if u.name.trim().is_empty() {
            return Err(invalid(format!("upstreams[{i}].name"), "must not be empty"));
        }
        if out.iter().any(|o| o.name == u.name) {
            return Err(invalid(
                format!("upstreams[{i}].name"),
                format!("{} is declared twice", quoted(&u.name)),
            ));
        }
        let chat_completions_url = chat_completions_url(&u.base_url)
            .map_err(|problem| invalid(format!("upstreams[{i}].base_url"), problem))?;
        // A name no shell can set (empty, `MOCK_KEY ` with its space) would
        // leave the upstream keyless, with a warning about a variable nobody
        // set: names are letters, digits and `_`, not starting with a digit.
        if let Some(var) = &u.api_key_env {
            let portable = var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && var.chars().next().is_some_and(|c| !c.is_ascii_digit());
            if !portable {
                return Err(invalid(
                    format!("upstreams[{i}].api_key_env"),
                    format!(
                        "{} is not an environment variable's name (letters, digits and \
                         `_`, not starting with a digit): name the one that holds the key \
                         (OPENAI_API_KEY), or leave the key out for an upstream that takes none",
                        quoted(var)
                    ),
                ));
            }
        }
        let timeout_secs = u.timeout_secs.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS);
        if !(1..=86_400).contains(&timeout_secs) {
            return Err(invalid(
                format!("upstreams[{i}].timeout_secs"),
                "must be between 1 and 86400 seconds",
            ));
        }
        let base_url = u.base_url.trim_end_matches('/').to_owned();
        out.push(Upstream {
            name: u.name,
            base_url,
            chat_completions_url,
            api_key_env: u.api_key_env,
            timeout: std::time::Duration::from_secs(timeout_secs),
        });
    }
    Ok(out)
}

/// Where an upstream's chat completions go: its `base_url` with
/// `/chat/completions` added to the path, and the query (Azure's
/// `api-version`) kept after it.
///
/// Errors: the problem, for the message naming `upstreams[i].base_url`: not
/// an http(s) URL, credentials in it (they would be sent as Basic auth in
/// place of the key, and sit in the file), or a fragment (never sent to the
/// provider, it would swallow the path). The URL itself is never echoed: one
/// that does not parse may still hold a password.
fn chat_completions_url(base_url: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(base_url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not hold credentials (`user:password@`): the upstream's key comes \
                    from the environment variable named by `api_key_env`"
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err("must not have a fragment (`#…`): it is never sent to the provider".into());
    }
    let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

/// True for the characters [`is_hidden`](crate::cli::is_hidden) finds that a
/// display name may still hold: the joiners, variation selectors and emoji
/// tags (U+200C, U+200D, U+FE00 to U+FE0F, U+E0020 to U+E007F, U+E0100 to
/// U+E01EF), which emoji (`👩‍💻`, `❤️`, a flag) and several scripts (Persian,
/// Devanagari) need.
fn shapes_its_neighbours(c: char) -> bool {
    matches!(
        c,
        '\u{200C}' | '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0020}'..='\u{E007F}' | '\u{E0100}'..='\u{E01EF}'
    )
}

/// Why `name` (a model's display name, the workspace's name) cannot be shown on
/// one line of the tab, of `tollgate spend` or of `tollgate audit`, if it
/// cannot, each with its own message: it is empty; holds a line break, a tab or
/// another control character; a character that reorders the text after it
/// ([`app::domain::reorders_text`]); a space other than U+0020; or one drawn as
/// nothing or as a blank ([`is_hidden`](crate::cli::is_hidden)) other than
/// those emoji and scripts need ([`shapes_its_neighbours`]); has spaces at an
/// end or several in a row (which HTML shows as one or none); or is longer than
/// [`MAX_SHOWN_NAME_CHARS`] characters, counted in its composed form (NFC), so
/// an accent typed as a separate mark counts once with its letter.
fn check_visible_line(name: &str) -> Result<(), String> {
    use unicode_normalization::UnicodeNormalization;
    if name.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    /// A kind of character refused: what it is, what the message adds in the
    /// parentheses after its code point, and after them.
    struct Refused {
        test: fn(char) -> bool,
        what: &'static str,
        detail: &'static str,
        after: &'static str,
    }
    let refused = [
        Refused {
            test: |c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'),
            what: "a line break, a tab or another control character",
            detail: "",
            after: ": it must fit on one line",
        },
        Refused {
            test: app::domain::reorders_text,
            what: "a direction override or another character that reorders the text after it",
            detail: "",
            after: "",
        },
        Refused {
            test: |c| c.is_whitespace() && c != ' ',
            what: "a space other than the plain one",
            detail: "",
            after: ", which prints like it: write plain spaces",
        },
        Refused {
            test: |c| crate::cli::is_hidden(c) && !shapes_its_neighbours(c),
            what: "a character drawn as nothing or as a blank",
            detail: ": a zero-width space, a soft hyphen, a Hangul filler, a private-use or \
                     unassigned character",
            after: ", which would make it print like another name",
        },
    ];
    for Refused {
        test,
        what,
        detail,
        after,
    } in refused
    {
        if let Some(c) = name.chars().find(|&c| test(c)) {
            return Err(format!(
                "{} holds {what} ({}{detail}){after}",
                quoted(name),
                app::text::code_point(c)
            ));
        }
    }
    // All that is left to refuse: joiners and selectors with nothing to join.
    if name.chars().all(|c| c == ' ' || shapes_its_neighbours(c)) {
        return Err(format!("{} shows nothing", quoted(name)));
    }
    if name.split_whitespace().collect::<Vec<_>>().join(" ") != name {
        return Err(format!(
            "{} has spaces at an end or several in a row, which a page shows as \
             one or none: write single spaces between words",
            quoted(name)
        ));
    }
    let chars = name.nfc().count();
    if chars > MAX_SHOWN_NAME_CHARS {
        return Err(format!(
            "{} is {chars} characters long; a display name or the workspace's name \
             has at most {MAX_SHOWN_NAME_CHARS}",
            quoted(name)
        ));
    }
    Ok(())
}

/// Most characters in a model's display name or the workspace's name: a
/// display name is shown whole on one line of the tab and of `tollgate spend`,
/// and both are in `tollgate audit`'s rows when they change.
const MAX_SHOWN_NAME_CHARS: usize = 100;

/// Why `name` cannot be a model's display name beside the models `earlier` in
/// the catalog, if it cannot: it cannot be shown on one line as it reads
/// ([`check_visible_line`]), or is
/// another model's or looks like it: the same skeleton (Unicode's UTS #39
/// confusable detection), which catches one text in two normal forms (NFC and
/// NFD) and letters of another script drawn alike (Cyrillic `Р` for Latin `P`).
fn check_display_name(name: &str, earlier: &[Model]) -> Result<(), String> {
    check_visible_line(name)?;
    // Compared without regard to case as well: `Small model` and `small model`
    // (or `Straße` and `STRASSE`, by Unicode's full case folding) name two
    // models that an administrator could not tell apart at a glance.
    let lower = name.to_lowercase();
    match earlier.iter().enumerate().find(|(_, other)| {
        crate::cli::looks_alike(&other.display_name, name)
            || crate::cli::looks_alike(&other.display_name.to_lowercase(), &lower)
            || unicase::UniCase::new(other.display_name.as_str()) == unicase::UniCase::new(name)
    }) {
        Some((j, other)) if other.display_name == name => Err(format!(
            "{} is already the display name of models[{j}]: the tab would show two \
             models alike",
            quoted(name)
        )),
        Some((j, other)) => Err(format!(
            "{} looks like {}, the display name of models[{j}]{}: the tab would show \
             two models alike",
            quoted(name),
            quoted(&other.display_name),
            first_difference(name, &other.display_name)
        )),
        None => Ok(()),
    }
}

/// Where two texts that print alike differ, for a message: ` (U+212A where
/// the other has U+004B)`, the one character of one drawn like the other's
/// in its place, read as typed or, if their lengths differ so, in composed
/// form (NFC: `é` typed two ways). Nothing when the texts are still
/// not of one length (a character added, as a joiner, or one standing for
/// two, as `ß` for `SS`, has no one place), differ in more than one place
/// (`Il` and `lI`), or only in the case of ASCII letters, which the message's
/// two names show.
fn first_difference(name: &str, other: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let (mut name, mut other): (Vec<char>, Vec<char>) =
        (name.chars().collect(), other.chars().collect());
    // As typed first: composing would make a Kelvin sign `K` and hide it.
    if name.len() != other.len() {
        (name, other) = (
            name.into_iter().nfc().collect(),
            other.into_iter().nfc().collect(),
        );
    }
    if name.len() != other.len() {
        return String::new();
    }
    let mut differences = name
        .iter()
        .zip(&other)
        .filter(|(a, b)| a != b && !a.eq_ignore_ascii_case(b));
    match (differences.next(), differences.next()) {
        (Some((a, b)), None) => format!(
            " ({} where the other has {})",
            app::text::code_point(*a),
            app::text::code_point(*b)
        ),
        _ => String::new(),
    }
}

fn build_catalog(
    models: Vec<ModelSection>,
    upstreams: &[Upstream],
) -> Result<Catalog, ConfigError> {
    let mut out = Vec::with_capacity(models.len());
    // Each model's id and aliases as written, to name the key of a name the
    // catalog refuses.
    let names: Vec<(String, Vec<String>)> = models
        .iter()
        .map(|m| (m.id.clone(), m.aliases.clone()))
        .collect();
    for (i, m) in models.into_iter().enumerate() {
        let key = |field: &str| format!("models[{i}].{field}");
        // Before the display name, which is the id when not given.
        if m.id.trim().is_empty() {
            return Err(invalid(key("id"), "must not be empty"));
        }
        if !upstreams.iter().any(|u| u.name == m.upstream) {
            return Err(invalid(
                key("upstream"),
                format!(
                    "{} is not the name of an [[upstreams]] entry",
                    quoted(&m.upstream)
                ),
            ));
        }
        let input = price(&key("input_eur_per_mtok"), &m.input_eur_per_mtok)?;
        let cached_input = match &m.cached_input_eur_per_mtok {
            Some(text) => price(&key("cached_input_eur_per_mtok"), text)?,
            None => input,
        };
        let output = price(&key("output_eur_per_mtok"), &m.output_eur_per_mtok)?;
        if cached_input > input {
            return Err(invalid(
                key("cached_input_eur_per_mtok"),
                format!(
                    "{} is more than input_eur_per_mtok ({}): a cached input token never \
                     costs more than an uncached one (R3)",
                    cached_input.eur_per_mtok(),
                    input.eur_per_mtok()
                ),
            ));
        }
        if m.max_output_tokens == 0 {
            return Err(invalid(
                key("max_output_tokens"),
                "must be at least 1: a model that may write no token cannot answer",
            ));
        }
        if let Some(name) = &m.upstream_model {
            if name.trim().is_empty() || name.trim() != name || name.chars().any(char::is_control) {
                return Err(invalid(
                    key("upstream_model"),
                    format!(
                        "{} is not a model's name at the provider (no spaces around it, no \
                         control characters): leave the key out to send the model's id",
                        quoted(name)
                    ),
                ));
            }
        }
        let display_name = m.display_name.unwrap_or_else(|| m.id.clone());
        check_display_name(&display_name, &out)
            .map_err(|problem| invalid(key("display_name"), problem))?;
        out.push(Model {
            id: ModelId::new(m.id.clone()),
            display_name,
            aliases: m.aliases,
            upstream: m.upstream,
            upstream_model: m.upstream_model.unwrap_or(m.id),
            prices: Prices {
                input,
                cached_input,
                output,
            },
            max_output_tokens: m.max_output_tokens,
        });
    }
    if out.is_empty() {
        return Err(invalid("models", "declare at least one model"));
    }
    let catalog =
        Catalog::new(out).map_err(|e| invalid(catalog_error_key(&e, &names), e.to_string()))?;
    check_names_apart(&names)?;
    Ok(catalog)
}

/// Refuses a model id or alias drawn like an earlier one of the catalog
/// (`names`: each model's id and aliases as written), by Unicode's confusable
/// detection (UTS #39 skeletons): `gрt-5` with a Cyrillic `р` beside `gpt-5`,
/// or `café` with its accent composed in one and a separate mark in the other.
/// A caller who copies the one from a listing would be served, and billed,
/// the other, or get a 404 it cannot explain. Two ASCII names are left alone:
/// their letters are the ones a caller types (`model-l` and `model-1` are two
/// ids any font tells apart in the text a client sends), and so are one
/// model's own names (an alias `cafe\u{301}` of the model `café` names it in
/// either form). Run after [`Catalog::new`], so equal names get its message.
fn check_names_apart(names: &[(String, Vec<String>)]) -> Result<(), ConfigError> {
    // (model index, key, name, skeleton)
    let mut seen: Vec<(usize, String, &str, String)> = Vec::new();
    for (i, (id, aliases)) in names.iter().enumerate() {
        let keyed = std::iter::once((format!("models[{i}].id"), id)).chain(
            aliases
                .iter()
                .enumerate()
                .map(|(j, alias)| (format!("models[{i}].aliases[{j}]"), alias)),
        );
        for (key, name) in keyed {
            let skeleton: String = unicode_security::skeleton(name).collect();
            let twin = seen.iter().find(|(model, _, other, other_skeleton)| {
                *model != i && !(name.is_ascii() && other.is_ascii()) && *other_skeleton == skeleton
            });
            if let Some((_, other_key, other, _)) = twin {
                return Err(invalid(
                    key,
                    format!(
                        "{} looks like {}, {other_key}: a caller could not tell which \
                         model it names",
                        quoted(name),
                        quoted(other)
                    ),
                ));
            }
            seen.push((i, key, name, skeleton));
        }
    }
    Ok(())
}

/// The key of the id or alias a catalog error is about (`models[i].id`,
/// `models[i].aliases[j]`), given each model's id and aliases as written: its
/// last use, so that of two equal names the second is named, and of an alias
/// that is also an id the alias. `models` for an error about no one name.
fn catalog_error_key(error: &CatalogError, names: &[(String, Vec<String>)]) -> String {
    let (name, alias_only) = match error {
        CatalogError::UnwritableName(name)
        | CatalogError::NameTooLong(name)
        | CatalogError::DuplicateId(name) => (name.as_str(), false),
        CatalogError::DuplicateAlias(name) | CatalogError::AliasIsModelId { alias: name, .. } => {
            (name.as_str(), true)
        }
        CatalogError::EmptyAlias { .. } => ("", true),
        _ => return "models".into(),
    };
    let is_it = |text: &str| match name {
        "" => text.trim().is_empty(),
        name => text == name,
    };
    let mut key = None;
    for (i, (id, aliases)) in names.iter().enumerate() {
        if !alias_only && is_it(id) {
            key = Some(format!("models[{i}].id"));
        }
        for (j, alias) in aliases.iter().enumerate() {
            if is_it(alias) {
                key = Some(format!("models[{i}].aliases[{j}]"));
            }
        }
    }
    key.unwrap_or_else(|| "models".into())
}

/// The embedded demo catalog: list prices of late 2026 (USD per 1M tokens)
/// converted at the default rate of 0.86 EUR per USD, set on 2026-11-29. Operators
/// override it with their own `[[models]]`; every usage event keeps the price it
/// was charged at (R3).
fn demo_catalog() -> (Vec<UpstreamSection>, Vec<ModelSection>) {
    let upstream = |name: &str, base_url: &str, env: &str| UpstreamSection {
        name: name.into(),
        base_url: base_url.into(),
        api_key_env: Some(env.into()),
        timeout_secs: None,
    };
    let upstreams = vec![
        upstream("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        upstream(
            "anthropic",
            "https://api.anthropic.com/v1",
            "ANTHROPIC_API_KEY",
        ),
        upstream(
            "google",
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "GEMINI_API_KEY",
        ),
        upstream("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    ];
    // (id, display name, upstream, USD input, cached input, output, max output tokens)
    const USD: [(&str, &str, &str, &str, &str, &str, u32); 16] = [
        (
            "claude-opus-4-5",
            "Claude Opus 4.5",
            "anthropic",
            "5.00",
            "0.50",
            "25.00",
            64_000,
        ),
        (
            "claude-sonnet-4-5",
            "Claude Sonnet 4.5",
            "anthropic",
            "3.00",
            "0.30",
            "15.00",
            64_000,
        ),
        (
            "claude-haiku-4-5",
            "Claude Haiku 4.5",
            "anthropic",
            "1.00",
            "0.10",
            "5.00",
            64_000,
        ),
        (
            "gpt-5.4", "GPT-5.4", "openai", "2.50", "0.25", "15.00", 128_000,
        ),
        (
            "gpt-4o", "GPT-4o", "openai", "2.50", "1.25", "10.00", 16_384,
        ),
        (
            "gpt-5", "GPT-5", "openai", "1.25", "0.125", "10.00", 128_000,
        ),
        (
            "gemini-2.5-pro",
            "Gemini 2.5 Pro",
            "google",
            "1.25",
            "0.125",
            "10.00",
            65_536,
        ),
        (
            "mistral-medium-latest",
            "Mistral Medium",
            "mistral",
            "1.50",
            "0.15",
            "7.50",
            262_144,
        ),
        (
            "gpt-5.4-mini",
            "GPT-5.4 Mini",
            "openai",
            "0.75",
            "0.075",
            "4.50",
            128_000,
        ),
        (
            "gemini-2.5-flash",
            "Gemini 2.5 Flash",
            "google",
            "0.30",
            "0.03",
            "2.50",
            65_536,
        ),
        (
            "gpt-5-mini",
            "GPT-5 Mini",
            "openai",
            "0.25",
            "0.025",
            "2.00",
            128_000,
        ),
        (
            "mistral-large-latest",
            "Mistral Large",
            "mistral",
            "0.50",
            "0.05",
            "1.50",
            262_144,
        ),
        (
            "gpt-5.4-nano",
            "GPT-5.4 Nano",
            "openai",
            "0.20",
            "0.02",
            "1.25",
            128_000,
        ),
        (
            "gpt-4o-mini",
            "GPT-4o Mini",
            "openai",
            "0.15",
            "0.075",
            "0.60",
            16_384,
        ),
        (
            "mistral-small-latest",
            "Mistral Small",
            "mistral",
            "0.15",
            "0.015",
            "0.60",
            262_144,
        ),
        (
            "gpt-5-nano",
            "GPT-5 Nano",
            "openai",
            "0.05",
            "0.005",
            "0.40",
            128_000,
        ),
    ];
    let rate = Decimal::new(86, 2);
    let eur = |usd: &str| {
        let usd: Decimal = usd.parse().unwrap_or_default();
        (usd * rate).normalize().to_string()
    };
    let models = USD
        .iter()
        .map(
            |(id, name, upstream, input, cached, output, max)| ModelSection {
                id: (*id).into(),
                display_name: Some((*name).into()),
                upstream: (*upstream).into(),
                upstream_model: None,
                aliases: vec![format!("{upstream}/{id}")],
                input_eur_per_mtok: eur(input),
                cached_input_eur_per_mtok: Some(eur(cached)),
                output_eur_per_mtok: eur(output),
                max_output_tokens: *max,
            },
        )
        .collect();
    (upstreams, models)
}

/// `text` as a socket address: an IP address and port, or a host name and port
/// that resolves (`localhost:8080`), taking its first address.
fn listen_address(text: &str) -> Option<SocketAddr> {
    if let Ok(address) = text.parse() {
        return Some(address);
    }
    std::net::ToSocketAddrs::to_socket_addrs(text).ok()?.next()
}

/// A documented example config, printed by `tollgate config example`; it parses
/// to a valid configuration (tested).
pub const EXAMPLE: &str = include_str!("../tollgate.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let file = parse_file(text).map_err(|message| ConfigError::Parse {
            path: "test.toml".into(),
            message,
        })?;
        Config::from_file(file, &Overrides::default())
    }

    /// An unknown key is repeated escaped, with the keys the file may hold;
    /// one pasted by mistake is cut.
    #[test]
    fn an_unknown_key_is_named_escaped_with_the_keys_known() {
        let err = load_text("\"bogus\\u001b[31m\\nkey\\u202e\" = 1\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains(['\u{1b}', '\n', '\u{202e}']), "{err:?}");
        assert!(err.contains("bogus\\u{1b}[31m\\u{a}key\\u{202e}"), "{err}");
        assert!(err.contains("settlement_spool"), "the known keys: {err}");
        let long = format!("\"{}\" = 1\n", "k".repeat(3_000));
        let err = load_text(&long).unwrap_err().to_string();
        assert!(err.len() < 1_300, "{} bytes", err.len());
        assert!(err.contains('…'), "{err}");
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_by_line_without_quoting_it() {
        for text in [
            "[[upstreams]]\nname = \"u\"\nbase_url = [\"http://user:s3cret@127.0.0.1:9/v1\"]\n",
            "database_url = \"postgres://tollgate:s3cret@db/tollgate\" trailing\n",
        ] {
            let err = load_text(text).unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
    }

    #[test]
    fn the_example_is_valid_and_matches_the_design() {
        let config = load_text(EXAMPLE).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.setup.plan.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(config.setup.plan.amounts.budget.get(), 500_000_000_000);
        assert_eq!(config.setup.plan.amounts.overage.get(), 100_000_000_000);
        let gpt5 = config.setup.catalog.resolve("openai/gpt-5").unwrap();
        assert_eq!(gpt5.id.as_str(), "gpt-5");
        assert_eq!(gpt5.prices.output.eur_per_mtok(), Decimal::new(860, 2));
    }

    #[test]
    fn the_default_has_the_seed_models() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        for id in [
            "claude-sonnet-4-5",
            "gpt-4o",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.4-mini",
        ] {
            assert!(config.setup.catalog.resolve(id).is_some(), "{id} missing");
        }
        // 10.00 USD at 0.86 EUR/USD.
        let gpt5 = config.setup.catalog.resolve("gpt-5").unwrap();
        assert_eq!(gpt5.prices.output.eur_per_mtok(), Decimal::new(86, 1));
        assert_eq!(config.database_url, DEFAULT_DATABASE_URL);
    }

    /// A long wrong value is quoted by its start only, so that the message of
    /// a value pasted by mistake still fits a terminal's line or two.
    #[test]
    fn a_long_value_is_quoted_cut() {
        let long = format!("Europe/{}", "x".repeat(5_000));
        for (key, text) in [
            (
                "workspace.timezone",
                format!("[workspace]\ntimezone = \"{long}\"\n"),
            ),
            ("plan.start", format!("[plan]\nstart = \"{long}\"\n")),
            (
                "plan.budget_eur",
                format!("[plan]\nbudget_eur = \"{long}\"\n"),
            ),
        ] {
            let err = load_text(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            let start: String = long.chars().take(64).collect();
            assert!(err.contains(&format!("\"{start}\"…")), "{key}: {err}");
            assert!(err.len() < 300, "{key}: {} bytes", err.len());
        }
    }

    #[test]
    fn a_host_name_listens_on_its_address() {
        let config = load_text("listen = \"localhost:8080\"").unwrap();
        assert!(config.listen.ip().is_loopback(), "{}", config.listen);
        assert_eq!(config.listen.port(), 8080);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = load_text("listen = \"127.0.0.1:1\"\nbudget = 5\n").unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
        let err = load_text("[plan]\nbudget_eur = \"1\"\nstrat = \"2026-01-01\"\n").unwrap_err();
        assert!(err.to_string().contains("strat"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key_and_the_problem() {
        let model = |fields: &str| {
            format!(
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\n{fields}\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\n\
                 max_output_tokens = 1"
            )
        };
        let long_workspace = format!("[workspace]\nname = \"{}\"", "W".repeat(101));
        let long_display_name = model(&format!(
            "display_name = \"{}\"",
            "Model ".repeat(20).trim_end()
        ));
        let long_alias = model(&format!("aliases = [\"{}\"]", "a".repeat(201)));
        let cases: [(&str, &str, &str); _] = [
            ("[plan]\nbudget_eur = \"-1\"", "plan.budget_eur", "negative"),
            ("[plan]\nbudget_eur = \"-0\"", "plan.budget_eur", "negative"),
            ("[plan]\noverage_eur = \"-0.00\"", "plan.overage_eur", "negative"),
            ("[plan]\nbudget_eur = \"abc\"", "plan.budget_eur", "decimal"),
            ("[plan]\nbudget_eur = \"1_000\"", "plan.budget_eur", "underscores"),
            ("[plan]\nbudget_eur = \" 1.00\"", "plan.budget_eur", "no spaces"),
            ("[plan]\nbudget_eur = \"1.00 \"", "plan.budget_eur", "no spaces"),
            ("[plan]\nbudget_eur = \"+1.00\"", "plan.budget_eur", "decimal"),
            ("[plan]\nbudget_eur = \"1.0.0\"", "plan.budget_eur", "one point"),
            ("[plan]\nbudget_eur = \"\"", "plan.budget_eur", "decimal"),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"8.60000000000000000000000000000000001\"\n\
                 max_output_tokens = 1",
                "models[0].output_eur_per_mtok",
                "28 digits",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"0.1999999999999999999999999999999\"\n\
                 output_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].input_eur_per_mtok",
                "28 digits",
            ),
            (
                "[plan]\noverage_eur = \"1e3\"",
                "plan.overage_eur",
                "decimal",
            ),
            (
                "[plan]\nbudget_eur = \"100000000000000000000000000000\"",
                "plan.budget_eur",
                "is too large: at most 79228162514264337593543950335",
            ),
            ("[plan]\nbudget_eur = \".\"", "plan.budget_eur", "not a decimal number"),
            ("[plan]\nstart = \"2026-02-30\"", "plan.start", "date"),
            ("[plan]\nstart = 2026-01-31T10:00:00", "plan.start", "date"),
            ("[plan]\nstart = 20260131", "plan.start", "TOML integer"),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "upstreams[0].api_key_env",
                "environment variable",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"MOCK_KEY \"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "upstreams[0].api_key_env",
                "\"MOCK_KEY \" is not an environment variable's name",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"1\"\n\
                 cached_input_eur_per_mtok = \"1.5\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].cached_input_eur_per_mtok",
                "1.5 is more than input_eur_per_mtok (1)",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"-0\"\n\
                 output_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].input_eur_per_mtok",
                "negative",
            ),
            (
                "[workspace]\nname = \"W\\nX\\u202eY\\u0007\"",
                "workspace.name",
                "holds a line break, a tab or another control character (U+000A)",
            ),
            (
                "[workspace]\nname = \" Acme\"",
                "workspace.name",
                "\" Acme\" has spaces at an end or several in a row",
            ),
            (
                "[workspace]\nname = \"Acme  GmbH\"",
                "workspace.name",
                "several in a row",
            ),
            (
                &long_workspace,
                "workspace.name",
                "is 101 characters long; a display name or the workspace's name has at most 100",
            ),
            (
                &long_display_name,
                "models[0].display_name",
                "is 119 characters long",
            ),
            (
                &long_alias,
                "models[0].aliases[0]",
                "a model name is 201 characters long; an id or alias has at most 200",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\ndisplay_name = \"A\\u202eB\\nC\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].display_name",
                "holds a line break, a tab or another control character (U+000A)",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"1\"\nmax_output_tokens = 0",
                "models[0].max_output_tokens",
                "must be at least 1",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\nupstream_model = \"\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].upstream_model",
                "leave the key out",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"u\"\nupstream_model = \" gpt-5\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].upstream_model",
                "no spaces around it",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\ndisplay_name = \"GPT  5\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].display_name",
                "several in a row",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\ndisplay_name = \" \"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1",
                "models[0].display_name",
                "must not be empty",
            ),
            (
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\ndisplay_name = \"Model\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1\n\
                 [[models]]\nid = \"n\"\ndisplay_name = \"Model\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"2\"\noutput_eur_per_mtok = \"2\"\nmax_output_tokens = 1",
                "models[1].display_name",
                "already the display name of models[0]",
            ),
            (
                "[workspace]\ntimezone = \"Mars/Olympus\"",
                "workspace.timezone",
                "IANA",
            ),
            ("listen = \"localhost\"", "listen", "address"),
            (
                "listen = \"no-such-host.invalid:80\"",
                "listen",
                "host name",
            ),
            (
                "database_url = \"sqlite://\"",
                "database_url",
                "names no file",
            ),
            (
                "database_url = \"sqlite:///?mode=rwc\"",
                "database_url",
                "names no file",
            ),
            (
                "database_url = \"sqlite::memory:\"",
                "database_url",
                "in-memory",
            ),
            (
                "database_url = \"sqlite://:memory:\"",
                "database_url",
                "in-memory",
            ),
            (
                "database_url = \"sqlite://books.db?mode=memory&cache=shared\"",
                "database_url",
                "in-memory",
            ),
            (
                "database_url = \"sqlite://file:books.db\"",
                "database_url",
                "SQLite's URI form",
            ),
            (
                "database_url = \"sqlite://books.db#frag\"",
                "database_url",
                "holds a #",
            ),
            (
                "database_url = \"sqlite://books.db?mode=ro\"",
                "database_url",
                "read-only (mode=ro)",
            ),
            (
                "database_url = \"sqlite:///tmp/x/\\nbooks\\u001b[2J.db\"",
                "database_url",
                "holds \"\\n\", a character that does not show as itself",
            ),
            (
                "database_url = \"postgres://db/books\\t\"",
                "database_url",
                "holds \"\\t\"",
            ),
            (
                "database_url = \"postgres://db/x%0a%1b\"",
                "database_url",
                "holds \"\\n\"",
            ),
            (
                "settlement_spool = \"/tmp/sp\\nool\\u001b[31m\"",
                "settlement_spool",
                "holds \"\\n\"",
            ),
            (
                "database_url = \"sqlite://books.db?immutable=1\"",
                "database_url",
                "read-only (immutable)",
            ),
            ("database_url = \"mysql://x\"", "database_url", "sqlite://"),
            ("sqlite_synchronous = \"off\"", "sqlite_synchronous", "full"),
            (
                "request_body_timeout_secs = 0",
                "request_body_timeout_secs",
                "from 1 to 3600",
            ),
            (
                "request_body_timeout_secs = 3601",
                "request_body_timeout_secs",
                "from 1 to 3600",
            ),
            (
                "request_body_timeout_secs = -5",
                "request_body_timeout_secs",
                "invalid value",
            ),
            (
                "header_read_timeout_secs = 0",
                "header_read_timeout_secs",
                "from 1 to 3600",
            ),
            (
                "response_write_timeout_secs = 3601",
                "response_write_timeout_secs",
                "from 1 to 3600",
            ),
            (
                "header_read_timeout_secs = \"30\"",
                "header_read_timeout_secs",
                "invalid type",
            ),
        ];
        for (text, key, problem) in cases {
            let err = load_text(text).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(problem),
                "{text:?} gave {err}"
            );
        }
        // Money must be a string: a float in the file is refused, not rounded.
        let err = load_text("[plan]\nbudget_eur = 500.5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("budget_eur"), "{err}");
    }

    #[test]
    fn plan_start_is_a_string_or_a_toml_date() {
        for text in [
            "[plan]\nstart = \"2026-01-31\"",
            "[plan]\nstart = 2026-01-31",
        ] {
            let config = load_text(text).unwrap();
            assert_eq!(
                config.setup.plan.start,
                NaiveDate::from_ymd_opt(2026, 1, 31).unwrap(),
                "{text}"
            );
        }
    }

    /// A config of one upstream and one model per display name of `names`.
    fn catalog_of(names: &[&str]) -> String {
        let mut text =
            "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n".to_owned();
        for (i, name) in names.iter().enumerate() {
            text += &format!(
                "[[models]]\nid = \"m{i}\"\ndisplay_name = \"{name}\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"{i}\"\noutput_eur_per_mtok = \"{i}\"\n\
                 max_output_tokens = 1\n"
            );
        }
        text
    }

    #[test]
    fn display_names_that_look_alike_are_refused() {
        for (first, second) in [
            // One text in its composed (NFC) and decomposed (NFD) forms.
            ("Caf\u{e9} Pro", "Cafe\u{301} Pro"),
            // A Cyrillic Er and Te among Latin letters.
            ("GPT 5", "G\u{420}\u{422} 5"),
            // A capital I for a small L.
            ("Claude", "CIaude"),
            // The same words in other case.
            ("Small Model", "small model"),
            ("GPT-5 Mini", "gpt-5 MINI"),
            ("Stra\u{df}e", "STRASSE"),
        ] {
            let err = load_text(&catalog_of(&[first, second]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("models[1].display_name") && err.contains("looks like"),
                "{second:?} after {first:?} gave {err}"
            );
        }
    }

    #[test]
    fn model_ids_and_aliases_that_look_alike_are_refused() {
        let model = |i: usize, id: &str, aliases: &str| {
            format!(
                "[[models]]\nid = \"{id}\"\ndisplay_name = \"M{i}\"\naliases = [{aliases}]\n\
                 upstream = \"u\"\ninput_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\n\
                 max_output_tokens = 1\n"
            )
        };
        let upstream = "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n";
        for (models, key) in [
            // A Cyrillic Er for a Latin p, in an id.
            (
                [model(0, "gpt-5", ""), model(1, "g\u{440}t-5", "")],
                "models[1].id",
            ),
            // One text composed (NFC) and decomposed (NFD), in an alias.
            (
                [
                    model(0, "m0", "\"caf\u{e9}\""),
                    model(1, "m1", "\"cafe\u{301}\""),
                ],
                "models[1].aliases[0]",
            ),
            // An alias drawn like another model's id.
            (
                [model(0, "claude", ""), model(1, "m1", "\"c\u{406}aude\"")],
                "models[1].aliases[0]",
            ),
        ] {
            let err = load_text(&format!("{upstream}{}{}", models[0], models[1]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("looks like") && err.contains("models[0]."),
                "{models:?}: {err}"
            );
        }
        // One model's names may look alike: they name the same model.
        let config = load_text(&format!(
            "{upstream}{}",
            model(0, "caf\u{e9}", "\"cafe\u{301}\"")
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.setup.catalog.models().len(), 1);
        // ASCII names that differ are two names, however close their skeletons.
        let config = load_text(&format!(
            "{upstream}{}{}",
            model(0, "model-l", "\"rn\""),
            model(1, "model-1", "\"m\"")
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.setup.catalog.models().len(), 2);
    }

    #[test]
    fn display_names_of_real_catalogs_are_told_apart() {
        let names = [
            "GPT-4o",
            "GPT-4o mini",
            "GPT-4.1",
            "GPT-4.1 mini",
            "GPT-5",
            "o1",
            "o3",
            "o3 mini",
            "o4-mini",
            "Claude Opus 4.1",
            "Claude Sonnet 4.5",
            "Claude Haiku 4.5",
            "Mistral Large",
            "Mistral Small",
            "Llama 3.1 70B",
            "Llama 3.1 8B",
            "Gemini 2.5 Pro",
            "Gemini 2.5 Flash",
        ];
        let config = load_text(&catalog_of(&names)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.setup.catalog.models().len(), names.len());
    }

    #[test]
    fn names_that_would_not_print_as_they_read_are_refused_each_with_its_reason() {
        let workspace = |name: &str| load_text(&format!("[workspace]\nname = \"{name}\""));
        for (name, says) in [
            (
                "Acme\\u00a0GmbH",
                "holds a space other than the plain one (U+00A0)",
            ),
            (
                "Small\\u3164Model",
                "holds a character drawn as nothing or as a blank (U+3164",
            ),
            ("Small\\ue000", "drawn as nothing or as a blank (U+E000"),
            ("Ac\\u00adme", "drawn as nothing or as a blank (U+00AD"),
            ("Ac\\u200bme", "drawn as nothing or as a blank (U+200B"),
            ("Acme\\u202e", "reorders the text after it (U+202E)"),
            ("\\u200d", "shows nothing"),
        ] {
            let err = workspace(name).unwrap_err().to_string();
            assert!(
                err.contains("workspace.name") && err.contains(says),
                "{name}: {err}"
            );
        }
        // Counted as the text reads: an accent typed as a separate mark counts
        // once with its letter.
        let decomposed = |n: usize| "e\\u0301".repeat(n);
        assert!(workspace(&decomposed(100)).is_ok());
        let err = workspace(&decomposed(101)).unwrap_err().to_string();
        assert!(err.contains("is 101 characters long"), "{err}");
        // Two display names that print alike: the message says where they differ.
        let err = load_text(&catalog_of(&["K Model", "\u{212a} Model"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models[1].display_name")
                && err.contains("(U+212A where the other has U+004B)"),
            "{err}"
        );
        // Compared composed: one accent typed two ways is no difference.
        let err = load_text(&catalog_of(&["Cafe\u{301} l", "Caf\u{e9} I"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("(U+0049 where the other has U+006C)"), "{err}");
        // No one place: a letter standing for two, a case change only, or
        // two places.
        for names in [
            ["Stra\u{df}e", "STRASSE"],
            ["Small Model", "small model"],
            ["Il", "lI"],
        ] {
            let err = load_text(&catalog_of(&names)).unwrap_err().to_string();
            assert!(
                err.contains("looks like") && !err.contains("where the other has"),
                "{names:?}: {err}"
            );
        }
    }

    #[test]
    fn display_names_in_any_script_and_with_emoji_are_accepted() {
        for name in [
            "❤️ Love",
            "👩‍💻 Coder",
            "🏳️‍🌈 Pride",
            "می‌خواهم",
            "क्‍ष",
            "漢字モデル",
            "Ünö Café",
            // A flag made of emoji tags.
            "\u{1f3f4}\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f} Scots",
        ] {
            let text = format!(
                "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n\
                 [[models]]\nid = \"m\"\ndisplay_name = \"{name}\"\nupstream = \"u\"\n\
                 input_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\nmax_output_tokens = 1"
            );
            let config = load_text(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.setup.catalog.models()[0].display_name, name);
        }
    }

    #[test]
    fn models_must_name_a_declared_upstream() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\n\
                    [[models]]\nid = \"m\"\nupstream = \"b\"\ninput_eur_per_mtok = \"1\"\n\
                    output_eur_per_mtok = \"2\"\nmax_output_tokens = 10\n";
        let err = load_text(text).unwrap_err().to_string();
        assert!(err.contains("models[0].upstream"), "{err}");
    }

    #[test]
    fn an_upstreams_base_url_keeps_its_query_and_refuses_credentials_and_fragments() {
        let text = |base_url: &str| {
            format!(
                "[[upstreams]]\nname = \"a\"\nbase_url = \"{base_url}\"\n\
                 [[models]]\nid = \"m\"\nupstream = \"a\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"2\"\nmax_output_tokens = 10\n"
            )
        };
        let url = |base_url: &str| {
            load_text(&text(base_url)).unwrap().upstreams[0]
                .chat_completions_url
                .to_string()
        };
        assert_eq!(
            url("https://api.example.com/v1/"),
            "https://api.example.com/v1/chat/completions"
        );
        assert_eq!(
            url("http://127.0.0.1:9/openai/deployments/d1//?api-version=2024-10-21"),
            "http://127.0.0.1:9/openai/deployments/d1/chat/completions?api-version=2024-10-21",
            "the path is extended, the query kept after it"
        );
        for (base_url, problem) in [
            ("http://user:secret@127.0.0.1:9/v1", "credentials"),
            ("http://user@127.0.0.1:9/v1", "credentials"),
            ("http://127.0.0.1:9/v1#part", "fragment"),
            // One that does not parse is not echoed either.
            ("http://user:secret@[::1/v1", "not a URL"),
        ] {
            let err = load_text(&text(base_url)).unwrap_err().to_string();
            assert!(err.contains("upstreams[0].base_url"), "{err}");
            assert!(err.contains(problem), "{err}");
            assert!(
                !err.contains("secret"),
                "the password is not repeated: {err}"
            );
        }
    }

    #[test]
    fn upstream_timeouts_default_and_are_bounded() {
        let text = |timeout: &str| {
            format!(
                "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\n{timeout}\n\
                 [[models]]\nid = \"m\"\nupstream = \"a\"\ninput_eur_per_mtok = \"1\"\n\
                 output_eur_per_mtok = \"2\"\nmax_output_tokens = 10\n"
            )
        };
        let default = load_text(&text("")).unwrap();
        assert_eq!(
            default.upstreams[0].timeout.as_secs(),
            DEFAULT_UPSTREAM_TIMEOUT_SECS
        );
        let set = load_text(&text("timeout_secs = 5")).unwrap();
        assert_eq!(set.upstreams[0].timeout.as_secs(), 5);
        let err = load_text(&text("timeout_secs = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstreams[0].timeout_secs"), "{err}");
    }

    #[test]
    fn the_settlement_spool_sits_beside_the_database_unless_named() {
        let spool = |text: &str| load_text(text).unwrap().settlement_spool;
        assert_eq!(spool(""), std::path::Path::new("tollgate.db-settlements"));
        assert_eq!(
            spool("database_url = \"sqlite:///var/lib/tollgate/books.db?mode=rwc\""),
            std::path::Path::new("/var/lib/tollgate/books.db-settlements")
        );
        assert_eq!(
            spool("database_url = \"postgres://tollgate@db/books\""),
            std::path::Path::new("tollgate-settlements")
        );
        assert_eq!(
            spool("settlement_spool = \"/srv/spool\""),
            std::path::Path::new("/srv/spool")
        );
        // Follows the database the environment names.
        let file = parse_file("").unwrap();
        let overridden = Config::from_file(
            file,
            &Overrides {
                listen: None,
                database_url: Some("sqlite://other.db".into()),
            },
        )
        .unwrap();
        assert_eq!(
            overridden.settlement_spool,
            std::path::Path::new("other.db-settlements")
        );
        let err = load_text("settlement_spool = \"~/spool\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`settlement_spool`") && err.contains("starts with ~"),
            "{err}"
        );
        // Not the database's own file, however written.
        for (url, spool) in [
            ("sqlite://tollgate.db", "tollgate.db"),
            ("sqlite://tollgate.db", "./tollgate.db"),
            ("sqlite:///srv/books.db", "/srv/books.db-wal"),
        ] {
            let err = load_text(&format!(
                "database_url = \"{url}\"\nsettlement_spool = \"{spool}\""
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("`settlement_spool`")
                    && err.contains("the SQLite database's own file"),
                "{spool}: {err}"
            );
        }
        let err = load_text("settlement_spool = \" \"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`settlement_spool`: names no folder"), "{err}");
    }

    #[test]
    fn a_sqlite_file_s_folder_must_be_a_folder_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let check = |file: &str| {
            let url = format!("sqlite://{}", dir.path().join(file).display());
            load_text(&format!("database_url = \"{url}\""))
                .unwrap()
                .check_sqlite_folder()
                .map_err(|e| e.to_string())
        };
        assert_eq!(check("books.db"), Ok(()));
        let missing = check("missing/books.db").unwrap_err();
        assert!(
            missing.contains("`database_url`") && missing.contains("missing does not exist"),
            "{missing}"
        );
        let file = check("plain/books.db").unwrap_err();
        assert!(
            file.contains("`database_url`") && file.contains("plain is a file, not a folder"),
            "{file}"
        );
        std::fs::create_dir(dir.path().join("books")).unwrap();
        let folder = check("books").unwrap_err();
        assert!(
            folder.contains("`database_url`")
                && folder.contains("books is a folder, not a database file"),
            "{folder}"
        );
        // `mode=rw` opens a file that exists and never makes one.
        assert_eq!(check("plain?mode=rw"), Ok(()));
        let absent = check("books.db?mode=rw").unwrap_err();
        assert!(
            absent.contains("`database_url`")
                && absent.contains("books.db does not exist, and mode=rw does not create it"),
            "{absent}"
        );
        // A long path is named by its start.
        let long = check(&format!("{}/books.db", "x".repeat(3_000))).unwrap_err();
        assert!(
            long.contains("…") && long.len() < 600,
            "{} bytes",
            long.len()
        );
        // PostgreSQL has no folder to check.
        let postgres = load_text("database_url = \"postgres://tollgate@db/books\"").unwrap();
        assert!(postgres.check_sqlite_folder().is_ok());
    }

    #[test]
    fn a_refused_model_name_is_named_by_its_key() {
        let model = |id: &str, display_name: &str, aliases: &str| {
            format!(
                "[[models]]\nid = \"{id}\"\ndisplay_name = \"{display_name}\"\nupstream = \"u\"\n\
                 aliases = [{aliases}]\ninput_eur_per_mtok = \"1\"\noutput_eur_per_mtok = \"1\"\n\
                 max_output_tokens = 1\n"
            )
        };
        let upstream = "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\n";
        for (models, key) in [
            (model("", "A", ""), "models[0].id"),
            (model(" ", "A", ""), "models[0].id"),
            (model("a b", "A", ""), "models[0].id"),
            (model("a", "A", "\"\""), "models[0].aliases[0]"),
            (model("a", "A", "\"x y\""), "models[0].aliases[0]"),
            (model("a", "A", "\"x\", \"a\""), "models[0].aliases[1]"),
            (
                model("a", "A", "") + &model("b", "B", "\"a\""),
                "models[1].aliases[0]",
            ),
            (model("a", "A", "") + &model("a", "B", ""), "models[1].id"),
            (
                model("a", "A", "\"x\"") + &model("b", "B", "\"x\""),
                "models[1].aliases[0]",
            ),
        ] {
            let err = load_text(&format!("{upstream}{models}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{models}: {err}");
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let file =
            parse_file("listen = \"127.0.0.1:1\"\ndatabase_url = \"sqlite://a.db\"").unwrap();
        let config = Config::from_file(
            file,
            &Overrides {
                listen: Some("127.0.0.1:2".into()),
                database_url: Some("postgres://x@y/z".into()),
            },
        )
        .unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.database_url, "postgres://x@y/z");
    }
}
