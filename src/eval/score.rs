//! Scoring a generated answer against a sample's answers, in [0, 1].

/// How an answer is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Share of the answers (key facts) the output contains.
    ContainsAll,
    /// 1 if the output contains any answer.
    ContainsAny,
    /// 1 if the output, normalized, equals an answer.
    Exact,
    /// 1 if the number the output gives equals the answer.
    Number,
    /// Teacher-forced agreement with the full cache (no text answer).
    Fidelity,
}

/// Lower case, punctuation to spaces, whitespace collapsed.
pub fn normalize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The answer's number: after the last `####` if there is one, else the
/// first number of the output (commas and a trailing period dropped).
pub fn extract_number(output: &str) -> Option<String> {
    let tail = match output.rfind("####") {
        Some(i) => &output[i + 4..],
        None => output,
    };
    let mut num = String::new();
    let mut seen_digit = false;
    for c in tail.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            seen_digit = true;
        } else if seen_digit && c == ',' {
            continue;
        } else if seen_digit && c == '.' && !num.contains('.') {
            num.push(c);
        } else if !seen_digit && c == '-' {
            num = "-".into();
        } else if seen_digit {
            break;
        } else {
            num.clear();
        }
    }
    let num = num.trim_end_matches('.').to_string();
    seen_digit.then_some(num)
}

/// Numbers equal as values ("72" == "72.0").
fn same_number(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

/// The score of `output` in [0, 1].
pub fn score(scoring: Scoring, output: &str, answers: &[String]) -> f64 {
    let out = normalize(output);
    let contains = |a: &String| {
        let a = normalize(a);
        !a.is_empty() && format!(" {out} ").contains(&format!(" {a} "))
    };
    match scoring {
        Scoring::ContainsAll => {
            if answers.is_empty() {
                return 0.0;
            }
            answers.iter().filter(|a| contains(a)).count() as f64 / answers.len() as f64
        }
        Scoring::ContainsAny => f64::from(u8::from(answers.iter().any(contains))),
        Scoring::Exact => f64::from(u8::from(answers.iter().any(|a| normalize(a) == out))),
        Scoring::Number => match extract_number(output) {
            Some(n) => f64::from(u8::from(answers.iter().any(|a| same_number(&n, a)))),
            None => 0.0,
        },
        Scoring::Fidelity => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn contains_all_counts_key_facts_by_whole_words() {
        let a = s(&["sandwich", "Dolores Park"]);
        assert_eq!(
            score(Scoring::ContainsAll, "Eat a sandwich in Dolores Park!", &a),
            1.0
        );
        assert_eq!(score(Scoring::ContainsAll, "Eat a SANDWICH.", &a), 0.5);
        assert_eq!(
            score(Scoring::ContainsAll, "sandwiches at the park", &a),
            0.0
        );
        assert_eq!(score(Scoring::ContainsAll, "anything", &[]), 0.0);
    }

    #[test]
    fn contains_any_and_exact() {
        let a = s(&["Paris", "City of Light"]);
        assert_eq!(
            score(Scoring::ContainsAny, "It is the city of light.", &a),
            1.0
        );
        assert_eq!(score(Scoring::ContainsAny, "London", &a), 0.0);
        assert_eq!(score(Scoring::Exact, " paris. ", &a), 1.0);
        assert_eq!(score(Scoring::Exact, "Paris, France", &a), 0.0);
    }

    #[test]
    fn numbers_are_read_after_the_marker_or_first() {
        assert_eq!(
            extract_number("So 3 + 4 = 7.\n#### 1,200.").as_deref(),
            Some("1200")
        );
        assert_eq!(
            extract_number(" 71432 is the key").as_deref(),
            Some("71432")
        );
        assert_eq!(
            extract_number("it is -3.5 degrees").as_deref(),
            Some("-3.5")
        );
        assert_eq!(extract_number("no digits"), None);
        let a = s(&["72"]);
        assert_eq!(score(Scoring::Number, "48 + 24 = 72\n#### 72", &a), 1.0);
        assert_eq!(score(Scoring::Number, "#### 72.0", &a), 1.0);
        assert_eq!(score(Scoring::Number, "#### 71", &a), 0.0);
        assert_eq!(
            score(Scoring::Number, "The key is 71432.", &s(&["71432"])),
            1.0
        );
    }
}
