//! The model catalog: which models exist, the names that reach them, their prices, and
//! the "strictly cheaper" order that fallback walks (DESIGN.md R3, R6).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::money::PricePerMTok;

/// A model's API name, as clients send it in `model` (e.g. `gpt-5-mini`).
///
/// Also the key of the per-model counters: aliases resolve to the model first, so every
/// alias of a model shares its id and its counter (DESIGN.md R3). A newtype over a
/// shared string: admission hands ids out in its answer on every request, and cloning
/// an `Arc<str>` does not allocate. Hashes and compares as its text, so maps keyed by
/// `ModelId` can be queried with a `&str`. Serialised as a plain string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelId(Arc<str>);

impl ModelId {
    /// The id `id`, taken as it is (the catalog checks it is not empty).
    pub fn new(id: impl Into<String>) -> ModelId {
        ModelId(Arc::from(id.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ModelId {
    fn from(id: &str) -> ModelId {
        ModelId(Arc::from(id))
    }
}

impl From<String> for ModelId {
    fn from(id: String) -> ModelId {
        ModelId::new(id)
    }
}

impl Borrow<str> for ModelId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for ModelId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ModelId, D::Error> {
        String::deserialize(deserializer).map(ModelId::new)
    }
}

/// A model's prices, each in EUR per 1M tokens (DESIGN.md vocabulary "price").
/// Reasoning tokens are output tokens and have no price of their own (R3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Prices {
    /// EUR per 1M prompt tokens that were not served from the provider's cache.
    pub input: PricePerMTok,
    /// EUR per 1M prompt tokens served from the provider's cache.
    pub cached_input: PricePerMTok,
    /// EUR per 1M completion tokens, reasoning tokens included.
    pub output: PricePerMTok,
}

impl Prices {
    /// The key of the cheaper order of DESIGN.md R6: output price, then input price.
    fn cheapness_key(&self) -> (PricePerMTok, PricePerMTok) {
        (self.output, self.input)
    }
}

/// One entry of the catalog (DESIGN.md vocabulary "model").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The API name and counter key.
    pub id: ModelId,
    /// The name people see, e.g. "GPT-5 Mini".
    pub display_name: String,
    /// Other names clients may send (e.g. `openai/gpt-5`); each resolves to this model.
    pub aliases: Vec<String>,
    /// Name of the upstream (from the config) that serves this model.
    pub upstream: String,
    /// The model name sent to the upstream.
    pub upstream_model: String,
    /// Current prices, EUR per 1M tokens.
    pub prices: Prices,
    /// The most output tokens one choice can produce; bounds reservations (R7).
    pub max_output_tokens: u32,
}

impl Model {
    /// The model as messages name it: `GPT-5 (gpt-5)`, or the id alone when the
    /// display name is the id.
    pub fn label(&self) -> String {
        if self.display_name == self.id.as_str() {
            self.id.to_string()
        } else {
            format!("{} ({})", self.display_name, self.id)
        }
    }

