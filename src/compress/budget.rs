//! How many KV cells to keep: a share of the prompt or a token count.

use std::fmt;
use std::str::FromStr;

/// `--kv-budget`: `0.1` or `10%` keeps a tenth of the prompt; `512` keeps 512 tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A share of the prompt in (0, 1].
    Ratio(f64),
    /// A token count (at least 2).
    Tokens(usize),
}

impl Budget {
    /// Cells to keep for `n` tokens (at least 1, at most `n`).
    pub fn cells_for(self, n: usize) -> usize {
        let cells = match self {
            Budget::Ratio(r) => (r * n as f64).round() as usize,
            Budget::Tokens(t) => t,
        };
        cells.clamp(1, n.max(1))
    }

    /// The budget as a JSON number: the ratio, or the token count.
    pub fn json(self) -> serde_json::Value {
        match self {
            Budget::Ratio(r) => serde_json::json!(r),
            Budget::Tokens(t) => serde_json::json!(t),
        }
    }

    pub fn is_full(self) -> bool {
        matches!(self, Budget::Ratio(r) if r >= 1.0)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{}%", (r * 1000.0).round() / 10.0),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

impl FromStr for Budget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!("invalid KV budget `{s}`: use a share in (0, 1] (0.1), a percentage in (0, 100] (10%), or a token count (512)")
        };
        let ratio = |r: f64| {
            if r.is_finite() && r > 0.0 && r <= 1.0 {
                Ok(Budget::Ratio(r))
            } else {
                Err(format!(
                    "KV budget `{s}` is out of range: the share must be in (0, 1], i.e. (0%, 100%]"
                ))
            }
        };
        if let Some(p) = t.strip_suffix('%') {
            return ratio(p.trim().parse::<f64>().map_err(|_| bad())? / 100.0);
        }
        if let Ok(n) = t.parse::<usize>() {
            return match n {
                0 => Err(format!(
                    "KV budget `{s}` is out of range: keep at least one token"
                )),
                1 => Ok(Budget::Ratio(1.0)),
                n => Ok(Budget::Tokens(n)),
            };
        }
        ratio(t.parse::<f64>().map_err(|_| bad())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ratios_percentages_and_counts() {
        assert_eq!("0.1".parse::<Budget>().unwrap(), Budget::Ratio(0.1));
        assert_eq!("10%".parse::<Budget>().unwrap(), Budget::Ratio(0.1));
        assert_eq!("100%".parse::<Budget>().unwrap(), Budget::Ratio(1.0));
        assert_eq!("1".parse::<Budget>().unwrap(), Budget::Ratio(1.0));
        assert_eq!("512".parse::<Budget>().unwrap(), Budget::Tokens(512));
    }

    #[test]
    fn rejects_out_of_range_and_garbage() {
        for bad in [
            "0", "0.0", "0%", "-0.1", "1.5", "150%", "abc", "", "nan", "inf",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn cells_are_rounded_and_clamped() {
        assert_eq!(Budget::Ratio(0.1).cells_for(4096), 410);
        assert_eq!(Budget::Tokens(512).cells_for(100), 100);
        assert_eq!(Budget::Ratio(0.0001).cells_for(100), 1);
    }
}
