//! Spend by model (this cycle): every model with spend, its amount and share, with
//! a bar (R8).

use leptos::prelude::*;

use crate::report::TabView;

/// The Spend by model section.
#[component]
pub fn SpendByModel(view: TabView) -> impl IntoView {
    let rows: Vec<_> = view.models.into_iter().filter(|m| m.has_spend).collect();
    let empty = rows.is_empty();
    view! {
        <section class="card" aria-labelledby="by-model-title">
            <header class="card-header">
                <h2 id="by-model-title">"Spend by model (this cycle)"</h2>
            </header>
            <Show when=move || empty>
                <p class="hint">"Nothing has been spent in this cycle yet."</p>
            </Show>
            <ul class="by-model">
                {rows
                    .into_iter()
                    .map(|row| {
                        let share = format!("{}%", row.share_percent);
                        let retired = !row.in_catalog;
                        view! {
                            <li data-model=row.id.clone()>
                                <span class="name">
                                    {row.display_name}
                                    <Show when=move || retired>
                                        <span class="badge muted">" No longer in the catalog"</span>
                                    </Show>
                                </span>
                                <span class="amount">{row.spent}</span>
                                <span class="share">{share.clone()}</span>
                                <span class="bar" aria-hidden="true">
                                    <span class="bar-fill" style=format!("width: {share}")></span>
                                </span>
                            </li>
                        }
                    })
                    .collect_view()}
            </ul>
        </section>
    }
}
