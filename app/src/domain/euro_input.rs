//! Reading a euro amount typed by a person into the Token Limits tab (DESIGN.md §3).
//!
//! Hand-written on purpose: which separators mean what is the product's own rule, not a
//! locale's. `.` or `,` is the decimal separator; a space (normal, no-break, narrow
//! no-break or thin) or the other of the two groups thousands. A lone separator before
//! exactly three digits could be either, so it is refused with a way to write it.

use serde::{Deserialize, Serialize};

use super::money::Money;

/// The largest amount accepted, in cents: 1,000,000,000.00 EUR.
const MAX_CENTS: u128 = 100_000_000_000;

/// Why a typed amount was refused. Each variant has a stable [`code`] and a
/// sentence for the person who typed it ([`message`]).
///
/// [`code`]: EuroInputError::code
/// [`message`]: EuroInputError::message
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum EuroInputError {
    /// Nothing but spaces. The caller decides what that means (for a model limit: no
    /// limit).
    #[error("{}", self.message())]
    Empty,
    /// Not digits and separators (letters, other signs, a lone euro sign).
    #[error("{}", self.message())]
    NotANumber,
    /// A minus sign.
    #[error("{}", self.message())]
    Negative,
    /// A lone `.` or `,` followed by exactly three digits, as in `1.234`: a thousands
    /// separator or a decimal one?
    #[error("{}", self.message())]
    AmbiguousSeparator {
        /// The digits before the separator (`1`).
        before: String,
        /// The separator as typed (`.` or `,`).
        separator: char,
        /// The three digits after it (`234`).
        after: String,
    },
    /// More than two digits after the decimal separator.
    #[error("{}", self.message())]
    TooManyDecimals,
    /// More than 1,000,000,000.00 EUR.
    #[error("{}", self.message())]
    TooLarge,
    /// Separators in impossible places: doubled, at an end, groups not of three, or a
    /// mix that fits no reading (`1,23,4.00`, `12 34`, `1.234.5,6.7`).
    #[error("{}", self.message())]
    MisplacedSeparator,
}

impl EuroInputError {
    /// Stable snake_case code the UI matches on: `empty`, `not_a_number`, `negative`,
    /// `ambiguous_separator`, `too_many_decimals`, `too_large`, `misplaced_separator`.
    pub fn code(&self) -> &'static str {
        match self {
            EuroInputError::Empty => "empty",
            EuroInputError::NotANumber => "not_a_number",
            EuroInputError::Negative => "negative",
            EuroInputError::AmbiguousSeparator { .. } => "ambiguous_separator",
            EuroInputError::TooManyDecimals => "too_many_decimals",
            EuroInputError::TooLarge => "too_large",
            EuroInputError::MisplacedSeparator => "misplaced_separator",
        }
    }

    /// The error whose [`EuroInputError::code`] is `code`, for the codes whose
    /// sentence depends on nothing typed: all but `ambiguous_separator`, whose
    /// sentence repeats the input. `None` for that one and for unknown codes.
    pub fn of_code(code: &str) -> Option<EuroInputError> {
        [
            EuroInputError::Empty,
            EuroInputError::NotANumber,
            EuroInputError::Negative,
            EuroInputError::TooManyDecimals,
            EuroInputError::TooLarge,
            EuroInputError::MisplacedSeparator,
        ]
        .into_iter()
        .find(|e| e.code() == code)
    }

    /// One sentence, shown next to the field, telling the person what to type instead.
    pub fn message(&self) -> String {
        match self {
            EuroInputError::Empty => "Enter an amount in euros, for example 12.50.".to_owned(),
            EuroInputError::NotANumber => {
                "Enter an amount in euros using digits, for example 12.50 or 1\u{a0}234,50.".to_owned()
            }
            EuroInputError::Negative => "An amount cannot be negative.".to_owned(),
            EuroInputError::AmbiguousSeparator {
                before,
                separator,
                after,
            } => {
                let thousands = format!(
                    "\"{before}{separator}{after}\" is ambiguous: for {before}{after} euros write \
                     {before}{after}, {before}.{after},00 or {before},{after}.00"
                );
                // Read the other way, `1.500` is 1.50; `1.234` would have 3 decimals.
                match after.strip_suffix('0') {
                    Some(cents) => format!(
                        "{thousands}; for {before}{separator}{cents} euros write \
                         {before}{separator}{cents}."
                    ),
                    None => format!("{thousands}; amounts have at most 2 decimals."),
                }
            }
            EuroInputError::TooManyDecimals => {
                "Use at most 2 decimals (whole cents), for example 12.35 or 12,35.".to_owned()
            }
            EuroInputError::TooLarge => {
                "The amount is too large: the most accepted is €1,000,000,000.00.".to_owned()
            }
            EuroInputError::MisplacedSeparator => {
                "Check the separators: group thousands by three (1\u{a0}234\u{a0}567,89, 1.234.567,89 \
                 or 1,234,567.89) and put digits on both sides of the decimal separator."
                    .to_owned()
            }
        }
    }
}

