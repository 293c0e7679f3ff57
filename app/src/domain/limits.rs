//! Per-model cost caps (DESIGN.md R5).

use serde::{Deserialize, Serialize};

use super::money::Nanos;

/// One model's limit setting: an optional cap per cycle in nano-euros and its
/// `enabled` toggle (DESIGN.md vocabulary "model limit").
///
/// Without an active cap the model draws on the shared pool only. The setting persists
/// across cycles; the spend it is compared with resets with the cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelLimit {
    /// The cap per cycle in nano-euros; `None` = no cap set (field left empty).
    pub limit: Option<Nanos>,
    /// The toggle; a cap counts only while it is on.
    pub enabled: bool,
}

/// Why a model limit setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Enabled with no amount: refused rather than silently ignored (DESIGN.md R5).
    #[error("enter a limit amount before enabling it")]
    EnabledWithoutAmount,
    /// A cap below zero.
    #[error("a limit cannot be negative")]
    Negative,
}

impl LimitError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::EnabledWithoutAmount => "enabled_without_amount",
            LimitError::Negative => "negative_limit",
        }
    }
}

impl ModelLimit {
    /// Checks the setting before it is saved (DESIGN.md R5): enabling an empty limit
    /// is [`LimitError::EnabledWithoutAmount`], a negative cap [`LimitError::Negative`].
    /// A cap of 0 is valid: enabled, it blocks (or diverts) every request.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self.limit {
            Some(cap) if cap.is_negative() => Err(LimitError::Negative),
            None if self.enabled => Err(LimitError::EnabledWithoutAmount),
            _ => Ok(()),
        }
    }

    /// The cap in force, in nano-euros: `Some` only when enabled and set (R5).
    pub fn active_cap(&self) -> Option<Nanos> {
        if self.enabled {
            self.limit
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabling_an_empty_limit_is_an_error() {
        let l = ModelLimit {
            limit: None,
            enabled: true,
        };
        assert_eq!(l.validate(), Err(LimitError::EnabledWithoutAmount));
        assert_eq!(
            LimitError::EnabledWithoutAmount.code(),
            "enabled_without_amount"
        );
    }

    #[test]
    fn a_cap_is_active_only_when_enabled_and_set() {
        let cap = Nanos::new(5);
        let on = ModelLimit {
            limit: Some(cap),
            enabled: true,
        };
        let off = ModelLimit {
            limit: Some(cap),
            enabled: false,
        };
        assert_eq!(on.active_cap(), Some(cap));
        assert_eq!(off.active_cap(), None);
        assert_eq!(ModelLimit::default().active_cap(), None);
        assert!(off.validate().is_ok() && ModelLimit::default().validate().is_ok());
    }

    #[test]
    fn zero_is_a_valid_active_cap_and_negative_is_not() {
        let zero = ModelLimit {
            limit: Some(Nanos::ZERO),
            enabled: true,
        };
        assert_eq!(zero.validate(), Ok(()));
        assert_eq!(zero.active_cap(), Some(Nanos::ZERO));
        let negative = ModelLimit {
            limit: Some(Nanos::new(-1)),
            enabled: false,
        };
        assert_eq!(negative.validate(), Err(LimitError::Negative));
    }
}
