//! The config's duration syntax: `<integer>ms` or `<integer>s`, parsed and
//! printed.

use std::time::Duration;

/// `<integer>ms` or `<integer>s`, greater than zero.
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
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration {text:?} is too large"))?;
    if n == 0 {
        return Err(format!("duration must be greater than 0, got {text:?}"));
    }
    Ok(if millis {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    })
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

    proptest! {
        #[test]
        fn valid_durations_round_trip(n in 1u64.., millis in any::<bool>()) {
            let (text, expected) = if millis {
                (format!("{n}ms"), Duration::from_millis(n))
            } else {
                (format!("{n}s"), Duration::from_secs(n))
            };
            prop_assert_eq!(parse(&text), Ok(expected));
        }
    }
}
