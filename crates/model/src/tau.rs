//! The residual scaling factor τ as a rule of the number of residual blocks L
//! (Zhang et al., "Stabilize Deep ResNet with A Sharp Scaling Factor τ", 2022).
//!
//! A rule is written as a string in configs and on the command line and resolved against
//! L when a model is built. Accepted forms (spaces are ignored):
//!
//! | string | rule | τ |
//! | --- | --- | --- |
//! | `0.136` | [`TauRule::Fixed`] | 0.136 |
//! | `1/sqrt(L)`, `0.5/sqrt(L)`, `2/sqrt(L)` | [`TauRule::InvSqrtDepth`] | c/√L |
//! | `1/L`, `0.1/L` | [`TauRule::InvDepth`] | c/L |
//! | `L^-0.25`, `3*L^-0.5`, `L^(-1/4)`, `2*L^-1/4` | [`TauRule::Power`] | c·L^e |
//!
//! The constant c and τ itself must be finite and positive; the exponent e any finite
//! number (`L^-1/4` reads as L^(−1/4), the paper's notation).
//!
//! # Example
//!
//! A rule read from a config resolves to the τ of each depth; a typo is an error that
//! lists the accepted forms.
//!
//! ```
//! use tau_model::TauRule;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Deserialize)]
//! struct Model {
//!     tau: TauRule,
//! }
//! let m: Model = serde_json::from_str(r#"{"tau": "1/sqrt(L)"}"#)?;
//! // ResNet-110 on CIFAR has L = 54 blocks: τ = 1/√54 ≈ 0.136.
//! assert!((m.tau.resolve(54) - 0.136).abs() < 1e-3);
//! // A bare number is a fixed τ.
//! let fixed: Model = serde_json::from_str(r#"{"tau": 0.136}"#)?;
//! assert_eq!(fixed.tau, TauRule::Fixed(0.136));
//! assert!(serde_json::from_str::<Model>(r#"{"tau": "1/sqrt(K)"}"#).is_err());
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;

/// The accepted forms, shown in every parse error. See the
/// [example](TauRuleError#example).
pub const ACCEPTED_FORMS: &str = "a positive number (\"0.136\"), \"c/sqrt(L)\" (\"1/sqrt(L)\", \"0.5/sqrt(L)\"), \"c/L\" (\"1/L\"), or \"c*L^e\" (\"L^-0.25\", \"2*L^-0.5\", \"L^(-1/4)\"), with c > 0 finite";

/// How τ depends on the number of residual blocks L.
///
/// # Example
///
/// Parse a rule, resolve it at a depth (the values are the closed forms of the table in
/// the [module docs](self)), and write it back.
///
/// ```
/// use tau_model::TauRule;
///
/// # fn main() -> Result<(), tau_model::TauRuleError> {
/// let rule: TauRule = "1/sqrt(L)".parse()?;
/// assert_eq!(rule, TauRule::InvSqrtDepth { scale: 1.0 });
/// assert_eq!(rule, TauRule::default());
/// assert_eq!(rule.resolve(16), 0.25); // 1/√16
/// assert_eq!(rule.resolve(0), 1.0); // L = 0 counts as L = 1
///
/// let quarter: TauRule = "L^(-1/4)".parse()?;
/// assert_eq!(quarter, TauRule::Power { scale: 1.0, exponent: -0.25 });
/// assert_eq!(quarter.resolve(16), 0.5); // 16^(−1/4)
/// assert_eq!("0.1/L".parse::<TauRule>()?.resolve(10), 0.01);
///
/// // Display gives a string that parses back to the same rule.
/// assert_eq!(quarter.to_string(), "L^-0.25");
/// assert_eq!(quarter.to_string().parse::<TauRule>()?, quarter);
///
/// // A rule built in code is checked with validate.
/// assert!(TauRule::Fixed(0.136).validate().is_ok());
/// assert!(TauRule::InvDepth { scale: -1.0 }.validate().is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TauRule {
    /// τ = value, whatever the depth.
    Fixed(f64),
    /// τ = scale / √L: the paper's sharp choice at scale 1.
    InvSqrtDepth {
        /// The constant in front, 1 for `1/sqrt(L)`.
        scale: f64,
    },
    /// τ = scale / L.
    InvDepth {
        /// The constant in front, 1 for `1/L`.
        scale: f64,
    },
    /// τ = scale · L^exponent (`L^-0.25` is exponent −0.25).
    Power {
        /// The constant in front.
        scale: f64,
        /// The exponent of L (negative for a τ that shrinks with depth).
        exponent: f64,
    },
}