    /// True when `self` is strictly cheaper than `other`: lower output price, or the
    /// same output price and a lower input price (DESIGN.md R6). Equal prices are not
    /// cheaper, so fallback never moves sideways.
    pub fn is_strictly_cheaper_than(&self, other: &Model) -> bool {
        self.prices.cheapness_key() < other.prices.cheapness_key()
    }
}

/// Why a list of models cannot be a catalog. Each variant names the offender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// A model has an empty (or blank) id.
    #[error("a model has an empty id (display name \"{display_name}\")")]
    EmptyId {
        /// Display name of the model, to find it in the config.
        display_name: String,
    },
    /// A model has an empty (or blank) alias.
    #[error("model \"{model}\" has an empty alias")]
    EmptyAlias {
        /// The model carrying the alias.
        model: String,
    },
    /// Two models share one id.
    #[error("model id \"{0}\" appears more than once")]
    DuplicateId(String),
    /// One alias is listed twice, by one model or by two.
    #[error("alias \"{0}\" appears more than once")]
    DuplicateAlias(String),
    /// An alias is also a model id, so a name would reach two models (or be redundant).
    #[error("alias \"{alias}\" of model \"{model}\" is also a model id")]
    AliasIsModelId {
        /// The clashing name.
        alias: String,
        /// The model that lists it as an alias.
        model: String,
    },
    /// A model declares `max_output_tokens = 0`: it could answer nothing.
    #[error("model \"{0}\" has max_output_tokens = 0")]
    ZeroMaxOutputTokens(String),
    /// A model id or alias holds whitespace, a control character or an
    /// invisible one (a direction override, a zero-width space): callers, the
    /// CLI and the tab could not name it as written.
    #[error(
        "model name {0:?} holds whitespace, a control character or an invisible one \
         (a direction override, a zero-width space)"
    )]
    UnwritableName(String),
    /// A model id or alias is longer than [`MAX_MODEL_NAME_CHARS`] characters
    /// (the message gives its length, not the name).
    #[error(
        "a model name is {} characters long; an id or alias has at most \
         {MAX_MODEL_NAME_CHARS}",
        .0.chars().count()
    )]
    NameTooLong(String),
    /// A model's display name is blank: the tab and the spend API would show nothing.
    #[error("model \"{0}\" has a blank display name")]
    BlankDisplayName(String),
}

impl CatalogError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            CatalogError::EmptyId { .. } => "empty_model_id",
            CatalogError::EmptyAlias { .. } => "empty_alias",
            CatalogError::DuplicateId(_) => "duplicate_model_id",
            CatalogError::DuplicateAlias(_) => "duplicate_alias",
            CatalogError::AliasIsModelId { .. } => "alias_is_model_id",
            CatalogError::ZeroMaxOutputTokens(_) => "zero_max_output_tokens",
            CatalogError::UnwritableName(_) => "unwritable_model_name",
            CatalogError::NameTooLong(_) => "model_name_too_long",
            CatalogError::BlankDisplayName(_) => "blank_display_name",
        }
    }
}

/// Where a name points: a model's index, and whether the name was its id.
#[derive(Debug, Clone, Copy)]
struct Entry {
    index: usize,
    is_id: bool,
}

/// The validated set of models, with the lookups admission needs precomputed.
///
/// Built once per catalog change; admission then resolves a name with one hash lookup
/// and finds the strictly cheaper models (DESIGN.md R6) without sorting or allocating.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<Model>,
    names: HashMap<String, Entry>,
    /// Model indices from the most expensive to the cheapest (output, then input price,
    /// descending); equal prices keep catalog order.
    by_price_desc: Vec<usize>,
    /// For each model index, the position in `by_price_desc` of the first model that
    /// is strictly cheaper than it.
    first_cheaper: Vec<usize>,
}

