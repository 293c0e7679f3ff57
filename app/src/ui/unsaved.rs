//! Changes typed in the tab are not lost without a word:
//! - what a visitor typed or switched before the page came alive (hydration) is
//!   kept, and taken as a change like one typed afterwards ([`EarlyInput`]);
//! - leaving the page while it holds changes not saved asks first
//!   ([`provide_leave_guard`], [`track_unsaved`]): a link, Sign out, Back or
//!   Forward, a reload or closing the tab.
//!
//! Without JavaScript none of this runs: nothing is typed into a page that
//! comes alive, and a form's fields are the browser's own.

use std::sync::{Arc, Mutex, PoisonError};

use leptos::{
    prelude::*,
    wasm_bindgen::JsCast,
    web_sys::{Event, HtmlInputElement},
};
use web_sys::EventInit;

/// The question asked before a link or Sign out leaves the page with changes
/// not saved. (Before a reload or closing the tab, the browser asks in words
/// of its own.)
pub const LEAVE_QUESTION: &str =
    "Your changes on this page are not saved. Leave the page and lose them?";

/// One form control as the visitor left it before hydration, by its `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EarlyChange {
    /// A text field whose text differs from the page's.
    Text { id: String, value: String },
    /// A checkbox (a switch) turned from the page's state.
    Checked { id: String, checked: bool },
}

/// The form controls a visitor changed in the server-rendered page before it
/// hydrated, read by the browser's entry point before hydrating and replayed by
/// a page once its controls are live ([`replay_early_input`]).
///
/// Hydration gives each field the value the page was rendered with, which
/// would wipe what was typed meanwhile; and a switch turned meanwhile would
/// stay turned on screen with the page unaware of it.
#[derive(Debug, Clone, Default)]
pub struct EarlyInput(Arc<Mutex<Vec<EarlyChange>>>);

impl EarlyInput {
    /// Reads every `<input>` with an `id` whose state differs from the page's
    /// HTML: a text field's value from its `value` attribute, a checkbox's
    /// state from its `checked` attribute. Hidden fields and passwords are
    /// left alone. Call it before hydrating; in the browser only.
    pub fn read() -> EarlyInput {
        let inputs = document().get_elements_by_tag_name("input");
        let changes = (0..inputs.length())
            .filter_map(|i| inputs.item(i)?.dyn_into::<HtmlInputElement>().ok())
            .filter(|input| !input.id().is_empty())
            .filter_map(|input| match input.type_().as_str() {
                "hidden" | "password" | "submit" | "button" => None,
                "checkbox" | "radio" => {
                    (input.checked() != input.default_checked()).then(|| EarlyChange::Checked {
                        id: input.id(),
                        checked: input.checked(),
                    })
                }
                _ => (input.value() != input.default_value()).then(|| EarlyChange::Text {
                    id: input.id(),
                    value: input.value(),
                }),
            })
            .collect();
        EarlyInput(Arc::new(Mutex::new(changes)))
    }

