//! The browser half of Tollgate: wasm-bindgen exports `hydrate`, which the
//! server-rendered page calls once the module has loaded.
#![forbid(unsafe_code)]

/// Attach the Leptos app to the server-rendered `<body>`, keeping what the
/// visitor typed into it meanwhile (`app::ui::EarlyInput`).
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    let early = app::ui::EarlyInput::read();
    leptos::mount::hydrate_body(move || {
        leptos::prelude::provide_context(early);
        app::App()
    });
}