impl Catalog {
    /// Validates `models` and builds the lookups.
    ///
    /// Errors (the first found, in catalog order): an empty id or alias, an id or
    /// alias with whitespace, a control or an invisible character in it, or longer
    /// than [`MAX_MODEL_NAME_CHARS`] characters ([`check_name`]), a blank display
    /// name, a duplicate id or alias, an alias that is also an id, or
    /// `max_output_tokens = 0`; see [`CatalogError`].
    pub fn new(models: Vec<Model>) -> Result<Catalog, CatalogError> {
        let mut names: HashMap<String, Entry> = HashMap::with_capacity(models.len() * 2);
        for (index, model) in models.iter().enumerate() {
            if model.id.as_str().trim().is_empty() {
                return Err(CatalogError::EmptyId {
                    display_name: model.display_name.clone(),
                });
            }
            check_name(model.id.as_str())?;
            if model.display_name.trim().is_empty() {
                return Err(CatalogError::BlankDisplayName(model.id.to_string()));
            }
            if model.max_output_tokens == 0 {
                return Err(CatalogError::ZeroMaxOutputTokens(model.id.to_string()));
            }
            let entry = Entry { index, is_id: true };
            if names.insert(model.id.to_string(), entry).is_some() {
                return Err(CatalogError::DuplicateId(model.id.to_string()));
            }
        }
        // Aliases after all ids, so that "alias equals an id" is caught whichever
        // of the two comes first in the file.
        for (index, model) in models.iter().enumerate() {
            for alias in &model.aliases {
                if alias.trim().is_empty() {
                    return Err(CatalogError::EmptyAlias {
                        model: model.id.to_string(),
                    });
                }
                check_name(alias)?;
                match names.get(alias.as_str()) {
                    Some(existing) if existing.is_id => {
                        return Err(CatalogError::AliasIsModelId {
                            alias: alias.clone(),
                            model: model.id.to_string(),
                        })
                    }
                    Some(_) => return Err(CatalogError::DuplicateAlias(alias.clone())),
                    None => {
                        names.insert(
                            alias.clone(),
                            Entry {
                                index,
                                is_id: false,
                            },
                        );
                    }
                }
            }
        }

        let mut by_price_desc: Vec<usize> = (0..models.len()).collect();
        // Stable sort: equal prices keep catalog order, so the walk is deterministic.
        by_price_desc.sort_by(|&a, &b| {
            models[b]
                .prices
                .cheapness_key()
                .cmp(&models[a].prices.cheapness_key())
        });
        let mut first_cheaper = vec![0; models.len()];
        let mut group_start = 0;
        while group_start < by_price_desc.len() {
            let key = models[by_price_desc[group_start]].prices.cheapness_key();
            let group_end = by_price_desc[group_start..]
                .iter()
                .position(|&i| models[i].prices.cheapness_key() != key)
                .map_or(by_price_desc.len(), |offset| group_start + offset);
            for &i in &by_price_desc[group_start..group_end] {
                first_cheaper[i] = group_end;
            }
            group_start = group_end;
        }

        Ok(Catalog {
            models,
            names,
            by_price_desc,
            first_cheaper,
        })
    }

    /// The model that `name` (an id or an alias, exact and case-sensitive) refers to.
    pub fn resolve(&self, name: &str) -> Option<&Model> {
        self.names
            .get(name)
            .and_then(|entry| self.models.get(entry.index))
    }

    /// The model with id `id` (aliases do not match).
    pub fn get(&self, id: &ModelId) -> Option<&Model> {
        self.names
            .get(id.as_str())
            .filter(|entry| entry.is_id)
            .and_then(|entry| self.models.get(entry.index))
    }

    /// All models, in catalog (config file) order.
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// The models strictly cheaper than the model `id` (DESIGN.md R6), from the most
    /// expensive down; equal prices keep catalog order. Empty for an unknown id.
    pub fn cheaper_than(&self, id: &ModelId) -> impl Iterator<Item = &Model> + '_ {
        let start = self
            .names
            .get(id.as_str())
            .filter(|entry| entry.is_id)
            .and_then(|entry| self.first_cheaper.get(entry.index).copied())
            .unwrap_or(self.by_price_desc.len());
        self.by_price_desc
            .get(start..)
            .unwrap_or_default()
            .iter()
            .filter_map(|&i| self.models.get(i))
    }
}

