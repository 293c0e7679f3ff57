//! Server functions and the serialisable views they return. Each body is a few
//! lines: take what it needs from the context, call the store or a service, map
//! the result.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

/// What the app shell shows about the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceView {
    /// The organisation's name.
    pub name: String,
}

/// Read the workspace's name from the database through the `Store` port.
#[server(endpoint = "workspace")]
pub async fn workspace() -> Result<WorkspaceView, ServerFnError> {
    let store = expect_context::<crate::store::SharedStore>();
    let record = store
        .workspace()
        .await
        .map_err(|e| ServerFnError::new(e.to_string()))?;
    Ok(WorkspaceView { name: record.name })
}