/// A separator between two groups of digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sep {
    Dot,
    Comma,
    Space,
}

impl Sep {
    fn of(c: char) -> Option<Sep> {
        match c {
            '.' => Some(Sep::Dot),
            ',' => Some(Sep::Comma),
            // Space, no-break space, narrow no-break space (French grouping), thin space.
            ' ' | '\u{00A0}' | '\u{202F}' | '\u{2009}' => Some(Sep::Space),
            _ => None,
        }
    }
}

/// `text` without the euro's mark before or after it: its sign (`€ 12.50`,
/// `12.50 €`) or its ISO 4217 code in any case (`EUR 12`, `12 eur`), which the
/// column's heading "Limit (EUR)" invites. One mark at most.
fn strip_currency(text: &str) -> &str {
    const CODE: &str = "EUR";
    if let Some(rest) = text.strip_prefix('€') {
        return rest.trim_start();
    }
    if let Some(rest) = text.strip_suffix('€') {
        return rest.trim_end();
    }
    let code_at = |at: usize| {
        text.get(at..at + CODE.len())
            .is_some_and(|code| code.eq_ignore_ascii_case(CODE))
    };
    if code_at(0) {
        return text[CODE.len()..].trim_start();
    }
    match text.len().checked_sub(CODE.len()) {
        Some(end) if code_at(end) => text[..end].trim_end(),
        _ => text,
    }
}

/// Parses an amount of euros typed by a person (DESIGN.md §3) into exact [`Money`].
///
/// Accepts `12`, `12.5`, `12,50`, `1 234,50` (with a normal, no-break or narrow
/// no-break space), `1.234,50`, `1,234.50`, `1,234,567.89`, and a euro sign or the
/// code `EUR` before or after (`€ 12.50`, `€12.50`, `12.50 €`, `EUR 12`, `12 eur`),
/// so that the tab's own display
/// (`€1,234.56`, see `format_eur`) reads back to the same amount. At most two decimals
/// and at most 1,000,000,000.00 EUR.
///
/// Errors: [`EuroInputError::Empty`] for blank input (the caller decides whether that
/// means "no limit"), and otherwise one variant per way of getting it wrong; a lone
/// separator before exactly three digits (`1.234`, `1,234`) is
/// [`EuroInputError::AmbiguousSeparator`].
pub fn parse_eur_input(input: &str) -> Result<Money, EuroInputError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(EuroInputError::Empty);
    }
    // The sign may sit on either side of the euro's mark: "-€5", "€-5", "- 5 €".
    let (negative_outside, text) = strip_minus(text);
    let (negative_inside, body) = strip_minus(strip_currency(text));
    let cents = parse_digits_and_separators(body)?;
    if negative_outside || negative_inside {
        return Err(EuroInputError::Negative);
    }
    // At most 10¹¹ cents, so the i128 conversion always succeeds.
    let cents = i128::try_from(cents).map_err(|_| EuroInputError::TooLarge)?;
    Ok(Money::new(rust_decimal::Decimal::from_i128_with_scale(
        cents, 2,
    )))
}

fn strip_minus(text: &str) -> (bool, &str) {
    // U+2212 is the typographic minus that word processors paste.
    match text
        .strip_prefix('-')
        .or_else(|| text.strip_prefix('\u{2212}'))
    {
        Some(rest) => (true, rest.trim_start()),
        None => (false, text),
    }
}

