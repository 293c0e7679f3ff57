//! Model limits (the seed also calls it Per Model Cost Caps): one row per model with
//! In this cycle, Limit (EUR, empty = shared pool) and Enabled; one Save for all.

use leptos::prelude::*;

use crate::{api::SaveModelLimits, report::TabView, ui::SaveButton};

/// The Model limits section.
#[component]
pub fn ModelLimits(
    view: TabView,
    save: ServerAction<SaveModelLimits>,
    drafts: super::Drafts,
) -> impl IntoView {
    let outcome = crate::ui::form_outcome(save);
    let error = move || outcome().and_then(|r| r.err());
    let summary = crate::ui::form_status(outcome);
    // Catalog order is the order the operator configured; the report sorts by
    // spend, so restore a stable order for the form. A model the config no longer
    // lists takes no requests, so it has no limit to set.
    let mut rows: Vec<_> = view.models.into_iter().filter(|m| m.in_catalog).collect();
    rows.sort_by(|a, b| a.display_name.cmp(&b.display_name));
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
                                    let id = id.to_string();
                                    move |apply: &dyn Fn(&mut super::LimitDraft)| {
                                        drafts.limits.update(|d| {
                                            apply(d.entry(id.clone()).or_insert(super::LimitDraft {
                                                limit: None,
                                                enabled: None,
                                                version,
                                            }))
                                        })
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
                                let input_id = format!("limit-{id}");
                                let error_id = format!("limit-error-{id}");
                                let field = id.clone();
                                let row_error = move || error().and_then(|e| e.field(&field).map(|f| f.message.clone()));
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
                                                aria-invalid=invalid
                                                aria-describedby=error_id.clone()
                                            />
                                            <p class="field-error" id=error_id>{row_error}</p>
                                        </td>
                                        <td>
                                            <label class="toggle">
                                                <input
                                                    type="checkbox"
                                                    role="switch"
                                                    name=format!("rows[{i}][enabled]")
                                                    checked=enabled
                                                    on:change=switched
                                                />
                                                <span class="visually-hidden">{format!("Enable the limit for {}", row.display_name)}</span>
                                            </label>
                                        </td>
                                    </tr>
                                }
                            })
                            .collect_view()}
                    </tbody>
                </table>
                <div class="actions">
                    <SaveButton id="save-limits" label="Save model limits" pending=save.pending()/>
                    <p role="status" id="limits-result" class=move || summary().map(|r| r.0).unwrap_or("")>
                        {move || summary().map(|r| r.1)}
                    </p>
                </div>
            </ActionForm>
        </section>
    }
}
