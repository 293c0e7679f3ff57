//! Tollgate's server as a library, so that the `tollgate` binary, the tests and
//! the benchmarks all build the same router over the same store.
//!
//! - [`auth`]: password hashing and API keys.
//! - [`cli`]: the `tollgate` commands (DESIGN.md §7).
//! - [`config`]: the operator's configuration (DESIGN.md §7).
//! - [`db`]: the SQLite and PostgreSQL implementations of `app::store::Store`.
//! - [`gateway`]: the OpenAI-compatible gateway, the usage API and `/metrics`.
//! - [`http`]: the axum router (pages, server functions, health).
//! - [`assets`]: the site (wasm, js, css, public files) embedded in the binary.
#![forbid(unsafe_code)]

pub mod assets;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod gateway;
pub mod http;
pub mod replay;

/// mimalloc instead of the system allocator, for the binary, the tests and the
/// benchmarks alike: every gateway request allocates for its two HTTP exchanges
/// and its JSON, and glibc's malloc took about 12% of the gateway's CPU under
/// load (`server/benches/gateway.sh`, README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
