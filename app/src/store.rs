//! The `Store` port: everything the app needs from the database, as one
//! object-safe async trait shared as `Arc<dyn Store>` (STYLE.md, "Pick the backend
//! once"). The SQLite and PostgreSQL adapters live in `server/src/db/`.

use std::sync::Arc;

/// Errors every store operation can return.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row the caller named does not exist (HTTP 404).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, for the message (e.g. "workspace").
        what: &'static str,
    },
    /// The database failed or could not be reached (HTTP 500; the detail is logged,
    /// never shown).
    #[error("database error: {0}")]
    Database(String),
}

/// The workspace as the store keeps it (DESIGN.md §1: every row belongs to one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    /// Database id of the workspace.
    pub id: i64,
    /// The organisation's name, shown in the app shell.
    pub name: String,
}

/// The persistence port of Tollgate.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create the workspace on first start, or rename it to match the config.
    async fn ensure_workspace(&self, name: &str) -> Result<(), StoreError>;

    /// The workspace this deployment serves.
    ///
    /// Errors: [`StoreError::NotFound`] before the first start-up seeded it.
    async fn workspace(&self) -> Result<WorkspaceRecord, StoreError>;
}

/// The store as it is shared through axum state and the Leptos context.
pub type SharedStore = Arc<dyn Store>;