/// The amount in cents of a body of digits and separators (sign and euro sign gone).
fn parse_digits_and_separators(body: &str) -> Result<u128, EuroInputError> {
    if body.is_empty() {
        return Err(EuroInputError::NotANumber);
    }
    // Split into groups of digits and the single separators between them.
    let mut groups: Vec<&str> = Vec::new();
    let mut seps: Vec<(Sep, char)> = Vec::new();
    let mut group_start = 0;
    for (i, c) in body.char_indices() {
        if c.is_ascii_digit() {
            continue;
        }
        let Some(sep) = Sep::of(c) else {
            return Err(EuroInputError::NotANumber);
        };
        if i == group_start {
            // At the start, or right after another separator.
            return Err(EuroInputError::MisplacedSeparator);
        }
        groups.push(&body[group_start..i]);
        seps.push((sep, c));
        group_start = i + c.len_utf8();
    }
    if group_start == body.len() {
        return Err(EuroInputError::MisplacedSeparator);
    }
    groups.push(&body[group_start..]);

    let count = |kind: Sep| seps.iter().filter(|(s, _)| *s == kind).count();
    let (dots, commas, spaces) = (count(Sep::Dot), count(Sep::Comma), count(Sep::Space));
    let last = seps.last().map(|(s, _)| *s);

    // Which separator (by position) is the decimal one, if any.
    let decimal_at: Option<usize> = match (dots, commas) {
        (0, 0) => None,
        (_, 0) | (0, _) => {
            let punct_count = dots + commas;
            if spaces > 0 {
                // Spaces group, so the punctuation must be the one decimal separator.
                if punct_count == 1 && matches!(last, Some(Sep::Dot | Sep::Comma)) {
                    Some(seps.len() - 1)
                } else {
                    return Err(EuroInputError::MisplacedSeparator);
                }
            } else if punct_count >= 2 {
                None
            } else {
                // A lone separator: decimal unless it is followed by three digits.
                let (before, after) = (groups[0], groups[1]);
                if after.len() == 3 {
                    let could_group = (1..=3).contains(&before.len()) && !before.starts_with('0');
                    if could_group {
                        return Err(EuroInputError::AmbiguousSeparator {
                            before: before.to_owned(),
                            separator: seps[0].1,
                            after: after.to_owned(),
                        });
                    }
                    // "0.125" or "1234.567" cannot be thousands: too many decimals.
                    return Err(EuroInputError::TooManyDecimals);
                }
                Some(0)
            }
        }
        _ => {
            // Both marks: the last separator is the decimal one and appears once.
            let Some(decimal) = last.filter(|s| *s != Sep::Space) else {
                return Err(EuroInputError::MisplacedSeparator);
            };
            let decimal_count = if decimal == Sep::Dot { dots } else { commas };
            if decimal_count != 1 || spaces > 0 {
                return Err(EuroInputError::MisplacedSeparator);
            }
            Some(seps.len() - 1)
        }
    };

    let (integer_groups, fraction) = match decimal_at {
        Some(i) => (&groups[..=i], Some(groups[i + 1])),
        None => (&groups[..], None),
    };
    // Grouped integers: a lead of one to three digits, then groups of exactly three.
    if let Some((lead, rest)) = integer_groups.split_first() {
        if !rest.is_empty() && (!(1..=3).contains(&lead.len()) || rest.iter().any(|g| g.len() != 3))
        {
            return Err(EuroInputError::MisplacedSeparator);
        }
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > 2 {
        return Err(EuroInputError::TooManyDecimals);
    }

    let mut cents: u128 = 0;
    let digits = integer_groups
        .iter()
        .flat_map(|g| g.bytes())
        .chain(fraction.bytes())
        .chain(std::iter::repeat_n(b'0', 2 - fraction.len()));
    for digit in digits {
        cents = cents
            .checked_mul(10)
            .and_then(|c| c.checked_add(u128::from(digit - b'0')))
            .filter(|c| *c <= MAX_CENTS.saturating_mul(1000))
            .ok_or(EuroInputError::TooLarge)?;
    }
    if cents > MAX_CENTS {
        return Err(EuroInputError::TooLarge);
    }
    Ok(cents)
}

#[cfg(test)]
mod tests {
    use super::super::money::format_eur;
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::Decimal;
    use rust_decimal_macros::dec;

    fn ok(input: &str) -> Decimal {
        match parse_eur_input(input) {
            Ok(m) => m.amount(),
            Err(e) => panic!("{input:?} refused: {e:?}"),
        }
    }

    fn code(input: &str) -> &'static str {
        match parse_eur_input(input) {
            Ok(m) => panic!("{input:?} accepted as {m}"),
            Err(e) => e.code(),
        }
    }

    #[test]
    fn accepts_every_documented_form() {
        let cases = [
            ("12", dec!(12)),
            ("12.5", dec!(12.5)),
            ("12,50", dec!(12.5)),
            ("1 234,50", dec!(1234.5)),
            ("1\u{00A0}234,50", dec!(1234.5)),
            ("1\u{202F}234,50", dec!(1234.5)),
            ("1.234,50", dec!(1234.5)),
            ("1,234.50", dec!(1234.5)),
            ("€ 12.50", dec!(12.5)),
            ("€12.50", dec!(12.5)),
            ("12.50 €", dec!(12.5)),
            ("12,50€", dec!(12.5)),
            ("EUR 12", dec!(12)),
            ("12 EUR", dec!(12)),
            ("12,50eur", dec!(12.5)),
            ("Eur 1 234,50", dec!(1234.5)),
            ("1,234,567.89", dec!(1234567.89)),
            ("1.234.567,89", dec!(1234567.89)),
            ("1 234 567,89", dec!(1234567.89)),
            ("1 234 567.89", dec!(1234567.89)),
            ("1,234,567", dec!(1234567)),
            ("1 234", dec!(1234)),
            ("€1,234.56", dec!(1234.56)),
            ("  7  ", dec!(7)),
            ("0", dec!(0)),
            ("0.5", dec!(0.5)),
            ("0,05", dec!(0.05)),
            ("1234", dec!(1234)),
            ("1234,5", dec!(1234.5)),
            ("12.345,6", dec!(12345.6)),
            ("1,000,000,000.00", dec!(1000000000)),
            ("1000000000", dec!(1000000000)),
        ];
        for (input, expected) in cases {
            assert_eq!(ok(input), expected, "{input:?}");
        }
    }

    #[test]
    fn refuses_each_mistake_with_its_own_code() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("\u{00A0}", "empty"),
            ("abc", "not_a_number"),
            ("€", "not_a_number"),
            ("12a", "not_a_number"),
            ("1e5", "not_a_number"),
            ("+5", "not_a_number"),
            ("€€5", "not_a_number"),
            ("EUR", "not_a_number"),
            ("EUR 5 €", "not_a_number"),
            ("EUREUR 5", "not_a_number"),
            ("EU 5", "not_a_number"),
            ("-12 EUR", "negative"),
            ("EUR -12", "negative"),
            ("-5", "negative"),
            ("-€5", "negative"),
            ("€-5", "negative"),
            ("\u{2212}5,00", "negative"),
            ("-0.01 €", "negative"),
            ("1.234", "ambiguous_separator"),
            ("1,234", "ambiguous_separator"),
            ("999,000", "ambiguous_separator"),
            ("€ 12.345", "ambiguous_separator"),
            ("12.345", "ambiguous_separator"),
            ("1.2345", "too_many_decimals"),
            ("0.125", "too_many_decimals"),
            ("1234.567", "too_many_decimals"),
            ("1 234,567", "too_many_decimals"),
            ("1,234.567", "too_many_decimals"),
            ("1000000000.01", "too_large"),
            ("1,000,000,001", "too_large"),
            ("99999999999999999999999999999999999999999999", "too_large"),
            ("1,23,4.00", "misplaced_separator"),
            ("12 34", "misplaced_separator"),
            ("1..5", "misplaced_separator"),
            ("12.", "misplaced_separator"),
            (".5", "misplaced_separator"),
            ("1  234", "misplaced_separator"),
            ("1.234.5", "misplaced_separator"),
            ("1,234.567.89", "misplaced_separator"),
            ("1.234,567.89", "misplaced_separator"),
            ("1 234.567,89", "misplaced_separator"),
            ("1,234 567", "misplaced_separator"),
            ("1234,567.00", "misplaced_separator"),
        ];
        for (input, expected) in cases {
            assert_eq!(code(input), expected, "{input:?}");
        }
    }

    #[test]
    fn messages_are_specific() {
        let e = parse_eur_input("1.234").unwrap_err();
        assert_eq!(
            e.message(),
            "\"1.234\" is ambiguous: for 1234 euros write 1234, 1.234,00 or 1,234.00; \
             amounts have at most 2 decimals."
        );
        assert_eq!(e.to_string(), e.message());
        // Both readings, when the second is whole cents.
        assert_eq!(
            parse_eur_input("1,500").unwrap_err().message(),
            "\"1,500\" is ambiguous: for 1500 euros write 1500, 1.500,00 or 1,500.00; \
             for 1,50 euros write 1,50."
        );
        let all = [
            EuroInputError::Empty,
            EuroInputError::NotANumber,
            EuroInputError::Negative,
            e,
            EuroInputError::TooManyDecimals,
            EuroInputError::TooLarge,
            EuroInputError::MisplacedSeparator,
        ];
        let mut messages: Vec<String> = all.iter().map(|e| e.message()).collect();
        messages.sort();
        messages.dedup();
        assert_eq!(
            messages.len(),
            all.len(),
            "one distinct sentence per mistake"
        );
        assert!(EuroInputError::TooLarge
            .message()
            .contains("€1,000,000,000.00"));
        // An example amount is never broken over two lines of a narrow screen:
        // its groups are joined by no-break spaces, and each example still
        // parses as the amount it shows.
        for message in &messages {
            let chars: Vec<char> = message.chars().collect();
            assert!(
                !chars
                    .windows(3)
                    .any(|w| w[0].is_ascii_digit() && w[1] == ' ' && w[2].is_ascii_digit()),
                "{message:?}"
            );
        }
        assert_eq!(ok("1\u{a0}234,50"), dec!(1234.5));
        assert_eq!(ok("1\u{a0}234\u{a0}567,89"), dec!(1234567.89));
        // Each is found again by its code, but the one whose sentence repeats
        // the input.
        for error in all {
            let again = EuroInputError::of_code(error.code());
            match error {
                EuroInputError::AmbiguousSeparator { .. } => assert_eq!(again, None),
                error => assert_eq!(again, Some(error)),
            }
        }
    }

    #[test]
    fn the_tabs_own_display_parses_back() {
        for amount in [
            dec!(0),
            dec!(0.01),
            dec!(12.5),
            dec!(1234.56),
            dec!(1000000000),
        ] {
            let shown = format_eur(Money::new(amount));
            assert_eq!(ok(&shown), amount, "{shown}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(cents in 0i64..=100_000_000_000) {
            let money = Money::new(Decimal::new(cents, 2));
            prop_assert_eq!(parse_eur_input(&format_eur(money)), Ok(money));
        }

        #[test]
        fn every_grouping_style_reads_the_same(cents in 0i64..=100_000_000_000, style in 0usize..6) {
            let euros = (cents / 100).to_string();
            let rest = format!("{:02}", cents % 100);
            let grouped = |sep: &str| {
                let lead = euros.len() % 3;
                let mut out = String::new();
                for (i, d) in euros.chars().enumerate() {
                    if i != 0 && i % 3 == lead {
                        out.push_str(sep);
                    }
                    out.push(d);
                }
                out
            };
            let text = match style {
                0 => format!("{}.{rest}", grouped(",")),
                1 => format!("{},{rest}", grouped(".")),
                2 => format!("{},{rest}", grouped("\u{202F}")),
                3 => format!("€ {}.{rest}", grouped(" ")),
                4 => format!("{euros},{rest} €"),
                _ => format!("{euros}.{rest}"),
            };
            prop_assert_eq!(parse_eur_input(&text), Ok(Money::new(Decimal::new(cents, 2))), "{}", text);
        }
    }
}