impl Default for TauRule {
    /// `1/sqrt(L)`, the paper's choice.
    fn default() -> Self {
        TauRule::InvSqrtDepth { scale: 1.0 }
    }
}

/// A τ rule string that is not one of [`ACCEPTED_FORMS`].
///
/// # Example
///
/// ```
/// use tau_model::tau::{ACCEPTED_FORMS, TauRule, TauRuleError};
///
/// let err: TauRuleError = "-1/sqrt(L)".parse::<TauRule>().unwrap_err();
/// assert_eq!(err.input, "-1/sqrt(L)");
/// assert_eq!(err.reason, "the constant must be finite and > 0, got -1");
/// // The message names the input, the reason, and every accepted form.
/// assert!(err.to_string().starts_with("invalid tau rule \"-1/sqrt(L)\""));
/// assert!(err.to_string().ends_with(ACCEPTED_FORMS));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid tau rule {input:?}: {reason}; accepted forms: {ACCEPTED_FORMS}")]
pub struct TauRuleError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl TauRule {
    /// τ for a network of `n_blocks` residual blocks (L). L = 0 is treated as L = 1.
    /// See the [example](TauRule#example).
    pub fn resolve(&self, n_blocks: usize) -> f64 {
        let l = n_blocks.max(1) as f64;
        match *self {
            TauRule::Fixed(v) => v,
            TauRule::InvSqrtDepth { scale } => scale / l.sqrt(),
            TauRule::InvDepth { scale } => scale / l,
            TauRule::Power { scale, exponent } => scale * l.powf(exponent),
        }
    }

    /// Checks that the constants are finite and positive (parsing already ensures it; this
    /// guards rules built in code). See the [example](TauRule#example).
    ///
    /// # Errors
    /// Names the offending constant.
    pub fn validate(&self) -> Result<(), TauRuleError> {
        let err = |reason: String| TauRuleError {
            input: self.to_string(),
            reason,
        };
        let (what, c) = match *self {
            TauRule::Fixed(v) => ("tau", v),
            TauRule::InvSqrtDepth { scale }
            | TauRule::InvDepth { scale }
            | TauRule::Power { scale, .. } => ("the constant", scale),
        };
        if !c.is_finite() || c <= 0.0 {
            return Err(err(format!("{what} must be finite and > 0, got {c}")));
        }
        if let TauRule::Power { exponent, .. } = *self
            && !exponent.is_finite()
        {
            return Err(err(format!("the exponent must be finite, got {exponent}")));
        }
        Ok(())
    }
}

fn parse_number(s: &str) -> Option<f64> {
    // Only plain decimal numbers: reject Rust's "inf"/"nan" spellings up front.
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
    {
        return None;
    }
    s.parse::<f64>().ok()
}

/// An exponent: a number or a fraction `a/b`, optionally in parentheses.
fn parse_exponent(s: &str) -> Option<f64> {
    let s = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(s);
    if let Some((num, den)) = s.split_once('/') {
        let num = parse_number(num)?;
        let den = parse_number(den)?;
        let v = num / den;
        return v.is_finite().then_some(v);
    }
    parse_number(s)
}

impl FromStr for TauRule {
    type Err = TauRuleError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s: String = input.chars().filter(|c| !c.is_whitespace()).collect();
        let err = |reason: &str| TauRuleError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty string"));
        }
        let rule = if let Some(c) = s.strip_suffix("/sqrt(L)") {
            let scale = if c.is_empty() {
                1.0
            } else {
                parse_number(c).ok_or_else(|| err("the constant is not a number"))?
            };
            TauRule::InvSqrtDepth { scale }
        } else if let Some(c) = s.strip_suffix("/L") {
            let scale = if c.is_empty() {
                1.0
            } else {
                parse_number(c).ok_or_else(|| err("the constant is not a number"))?
            };
            TauRule::InvDepth { scale }
        } else if let Some(pos) = s.find("L^") {
            let head = &s[..pos];
            let scale = if head.is_empty() {
                1.0
            } else {
                let c = head
                    .strip_suffix('*')
                    .ok_or_else(|| err("expected \"c*L^e\""))?;
                parse_number(c).ok_or_else(|| err("the constant is not a number"))?
            };
            let exponent =
                parse_exponent(&s[pos + 2..]).ok_or_else(|| err("the exponent is not a number"))?;
            TauRule::Power { scale, exponent }
        } else if s == "L" || s == "sqrt(L)" {
            return Err(err(
                "tau must not grow with depth this way; write \"c*L^e\"",
            ));
        } else {
            match parse_number(&s) {
                Some(v) => TauRule::Fixed(v),
                None => return Err(err("not a number and not a rule of L")),
            }
        };
        rule.validate().map_err(|e| err(&e.reason))?;
        Ok(rule)
    }
}

