//! The site (hydration wasm and js, stylesheet, public files) embedded in the
//! binary, so that the binary alone is the deployment (DESIGN.md §7).
//!
//! Release builds carry the files of `target/site` as they were when the server
//! was compiled, so the frontend is built first (`./dev build` does both steps in
//! order). Debug builds read the same folder from disk at run time, so a rebuilt
//! frontend shows up without recompiling the server.

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use leptos::config::LeptosOptions;
use rust_embed::RustEmbed;

/// Name of the wasm-bindgen output: `pkg/tollgate.js`, `pkg/tollgate_bg.wasm` and
/// the stylesheet `pkg/tollgate.css`.
pub const OUTPUT_NAME: &str = "tollgate";
/// Folder of the built site, relative to the workspace root.
pub const SITE_ROOT: &str = "target/site";
/// Folder of the wasm, js and css inside the site.
pub const SITE_PKG_DIR: &str = "pkg";

#[derive(RustEmbed)]
#[folder = "$CARGO_MANIFEST_DIR/../target/site"]
#[allow_missing = true]
struct Site;

/// Leptos options matching the embedded site. Built in code rather than read from
/// `Cargo.toml`, which is not deployed.
pub fn leptos_options(listen: std::net::SocketAddr) -> LeptosOptions {
    LeptosOptions::builder()
        .output_name(OUTPUT_NAME)
        .site_root(SITE_ROOT)
        .site_pkg_dir(SITE_PKG_DIR)
        .site_addr(listen)
        .build()
}

/// True when the hydration bundle is present, so that a page served without it
/// can be reported at start-up instead of silently never hydrating.
pub fn has_frontend() -> bool {
    Site::get(&format!("{SITE_PKG_DIR}/{OUTPUT_NAME}_bg.wasm")).is_some()
}

/// The embedded file at `path` (URL path, leading `/` optional), answered with its
/// MIME type and an ETag; `None` when there is no such file.
///
/// File names carry no content hash, so browsers must revalidate
/// (`Cache-Control: no-cache`); the ETag makes that a cheap 304.
pub fn serve(path: &str, request_headers: &HeaderMap) -> Option<Response> {
    let path = path.trim_start_matches('/');
    if path.is_empty() {
        return None;
    }
    let file = Site::get(path)?;
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let not_modified = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if not_modified {
        return Some((StatusCode::NOT_MODIFIED, headers).into_response());
    }
    if let Ok(value) = HeaderValue::from_str(file.metadata.mimetype()) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    Some((headers, Body::from(file.data.into_owned())).into_response())
}