    fn take(&self) -> Vec<EarlyChange> {
        std::mem::take(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Gives the controls the page's entry point read before hydration
/// ([`EarlyInput`], in the context) their state back, each with the event a
/// visitor's change sends (`input` for text, `change` for a checkbox), so the
/// page's handlers take it as a change. Once only: later calls find nothing.
/// Call it from an effect of the page whose controls it is, once they are live.
pub(crate) fn replay_early_input() {
    let Some(early) = use_context::<EarlyInput>() else {
        return;
    };
    let changes = early.take();
    if changes.is_empty() {
        return;
    }
    // At the next frame: an effect of the page may run before hydration has
    // given the page's fields their rendered values, which would wipe these.
    request_animation_frame(move || changes.into_iter().for_each(replay));
}

/// Gives one control its state back, with the event a visitor's change sends.
/// A control changed again since the page came alive is left as it is: its
/// own event has told the page already.
fn replay(change: EarlyChange) {
    let id = match &change {
        EarlyChange::Text { id, .. } | EarlyChange::Checked { id, .. } => id,
    };
    let Some(input) = document()
        .get_element_by_id(id)
        .and_then(|element| element.dyn_into::<HtmlInputElement>().ok())
    else {
        return;
    };
    let event = match change {
        EarlyChange::Text { value, .. } => {
            // Hydration puts the rendered value back.
            if input.value() == input.default_value() {
                input.set_value(&value);
            } else if input.value() != value {
                return;
            }
            "input"
        }
        EarlyChange::Checked { checked, .. } => {
            if input.checked() != checked {
                return;
            }
            "change"
        }
    };
    let init = EventInit::new();
    init.set_bubbles(true);
    if let Ok(event) = Event::new_with_event_init_dict(event, &init) {
        let _ = input.dispatch_event(&event);
    }
}

/// The address of the page shown while it holds changes not saved, `None`
/// otherwise (provided by the app, set by the page: [`track_unsaved`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unsaved(RwSignal<Option<String>>);

/// Provides [`Unsaved`] and, in the browser, asks before the page is left
/// while it is set: the browser's own question before an unload (a reload,
/// an address typed, the tab closed), and [`LEAVE_QUESTION`] before a click
/// on a link or on a button outside the page's `<main>` (Sign out), and
/// before Back or Forward to another of the app's pages, which the app's
/// router would otherwise follow without unloading anything. A visitor
/// who agrees to leave is not asked again by the unload that follows. Call it
/// once, in the root component.
pub(crate) fn provide_leave_guard() {
    let unsaved = Unsaved(RwSignal::new(None));
    provide_context(unsaved);
    // In the browser, now: the router, made after this, adds listeners of
    // its own to the window, and a window's listeners of one event run in the
    // order they were added, whatever their phase (Chromium).
    #[cfg(feature = "hydrate")]
    browser::listen(unsaved);
}

/// Keeps [`Unsaved`] set while `dirty` says the page holds changes not saved,
/// and clears it when the calling component is dropped (the page left).
pub(crate) fn track_unsaved(dirty: impl Fn() -> bool + Send + Sync + 'static) {
    let Some(unsaved) = use_context::<Unsaved>() else {
        return;
    };
    Effect::new(move |_| {
        let page = dirty().then(|| window().location().href().ok()).flatten();
        unsaved.0.set(page);
    });
    on_cleanup(move || unsaved.0.set(None));
}

/// The browser's half of the guard: the window's listeners.
#[cfg(feature = "hydrate")]
mod browser {
    use leptos::{
        ev,
        prelude::*,
        wasm_bindgen::{closure::Closure, JsCast, JsValue},
        web_sys::{Element, Event, MouseEvent},
    };

    use super::{Unsaved, LEAVE_QUESTION};

    impl Unsaved {
        fn is_set(self) -> bool {
            self.0.with_untracked(Option::is_some)
        }

        /// Asks [`LEAVE_QUESTION`]: `true` to leave, and then clears the mark, so
        /// the unload that may follow does not ask again.
        fn may_leave(self) -> bool {
            let leave = window()
                .confirm_with_message(LEAVE_QUESTION)
                .unwrap_or(true);
            if leave {
                self.0.set(None);
            }
            leave
        }
    }

    /// Adds [`provide_leave_guard`]'s listeners to the window, for as long as
    /// the app lasts.
    pub(super) fn listen(unsaved: Unsaved) {
        let before_unload = window_event_listener(ev::beforeunload, move |ev| {
            if unsaved.is_set() {
                ev.prevent_default();
                // Older browsers ask only when a text is set.
                ev.set_return_value(LEAVE_QUESTION);
            }
        });
        std::mem::forget(before_unload);
        // In the capturing phase: before the router's own listener (the
        // window's, bubbling) follows a link.
        let click = Closure::<dyn Fn(MouseEvent)>::new(move |ev: MouseEvent| {
            if unsaved.is_set() && leaves_page(&ev) && !unsaved.may_leave() {
                ev.prevent_default();
                ev.stop_propagation();
            }
        });
        // Back and Forward between the app's pages unload nothing either: the
        // router hears `popstate` after this listener, added first. Staying puts
        // the page's address back, and the router never hears of it.
        let history_move = Closure::<dyn Fn(Event)>::new(move |ev: Event| {
            let Some(page) = unsaved.0.get_untracked() else {
                return;
            };
            let moved = window().location().href().is_ok_and(|here| here != page);
            if moved && !unsaved.may_leave() {
                ev.stop_immediate_propagation();
                if let Ok(history) = window().history() {
                    let _ = history.push_state_with_url(&JsValue::NULL, "", Some(&page));
                }
            }
        });
        for (event, listener) in [
            ("click", click.as_ref()),
            ("popstate", history_move.as_ref()),
        ] {
            let _ = window().add_event_listener_with_callback_and_bool(
                event,
                listener.unchecked_ref(),
                true,
            );
        }
        click.forget();
        history_move.forget();
    }

    /// Whether the click `ev` leaves the page: a plain click (no modifier, which
    /// opens another tab or window) on a link that opens here, or on a button
    /// outside the page's `<main>` (the shell's Sign out).
    fn leaves_page(ev: &MouseEvent) -> bool {
        if ev.button() != 0 || ev.ctrl_key() || ev.meta_key() || ev.shift_key() || ev.alt_key() {
            return false;
        }
        let Some(target) = ev.target().and_then(|t| t.dyn_into::<Element>().ok()) else {
            return false;
        };
        let closest = |selector: &str| target.closest(selector).ok().flatten();
        if let Some(link) = closest("a[href]") {
            return link
                .get_attribute("target")
                .is_none_or(|t| t.is_empty() || t == "_self");
        }
        closest("button").is_some() && closest("main").is_none()
    }
}