impl fmt::Display for TauRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TauRule::Fixed(v) => write!(f, "{v}"),
            TauRule::InvSqrtDepth { scale } => write!(f, "{scale}/sqrt(L)"),
            TauRule::InvDepth { scale } => write!(f, "{scale}/L"),
            TauRule::Power {
                scale: 1.0,
                exponent,
            } => write!(f, "L^{exponent}"),
            TauRule::Power { scale, exponent } => write!(f, "{scale}*L^{exponent}"),
        }
    }
}

impl serde::Serialize for TauRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TauRule {
    /// Accepts the string forms, and a bare number (`tau = 0.136` in TOML) as `Fixed`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TauRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a tau rule: {ACCEPTED_FORMS}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TauRule, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TauRule, E> {
                let rule = TauRule::Fixed(v);
                rule.validate().map_err(E::custom)?;
                Ok(rule)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TauRule, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TauRule, E> {
                self.visit_f64(v as f64)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn parses_every_documented_form_and_resolves() {
        let cases: &[(&str, usize, f64)] = &[
            ("0.136", 54, 0.136),
            ("1", 7, 1.0),
            ("1/sqrt(L)", 54, 1.0 / 54f64.sqrt()),
            ("0.5/sqrt(L)", 16, 0.125),
            ("2/sqrt(L)", 4, 1.0),
            ("1/L", 8, 0.125),
            ("0.1/L", 10, 0.01),
            ("L^-0.25", 16, 0.5),
            ("L^(-1/4)", 16, 0.5),
            ("L^-1/4", 16, 0.5),
            ("3*L^-0.5", 9, 1.0),
            ("0.5*L^-1", 4, 0.125),
            (" 1 / sqrt( L ) ", 100, 0.1),
            ("1e-1", 3, 0.1),
        ];
        for &(s, l, want) in cases {
            let rule: TauRule = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(
                close(rule.resolve(l), want),
                "{s} at L={l}: {}",
                rule.resolve(l)
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "0.136",
            "1/sqrt(L)",
            "0.5/sqrt(L)",
            "1/L",
            "L^-0.25",
            "2*L^-0.5",
            "L^0.1",
        ] {
            let rule: TauRule = s.parse().unwrap();
            let again: TauRule = rule.to_string().parse().unwrap();
            assert_eq!(rule, again, "{s} -> {rule}");
        }
        assert_eq!(
            "1/sqrt(L)".parse::<TauRule>().unwrap().to_string(),
            "1/sqrt(L)"
        );
        assert_eq!("L^-0.25".parse::<TauRule>().unwrap().to_string(), "L^-0.25");
    }

    #[test]
    fn rejects_bad_rules_showing_accepted_forms() {
        for s in [
            "-1",
            "nan",
            "NaN",
            "inf",
            "0",
            "1/sqrt(K)",
            "",
            "abc",
            "-1/sqrt(L)",
            "0/L",
            "L^nan",
            "L^",
            "2L^-1",
            "1e400",
        ] {
            let err = s.parse::<TauRule>().expect_err(s);
            let msg = err.to_string();
            assert!(msg.contains("accepted forms"), "{s}: {msg}");
            assert!(msg.contains("1/sqrt(L)"), "{s}: {msg}");
        }
    }

    #[test]
    fn serde_uses_the_string_form_and_accepts_numbers() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct T {
            tau: TauRule,
        }
        let t: T = serde_json::from_str(r#"{"tau": "1/sqrt(L)"}"#).unwrap();
        assert_eq!(t.tau, TauRule::InvSqrtDepth { scale: 1.0 });
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"tau":"1/sqrt(L)"}"#);
        let t: T = serde_json::from_str(r#"{"tau": 0.25}"#).unwrap();
        assert_eq!(t.tau, TauRule::Fixed(0.25));
        assert!(serde_json::from_str::<T>(r#"{"tau": -0.25}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"tau": "1/sqrt(K)"}"#).is_err());
    }
}
