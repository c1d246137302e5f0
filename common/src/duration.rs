//! Durations on the command line and in the environment: `humantime`'s forms (`250ms`, `90s`,
//! `5m`, `1h`, `1h 30m`, `2min`) plus a bare number, which means seconds.

use std::time::Duration;

/// A duration such as `250ms`, `90s`, `5m` or `1h`, or a bare number of seconds (`90`).
/// Zero is allowed; use [`parse_interval`] where the value is a period.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{text:?} is too large a number of seconds"));
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration like 500ms, 15s, 5m or 1h: {err}"))
}

/// [`parse_duration`] refusing zero: for intervals and periods (`tokio::time::interval`
/// panics on a zero period, and a zero requeue is a hot loop).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "{:?} is zero; a positive duration is needed",
            text.trim()
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_forms_users_type() {
        for (text, expected) in [
            ("90", Duration::from_secs(90)),
            ("42", Duration::from_secs(42)),
            (" 90s ", Duration::from_secs(90)),
            ("15s", Duration::from_secs(15)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("250ms", Duration::from_millis(250)),
            ("1h30m", Duration::from_secs(5400)),
            ("2min", Duration::from_secs(120)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
            assert_eq!(parse_interval(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn nonsense_and_unknown_units_are_refused() {
        for text in ["", "  ", "s", "5 parsecs", "-5s", "5x", "1.5.5s"] {
            assert!(parse_duration(text).is_err(), "{text}");
            assert!(parse_interval(text).is_err(), "{text}");
        }
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(err.contains("5 parsecs"), "{err}");
    }

    #[test]
    fn huge_values_are_refused_instead_of_overflowing() {
        assert!(parse_duration("99999999999999999999999").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
        assert_eq!(
            parse_duration("18446744073709551615"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn zero_is_a_duration_but_not_an_interval() {
        for text in ["0", "0s", "0ms", "0h"] {
            assert_eq!(parse_duration(text), Ok(Duration::ZERO), "{text}");
            let err = parse_interval(text).unwrap_err();
            assert!(err.contains("zero"), "{err}");
        }
    }
}
