//! Parsing of the human-written units in specs: durations (`90s`, `1h30m`) and Kubernetes
//! quantities (`500m` CPU, `256Mi` memory).

use std::time::Duration;

/// The longest duration a spec may give (100 years): a longer one is a mistake, and a time
/// it is added to must stay a time.
pub const MAX_DURATION_MS: u128 = 100 * 365 * 86_400_000;

/// Parses a Go-style duration: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`, `d`,
/// greater than zero and at most [`MAX_DURATION_MS`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (expected e.g. 90s, 30m, 1h30m)".into());
    }
    let mut total_ms: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?} (e.g. 90s, 30m, 1h30m)"
            ));
        }
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let (unit, tail) = tail.split_at(unit_len);
        let n: u128 = num
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number {num:?} is too large"))?;
        let ms_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit after {num} (use ms, s, m, h or d)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total_ms = total_ms.saturating_add(n.saturating_mul(ms_per));
        rest = tail;
    }
    if total_ms == 0 {
        return Err(format!(
            "invalid duration {text:?}: must be greater than zero"
        ));
    }
    if total_ms > MAX_DURATION_MS {
        return Err(format!(
            "duration {text:?} is too large (at most 100 years, 36500d)"
        ));
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("duration {text:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way users write them (`1h30m`, `45s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// Parses a CPU quantity into millicores: `500m`, `1`, `0.5`, `2.25`.
pub fn parse_cpu_millis(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let err = || format!("invalid CPU quantity {text:?} (expected e.g. 500m, 1, 0.5)");
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| err())?
    } else {
        let v: f64 = s.parse().map_err(|_| err())?;
        if !v.is_finite() || v < 0.0 {
            return Err(err());
        }
        (v * 1000.0).round() as u64
    };
    if millis == 0 {
        return Err(format!(
            "invalid CPU quantity {text:?}: must be greater than zero"
        ));
    }
    Ok(millis)
}

/// Parses a memory quantity into bytes: `256Mi`, `1Gi`, `500M`, `1G`, `1048576`.
pub fn parse_memory_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let err = || format!("invalid memory quantity {text:?} (expected e.g. 256Mi, 1Gi, 500M)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let v: f64 = num.parse().map_err(|_| err())?;
    let bytes = (v * mult).round();
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid memory quantity {text:?}: out of range"));
    }
    Ok(bytes as u64)
}

/// Checks an object name: a DNS-1123 label (lowercase letters, digits, '-'; at most 63 chars;
/// starts and ends alphanumeric), because names become container names and label values.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!("name {name:?} is longer than 63 characters"));
    }
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_chars || !ends_ok(name.chars().next()) || !ends_ok(name.chars().last()) {
        return Err(format!(
            "name {name:?} must consist of lowercase letters, digits and '-', and start and end \
             with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_go_style_compounds() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn durations_reject_missing_or_unknown_units_and_zero() {
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn a_duration_beyond_a_hundred_years_is_refused_not_wrapped() {
        assert_eq!(
            parse_duration("36500d"),
            Ok(Duration::from_secs(36_500 * 86_400))
        );
        for big in [
            "36501d",
            "18446744073709551615ms",
            "99999999999999999999999999999d",
        ] {
            let e = parse_duration(big).expect_err(big);
            assert!(e.contains("too large"), "{big}: {e}");
        }
    }

    #[test]
    fn durations_round_trip_through_format() {
        for s in ["1h30m", "45s", "250ms", "2d3h", "1m1s"] {
            let d = parse_duration(s).expect("valid");
            assert_eq!(format_duration(d), s);
        }
    }

    #[test]
    fn cpu_quantities_are_millicores() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("1"), Ok(1000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        assert!(parse_cpu_millis("lots").is_err());
        assert!(parse_cpu_millis("0").is_err());
        assert!(parse_cpu_millis("-1").is_err());
    }

    #[test]
    fn memory_quantities_know_binary_and_decimal_suffixes() {
        assert_eq!(parse_memory_bytes("256Mi"), Ok(256 * 1024 * 1024));
        assert_eq!(parse_memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory_bytes("1024"), Ok(1024));
        assert!(parse_memory_bytes("256MB").is_err());
        assert!(parse_memory_bytes("Mi").is_err());
        assert!(parse_memory_bytes("0").is_err());
    }

    #[test]
    fn names_follow_dns_labels() {
        assert!(check_name("alice-web").is_ok());
        assert!(check_name("Alice").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("x_y").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
    }
}
