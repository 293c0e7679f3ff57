//! Model limits (the seed also calls it Per Model Cost Caps): one row per model with
//! In this cycle, Limit (EUR, empty = shared pool) and Enabled; one Save for all.

use leptos::prelude::*;

use crate::{
    api::SaveModelLimits,
    domain::by_display_name,
    error::ApiError,
    report::TabView,
    ui::{focus_by_id, FormStatus, SaveButton},
};

/// The id of the section's Save button.
pub(super) const SAVE_ID: &str = "save-limits";

/// The id of the Limit field of the model `id`.
fn limit_input_id(id: &str) -> String {
    format!("limit-{id}")
}

/// The Model limits section.
#[component]
pub fn ModelLimits(
    view: TabView,
    save: ServerAction<SaveModelLimits>,
    drafts: super::Drafts,
) -> impl IntoView {
    let outcome = crate::ui::form_outcome(save, view.saved_form.as_deref());
    let error = move || outcome().and_then(|r| r.err());
    let edited = move || drafts.limits.with(|d| !d.is_empty());
    // The report sorts by spend, which moves with every request: the form keeps
    // its rows in the order of their names, so a row stays where the eye left it.
    // A model the config no longer lists takes no requests, so it has no limit
    // to set.
    let mut rows: Vec<_> = view.models.into_iter().filter(|m| m.in_catalog).collect();
    rows.sort_by(|a, b| by_display_name(&a.display_name, &b.display_name));
    // A save refused without JavaScript comes back with what was typed.
    drafts.take_refused(&rows, &view.refused_limits);
    drafts.rebase(&rows, save.pending().get_untracked());
    // A refused save takes the keyboard to the first field it refused, in the
    // rows' order: the error's sentence is under it, and Tab leads on to the
    // next. Only for an answer that comes while the section is shown: one
    // drawn again after the other form's save leaves the focus to that form.
    let ids: Vec<String> = rows.iter().map(|row| row.id.clone()).collect();
    let first_refused =
        move |error: &ApiError| ids.iter().find(|id| error.field(id).is_some()).cloned();
    // The same for a save refused without JavaScript, whose answer came with
    // the page (in its address): the field is marked `autofocus`.
    let refused_first = untrack(|| first_refused(&error().filter(|_| save.version().get() == 0)?));
    Effect::watch(
        move || save.value().get(),
        move |answer: &Option<Result<(), ApiError>>, _, _| {
            let Some(Err(error)) = answer else { return };
            if let Some(id) = first_refused(error) {
                focus_by_id(&limit_input_id(&id));
            }
        },
        false,
    );
    view! {
        <section class="card" aria-labelledby="limits-title">
            <header class="card-header">
                <h2 id="limits-title">"Model limits"</h2>
            </header>
            <p class="hint">
                "Optional: a euro limit per billing cycle for one model. When it is reached, requests "
                "for that model go to a cheaper model (or are blocked when none has room). Leave the "
                "limit empty to let the model draw on the shared workspace budget."
            </p>
            // Never filled in by the browser's memory of the page (on Back, say):
            // a switch shown as it was, under the current versions, would be
            // saved as shown with nothing to refuse it.
            <ActionForm action=save attr:autocomplete="off">
                <table class="limits">
                    <thead>
                        <tr>
                            <th scope="col">"Model"</th>
                            <th scope="col" class="num">"In this cycle"</th>
                            <th scope="col">"Limit (EUR)"</th>
                            <th scope="col">"Enabled"</th>
                        </tr>
                    </thead>
                    <tbody>
                        {rows
                            .into_iter()
                            .enumerate()
                            .map(|(i, row)| {
                                let id = row.id.clone();
                                // The row as saved, or as changed and not saved yet.
                                let draft = drafts.limits.with_untracked(|d| d.get(id.as_str()).cloned());
                                let version = draft.as_ref().map_or(row.limit_version, |d| d.version);
                                let limit = draft
                                    .as_ref()
                                    .and_then(|d| d.limit.clone())
                                    .unwrap_or_else(|| row.limit_input.clone());
                                let enabled = draft.and_then(|d| d.enabled).unwrap_or(row.limit_enabled);
                                let change = {
                                    let saved = std::sync::Arc::new(row.clone());
                                    move |apply: &dyn Fn(&mut super::LimitDraft)| {
                                        drafts.change_limit(&saved, version, apply)
                                    }
                                };
                                let typed = {
                                    let change = change.clone();
                                    move |ev| {
                                        let text = event_target_value(&ev);
                                        change(&|d| d.limit = Some(text.clone()));
                                    }
                                };
                                let switched = move |ev| {
                                    let on = event_target_checked(&ev);
                                    change(&|d| d.enabled = Some(on));
                                };
                                let input_id = limit_input_id(&id);
                                let autofocus = refused_first.as_deref() == Some(id.as_str());
                                let error_id = format!("limit-error-{id}");
                                let field = id.clone();
                                let row_error = move || error().and_then(|e| e.field(&field).map(|f| f.message.clone()));
                                // The note speaks of the limit as saved: shown while the row
                                // holds it unchanged and unrefused, not beside other text.
                                let note_id = format!("limit-note-{id}");
                                let note_shown = {
                                    let (id, row_error) = (id.clone(), row_error.clone());
                                    let has_note = row.limit_note.is_some();
                                    move || {
                                        has_note
                                            && drafts.limits.with(|d| !d.contains_key(id.as_str()))
                                            && row_error().is_none()
                                    }
                                };
                                let described_by = {
                                    let (error_id, note_id, note_shown) = (error_id.clone(), note_id.clone(), note_shown.clone());
                                    move || if note_shown() { format!("{error_id} {note_id}") } else { error_id.clone() }
                                };
                                let invalid = {
                                    let row_error = row_error.clone();
                                    move || row_error().is_some().to_string()
                                };
                                view! {
                                    <tr data-model=id.clone()>
                                        <th scope="row">
                                            {row.display_name.clone()}
                                            <Show when=move || row.limit_reached>
                                                <span class="badge stop">" Limit reached"</span>
                                            </Show>
                                        </th>
                                        <td class="num">{row.spent.clone()}</td>
                                        <td>
                                            <input type="hidden" name=format!("rows[{i}][model]") value=id.clone()/>
                                            <input type="hidden" name=format!("rows[{i}][version]") value=version.to_string()/>
                                            <label class="visually-hidden" for=input_id.clone()>
                                                {format!("Limit for {} in euros", row.display_name)}
                                            </label>
                                            <input
                                                id=input_id
                                                name=format!("rows[{i}][limit]")
                                                type="text"
                                                inputmode="decimal"
                                                autocomplete="off"
                                                placeholder="Shared pool"
                                                value=limit.clone()
                                                prop:value=limit
                                                on:input=typed
                                                autofocus=autofocus
                                                aria-invalid=invalid
                                                aria-describedby=described_by
                                            />
                                            <p class="field-error" id=error_id>{row_error}</p>
                                            {row.limit_note.clone().map(|note| view! {
                                                <p class="hint field-note" id=note_id hidden=move || !note_shown()>{note}</p>
                                            })}
                                        </td>
                                        <td>
                                            <label class="toggle">
                                                <input
                                                    type="checkbox"
                                                    role="switch"
                                                    id=format!("enabled-{id}")
                                                    name=format!("rows[{i}][enabled]")
                                                    checked=enabled
                                                    on:change=switched
                                                />
                                                <span class="visually-hidden">{format!("Enable the limit for {}", row.display_name)}</span>
                                                // The column's heading, for a phone's screen, where the
                                                // table's head is hidden; the switch's name is above.
                                                <span class="narrow-only" aria-hidden="true">"Enabled"</span>
                                            </label>
                                        </td>
                                    </tr>
                                }
                            })
                            .collect_view()}
                    </tbody>
                </table>
                <div class="actions">
                    <SaveButton id=SAVE_ID label="Save model limits" pending=save.pending()/>
                    <FormStatus id="limits-result" outcome edited/>
                </div>
            </ActionForm>
        </section>
    }
}