/// True for a bidirectional formatting character, drawn as nothing but
/// reordering the text after it: the direction marks, embeddings, overrides
/// and isolates (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069).
/// `b\u{202e}ig` would print as another name in every listing. Refused in
/// model ids and aliases here, in display names and the workspace's name by
/// the server's config.
pub fn reorders_text(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Most characters in a model id or alias. Providers' ids are a few dozen
/// characters long; the bound keeps a name in every listing and message, and
/// lets a name no catalog can hold be refused before anything is looked up.
pub const MAX_MODEL_NAME_CHARS: usize = 200;

/// Why `name` cannot be a model id or alias, if it cannot: it is not
/// [`writable`], or longer than [`MAX_MODEL_NAME_CHARS`] characters.
///
/// The length first, so that no message repeats a long name whole.
pub fn check_name(name: &str) -> Result<(), CatalogError> {
    if name.chars().count() > MAX_MODEL_NAME_CHARS {
        return Err(CatalogError::NameTooLong(name.to_owned()));
    }
    if !writable(name) {
        return Err(CatalogError::UnwritableName(name.to_owned()));
    }
    Ok(())
}

/// True when `name` (a model id or alias) can be written as it is, as the
/// catalog requires of every id and alias: no
/// whitespace, no control character, no character that reorders text
/// ([`reorders_text`]), and none that hides in it: the zero-width space,
/// joiners and word joiner, the byte order mark (U+200B to U+200D, U+2060,
/// U+FEFF).
pub fn writable(name: &str) -> bool {
    !name.chars().any(|c| {
        c.is_whitespace()
            || c.is_control()
            || reorders_text(c)
            || matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}')
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rust_decimal::Decimal;

    /// A test model priced `input`/`output` EUR per 1M tokens, given as
    /// (mantissa, scale) pairs so that no float literal is ever involved.
    pub(crate) fn model(id: &str, input: (i64, u32), output: (i64, u32)) -> Model {
        let price = |(m, s): (i64, u32)| match PricePerMTok::new(Decimal::new(m, s)) {
            Ok(p) => p,
            Err(e) => panic!("test price: {e}"),
        };
        Model {
            id: ModelId::new(id),
            display_name: id.to_uppercase(),
            aliases: Vec::new(),
            upstream: "openai".to_owned(),
            upstream_model: id.to_owned(),
            prices: Prices {
                input: price(input),
                cached_input: price((input.0, input.1 + 1)),
                output: price(output),
            },
            max_output_tokens: 1000,
        }
    }

    fn catalog(models: Vec<Model>) -> Catalog {
        match Catalog::new(models) {
            Ok(c) => c,
            Err(e) => panic!("test catalog: {e}"),
        }
    }

    fn ids<'a>(it: impl Iterator<Item = &'a Model>) -> Vec<&'a str> {
        it.map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn labels_name_the_id_once_when_it_is_the_display_name() {
        let mut gpt5 = model("gpt-5", (125, 2), (10, 0));
        assert_eq!(gpt5.label(), "GPT-5 (gpt-5)");
        gpt5.display_name = "gpt-5".into();
        assert_eq!(gpt5.label(), "gpt-5");
    }

    #[test]
    fn resolves_ids_and_aliases_to_one_model() {
        let mut gpt = model("gpt-4o", (25, 1), (10, 0));
        gpt.aliases = vec!["openai/gpt-4o".to_owned()];
        let c = catalog(vec![gpt, model("mini", (1, 1), (4, 1))]);
        let by_alias = c.resolve("openai/gpt-4o").map(|m| &m.id);
        let by_id = c.resolve("gpt-4o").map(|m| &m.id);
        assert_eq!(by_alias, Some(&ModelId::new("gpt-4o")));
        assert_eq!(by_alias, by_id);
        assert!(c.resolve("GPT-4O").is_none(), "exact match only");
        assert!(c.get(&ModelId::new("openai/gpt-4o")).is_none());
        assert!(c.get(&ModelId::new("mini")).is_some());
        assert_eq!(ids(c.models().iter()), ["gpt-4o", "mini"]);
    }

    #[test]
    fn rejects_bad_catalogs_naming_the_offender() {
        let a = model("a", (1, 0), (1, 0));
        let dup = Catalog::new(vec![a.clone(), a.clone()]).err();
        assert_eq!(dup, Some(CatalogError::DuplicateId("a".into())));

        let mut b = model("b", (1, 0), (1, 0));
        b.aliases = vec!["x".into()];
        let mut c = model("c", (1, 0), (1, 0));
        c.aliases = vec!["x".into()];
        let err = Catalog::new(vec![b.clone(), c]).err();
        assert_eq!(err, Some(CatalogError::DuplicateAlias("x".into())));
        assert_eq!(err.map(|e| e.code()), Some("duplicate_alias"));

        let mut shadow = model("d", (1, 0), (1, 0));
        shadow.aliases = vec!["a".into()];
        assert_eq!(
            Catalog::new(vec![shadow, a.clone()]).err(),
            Some(CatalogError::AliasIsModelId {
                alias: "a".into(),
                model: "d".into()
            })
        );

        let empty = model(" ", (1, 0), (1, 0));
        assert_eq!(
            Catalog::new(vec![empty]).err().map(|e| e.code()),
            Some("empty_model_id")
        );

        let mut empty_alias = model("e", (1, 0), (1, 0));
        empty_alias.aliases = vec![String::new()];
        assert_eq!(
            Catalog::new(vec![empty_alias]).err(),
            Some(CatalogError::EmptyAlias { model: "e".into() })
        );

        for name in [
            " m ",
            "m\tn",
            "m\u{0}",
            "m\u{a0}n",
            "b\u{202e}ig",
            "m\u{2066}n",
            "m\u{200b}",
            "\u{feff}m",
        ] {
            assert_eq!(
                Catalog::new(vec![model(name, (1, 0), (1, 0))]).err(),
                Some(CatalogError::UnwritableName(name.into()))
            );
            let mut aliased = model("f", (1, 0), (1, 0));
            aliased.aliases = vec![name.into()];
            assert_eq!(
                Catalog::new(vec![aliased]).err().map(|e| e.code()),
                Some("unwritable_model_name")
            );
        }

        let long = "m".repeat(MAX_MODEL_NAME_CHARS + 1);
        assert_eq!(
            Catalog::new(vec![model(&long, (1, 0), (1, 0))]).err(),
            Some(CatalogError::NameTooLong(long.clone()))
        );
        let mut long_alias = model("f", (1, 0), (1, 0));
        long_alias.aliases = vec![long];
        assert_eq!(
            Catalog::new(vec![long_alias]).err().map(|e| e.code()),
            Some("model_name_too_long")
        );
        let longest = "m".repeat(MAX_MODEL_NAME_CHARS);
        assert!(Catalog::new(vec![model(&longest, (1, 0), (1, 0))]).is_ok());

        let mut nameless = model("g", (1, 0), (1, 0));
        nameless.display_name = " ".into();
        assert_eq!(
            Catalog::new(vec![nameless]).err(),
            Some(CatalogError::BlankDisplayName("g".into()))
        );

        let mut zero = model("z", (1, 0), (1, 0));
        zero.max_output_tokens = 0;
        assert_eq!(
            Catalog::new(vec![zero]).err(),
            Some(CatalogError::ZeroMaxOutputTokens("z".into()))
        );
    }

    #[test]
    fn cheaper_order_is_output_then_input_price() {
        let big = model("big", (5, 0), (20, 0));
        let same_out_cheaper_in = model("same-out", (1, 0), (20, 0));
        let mid = model("mid", (9, 0), (10, 0));
        assert!(same_out_cheaper_in.is_strictly_cheaper_than(&big));
        assert!(mid.is_strictly_cheaper_than(&same_out_cheaper_in));
        assert!(!big.is_strictly_cheaper_than(&big));
        assert!(!big.is_strictly_cheaper_than(&mid));
    }

    #[test]
    fn cheaper_than_walks_from_most_expensive_down_and_skips_equal_prices() {
        let c = catalog(vec![
            model("small", (1, 1), (4, 1)),
            model("big", (2, 0), (8, 0)),
            model("big-twin", (2, 0), (8, 0)),
            model("mid", (4, 1), (16, 1)),
            model("mid-in", (3, 1), (16, 1)),
            model("free", (0, 0), (0, 0)),
        ]);
        let walk = |id: &str| ids(c.cheaper_than(&ModelId::new(id)));
        assert_eq!(walk("big"), ["mid", "mid-in", "small", "free"]);
        assert_eq!(walk("big-twin"), ["mid", "mid-in", "small", "free"]);
        assert_eq!(walk("mid"), ["mid-in", "small", "free"]);
        assert_eq!(walk("free"), Vec::<&str>::new());
        assert_eq!(walk("unknown"), Vec::<&str>::new());
        for m in c.models() {
            for cheaper in c.cheaper_than(&m.id) {
                assert!(cheaper.is_strictly_cheaper_than(m));
            }
        }
    }
}
