//! The operator's configuration (DESIGN.md §7).

use std::net::SocketAddr;

/// Where the server listens when neither the config nor the environment says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The embedded default: one SQLite file in the working directory, created on
/// first start (DESIGN.md §6).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tollgate.db";
/// The workspace name of the embedded default.
pub const DEFAULT_WORKSPACE_NAME: &str = "Demo workspace";

/// Settings `serve` needs, after the file and the environment have been merged.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket address of the HTTP server.
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`; the scheme picks the backend.
    pub database_url: String,
    /// The workspace's display name.
    pub workspace_name: String,
}
