//! Durations on the command line: `30s`, `5m`, `1h`, `2d`, or a sum such as `1h30m`.

use std::time::Duration;

/// Parses `30s`, `5m`, `1h`, `2d` (and sums of them, `1h30m`). Every number needs its unit.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("a duration must not be empty (examples: 30s, 5m, 1h, 2d)".into());
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number
                .unwrap_or(0)
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(digit)))
                .ok_or_else(|| format!("the duration {text:?} is too long"))?;
            number = Some(n);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 24 * 3600,
            _ => {
                return Err(format!(
                    "{text:?} is not a duration: use a number and a unit s, m, h or d (examples: 30s, 5m, 1h, 2d)"
                ));
            }
        };
        let Some(n) = number.take() else {
            return Err(format!(
                "{text:?} is not a duration: the unit {c:?} has no number before it (examples: 30s, 5m, 1h, 2d)"
            ));
        };
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("the duration {text:?} is too long"))?;
    }
    if number.is_some() {
        return Err(format!(
            "{text:?} is not a duration: the last number has no unit s, m, h or d (examples: 30s, 5m, 1h, 2d)"
        ));
    }
    // A century at most: the instants computed from it must not overflow.
    if total > 100 * 365 * 24 * 3600 {
        return Err(format!("the duration {text:?} is too long"));
    }
    Ok(Duration::from_secs(total))
}

/// `1d 2h`, `59m 30s`, `12s`: the two largest units, for people.
pub(crate) fn human(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    let (d, h, m, s) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    let pair = |major: u64, major_unit: &str, minor: u64, minor_unit: &str| {
        if minor == 0 {
            format!("{major}{major_unit}")
        } else {
            format!("{major}{major_unit} {minor}{minor_unit}")
        }
    };
    let text = if d > 0 {
        pair(d, "d", h, "h")
    } else if h > 0 {
        pair(h, "h", m, "m")
    } else if m > 0 {
        pair(m, "m", s, "s")
    } else {
        format!("{s}s")
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_sums() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "5",
            "m",
            "5x",
            "-5m",
            "1.5h",
            "5 m",
            "99999999999999999999s",
            "1h5",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn human_readable() {
        assert_eq!(human(12), "12s");
        assert_eq!(human(90), "1m 30s");
        assert_eq!(human(3 * 86_400 + 7200), "3d 2h");
        assert_eq!(human(-61), "-1m 1s");
        assert_eq!(human(300), "5m");
        assert_eq!(human(2 * 86_400), "2d");
    }
}
