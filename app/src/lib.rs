//! Tollgate's Leptos app, shared by the server (feature `ssr`) and the browser
//! (feature `hydrate`).
//!
//! - [`api`]: the `#[server]` functions and the views they return.
//! - [`ui`]: components and pages.
//! - [`store`] (server only): the `Store` port the server functions talk to; its
//!   SQLite and PostgreSQL implementations live in the `server` crate.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod domain;
pub mod error;
pub mod report;
#[cfg(feature = "ssr")]
pub mod store;
#[cfg(feature = "ssr")]
pub mod text;
pub mod ui;

pub use ui::{shell, App};
