//! The browser half of Tollgate: wasm-bindgen exports `hydrate`, which the
//! server-rendered page calls once the module has loaded.
#![forbid(unsafe_code)]

/// Attach the Leptos app to the server-rendered `<body>`.
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
