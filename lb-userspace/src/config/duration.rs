//! The config's duration syntax: `<integer>ms` or `<integer>s`, parsed and
//! printed.

use std::time::Duration;

/// The longest duration any key takes: a week. Keys have tighter limits
/// of their own; this one keeps every sum and product the agent makes of
/// config durations (a first verdict is `interval` × 100 at most, plus a
/// timeout) far from overflowing a `Duration` or an `Instant`.
pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// `<integer>ms` or `<integer>s`, greater than zero and at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let invalid = || format!("expected a duration like \"300ms\" or \"2s\", got {text:?}");
    // "ms" first: "5ms" also ends in 's'.
    let (digits, millis) = match text.strip_suffix("ms") {
        Some(digits) => (digits, true),
        None => (text.strip_suffix('s').ok_or_else(invalid)?, false),
    };
    // u64::from_str would also take a leading '+'.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let too_long = || {
        format!(
            "duration {text:?} is longer than any key takes (at most {}, a week)",
            show(MAX)
        )
    };
    let n: u64 = digits.parse().map_err(|_| too_long())?;
    if n == 0 {
        return Err(format!("duration must be greater than 0, got {text:?}"));
    }
    let d = if millis {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    };
    if d > MAX {
        return Err(too_long());
    }
    Ok(d)
}

/// `text` as a duration of at most `max` (tighter than [`MAX`]), `what`
/// saying why in the error.
pub fn parse_at_most(text: &str, max: Duration, what: &str) -> Result<Duration, String> {
    let d = parse(text)?;
    if d > max {
        return Err(format!(
            "must be at most {} ({what}), got {text:?}",
            show(max)
        ));
    }
    Ok(d)
}

/// Renders a duration in the config's own syntax (all config durations are
/// whole milliseconds): `2s`, `1500ms`. The one printer of durations for
/// messages and for turning a config back into TOML; what it prints,
/// [`parse`] reads back.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_show_in_config_syntax() {
        assert_eq!(show(Duration::from_secs(2)), "2s");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn the_overflowing_interval_of_issue_21_is_refused() {
        for text in ["18446744073709551615s", "18446744073709551616s", "604801s"] {
            let err = parse(text).expect_err(text);
            assert!(err.contains("longer than any key takes"), "{text}: {err}");
        }
        assert_eq!(parse("604800s"), Ok(MAX));
        assert_eq!(parse("604800000ms"), Ok(MAX));
    }

    proptest! {
        #[test]
        fn valid_durations_round_trip(n in 1u64..=MAX.as_secs(), millis in any::<bool>()) {
            let (text, expected) = if millis {
                (format!("{n}ms"), Duration::from_millis(n))
            } else {
                (format!("{n}s"), Duration::from_secs(n))
            };
            prop_assert_eq!(parse(&text), Ok(expected));
            prop_assert_eq!(parse(&show(expected)), Ok(expected));
        }

        #[test]
        fn durations_beyond_a_week_are_refused(n in MAX.as_secs() + 1.., millis in any::<bool>()) {
            let text = if millis {
                // Every millisecond count past the week's.
                format!("{}ms", n.saturating_mul(1000))
            } else {
                format!("{n}s")
            };
            let err = parse(&text).expect_err("too long");
            prop_assert!(err.contains("at most 604800s"), "{}", err);
        }
    }
}
